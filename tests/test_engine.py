"""Training engine: evaluation, schedules, optimisers, run folders, resume, divergence, callbacks."""
from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from torch import nn

from nnlab.data import load_dataset
from nnlab.data.base import BatchLoader, DatasetSplits, ImageSet
from nnlab.engine.checkpoint import load_checkpoint
from nnlab.engine.metrics import read_jsonl
from nnlab.engine.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler
from nnlab.engine.train import (Callback, TrainConfig, evaluate, topk_correct, topk_correct_reference,
                                train)
from nnlab.errors import CheckpointError, ConfigError, DivergenceError

pytestmark = pytest.mark.usefixtures("one_thread")

TIME_KEYS = {"epoch_time_s", "images_per_s"}


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return load_dataset("mnist-5k")


def tiny(**changes) -> TrainConfig:
    base = dict(model="lenet5", data="mnist-5k", epochs=2, batch_size=32, train_limit=192, test_limit=100,
                lr=0.05, log_every=2, progress=False, device="cpu")
    return TrainConfig(**{**base, **changes})


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("classes", [3, 10])
def test_topk_matches_reference(classes):
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(50, classes, generator=g), torch.randint(0, classes, (50,), generator=g)
    assert topk_correct(logits, y, (1, 2, 5)) == topk_correct_reference(logits, y, (1, 2, 5))


def test_evaluate_fractions_and_top5_clamped_below_five_classes():
    images = torch.randint(0, 256, (30, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(30) % 3
    data = ImageSet(images, labels, ["a", "b", "c"])
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    res = evaluate(model, BatchLoader(data, 7), "cpu")
    assert res.count == 30 and res.top5 == 1.0 and 0 <= res.top1 <= 1 and math.isfinite(res.loss)
    with torch.no_grad():
        x = images.float() / 255
        expected = (model(x).argmax(1) == labels).float().mean().item()
        loss = nn.functional.cross_entropy(model(x), labels).item()
    assert res.top1 == pytest.approx(expected) and res.loss == pytest.approx(loss, rel=1e-5)


# --------------------------------------------------------------------------- optimisers, schedules


def test_cosine_schedule_with_warmup_per_step():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "cosine", total_steps=12, warmup_steps=2)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[7] == pytest.approx(0.5)  # half-way through the decay
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.05


def test_step_and_constant_schedules():
    f = SCHEDULES.get("step")(total_steps=100, milestones=[0.5, 0.75], gamma=0.1)
    assert [f(0), f(49), f(50), f(80)] == pytest.approx([1, 1, 0.1, 0.01])
    assert SCHEDULES.get("constant")(total_steps=10, warmup_steps=4)(2) == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="unknown option"):
        SCHEDULES.get("cosine")(total_steps=10, bogus=1)


def test_optimizer_registry_and_errors(monkeypatch):
    model = nn.Linear(3, 2)
    for name in ("sgd", "adam", "adamw"):
        opt = build_optimizer(name, model, lr=0.1, momentum=0.9, weight_decay=1e-4)
        assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["lr"] == 0.1
    assert build_optimizer("sgd", model, lr=0.1, momentum=0.9, weight_decay=0, nesterov=True) \
        .param_groups[0]["nesterov"] is True
    with pytest.raises(ConfigError, match="bogus"):
        build_optimizer("sgd", model, lr=0.1, momentum=0.9, weight_decay=0, bogus=1)
    with pytest.raises(ConfigError, match="choose one of"):
        OPTIMIZERS.get("lion")
    monkeypatch.setitem(sys.modules, "nnlab.lbi", None)  # as if nnlab.lbi did not exist
    with pytest.raises(ConfigError, match="nnlab.lbi"):
        build_optimizer("slbi", model, lr=0.1, momentum=0.9, weight_decay=0)


def test_bad_config_values_are_config_errors():
    for change, word in [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"optimizer": "x"}, "optimizer"),
                         ({"schedule": "x"}, "schedule"), ({"device": "tpu"}, "device"),
                         ({"model_options": [1]}, "model_options"), ({"crop_padding": -1}, "crop_padding")]:
        with pytest.raises(ConfigError, match=word):
            tiny(**change).validate()


# --------------------------------------------------------------------------- train


