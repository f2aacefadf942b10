import re

import pytest

from nnlab.report import Section, build_report
from nnlab.reproduce.stages import Stage, StageResult, run_stages


def _make_stages(log: list, fail: bool = False, kill_at: str | None = None):
    def figure_stage(ctx):
        log.append((ctx.name, ctx.resume))
        if kill_at == ctx.name:
            raise KeyboardInterrupt  # a kill: not caught, like SIGINT
        if fail and ctx.name == "b":
            raise RuntimeError("boom")
        (ctx.dir / "fig.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        (ctx.dir / "t.csv").write_text("ratio,top1\n0.5,0.9\n")
        return StageResult(metrics={f"{ctx.name}_x": 0.5}, figures=["fig.png"], tables=["t.csv"])

    return [Stage(n, "lbi", f"stage {n}", figure_stage, {"n": n}) for n in ("a", "b", "c")]


def test_killed_run_reuses_finished_stages_and_resumes_the_killed_one(tmp_path):
    log = []
    with pytest.raises(KeyboardInterrupt):
        run_stages(_make_stages(log, kill_at="b"), tmp_path)
    assert log == [("a", False), ("b", False)]
    log.clear()
    outcomes = run_stages(_make_stages(log), tmp_path)
    assert [o.status for o in outcomes] == ["reused", "done", "done"]
    assert log == [("b", True), ("c", False)]  # a not redone; b told to resume


def test_stage_state_tells_finished_interrupted_outdated_and_to_run_apart(tmp_path):
    from nnlab.reproduce.stages import stage_state

    with pytest.raises(KeyboardInterrupt):
        run_stages(_make_stages([], kill_at="b"), tmp_path)
    stages = _make_stages([])
    assert [stage_state(s, tmp_path) for s in stages] == ["finished", "interrupted", "to run"]
    stages[0].config["n"], stages[1].config["n"] = "changed", "changed"  # another config: both start afresh
    assert [stage_state(s, tmp_path) for s in stages] == ["outdated", "outdated", "to run"]
    run_stages(_make_stages([]), tmp_path)
    assert [stage_state(s, tmp_path) for s in _make_stages([])] == ["finished"] * 3


def test_time_limit_min_adds_every_nested_budget():
    from nnlab.reproduce.stages import time_limit_min

    config = {"train": {"time_limit_min": 10.0}, "models": [{"time_limit_min": 20}, {"time_limit_min": None}],
              "steps": 5, "time_limit": 99}
    assert time_limit_min(config) == 30.0 and time_limit_min({"steps": 5}) == 0.0


def test_changed_config_reruns_and_failure_does_not_stop_others(tmp_path):
    log = []
    run_stages(_make_stages(log), tmp_path)
    stages = _make_stages(log, fail=True)
    stages[1].config["n"] = "changed"
    outcomes = run_stages(stages, tmp_path)
    assert [o.status for o in outcomes] == ["reused", "failed", "reused"]
    assert "boom" in outcomes[1].error and (tmp_path / "stages/b/error.txt").is_file()


def test_report_images_and_tables_resolve(tmp_path):
    outcomes = run_stages(_make_stages([], fail=True), tmp_path)
    section = Section("lbi", "DessiLBI", "intro", [("a_x", "a metric", "slbi_top1", 100.0)])
    files = build_report(outcomes, tmp_path, [section], {"lbi": {"slbi_top1": {"value": 98.61}}},
                         title="t")
    page = files.html.read_text()
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert len(srcs) == 2 and all((tmp_path / s).is_file() for s in srcs)
    md = files.markdown.read_text()
    assert "| a metric | 50 | 98.61 |" in md and "boom" in md
    assert all((tmp_path / m).is_file() for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md))


def test_headline_rows_skip_only_what_neither_side_has():
    from nnlab.report import headline_rows

    section = Section("lbi", "DessiLBI", "intro", [("x", "measured", None, 1.0), ("y", "seed only", "s", 1.0),
                                                   ("z", "neither", None, 1.0)])
    rows = headline_rows(section, {"x": 0.5}, {"lbi": {"s": {"value": 98.61, "source": "seed"}}})
    assert [r[0] for r in rows] == ["measured", "seed only"]
    assert rows[1][1] is None and rows[1][2] == 98.61  # a gap against the seed stays visible


