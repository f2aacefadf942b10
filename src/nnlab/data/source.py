"""Where a data set's files are: a folder, a tar archive (``.tar``, ``.tar.gz``, ``.tgz``), or a
folder that holds one of those (the data set's parent, e.g. ``shared/data/cifar10`` holding
``cifar10-jpg.tar.gz``).

A :class:`Source` lists and reads files by POSIX path relative to the data set's root (a prefix
inside the folder or archive, found by the loader's ``accept`` function). Archives are read in
place, never extracted.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from nnlab.errors import DataError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
MAX_WALK_DEPTH = 6  # folder levels listed below a candidate root
# Given the names below a candidate (relative POSIX paths of regular files), return the prefix of
# the data set's root inside it ('' or 'some/dir/'), or None when the layout does not match.
Accept = Callable[[list[str]], "str | None"]


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _ignored(name: str) -> bool:
    """Hidden files, macOS resource forks and similar clutter are never data."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def walk_names(folder: Path, max_depth: int = MAX_WALK_DEPTH) -> list[str]:
    """Sorted relative POSIX paths of the regular files below ``folder`` (``max_depth`` levels)."""
    names = []
    base_depth = len(folder.parts)
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if len(here.parts) - base_depth >= max_depth:
            dirnames[:] = []
        rel = here.relative_to(folder).as_posix()
        names.extend(f if rel == "." else f"{rel}/{f}" for f in filenames)
    return sorted(n for n in names if not _ignored(n))


def tar_names(path: Path) -> list[str]:
    """Sorted names of the regular files in a tar archive (memoised on disk, keyed by size+mtime)."""
    from nnlab.data.cache import cache_dir

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    index = cache_dir() / "index" / f"{path.name}-{key}.json"
    try:
        return json.loads(index.read_text())
    except (OSError, ValueError):
        pass
    try:
        with tarfile.open(path) as tar:
            names = sorted(m.name[2:] if m.name.startswith("./") else m.name
                           for m in tar.getmembers() if m.isfile())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is not a readable tar archive ({exc}); re-download or re-create it") from None
    names = [n for n in names if not _ignored(n)]
    try:
        from nnlab.data.cache import SHARED_MODE
        from nnlab.engine.io import atomic_write

        def write(tmp: str) -> None:
            Path(tmp).write_text(json.dumps(names))
            os.chmod(tmp, SHARED_MODE)

        atomic_write(index, write)
    except OSError:
        pass  # a read-only cache only costs time
    return names


@dataclass
class Source:
    """A data set's files: ``origin`` (folder or archive on disk) and the root ``prefix`` inside it."""

    origin: Path
    prefix: str = ""

    @property
    def is_archive(self) -> bool:
        return is_archive(self.origin)

    def names(self) -> list[str]:
        """Sorted paths of the files below the root, relative to it."""
        all_names = tar_names(self.origin) if self.is_archive else walk_names(self.origin)
        p = self.prefix
        return [n[len(p):] for n in all_names if n.startswith(p)]

    def describe(self, name: str = "") -> str:
        """A path a user can find: ``/a/b.tar.gz:root/x.jpg`` inside archives, ``/a/root/x.jpg`` else."""
        inner = self.prefix + name
        if self.is_archive:
            return f"{self.origin}:{inner}" if inner else str(self.origin)
        return str(self.origin / inner) if inner else str(self.origin)

    def read(self, name: str) -> bytes:
        """The bytes of one file (archives: prefer :meth:`iter_read` for many files)."""
        for _, data in self.iter_read([name]):
            return data
        raise DataError(f"{self.describe(name)} is missing")

    def iter_read(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """``(name, bytes)`` for each of ``names``: in the given order for folders, in archive
        order (one sequential pass) for archives."""
        wanted = list(names)
        if not self.is_archive:
            for n in wanted:
                try:
                    yield n, (self.origin / self.prefix / n).read_bytes()
                except OSError as exc:
                    raise DataError(f"cannot read {self.describe(n)}: {exc.strerror or exc}") from None
            return
        yield from self._iter_tar(set(wanted))

    def _iter_tar(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        try:
            with tarfile.open(self.origin) as tar:
                for member in tar:
                    name = member.name[2:] if member.name.startswith("./") else member.name
                    rel = name[len(self.prefix):] if name.startswith(self.prefix) else None
                    if member.isfile() and rel in wanted:
                        f = tar.extractfile(member)
                        yield rel, f.read() if f is not None else b""
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{self.origin} is truncated or corrupt ({exc}); re-download or "
                            f"re-create the archive") from None

    def fingerprint(self, names: list[str] | None = None) -> str:
        """Changes whenever the files change: archive size+mtime, or each file's size+mtime."""
        h = hashlib.sha256(f"{self.origin.resolve()}|{self.prefix}".encode())
        if self.is_archive:
            st = self.origin.stat()
            h.update(f"{st.st_size}|{st.st_mtime_ns}".encode())
        else:
            for n in names if names is not None else self.names():
                st = (self.origin / self.prefix / n).stat()
                h.update(f"{n}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def _candidates(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    children = sorted(p for p in path.iterdir()
                      if not p.name.startswith(".") and (p.is_dir() or is_archive(p)))
    return [path] + children


def _names_of(path: Path) -> list[str]:
    if path.is_dir():
        return walk_names(path)
    if is_archive(path):
        return tar_names(path)
    raise DataError(f"{path} is neither a folder nor a .tar/.tar.gz/.tgz archive; pass the data set's "
                    f"folder or an archive of it")


def resolve(path: str | Path, accept: Accept, what: str, expected: str) -> Source:
    """Find the data set ``what`` at ``path``: the folder or archive itself, or else exactly one
    folder or archive directly inside it. ``expected`` describes the layout for error messages."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist; pass --data-dir pointing at the {what} folder or "
                        f"archive ({expected})")
    cands = _candidates(path)
    names = _names_of(path)
    if not names and len(cands) == 1:
        raise DataError(f"{path} is empty; expected {expected}")
    prefix = accept(names)
    if prefix is not None:
        return Source(path, prefix)
    found = []
    for cand in cands[1:]:
        p = accept(_names_of(cand))
        if p is not None:
            found.append(Source(cand, p))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise DataError(f"{path} holds several copies of {what}: "
                        f"{', '.join(str(s.origin) for s in found)}; pass one of them as --data-dir")
    raise DataError(f"no {what} found in {path}: expected {expected}; pass the folder or archive "
                    f"that holds it as --data-dir")
