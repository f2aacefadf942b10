"""DessiLBI (Fu et al., ICML 2020): sparse training by Split Linearized Bregman Iteration.

* :mod:`nnlab.lbi.optim`: :class:`DessiLBI` (SGD flavour) and :class:`DessiLBIAdam`, with plain
  per-parameter reference steps; pure shrinkage functions.
* :mod:`nnlab.lbi.groups`: default parameter groups of a model, ``build_slbi`` /
  ``build_slbi_adam`` (the engine's ``slbi`` / ``slbi-adam``), per-layer sparsity and Gamma.
"""
from nnlab.lbi.groups import (build_slbi, build_slbi_adam, coupled_names, layer_gammas,
                              layer_sparsity, layer_supports, param_groups)
from nnlab.lbi.optim import DessiLBI, DessiLBIAdam, group_shrink, shrink, soft_threshold, support

__all__ = ["DessiLBI", "DessiLBIAdam", "build_slbi", "build_slbi_adam", "coupled_names",
           "group_shrink", "layer_gammas", "layer_sparsity", "layer_supports", "param_groups",
           "shrink", "soft_threshold", "support"]
