"""The data contract: registry, mnist-5k, BatchLoader order/resume/sharding, transforms."""
import pytest
import torch

from nnlab.data import DATASETS, BatchLoader, ImageSet, load_dataset
from nnlab.data.transforms import (Compose, Normalize, RandomCrop, RandomHorizontalFlip, Resize,
                                   random_crop_reference, train_transform)
from nnlab.errors import ConfigError, DataError


def tiny(n=10):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return ImageSet(images, torch.arange(n), [str(i) for i in range(n)])


def test_registry_names_and_unknown():
    assert DATASETS.names() == ["celeba64", "cifar10", "imagefolder", "mnist", "mnist-5k"]
    with pytest.raises(ConfigError, match="unknown data set 'svhn'; choose one of: celeba64"):
        load_dataset("svhn")


def test_mnist5k_split_is_balanced():
    d = load_dataset("mnist-5k")
    assert (len(d.train), len(d.test), d.shape) == (4000, 1000, (1, 28, 28))
    assert torch.bincount(d.train.labels).tolist() == [400] * 10
    assert torch.bincount(d.test.labels).tolist() == [100] * 10


def test_loader_order_depends_on_seed_and_epoch_only():
    data = tiny()
    a, b = BatchLoader(data, 3, shuffle=True, seed=1), BatchLoader(data, 3, shuffle=True, seed=1)
    first = torch.cat([y for _, y in a])
    assert torch.equal(first, torch.cat([y for _, y in b])) and sorted(first.tolist()) == list(range(10))
    a.set_epoch(1)
    assert not torch.equal(first, torch.cat([y for _, y in a]))
    x, y = next(iter(BatchLoader(data, 4)))
    assert x.dtype == torch.float32 and torch.allclose(x[:, 0, 0, 0], y.float() / 255)


def test_iter_from_resumes_mid_epoch_with_same_augmentation():
    data = tiny(12)
    loader = BatchLoader(data, 4, shuffle=True, seed=3, transform=RandomHorizontalFlip())
    loader.set_epoch(2)
    full = list(loader)
    rest = list(loader.iter_from(1))
    assert len(rest) == 2 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
                                  for p, q in zip(full[1:], rest))


def test_ranks_partition_the_batches():
    data = tiny(12)
    seen = [torch.cat([y for _, y in BatchLoader(data, 3, shuffle=True, rank=r, world_size=2)])
            for r in range(2)]
    assert sorted(torch.cat(seen).tolist()) == list(range(12)) and len(seen[0]) == len(seen[1]) == 6
    assert len(BatchLoader(data, 5, drop_last=True)) == 2 and len(BatchLoader(data, 5)) == 3
    with pytest.raises(DataError, match="batch size must be at least 1"):
        BatchLoader(data, 0)


def test_random_crop_matches_reference():
    x = torch.randn(6, 3, 8, 8)
    fast = RandomCrop(8, padding=2)(x, torch.Generator().manual_seed(5))
    ref = random_crop_reference(x, torch.Generator().manual_seed(5), 8, 2)
    assert fast.shape == (6, 3, 8, 8) and torch.equal(fast, ref)
    assert not torch.equal(fast, x)  # some image was shifted


def test_flip_normalize_resize():
    x = torch.rand(64, 2, 3, 5)
    out = RandomHorizontalFlip(p=0.5)(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert (flipped | kept).all() and 10 < flipped.sum() < 54
    n = Normalize((0.5, 0.25), (0.5, 2.0))(x)
    assert torch.allclose(n[:, 1], (x[:, 1] - 0.25) / 2.0)
    assert Resize(7)(x).shape == (64, 2, 7, 7) and Resize(5)(torch.rand(1, 1, 5, 5)).shape == (1, 1, 5, 5)
    t = train_transform((0.5,), (0.5,), image_size=28, augment=True, flip=False)
    assert isinstance(t, Compose) and t(torch.rand(2, 1, 28, 28), torch.Generator()).shape == (2, 1, 28, 28)


def test_train_transform_crop_padding():
    x = torch.rand(16, 1, 28, 28)
    same = train_transform((0.0,), (1.0,), image_size=28, augment=True, flip=False, padding=0)
    assert torch.equal(same(x, torch.Generator().manual_seed(0)), x)  # padding 0: no shift
    default = train_transform((0.0,), (1.0,), image_size=28, augment=True, flip=False)
    four = train_transform((0.0,), (1.0,), image_size=28, augment=True, flip=False, padding=4)
    assert torch.equal(default(x, torch.Generator().manual_seed(3)), four(x, torch.Generator().manual_seed(3)))
    two = train_transform((0.0,), (1.0,), image_size=28, augment=True, flip=False, padding=2)
    assert not torch.equal(two(x, torch.Generator().manual_seed(3)), four(x, torch.Generator().manual_seed(3)))
