"""Bands and summary figures from probe records (pure functions over the metrics JSONL records).

A probe logs, every ``every`` steps, one record with ``"probe": "landscape"`` and keys
``step, lr, train_loss, land_loss_min, land_loss_max, land_gdist_min, land_gdist_max, land_beta,
land_grad_norm, land_step_norm`` (and ``hess_top, hess_iters, hess_converged, hess_residual`` when
the Hessian probe is on), and at the following step one record with ``"probe": "graddist"`` and
keys ``step`` (t+1), ``grad_dist`` (||g_{t+1} - g_t||), ``beta_t`` (the seed's, consecutive
batches), ``grad_dist_same``, ``move_norm``, ``beta_same`` (same batch B_t, actual move).

- Per-step bands over step sizes (the paper's Fig. 4): ``land_loss_max - land_loss_min`` and
  ``land_gdist_max - land_gdist_min``.
- Bands across learning rates (the seed's figures): at each step, min and max over runs at
  several lrs of the training loss and of the gradient distance.
- Summary: medians over the last half of training (steps > total_steps / 2).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Mapping

LANDSCAPE, GRADDIST = "landscape", "graddist"


@dataclass
class Band:
    """A band over steps: steps, low, high are equal-length lists (steps ascending)."""

    steps: list[int]
    low: list[float]
    high: list[float]

    @property
    def width(self) -> list[float]:
        return [h - lo for lo, h in zip(self.low, self.high)]


def series(records: Iterable[dict], probe: str, key: str) -> dict[int, float]:
    """step -> value of ``key`` in the records of kind ``probe`` (finite values only)."""
    out = {}
    for r in records:
        v = r.get(key)
        if r.get("probe") == probe and v is not None and math.isfinite(float(v)):
            out[int(r["step"])] = float(v)
    return out


def eta_band(records: Iterable[dict], quantity: str) -> Band:
    """The per-step band over step sizes; ``quantity`` is ``"loss"`` or ``"gdist"``."""
    records = list(records)
    lo = series(records, LANDSCAPE, f"land_{quantity}_min")
    hi = series(records, LANDSCAPE, f"land_{quantity}_max")
    steps = sorted(set(lo) & set(hi))
    return Band(steps, [lo[s] for s in steps], [hi[s] for s in steps])


def lr_band(per_lr: Mapping[float, Mapping[int, float]]) -> Band:
    """Band across learning rates: at each step present in every run, min and max over the runs.

    per_lr: lr -> (step -> value), e.g. from :func:`series` of each run.
    """
    runs = [r for r in per_lr.values() if r]
    if not runs:
        return Band([], [], [])
    steps = sorted(set.intersection(*(set(r) for r in runs)))
    return Band(steps, [min(r[s] for r in runs) for s in steps], [max(r[s] for r in runs) for s in steps])


def diverged(records: Iterable[dict]) -> bool:
    """True if the run's records hold the engine's ``"event": "diverged"`` record (NaN/inf loss)."""
    return any(r.get("event") == "diverged" for r in records)


def last_half_median(steps: list[int], values: list[float], total_steps: int,
                     start: float | None = None) -> float | None:
    """Median of ``values`` at steps > ``start`` (default total_steps / 2); None if there are none."""
    start = total_steps / 2 if start is None else start
    tail = [v for s, v in zip(steps, values) if s > start]
    return statistics.median(tail) if tail else None


def _median_of(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def band_medians(runs: Mapping[float, list[dict]], total_steps: int,
                 start: float | None = None) -> dict[str, float | None]:
    """Last-half medians for one BN setting; ``runs`` maps lr -> that run's records. ``start``:
    take the medians over steps > start instead (e.g. after the first epoch).

    eta_loss_band, eta_gdist_band, beta_eff: medians over lrs of each run's last-half median of the
    per-step band over step sizes / of the effective beta. lr_loss_band, lr_gdist_band: last-half
    median of the width of the band across lrs. beta_t: median over lrs of the seed's beta_t;
    beta_same: of the same-batch beta. hess_top: the same for the top Hessian eigenvalue (None
    when not probed); hess_converged: the fraction of Hessian probes that converged. Diverged runs
    are left out (their records stop early and end in huge values).
    """
    runs = {lr: r for lr, r in runs.items() if not diverged(r)}
    out: dict[str, float | None] = {}
    for name, quantity in (("eta_loss_band", "loss"), ("eta_gdist_band", "gdist")):
        bands = [eta_band(r, quantity) for r in runs.values()]
        out[name] = _median_of([last_half_median(b.steps, b.width, total_steps, start) for b in bands])
    for name, probe, key in (("beta_eff", LANDSCAPE, "land_beta"), ("beta_t", GRADDIST, "beta_t"),
                             ("beta_same", GRADDIST, "beta_same"), ("hess_top", LANDSCAPE, "hess_top")):
        per = [series(r, probe, key) for r in runs.values()]
        out[name] = _median_of([last_half_median(sorted(s), [s[k] for k in sorted(s)], total_steps, start)
                                for s in per])
    for name, probe, key in (("lr_loss_band", LANDSCAPE, "train_loss"), ("lr_gdist_band", GRADDIST, "grad_dist")):
        band = lr_band({lr: series(r, probe, key) for lr, r in runs.items()})
        out[name] = last_half_median(band.steps, band.width, total_steps, start) if len(runs) > 1 else None
    flags = [bool(r["hess_converged"]) for rs in runs.values() for r in rs if "hess_converged" in r]
    out["hess_converged"] = sum(flags) / len(flags) if flags else None
    return out
