"""The LandscapeProbe callback through the engine: bit-identical training, records, resume."""
import pytest
import torch

from nnlab.data import DatasetSplits, ImageSet
from nnlab.engine.checkpoint import load_checkpoint
from nnlab.engine.metrics import read_jsonl
from nnlab.engine.train import Callback, TrainConfig, train
from nnlab.errors import ConfigError
from nnlab.landscape.callback import LandscapeProbe

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**kw) -> TrainConfig:
    """vgg-a-bn at 1/16 width on 256 synthetic 3x16x16 images: 8 steps of 32 per epoch."""
    base = dict(model="vgg-a-bn", model_options={"width": 0.0625, "dropout": 0.1}, data="synthetic",
                epochs=2, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                augment=True, progress=False, log_every=100)
    return TrainConfig(**{**base, **kw})


def synthetic(n_train=256, n_test=64) -> DatasetSplits:
    """Random 3x16x16 uint8 images whose label is the brightest of 4 image quarters."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train + n_test, 3, 16, 16), generator=g, dtype=torch.uint8)
    quarters = x.float().reshape(-1, 3, 2, 8, 2, 8).mean((1, 3, 5)).flatten(1)  # (N, 4)
    y = quarters.argmax(1)
    classes = ["a", "b", "c", "d"]
    return DatasetSplits("synthetic", ImageSet(x[:n_train], y[:n_train], classes),
                         ImageSet(x[n_train:], y[n_train:], classes), mean=(0.5,) * 3, std=(0.29,) * 3)


class Interrupt(Callback):
    """Raises KeyboardInterrupt once ``at`` steps are done (simulates a kill)."""

    def __init__(self, at: int | None):
        self.at = at

    def on_step_end(self, ctx):
        if self.at is not None and ctx.step == self.at:
            raise KeyboardInterrupt


def probe_records(path):
    return [r for r in read_jsonl(path) if "probe" in r]


def test_engine_training_with_probes_is_bit_identical(tmp_path):
    plain = train(tiny_config(), tmp_path / "plain", data=synthetic())
    probed = train(tiny_config(), tmp_path / "probed", data=synthetic(),
                   callbacks=[LandscapeProbe(every=3, hessian_every=6, hessian_iters=2)])
    for (k, a), b in zip(plain.model.state_dict().items(), probed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert plain.summary["test_top1"] == probed.summary["test_top1"]
    recs = probe_records(tmp_path / "probed" / "metrics.jsonl")
    land = [r for r in recs if r["probe"] == "landscape"]
    dist = [r for r in recs if r["probe"] == "graddist"]
    assert [r["step"] for r in land] == [1, 4, 7, 10, 13, 16]
    assert [r["step"] for r in dist] == [2, 5, 8, 11, 14]  # the step after each probe (none after 16)
    assert [r["epoch"] for r in land] == [1, 1, 1, 2, 2, 2]
    assert all(r["land_loss_max"] >= r["land_loss_min"] and r["land_beta"] > 0 for r in land)
    assert all("hess_top" in r for r in land if (r["step"] - 1) % 6 == 0)
    assert all(r["beta_t"] > 0 for r in dist)


def test_probed_run_resumes_to_the_same_weights_and_records(tmp_path):
    cfg = tiny_config(checkpoint_every=2)
    full = train(cfg, tmp_path / "full", data=synthetic(), callbacks=[LandscapeProbe(every=3), Interrupt(None)])
    with pytest.raises(KeyboardInterrupt):  # killed after step 11; last checkpoint at step 10
        train(cfg, tmp_path / "cut", data=synthetic(), callbacks=[LandscapeProbe(every=3), Interrupt(11)])
    assert load_checkpoint(tmp_path / "cut" / "checkpoint").step == 10
    resumed = train(cfg, tmp_path / "cut", resume=True, data=synthetic(), callbacks=[LandscapeProbe(every=3), Interrupt(None)])
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert probe_records(tmp_path / "full" / "metrics.jsonl") == probe_records(tmp_path / "cut" / "metrics.jsonl")


def test_bad_probe_settings_are_config_errors():
    with pytest.raises(ConfigError, match="every"):
        LandscapeProbe(every=0)
    with pytest.raises(ConfigError, match="multiple"):
        LandscapeProbe(every=30, hessian_every=45)
    with pytest.raises(ConfigError, match="positive"):
        LandscapeProbe(eta_factors=[0.5, 0.0])


def test_the_callback_probes_what_the_step_saw(tmp_path):
    """Issue 14: dropout masks replayed (at a tiny step size the probe's loss is the step's loss),
    the clipped step followed, and the same-batch beta logged beside the seed's beta_t."""
    cfg = tiny_config(model_options={"width": 0.0625, "dropout": 0.5}, grad_clip=0.05, epochs=1, momentum=0.0,
                      weight_decay=0.0, schedule="constant")
    train(cfg, tmp_path / "r", data=synthetic(), callbacks=[LandscapeProbe(every=3, eta_factors=[1e-7])])
    recs = probe_records(tmp_path / "r" / "metrics.jsonl")
    land = [r for r in recs if r["probe"] == "landscape"]
    dist = [r for r in recs if r["probe"] == "graddist"]
    for r in land:
        assert r["land_loss_min"] == pytest.approx(r["train_loss"], rel=1e-5)
        assert r["land_step_norm"] == pytest.approx(min(0.05, r["land_grad_norm"]), rel=1e-3)
    assert dist and all(r["beta_same"] > 0 and r["move_norm"] > 0 for r in dist)
    assert all(r["move_norm"] == pytest.approx(0.05 * 0.05, rel=1e-3) for r in dist)  # lr x clipped norm
