"""MNIST IDX loading: gz and raw files, folder / tar.gz / parent, and every corruption check."""
import gzip
import json
import struct
import tarfile

import numpy as np
import pytest
import torch

from nnlab.cli import main
from nnlab.data import load_dataset
from nnlab.data.base import channel_stats
from nnlab.data.cache import stats_chunked
from nnlab.data.idx import parse_idx
from nnlab.errors import DataError


pytestmark = pytest.mark.usefixtures("isolated_cache")


def idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def make_mnist(folder, n_train=12, n_test=5, gz=True, seed=0):
    """Write the four IDX files; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_gz_and_raw_idx(tmp_path, gz):
    arrays = make_mnist(tmp_path / "mnist", gz=gz)
    d = load_dataset("mnist", tmp_path / "mnist")
    assert d.train.images.shape == (12, 1, 28, 28) and d.test.images.shape == (5, 1, 28, 28)
    assert torch.equal(d.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]).byte())
    assert torch.equal(d.test.labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    assert d.num_classes == 10 and d.train.labels.dtype == torch.int64


def test_mnist_from_tar_gz_and_from_parent(tmp_path):
    arrays = make_mnist(tmp_path / "src" / "mnist")
    archive = tmp_path / "holder" / "mnist.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "mnist", arcname="mnist")
    want = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).byte()
    for path in (archive, archive.parent, tmp_path / "src"):  # archive, its parent, folder's parent
        d = load_dataset("mnist", path)
        assert torch.equal(d.test.images[:, 0], want), path


def test_wrong_magic_names_file(tmp_path):
    make_mnist(tmp_path)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 28, 28)))))  # an image file as labels
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: wrong magic number 0x00000803"):
        load_dataset("mnist", tmp_path)


def test_truncated_idx_and_truncated_gzip(tmp_path):
    arrays = make_mnist(tmp_path, gz=False)
    raw = idx_bytes(arrays["train-images-idx3-ubyte"])
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated.*12 x 28 x 28"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:-50])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: the gzip stream is truncated"):
        load_dataset("mnist", tmp_path)


def test_count_mismatch_size_and_label_range(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4))))
    with pytest.raises(DataError, match="5 images but .*4 labels"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(5, 12))))
    with pytest.raises(DataError, match="label 12 is out of range"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((5, 32, 32)))))
    with pytest.raises(DataError, match="32x32, MNIST images are 28x28"):
        load_dataset("mnist", tmp_path)


def test_missing_files_and_missing_folder(tmp_path):
    make_mnist(tmp_path / "m")
    (tmp_path / "m" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no MNIST found in .*t10k-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path / "m")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(DataError, match="pass --data-dir .* or --download"):
        load_dataset("mnist")  # empty cache folder


def test_parse_idx_short_header():
    with pytest.raises(DataError, match="no header"):
        parse_idx(b"\x00\x00", "f", 1)
    with pytest.raises(DataError, match="has trailing bytes"):
        parse_idx(idx_bytes(np.zeros(3)) + b"x", "f", 1)


def test_chunked_stats_agree_with_reference():
    images = torch.randint(0, 256, (37, 3, 5, 4), dtype=torch.uint8)
    mean, std = stats_chunked(images, chunk=8)
    ref_mean, ref_std = channel_stats(images)
    assert np.allclose(mean, ref_mean, atol=1e-6) and np.allclose(std, ref_std, atol=1e-6)


def test_cli_data_info_mnist(tmp_path, capsys):
    make_mnist(tmp_path)
    assert main(["data", "info", "mnist", "--data-dir", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["train_size"], info["test_size"], info["shape"], info["num_classes"]) == (12, 5, [1, 28, 28], 10)
    assert main(["data", "info", "mnist", "--data-dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_data_list(capsys):
    assert main(["data", "list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "mnist" in names and "mnist-5k" in names


def test_real_mnist(shared_data):
    d = load_dataset("mnist", shared_data / "mnist")
    assert (len(d.train), len(d.test), d.shape, d.num_classes) == (60000, 10000, (1, 28, 28), 10)
    assert torch.bincount(d.test.labels).tolist()[:2] == [980, 1135]  # official test class counts
    assert abs(d.mean[0] - 0.1307) < 1e-3 and abs(d.std[0] - 0.3081) < 1e-3
