"""Image folders with and without classes, celeba64, tar.gz input, the decoded cache, and errors."""
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from nnlab.data import load_dataset
from nnlab.data.cache import cache_dir
from nnlab.data.imagefolder import decode_image
from nnlab.errors import DataError


pytestmark = pytest.mark.usefixtures("isolated_cache")


def save(path, size=(8, 6), mode="RGB", value=None, seed=0):
    """An image of ``size`` (W, H); random pixels unless ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    rng = np.random.default_rng(seed)
    arr = np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 256, shape).astype(np.uint8)
    Image.fromarray(arr, mode).save(path)
    return arr


def test_flat_folder_fixed_split(tmp_path):
    for i in range(20):
        save(tmp_path / "faces" / f"{i:03d}.png", value=i)
    d = load_dataset("imagefolder", tmp_path / "faces")
    assert (len(d.train), len(d.test), d.shape, d.num_classes) == (18, 2, (3, 6, 8), 0)
    assert d.train.labels.eq(-1).all() and d.test.labels.eq(-1).all()
    assert d.test.images[:, 0, 0, 0].tolist() == [18, 19]  # last 10% by sorted name are test
    assert "last 10% by sorted file name is test" in d.description


def test_class_folders_split_per_class_and_grey(tmp_path):
    for c in ("cat", "dog"):
        for i in range(10):
            save(tmp_path / c / f"{i}.png", mode="L", seed=i)
    d = load_dataset("imagefolder", tmp_path)
    assert d.train.classes == ["cat", "dog"] and d.shape == (1, 6, 8)
    assert d.train.labels.tolist() == [0] * 9 + [1] * 9 and d.test.labels.tolist() == [0, 1]


def test_train_test_folders_and_mixed_grey_colour(tmp_path):
    save(tmp_path / "train" / "a" / "1.png", mode="L", value=7)
    save(tmp_path / "train" / "b" / "1.png")
    save(tmp_path / "test" / "b" / "2.png")
    d = load_dataset("imagefolder", tmp_path)
    assert (len(d.train), len(d.test), d.shape) == (2, 1, (3, 6, 8))
    assert d.test.labels.tolist() == [1] and d.train.images[0].eq(7).all()  # grey became RGB


def test_tar_gz_with_wrapper_folder_and_celeba64(tmp_path):
    for i in range(10):
        save(tmp_path / "src" / "celebA" / f"{i + 1:06d}.jpg", size=(40, 60), seed=i)
    archive = tmp_path / "celeba" / "faces.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "celebA", arcname="celebA")
    d = load_dataset("celeba64", archive.parent)  # the archive's parent folder
    assert (len(d.train), len(d.test), d.shape, d.num_classes) == (9, 1, (3, 64, 64), 0)
    small = load_dataset("celeba64", archive, image_size=16)
    assert small.shape == (3, 16, 16)
    img = Image.open(tmp_path / "src" / "celebA" / "000010.jpg").convert("RGB").crop((0, 10, 40, 50))
    want = np.asarray(img.resize((16, 16), Image.BICUBIC))
    assert torch.equal(small.test.images[0], torch.from_numpy(want.copy()).permute(2, 0, 1))


def test_decode_image_centre_crop_reference():
    """The centre crop keeps the middle square: a tall image with a marked middle band."""
    import io

    arr = np.zeros((30, 10), np.uint8)
    arr[10:20] = 200  # the centre 10x10 square
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    out = decode_image(buf.getvalue(), "x", image_size=10)
    assert out.shape == (10, 10, 1) and (out == 200).all()


def test_cache_is_used_and_invalidated(tmp_path):
    for i in range(10):
        save(tmp_path / "d" / f"{i}.png", value=i)
    first = load_dataset("imagefolder", tmp_path / "d")
    entries = list((cache_dir() / "decoded").glob("imagefolder-*.safetensors"))
    assert len(entries) == 1
    again = load_dataset("imagefolder", tmp_path / "d")
    assert torch.equal(again.train.images, first.train.images)
    time.sleep(0.01)
    save(tmp_path / "d" / "0.png", value=99)  # content changes: a new cache entry
    changed = load_dataset("imagefolder", tmp_path / "d")
    assert changed.train.images[0].eq(99).all()
    assert len(list((cache_dir() / "decoded").glob("imagefolder-*.safetensors"))) == 2
    uncached = load_dataset("imagefolder", tmp_path / "d", cache=False)
    assert torch.equal(uncached.train.images, changed.train.images)
    assert uncached.mean == pytest.approx(changed.mean)


def test_corrupt_cache_entry_is_rebuilt_and_cli_image_size(tmp_path, capsys):
    import json

    from nnlab.cli import main

    for i in range(4):
        save(tmp_path / "d" / f"{i}.png", size=(10, 12), value=10 * i)
    assert main(["data", "info", "imagefolder", "--data-dir", str(tmp_path / "d"), "--image-size", "5"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["train_size"], info["test_size"], info["shape"], info["num_classes"]) == (3, 1, [3, 5, 5], 0)
    (entry,) = (cache_dir() / "decoded").glob("imagefolder-*.safetensors")
    entry.write_bytes(b"garbage")
    d = load_dataset("imagefolder", tmp_path / "d", image_size=5)
    assert d.test.images.eq(30).all() and entry.stat().st_size > 100  # rebuilt and rewritten


def test_errors_name_the_file_and_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty is empty"):
        load_dataset("imagefolder", tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no image folder found in .*notes"):
        load_dataset("imagefolder", tmp_path / "notes")
    save(tmp_path / "mixed" / "a.png", size=(8, 6))
    save(tmp_path / "mixed" / "b.png", size=(9, 6))
    with pytest.raises(DataError, match=r"b\.png is 9x6 but .*a\.png is 8x6: mixed image sizes.*--image-size"):
        load_dataset("imagefolder", tmp_path / "mixed")
    assert load_dataset("imagefolder", tmp_path / "mixed", image_size=4).shape == (3, 4, 4)
    save(tmp_path / "deep" / "x.png")
    save(tmp_path / "deep" / "cls" / "sub" / "y.png")
    with pytest.raises(DataError, match=r"unknown image folder layout .*depths \(x\.png and cls/sub/y\.png\)"):
        load_dataset("imagefolder", tmp_path / "deep")
    save(tmp_path / "bad" / "a.png")
    (tmp_path / "bad" / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"b\.jpg: unreadable image"):
        load_dataset("imagefolder", tmp_path / "bad")


def test_unknown_test_class_and_split_mismatch(tmp_path):
    save(tmp_path / "u" / "train" / "cat" / "1.png")
    save(tmp_path / "u" / "test" / "cow" / "1.png")
    with pytest.raises(DataError, match="class folder 'cow' is in test/ but not in train/"):
        load_dataset("imagefolder", tmp_path / "u")
    save(tmp_path / "v" / "train" / "cat" / "1.png")
    save(tmp_path / "v" / "test" / "1.png")
    with pytest.raises(DataError, match="must both have class folders"):
        load_dataset("imagefolder", tmp_path / "v")


def test_truncated_archive(tmp_path):
    for i in range(5):
        save(tmp_path / "src" / f"{i}.png", seed=i)
    archive = tmp_path / "x.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src", arcname="imgs")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"x\.tar\.gz is not a readable tar archive"):
        load_dataset("imagefolder", archive)


def test_bad_image_size_option(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "b.png")
    with pytest.raises(DataError, match="image_size must be a positive integer"):
        load_dataset("celeba64", tmp_path, image_size=0)


@pytest.mark.slow
def test_real_celeba64(shared_data, user_cache):
    d = load_dataset("celeba64", shared_data / "celeba")
    assert (len(d.train), len(d.test), d.shape, d.num_classes) == (9000, 1000, (3, 64, 64), 0)
    assert d.train.images.float().mean() > 50  # real faces, not blank
