"""DessiLBI on top of the engine: callback records, `nnlab lbi train/prune/plot`, pruning order."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nnlab.cli import main
from nnlab.engine.metrics import read_jsonl
from nnlab.lbi.callback import gamma_path_values, update_entry
from nnlab.lbi.gamma_prune import (apply_keep, importance_order, importance_order_reference, keep_mask,
                             read_table)

TINY = ["--model", "lenet5", "--data", "mnist-5k", "--epochs", "2", "--batch-size", "64",
        "--train-limit", "384", "--test-limit", "200", "--no-progress", "--mu", "5", "--lam", "0.5"]


@pytest.fixture(scope="module")
def lbi_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lbi") / "run"
    torch.manual_seed(0)
    assert main(["lbi", "train", *TINY, "--optimizer", "slbi", "--lr", "0.1", "--out", str(out)]) == 0
    return out


def test_importance_order_matches_reference():
    g = torch.Generator().manual_seed(0)
    entry = torch.randint(1, 4, (50,), generator=g).float()
    entry[::7] = float("inf")
    mag = torch.rand(50, generator=g).round(decimals=1)  # ties in magnitude too
    assert torch.equal(importance_order(entry, mag), importance_order_reference(entry, mag))


def test_keep_mask_prefers_early_entry_then_magnitude():
    entry = torch.tensor([2.0, 1.0, float("inf"), 1.0, 3.0])
    mag = torch.tensor([9.0, 0.1, 100.0, 0.5, 1.0])
    # order: idx3 (e1, 0.5), idx1 (e1, 0.1), idx0 (e2), idx4 (e3), idx2 (never)
    assert keep_mask(entry, mag, 0.4).tolist() == [True, True, False, True, False]
    assert keep_mask(entry, mag, 0.0).all() and not keep_mask(entry, mag, 1.0).any()


def test_apply_keep_zeroes_filters_and_bias():
    conv = nn.Conv2d(2, 3, 3)
    apply_keep(conv, torch.tensor([True, False, True]))
    assert conv.weight[1].abs().sum() == 0 and conv.bias[1] == 0
    assert conv.weight[0].abs().sum() > 0


def test_entry_and_gamma_path_helpers():
    entry = update_entry(torch.tensor([float("inf"), 2.0, float("inf")]), torch.tensor([True, True, False]), 5)
    assert entry.tolist() == [5.0, 2.0, float("inf")]
    gamma = torch.zeros(3, 2, 1, 1)
    gamma[1] = 3.0
    assert gamma_path_values(gamma, torch.tensor([1, 2]), per_filter=True) == pytest.approx([18 ** 0.5, 0.0])


def test_train_writes_sparsity_gamma_paths_and_summary(lbi_run):
    summary = json.loads((lbi_run / "summary.json").read_text())
    assert {"test_top1", "test_top5", "sparsity", "test_top1_wstar"} <= set(summary)
    assert set(summary["sparsity"]) == {"conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight", "fc2.weight"}
    epochs = [r for r in read_jsonl(lbi_run / "metrics.jsonl") if "train_loss" in r]
    assert len(epochs) == 2
    assert all(0 <= v <= 1 for v in epochs[-1]["sparsity"].values())
    assert len(epochs[-1]["gamma_path"]["conv3.weight"]) == 16
    assert (lbi_run / "lbi.safetensors").is_file()


def test_prune_cli_writes_results(lbi_run, tmp_path):
    out = tmp_path / "prune"
    assert main(["lbi", "prune", str(lbi_run), "--layer", "conv3", "--ratios", "0,0.5,1", "--out", str(out)]) == 0
    rows = read_table(out / "results.csv")
    assert [r["ratio"] for r in rows] == [0.0, 0.5, 1.0]
    summary = json.loads((lbi_run / "summary.json").read_text())
    assert rows[0]["top1"] == pytest.approx(summary["test_top1"])  # ratio 0 is the trained model
    assert rows[2]["top1"] <= 0.3  # all of conv3 gone: near chance
    assert "| top-1 |" in (out / "results.md").read_text()


def test_prune_cli_rejects_unknown_layer(lbi_run, tmp_path, capsys):
    assert main(["lbi", "prune", str(lbi_run), "--layer", "conv9", "--out", str(tmp_path)]) == 2
    assert "conv3" in capsys.readouterr().err


def test_plot_cli_writes_figures(lbi_run, tmp_path):
    assert main(["lbi", "plot", str(lbi_run), "--out", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.glob("*.png")}
    assert {"curves.png", "sparsity.png", "weights_conv3.png", "gamma_paths_run.png"} <= names


def test_lbi_options_rejected_for_plain_sgd(tmp_path, capsys):
    code = main(["lbi", "train", *TINY, "--optimizer", "sgd", "--out", str(tmp_path / "r")])
    assert code == 2 and "slbi" in capsys.readouterr().err


def test_prune_with_masked_finetuning_keeps_pruned_filters_zero(lbi_run, tmp_path):
    from nnlab.engine.checkpoint import load_checkpoint

    out = tmp_path / "ft"
    assert main(["lbi", "prune", str(lbi_run), "--layer", "conv3", "--ratios", "0.5", "--out", str(out),
                 "--finetune-epochs", "1", "--finetune-lr", "0.01"]) == 0
    w = load_checkpoint(out / "finetune-0.5" / "checkpoint").tensors["conv3.weight"]
    assert int((w.reshape(120, -1).abs().sum(1) == 0).sum()) == 60
    assert len(read_table(out / "results.csv")) == 1


def test_prune_with_finetuning_killed_mid_table_resumes_to_the_same_table(lbi_run, tmp_path, monkeypatch, capsys):
    """lbi prune --finetune-epochs: killed after the first ratio's fine-tuning, a rerun without --resume
    is refused in one line naming --resume (which the command takes), and --resume ends with the
    table of an uninterrupted run (the finished ratio reloaded from its checkpoint, the next trained)."""
    from nnlab.lbi import gamma_prune

    args = ["lbi", "prune", str(lbi_run), "--layer", "conv3", "--ratios", "0.5,0.8", "--finetune-epochs", "1"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    real, calls = gamma_prune.finetune_pruned, []

    def killed(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gamma_prune, "finetune_pruned", killed)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(gamma_prune, "finetune_pruned", real)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "cut")]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert read_table(tmp_path / "cut" / "results.csv") == read_table(tmp_path / "full" / "results.csv")


def test_layer_lam_groups_and_errors(tmp_path, capsys):
    from nnlab.errors import ConfigError
    from nnlab.lbi import param_groups
    from nnlab.models import create_model

    model = create_model("lenet5")
    groups = param_groups(model, layer_lam={"conv3": 4.0})
    own = [g for g in groups if g.get("lam") == 4.0]
    assert len(own) == 1 and own[0]["params"][0] is model.conv3.weight
    with pytest.raises(ConfigError, match="conv3"):
        param_groups(model, layer_lam={"conv9": 1.0})
    with pytest.raises(SystemExit) as exc:  # argparse's one-line error
        main(["lbi", "train", "--layer-lam", "conv3", "--out", str(tmp_path / "r")])
    assert exc.value.code == 2 and "LAYER=LAM" in capsys.readouterr().err


def test_layer_mu_and_lam_share_one_group_per_layer(tmp_path, capsys):
    from nnlab.errors import ConfigError
    from nnlab.lbi import build_slbi, param_groups
    from nnlab.models import create_model

    model = create_model("lenet5")
    groups = param_groups(model, conv_lam=2.0, layer_lam={"conv3": 16.0}, layer_mu={"conv3": 5.0, "fc1": 8.0})
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model.conv3.weight)]["mu"] == 5.0 and by_param[id(model.conv3.weight)]["lam"] == 16.0
    assert by_param[id(model.fc1.weight)]["mu"] == 8.0 and "lam" not in by_param[id(model.fc1.weight)]
    assert by_param[id(model.conv1.weight)]["lam"] == 2.0 and "mu" not in by_param[id(model.conv1.weight)]
    opt = build_slbi(model, lr=0.1, mu=20.0, layer_mu={"conv3": 5.0})
    assert sorted(g["mu"] for g in opt.param_groups) == [5.0, 20.0, 20.0, 20.0]
    with pytest.raises(ConfigError, match="layer_mu names conv9"):
        param_groups(model, layer_mu={"conv9": 1.0})
    with pytest.raises(SystemExit) as exc:
        main(["lbi", "train", "--layer-mu", "conv3:5", "--out", str(tmp_path / "r")])
    assert exc.value.code == 2 and "LAYER=MU" in capsys.readouterr().err


def test_bad_lbi_hyperparameter_is_one_line_error(tmp_path, capsys):
    code = main(["lbi", "train", *TINY[:-4], "--mu", "-1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "mu" in err and "Traceback" not in err
