"""C++ CPU kernels built on first use (:func:`torch.utils.cpp_extension.load_inline`, with
``-O3 -march=native -fopenmp``), shared by the studies that have one (DessiLBI's step, ToMe's merge).

Building needs a C++ compiler and ninja, as ``torch.compile`` on CPU does. :func:`build_once`
returns ``None`` (with one warning) where the build fails, and every caller then falls back to
plain torch code that computes the same thing.
"""
from __future__ import annotations

import warnings
from typing import Sequence

_BUILT: dict[str, object] = {}


def cpu_tag() -> str:
    """A short hash of this CPU's model and feature flags: kernels are built with -march=native,
    so a build cache shared by different machines (a cluster's home directory) must not mix them."""
    import hashlib
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            info = "".join(line for line in f if line.startswith(("model name", "flags")))
    except OSError:
        info = platform.processor() + platform.machine()
    return hashlib.sha1(info.encode()).hexdigest()[:10]


def build_once(name: str, source: str, functions: Sequence[str], fallback: str):
    """The module ``name`` built from C++ ``source`` exposing ``functions``, built once per process;
    ``None`` (and a warning naming ``fallback``, what runs instead) if it cannot be built."""
    if name not in _BUILT:
        from torch.utils.cpp_extension import load_inline

        try:
            _BUILT[name] = load_inline(f"{name}_{cpu_tag()}", cpp_sources=source, functions=list(functions),
                                       extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                       extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as err:  # no compiler, no ninja, no write access to the build cache
            warnings.warn(f"{name}: C++ kernel unavailable ({type(err).__name__}: {err}); falling back to "
                          f"{fallback}", RuntimeWarning, stacklevel=3)
            _BUILT[name] = None
    return _BUILT[name]
