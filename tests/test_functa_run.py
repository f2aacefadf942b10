"""Functa runs end to end on the embedded digits: train/resume/NaN, functasets, reconstruct, classify."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from nnlab.cli import main
from nnlab.engine.checkpoint import load_checkpoint
from nnlab.errors import ConfigError, DivergenceError
from nnlab.functa.functaset import fit_batch, fit_functaset, fit_images, load_functaset
from nnlab.functa.presets import get_preset
from nnlab.functa import trainer
from nnlab.functa.trainer import CollapseGuard, build_state, meta_step
from nnlab.functa.model import FunctaConfig, LatentModulatedSiren


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("functa") / "run"
    assert main(["functa", "train", "--preset", "tiny", "--data", "mnist-5k", "--steps", "4", "--out", str(out)]) == 0
    return out


def test_train_writes_summary_and_metrics(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["test_images"] == 1000 and summary["steps"] == 4
    assert 5 < summary["test_psnr"] < 60
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert any("train_psnr" in r for r in lines) and any("val_psnr" in r for r in lines)


def test_resume_matches_uninterrupted(tmp_path, trained):
    out = tmp_path / "run"
    args = ["functa", "train", "--preset", "tiny", "--data", "mnist-5k", "--out", str(out)]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "4", "--resume"]) == 0
    a = load_checkpoint(out / "checkpoint").tensors
    b = load_checkpoint(trained / "checkpoint").tensors
    assert load_checkpoint(out / "checkpoint").step == 4
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_nan_raises_divergence_error():
    state = build_state(get_preset("tiny"), torch.device("cpu"))
    with torch.no_grad():
        state.model.out.bias.fill_(float("nan"))
    with pytest.raises(DivergenceError, match="outer-lr"):
        meta_step(state, torch.rand(2, 1, 8, 8), get_preset("tiny").train)


def test_collapse_guard_rolls_back_then_gives_up():
    cfg = get_preset("tiny").train
    state = build_state(get_preset("tiny"), torch.device("cpu"))
    trainer._set_lr(state, cfg)
    meta_step(state, torch.rand(4, 1, 8, 8), cfg)                # Adam moments exist from here
    guard, good = CollapseGuard(cfg), state.model.out.weight.clone()
    moment = state.optimizer.state[state.model.out.weight]["exp_avg"].clone()
    assert guard.check(state, 20.0) is None                     # first value: the best so far
    with torch.no_grad():
        state.model.out.weight.zero_()
    state.step = 9
    assert guard.check(state, 20.0 - cfg.collapse_db + 0.5) is None     # a dip, not a collapse
    for k in range(1, cfg.max_rollbacks + 1):                   # each rollback halves the lr again
        back = guard.check(state, 3.0)
        assert back is not None and back.step == 1 and state.step == 1
        assert torch.equal(state.model.out.weight, good)
        assert torch.equal(state.optimizer.state[state.model.out.weight]["exp_avg"], moment)
        assert state.optimizer.param_groups[0]["base_lr"] == pytest.approx(cfg.outer_lr / 2 ** k)
        meta_step(state, torch.rand(4, 1, 8, 8), cfg)            # moves weights and moments in place
    with pytest.raises(DivergenceError, match="lower --outer-lr"):
        guard.check(state, 3.0)


def test_hidden_lr_mult_moves_the_hidden_weights_at_their_own_rate():
    """Adam's first step moves every weight by about its group's lr (sign of the gradient), so the
    hidden sine layers' weights move hidden_lr_mult times less than the other weights."""
    preset = get_preset("tiny", hidden_lr_mult=0.25, grad_clip=0.0)
    assert len(build_state(get_preset("tiny"), torch.device("cpu")).optimizer.param_groups) == 2  # default: as before
    state = build_state(preset, torch.device("cpu"))
    model, lr = state.model, preset.train.outer_lr
    owned = [id(p) for g in state.optimizer.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())       # every parameter once
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    meta_step(state, torch.rand(4, 1, 8, 8), preset.train)
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    for n, d in moved.items():
        want = lr * 0.25 if n.startswith("hidden.") and n.endswith(".weight") else lr
        if n != "meta_lr":
            assert d == pytest.approx(want, rel=1e-3), n


