import subprocess
import sys

import pytest
import torch

from nnlab.config import apply_config_defaults, float_list
from nnlab.engine.checkpoint import load_checkpoint, save_checkpoint
from nnlab.errors import CheckpointError, ConfigError
from nnlab.registry import Registry


def test_registry_lists_choices_on_unknown_name():
    reg = Registry("widget")
    reg.register("a", 1)
    assert reg.get("a") == 1 and reg.names() == ["a"]
    with pytest.raises(ConfigError, match="unknown widget 'b'; choose one of: a"):
        reg.get("b")


def test_checkpoint_roundtrip_keeps_latest_only(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"epoch": 0})
    save_checkpoint(tmp_path, 2, {"w": torch.full((2,), 3.0)}, {"epoch": 1, "buf": torch.arange(3)})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 2 and torch.equal(ckpt.tensors["w"], torch.full((2,), 3.0))
    assert ckpt.state["epoch"] == 1 and torch.equal(ckpt.state["buf"], torch.arange(3))
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 1


def test_checkpoint_of_an_earlier_step_replaces_later_ones(tmp_path):
    for step in (3, 5, 7):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("model-*")) == ["model-00000005.safetensors",
                                                               "model-00000007.safetensors"]
    save_checkpoint(tmp_path, 4, {"w": torch.full((2,), 4.0)}, {}, keep=2)   # a run rolled back to 4
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 4 and torch.equal(ckpt.tensors["w"], torch.full((2,), 4.0))
    assert sorted(p.name for p in tmp_path.glob("state-*")) == ["state-00000004.pt"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {})
    (tmp_path / "model-00000001.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_checkpoint_hashes_catch_a_changed_weight_and_a_pickled_state(tmp_path):
    """Issue 16: a flipped value in still-valid safetensors bytes is refused (it resumed silently
    before); a state file replaced by a pickle is named as not an nnlab state file."""
    import json
    import pickle

    from safetensors.torch import load_file, save_file

    save_checkpoint(tmp_path, 1, {"w": torch.ones(4)}, {"k": 1})
    path = tmp_path / "model-00000001.safetensors"
    tensors = load_file(path)
    tensors["w"][2] = 1.5  # a valid file with other numbers
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"model-00000001.safetensors is corrupted \(its SHA-256"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 2, {"w": torch.ones(4)}, {"k": 2})
    (tmp_path / "state-00000002.pt").write_bytes(pickle.dumps(print))
    meta = json.loads((tmp_path / "latest.json").read_text())
    meta.pop("sha256")  # as in a checkpoint written before the hashes existed
    (tmp_path / "latest.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="is not an nnlab state file"):
        load_checkpoint(tmp_path)


def test_yaml_config_defaults_and_unknown_keys(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--lr", type=float, default=0.1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.5\n")
    apply_config_defaults(parser, cfg)
    assert parser.parse_args([]).lr == 0.5
    assert parser.parse_args(["--lr", "0.2"]).lr == 0.2
    cfg.write_text("lr: 0.5\nbogus: 1\n")
    with pytest.raises(ConfigError, match="unknown option"):
        apply_config_defaults(parser, cfg)
    assert float_list("0.1,0.2") == [0.1, 0.2]


def test_cli_unknown_command_is_one_line():
    out = subprocess.run([sys.executable, "-m", "nnlab", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_a_kernel_that_cannot_build_warns_once_and_gives_none(monkeypatch, tmp_path):
    """No C++ compiler: build_once warns once, naming the fallback, and returns None (every caller
    then runs its torch code); it does not raise, and it does not try again in the same process."""
    import warnings

    from nnlab.engine import cpp

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(cpp, "_BUILT", {})
    source = "#include <torch/library.h>\nTORCH_LIBRARY(nnlab_never_built, m) {}\n"
    one_line = r"nnlab_never_built: C\+\+ kernel unavailable \(RuntimeError: [^\n]*not found\); falling back to the torch code$"
    with pytest.warns(RuntimeWarning, match=one_line):
        assert cpp.build_once("nnlab_never_built", source, "the torch code") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpp.build_once("nnlab_never_built", source, "the torch code") is None
    assert (tmp_path / "ext" / "nnlab-sources").is_dir()  # the source went under the extension root


def test_importing_nnlab_changes_no_process_setting():
    """Only the command line sets OMP_WAIT_POLICY; a library import must leave the user's process alone."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os, nnlab, nnlab.cli, nnlab.functa.generate.run; print(os.environ.get('OMP_WAIT_POLICY'));"
            "nnlab.cli.main(['data', 'list']); print(os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[0] == "None" and lines[-1] == "PASSIVE"


def test_publish_copies_a_run_minus_checkpoints_locks_and_big_weights(tmp_path):
    from nnlab.engine.io import read_json
    from nnlab.report.publish import publish

    run = tmp_path / "sweep"
    (run / "bn-on" / "lr-0.1" / "checkpoint").mkdir(parents=True)
    (run / "bn-on" / "lr-0.1" / "checkpoint" / "model-00000100.safetensors").write_bytes(b"w" * 10)
    (run / "bn-on" / "lr-0.1" / "config.yaml").write_text("threads: 1\n")
    (run / "bn-on" / "lr-0.1" / ".lock").write_text("pid 1\n")
    (run / "summary.json").write_text("{}")
    (run / "model.safetensors").write_bytes(b"x" * (2 * 2**20))
    result = publish(run, tmp_path / "pub", max_weights_mb=1.0)
    assert result.copied == ["bn-on/lr-0.1/config.yaml", "summary.json"]
    assert {p for p, _ in result.skipped} == {"bn-on/lr-0.1/checkpoint/model-00000100.safetensors",
                                              "bn-on/lr-0.1/.lock", "model.safetensors"}
    manifest = read_json(tmp_path / "pub" / "PUBLISHED.json")
    assert set(manifest["files"]) == set(result.copied) and len(manifest["files"]["summary.json"]["sha256"]) == 64
    assert not (tmp_path / "pub" / "bn-on" / "lr-0.1" / "checkpoint").exists()
    with pytest.raises(ConfigError, match="outside it"):
        publish(run, run / "inside")
    # a pruning sweep: its resume state (prepared/) never goes; its pruned models only when not excluded
    (run / "prepared").mkdir()
    (run / "prepared" / "pvit-gates.safetensors").write_bytes(b"g")
    (run / "models" / "cp-vit-0.5").mkdir(parents=True)
    (run / "models" / "cp-vit-0.5" / "pruned.json").write_text("{}")
    (run / "bn-on" / "curve.png").write_bytes(b"p")
    result = publish(run, tmp_path / "pub2", max_weights_mb=1.0, exclude=["models", "*.png"])
    assert result.copied == ["bn-on/lr-0.1/config.yaml", "summary.json"]
    why = dict(result.skipped)
    assert why["models/cp-vit-0.5/pruned.json"] == "excluded by 'models'" and why["bn-on/curve.png"] == "excluded by '*.png'"
    assert why["prepared/pvit-gates.safetensors"] == "checkpoint or cache"
    assert "models/cp-vit-0.5/pruned.json" in publish(run, tmp_path / "pub3", max_weights_mb=1.0).copied


def test_records_csv_puts_the_named_columns_first_and_leaves_missing_cells_empty(tmp_path):
    from nnlab.report import read_csv, write_records_csv

    path = write_records_csv(tmp_path / "sub" / "t.csv", [{"b": 1, "z": 2.5, "a": "x"}, {"a": "y", "c": 3}],
                             ["a", "b"])
    assert read_csv(path) == (["a", "b", "c", "z"], [["x", "1", "", "2.5"], ["y", "", "3", ""]])
    assert not list(path.parent.glob("*.tmp*"))  # written through a temporary file, then renamed


def test_every_subpackage_imports_on_its_own():
    """A module that relies on another having imported something first (``importlib.util`` in
    nnlab.reproduce.presets, found in session 22) fails only when imported alone."""
    for mod in ("nnlab.reproduce.presets", "nnlab.functa.trainer", "nnlab.prune.sweep", "nnlab.lbi",
                "nnlab.landscape"):
        out = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True)
        assert out.returncode == 0, f"import {mod} alone failed: {out.stderr.strip().splitlines()[-1:]}"
