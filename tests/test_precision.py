"""Training precision (nnlab.engine.precision): bf16 only where the hardware has it, float32 with a
warning elsewhere; and channels-last memory, which must not change what a run computes."""
from __future__ import annotations

import warnings

import pytest
import torch

from nnlab.engine import precision
from nnlab.engine.callbacks import Callback
from nnlab.engine.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _cpu_has(monkeypatch, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)


@pytest.mark.parametrize("amx,avx", [(True, False), (False, True)])
def test_bf16_is_used_on_cpus_with_native_bf16(monkeypatch, amx, avx):
    _cpu_has(monkeypatch, amx, avx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.use_bf16(True, "cpu") and not precision.use_bf16(False, "cpu")


def test_bf16_falls_back_to_float32_with_a_warning_elsewhere(monkeypatch):
    _cpu_has(monkeypatch, False, False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert not precision.use_bf16(True, "cpu")
    assert precision.native_bf16("cuda")


def test_autocast_context_computes_matmuls_in_bf16_only_when_enabled():
    a = torch.randn(4, 8)
    with precision.bf16_autocast(True, "cpu"):
        assert (a @ a.T).dtype == torch.bfloat16
    with precision.bf16_autocast(False, "cpu"):
        assert (a @ a.T).dtype == torch.float32


def test_channels_last_runs_train_the_same_weights(tmp_path):
    """A small CNN trained for one epoch in NCHW and in NHWC memory: the same weights up to float
    reordering (a layout bug, e.g. a permuted image, would change them completely)."""
    base = dict(model="lenet5", data="mnist-5k", epochs=1, batch_size=32, train_limit=256, test_limit=100,
                lr=0.05, progress=False, device="cpu")
    runs = [train(TrainConfig(**base, channels_last=cl), tmp_path / str(cl)).model for cl in (False, True)]
    for (name, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-3), name   # 2e-4 apart after 8 steps here


class _Dtypes(Callback):
    """The dtype of a linear layer's output in each training forward."""

    def on_train_start(self, ctx) -> None:
        self.seen = []
        ctx.model.fc1.register_forward_hook(lambda mod, args, out: self.seen.append(out.dtype))


@pytest.mark.parametrize("native", [True, False])
def test_a_bf16_run_on_the_cpu_computes_in_bf16_only_where_native(tmp_path, monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    probe = _Dtypes()
    config = TrainConfig(model="lenet5", data="mnist-5k", epochs=1, batch_size=64, train_limit=128, test_limit=64,
                         progress=False, device="cpu", bf16=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(config, tmp_path / "r", callbacks=[probe])
    assert probe.seen[:2] == [torch.bfloat16 if native else torch.float32] * 2
