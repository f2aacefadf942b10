"""Knowledge distillation (nnlab.engine.distill) and the CNN teacher (cnn-fast-cifar): the loss against
a per-image loop of its definition and against the closed-form gradient of the soft term, the
teacher's targets against a hand-made flip average, a run that must learn its teacher's labels, and
online distillation's targets against the teacher on the student's own augmented batch."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from nnlab.data.base import BatchLoader, ImageSet
from nnlab.engine.callbacks import Callback
from nnlab.engine.distill import distill_loss, distill_loss_reference, teacher_logits
from nnlab.engine.train import TrainConfig, train
from nnlab.engine.trained import load_trained_run
from nnlab.errors import CheckpointError, ConfigError
from nnlab.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("alpha,temperature,smoothing", [(0.5, 0.0, 0.1), (0.9, 4.0, 0.0), (0.3, 1.0, 0.2)])
def test_loss_matches_the_per_image_definition(alpha, temperature, smoothing):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=g)
    fast = distill_loss(s, y, t, alpha=alpha, temperature=temperature, label_smoothing=smoothing)
    ref = distill_loss_reference(s, y, t, alpha=alpha, temperature=temperature, label_smoothing=smoothing)
    torch.testing.assert_close(fast, ref)


def test_soft_term_gradient_is_t_times_the_softmax_gap():
    """d/ds of T^2 KL(softmax(t/T) || softmax(s/T)), batch-mean, is T (softmax(s/T) - softmax(t/T)) / B:
    a reversed KL, a missing T^2 or a sum over the batch all fail it."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t, y = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    T = 3.0
    distill_loss(s, y, t, alpha=1.0, temperature=T).backward()
    want = T * (torch.softmax(s.detach() / T, 1) - torch.softmax(t / T, 1)) / 4
    torch.testing.assert_close(s.grad, want)


def test_hard_term_is_cross_entropy_on_the_teachers_argmax():
    s, t = torch.randn(3, 4), torch.tensor([[0.0, 5, 0, 0], [0, 0, 0, 9], [1, 0, 0, 0]])
    y = torch.tensor([0, 0, 0])
    got = distill_loss(s, y, t, alpha=1.0, temperature=0.0)
    torch.testing.assert_close(got, nn.functional.cross_entropy(s, torch.tensor([1, 3, 0])))


def test_teacher_targets_average_the_image_and_its_mirror_after_normalising():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 4, 3))      # not flip-invariant
    images = ImageSet(torch.randint(0, 256, (5, 2, 3, 4), dtype=torch.uint8), torch.zeros(5, dtype=torch.long))
    mean, std = (0.5, 0.25), (0.2, 0.4)
    got = teacher_logits(teacher, images, mean, std, batch_size=2)
    x = (images.images.float() / 255 - torch.tensor(mean).view(1, 2, 1, 1)) / torch.tensor(std).view(1, 2, 1, 1)
    with torch.no_grad():
        want = (teacher(x) + teacher(x.flip(-1))) / 2
    torch.testing.assert_close(got, want)


def test_loader_indices_are_the_batches_it_yields():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 1, 2, 2).contiguous()
    data = ImageSet(images, torch.arange(50))
    for rank in (0, 1):
        loader = BatchLoader(data, 8, shuffle=True, seed=3, rank=rank, world_size=2)
        loader.set_epoch(2)
        for i, (_, y) in enumerate(loader):
            assert torch.equal(loader.indices(i), y)                     # labels are the indices here


def test_cnn_fast_cifar_shapes_and_options():
    m = create_model("cnn-fast-cifar", num_classes=10, in_chans=3, image_size=32)
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in m.parameters()) == 1_972_792
    with pytest.raises(ConfigError, match="no option"):
        create_model("cnn-fast-cifar", num_classes=10, in_chans=3, image_size=32, depth=3)


def _tiny(**changes) -> TrainConfig:
    base = dict(model="lenet5", data="mnist-5k", epochs=1, batch_size=32, train_limit=256, test_limit=100,
                lr=0.05, log_every=2, progress=False, device="cpu")
    return TrainConfig(**{**base, **changes})