class Recorder(Callback):
    """Counts hook calls, adds a key to epoch records, keeps state; can simulate a kill."""

    def __init__(self, kill_at: int | None = None):
        self.kill_at, self.steps, self.events = kill_at, 0, []

    def on_train_start(self, ctx):
        self.events.append("start")

    def on_after_backward(self, ctx):
        assert all(p.grad is not None for p in ctx.model.parameters())
        self.events.append("backward")

    def on_step_end(self, ctx):
        self.steps += 1
        if ctx.step == self.kill_at:
            raise KeyboardInterrupt("simulated kill")

    def on_epoch_end(self, ctx, record):
        record["recorder_steps"] = self.steps

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_train_writes_run_folder(tmp_path, digits):
    rec = Recorder()
    result = train(tiny(), tmp_path / "run", callbacks=[rec], data=digits)
    s = result.summary
    assert 0 <= s["test_top1"] <= 1 and 0 <= s["test_top5"] <= 1 and s["test_top5"] >= s["test_top1"]
    assert s["epochs"] == 2 and s["steps"] == 12 and s["params"] == 61706
    assert result.run.read_summary()["test_top1"] == s["test_top1"]
    assert result.run.load_config()["lr"] == 0.05
    records = read_jsonl(result.run.metrics_path)
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8, 10, 12]
    epochs = [r for r in records if "test_top1" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] and epochs[-1]["recorder_steps"] == 12
    assert rec.events[0] == "start" and rec.events.count("backward") == 12
    assert load_checkpoint(result.run.checkpoint_dir).step == 12
    assert result.history == epochs


def test_same_seed_same_weights_and_different_seed_differs(tmp_path, digits):
    a = train(tiny(epochs=1), tmp_path / "a", data=digits).model
    b = train(tiny(epochs=1), tmp_path / "b", data=digits).model
    c = train(tiny(epochs=1, seed=1), tmp_path / "c", data=digits).model
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_resume_after_kill_is_bit_identical(tmp_path, digits):
    cfg = tiny(epochs=3, checkpoint_every=4, augment=True, warmup_steps=3)
    ref = train(cfg, tmp_path / "ref", callbacks=[Recorder()], data=digits)
    with pytest.raises(KeyboardInterrupt):  # killed mid-epoch 2 (step 10 of 18), last checkpoint step 8
        train(cfg, tmp_path / "run", callbacks=[Recorder(kill_at=10)], data=digits)
    assert load_checkpoint(tmp_path / "run" / "checkpoint").step == 8
    rec = Recorder()
    res = train(cfg, tmp_path / "run", resume=True, callbacks=[rec], data=digits)
    assert rec.steps == 18  # callback state came back from the checkpoint
    ref_w, res_w = weights(ref.model), weights(res.model)
    assert ref_w.keys() == res_w.keys() and all(torch.equal(ref_w[k], res_w[k]) for k in ref_w)

    def strip(records):
        return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]

    assert strip(read_jsonl(res.run.metrics_path)) == strip(read_jsonl(ref.run.metrics_path))
    for key in ("test_top1", "test_top5", "test_loss", "train_loss", "steps", "epochs"):
        assert res.summary[key] == ref.summary[key]


class Slow(Callback):
    """Each step takes at least ``seconds`` longer; can simulate a kill."""

    def __init__(self, seconds: float, kill_at: int | None = None):
        self.seconds, self.kill_at = seconds, kill_at

    def on_step_end(self, ctx):
        import time
        time.sleep(self.seconds)
        if ctx.step == self.kill_at:
            raise KeyboardInterrupt("simulated kill")


