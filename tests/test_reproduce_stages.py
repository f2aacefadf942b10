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