def test_a_student_distilled_on_hard_labels_learns_its_teachers_labels(tmp_path):
    """A weak teacher (36% on its train images) and students trained for 12 epochs on its labels alone
    (alpha 1) and on the true labels alone (alpha 0): each must follow its own targets, which
    misaligned teacher targets (a wrong batch index) would not give."""
    train(_tiny(epochs=4), tmp_path / "teacher")
    teacher = load_trained_run(tmp_path / "teacher")
    d = teacher.data.train
    x = (d.images.float() / 255 - torch.tensor(teacher.data.mean).view(1, -1, 1, 1)) / \
        torch.tensor(teacher.data.std).view(1, -1, 1, 1)
    t_labels = teacher_logits(teacher.model, d, teacher.data.mean, teacher.data.std).argmax(1)
    assert (t_labels == d.labels).float().mean() < 0.6 and t_labels.unique().numel() >= 4
    agree = {}
    for alpha in (1.0, 0.0):
        run = train(_tiny(epochs=12, distill_from=str(tmp_path / "teacher"), distill_alpha=alpha),
                    tmp_path / f"s{alpha}")
        with torch.no_grad():
            s_labels = run.model.eval()(x).argmax(1)
        agree[alpha] = ((s_labels == t_labels).float().mean(), (s_labels == d.labels).float().mean())
    assert agree[1.0][0] > 0.85 and agree[1.0][0] > agree[1.0][1] + 0.3      # follows the teacher
    assert agree[0.0][1] > 0.85 and agree[0.0][1] > agree[0.0][0] + 0.3      # follows the labels


def test_bad_distillation_options_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="distill_alpha"):
        _tiny(distill_alpha=1.5).validate()
    with pytest.raises(ConfigError, match="Mixup"):
        _tiny(distill_from="x", mixup_alpha=0.8).validate()
    with pytest.raises(CheckpointError, match="not a run folder"):
        train(_tiny(distill_from=str(tmp_path / "missing")), tmp_path / "s")


class _OnlineTargets(Callback):
    """Before each step, the loss that online distillation must give: the student and the teacher on
    the step's own augmented batch ctx.x; after the backward, the loss the trainer computed."""

    def __init__(self, teacher: nn.Module, **loss_options):
        self.teacher, self.options, self.pairs = teacher, loss_options, []

    def on_step_start(self, ctx) -> None:
        with torch.no_grad():
            self.expected = distill_loss(ctx.model(ctx.x), ctx.y, self.teacher(ctx.x), **self.options)

    def on_after_backward(self, ctx) -> None:
        self.pairs.append((ctx.loss.item(), self.expected.item()))


def test_online_distillation_runs_the_teacher_on_the_students_augmented_view(tmp_path):
    """With distill_online the targets are the teacher's logits on the very crop the student sees;
    precomputed targets on the un-augmented images (the offline mode) would not match them."""
    train(_tiny(epochs=2), tmp_path / "teacher")
    teacher = load_trained_run(tmp_path / "teacher").model.eval()
    options = dict(alpha=0.7, temperature=2.0, label_smoothing=0.1)
    probe = _OnlineTargets(teacher, **options)
    student = _tiny(distill_from=str(tmp_path / "teacher"), distill_online=True, distill_alpha=0.7,
                    distill_temperature=2.0, label_smoothing=0.1, augment=True, crop_padding=3)
    train(student, tmp_path / "online", callbacks=[probe])
    got, expected = torch.tensor(probe.pairs).T
    assert len(got) == 8 and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    offline = _OnlineTargets(teacher, **options)
    train(dataclasses.replace(student, distill_online=False), tmp_path / "offline", callbacks=[offline])
    got, expected = torch.tensor(offline.pairs).T
    assert not torch.allclose(got, expected, rtol=1e-3, atol=1e-4)   # the probe tells the two modes apart


def test_online_distillation_allows_mixing_and_needs_a_teacher():
    _tiny(distill_from="x", distill_online=True, mixup_alpha=0.8).validate()
    with pytest.raises(ConfigError, match="distill-from"):
        _tiny(distill_online=True).validate()
    with pytest.raises(ConfigError, match="distill-from"):
        _tiny(distill_bf16=True).validate()
