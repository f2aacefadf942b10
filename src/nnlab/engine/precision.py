"""Training precision: bf16 autocast where the hardware runs it natively, float32 elsewhere.

GPUs run bf16 natively. On CPUs, bf16 matrix products are fast only with AMX or AVX512-BF16
(``benchmarks/bench_precision.py`` on a 2-core Intel Xeon with AMX: a 1024^3 matmul at about 1,150
GFLOP/s in bf16 against 150-250 in float32; cnn-fast-cifar's training step 3.3x float32's speed in
bf16 with channels-last memory; BENCHMARKS.md, "Session 28"). Without them PyTorch emulates bf16 and is slower
than float32, so nnlab then keeps float32 and says so. The vit-cifar-cpu training step runs 1.5x
float32's speed in bf16 on that host, once its attention runs in float32 (``nnlab.models.vit.attention_fast``:
torch's bf16 CPU flash-attention backward is 7x slower than float32's, and made the step 0.85-0.90x).
"""
from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext

import torch


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 matrix products natively (any CUDA GPU; a CPU with AMX
    tiles or AVX512-BF16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def use_bf16(requested: bool, device: torch.device | str, what: str = "--bf16") -> bool:
    """``requested`` where ``device`` has native bf16; otherwise False, with a warning when it was requested."""
    if requested and not native_bf16(device):
        warnings.warn(f"{what}: this {torch.device(device).type} has no native bf16 (AMX or AVX512-BF16), "
                      "where bf16 is slower than float32; computing in float32", stacklevel=3)
        return False
    return requested


def bf16_autocast(enabled: bool, device: torch.device | str) -> AbstractContextManager:
    """``torch.autocast`` to bf16 on ``device``'s type when ``enabled``, else a no-op context."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if enabled else nullcontext()
