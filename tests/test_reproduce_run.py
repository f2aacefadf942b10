"""``nnlab reproduce`` end to end on a tiny preset built from real study stages (LeNet-5 runs of the
DessiLBI study on a few hundred embedded digits): a run killed mid-stage and started again reuses
the finished stages and resumes the killed one; the report's images resolve; ``--only`` and a
failing stage show in the report and the exit status."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

import nnlab.reproduce.presets  # noqa: F401  (registers the presets and sections)
from nnlab.cli import main
from nnlab.engine.io import read_json
from nnlab.reproduce import study_lbi
from nnlab.reproduce.pipeline import PRESETS, SECTIONS, STUDIES, seed_numbers
from nnlab.reproduce.stages import Stage, StageResult

TESTS = Path(__file__).resolve().parent
TINY = dict(model="lenet5", data="mnist-5k", batch_size=32, augment=False, train_limit=128, test_limit=64)
EPOCHS = 4


def _logged(fn, ctx):
    """Run stage function ``fn``, first appending (stage, resume, checkpoint step found) to OUT/log.jsonl."""
    latest = ctx.dir / ctx.name / "checkpoint" / "latest.json"
    step = read_json(latest)["step"] if ctx.resume and latest.is_file() else 0
    with open(ctx.dir.parent.parent / "log.jsonl", "a") as f:
        f.write(json.dumps({"stage": ctx.name, "resume": ctx.resume, "step": step}) + "\n")
    return fn(ctx)


def tiny_stages() -> list[Stage]:
    sgd = Stage("lbi-sgd", "lbi", "LeNet-5, SGD, 1 epoch", partial(_logged, study_lbi._train),
                {**TINY, "epochs": 1, "opt": study_lbi.OPTIMIZERS["sgd"]})
    slbi = Stage("lbi-slbi", "lbi", f"LeNet-5, SGD+DessiLBI, {EPOCHS} epochs", partial(_logged, study_lbi._train),
                 {**TINY, "epochs": EPOCHS, "opt": study_lbi.OPTIMIZERS["slbi"]})
    prune = Stage("lbi-prune", "lbi", "conv3 pruned by Gamma", partial(_logged, study_lbi._prune),
                  {"run": slbi.key(), "ratios": [0.0, 0.5], "data": "mnist-5k"}, needs=("lbi-slbi",))
    figures = Stage("lbi-figures", "lbi", "figures", partial(_logged, study_lbi._figures),
                    {"runs": {sgd.name: sgd.key(), slbi.name: slbi.key()}}, needs=("lbi-sgd", "lbi-slbi"))
    return [sgd, slbi, prune, figures]


def register_tiny() -> None:
    if "tiny-test" not in PRESETS:
        PRESETS.register("tiny-test", tiny_stages)


def _read_log(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _start(out: Path) -> subprocess.Popen:
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_reproduce_run as t; t.register_tiny(); "
            "from nnlab.cli import main; "
            f"sys.exit(main(['reproduce', '--preset', 'tiny-test', '--out', {str(out)!r}]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory):
    """Start the tiny preset, SIGKILL it once the second stage has a checkpoint, run it again."""
    out = tmp_path_factory.mktemp("reproduce") / "out"
    proc = _start(out)
    ckpt = out / "stages" / "lbi-slbi" / "lbi-slbi" / "checkpoint" / "latest.json"
    deadline = time.monotonic() + 60
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill: {proc.stderr.read()[-2000:]}"
    first = _read_log(out)
    register_tiny()
    code = main(["reproduce", "--preset", "tiny-test", "--out", str(out)])
    return out, first, _read_log(out)[len(first):], code


def test_killed_run_reuses_finished_stages_and_resumes_the_killed_one(killed_then_rerun):
    out, first, second, code = killed_then_rerun
    assert [(r["stage"], r["resume"]) for r in first] == [("lbi-sgd", False), ("lbi-slbi", False)]
    assert code == 0
    assert [r["stage"] for r in second] == ["lbi-slbi", "lbi-prune", "lbi-figures"]  # lbi-sgd not redone
    assert second[0]["resume"] and second[0]["step"] > 0  # resumed from the killed attempt's checkpoint
    summary = read_json(out / "summary.json")
    assert {s["name"]: s["status"] for s in summary["stages"]} == {
        "lbi-sgd": "reused", "lbi-slbi": "done", "lbi-prune": "done", "lbi-figures": "done"}
    records = [json.loads(line) for line in (out / "stages/lbi-slbi/lbi-slbi/metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in records if "train_loss" in r]
    assert epochs == list(range(1, EPOCHS + 1))  # every epoch exactly once across the kill


def test_report_images_and_tables_resolve(killed_then_rerun):
    out = killed_then_rerun[0]
    page = (out / "report.html").read_text()
    srcs = re.findall(r"<img src='([^']+)'", page)
    md_srcs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (out / "report.md").read_text())
    assert len(srcs) >= 3 and sorted(srcs) == sorted(md_srcs)
    for src in srcs:
        assert not Path(src).is_absolute() and (out / src).is_file()
        assert (out / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"src=['\"](?:/|https?:)", page) is None  # nothing outside the folder
    summary = read_json(out / "summary.json")
    assert summary["headline"]["lbi"]["SGD+DessiLBI, test top-1 (%)"]["seed"] == 98.61
    assert 0 < summary["headline"]["lbi"]["SGD+DessiLBI, test top-1 (%)"]["measured"] <= 100
    assert (out / "tables" / "lbi-prune-table6.csv").is_file()


def _fake(ctx, fail=False):
    if fail:
        raise RuntimeError("deliberate failure in a test stage")
    return StageResult(metrics={f"{ctx.name}_x": 1.0})


def fake_stages() -> list[Stage]:
    return [Stage("landscape-ok", "landscape", "fine", _fake, {}),
            Stage("lbi-bad", "lbi", "fails", partial(_fake, fail=True), {}),
            Stage("lbi-after", "lbi", "runs anyway", _fake, {}),
            Stage("lbi-needs-bad", "lbi", "skipped", _fake, {}, needs=("lbi-bad",))]


def test_failing_stage_is_reported_and_only_selects_studies(tmp_path, capsys):
    if "fake-test" not in PRESETS:
        PRESETS.register("fake-test", fake_stages)
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", "fake-test", "--out", str(out), "--only", "lbi"]) == 1
    summary = read_json(out / "summary.json")
    assert {s["name"]: s["status"] for s in summary["stages"]} == {
        "lbi-bad": "failed", "lbi-after": "done", "lbi-needs-bad": "skipped"}  # no landscape stage: --only lbi
    md = (out / "report.md").read_text()
    assert "deliberate failure in a test stage" in md and "needs stage(s) lbi-bad" in md
    assert "deliberate failure" in capsys.readouterr().err
    assert (out / "stages/lbi-bad/error.txt").read_text().count("RuntimeError") >= 1
    assert main(["reproduce", "--preset", "fake-test", "--out", str(out), "--only", "bn"]) == 0  # old name of landscape
    assert main(["reproduce", "--preset", "fake-test", "--out", str(out), "--only", "bogus"]) == 2
    capsys.readouterr()
    assert main(["reproduce", "--preset", "fake-test", "--out", str(out), "--plan"]) == 0  # runs nothing
    *rows, total = capsys.readouterr().out.splitlines()
    states = {line.split()[1]: line.split()[2] for line in rows}
    assert total.startswith(f"{sum(v != 'finished' for v in states.values())} of {len(rows)} stage(s) to run")
    assert states["lbi-after"] == "finished" and states["lbi-bad"] == "interrupted"  # failed: started, not done
    assert {n: states[n] for n in states if n.startswith("landscape")} == dict.fromkeys(
        [n for n in states if n.startswith("landscape")], "finished")


@pytest.mark.parametrize("preset", ["quick", "cpu", "paper", "cpu-full"])
def test_presets_cover_every_study_with_headlines_against_the_seed(preset):
    stages = PRESETS.get(preset)()
    names = [s.name for s in stages]
    assert len(names) == len(set(names))
    seed = seed_numbers()
    for study in {s.study for s in stages}:
        assert study in STUDIES and study in SECTIONS
        for _, _, seed_key, _ in SECTIONS[study].headline:
            assert seed_key is None or seed_key in seed[study], (study, seed_key)
    for stage in stages:  # stages read only outcomes of stages listed before them
        assert all(n in names[: names.index(stage.name)] for n in stage.needs), stage.name
    assert [s.key() for s in stages] == [s.key() for s in PRESETS.get(preset)()]  # stable keys


def test_cpu_full_preset_is_the_seed_scale_cifar_runs():
    """Issue 14: the lr 0.1 pair at full width on all 50k images (the seed's Table 3 schedule), the
    band at width 0.5, and DessiLBI on both seed models with both flavours, 20 epochs each."""
    from nnlab.landscape.sweep import LandscapeConfig
    from nnlab.reproduce.study_lbi import sparsest_conv

    stages = {s.name: s for s in PRESETS.get("cpu-full")()}
    pair = LandscapeConfig(**stages["landscape-lr0.1"].config["sweep"]).validate()
    assert (pair.lrs, pair.width, pair.train_subset, pair.epochs, pair.batch_size) == ([0.1], None, None, 20, 128)
    assert (pair.momentum, pair.weight_decay, pair.every, pair.eta_count, pair.hessian_every) == (0.0, 0.0, 30, 8, 300)
    band = LandscapeConfig(**stages["landscape-band"].config["sweep"])
    assert band.width == 0.5 and band.lrs == [0.05, 0.075, 0.1, 0.125, 0.15] and band.train_subset is None
    runs = [n for n in stages if n.startswith("lbi-") and not n.endswith(("-prune", "-figures"))]
    assert sorted(runs) == ["lbi-resnet56-adam", "lbi-resnet56-sgd", "lbi-vgg-a-adam", "lbi-vgg-a-sgd"]
    assert all(stages[n].config["epochs"] >= 20 and stages[n].config["data"] == "cifar10" for n in runs)
    assert all(f"{n}-prune" in stages for n in runs)
    assert {s.study for s in stages.values()} == {"landscape", "lbi"}
    assert sparsest_conv({"a.weight": 0.9, "b.weight": 0.2, "c.weight": 0.0}) == "b.weight"
    assert sparsest_conv({"a.weight": 0.0, "b.weight": 0.0}) == "a.weight"


def test_quick_preset_uses_only_the_embedded_digits():
    configs = json.dumps([s.config for s in PRESETS.get("quick")()])
    datasets = set(re.findall(r'"data": "([^"]+)"', configs))
    assert datasets == {"mnist-5k"}


def test_study_helpers_turn_results_into_headlines_and_notes():
    from nnlab.reproduce import study_landscape, study_prune

    runs = [{"bn": "off", "lr": 0.1, "best_test_top1": 0.2}, {"bn": "on", "lr": 0.1, "best_test_top1": 0.9}]
    notes = study_landscape.plateau_notes({"runs": runs})
    assert len(notes) == 1 and "without BN has not left the initial loss plateau" in notes[0]
    rows = [{"method": "base", "ratio": 0.0, "top1": 0.90, "images_per_s": 100.0, "gflops": 1.0},
            {"method": "cp-vit", "ratio": 0.5, "top1": 0.85, "images_per_s": 180.0, "gflops": 0.5}]
    m = study_prune.sweep_metrics(rows)
    assert m["base_top1"] == 0.90 and m["cp-vit_top1_r0.5"] == 0.85 and m["cp-vit_speedup_r0.5"] == pytest.approx(1.8)
    for study in (study_landscape, study_prune):  # the MNIST stand-ins for CIFAR-10 experiments are labelled as such
        notes = [n for s in study.stages("quick") for n in _notes_of(study, s)]
        assert any("mnist-5k" in n and "CIFAR-10" in n for n in notes), study.__name__


def _notes_of(study, stage) -> list[str]:
    if study.__name__.endswith("study_landscape") and stage.name == "landscape-sweep":
        return study.notes_for(stage.config["sweep"])
    if study.__name__.endswith("study_prune") and stage.name == "prune-sweep":
        return study.notes_for(study.BASE["quick"], stage.config["sweep"])
    return []


def test_plan_counts_time_limited_minutes_left_but_not_published_runs(tmp_path):
    from nnlab.reproduce.pipeline import plan
    from nnlab.reproduce.stages import Stage, StageResult

    def stages():
        def noop(ctx):
            return StageResult()
        return [Stage("train-a", "functa", "a", noop, {"train": {"time_limit_min": 10.0}}),
                Stage("train-b", "functa", "b", noop, {"train": {"time_limit_min": 60.0}, "published": "docs/x"}),
                Stage("figs", "functa", "c", noop, {})]

    if "fake-plan" not in PRESETS:
        PRESETS.register("fake-plan", stages)
    *rows, total = plan("fake-plan", tmp_path)
    assert [r.split()[2:4] for r in rows] == [["to", "run"]] * 3
    assert "10 min" in rows[0] and "published" in rows[1]
    assert total.startswith("3 of 3 stage(s) to run; at most 10 min of time-limited work")
