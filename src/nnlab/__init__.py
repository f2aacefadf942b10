"""nnlab: four deep-learning studies (functa, ViT pruning, BatchNorm landscape, DessiLBI) in one toolkit.

The library never parses argv; the command-line front end lives in :mod:`nnlab.cli`.
Importing nnlab changes no process-wide setting. The ``nnlab`` command sets
``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of spinning) before torch starts its
thread pool; library users who want the same set it in the environment before importing torch.
"""
from nnlab.errors import NnlabError

__version__ = "0.1.0"
__all__ = ["NnlabError", "__version__"]
