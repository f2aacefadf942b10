"""Sample-quality measures in a feature space: FID, k-NN precision and recall, memorisation.

* FID (Heusel et al. 2017): ``||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2)`` of
  the features' Gaussian fits, in float64. nnlab computes it in the feature space of a network it
  trains on the data set's own pixels (:mod:`nnlab.functa.generate.features`), so it is "FID
  (nnlab LeNet-5 features)", not comparable with Inception FIDs.
* Precision and recall (Kynkaenniemi et al. 2019): each real (fake) feature owns a ball whose
  radius is the distance to its k-th nearest real (fake) neighbour; precision is the fraction of
  fakes inside some real ball, recall the fraction of reals inside some fake ball.
* Memorisation: each sample's distance to its nearest training latent, against the same distance
  for held-out test latents. Samples that copy training points sit far closer than test points do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """features (N, F) -> (mean (F,), covariance (F, F)), float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """Frechet distance between N(mu1, s1) and N(mu2, s2) (means (F,), covariances (F, F))."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    r1 = _sqrt_psd(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross)


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between feature sets real (N, F) and fake (M, F)."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


def _kth_nn_radius(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """(N,) distance from each row of x (N, F) to its k-th nearest other row."""
    out = []
    for part in x.split(chunk):
        d = torch.cdist(part, x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself is at distance 0
    return torch.cat(out)


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """(N,) bool: point lies within some ball (centre (M, F), radius (M,))."""
    return torch.cat([(torch.cdist(p, centres) <= radii[None]).any(1) for p in points.split(chunk)])


@dataclass
class PrecisionRecall:
    precision: float
    recall: float
    k: int


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> PrecisionRecall:
    """k-NN manifold precision and recall of fake (M, F) against real (N, F) features."""
    real, fake = real.float(), fake.float()
    precision = _covered(fake, real, _kth_nn_radius(real, k)).float().mean().item()
    recall = _covered(real, fake, _kth_nn_radius(fake, k)).float().mean().item()
    return PrecisionRecall(precision, recall, k)


def nearest_distance(x: torch.Tensor, ref: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """(N,) Euclidean distance from each row of x (N, D) to its nearest row of ref (M, D)."""
    return torch.cat([torch.cdist(p.float(), ref.float()).min(1).values for p in x.split(chunk)])


@dataclass
class Memorisation:
    """median_sample_to_train / median_test_to_train: nearest-train-latent distances (medians);
    ratio: their quotient (about 1 for a model that generalises, near 0 for one that copies);
    copy_fraction: fraction of samples nearer to a training latent than 99% of test latents are."""

    median_sample_to_train: float
    median_test_to_train: float
    ratio: float
    copy_fraction: float


def memorisation(samples: torch.Tensor, train: torch.Tensor, test: torch.Tensor) -> Memorisation:
    """Compare samples (N, D) and test latents (M, D) by their distance to the train latents (K, D)."""
    ds, dt = nearest_distance(samples, train), nearest_distance(test, train)
    ms, mt = ds.median().item(), dt.median().item()
    threshold = torch.quantile(dt, 0.01).item()
    return Memorisation(ms, mt, ms / max(mt, 1e-12), (ds < threshold).float().mean().item())
