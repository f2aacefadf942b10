"""``nnlab train``: flags and YAML config become a TrainConfig; bad input is one line, exit 2."""
from __future__ import annotations

import argparse
import json

import pytest

from nnlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--train-limit", "96", "--test-limit", "50", "--batch-size", "32", "--device", "cpu", "--no-progress"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_train_writes_summary_and_says_where(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "lenet5", "--data", "mnist-5k", "--epochs", "2", "--optimizer", "adam",
                 "--lr", "0.001", "--out", str(out), "--optimizer-option", "betas=[0.8, 0.99]", *FAST])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["test_top1"] <= 1 and 0 <= summary["test_top5"] <= 1 and summary["epochs"] == 2
    assert summary["optimizer"] == "adam"
    assert f"results in {out}" in capsys.readouterr().out
    # the saved config is the resolved one, and --resume of the finished run is a no-op success
    saved = (out / "config.yaml").read_text()
    assert "optimizer: adam" in saved and "- 0.8" in saved
    assert main(["train", "--epochs", "2", "--optimizer", "adam", "--lr", "0.001", "--out", str(out),
                 "--optimizer-option", "betas=[0.8, 0.99]", "--resume", *FAST]) == 0


def test_yaml_config_with_flag_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\nlr: 0.02\nschedule: step\nschedule_options: {gamma: 0.5}\nmax-steps: 2\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--lr", "0.03", "--out", str(out), *FAST]) == 0
    saved = (out / "config.yaml").read_text()
    assert "lr: 0.03" in saved and "schedule: step" in saved and "gamma: 0.5" in saved
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize("argv, words", [
    (["--model", "nope"], "unknown model 'nope'; choose one of: cnn-fast-cifar, lenet5"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--model-option", "novalue"], "expects KEY=VALUE"),
])
def test_argument_errors_are_one_line(tmp_path, capsys, argv, words):
    try:  # argparse's own errors exit through the parser; the config's come back as exit status 2
        code = main(["train", "--out", str(tmp_path / "r"), *argv])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and words in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_train_flags_are_the_config_dataclass_fields():
    """Issue 16: one source of defaults: every scalar TrainConfig field is a flag defaulting to unset
    (the dataclass default applies), and no flag of nnlab train types a default of its own."""
    import dataclasses

    from nnlab.cli import build_parser
    from nnlab.engine.train import TrainConfig

    parser = next(a for a in build_parser()._subparsers._group_actions[0].choices.values()
                  if a.prog.endswith(" train"))
    dests = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            assert f.name in dests and dests[f.name].default is None, f.name
    assert {d for d, a in dests.items() if a.default not in (None, False, argparse.SUPPRESS)} <= {"func", "_parser"}


def test_library_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "a"), "--lr", "-1", *FAST]) == 2
    assert "lr must be a positive number" in one_line_error(capsys)
    assert main(["train", "--out", str(tmp_path / "b"), "--optimizer-option", "bogus=1", *FAST]) == 2
    assert "bogus" in one_line_error(capsys)
    assert main(["train", "--out", str(tmp_path / "m"), "--model-option", "width=3", *FAST]) == 2
    assert "width" in one_line_error(capsys)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "c"), *FAST]) == 2
    assert "unknown option(s) learning_rate" in one_line_error(capsys)


def test_existing_run_needs_resume_and_same_config(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--epochs", "1", "--max-steps", "1", "--out", out, *FAST]) == 0
    capsys.readouterr()
    assert main(["train", "--epochs", "1", "--max-steps", "1", "--out", out, *FAST]) == 2
    assert "pass --resume" in one_line_error(capsys)
    assert main(["train", "--epochs", "1", "--max-steps", "1", "--out", out, "--resume", "--seed", "3",
                 *FAST]) == 2
    assert "different config (seed: 0 -> 3)" in one_line_error(capsys)


def test_full_mnist_from_shared_data(tmp_path, shared_data):
    out = tmp_path / "run"
    assert main(["train", "--data", "mnist", "--data-dir", str(shared_data / "mnist"), "--max-steps", "30",
                 "--optimizer", "adam", "--lr", "0.003", "--batch-size", "64", "--test-limit", "500",
                 "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["test_top1"] > 0.5  # 30 Adam steps learn digits (chance 0.1)


@pytest.mark.slow
def test_lenet5_reaches_99_percent_on_full_mnist(tmp_path, shared_data):
    """The issue-2 measurement (about 15 min on 2 busy CPU cores; recorded in BENCHMARKS.md)."""
    out = tmp_path / "run"
    assert main(["train", "--model", "lenet5", "--data", "mnist", "--data-dir", str(shared_data / "mnist"),
                 "--epochs", "20", "--batch-size", "128", "--optimizer", "sgd", "--lr", "0.05",
                 "--momentum", "0.9", "--weight-decay", "5e-4", "--schedule", "cosine", "--augment",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["test_top1"] >= 0.99
