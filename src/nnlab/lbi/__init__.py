"""DessiLBI (Fu et al., ICML 2020): sparse training by Split Linearized Bregman Iteration.

* :mod:`nnlab.lbi.sgd`: :class:`DessiLBI` (SGD flavour; the update rules); :mod:`nnlab.lbi.adam`:
  :class:`DessiLBIAdam`; both over :mod:`nnlab.lbi.base`. Fused steps in :mod:`nnlab.lbi.fused`
  (C++ kernels from :mod:`nnlab.lbi.kernels`, torch.compile), plain per-parameter references in
  :mod:`nnlab.lbi.reference`, pure shrinkage functions in :mod:`nnlab.lbi.shrink`.
* :mod:`nnlab.lbi.groups`: default parameter groups of a model, ``build_slbi`` /
  ``build_slbi_adam`` (the engine's ``slbi`` / ``slbi-adam``), per-layer sparsity and Gamma.
"""
from nnlab.lbi.groups import (build_slbi, build_slbi_adam, coupled_names, layer_gammas,
                              layer_sparsity, layer_supports, param_groups)
from nnlab.lbi.adam import DessiLBIAdam
from nnlab.lbi.sgd import DessiLBI
from nnlab.lbi.shrink import group_shrink, shrink, soft_threshold, support

__all__ = ["DessiLBI", "DessiLBIAdam", "build_slbi", "build_slbi_adam", "coupled_names",
           "group_shrink", "layer_gammas", "layer_sparsity", "layer_supports", "param_groups",
           "shrink", "soft_threshold", "support"]
