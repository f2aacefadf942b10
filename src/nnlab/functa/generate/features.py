"""Feature networks for sample quality, trained by nnlab on the data set's own pixels.

Inception weights cannot be had offline, and Inception features do not suit 28x28 digits. So FID,
precision/recall and the class accuracy of samples use a network trained here:

* labelled 28x28 / 32x32 data (MNIST, CIFAR-10): LeNet-5 trained on the labels; the features are
  its penultimate layer (fc1 after ReLU, 84-d) -- "FID (nnlab LeNet-5 features)";
* unlabelled data (CelebA faces): a small CNN trained to predict which of 4 rotations
  (0/90/180/270 degrees) was applied, a standard self-supervised task; features are its
  global-average-pooled last conv layer (128-d) -- "FID (nnlab rotation-CNN features)";
* labelled data of other sizes: the same small CNN trained on the labels.

A trained network is cached per data set in ``$NNLAB_DATA/feature-nets/`` under a fingerprint of
the training pixels, labels and recipe, so every generator of a data set is scored by the same net.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from nnlab.data.base import DatasetSplits
from nnlab.data.cache import cache_dir
from nnlab.engine.io import atomic_write
from nnlab.errors import CheckpointError

RECIPE_VERSION = 1


class LeNetFeatures(nn.Module):
    """LeNet-5 (conv 6-16-120, fc 84-classes) on normalised images; features: fc1 + ReLU (84-d)."""

    def __init__(self, in_chans: int, image_size: int, num_classes: int, mean, std):
        super().__init__()
        from nnlab.models.lenet import LeNet5

        self.net = LeNet5(num_classes, in_chans, image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [0, 1] -> (B, 84)."""
        n, f = self.net, nn.functional
        h = (x - self.mean) / self.std
        h = f.max_pool2d(f.relu(n.conv1(h)), 2)
        h = f.max_pool2d(f.relu(n.conv2(h)), 2)
        return f.relu(n.fc1(f.relu(n.conv3(h)).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.fc2(self.features(x))


class SmallCNN(nn.Module):
    """Three stride-2 conv blocks (32, 64, 128) then global average pooling (128-d features)."""

    def __init__(self, in_chans: int, num_classes: int, mean, std):
        super().__init__()
        layers, c = [], in_chans
        for width in (32, 64, 128):
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(128, num_classes)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [0, 1] -> (B, 128)."""
        return self.body((x - self.mean) / self.std).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class FeatureNet:
    """A trained feature network. task: "labels" or "rotation"; accuracy: its test accuracy on
    that task (a fraction); label: the name to print beside an FID."""

    net: nn.Module
    kind: str
    task: str
    accuracy: float
    path: Path | None

    @property
    def label(self) -> str:
        name = "LeNet-5" if self.kind == "lenet5" else "rotation-CNN" if self.task == "rotation" else "CNN"
        return f"FID (nnlab {name} features)"


def _choose(splits: DatasetSplits) -> tuple[str, str]:
    c, h, w = splits.shape
    labelled = bool(splits.train.classes) and bool((splits.train.labels >= 0).all())
    if labelled and h == w and h in (28, 32):
        return "lenet5", "labels"
    return "cnn", "labels" if labelled else "rotation"


def _build(kind: str, task: str, splits: DatasetSplits) -> nn.Module:
    c, h, _ = splits.shape
    classes = 4 if task == "rotation" else len(splits.train.classes)
    if kind == "lenet5":
        return LeNetFeatures(c, h, classes, splits.mean, splits.std)
    return SmallCNN(c, classes, splits.mean, splits.std)


def _task_batch(images: torch.Tensor, labels: torch.Tensor, task: str, g: torch.Generator):
    """uint8 images (B, C, H, W) -> (float inputs, targets) for the task (rotation: random k * 90 deg)."""
    x = images.float() / 255
    if task == "labels":
        return x, labels
    k = torch.randint(0, 4, (len(x),), generator=g)
    return torch.stack([torch.rot90(xi, int(ki), dims=(1, 2)) for xi, ki in zip(x, k)]), k


def fingerprint(splits: DatasetSplits, kind: str, task: str, epochs: int) -> str:
    """Hash of the training pixels, labels and recipe: the cache key of a feature network."""
    h = hashlib.sha256(f"{kind}-{task}-{epochs}-v{RECIPE_VERSION}".encode())
    h.update(splits.train.images.contiguous().numpy().tobytes())
    h.update(splits.train.labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, task: str) -> float:
    net.eval()
    g, correct = torch.Generator().manual_seed(1), 0
    with torch.no_grad():
        for i in range(0, len(images), 500):
            x, y = _task_batch(images[i:i + 500], labels[i:i + 500], task, g)
            correct += (net(x).argmax(1) == y).sum().item()
    return correct / max(len(images), 1)


def train_feature_net(splits: DatasetSplits, kind: str, task: str, epochs: int = 3, seed: int = 0,
                      progress: bool = True) -> tuple[nn.Module, float]:
    """Train a feature network on the train split (Adam 1e-3, batch 128); returns (net, test accuracy)."""
    torch.manual_seed(seed)
    net, g = _build(kind, task, splits), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    train = splits.train
    for _ in tqdm(range(epochs), desc="feature net", disable=None if progress else True):
        net.train()
        for idx in torch.randperm(len(train), generator=g).split(128):
            x, y = _task_batch(train.images[idx], train.labels[idx], task, g)
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval(), _accuracy(net, splits.test.images, splits.test.labels, task)


def load_feature_net(path: str | Path, splits: DatasetSplits) -> FeatureNet:
    """Load a cached or published feature network (safetensors with kind/task/accuracy metadata)."""
    path = Path(path)
    try:
        with safe_open(path, "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(path)
        net = _build(meta["kind"], meta["task"], splits)
        net.load_state_dict(tensors)
    except Exception as exc:  # safetensors and load_state_dict raise several types
        raise CheckpointError(f"feature network {path} is unreadable or does not fit this data set ({exc}); "
                              "delete it to train a new one") from None
    return FeatureNet(net.eval(), meta["kind"], meta["task"], float(meta["accuracy"]), path)


def feature_net(splits: DatasetSplits, data: str, *, epochs: int = 3, path: str | Path | None = None,
                progress: bool = True) -> FeatureNet:
    """The feature network of data set ``data``: from ``path`` if given, else from the cache,
    else trained now and cached."""
    if path is not None:
        return load_feature_net(path, splits)
    kind, task = _choose(splits)
    cached = cache_dir() / "feature-nets" / f"{data}-{kind}-{fingerprint(splits, kind, task, epochs)}.safetensors"
    if cached.is_file():
        return load_feature_net(cached, splits)
    net, acc = train_feature_net(splits, kind, task, epochs, progress=progress)
    meta = {"kind": kind, "task": task, "accuracy": str(acc), "data": data, "epochs": str(epochs)}
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(cached, lambda tmp: save_file(state, tmp, metadata=meta))
    (cached.with_suffix(".json")).write_text(json.dumps(meta, indent=1) + "\n")
    return FeatureNet(net, kind, task, acc, cached)


@torch.no_grad()
def embed(fn: FeatureNet, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """float images (N, C, H, W) in [0, 1] (or uint8) -> (features (N, F), predicted class (N,))."""
    feats, preds = [], []
    net = fn.net.eval()
    head = net.net.fc2 if isinstance(net, LeNetFeatures) else net.head
    for part in images.split(batch):
        x = part.float() / 255 if part.dtype == torch.uint8 else part.float()
        f = net.features(x)
        feats.append(f)
        preds.append(head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)
