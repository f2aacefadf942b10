"""C++ CPU kernels built on first use, shared by the studies that have one (DessiLBI's step, ToMe's
merge).

Each kernel's source includes only the ATen headers it needs and registers its functions as torch
operators (``TORCH_LIBRARY(namespace, m)``), which :func:`build_once` compiles with
:func:`torch.utils.cpp_extension.load` (``-O3 -march=native -fopenmp``, ``is_python_module=False``)
and returns as ``torch.ops.<namespace>``. Why not ``load_inline``: it prepends
``<torch/extension.h>`` (all of libtorch's C++ API and pybind11), whose parsing is most of a
build: 62 s for an empty file on this project's CPU under load, against 14 s for
``<ATen/core/Tensor.h>``, ``<ATen/Parallel.h>`` and ``<torch/library.h>``.

Builds are cached under torch's extension root (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) in a folder keyed by the source, this CPU (:func:`cpu_tag`: the
code is built for it with ``-march=native``) and the torch installation, so two environments
sharing one cache (a virtual environment beside the system Python) never rebuild each other's.

Building needs a C++ compiler and ninja, as ``torch.compile`` on CPU does. :func:`build_once`
returns ``None`` (with one warning) where the build fails, and every caller then falls back to
plain torch code that computes the same thing.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

_BUILT: dict[str, object] = {}
FLAGS = ["-O3", "-march=native", "-fopenmp"]


def cpu_tag() -> str:
    """A short hash of this CPU's model and feature flags: kernels are built with -march=native,
    so a build cache shared by different machines (a cluster's home directory) must not mix them."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            info = "".join(line for line in f if line.startswith(("model name", "flags")))
    except OSError:
        info = platform.processor() + platform.machine()
    return hashlib.sha1(info.encode()).hexdigest()[:10]


def build_tag(source: str) -> str:
    """A short hash of ``source``, the build flags, this CPU and the torch installation (version and
    path): the cache folder of one build."""
    key = "\n".join([source, " ".join(FLAGS), cpu_tag(), torch.__version__, str(Path(torch.__file__).parent)])
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _source_file(name: str, source: str) -> Path:
    """``source`` at a stable path under the extension root, written only when it differs (ninja
    rebuilds when a source's time stamp changes)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # where torch builds
    path = Path(root) / "nnlab-sources" / f"{name}.cpp"
    if not path.is_file() or path.read_text() != source:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes starting together each write their own
        tmp.write_text(source)
        tmp.replace(path)
    return path


def build_once(namespace: str, source: str, fallback: str):
    """``torch.ops.<namespace>``, the operators that C++ ``source`` registers with
    ``TORCH_LIBRARY(<namespace>, m)``, built once per process; ``None`` (and a warning naming
    ``fallback``, what runs instead) if it cannot be built or loaded."""
    if namespace not in _BUILT:
        from torch.utils.cpp_extension import load

        name = f"{namespace}_{build_tag(source)}"
        try:
            load(name, sources=[str(_source_file(name, source))], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                 is_python_module=False, verbose=False)
            _BUILT[namespace] = getattr(torch.ops, namespace)
        except Exception as err:  # no compiler, no ninja, no write access to the build cache
            warnings.warn(f"{namespace}: C++ kernel unavailable ({type(err).__name__}: {_reason(err)}); falling "
                          f"back to {fallback}", RuntimeWarning, stacklevel=3)
            _BUILT[namespace] = None
    return _BUILT[namespace]


def _reason(err: Exception) -> str:
    """One line of a build error: the compiler's first error line, else the message's first line
    (a failed build's message is the whole compiler log)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    hits = [line for line in lines if "error" in line.lower() or "not found" in line.lower()]
    line = (hits[1:] or hits or lines or [""])[0]  # hits[0] is torch's "Error building extension ..."
    return line if len(line) <= 200 else line[:197] + "..."
