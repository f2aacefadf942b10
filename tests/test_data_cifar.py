"""CIFAR-10: python batches via the restricted unpickler, image-folder form, real data."""
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from nnlab.data import load_dataset
from nnlab.data.cifar import BATCHES, CIFAR10_CLASSES, safe_unpickle
from nnlab.errors import DataError


pytestmark = pytest.mark.usefixtures("isolated_cache")


def make_batches(folder, n=4, protocol=2, seed=0):
    """Official-format batches (dict with bytes keys) of ``n`` images each; returns them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for b in BATCHES:
        batch = {b"batch_label": b.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        (folder / b).write_bytes(pickle.dumps(batch, protocol=protocol))
        written[b] = batch
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_cases_per_batch": n}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return written


@pytest.mark.parametrize("protocol", [2, 5])
def test_python_batches(tmp_path, protocol):
    written = make_batches(tmp_path / "cifar-10-batches-py", protocol=protocol)
    d = load_dataset("cifar10", tmp_path)  # the batches folder's parent
    assert d.train.images.shape == (20, 3, 32, 32) and d.test.images.shape == (4, 3, 32, 32)
    want = torch.from_numpy(written["data_batch_2"][b"data"].reshape(-1, 3, 32, 32))
    assert torch.equal(d.train.images[4:8], want)
    assert d.test.labels.tolist() == written["test_batch"][b"labels"]
    assert d.train.classes == CIFAR10_CLASSES and d.num_classes == 10


def test_python_batches_in_official_tar_gz(tmp_path):
    written = make_batches(tmp_path / "src" / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    d = load_dataset("cifar10", archive)
    assert torch.equal(d.test.images.reshape(4, -1), torch.from_numpy(written["test_batch"][b"data"]))


class _Py2Dtype:
    def __reduce__(self):
        return (np.dtype, (b"u1", 0, 1), (3, b"|", None, None, None, -1, -1, 0))


class _Py2Array:
    """Reduces the way NumPy arrays did in the Python 2 pickles of the official batches."""

    def __init__(self, raw):
        self.raw = raw

    def __reduce__(self):
        try:
            from numpy._core.multiarray import _reconstruct  # NumPy 2
        except ImportError:
            from numpy.core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"), (1, (2, 3072), _Py2Dtype(), False, self.raw))


def test_python2_style_pickle_of_the_official_files():
    raw = np.arange(2 * 3072, dtype=np.uint8).tobytes()
    blob = pickle.dumps({b"data": _Py2Array(raw), b"labels": [1, 2]}, protocol=2)
    blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # the NumPy 1 name
    batch = safe_unpickle(blob, "x")
    assert batch[b"labels"] == [1, 2] and batch[b"data"].tobytes() == raw
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (2, 3072)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    make_batches(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(DataError, match=r"data_batch_3: refused to unpickle \(forbidden global (posix|os)\.system"):
        load_dataset("cifar10", tmp_path)
    for payload in (pickle.dumps(np.array([object()], dtype=object)),
                    pickle.dumps(Evil, protocol=2),
                    b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R."):
        with pytest.raises(DataError, match="refused to unpickle"):
            safe_unpickle(payload, "x")


def test_corrupt_batches(tmp_path):
    written = make_batches(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(written["test_batch"], protocol=2)[:-40])
    with pytest.raises(DataError, match="test_batch: truncated or corrupt pickle"):
        load_dataset("cifar10", tmp_path)
    bad = {**written["test_batch"], b"labels": [0, 1]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match="4 images but labels of shape"):
        load_dataset("cifar10", tmp_path)


def make_folder(root, per_class=2, size=32, ext="png", classes=CIFAR10_CLASSES, seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i:04d}.{ext}")


def test_image_folder_form_and_cache(tmp_path):
    make_folder(tmp_path / "cifar")
    d = load_dataset("cifar10", tmp_path / "cifar")
    assert d.train.images.shape == (20, 3, 32, 32) and d.test.images.shape == (20, 3, 32, 32)
    assert d.train.classes == CIFAR10_CLASSES and d.train.labels.tolist() == [i // 2 for i in range(20)]
    img = np.array(Image.open(tmp_path / "cifar" / "test" / "cat" / "0001.png"))
    assert torch.equal(d.test.images[7], torch.from_numpy(img).permute(2, 0, 1))  # PNG is lossless
    assert len(list((tmp_path / "cache" / "decoded").glob("cifar10-*.safetensors"))) == 1
    again = load_dataset("cifar10", tmp_path / "cifar")
    assert torch.equal(again.train.images, d.train.images) and again.mean == pytest.approx(d.mean)


def test_device_data_keeps_the_first_images_of_each_class_in_a_loadable_archive(tmp_path):
    """benchmarks/device_data.py (the GPU check's data): N train and M test images per class from a
    CIFAR-10 archive, byte for byte, in a tar.gz that nnlab's cifar10 loader reads as it is."""
    import importlib.util
    from pathlib import Path

    make_folder(tmp_path / "cifar", per_class=3)
    full = tmp_path / "full.tar.gz"
    with tarfile.open(full, "w:gz") as tar:
        tar.add(tmp_path / "cifar" / "train", "train")
        tar.add(tmp_path / "cifar" / "test", "test")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "device_data.py"
    spec = importlib.util.spec_from_file_location("device_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    small = tmp_path / "small.tar.gz"
    assert module.main([str(full), str(small), "--train", "2", "--test", "1"]) == 0
    d = load_dataset("cifar10", small)
    assert d.train.images.shape == (20, 3, 32, 32) and d.test.images.shape == (10, 3, 32, 32)
    assert sorted(d.test.labels.tolist()) == list(range(10))
    with tarfile.open(small) as tar:
        names = [n for n in tar.getnames() if n.startswith("test/cat/")]
        assert len(names) == 1 and tar.extractfile(names[0]).read() == (tmp_path / "cifar" / names[0]).read_bytes()
    assert module.main([str(tmp_path / "missing.tar.gz"), str(small)]) == 2


def test_image_folder_wrong_class_count_or_size(tmp_path):
    make_folder(tmp_path / "a", classes=["cat", "dog"], per_class=1)
    with pytest.raises(DataError, match="needs 10 class folders in train/, found 2"):
        load_dataset("cifar10", tmp_path / "a")
    make_folder(tmp_path / "b", size=16, per_class=1)
    with pytest.raises(DataError, match="CIFAR-10 images are 3x32x32"):
        load_dataset("cifar10", tmp_path / "b")


@pytest.mark.slow
def test_real_cifar10(shared_data, user_cache):
    d = load_dataset("cifar10", shared_data / "cifar10")
    assert (len(d.train), len(d.test), d.shape, d.num_classes) == (50000, 10000, (3, 32, 32), 10)
    assert torch.bincount(d.train.labels).tolist() == [5000] * 10
    assert d.train.classes == CIFAR10_CLASSES
    assert d.mean == pytest.approx((0.491, 0.482, 0.447), abs=0.01)
