"""The pruning sweep end to end on a tiny trained ViT (mnist-5k), through the CLI."""
import csv

import pytest

from nnlab.cli import main
from nnlab.errors import ConfigError
from nnlab.prune.io import load_pruned


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from nnlab.engine.train import TrainConfig, train
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(model="vit-test", data="mnist-5k", epochs=1, max_steps=3, train_limit=256,
                      test_limit=64, optimizer="adamw", lr=1e-3, progress=False), out)
    return out


def test_sweep_cli_writes_results_and_models(tiny_run, tmp_path):
    out = tmp_path / "sweep"
    args = ["prune", "sweep", "--checkpoint", str(tiny_run), "--methods", "p-vit,ap-vit,cp-vit,tome",
            "--ratios", "0.3", "--out", str(out), "--test-limit", "64", "--calib-size", "16",
            "--timing-repeats", "1", "--batch-size", "8", "--pvit-gate-epochs", "1", "--apvit-epochs", "1",
            "--apvit-candidates", "2", "--train-limit", "64"]
    assert main(args) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:6] == ["method", "ratio", "top1", "top5", "gflops", "images_per_s"]
    assert len(rows) == 1 + 1 + 4 and rows[0]["method"] == "base"
    gated = next(r for r in rows if r["method"] == "p-vit" and float(r["ratio"]) == 0.0)  # gated, unpruned
    assert float(gated["achieved_ratio"]) == 0.0 and float(gated["gflops"]) == pytest.approx(float(rows[0]["gflops"]))
    base_gflops = float(rows[0]["gflops"])
    for r in rows[1:]:  # AP-ViT's count includes its batch padding and agents: on this tiny ViT it can exceed the base
        assert float(r["gflops"]) < base_gflops or r["method"] == "ap-vit" or float(r["ratio"]) == 0.0
    for name in ("results.md", "accuracy_vs_ratio.png", "accuracy_vs_throughput.png", "apvit_thresholds.csv"):
        assert (out / name).is_file()
    assert "CP-ViT top-1" in (out / "results.md").read_text()
    # a saved model evaluates to the accuracy the sweep recorded
    cp = next(r for r in rows if r["method"] == "cp-vit" and float(r["ratio"]) == 0.3)
    from nnlab.data import load_dataset
    from nnlab.prune.common import accuracy, eval_transform
    data = load_dataset("mnist-5k")
    acc = accuracy(load_pruned(out / "models" / "cp-vit-0.3"), data.test.random_subset(64, 0),
                   eval_transform(data, 28))
    assert acc.top1 == pytest.approx(float(cp["top1"]), abs=1e-6)
    assert main(["prune", "eval", "--model", str(out / "models" / "cp-vit-0.3"), "--data", "mnist-5k",
                 "--test-limit", "64"]) == 0
    assert main(["prune", "eval", "--model", str(out), "--data", "mnist-5k"]) == 2  # no pruned.json
    # resumable: a second run finds every row and adds none
    assert main(args) == 0
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_sweep_rejects_bad_input(tiny_run, tmp_path):
    assert main(["prune", "sweep", "--checkpoint", str(tiny_run), "--methods", "foo", "--out",
                 str(tmp_path)]) == 2
    assert main(["prune", "sweep", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    from nnlab.prune.sweep import PruneSweepConfig, run_prune_sweep
    with pytest.raises(ConfigError, match="ratios"):
        run_prune_sweep(PruneSweepConfig(checkpoint=str(tiny_run), out=str(tmp_path), ratios=[1.5]))


def test_a_sweep_of_another_base_model_is_refused(tiny_run, tmp_path):
    """Issue 16: rows of two base models never mix in one results.csv (keyed by the weights' SHA-256)."""
    from nnlab.engine.train import TrainConfig, train
    from nnlab.prune.sweep import PruneSweepConfig, run_prune_sweep

    other = tmp_path / "other"
    train(TrainConfig(model="vit-test", data="mnist-5k", epochs=1, max_steps=3, train_limit=256, test_limit=64,
                      optimizer="adamw", lr=1e-3, seed=1, progress=False), other)
    cfg = dict(out=str(tmp_path / "sweep"), methods=["tome"], ratios=[0.3], test_limit=32, calib_size=8,
               timing_repeats=1, batch_size=4, save_models=False)
    first = run_prune_sweep(PruneSweepConfig(checkpoint=str(tiny_run), **cfg))
    with pytest.raises(ConfigError, match="holds a sweep of another base model"):
        run_prune_sweep(PruneSweepConfig(checkpoint=str(other), **cfg))
    with pytest.raises(ConfigError, match=r"other settings \(test_limit\)"):
        run_prune_sweep(PruneSweepConfig(checkpoint=str(tiny_run), **{**cfg, "test_limit": 16}))
    again = run_prune_sweep(PruneSweepConfig(checkpoint=str(tiny_run), **cfg))  # the same model: resumes, adds nothing
    assert again.rows == first.rows


def test_the_sweep_loads_a_published_run_folder_as_it_is(tiny_run, tmp_path):
    import shutil

    import torch

    from nnlab.prune.sweep import load_base

    published = tmp_path / "base"  # what `nnlab publish` leaves: no checkpoint/, model.safetensors kept
    shutil.copytree(tiny_run, published, ignore=shutil.ignore_patterns("checkpoint", ".lock"))
    (vit, data), (ref, _) = load_base(published), load_base(tiny_run)
    assert len(data.test) == 1000  # the whole test split of mnist-5k, not the run's 64-image subset
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), ref.state_dict().values()))


def test_sweep_device_cuda_without_a_gpu_is_a_clear_error(tiny_run, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda is valid here")
    out = tmp_path / "s"
    assert main(["prune", "sweep", "--checkpoint", str(tiny_run), "--device", "cuda", "--out", str(out)]) == 2
    assert "no GPU is visible" in capsys.readouterr().err and not out.exists()


def test_the_sweep_runs_ap_vit_joint_with_its_unpruned_row(tiny_run, tmp_path):
    out = tmp_path / "joint"
    args = ["prune", "sweep", "--checkpoint", str(tiny_run), "--methods", "ap-vit-joint", "--ratios", "0.3",
            "--out", str(out), "--test-limit", "32", "--calib-size", "16", "--timing-repeats", "1",
            "--batch-size", "8", "--apvit-joint-train-limit", "64", "--apvit-hidden", "8", "--no-save-models"]
    assert main(args) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], float(r["ratio"])) for r in rows] == [("base", 0.0), ("ap-vit-joint", 0.0),
                                                                 ("ap-vit-joint", 0.3)]
    assert float(rows[1]["achieved_ratio"]) == pytest.approx(0.0, abs=0.02)  # the fine-tuned copy, unpruned
    assert "AP-ViT (joint, APT)" in (out / "results.md").read_text()
