"""nnlab: four deep-learning studies (functa, ViT pruning, BatchNorm landscape, DessiLBI) in one toolkit.

The library never parses argv; the command-line front end lives in :mod:`nnlab.cli`.
"""
from nnlab.errors import NnlabError

__version__ = "0.1.0"
__all__ = ["NnlabError", "__version__"]
