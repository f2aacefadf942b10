"""Knowledge distillation from a trained teacher run (``nnlab train --distill-from RUN``).

Hinton et al. (2015), as DeiT (Touvron et al. 2021) uses it for a ViT student and a CNN teacher:

    loss = (1 - alpha) CE_ls(s, y) + alpha T^2 KL(softmax(t / T) || softmax(s / T))    (soft, T > 0)
    loss = (1 - alpha) CE_ls(s, y) + alpha CE(s, argmax t)                               (hard, T = 0)

with s the student's logits on the training batch, t the teacher's, y the labels and CE_ls the
run's label-smoothed cross-entropy. DeiT's hard variant uses alpha = 1/2.

Where nnlab differs, and why: DeiT runs the teacher on every augmented batch, and adds a
distillation token to the student. On two CPU cores a teacher forward pass would cost about half
of the student's training step, so the teacher's logits are computed once, before training, on
each un-augmented training image and its mirror image, averaged (:func:`teacher_logits`); the
student then sees random crops (up to 4 pixels of shift) and flips of images whose targets were
computed without them. The student keeps its architecture (no distillation token): the loss acts
on its CLS head, so the pruning methods see the same model as without distillation.

``distill_online`` runs the teacher on every training batch instead, on the student's own
augmented (and mixed) images, as DeiT does and as Beyer et al. (2022, "Knowledge distillation: a
good teacher is patient and consistent") recommend: the same view for teacher and student. With
``distill_bf16`` on a CPU with AMX its forward costs little: cnn-fast-cifar's forward in bf16 and
channels-last memory runs at 3,672 images/s on 2 cores, against about 280 images/s for the
vit-cifar-cpu student's training step (``benchmarks/bench_precision.py``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nnlab.config import from_dict
from nnlab.data import DatasetSplits
from nnlab.data.base import BatchLoader, ImageSet
from nnlab.data.transforms import Normalize
from nnlab.engine.runs import RunDir
from nnlab.engine.trained import trained_model
from nnlab.errors import CheckpointError, ConfigError


def load_teacher(path: str | Path, data: DatasetSplits) -> nn.Module:
    """The trained model of run folder ``path`` (eval mode), built for ``data``; a ConfigError
    when the teacher was trained on another data set."""
    from nnlab.engine.train import TrainConfig

    if not Path(path).is_dir():
        raise CheckpointError(f"distill_from {path} is not a run folder; train the teacher first "
                              "('nnlab train --config configs/cnn-fast-cifar.yaml --out RUN') and give RUN")
    run = RunDir(path, create=False)
    config = from_dict(TrainConfig, run.load_config())
    if config.data != data.name:
        raise ConfigError(f"the teacher in {path} was trained on {config.data}, this run trains on "
                          f"{data.name}; distil from a teacher of the same data set")
    return trained_model(run, config, data)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images: ImageSet, mean, std, *, batch_size: int = 500,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The teacher's logits (N, K) on every image of ``images`` (uint8 (N, C, H, W)), normalised
    by ``mean`` / ``std``: the mean of its logits on the image and on its mirror image."""
    out = []
    for x, _ in BatchLoader(images, batch_size, transform=Normalize(mean, std)):   # in order, normalised
        x = x.to(device)
        out.append(((teacher(x) + teacher(x.flip(-1))) / 2).float().cpu())
    return torch.cat(out)


def distill_loss(student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, *, alpha: float,
                 temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """The loss above: student logits (B, K), labels (B,), teacher logits (B, K) -> scalar.
    Reference: :func:`distill_loss_reference`."""
    ce = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    if temperature == 0:
        kd = F.cross_entropy(student, teacher.argmax(1))
    else:
        t = temperature
        kd = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                      log_target=True) * t * t
    return (1 - alpha) * ce + alpha * kd


def distill_loss_reference(student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, *,
                           alpha: float, temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """The same loss written per image from its definition, as the test's independent reference."""
    b, k = student.shape
    total = student.new_zeros(())
    for i in range(b):
        logp = student[i] - torch.logsumexp(student[i], 0)                    # log softmax (K,)
        target = torch.full((k,), label_smoothing / k, dtype=student.dtype)
        target[labels[i]] += 1 - label_smoothing
        ce = -(target * logp).sum()
        if temperature == 0:
            kd = -logp[teacher[i].argmax()]
        else:
            t = temperature
            p_t = torch.softmax(teacher[i] / t, 0)
            log_s = student[i] / t - torch.logsumexp(student[i] / t, 0)
            kd = (p_t * (p_t.log() - log_s)).sum() * t * t
        total = total + (1 - alpha) * ce + alpha * kd
    return total / b