def test_collapsed_run_rolls_back_and_finishes(tmp_path, monkeypatch):
    real, vals = trainer.evaluate_psnr, iter([20.0, 21.0, 4.0, 21.5, 22.0, 22.5, 23.0])

    def fake(model, images, *args, **kwargs):  # validation (16 held-out images) collapses once
        return {"psnr": next(vals), "psnr_std": 0.0, "mse": 0.01} if len(images) == 16 \
            else real(model, images, *args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate_psnr", fake)
    out = tmp_path / "run"
    assert main(["functa", "train", "--preset", "tiny", "--data", "mnist-5k", "--steps", "16", "--out", str(out)]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    back = [r for r in records if "rollback_from" in r]
    assert len(back) == 1 and back[0]["rollback_from"] == 12 and back[0]["step"] == 8
    assert back[0]["lr_factor"] == 0.5 and back[0]["best_val_psnr"] == 21.0
    vals_seen = [r["step"] for r in records if "val_psnr" in r]
    assert vals_seen == [4, 8, 12, 16]                          # the collapsed record was dropped
    assert load_checkpoint(out / "checkpoint").step == 16
    assert sorted(p.name for p in (out / "checkpoint").glob("model-*")) == ["model-00000016.safetensors"]


def test_functaset_chunks_shards_and_resume(tmp_path):
    model = LatentModulatedSiren(FunctaConfig(width=16, depth=3, latent_dim=8)).eval()
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(10)
    whole = fit_functaset(model, images, labels, tmp_path / "whole.safetensors", chunk_size=3)
    assert fit_functaset(model, images, labels, tmp_path / "s.safetensors", chunk_size=3, shard=(0, 2)) is None
    assert len(list((tmp_path / "s.safetensors.parts").glob("chunk-*"))) == 2
    other = LatentModulatedSiren(FunctaConfig(width=16, depth=3, latent_dim=8)).eval()  # other weights
    for model_, size, fragment in ((other, 3, "model_hash: "), (model, 4, "chunk_size: 3 -> 4")):
        with pytest.raises(ConfigError, match=fragment):  # a killed fit's chunks are never mixed into another
            fit_functaset(model_, images, labels, tmp_path / "s.safetensors", chunk_size=size)
    done = fit_functaset(model, images, labels, tmp_path / "s.safetensors", chunk_size=3, shard=(1, 2))
    assert not (tmp_path / "s.safetensors.parts").exists()
    a, b = load_functaset(whole), load_functaset(done)
    assert torch.allclose(a.latents, b.latents) and torch.equal(a.labels, labels)
    assert a.latents.shape == (10, 8) and a.inner_mse.shape == (10, 3)
    assert json.loads(a.metadata["model_config"])["latent_dim"] == 8
    direct = fit_images(model, images, 3, batch_size=4, progress=False)
    assert torch.allclose(direct.latents, a.latents, atol=1e-6)
    assert torch.allclose(direct.psnr, a.psnr, atol=1e-4)


def test_functaset_throughput_sums_every_chunks_own_time_across_shards(tmp_path, monkeypatch):
    """fit_seconds is the sum of each chunk's fitting time, whichever call fitted it: a fake clock that
    advances 1 s per reading makes every chunk take exactly 1 s, so 4 chunks over two shard calls give
    4 s (counting only the last call, or the wall time between calls, would not)."""
    import safetensors.torch

    from nnlab.functa import functaset

    ticks = iter(range(1000))
    monkeypatch.setattr(functaset, "_clock", lambda: float(next(ticks)))
    model = LatentModulatedSiren(FunctaConfig(width=16, depth=3, latent_dim=8)).eval()
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    out = tmp_path / "s.safetensors"
    assert fit_functaset(model, images, torch.arange(10), out, chunk_size=3, shard=(0, 2)) is None
    fs = load_functaset(fit_functaset(model, images, torch.arange(10), out, chunk_size=3, shard=(1, 2)))
    assert float(fs.metadata["fit_seconds"]) == 4.0 and fs.images_per_s == 2.5
    assert set(safetensors.torch.load_file(out)) == {"latents", "labels", "psnr", "inner_mse", "mse"}  # no chunk times


def test_cli_fit_reconstruct_classify(tmp_path, trained, capsys):
    fs = tmp_path / "test.safetensors"
    assert main(["functa", "fit", str(trained), "--data", "mnist-5k", "--split", "test", "--out", str(fs)]) == 0
    f = load_functaset(fs)
    assert f"1000 images, mean PSNR {f.psnr.mean():.2f} dB" in capsys.readouterr().err
    assert f.images_per_s == pytest.approx(1000 / float(f.metadata["fit_seconds"]), rel=1e-3)
    summary = json.loads((trained / "summary.json").read_text())
    assert f.latents.shape == (1000, 16)
    assert abs(f.psnr.mean().item() - summary["test_psnr"]) < 1e-3
    assert main(["functa", "reconstruct", str(trained), "--data", "mnist-5k", "--count", "3",
                 "--size", "28,56", "--out", str(tmp_path / "rec")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "rec" / "reconstruction-56.png").size == (3 * 58 + 2, 2 * 56 + 6)
    assert main(["functa", "classify", str(fs), str(fs), "--hidden", "64", "--epochs", "15",
                 "--out", str(tmp_path / "cls")]) == 0
    result = json.loads((tmp_path / "cls" / "summary.json").read_text())
    assert 0.3 < result["test_top1"] <= 1.0
    assert main(["functa", "plot", "--functaset", str(fs), "--classify-run", str(tmp_path / "cls"),
                 "--sweep", str(trained), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "psnr-hist.png").is_file() and (tmp_path / "fig" / "latent-sweep.png").is_file()


def test_classifier_killed_after_an_epoch_resumes_bit_identical(tmp_path, trained, monkeypatch):
    """A classify run killed right after epoch 2's checkpoint, then resumed, ends with the weights,
    metrics and summary of an uninterrupted run (model, AdamW, one-cycle schedule, batch-order
    generator and dropout RNG all restored); rerunning without --resume, or with other settings, is refused."""
    from safetensors.torch import load_file

    from nnlab.errors import CheckpointError, ConfigError
    from nnlab.functa import classify

    fs = tmp_path / "fs.safetensors"
    assert main(["functa", "fit", str(trained), "--data", "mnist-5k", "--split", "test", "--out", str(fs)]) == 0
    cfg = classify.ClassifyConfig(hidden=[32], epochs=4, batch_size=128, dropout=0.3, latent_noise=0.1)
    full = classify.train_classifier(fs, fs, tmp_path / "full", cfg, progress=False)
    real_save = classify._save

    def killed(run, fit):
        real_save(run, fit)
        if fit.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(classify, "_save", killed)
    with pytest.raises(KeyboardInterrupt):
        classify.train_classifier(fs, fs, tmp_path / "cut", cfg, progress=False)
    monkeypatch.setattr(classify, "_save", real_save)
    with pytest.raises(CheckpointError, match="pass --resume"):
        classify.train_classifier(fs, fs, tmp_path / "cut", cfg, progress=False)
    with pytest.raises(ConfigError, match="epochs: 4 -> 5"):
        classify.train_classifier(fs, fs, tmp_path / "cut", replace(cfg, epochs=5), progress=False, resume=True)
    resumed = classify.train_classifier(fs, fs, tmp_path / "cut", cfg, progress=False, resume=True)
    assert resumed == full
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    a, b = load_file(tmp_path / "cut" / "model.safetensors"), load_file(tmp_path / "full" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["normalizer.mean"].shape == (16,)


def test_classifier_refuses_splits_fitted_by_different_models(tmp_path, trained, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    fs = tmp_path / "fs.safetensors"
    assert main(["functa", "fit", str(trained), "--data", "mnist-5k", "--split", "test", "--out", str(fs)]) == 0
    with safe_open(fs, "pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(fs), tmp_path / "other.safetensors", metadata={**meta, "model_hash": "0" * 16})
    capsys.readouterr()
    assert main(["functa", "classify", str(fs), str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "c")]) == 2
    assert "fitted by different models" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_classifier_nan_loss_is_a_one_line_divergence_error(tmp_path, trained):
    from nnlab.functa import classify

    fs = tmp_path / "fs.safetensors"
    assert main(["functa", "fit", str(trained), "--data", "mnist-5k", "--split", "test", "--out", str(fs)]) == 0
    with pytest.raises(DivergenceError, match="diverged in epoch 1 .*lower --lr"):
        classify.train_classifier(fs, fs, tmp_path / "c", classify.ClassifyConfig(hidden=[16], epochs=1, lr=1e12),
                                  progress=False)


def test_plot_compare_tabulates_each_run_and_draws_its_validation_curve(tmp_path, trained, monkeypatch):
    """--compare: one row per run, in the order given, with that run's own summary figures; the
    figure holds one curve per run, through the run's logged validation PSNRs."""
    import csv
    import shutil

    from nnlab.functa import plots

    other = tmp_path / "other"
    shutil.copytree(trained, other)
    summary = json.loads((other / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps({**summary, "test_psnr": 12.5, "steps": 99}))
    drawn, real_save = [], plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: (drawn.append(fig), real_save(fig, path))[1])
    plots.plot_compare([other, trained], tmp_path / "fig")
    rows = list(csv.DictReader(open(tmp_path / "fig" / "compare.csv")))
    assert [r["run"] for r in rows] == ["other", "run"]
    assert float(rows[0]["test_psnr"]) == 12.5 and rows[0]["steps"] == "99"
    assert abs(float(rows[1]["test_psnr"]) - summary["test_psnr"]) < 1e-9
    val = [r["val_psnr"] for r in map(json.loads, (trained / "metrics.jsonl").read_text().splitlines()) if "val_psnr" in r]
    lines = drawn[0].axes[0].get_lines()
    assert len(lines) == 2 and all(list(line.get_ydata()) == val for line in lines)
    assert "12.50 dB" in lines[0].get_label()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["functa", "train", "--preset", "tiny", "--data", "cifar10", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "r")]) == 2
    assert main(["functa", "fit", str(tmp_path / "nope"), "--data", "mnist-5k", "--out", str(tmp_path / "x")]) == 2
    assert main(["functa", "classify", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "functa fit" in err or "does not exist" in err


def test_chunked_threaded_meta_step_equals_one_batch():
    from dataclasses import replace

    from nnlab.functa.parallel import chunk_runner

    preset = get_preset("tiny")
    x = torch.rand(6, 1, 8, 8)
    grads = []
    for chunk, workers in ((6, 1), (2, 2)):
        state = build_state(preset, torch.device("cpu"))
        with chunk_runner(workers) as runner:
            res = meta_step(state, x, replace(preset.train, chunk=chunk), runner)
        grads.append([p.grad.clone() for p in state.model.parameters()])
        assert res.psnr.shape == (6,) and res.inner_mse.shape == (6, 3)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_small_batch_is_split_over_the_workers(monkeypatch):
    """A batch of 8 at chunk 8 on 2 workers runs as two chunks of 4 (both cores busy, as for
    celeba64-cpu), and its meta-gradient is still the one-batch one."""
    from dataclasses import replace

    from nnlab.functa import meta
    from nnlab.functa.parallel import chunk_runner
    from nnlab.functa.trainer import chunk_size

    assert [chunk_size(b, 8, w) for b, w in ((8, 2), (8, 1), (32, 2), (7, 2), (1, 4), (16, 3))] == [4, 8, 8, 4, 1, 6]
    preset = get_preset("tiny")
    x, seen, grads = torch.rand(8, 1, 8, 8), [], []
    real = meta.meta_loss
    monkeypatch.setattr(meta, "meta_loss", lambda model, xc, *a, **k: seen.append(len(xc)) or real(model, xc, *a, **k))
    for workers in (1, 2):
        state = build_state(preset, torch.device("cpu"))
        with chunk_runner(workers) as runner:
            meta_step(state, x, replace(preset.train, chunk=8), runner)
        grads.append([p.grad.clone() for p in state.model.parameters()])
    assert seen == [8, 4, 4]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_threaded_fit_equals_sequential():
    model = LatentModulatedSiren(FunctaConfig(width=16, depth=3, latent_dim=8)).eval()
    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    a = fit_images(model, images, batch_size=16, progress=False, workers=1)
    b = fit_images(model, images, batch_size=16, progress=False, workers=2)
    assert torch.allclose(a.latents, b.latents, atol=1e-6) and torch.allclose(a.psnr, b.psnr, atol=1e-5)


def test_cosine_schedule_follows_time_limit_or_steps():
    from dataclasses import replace

    from nnlab.errors import ConfigError
    from nnlab.functa.trainer import schedule_factor

    cfg = replace(get_preset("tiny").train, schedule="cosine", time_limit_min=10.0)
    assert schedule_factor(cfg, 0, 0.0) == 1.0
    assert abs(schedule_factor(cfg, 5, 300.0) - 0.5) < 1e-9
    assert schedule_factor(cfg, 9, 601.0) == 0.0
    steps_cfg = replace(cfg, time_limit_min=0.0, steps=100)
    assert abs(schedule_factor(steps_cfg, 50, 1e9) - 0.5) < 1e-9
    assert schedule_factor(replace(cfg, schedule="constant"), 5, 300.0) == 1.0
    with pytest.raises(ConfigError, match="schedule"):
        schedule_factor(replace(cfg, schedule="linear"), 0, 0.0)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile needs a C++ compiler")
def test_compiled_fitting_matches_eager_including_padded_last_chunk():
    """compile=True (fused loops, a short last chunk padded to the chunk size) gives the eager latents."""
    torch.manual_seed(3)
    model = LatentModulatedSiren(FunctaConfig(width=16, depth=3, latent_dim=8, meta_sgd=True))
    images = torch.rand(21, 1, 8, 8)  # 16 + a short chunk of 5
    eager = fit_batch(model, images, 3, chunk=16)
    fast = fit_batch(model, images, 3, chunk=16, compile=True)
    assert fast.latents.shape == (21, 8)
    assert torch.allclose(fast.latents, eager.latents, rtol=1e-4, atol=1e-5)
    assert torch.allclose(fast.psnr, eager.psnr, rtol=1e-4, atol=1e-4)


def test_functa_train_takes_architecture_flags_over_the_preset(tmp_path):
    """COIN++'s MNIST configuration from the command line: 5 layers of 64, latent 64, plain SGD inner loop."""
    import yaml

    from nnlab.cli import main

    out = tmp_path / "coin"
    assert main(["functa", "train", "--preset", "mnist-cpu", "--width", "64", "--depth", "5", "--latent-dim", "64",
                 "--no-meta-sgd", "--inner-lr", "1e-2", "--batch-size", "16", "--outer-lr", "1e-5",
                 "--hidden-lr-mult", "0.5", "--data", "mnist-5k", "--steps", "2", "--val-every", "2",
                 "--out", str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    model = config["model"]
    assert config["train"]["hidden_lr_mult"] == 0.5
    assert (model["width"], model["depth"], model["latent_dim"], model["meta_sgd"], model["inner_lr"]) == \
        (64, 5, 64, False, 0.01)
    assert (out / "model.safetensors").is_file()  # the final weights, for publishing without checkpoints


def test_functa_resume_refuses_a_changed_configuration(tmp_path, capsys):
    """Resume must not silently switch data set, inner steps or outer lr (issue 16); more steps is fine."""
    from nnlab.cli import main

    out = str(tmp_path / "run")
    base = ["functa", "train", "--preset", "tiny", "--data", "mnist-5k", "--steps", "4", "--out", out]
    assert main(base) == 0
    for extra, fragment in ((["--inner-steps", "5"], "inner_steps 3 -> 5"), (["--outer-lr", "0.01"], "outer_lr"),
                            (["--width", "32"], "width 16 -> 32")):
        capsys.readouterr()
        assert main([*base, "--resume", *extra]) == 2
        assert fragment in capsys.readouterr().err
    assert main([*base[:6], "--steps", "6", *base[8:], "--resume"]) == 0


def test_a_compile_failure_falls_back_to_the_eager_step_with_one_warning(monkeypatch):
    """--compile where torch.compile cannot build (no C++ compiler, ...): the first step reruns
    eagerly, with one warning, and gives exactly the eager step; later steps stay eager."""
    import dataclasses

    from nnlab.functa import meta

    calls = []

    class Broken:
        def __init__(self, *a):
            pass

        def __call__(self, model, images):  # the first chunk works (its gradient lands), the second fails
            calls.append(len(images))
            if len(calls) == 1:
                return meta.meta_loss(model, images, 3)
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
    monkeypatch.setattr(meta, "CompiledMetaLoss", Broken)
    preset = get_preset("tiny")
    cfg = dataclasses.replace(preset.train, compile=True, chunk=2)
    x = torch.rand(4, 1, 8, 8)
    eager, compiled = build_state(preset, torch.device("cpu")), build_state(preset, torch.device("cpu"))
    meta_step(eager, x, dataclasses.replace(cfg, compile=False))
    with pytest.warns(RuntimeWarning, match="--compile unavailable.*InvalidCxxCompiler.*runs eagerly"):
        meta_step(compiled, x, cfg)
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        assert torch.equal(a, b)  # the failed attempt left no gradient behind
    meta_step(compiled, x, cfg)  # no second attempt, no second warning
    assert calls == [2, 2] and compiled.compiled is None
    with pytest.raises(ConfigError, match="--compile must be off with --checkpointing"):
        dataclasses.replace(cfg, use_checkpoint=True).validate()
