"""nnlab: four deep-learning studies (functa, ViT pruning, BatchNorm landscape, DessiLBI) in one toolkit.

The library never parses argv; the command-line front end lives in :mod:`nnlab.cli`.
"""
import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a busy machine
# spinning threads wait on each other and small-model CPU training runs ~8x slower. Override by
# setting OMP_WAIT_POLICY yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from nnlab.errors import NnlabError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["NnlabError", "__version__"]
