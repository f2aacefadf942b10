"""Downloads of MNIST and CIFAR-10 from their canonical sources, checked against the official MD5
sums, into the cache folder (``$NNLAB_DATA/<name>`` or ``~/.cache/nnlab/<name>``), only on request
(``download=True`` / ``--download``).

Offline, a download fails within :data:`TIMEOUT_S` seconds per mirror with a message that says
where to put the files by hand. A file whose checksum does not match is never kept.
"""
from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nnlab.data.cache import cache_dir
from nnlab.data.source import Accept, Source, resolve
from nnlab.errors import DataError

TIMEOUT_S = 10.0
CHUNK = 1 << 16


@dataclass(frozen=True)
class Remote:
    """One official file: its name, MD5 and the mirrors serving it (tried in order)."""

    filename: str
    md5: str
    urls: tuple[str, ...]


def _mnist(filename: str, md5: str) -> Remote:
    mirrors = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
    return Remote(filename, md5, tuple(m + filename for m in mirrors))


REMOTES: dict[str, list[Remote]] = {
    "mnist": [_mnist("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
              _mnist("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
              _mnist("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
              _mnist("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")],
    "cifar10": [Remote("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                       ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",))],
}


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _download_to(url: str, tmp: str, remote: Remote) -> None:
    """Stream ``url`` into ``tmp`` with a progress bar; DataError on a checksum mismatch."""
    from tqdm import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "nnlab"})
    h = hashlib.md5()
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp, open(tmp, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=remote.filename, disable=None) as bar:
            for block in iter(lambda: resp.read(CHUNK), b""):
                out.write(block)
                h.update(block)
                bar.update(len(block))
    if h.hexdigest() != remote.md5:
        raise DataError(f"{url}: checksum mismatch (MD5 {h.hexdigest()}, expected {remote.md5}); "
                        f"the download is corrupt or the mirror serves another file")


def fetch(remote: Remote, folder: Path) -> Path:
    """``folder/remote.filename``, downloaded (atomically, checksum verified) unless already there."""
    from nnlab.engine.io import atomic_write

    path = folder / remote.filename
    if path.is_file() and md5sum(path) == remote.md5:
        return path
    failures = []
    for url in remote.urls:
        try:
            return atomic_write(path, lambda tmp: _download_to(url, tmp, remote))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
        except DataError as exc:
            failures.append(str(exc))
    raise DataError(f"could not download {remote.filename} ({'; '.join(failures)}). Offline? Put the "
                    f"official file {remote.filename} (MD5 {remote.md5}) in {folder}, or pass "
                    f"--data-dir pointing at a copy")


def download(name: str, folder: Path | None = None) -> Path:
    """Fetch all official files of data set ``name`` into ``folder`` (default: the cache)."""
    if name not in REMOTES:
        raise DataError(f"{name} has no download; get it yourself and pass --data-dir "
                        f"(downloads exist for: {', '.join(sorted(REMOTES))})")
    folder = Path(folder) if folder is not None else cache_dir() / name
    if folder.exists() and not folder.is_dir():
        raise DataError(f"--download needs a folder to write into, but {folder} is a file; pass "
                        f"its parent folder as --data-dir or drop --download")
    for remote in REMOTES[name]:
        fetch(remote, folder)
    return folder


def find_source(name: str, data_dir: Path | None, download_: bool, accept: Accept, what: str,
                layout: str) -> Source:
    """Resolve data set ``name`` in ``data_dir`` (else the cache folder), downloading first
    when asked and the data is not already there."""
    folder = Path(data_dir).expanduser() if data_dir is not None else cache_dir() / name
    if folder.exists():
        try:
            return resolve(folder, accept, what, layout)
        except DataError:
            if not download_:
                raise
    elif not download_:
        if data_dir is not None:
            return resolve(folder, accept, what, layout)  # raises: does not exist
        how = " or --download to fetch it there" if name in REMOTES else ""
        raise DataError(f"no {what} found: the cache folder {folder} does not exist; pass --data-dir "
                        f"(a folder or .tar.gz with {layout}){how}")
    download(name, folder)
    return resolve(folder, accept, what, layout)