def test_resume_keeps_the_training_time_spent_before_the_kill(tmp_path, digits):
    """One epoch of 6 steps, each >= 0.15 s; killed after step 5, checkpoint at step 4. The resumed run's
    train_time_s and epoch_time_s must count steps 1-4 of the first process as well as 5-6 of the second
    (>= 0.9 s); a mid-epoch checkpoint that forgot the epoch's time so far gives about 0.3 s."""
    cfg = tiny(epochs=1, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", callbacks=[Slow(0.15, kill_at=5)], data=digits)
    assert load_checkpoint(tmp_path / "run" / "checkpoint").step == 4
    res = train(cfg, tmp_path / "run", resume=True, callbacks=[Slow(0.15)], data=digits)
    assert res.summary["steps"] == 6 and res.summary["train_time_s"] >= 6 * 0.15
    epoch = [r for r in read_jsonl(res.run.metrics_path) if "epoch_time_s" in r]
    assert len(epoch) == 1 and epoch[0]["epoch_time_s"] >= 6 * 0.15
    assert epoch[0]["images_per_s"] <= 192 / (6 * 0.15)  # all 192 images over the whole epoch's time


class FirstStep(Callback):
    """Keeps the first step's unmixed batch, the weights before it and its loss (the weights scaled up
    first, so that the logits depend on the input more than at initialisation)."""

    def on_train_start(self, ctx):
        with torch.no_grad():
            for p in ctx.model.parameters():
                p.mul_(3)

    def on_step_start(self, ctx):
        if ctx.step == 0:
            self.x, self.y = ctx.x.clone(), ctx.y.clone()
            self.model = copy.deepcopy(ctx.model)

    def on_after_backward(self, ctx):
        if ctx.step == 0:
            self.loss = float(ctx.loss)


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0)])
def test_mixing_trains_on_the_soft_target_cross_entropy_of_the_mixed_batch(tmp_path, digits, mixup, cutmix):
    """The first step's loss is the label-smoothed cross-entropy, written out here, of the weights before
    the step on the batch mixed by the reference loop, against the mixed one-hot targets; so it fails if
    the trainer trained on the unmixed images, on the hard labels, or dropped the smoothing."""
    from nnlab.data.mix import draw_mix, mix_batch_reference
    from nnlab.engine.train import mix_generator

    rec = FirstStep()
    train(tiny(epochs=1, max_steps=1, label_smoothing=0.1, mixup_alpha=mixup, cutmix_alpha=cutmix),
          tmp_path / "r", callbacks=[rec], data=digits)
    draw = draw_mix(rec.x.shape[0], rec.x.shape[2], rec.x.shape[3], mixup, cutmix, mix_generator(0, 0, 0))
    ref = mix_batch_reference(rec.x, rec.y, 10, draw)
    assert not torch.equal(ref.x, rec.x)
    target = 0.9 * ref.target + 0.1 / 10
    with torch.no_grad():
        expected = -(target * torch.log_softmax(rec.model(ref.x), 1)).sum(1).mean().item()
        unmixed = nn.functional.cross_entropy(rec.model(rec.x), rec.y, label_smoothing=0.1).item()
    assert rec.loss == pytest.approx(expected, rel=1e-5) and abs(unmixed - expected) > 0.01


def test_resume_with_mixing_is_bit_identical(tmp_path, digits):
    cfg = tiny(epochs=2, checkpoint_every=4, mixup_alpha=0.8, cutmix_alpha=1.0)
    ref = train(cfg, tmp_path / "ref", data=digits)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", callbacks=[Recorder(kill_at=6)], data=digits)
    res = train(cfg, tmp_path / "run", resume=True, callbacks=[Recorder()], data=digits)
    for k, v in weights(ref.model).items():
        assert torch.equal(v, weights(res.model)[k]), k
    with pytest.raises(ConfigError, match="mixup_alpha must be >= 0"):
        train(tiny(mixup_alpha=float("nan")), tmp_path / "bad", data=digits)


def test_a_run_saved_before_a_config_key_existed_resumes(tmp_path, digits):
    """config.yaml of a run from before mixup_alpha / cutmix_alpha existed lacks them: the resume takes the
    missing keys as their defaults instead of refusing a 'different config'."""
    import yaml

    train(tiny(epochs=1, max_steps=2), tmp_path / "run", data=digits)
    path = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    del saved["mixup_alpha"], saved["cutmix_alpha"]
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    res = train(tiny(epochs=1), tmp_path / "run", resume=True, data=digits)
    assert res.summary["complete"] is True


def test_resume_guards(tmp_path, digits):
    train(tiny(epochs=1), tmp_path / "run", data=digits)
    with pytest.raises(CheckpointError, match="--resume.*new --out"):
        train(tiny(epochs=1), tmp_path / "run", data=digits)
    with pytest.raises(ConfigError, match=r"different config \(epochs: 1 -> 2\)"):  # lr alone may change
        train(tiny(epochs=2, lr=0.1), tmp_path / "run", resume=True, data=digits)
    done = train(tiny(epochs=1), tmp_path / "run", resume=True, data=digits)  # finished: nothing to do
    assert done.summary["steps"] == 6


