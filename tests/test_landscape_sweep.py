"""Bands, the resumable (bn, lr) sweep, its summary, the figures and the CLI."""
import csv

import pytest

from nnlab.cli import main
from nnlab.engine.io import read_json
from nnlab.engine.metrics import read_jsonl
from nnlab.errors import ConfigError
from nnlab.landscape.bands import band_medians, eta_band, last_half_median, lr_band
from nnlab.landscape.sweep import LandscapeConfig, pair_dir, run_landscape, train_config
from test_landscape_engine import synthetic

pytestmark = pytest.mark.usefixtures("one_thread")


def land(step, lo, hi, glo, ghi, beta, loss):
    return {"probe": "landscape", "step": step, "land_loss_min": lo, "land_loss_max": hi,
            "land_gdist_min": glo, "land_gdist_max": ghi, "land_beta": beta, "train_loss": loss}


def dist(step, d, beta):
    return {"probe": "graddist", "step": step, "grad_dist": d, "beta_t": beta}


def test_bands_and_last_half_medians():
    a = [land(1, 1.0, 3.0, 0.1, 0.5, 9.0, 2.0), land(31, 1.0, 1.5, 0.1, 0.2, 2.0, 1.0),
         land(61, 0.5, 0.6, 0.1, 0.3, 4.0, 0.8), dist(2, 1.0, 5.0), dist(62, 0.2, 1.0)]
    b = [land(1, 1.0, 2.0, 0.0, 0.1, 1.0, 2.5), land(31, 1.0, 1.1, 0.0, 0.1, 1.0, 1.5),
         land(61, 1.0, 1.2, 0.0, 0.1, 1.0, 0.2), dist(2, 3.0, 7.0), dist(62, 0.4, 3.0), {"step": 60}]
    band = eta_band(a, "loss")
    assert band.steps == [1, 31, 61] and band.width == pytest.approx([2.0, 0.5, 0.1])
    across = lr_band({0.1: {1: 2.0, 31: 1.0}, 0.2: {1: 2.5, 31: 1.5, 61: 0.2}})
    assert across.steps == [1, 31] and across.low == [2.0, 1.0] and across.high == [2.5, 1.5]
    assert last_half_median([1, 31, 61], [5.0, 1.0, 3.0], 60) == 2.0  # steps 31, 61
    assert last_half_median([1], [5.0], 60) is None
    m = band_medians({0.1: a, 0.2: b}, total_steps=100)
    assert m["eta_loss_band"] == pytest.approx((0.1 + 0.2) / 2)  # last half: steps 61, 62 only
    assert m["eta_gdist_band"] == pytest.approx((0.2 + 0.1) / 2)
    assert m["beta_eff"] == pytest.approx((4.0 + 1.0) / 2) and m["beta_t"] == pytest.approx(2.0)
    assert m["lr_loss_band"] == pytest.approx(0.6) and m["lr_gdist_band"] == pytest.approx(0.2)
    assert m["hess_top"] is None
    m0 = band_medians({0.1: a, 0.2: b}, total_steps=100, start=0)  # e.g. "after epoch 1" with epoch1=0
    assert m0["eta_loss_band"] == pytest.approx((0.5 + 0.2) / 2)  # all steps: per-run medians 0.5, 0.2
    blown = [land(1, 1.0, 9.0, 0.0, 9.0, 99.0, 9.0), {"event": "diverged", "step": 5}]
    assert band_medians({0.1: a, 0.2: b, 9.0: blown}, total_steps=100) == m  # diverged run left out


def tiny_sweep(**kw) -> LandscapeConfig:
    base = dict(model="vgg-a", data="synthetic", lrs=[0.05, 0.1], epochs=1, batch_size=64, every=2,
                eta_count=3, width=0.0625, progress=False, checkpoint_every=2)
    return LandscapeConfig(**{**base, **kw})


def test_train_config_follows_the_paper_and_picks_the_bn_variant():
    on, off = train_config(LandscapeConfig(width=0.25), "on", 0.1), train_config(LandscapeConfig(), "off", 0.1)
    assert on.model == "vgg-a-bn" and on.model_options == {"width": 0.25} and off.model == "vgg-a"
    assert (on.momentum, on.weight_decay, on.schedule, on.optimizer) == (0.0, 0.0, "constant", "sgd")
    assert train_config(LandscapeConfig(model="lenet5"), "on", 0.1).model_options == {"bn": True}
    with pytest.raises(ConfigError, match="bn must be"):
        LandscapeConfig(bn="maybe").validate()
    with pytest.raises(ConfigError, match="duplicates"):
        LandscapeConfig(lrs=[0.1, 0.1]).validate()


def test_sweep_writes_summary_csv_and_skips_finished_pairs(tmp_path):
    data = synthetic()
    first = run_landscape(tiny_sweep(), tmp_path, data=data)
    assert first.ran == [("off", 0.05), ("off", 0.1), ("on", 0.05), ("on", 0.1)] and not first.skipped
    summary = read_json(tmp_path / "summary.json")
    assert summary["complete"] and set(summary["top1"]) == {"off", "on"}
    assert all(0.0 <= v <= 1.0 for bn in summary["top1"].values() for v in bn.values())
    assert set(summary["band_medians"]["on"]) >= {"eta_loss_band", "eta_gdist_band", "beta_eff", "lr_loss_band"}
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert {r["bn"] for r in rows} == {"on", "off"} and any(r["probe"] == "landscape" for r in rows)
    (pair_dir(tmp_path, "on", 0.1) / "summary.json").unlink()  # as if killed before the end
    again = run_landscape(tiny_sweep(), tmp_path, data=data)
    assert again.ran == [("on", 0.1)] and len(again.skipped) == 3
    assert again.summary["top1"] == summary["top1"]  # resumed from its last checkpoint, same result
    with pytest.raises(ConfigError, match="other settings"):
        run_landscape(tiny_sweep(epochs=2), tmp_path, data=data)


