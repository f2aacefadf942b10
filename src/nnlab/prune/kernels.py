"""A fused CPU kernel for ToMe's size-weighted merge (:func:`nnlab.prune.tome.merge_weighted`).

The torch version is about 40 small operations per block (weighting, two merges of rows and
sizes, the division), each with a fresh temporary; on the project's CPU one merge of a 64 x 65 x
192 batch took 1.3-6.5 ms (the slow case: page faults of freshly mapped temporaries), which is
10-25% of a ToMe block at ratio 0.5. The kernel writes the merged tokens and sizes in one pass
per image: unmerged A rows copied, B rows weighted, sources added, then divided by the summed
sizes. Inference only (no autograd), float32, CPU; :func:`merge_weighted` falls back to the torch
version everywhere else, and :func:`nnlab.prune.tome.merge_weighted_reference` is the loop twin the
tests compare both with. Built on first use (:mod:`nnlab.engine.cpp`).
"""
from __future__ import annotations

import torch

from nnlab.engine.cpp import build_once
from nnlab.prune import tome

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <cstring>
#include <vector>

// x (B, T, C) f32, size (B, T) f32; src, dst (B, r), unm (B, nu) int64 positions in A / B
// (A token j = x token 2j, B token j = x token 2j+1). Returns merged (B, nu + Tb, C), sizes (B, nu + Tb).
std::vector<at::Tensor> tome_merge_weighted(const at::Tensor& x, const at::Tensor& size, const at::Tensor& src,
                                            const at::Tensor& dst, const at::Tensor& unm) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), Tb = T / 2;
  const int64_t r = src.size(1), nu = unm.size(1), To = nu + Tb;
  auto out = at::empty({B, To, C}, x.options());
  auto sizes = at::empty({B, To}, x.options());
  const float* X = x.data_ptr<float>();
  const float* S = size.data_ptr<float>();
  const int64_t* SRC = src.data_ptr<int64_t>();
  const int64_t* DST = dst.data_ptr<int64_t>();
  const int64_t* UNM = unm.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();
  float* N = sizes.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = X + b * T * C;
      const float* sb = S + b * T;
      float* ob = O + b * To * C;
      float* nb = N + b * To;
      for (int64_t j = 0; j < nu; ++j) {          // unmerged A tokens, as they are
        const int64_t t = 2 * UNM[b * nu + j];
        std::memcpy(ob + j * C, xb + t * C, C * sizeof(float));
        nb[j] = sb[t];
      }
      float* obb = ob + nu * C;
      float* nbb = nb + nu;
      for (int64_t j = 0; j < Tb; ++j) {          // B tokens, weighted by their size
        const int64_t t = 2 * j + 1;
        const float s = sb[t];
        nbb[j] = s;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) obb[j * C + c] = xb[t * C + c] * s;
      }
      for (int64_t k = 0; k < r; ++k) {           // merged A tokens, added to their B token
        const int64_t t = 2 * SRC[b * r + k], d = DST[b * r + k];
        const float s = sb[t];
        nbb[d] += s;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) obb[d * C + c] += xb[t * C + c] * s;
      }
      for (int64_t j = 0; j < Tb; ++j) {          // back to averages
        const float inv = 1.0f / nbb[j];
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) obb[j * C + c] *= inv;
      }
    }
  });
  return {out, sizes};
}

TORCH_LIBRARY(nnlab_tome, m) {
  m.def("tome_merge_weighted(Tensor x, Tensor size, Tensor src, Tensor dst, Tensor unm) -> Tensor[]", &tome_merge_weighted);
}
"""


def merge_kernel():
    """The built operators (``torch.ops.nnlab_tome``: ``tome_merge_weighted``), or ``None`` (with one
    warning) if they cannot be built."""
    return build_once("nnlab_tome", _SOURCE, "the torch ToMe merge")


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether tokens x (B, T, C) can take the fused merge: CPU float32 and no gradient wanted."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)


def merge_weighted(x: torch.Tensor, size: torch.Tensor, plan: tome.MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nnlab.prune.tome.merge_weighted` (x (B, T, C), size (B, T, 1), a ``MergePlan``) through
    the fused kernel where it applies and builds, else through the torch version."""
    mod = merge_kernel() if kernel_applies(x) else None
    if mod is None:
        return tome.merge_weighted(x, size, plan)
    b, t, _ = x.shape
    _check_plan(plan, b, t)  # the kernel does not bound-check its indices
    out, sizes = mod.tome_merge_weighted(x.contiguous(), size.reshape(b, t).contiguous(), plan.src.contiguous(),
                                         plan.dst.contiguous(), plan.unmerged.contiguous())
    return out, sizes.unsqueeze(-1)


def _check_plan(plan: tome.MergePlan, batch: int, tokens: int) -> None:
    """ValueError unless ``plan`` fits tokens (batch, tokens, C): every A index below ceil(T / 2), every
    B index below T // 2, one row per image."""
    a, b = (tokens + 1) // 2, tokens // 2
    for name, idx, bound in (("src", plan.src, a), ("unmerged", plan.unmerged, a), ("dst", plan.dst, b)):
        if idx.shape[0] != batch or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= bound)):
            raise ValueError(f"ToMe merge plan does not fit {batch} x {tokens} tokens ({name} out of range); "
                             "make the plan with tome.bipartite_soft_matching on the same tokens")