def test_the_cpu_preset_prunes_the_published_cifar_model_when_it_is_present(tmp_path, monkeypatch):
    """Issue 13: with docs/results/vit-cifar/base in place, the ViT section uses it as it is."""
    from pathlib import Path

    import torch
    import yaml
    from safetensors.torch import save_file

    from nnlab.reproduce import study_prune

    monkeypatch.chdir(tmp_path)
    assert [s.name for s in study_prune.stages("cpu")] == ["prune-base", "prune-sweep"]
    assert study_prune.stages("cpu")[0].fn.__name__ == "_train_base"  # nothing published: train the stand-in
    base = tmp_path / study_prune.PUBLISHED_BASE
    base.mkdir(parents=True)
    (base / "config.yaml").write_text(yaml.safe_dump({"model": "vit-cifar-cpu", "data": "cifar10", "epochs": 30}))
    save_file({"w": torch.zeros(2)}, base / "model.safetensors")
    use, sweep = study_prune.stages("cpu")
    assert use.fn.__name__ == "_use_published" and Path(use.config["checkpoint"]).resolve() == base.resolve()
    assert sweep.config["data"] == "cifar10" and sweep.config["sweep"]["ratios"] == study_prune.RATIOS
    key = use.key()
    save_file({"w": torch.ones(2)}, base / "model.safetensors")  # another published model: another key
    assert study_prune.stages("cpu")[0].key() != key
    assert study_prune.stages("quick")[0].fn.__name__ == "_train_base"  # quick never uses it


def test_the_cpu_preset_sweeps_the_cifar_model_with_the_published_sweeps_settings():
    """CIFAR_SWEEP = configs/prune-cifar.yaml as `nnlab prune sweep --config` reads it, in every
    setting that keys a sweep folder (sweep.IDENTITY) and in the ratios: so the published sweep's
    rows serve the cpu preset's stage, and the two cannot drift apart."""
    import dataclasses
    from pathlib import Path

    from nnlab.cli import build_parser
    from nnlab.cli.prune import sweep_config_from_args
    from nnlab.config import apply_config_defaults
    from nnlab.prune.sweep import IDENTITY
    from nnlab.reproduce import study_prune

    yaml_file = Path(__file__).resolve().parents[1] / "configs" / "prune-cifar.yaml"
    argv = ["prune", "sweep", "--config", str(yaml_file), "--checkpoint", "base", "--out", "out"]
    parser = build_parser()
    apply_config_defaults(parser.parse_args(argv)._parser, str(yaml_file))
    cli = sweep_config_from_args(parser.parse_args(argv))
    ours = study_prune.sweep_config(study_prune.CIFAR_SWEEP, "base", "out", None)
    pick = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k in (*IDENTITY, "ratios")}
    assert pick(ours) == pick(cli)
    assert set(ours.methods) <= set(cli.methods)  # the published sweep has every method of the report


def _publish_stages(out, dest):
    """What `nnlab publish OUT DEST` keeps of a reproduce run: everything but checkpoints."""
    import shutil
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("checkpoint"))


def test_reuse_copies_the_finished_stages_of_a_published_run_whose_config_is_unchanged(tmp_path):
    """`nnlab reproduce --reuse DIR`: a report rebuilt over several sittings. Stages finished in a
    published run are reused as they are; a changed one is not copied and runs here."""
    from nnlab.engine.io import read_json
    from nnlab.reproduce.stages import seed_stages

    log = []
    run_stages(_make_stages(log), tmp_path / "first")
    _publish_stages(tmp_path / "first", tmp_path / "published")
    stages = _make_stages(log)
    stages[2].config["n"] = "changed"
    out = tmp_path / "second"
    assert seed_stages(stages, out, tmp_path / "published") == ["a", "b"]
    assert read_json(out / "stages/a/done.json")["seeded_from"] == str(tmp_path / "published")
    log.clear()
    outcomes = run_stages(stages, out)
    assert [o.status for o in outcomes] == ["reused", "reused", "done"] and log == [("c", False)]
    assert outcomes[0].seeded_from and not outcomes[2].seeded_from
    assert (out / "stages/a/fig.png").is_file()  # a copied stage's figures come with it
    assert seed_stages(stages, out, tmp_path / "published") == []  # finished here already: left alone