def test_cli_run_and_plot(tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "sweep.yaml"
    config.write_text("lrs: [0.05, 0.1]\nwidth: 0.0625\neta_count: 3\nepochs: 5\n")
    code = main(["landscape", "run", "--config", str(config), "--model", "vgg-a", "--bn", "both",
                 "--data", "mnist-5k", "--epochs", "1", "--batch-size", "32", "--every", "2",
                 "--train-subset", "128", "--test-subset", "64",
                 "--hessian-every", "2", "--hessian-iters", "2", "--no-progress", "--out", str(run)])
    assert code == 0 and (run / "summary.json").is_file()
    summary = read_json(run / "summary.json")
    assert summary["settings"]["lrs"] == [0.05, 0.1] and summary["settings"]["width"] == 0.0625
    assert summary["settings"]["epochs"] == 1  # the explicit flag beats the config file
    assert summary["band_medians"]["on"]["hess_top"] is not None
    figs = tmp_path / "figs"
    assert main(["landscape", "plot", str(run), "--out", str(figs), "--log"]) == 0
    names = {p.name for p in figs.glob("*.png")}
    assert names == {"curves.png", "loss_band.png", "gpred_band.png", "beta.png", "hessian.png"}
    assert all(p.stat().st_size > 10_000 for p in figs.glob("*.png"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["landscape", "plot", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    assert "run 'nnlab landscape run" in capsys.readouterr().err
    assert main(["landscape", "run", "--data", "mnist-5k", "--eta-range", "0.5", "--out", str(tmp_path)]) == 2
    assert "--eta-range takes LOW,HIGH" in capsys.readouterr().err


def test_a_sweep_that_cannot_load_its_data_records_no_settings(tmp_path, capsys):
    """A first run with a wrong --data-dir must not write sweep.yaml: the corrected command, even
    with other learning rates, then starts the sweep instead of being refused as another sweep's."""
    base = ["landscape", "run", "--data", "cifar10", "--bn", "off", "--out", str(tmp_path / "sweep")]
    assert main([*base, "--data-dir", str(tmp_path / "nosuch"), "--lrs", "0.1"]) == 2
    assert "nosuch does not exist" in capsys.readouterr().err
    assert not (tmp_path / "sweep" / "sweep.yaml").exists()
    assert main(["landscape", "run", "--data", "mnist-5k", "--bn", "off", "--lrs", "0.05", "--epochs", "1",
                 "--max-steps", "2", "--train-subset", "64", "--test-subset", "32", "--every", "1", "--eta-count",
                 "2", "--no-progress", "--out", str(tmp_path / "sweep")]) == 0
    assert (tmp_path / "sweep" / "sweep.yaml").is_file()


def test_diverged_pair_is_recorded_and_the_sweep_goes_on(tmp_path):
    result = run_landscape(tiny_sweep(bn="off", lrs=[0.05, 1e4]), tmp_path, data=synthetic())
    runs = {r["lr"]: r for r in result.summary["runs"]}
    assert runs[1e4]["diverged"] and runs[1e4]["test_top1"] is None
    assert not runs[0.05]["diverged"] and runs[0.05]["test_top1"] is not None
    assert run_landscape(tiny_sweep(bn="off", lrs=[0.05, 1e4]), tmp_path, data=synthetic()).ran == []


@pytest.mark.slow
def test_sweep_on_real_cifar10(shared_data, tmp_path):
    """The real-data path: vgg-a / vgg-a-bn on 512 CIFAR-10 images, one epoch (~10 s once decoded)."""
    cfg = LandscapeConfig(data="cifar10", data_dir=str(shared_data / "cifar10"), lrs=[0.1], epochs=1,
                      every=2, width=0.125, train_subset=512, test_subset=256, progress=False)
    summary = run_landscape(cfg, tmp_path).summary
    assert summary["complete"] and all(r["test_top1"] is not None for r in summary["runs"])
    assert all(summary["band_medians"][bn]["eta_loss_band"] > 0 for bn in ("on", "off"))


def test_parallel_jobs_and_max_steps_give_the_sequential_result(tmp_path):
    """Issue 14: --jobs 2 trains pairs in two processes (1 thread each) to the numbers of a
    sequential 1-thread sweep; --max-steps stops the pairs unfinished and a rerun completes them.
    The parallel part is the cut one (its steps and probes are compared through the rerun, which
    runs in this process: one round of worker start-ups instead of two)."""
    data = synthetic()
    seq = run_landscape(tiny_sweep(bn="on", threads=1), tmp_path / "seq", data=data)
    cut = run_landscape(tiny_sweep(bn="on", jobs=2, max_steps=2), tmp_path / "par", data=data)
    assert not cut.summary["complete"] and not any(r["finished"] for r in cut.summary["runs"])
    par = run_landscape(tiny_sweep(bn="on", threads=1), tmp_path / "par", data=data)
    assert par.ran == [("on", 0.05), ("on", 0.1)] and par.summary["complete"]
    assert par.summary["top1"] == seq.summary["top1"]
    for lr in (0.05, 0.1):
        a = [r for r in read_jsonl(pair_dir(tmp_path / "seq", "on", lr) / "metrics.jsonl") if "probe" in r]
        b = [r for r in read_jsonl(pair_dir(tmp_path / "par", "on", lr) / "metrics.jsonl") if "probe" in r]
        assert a == b
        assert read_json(pair_dir(tmp_path / "par", "on", lr) / "summary.json")["threads"] == 1