class BlowUp(Callback):
    """Sets a huge learning rate from step ``at`` on."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, ctx):
        if ctx.step >= self.at:
            for group in ctx.optimizer.param_groups:
                group["lr"] = 1e6


def test_divergence_stops_with_clear_error_and_keeps_good_checkpoint(tmp_path, digits):
    with pytest.raises(DivergenceError, match=r"step \d+ .*lr .*--grad-clip"):
        train(tiny(lr=1e6, schedule="constant"), tmp_path / "a", data=digits)
    with pytest.raises(DivergenceError, match="last good checkpoint"):
        train(tiny(epochs=3, checkpoint_every=2), tmp_path / "b", callbacks=[BlowUp(4)], data=digits)
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint")
    assert 2 <= ckpt.step <= 6 and all(torch.isfinite(t).all() for t in ckpt.tensors.values())
    assert any(r.get("event") == "diverged" for r in read_jsonl(tmp_path / "b" / "metrics.jsonl"))


class Poison(Callback):
    """Makes one weight infinite after step ``at`` (a finite loss until the next forward)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, ctx):
        if ctx.step == self.at:
            with torch.no_grad():
                ctx.model.fc2.bias[0] = float("inf")


def test_non_finite_weights_are_never_checkpointed(tmp_path, digits):
    with pytest.raises(DivergenceError, match=r"non-finite \(fc2.bias\) by step 6"):
        train(tiny(epochs=2), tmp_path / "r", callbacks=[Poison(6)], data=digits)  # 6 = end of epoch 1
    assert not (tmp_path / "r" / "checkpoint" / "latest.json").exists()
    with pytest.raises(DivergenceError, match="by step 4"):  # caught by the step-4 checkpoint
        train(tiny(epochs=2, checkpoint_every=2), tmp_path / "s", callbacks=[Poison(4)], data=digits)
    assert load_checkpoint(tmp_path / "s" / "checkpoint").step == 2


def test_max_steps_eval_every_and_bf16_on_cpu_warns(tmp_path, digits, monkeypatch):
    from nnlab.engine import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: False)  # a CPU without AMX / AVX512-BF16
    was = torch.are_deterministic_algorithms_enabled()
    try:
        with pytest.warns(UserWarning, match="bf16"):
            res = train(tiny(epochs=3, max_steps=8, eval_every=2, bf16=True, deterministic=True),
                        tmp_path / "r", data=digits)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)
    # 6 steps per epoch: step 8 is a third into epoch 2, evaluated for the summary, out of the history
    assert res.summary["steps"] == 8 and res.summary["epochs"] == pytest.approx(8 / 6)
    assert [("test_top1" in r) for r in res.history] == [False] and 0 <= res.summary["test_top1"] <= 1
    assert res.summary["complete"] is False


class LRs(Callback):
    def __init__(self):
        self.lrs = []

    def on_after_backward(self, ctx):
        self.lrs.append(ctx.lr)


