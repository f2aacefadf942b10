"""The pruning sweep end to end on a tiny trained ViT (mnist-5k), through the CLI."""
import csv

import pytest
import torch

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


def test_sweep_cli_writes_results_and_models(tiny_run, tmp_path, capsys):
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
    from PIL import Image  # 3-channel images of 2 classes: another data set than the model's
    for c in "ab":
        (tmp_path / "rgb" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (28, 28), (40 * i, 90, 200)).save(tmp_path / "rgb" / c / f"{i}.png")
    capsys.readouterr()
    assert main(["prune", "eval", "--model", str(out / "models" / "cp-vit-0.3"), "--data", "imagefolder",
                 "--data-dir", str(tmp_path / "rgb")]) == 2
    assert "takes 1-channel images of 10 classes" in capsys.readouterr().err
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


@pytest.mark.parametrize("method, flags, fragment", [
    ("p-vit", ["--pvit-gate-lr", "1e12", "--pvit-gate-gate-lr", "1e12"], "lower --pvit-gate-lr"),
    ("p-vit", ["--pvit-finetune-epochs", "1", "--pvit-finetune-lr", "1e12"], "--pvit-finetune-lr"),
    ("ap-vit", ["--apvit-lr", "1e12"], "lower --apvit-lr"),
    ("ap-vit-joint", ["--apvit-joint-lr", "1e12", "--apvit-lr", "1e12"], "lower --apvit-joint-lr")])
def test_a_diverged_method_training_is_a_one_line_error_not_a_row(tiny_run, tmp_path, capsys, method, flags,
                                                                   fragment):
    """A training inside the sweep that blows up (NaN loss, NaN weights, or NaN logits at evaluation)
    stops the sweep with the flag to lower, instead of writing rows of a broken model."""
    out = tmp_path / "sweep"
    assert main(["prune", "sweep", "--checkpoint", str(tiny_run), "--methods", method, "--ratios", "0.5",
                 "--test-limit", "32", "--calib-size", "16", "--timing-repeats", "1", "--batch-size", "8",
                 "--pvit-train-limit", "64", "--apvit-joint-train-limit", "64", "--no-save-models", *flags,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and fragment in err and err.count("\n") == 1, err
    rows = (out / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["base"]  # no row of the diverged method


def test_a_base_trained_with_patch_dropout_is_pruned_with_every_token(tmp_path):
    """Patch dropout is the base's training regulariser only: load_base turns it off, so AP-ViT's joint
    training (the model in training mode under the agents' masks) sees all tokens and runs."""
    from nnlab.engine.train import TrainConfig, train
    from nnlab.prune.sweep import load_base

    run = tmp_path / "run"
    train(TrainConfig(model="vit-test", model_options={"patch_dropout": 0.5}, data="mnist-5k", epochs=1,
                      max_steps=2, train_limit=64, test_limit=32, optimizer="adamw", progress=False), run)
    vit, _ = load_base(run)
    assert vit.config.patch_dropout == 0.0
    x = torch.randn(2, 1, 28, 28)
    assert vit.train().embed(x).shape[1] == 1 + vit.config.num_patches
    out = tmp_path / "joint"
    args = ["prune", "sweep", "--checkpoint", str(run), "--methods", "ap-vit-joint", "--ratios", "0.3",
            "--out", str(out), "--test-limit", "16", "--calib-size", "8", "--timing-repeats", "1",
            "--batch-size", "8", "--apvit-joint-train-limit", "32", "--apvit-hidden", "8", "--no-save-models"]
    assert main(args) == 0


def _states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_resumed_sweep_reuses_what_it_trained_instead_of_training_again(tiny_run, tmp_path, monkeypatch):
    """P-ViT's gated model, AP-ViT's agents and APT's joint copy are trained once per sweep folder and
    kept in OUT/prepared/: a sweep killed after training them resumes with exactly those weights."""
    import shutil

    from nnlab.errors import CheckpointError
    from nnlab.prune import apt
    from nnlab.prune import methods as M
    from nnlab.prune.sweep import PruneSweepConfig, run_prune_sweep

    trained, used = {}, {}  # what the first sweep trained; what the second one built its rows from

    def spy(store, key, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            store.setdefault(key, (out, args))
            return out
        return wrapped
    monkeypatch.setattr(M, "train_gates", spy(trained, "gates", M.train_gates))
    monkeypatch.setattr(M, "train_agents", spy(trained, "agents", M.train_agents))
    monkeypatch.setattr(apt, "train_jointly", spy(trained, "joint", apt.train_jointly))
    cfg = dict(checkpoint=str(tiny_run), methods=["p-vit", "ap-vit", "ap-vit-joint"], ratios=[0.3], test_limit=32,
               calib_size=16, timing_repeats=1, batch_size=4, save_models=False,
               pvit=M.PViTOptions(gate_epochs=1, train_limit=64),
               apvit=M.APViTOptions(epochs=1, candidates=2, hidden=8, joint_train_limit=64))
    first = run_prune_sweep(PruneSweepConfig(out=str(tmp_path / "a"), **cfg))
    names = sorted(p.name for p in (tmp_path / "a" / "prepared").iterdir())
    assert names == ["apvit-agents.safetensors", "apvit-joint.safetensors", "pvit-gates.safetensors"]

    # the same folder without its rows (as if killed right after training): nothing may train again
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("results.csv", ".lock"))

    def no_training(*_a, **_k):
        raise AssertionError("trained again")
    for mod, name in ((M, "train_gates"), (M, "train_agents"), (apt, "train_jointly")):
        monkeypatch.setattr(mod, name, no_training)
    for name in ("build_pvit", "build_apvit"):
        monkeypatch.setattr(M, name, lambda *a, _f=getattr(M, name), _n=name, **k: used.setdefault(_n, []).append(a)
                            or _f(*a, **k))
    again = run_prune_sweep(PruneSweepConfig(out=str(tmp_path / "b"), **cfg))
    (gated, gates), _ = trained["gates"]
    assert all(_states_equal(a[0], gated) and _states_equal(a[1], gates) for a in used["build_pvit"])
    (joint_model, joint_agents, _), _ = trained["joint"]
    joint_0, frozen, joint_3 = used["build_apvit"]  # rows in order: ap-vit-joint 0.0, ap-vit 0.3, ap-vit-joint 0.3
    assert all(_states_equal(a[0], joint_model) and _states_equal(a[1], joint_agents) for a in (joint_0, joint_3))
    assert _states_equal(frozen[1], trained["agents"][0][0])
    keep = ("method", "ratio", "top1", "top5", "gflops", "achieved_ratio")
    assert [{k: r[k] for k in keep} for r in again.rows] == [{k: r[k] for k in keep} for r in first.rows]

    (tmp_path / "b" / "results.csv").unlink()
    (tmp_path / "b" / "prepared" / "pvit-gates.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="pvit-gates.safetensors is unreadable.*delete it"):
        run_prune_sweep(PruneSweepConfig(out=str(tmp_path / "b"), **cfg))
