"""BatchNorm and the optimisation landscape (Santurkar et al. 2018, "How does batch normalization
help optimization?").

- :mod:`nnlab.landscape.probe`: pure measurement functions (loss landscape, gradient
  predictiveness and effective beta-smoothness along the gradient at one step; gradient distance
  between consecutive steps) and the :class:`LandscapeProbe` training callback.
- :mod:`nnlab.landscape.hessian`: top Hessian eigenvalue by power iteration on Hessian-vector
  products.
- :mod:`nnlab.landscape.bands`: bands across learning rates and the summary medians.
- :mod:`nnlab.landscape.sweep`: the resumable (BN, lr) sweep behind ``nnlab landscape run``.
- :mod:`nnlab.landscape.plots`: the figures behind ``nnlab landscape plot``.

Every probe restores the weights, buffers (BN running statistics, ``num_batches_tracked``) and RNG
state it touches, and never calls the optimiser, so training with probes is bit-identical to
training without them.
"""
from nnlab.landscape.bands import Band, band_medians, eta_band, lr_band
from nnlab.landscape.callback import LandscapeProbe
from nnlab.landscape.hessian import HessianResult, top_hessian_eigenvalue, top_hessian_eigenvalue_reference
from nnlab.landscape.probe import (ModelSnapshot, StepLandscape, default_etas, gradient_distance,
                                   landscape_step, landscape_step_reference, restore, snapshot)
from nnlab.landscape.sweep import LandscapeConfig, LandscapeResult, run_landscape

__all__ = ["Band", "LandscapeProbe", "LandscapeConfig", "LandscapeResult", "band_medians", "eta_band", "lr_band",
           "run_landscape", "HessianResult", "ModelSnapshot", "StepLandscape", "default_etas", "gradient_distance",
           "landscape_step", "landscape_step_reference", "restore", "snapshot",
           "top_hessian_eigenvalue", "top_hessian_eigenvalue_reference"]