def test_max_steps_stops_without_changing_the_schedule_and_resume_continues(tmp_path, digits):
    """Issue 14: --max-steps N stops after N steps; the lr of every step is the full run's, and a
    resume without it ends bit-identical to an uninterrupted run (mid-epoch stop included)."""
    cfg = dict(schedule="cosine", epochs=2, checkpoint_every=0)
    full_lrs, part_lrs = LRs(), LRs()
    full = train(tiny(**cfg), tmp_path / "full", callbacks=[full_lrs], data=digits)
    part = train(tiny(**cfg, max_steps=4), tmp_path / "part", callbacks=[part_lrs], data=digits)
    assert part.summary["steps"] == 4 and part.summary["complete"] is False
    assert part_lrs.lrs == full_lrs.lrs[:4] and full_lrs.lrs[3] < full_lrs.lrs[0]  # cosine, not cut short
    rest = train(tiny(**cfg), tmp_path / "part", resume=True, callbacks=[LRs()], data=digits)
    assert rest.summary["complete"] is True and rest.summary["steps"] == full.summary["steps"]
    for k, v in weights(full.model).items():
        assert torch.equal(v, weights(rest.model)[k]), k
    losses = lambda run: [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_threads_are_applied_and_recorded(tmp_path, digits):
    before = torch.get_num_threads()
    try:
        res = train(tiny(epochs=1, max_steps=1, threads=1), tmp_path / "r", data=digits)
        assert torch.get_num_threads() == 1 and res.summary["threads"] == 1
        assert res.run.load_config()["threads"] == 1
        res = train(tiny(epochs=1, max_steps=1), tmp_path / "s", data=digits)  # unset: the count in use
        assert res.run.load_config()["threads"] == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


class FirstWeights(Callback):
    def __init__(self):
        self.first = None

    def on_step_start(self, ctx):
        if ctx.step == 0:
            self.first = weights(ctx.model)


def test_init_from_starts_from_another_runs_weights(tmp_path, digits):
    """init_from: the first step starts from the source run's final weights (its folder or its
    model.safetensors), not from a fresh initialisation; a source that does not fit is refused."""
    src = train(tiny(epochs=1), tmp_path / "src", data=digits)
    fresh = FirstWeights()
    train(tiny(epochs=1, max_steps=1), tmp_path / "fresh", callbacks=[fresh], data=digits)
    assert not torch.equal(fresh.first["conv1.weight"], weights(src.model)["conv1.weight"])
    for i, source in enumerate([tmp_path / "src", tmp_path / "src" / "model.safetensors"]):
        seen = FirstWeights()
        train(tiny(epochs=1, max_steps=1, init_from=str(source)), tmp_path / f"dst{i}", callbacks=[seen], data=digits)
        for k, v in weights(src.model).items():
            assert torch.equal(seen.first[k], v), k
    with pytest.raises(CheckpointError, match="do not fit this run's model"):
        train(tiny(model="mlp", init_from=str(tmp_path / "src")), tmp_path / "bad", data=digits)
    with pytest.raises(CheckpointError, match="neither a run folder nor a .safetensors"):
        train(tiny(init_from=str(tmp_path / "nowhere")), tmp_path / "bad2", data=digits)


def test_custom_model_and_three_classes(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (60, 1, 8, 8), dtype=torch.uint8, generator=g)
    split = ImageSet(imgs, torch.arange(60) % 3, ["a", "b", "c"])
    data = DatasetSplits("toy", split, split, (0.5,), (0.25,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    res = train(tiny(epochs=2, batch_size=16, train_limit=None, test_limit=None), tmp_path / "r",
                model=model, data=data)
    assert res.model is model and res.summary["test_top5"] == 1.0 and res.summary["params"] == 195


def test_a_non_finite_model_is_never_checkpointed(tmp_path):
    """The newest checkpoint on disk stays the last finite one (issue 16)."""
    from nnlab.engine.checkpoint import load_checkpoint, save_checkpoint
    from nnlab.errors import DivergenceError

    good = {"w": torch.ones(3)}
    save_checkpoint(tmp_path, 5, good, {"k": 1})
    with pytest.raises(DivergenceError, match=r"not finite at step 6 \(w\).*step 5\) is the last finite one"):
        save_checkpoint(tmp_path, 6, {"w": torch.tensor([1.0, float("nan"), 0.0])}, {"k": 2})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 5 and torch.equal(ckpt.tensors["w"], good["w"])
    assert not list(tmp_path.glob("*00000006*"))


def test_functa_run_at_a_huge_outer_lr_leaves_no_nan_checkpoint(tmp_path, capsys):
    from nnlab.cli import main

    out = tmp_path / "nan"
    assert main(["functa", "train", "--preset", "tiny", "--data", "mnist-5k", "--steps", "60", "--outer-lr", "1e6",
                 "--out", str(out)]) == 2
    assert "not finite" in capsys.readouterr().err
    for f in out.glob("checkpoint/model-*.safetensors"):
        from safetensors.torch import load_file
        assert all(torch.isfinite(v).all() for v in load_file(f).values())


def test_recheck_reproduces_a_run_and_catches_a_changed_one(tmp_path, digits):
    """Issue 14: rerunning a run's config.yaml for its first steps gives its logged losses; a
    published loss that the code no longer produces is reported as a difference."""
    import json

    from nnlab.engine.recheck import recheck

    train(tiny(epochs=2, threads=1), tmp_path / "pub", data=digits)  # mnist-5k: the rerun loads it too
    ok = recheck(tmp_path / "pub", tmp_path / "again", max_steps=5, progress=False)
    assert ok.ok and ok.steps == [2, 4] and ok.max_rel_diff == 0.0
    lines = (tmp_path / "pub" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    recs[1]["loss"] *= 1.001  # the step-4 record, as if the code had changed
    (tmp_path / "pub" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    bad = recheck(tmp_path / "pub", tmp_path / "third", max_steps=5, progress=False)
    assert not bad.ok and bad.max_rel_diff == pytest.approx(0.001 / 1.001, rel=1e-3)
    with pytest.raises(ConfigError, match="raise --max-steps"):
        recheck(tmp_path / "pub", tmp_path / "fourth", max_steps=1)


def test_a_run_folder_being_written_is_refused_to_a_second_writer(tmp_path, digits):
    """Issue 16: two processes training into one folder would interleave checkpoints and metrics."""
    from nnlab.engine.runs import RunDir
    from nnlab.landscape.sweep import run_landscape

    with RunDir(tmp_path / "r").lock():  # as another live process would hold it
        with pytest.raises(CheckpointError, match=r"being written by pid \d+.*choose another --out"):
            train(tiny(epochs=1, max_steps=1), tmp_path / "r", data=digits)
        from test_landscape_sweep import tiny_sweep
        with pytest.raises(CheckpointError, match="being written by"):
            run_landscape(tiny_sweep(), tmp_path / "r", data=digits)
    res = train(tiny(epochs=1, max_steps=1), tmp_path / "r", data=digits)  # released: fine now
    assert res.summary["steps"] == 1


def test_resume_after_a_divergence_with_a_lower_lr_finishes_and_is_recorded(tmp_path, digits):
    """Issue 16: the error names the command; the resume may change lr (and clip, schedule), each
    change recorded; the lr from the resume step on is the new schedule's; other changes refused."""
    import yaml

    run = tmp_path / "r"
    with pytest.raises(DivergenceError) as err:  # a checkpoint every step: the last finite one is kept
        train(tiny(epochs=2, lr=5e3, schedule="cosine", checkpoint_every=1), run, data=digits)
    msg = str(err.value)
    event = next(r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "diverged")
    assert f"at step {event['step']} " in msg or f"by step {event['step']} " in msg  # message and metrics agree
    assert f"nnlab train --config {run}/config.yaml --out {run} --resume --lr 2500" in msg
    run = tmp_path / "s"  # a run that diverges at step 8, after its epoch-1 checkpoint (6 steps per epoch)
    with pytest.raises(DivergenceError, match="the same command with --resume and a lower --lr"):
        train(tiny(epochs=2, lr=0.05, schedule="cosine"), run, callbacks=[BlowUp(7)], data=digits)
    start = load_checkpoint(run / "checkpoint").step
    res = train(tiny(epochs=2, lr=0.01, schedule="cosine"), run, resume=True, callbacks=[LRs()], data=digits)
    assert start == 6 and res.summary["complete"] and all(math.isfinite(v) for v in weights(res.model)["fc2.bias"])
    sched = build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01), "cosine", total_steps=12)
    expected = []
    for _ in range(12):
        expected.append(sched.get_last_lr()[0])
        sched.step()
    logged = {r["step"]: r["lr"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r and r["step"] > start}
    assert logged and all(lr == pytest.approx(expected[step - 1]) for step, lr in logged.items())  # step s used lr s-1
    change = next(r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "config_change")
    assert change["changes"] == {"lr": {"old": 0.05, "new": 0.01}} and change["step"] == start
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr"] == 0.01 and saved["config_changes"] == [{"step": start, "lr": {"old": 0.05, "new": 0.01}}]
    with pytest.raises(ConfigError, match=r"batch_size.*only lr, grad_clip, schedule"):
        train(tiny(epochs=3, lr=0.01, batch_size=16), run, resume=True, callbacks=[LRs()], data=digits)


def test_a_trained_run_is_rebuilt_from_its_folder_and_from_a_published_copy(tmp_path, digits):
    import shutil

    from nnlab.engine.trained import FINAL_WEIGHTS, load_trained_run

    result = train(tiny(epochs=1), tmp_path / "run", data=digits)
    trained = load_trained_run(tmp_path / "run")
    assert trained.config == tiny(epochs=1, threads=trained.config.threads)
    assert len(trained.data.test) == 100 and len(trained.data.train) == 192  # the run's own subsets
    assert len(load_trained_run(tmp_path / "run", subsets=False).data.test) == len(digits.test)
    x = trained.data.test.images[:4].float() / 255
    result.model.eval()
    expected = result.model(x)
    assert torch.equal(trained.model(x), expected) and not trained.model.training
    published = tmp_path / "published"
    shutil.copytree(tmp_path / "run", published, ignore=shutil.ignore_patterns("checkpoint", ".lock"))
    assert torch.equal(load_trained_run(published).model(x), expected)  # from model.safetensors alone
    (published / FINAL_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_trained_run(published)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_trained_run(tmp_path / "nosuch")
    cfg = result.run.load_config() | {"model": "mlp"}
    (tmp_path / "run" / "config.yaml").write_text(__import__("yaml").safe_dump(cfg))
    with pytest.raises(CheckpointError, match="do not fit model mlp"):
        load_trained_run(tmp_path / "run")
