"""Image folders (``imagefolder``, ``celeba64``, and CIFAR-10 as JPEG/PNG folders).

Layouts below the root (a single wrapping folder, e.g. ``celebA/``, is looked through):

    root/*.jpg                        no classes: labels -1, fixed split (below)
    root/<class>/*.jpg                classes = sorted folder names, fixed split per class
    root/{train,test}/*.jpg           the given split, no classes (``val`` works for ``test``)
    root/{train,test}/<class>/*.jpg   the given split with classes (test classes must be in train)

The fixed split, when the folders give none: sort the file names (per class when there are
classes); the last 10% (at least one file of any group of two or more) are test, the rest train.
Anything else (images at mixed depths, a class folder inside ``test`` that ``train`` lacks) is a
DataError naming an offending file. Images are decoded once (with a progress bar) into uint8
tensors and cached (see :mod:`nnlab.data.cache`); grey images stay 1-channel unless the set mixes
grey and colour, then all are RGB. Without ``image_size`` all images must share one size; with it,
each is centre-cropped to a square and resized to ``image_size`` x ``image_size`` (bicubic).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nnlab.data.base import DatasetSplits, ImageSet
from nnlab.data.cache import cached, stats_chunked
from nnlab.data.source import Source
from nnlab.errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
TEST_FRACTION = 0.1
SPLIT_TRAIN, SPLIT_TEST = "train", ("test", "val", "valid", "validation")
LAYOUTS = ("root/*.jpg (no classes), root/<class>/*.jpg, or root/{train,test}/[<class>/]*.jpg "
           "(PNG, JPEG, BMP, GIF, WebP, PPM/PGM or TIFF files)")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def common_dir(names: list[str]) -> str:
    """The longest folder prefix ('' or 'a/b/') shared by all ``names``."""
    prefix = os.path.commonprefix(names)
    return prefix[:prefix.rfind("/") + 1]


def accept_images(names: list[str]) -> str | None:
    """Root prefix of an image folder: the common folder of all image files (None if none)."""
    images = [n for n in names if is_image(n)]
    return common_dir(images) if images else None


@dataclass
class Layout:
    """Which files are train and test. ``train``/``test``: (name, label) pairs, label -1 when
    there are no classes; ``classes``: class names indexed by label; ``split``: how it was made."""

    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    classes: list[str]
    split: str


def _fixed_split(names: list[str]) -> tuple[list[str], list[str]]:
    names = sorted(names)
    n_test = max(1, int(len(names) * TEST_FRACTION)) if len(names) >= 2 else 0
    return names[:len(names) - n_test], names[len(names) - n_test:]


def _group(names: list[str], source: Source, where: str) -> tuple[dict[str, list[str]], bool]:
    """Names below ``where`` grouped by class folder; (groups, has_classes). Mixed depths raise."""
    depths = {n.count("/") for n in names}
    if depths == {0}:
        return {"": names}, False
    if depths == {1}:
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(n.split("/")[0], []).append(n)
        return groups, True
    flat = next((n for n in names if n.count("/") == min(depths)), names[0])
    deep = next((n for n in names if n.count("/") == max(depths)), names[-1])
    raise DataError(f"unknown image folder layout in {source.describe(where)}: images at different "
                    f"depths ({flat} and {deep}); expected {LAYOUTS}; move the files accordingly")


def _split_dirs(names: list[str]) -> tuple[str, str] | None:
    tops = {n.split("/")[0] for n in names if "/" in n}
    if any("/" not in n for n in names) or SPLIT_TRAIN not in tops:
        return None
    test = next((t for t in SPLIT_TEST if t in tops), None)
    return None if test is None or not tops <= {SPLIT_TRAIN, *SPLIT_TEST} else (SPLIT_TRAIN, test)


def parse_layout(source: Source, names: list[str]) -> Layout:
    """Train/test files and classes of the image files ``names`` (relative to the root)."""
    dirs = _split_dirs(names)
    if dirs is not None:
        return _given_split(source, names, dirs)
    groups, has_classes = _group(names, source, "")
    classes = sorted(groups) if has_classes else []
    train, test = [], []
    for label, key in enumerate(sorted(groups)):
        tr, te = _fixed_split(groups[key])
        lab = label if has_classes else -1
        train += [(n, lab) for n in tr]
        test += [(n, lab) for n in te]
    how = "last 10% by sorted file name" + (" per class" if has_classes else "") + " is test"
    return Layout(train, test, classes, how)


def _given_split(source: Source, names: list[str], dirs: tuple[str, str]) -> Layout:
    parts = {}
    for d in dirs:
        inner = [n[len(d) + 1:] for n in names if n.startswith(d + "/")]
        parts[d] = _group(inner, source, d + "/")
    (tr_groups, tr_cls), (te_groups, te_cls) = parts[dirs[0]], parts[dirs[1]]
    if tr_cls != te_cls:
        raise DataError(f"unknown image folder layout in {source.describe()}: {dirs[0]}/ and "
                        f"{dirs[1]}/ must both have class folders or both hold images directly")
    classes = sorted(tr_groups) if tr_cls else []
    unknown = sorted(set(te_groups) - set(tr_groups)) if tr_cls else []
    if unknown:
        raise DataError(f"{source.describe(dirs[1] + '/' + unknown[0])}: class folder {unknown[0]!r} "
                        f"is in {dirs[1]}/ but not in {dirs[0]}/; rename or remove it")
    index = {c: i for i, c in enumerate(classes)}

    def pairs(d, groups):
        return [(f"{d}/{n}", index[k] if tr_cls else -1) for k in sorted(groups) for n in sorted(groups[k])]

    return Layout(pairs(dirs[0], tr_groups), pairs(dirs[1], te_groups), classes,
                  f"given by the folders {dirs[0]}/ and {dirs[1]}/")


def decode_image(data: bytes, where: str, image_size: int | None) -> np.ndarray:
    """One image file's bytes -> (H, W, C) uint8, C = 1 (grey) or 3 (RGB); with ``image_size``
    centre-cropped to a square and resized to (image_size, image_size)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L" if im.mode in GREY_MODES else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where}: unreadable image ({exc}); replace or delete the file") from None
    if image_size is not None:
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((image_size, image_size), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


class _Stack:
    """Decoded (H, W, C) images placed by index into one (N, C, H, W) array, checking sizes."""

    def __init__(self, n: int):
        self.n, self.array, self.first = n, None, ""

    def put(self, i: int, img: np.ndarray, where: str) -> None:
        h, w, c = img.shape
        if self.array is None:
            self.array, self.first = np.zeros((self.n, c, h, w), np.uint8), where
        _, have_c, have_h, have_w = self.array.shape
        if (h, w) != (have_h, have_w):
            raise DataError(
                f"{where} is {w}x{h} but {self.first} is {have_w}x{have_h}: mixed image sizes; "
                f"resize the files to one size, or pass image_size=N (nnlab train: --data-option "
                f"image_size=N; nnlab data info: --image-size N) to centre-crop and resize them all")
        if c != have_c:  # grey and colour mixed: everything becomes RGB
            if c == 1:
                img = np.repeat(img, 3, axis=2)
            else:
                self.array = np.repeat(self.array, 3, axis=1)
        self.array[i] = img.transpose(2, 0, 1)


def decode_all(source: Source, names: list[str], image_size: int | None, what: str) -> torch.Tensor:
    """Decode ``names`` (in this order) into (N, C, H, W) uint8, one pass over the source."""
    from tqdm import tqdm

    index = {n: i for i, n in enumerate(names)}
    stack = _Stack(len(names))
    with tqdm(total=len(names), desc=f"decoding {what}", unit="img", disable=None) as bar:
        for name, data in source.iter_read(names):
            where = source.describe(name)
            stack.put(index[name], decode_image(data, where, image_size), where)
            bar.update(1)
    return torch.from_numpy(stack.array)


def build_splits(source: Source, layout: Layout, *, name: str, what: str,
                 image_size: int | None) -> DatasetSplits:
    """Decode ``layout``'s files into :class:`DatasetSplits` (no cache; see :func:`load_images`)."""
    names = [n for n, _ in layout.train] + [n for n, _ in layout.test]
    images = decode_all(source, names, image_size, what)
    labels = torch.tensor([lab for _, lab in layout.train + layout.test], dtype=torch.int64)
    k = len(layout.train)
    train = ImageSet(images[:k], labels[:k], layout.classes)
    test = ImageSet(images[k:], labels[k:], layout.classes)
    mean, std = stats_chunked(train.images)
    desc = f"{what} from {source.describe()}; split: {layout.split}"
    return DatasetSplits(name, train, test, mean, std, description=desc)


def image_layout(source: Source) -> tuple[list[str], Layout]:
    """The image files at ``source`` (sorted) and their :class:`Layout`."""
    names = [n for n in source.names() if is_image(n)]
    if not names:
        raise DataError(f"{source.describe()} holds no images; expected {LAYOUTS}")
    return names, parse_layout(source, names)


def load_images(source: Source, *, name: str, what: str, image_size: int | None = None,
                labelled: bool = True, use_cache: bool = True,
                found: tuple[list[str], Layout] | None = None) -> DatasetSplits:
    """The image folder at ``source`` as :class:`DatasetSplits`, decoded once then cached.
    ``labelled=False`` drops class folders (labels -1, no classes), keeping the split.
    ``found``: :func:`image_layout`'s result when the caller has it already."""
    names, layout = found if found is not None else image_layout(source)
    if not layout.train:
        raise DataError(f"{source.describe()}: no training images (need at least 2 images); add images")
    if not labelled:
        layout = Layout([(n, -1) for n, _ in layout.train], [(n, -1) for n, _ in layout.test], [],
                        layout.split)
    options = {"image_size": image_size, "labelled": labelled}
    fingerprint = source.fingerprint(None if source.is_archive else names)
    return cached(name, fingerprint, options,
                  lambda: build_splits(source, layout, name=name, what=what, image_size=image_size),
                  use_cache)


def check_image_size(image_size) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    return image_size


def load_imagefolder(data_dir: Path | None = None, *, image_size: int | None = None,
                     cache: bool = True, download: bool = False, **_) -> DatasetSplits:
    """Any image folder or .tar.gz: root/*.jpg, root/<class>/*.jpg or root/{train,test}/[<class>/].

    With ``image_size``, images are centre-cropped and resized to it; otherwise they must share
    one size. (N, C, H, W) uint8 splits; see the module docstring for the split rules.
    """
    from nnlab.data.download import find_source

    if data_dir is None:
        raise DataError("imagefolder needs --data-dir: the folder or .tar.gz holding the images")
    source = find_source("imagefolder", data_dir, download, accept_images, "image folder", LAYOUTS)
    return load_images(source, name="imagefolder", what="image folder",
                       image_size=check_image_size(image_size), use_cache=cache)


def load_celeba64(data_dir: Path | None = None, *, image_size: int = 64, cache: bool = True,
                  download: bool = False, **_) -> DatasetSplits:
    """CelebA faces (or any face folder, e.g. CelebA-HQ), centre-cropped and resized to 64x64.

    Unlabelled (labels -1); ``image_size=N`` for another size. Train/test from train/ and
    test/ (or val/) folders when present, else the last 10% by sorted file name is test.
    Looks in ``data_dir``, else ``$NNLAB_DATA/celeba64``. (N, 3, S, S) uint8 splits.
    """
    from nnlab.data.download import find_source

    source = find_source("celeba64", data_dir, download, accept_images, "CelebA image folder", LAYOUTS)
    return load_images(source, name="celeba64", what="CelebA",
                       image_size=check_image_size(image_size), labelled=False, use_cache=cache)
