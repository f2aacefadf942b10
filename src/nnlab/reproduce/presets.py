"""The presets of ``nnlab reproduce``: ``quick``, ``cpu``, ``paper`` and ``cpu-full``.

``cpu-full`` is the seed's CIFAR-10 experiments at the seed's scale on a CPU machine (issue 14):
the BatchNorm study's lr 0.1 pair at full width and its lr band at width 0.5, and DessiLBI on
VGG-A and ResNet-56; the other studies have no stages in it.

Each study module ``nnlab.reproduce.study_<name>`` provides ``SECTION`` (its report section) and
``stages(preset) -> list[Stage]``; a preset is the concatenation of the studies' stages.
"""
from __future__ import annotations

import importlib
import importlib.util

from nnlab.reproduce.pipeline import PRESETS, SECTIONS, STUDIES
from nnlab.reproduce.stages import Stage

_MODULES = {study: f"nnlab.reproduce.study_{study}" for study in STUDIES}


def _study_modules():
    mods = {}
    for study, name in _MODULES.items():
        if importlib.util.find_spec(name) is not None:
            mods[study] = importlib.import_module(name)
    return mods


def _builder(preset: str):
    def build() -> list[Stage]:
        return [stage for mod in _study_modules().values() for stage in mod.stages(preset)]
    return build


for _preset in ("quick", "cpu", "paper", "cpu-full"):
    PRESETS.register(_preset, _builder(_preset))
for _study, _mod in _study_modules().items():
    SECTIONS[_study] = _mod.SECTION
