"""The DessiLBI optimisers under their historical module name; the code lives one piece per file:

* :mod:`nnlab.lbi.sgd` (:class:`DessiLBI`, and the update rules), :mod:`nnlab.lbi.adam`
  (:class:`DessiLBIAdam`), over :mod:`nnlab.lbi.base`;
* :mod:`nnlab.lbi.fused` (C++ kernels and ``torch.compile``), :mod:`nnlab.lbi.reference` (plain
  per-parameter steps), :mod:`nnlab.lbi.shrink` (pure shrinkage functions).
"""
from nnlab.lbi.adam import DessiLBIAdam
from nnlab.lbi.base import LBIBase
from nnlab.lbi.reference import adam_step_reference, sgd_step_reference
from nnlab.lbi.sgd import DessiLBI
from nnlab.lbi.shrink import SHRINK_KINDS, group_scale, group_shrink, shrink, soft_threshold, support

_LBIBase = LBIBase  # the old private name

__all__ = ["DessiLBI", "DessiLBIAdam", "LBIBase", "SHRINK_KINDS", "adam_step_reference", "group_scale",
           "group_shrink", "sgd_step_reference", "shrink", "soft_threshold", "support"]
