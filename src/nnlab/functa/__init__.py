"""Functa (Dupont et al. 2022): images as latent vectors that modulate a shared, meta-learned SIREN.

* :mod:`~nnlab.functa.model` -- :class:`LatentModulatedSiren` and :class:`FunctaConfig`.
* :mod:`~nnlab.functa.meta` -- fast batched inner loop (hand-written, differentiable latent
  gradients) and meta-loss; :mod:`~nnlab.functa.reference` -- the plain per-image version.
* :mod:`~nnlab.functa.presets`, :mod:`~nnlab.functa.trainer` -- named presets and meta-training.
* :mod:`~nnlab.functa.functaset` -- fit a split into a safetensors functaset (resumable, sharded).
* :mod:`~nnlab.functa.reconstruct`, :mod:`~nnlab.functa.classify`, :mod:`~nnlab.functa.plots`.

Typical use (the ``nnlab functa`` command wraps the same calls)::

    nnlab functa train --preset mnist-cpu --data mnist --data-dir ../shared/data/mnist --out runs/f
    nnlab functa fit runs/f --data mnist --data-dir ../shared/data/mnist --split test --out test.safetensors
"""
from nnlab.functa.model import FunctaConfig, LatentModulatedSiren, coordinate_grid

__all__ = ["FunctaConfig", "LatentModulatedSiren", "coordinate_grid"]