def test_reuse_replaces_an_interrupted_attempt_and_rejects_a_folder_that_is_not_a_run(tmp_path):
    from nnlab.errors import ConfigError
    from nnlab.reproduce.stages import seed_stages

    run_stages(_make_stages([]), tmp_path / "first")
    _publish_stages(tmp_path / "first", tmp_path / "published")
    out = tmp_path / "second"
    with pytest.raises(KeyboardInterrupt):
        run_stages(_make_stages([], kill_at="a"), out)  # a killed attempt: started.json, no done.json
    assert seed_stages(_make_stages([]), out, tmp_path / "published") == ["a", "b", "c"]
    assert [o.status for o in run_stages(_make_stages([]), out)] == ["reused"] * 3
    with pytest.raises(ConfigError, match="not a published reproduce folder"):
        seed_stages(_make_stages([]), out, tmp_path / "first" / "stages")


def test_a_stage_that_needs_a_copied_stages_checkpoints_fails_with_a_hint(tmp_path):
    from nnlab.reproduce.stages import seed_stages

    def train(ctx):
        (ctx.dir / "checkpoint").mkdir()
        (ctx.dir / "checkpoint" / "w.bin").write_bytes(b"w")
        return StageResult()

    def use(ctx):
        (ctx.results["train"].dir / "checkpoint" / "w.bin").read_bytes()
        return StageResult()

    def make(n):
        return [Stage("train", "lbi", "train", train, {}), Stage("use", "lbi", "use", use, {"n": n}, needs=("train",))]

    run_stages(make(1), tmp_path / "first")
    _publish_stages(tmp_path / "first", tmp_path / "published")
    seed_stages(make(2), tmp_path / "second", tmp_path / "published")
    outcomes = run_stages(make(2), tmp_path / "second")
    assert outcomes[1].status == "failed"
    assert "FileNotFoundError" in outcomes[1].error and "delete OUT/stages/train and rerun" in outcomes[1].error


def test_only_takes_stage_names_and_adds_the_stages_they_need():
    from nnlab.errors import ConfigError
    from nnlab.reproduce.pipeline import select_stages

    noop = lambda ctx: StageResult()  # noqa: E731
    stages = [Stage("fit", "functa", "", noop), Stage("clf", "functa", "", noop, needs=("fit",)),
              Stage("fig", "functa", "", noop, needs=("clf",)), Stage("pix", "functa", "", noop),
              Stage("sgd", "lbi", "", noop)]
    assert [s.name for s in select_stages(stages, ["fig"])] == ["fit", "clf", "fig"]  # transitively, in run order
    assert [s.name for s in select_stages(stages, ["pix", "lbi"])] == ["pix", "sgd"]
    assert [s.name for s in select_stages(stages, ["functa"])] == ["fit", "clf", "fig", "pix"]
    with pytest.raises(ConfigError, match="unknown study or stage.*nope.*choose studies from"):
        select_stages(stages, ["nope"])


def test_the_prune_sweep_stage_starts_from_the_published_rows_and_falls_back_when_they_differ(tmp_path, monkeypatch):
    """A fresh prune-sweep stage copies the published sweep's rows in before sweeping (the sweep keeps
    rows it finds); rows the sweep refuses (another base model) are dropped and the sweep starts afresh."""
    from pathlib import Path

    import nnlab.prune.sweep as sweep
    from nnlab.errors import ConfigError
    from nnlab.reproduce import study_prune
    from nnlab.reproduce.stages import StageContext

    published = tmp_path / "published"
    published.mkdir()
    for name in study_prune.SWEEP_ROWS:
        (published / name).write_text(name)
    seen = []

    def fake_sweep(config, refuse=False):
        files = sorted(p.name for p in Path(config.out).glob("*")) if Path(config.out).exists() else []
        seen.append(files)
        if refuse and files:
            raise ConfigError("another base model")
        return sweep.PruneSweepResult(rows=[], out=Path(config.out))

    def ctx(resume, folder):
        config = {"sweep": study_prune.CIFAR_SWEEP, "data": "cifar10", "checkpoint": "base",
                  "published_sweep": str(published)}
        (tmp_path / folder).mkdir(exist_ok=True)
        return StageContext("prune-sweep", tmp_path / folder, config, resume, None, {})

    monkeypatch.setattr(sweep, "run_prune_sweep", fake_sweep)
    study_prune._run_sweep(ctx(False, "fresh"))
    assert seen[-1] == sorted(study_prune.SWEEP_ROWS)  # the published rows were there when it started
    study_prune._run_sweep(ctx(True, "resumed"))
    assert seen[-1] == []  # a resumed stage keeps its own rows and takes none
    monkeypatch.setattr(sweep, "run_prune_sweep", lambda c: fake_sweep(c, refuse=True))
    study_prune._run_sweep(ctx(False, "refused"))
    assert seen[-2:] == [sorted(study_prune.SWEEP_ROWS), []]  # refused, then swept from an empty folder


