"""Bad input through the CLI, as a hostile but fair user gives it (issue 16): each case is one
command and the fragment its error must contain. Every case must end in exit code 2 with one line
on stderr (no traceback), and must create or change nothing outside what it was given."""
from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from nnlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished classifier run, a functa run, a DessiLBI run with a cut-short lbi.safetensors,
    a plain file, and an empty MNIST IDX set (0 images)."""
    root = tmp_path_factory.mktemp("inputs")
    fast = ["--epochs", "1", "--max-steps", "2", "--train-limit", "64", "--test-limit", "32", "--no-progress"]
    assert main(["train", "--out", str(root / "clf"), *fast]) == 0
    assert main(["functa", "train", "--preset", "tiny", "--data", "mnist-5k", "--steps", "2", "--out",
                 str(root / "functa"), "--no-progress"]) == 0
    assert main(["lbi", "train", "--out", str(root / "lbi"), *fast]) == 0
    lbi = root / "lbi" / "lbi.safetensors"
    lbi.write_bytes(lbi.read_bytes()[: lbi.stat().st_size // 2])
    (root / "file").write_text("not a folder\n")
    (root / "bad.tar.gz").write_text("not an archive\n")
    shutil.copytree(root / "functa", root / "functa_badcfg")
    (root / "functa_badcfg" / "config.yaml").write_text("model: [\n")  # an unclosed list
    shutil.copytree(root / "clf", root / "clf_badckpt")
    latest = root / "clf_badckpt" / "checkpoint" / "latest.json"
    latest.write_text(latest.read_text()[:5])  # cut short
    idx = root / "idx"
    idx.mkdir()
    for name, magic, dims in (("train-images-idx3-ubyte", 0x803, (0, 28, 28)), ("train-labels-idx1-ubyte", 0x801, (0,)),
                              ("t10k-images-idx3-ubyte", 0x803, (0, 28, 28)), ("t10k-labels-idx1-ubyte", 0x801, (0,))):
        (idx / name).write_bytes(struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims))
    big = root / "idx-big"  # train header dims whose product overflows 64 bits; a valid 1-image test split
    big.mkdir()
    for name, magic, dims, body in (("train-images-idx3-ubyte", 0x803, (2**31,) * 3, b""),
                                    ("train-labels-idx1-ubyte", 0x801, (2**31,), b""),
                                    ("t10k-images-idx3-ubyte", 0x803, (1, 28, 28), bytes(784)),
                                    ("t10k-labels-idx1-ubyte", 0x801, (1,), bytes(1))):
        (big / name).write_bytes(struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + body)
    return {"root": root, "clf": root / "clf", "functa": root / "functa", "lbi": root / "lbi",
            "functa_badcfg": root / "functa_badcfg", "clf_badckpt": root / "clf_badckpt",
            "file": root / "file", "idx": idx, "idx_big": big}


# (case id, argv with {root}/{clf}/... placeholders, expected fragment of the one-line error)
CASES = [
    ("train-out-is-a-file", ["train", "--out", "{file}", "--epochs", "1"], "is a file; give a folder path"),
    ("train-out-under-a-file", ["train", "--out", "{file}/run", "--epochs", "1"], "cannot be created: "),
    ("functa-train-out-is-a-file", ["functa", "train", "--preset", "tiny", "--data", "mnist-5k", "--out", "{file}"],
     "is a file; give a folder path"),
    ("functa-train-outer-lr-nan", ["functa", "train", "--preset", "tiny", "--data", "mnist-5k", "--outer-lr", "nan",
                                   "--out", "{root}/new1"], "--outer-lr must be a positive finite number"),
    ("functa-train-inner-steps-negative", ["functa", "train", "--preset", "tiny", "--data", "mnist-5k",
                                           "--inner-steps", "-1", "--out", "{root}/new2"], "--inner-steps must be >= 0"),
    ("functa-fit-out-is-a-folder", ["functa", "fit", "{functa}", "--data", "mnist-5k", "--split", "test", "--out",
                                    "{root}"], "is a folder; give a file path"),
    ("functa-fit-out-under-a-file", ["functa", "fit", "{functa}", "--data", "mnist-5k", "--split", "test", "--out",
                                     "{file}/fs.safetensors"], "cannot be created: "),
    ("functa-fit-on-a-classifier-run", ["functa", "fit", "{clf}", "--data", "mnist-5k", "--split", "test", "--out",
                                        "{root}/fs.safetensors"], "is not a functa run (its model is 'lenet5')"),
    ("prune-sweep-out-is-a-file", ["prune", "sweep", "--checkpoint", "{clf}", "--out", "{file}"],
     "is a file; give a folder path"),
    ("prune-sweep-of-a-non-vit", ["prune", "sweep", "--checkpoint", "{clf}", "--out", "{root}/sweep"], "not a ViT"),
    ("lbi-prune-cut-short-file", ["lbi", "prune", "{lbi}", "--layer", "conv3", "--out", "{root}/prune"],
     "lbi.safetensors is unreadable"),
    ("lbi-plot-cut-short-file", ["lbi", "plot", "{lbi}", "--out", "{root}/plots"], "lbi.safetensors is unreadable"),
    ("lbi-prune-missing-run", ["lbi", "prune", "{root}/nosuch", "--layer", "conv3", "--out", "{root}/prune2"],
     "nosuch does not exist"),
    ("train-bad-model-option", ["train", "--model-option", "bogus=1", "--out", "{root}/t1"],
     "model lenet5 has no option(s) bogus"),
    ("train-config-is-a-folder", ["train", "--config", "{root}", "--out", "{root}/t2"], "is a folder; pass a YAML file"),
    ("train-config-missing", ["train", "--config", "{root}/none.yaml", "--out", "{root}/t3"], "does not exist"),
    ("train-resume-changed-batch", ["train", "--out", "{clf}", "--resume", "--epochs", "1", "--max-steps", "2",
                                    "--train-limit", "64", "--test-limit", "32", "--batch-size", "16"],
     "only lr, grad_clip, schedule"),
    ("train-unknown-model", ["train", "--model", "resnet9000", "--out", "{root}/t4"], "unknown model 'resnet9000'"),
    ("data-mnist-zero-images", ["data", "info", "mnist", "--data-dir", "{idx}"], "the header says 0 images"),
    ("landscape-eta-range", ["landscape", "run", "--data", "mnist-5k", "--eta-range", "0.5", "--out", "{root}/l1"],
     "--eta-range takes LOW,HIGH"),
    ("recheck-not-a-run", ["recheck", "{root}", "--out", "{root}/rc"], "has no config.yaml and metrics.jsonl"),
    ("lbi-train-grad-clip-is-accepted-negative", ["lbi", "train", "--grad-clip", "-1", "--out", "{root}/l2"],
     "grad_clip must be >= 0"),
    ("data-mnist-overflowing-dims", ["data", "info", "mnist", "--data-dir", "{idx_big}"],
     "2147483648 x 2147483648 x 2147483648 = 9903520314283042199192993792 bytes"),
    ("functa-train-unknown-data", ["functa", "train", "--preset", "tiny", "--data", "nosuch", "--out", "{root}/f1"],
     "unknown data set 'nosuch'"),
    ("functa-train-missing-data-dir", ["functa", "train", "--preset", "tiny", "--data", "cifar10", "--data-dir",
                                       "{root}/nosuch", "--out", "{root}/f2"], "nosuch does not exist; pass --data-dir"),
    ("functa-reconstruct-on-a-classifier-run", ["functa", "reconstruct", "{clf}", "--data", "mnist-5k", "--out",
                                                "{root}/r1"], "is not a functa run"),
    ("functa-classify-corrupt-functaset", ["functa", "classify", "{file}", "{file}", "--out", "{root}/c1"],
     "is unreadable"),
    ("functa-classify-missing-functaset", ["functa", "classify", "{root}/no.safetensors", "{root}/no.safetensors",
                                           "--out", "{root}/c2"], "does not exist; make it with 'nnlab functa fit'"),
    ("functa-fit-bad-shard", ["functa", "fit", "{functa}", "--data", "mnist-5k", "--shard", "3/2", "--out",
                              "{root}/fs2.safetensors"], "0 <= i < n, got 3/2"),
    ("functa-reconstruct-negative-count", ["functa", "reconstruct", "{functa}", "--data", "mnist-5k", "--count", "-2",
                                           "--out", "{root}/r2"], "--count) must be >= 1 image, got -2"),
    ("functa-train-negative-time-limit", ["functa", "train", "--preset", "tiny", "--data", "mnist-5k", "--time-limit",
                                          "-1", "--out", "{root}/f3"], "error: --time-limit must be >= 0, got -1.0"),
    ("functa-train-unknown-schedule", ["functa", "train", "--preset", "tiny", "--data", "mnist-5k", "--schedule",
                                       "linear", "--out", "{root}/f4"], "error: --schedule must be constant or cosine"),
    ("functa-fit-chunk-size-0", ["functa", "fit", "{functa}", "--data", "mnist-5k", "--chunk-size", "0", "--out",
                                 "{root}/fs3.safetensors"], "--chunk-size) must be >= 1 image, got 0"),
    ("functa-fit-negative-inner-steps", ["functa", "fit", "{functa}", "--data", "mnist-5k", "--inner-steps", "-1",
                                         "--out", "{root}/fs4.safetensors"], "--inner-steps) must be >= 0, got -1"),
    ("functa-sample-missing-generator", ["functa", "sample", "{root}/nosuch", "--out", "{root}/x.png"],
     "train a generator with 'nnlab functa generate'"),
    ("publish-into-a-file", ["publish", "{clf}", "{file}"], "error: DEST "),
    ("publish-under-a-file", ["publish", "{clf}", "{file}/sub"], "cannot be created"),
    ("prune-sweep-negative-l1", ["prune", "sweep", "--checkpoint", "{clf}", "--pvit-l1", "-1", "--out", "{root}/s2"],
     "--pvit-l1-weight must be a finite number >= 0"),
    ("prune-sweep-no-agent-candidates", ["prune", "sweep", "--checkpoint", "{clf}", "--apvit-candidates", "0",
                                         "--out", "{root}/s3"], "--apvit-candidates must be >= 1"),
    ("prune-sweep-ratio-one", ["prune", "sweep", "--checkpoint", "{clf}", "--ratios", "1", "--out", "{root}/s4"],
     "ratios must be in [0, 1)"),
    ("prune-eval-not-a-pruned-model", ["prune", "eval", "--model", "{clf}", "--data", "mnist-5k"], "no pruned.json"),
    ("lbi-prune-run-without-gamma", ["lbi", "prune", "{clf}", "--out", "{root}/p3"], "has no lbi.safetensors"),
    ("lbi-train-lbi-options-for-sgd", ["lbi", "train", "--optimizer", "sgd", "--mu", "5", "--out", "{root}/l3"],
     "apply to slbi or slbi-adam"),
    ("lbi-train-negative-kappa", ["lbi", "train", "--kappa", "-1", "--out", "{root}/l4"], "invalid kappa -1.0"),
    ("train-config-not-a-mapping", ["train", "--config", "{file}", "--out", "{root}/t5"], "must hold a mapping"),
    ("functa-reconstruct-corrupt-config", ["functa", "reconstruct", "{functa_badcfg}", "--data", "mnist-5k", "--out",
                                           "{root}/r2"], "config.yaml is not valid YAML"),
    ("train-resume-corrupt-checkpoint-index", ["train", "--out", "{clf_badckpt}", "--resume", "--epochs", "1",
                                               "--max-steps", "2", "--train-limit", "64", "--test-limit", "32"],
     "latest.json is not valid JSON"),
    ("functa-train-negative-w0", ["functa", "train", "--preset", "tiny", "--data", "mnist-5k", "--w0", "-1", "--out",
                                  "{root}/f3"], "w0 (the SIREN frequency) must be a positive finite number"),
    ("functa-train-zero-latent-hidden", ["functa", "train", "--preset", "tiny", "--data", "mnist-5k",
                                         "--latent-hidden", "0", "--out", "{root}/f4"], "latent_hidden widths"),
    ("functa-train-negative-inner-lr", ["functa", "train", "--preset", "tiny", "--data", "mnist-5k", "--no-meta-sgd",
                                        "--inner-lr", "-1", "--out", "{root}/f5"], "inner_lr must be a positive"),
    ("lbi-train-negative-sample", ["lbi", "train", "--sample", "-3", "--out", "{root}/l5"], "must be an integer >= 0"),
    ("prune-sweep-threshold-above-one", ["prune", "sweep", "--checkpoint", "{clf}", "--apvit-thresholds", "0.5,2",
                                         "--out", "{root}/s5"], "--apvit-thresholds must be probabilities in [0, 1]"),
    ("functa-reconstruct-size-zero", ["functa", "reconstruct", "{functa}", "--data", "mnist-5k", "--size", "0",
                                      "--out", "{root}/r3"], "render size must be a positive number of pixels"),
    ("functa-classify-zero-epochs", ["functa", "classify", "{file}", "{file}", "--epochs", "0", "--out", "{root}/c3"],
     "--epochs must be an integer >= 1, got 0"),
    ("functa-classify-zero-batch", ["functa", "classify", "{file}", "{file}", "--batch-size", "0", "--out",
                                    "{root}/c4"], "--batch-size must be an integer >= 1, got 0"),
    ("functa-classify-nan-lr", ["functa", "classify", "{file}", "{file}", "--lr", "nan", "--out", "{root}/c5"],
     "--lr must be a positive finite number, got nan"),
    ("reproduce-data-dir-without-the-data", ["reproduce", "--preset", "cpu", "--data-dir", "{idx}", "--out",
                                             "{root}/rp1"], "lacks celeba/ (celeba64), cifar10/ (cifar10), mnist/ (mnist)"),
    ("functa-plot-sweep-of-a-classifier-run", ["functa", "plot", "--sweep", "{clf}", "--out", "{root}/p1"],
     "is not a finished 'nnlab functa train' run"),
    ("functa-plot-missing-classify-run", ["functa", "plot", "--classify-run", "{root}/nosuch", "--out", "{root}/p2"],
     "metrics.jsonl does not exist; pass a run folder"),
    ("landscape-plot-of-a-functa-run", ["landscape", "plot", "{functa}", "--out", "{root}/p3"],
     "is not a landscape sweep's log"),
    ("lbi-plot-of-a-functa-run", ["lbi", "plot", "{functa}", "--out", "{root}/p4"], "logs no finished epoch"),
    ("functa-train-over-a-run-without-resume", ["functa", "train", "--preset", "tiny", "--data", "mnist-5k", "--steps",
                                                "2", "--out", "{functa}"], "already holds a functa run with a checkpoint; pass --resume"),
    ("landscape-model-without-bn-switch", ["landscape", "run", "--data", "mnist-5k", "--model", "lenet5", "--out",
                                           "{root}/l6"], "has no BatchNorm switch"),
    ("data-corrupt-archive", ["data", "info", "cifar10", "--data-dir", "{root}/bad.tar.gz"],
     "is not a readable tar archive"),  # tarfile's message spans lines: still one line
    ("recheck-a-functa-run", ["recheck", "{functa}", "--out", "{root}/rc3"], "is not a run of nnlab train"),
    ("train-unknown-data-option", ["train", "--data-option", "foo=1", "--out", "{root}/t6"],
     "data set mnist-5k has no option(s) foo; valid options: cache, download"),
    ("train-vit-without-blocks", ["train", "--model", "vit-test", "--model-option", "depth=0", "--out", "{root}/t7"],
     "ViT depth must be an integer >= 1, got 0"),
    ("recheck-zero-steps", ["recheck", "{clf}", "--max-steps", "0", "--out", "{root}/rc2"], "expected a number >= 1"),
]


def _snapshot(root: Path) -> dict[str, float]:
    """Every path's mtime, but for the folder locks' ``.lock`` files: taking the lock records the holder."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.name != ".lock"}


@pytest.mark.parametrize("argv, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_one_line_error_that_changes_nothing(runs, argv, fragment, capsys):
    argv = [a.format(**{k: str(v) for k, v in runs.items()}) for a in argv]
    before = _snapshot(runs["root"])
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors (unknown choices) exit through the parser
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    assert _snapshot(runs["root"]) == before  # nothing created, nothing changed


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_parent_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["train", "--out", str(ro / "run"), "--epochs", "1"]) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)