def test_the_cpu_preset_shows_the_published_60_minute_faces_when_they_match(tmp_path, monkeypatch):
    """Issue 17: the main faces stage uses the published CelebA run only if its config is the stage's."""
    import shutil
    from pathlib import Path

    import yaml

    from nnlab.reproduce import study_functa

    monkeypatch.chdir(tmp_path)
    faces = lambda: {s.name: s for s in study_functa.stages("cpu") if s.name.startswith("functa-faces-")}  # noqa: E731
    assert faces()["functa-faces-256"].fn.__name__ == "_faces"  # nothing published: train for 60 minutes
    assert faces()["functa-faces-256"].config["train"]["time_limit_min"] == 60.0
    src = Path(__file__).resolve().parents[1] / study_functa.PUBLISHED_FACES
    dest = tmp_path / study_functa.PUBLISHED_FACES
    shutil.copytree(src, dest)
    used = faces()["functa-faces-256"]
    assert used.fn.__name__ == "_faces_published" and used.config["published"] == study_functa.PUBLISHED_FACES
    assert faces()["functa-faces-64"].fn.__name__ == "_faces"  # the other size trains as before
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["train"]["outer_lr"] = 2e-3  # another recipe: not the stage's run
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert faces()["functa-faces-256"].fn.__name__ == "_faces"


def test_the_pruning_notes_say_when_the_base_was_distilled_and_from_what():
    """The published base (session 27) learnt from a CNN teacher: the report must say so, with the
    teacher and the kind of targets, and say nothing of it for a base trained on labels alone."""
    from nnlab.reproduce import study_prune

    base = {"model": "vit-cifar-cpu", "data": "cifar10", "epochs": 46}
    plain = study_prune.notes_for(base, study_prune.CIFAR_SWEEP)
    assert not [n for n in plain if "distilled" in n]
    soft = study_prune.notes_for({**base, "distill_from": "runs/cnn-fast-cifar", "distill_alpha": 0.9,
                                  "distill_temperature": 4.0}, study_prune.CIFAR_SWEEP)
    (note,) = [n for n in soft if "distilled" in n]
    assert "T = 4" in note and "weight 0.9" in note and "runs/cnn-fast-cifar" in note
    hard = study_prune.notes_for({**base, "distill_from": "t", "distill_alpha": 0.5, "distill_temperature": 0.0},
                                 study_prune.CIFAR_SWEEP)
    assert any("hard teacher labels" in n for n in hard)


def test_the_pruning_notes_give_both_stages_of_a_base_started_from_another_runs_weights(tmp_path):
    """The published base (session 31) trained 2 epochs from the 56-epoch run's weights (init_from): the
    report must not call it "trained from scratch for 2 epochs", and it names the earlier run and its epochs."""
    import yaml

    from nnlab.reproduce import study_prune

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": "vit-cifar-cpu", "epochs": 56}))
    base = {"model": "vit-cifar-cpu", "data": "cifar10", "epochs": 2}
    (scratch,) = [n for n in study_prune.notes_for(base, study_prune.CIFAR_SWEEP) if n.startswith("Model:")]
    assert "from scratch for 2 epochs" in scratch
    tuned = study_prune.notes_for({**base, "init_from": str(tmp_path)}, study_prune.CIFAR_SWEEP)
    (note,) = [n for n in tuned if n.startswith("Model:")]
    assert f"for 2 epochs from the weights of {tmp_path} (56 epochs from scratch)" in note
    assert "from scratch for 2" not in note
    gone = study_prune.notes_for({**base, "init_from": str(tmp_path / "moved")}, study_prune.CIFAR_SWEEP)
    assert any(f"for 2 epochs from the weights of {tmp_path / 'moved'} instead" in n for n in gone)
