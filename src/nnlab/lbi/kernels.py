"""Fused CPU kernels for the SGD-flavour DessiLBI step.

``slbi_group_sgd`` (group-shrunk conv weights): one pass over each filter (row of ``C_out x K``)
does everything the rule needs::

    d     = momentum * buf + (1 - dampening) * grad        (buf <- d)
    Gamma = scale * V                                     (scale of the last step: Gamma rebuilt, not read)
    W     <- W - lr*kappa * (d + wd * W + (W - Gamma) / mu)
    V     <- V + (gamma_lr / mu) * (W_old - Gamma)        (and ||V_row||^2 on the way)
    scale <- kappa * max(0, 1 - lam / ||V_row||);  Gamma <- scale * V   (row still in cache)

so each step reads W, grad, buf, V and writes W, buf, V once: 7 memory passes, against 6 for
``torch.optim.SGD(momentum=0.9)``. The optimiser asks the kernel not to write Gamma at all
(``write_g=False``): Gamma is rebuilt from V and the scale when something reads it. When written,
Gamma goes out with streaming stores (it is not read), which saves the read-for-ownership of its
cache lines. ``torch.compile`` cannot fuse the per-row norm with the V update as tightly and
needs more passes.
``slbi_flat_sgd``: the same rule for linear weights (element-wise shrinkage, Gamma read) and the
plain momentum step for uncoupled params, in one loop each, so that a step makes no Python-level
op per tensor beyond one call.

The kernel is C++ built on first use (:mod:`nnlab.engine.cpp`; needs a C++ compiler and ninja, as
``torch.compile`` on CPU does); :func:`sgd_kernels` returns
``None`` where it cannot be built or run, and the optimiser then falls back to ``torch.compile``.
"""
from __future__ import annotations

import torch

from nnlab.engine.cpp import build_once

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <vector>
#include <cmath>
#include <cstdint>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

// One filter row of length K; MOM: with a momentum buffer. Returns ||V_row||^2 after the update.
template <bool MOM>
static inline float row_update(float* __restrict__ w, float* __restrict__ b, float* __restrict__ v,
                               const float* __restrict__ g, int64_t K, float s_old, float m, float keep,
                               float lrk, float inv_mu, float c, float wd) {
  float acc = 0.f;
  #pragma omp simd reduction(+:acc)
  for (int64_t k = 0; k < K; ++k) {
    float d = g[k];
    if (MOM) { d = b[k] * m + g[k] * keep; b[k] = d; }
    const float wk = w[k], vk = v[k];
    const float diff = wk - s_old * vk;
    const float vn = vk + c * diff;
    w[k] = wk - lrk * (d + wd * wk + diff * inv_mu);
    v[k] = vn;
    acc += vn * vn;
  }
  return acc;
}

// Gamma row <- f * V row. Gamma is not read by the step, so with AVX-512 it is written with
// streaming (non-temporal) stores: no read-for-ownership of its cache lines, one memory pass.
static inline void write_gamma(float* __restrict__ g, const float* __restrict__ v, int64_t K, float f) {
  int64_t k = 0;
#ifdef __AVX512F__
  for (; k < K && (reinterpret_cast<uintptr_t>(g + k) & 63) != 0; ++k) g[k] = f * v[k];
  const __m512 fv = _mm512_set1_ps(f);
  for (; k + 16 <= K; k += 16) _mm512_stream_ps(g + k, _mm512_mul_ps(fv, _mm512_loadu_ps(v + k)));
#endif
  for (; k < K; ++k) g[k] = f * v[k];
}

// All tensors float32, contiguous; w, g, b, v, gam: (rows, K); sc: (rows,).
// s: [momentum, 1 - dampening, lr*kappa, mu, gamma_lr, lam, kappa, weight_decay]
// write_g: also write Gamma = sc * V (else Gamma is left stale, for the caller to rebuild on demand).
void slbi_group_sgd(const at::Tensor& w, const at::Tensor& g, const at::Tensor& b, const at::Tensor& v,
                    const at::Tensor& gam, const at::Tensor& sc, std::vector<double> s, bool use_momentum,
                    bool write_g) {
  const int64_t rows = sc.numel(), K = w.numel() / rows;
  const float m = s[0], keep = s[1], lrk = s[2], mu = s[3], glr = s[4], lam = s[5], kappa = s[6], wd = s[7];
  const float c = glr / mu, inv_mu = 1.f / mu;
  float *W = w.data_ptr<float>(), *B = b.data_ptr<float>(), *V = v.data_ptr<float>();
  float *G = gam.data_ptr<float>(), *S = sc.data_ptr<float>();
  const float *D = g.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * K;
      const float acc = use_momentum
          ? row_update<true>(W + o, B + o, V + o, D + o, K, S[r], m, keep, lrk, inv_mu, c, wd)
          : row_update<false>(W + o, B + o, V + o, D + o, K, S[r], m, keep, lrk, inv_mu, c, wd);
      const float f = kappa * std::max(0.f, 1.f - lam / std::max(std::sqrt(acc), 1e-30f));
      S[r] = f;
      if (write_g) write_gamma(G + o, V + o, K, f);
    }
#ifdef __AVX512F__
    _mm_sfence();  // each worker orders its own streaming stores before the join
#endif
  });
}

// Linear weights (element-wise shrinkage: no reduction) and uncoupled params (plain momentum SGD),
// in blocks of 4096 elements. coupled: with V and Gamma (then v, gam are used, else ignored).
void slbi_flat_sgd(const at::Tensor& w, const at::Tensor& g, const at::Tensor& b, const at::Tensor& v,
                   const at::Tensor& gam, std::vector<double> s, bool use_momentum, bool coupled) {
  const int64_t n = w.numel();
  const float m = s[0], keep = s[1], lrk = s[2], mu = s[3], glr = s[4], lam = s[5], kappa = s[6], wd = s[7];
  const float c = glr / mu, inv_mu = 1.f / mu;
  float* __restrict__ W = w.data_ptr<float>();
  float* __restrict__ B = b.data_ptr<float>();
  const float* __restrict__ D = g.data_ptr<float>();
  float* __restrict__ V = coupled ? v.data_ptr<float>() : nullptr;
  float* __restrict__ G = coupled ? gam.data_ptr<float>() : nullptr;
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    #pragma omp simd
    for (int64_t k = i0; k < i1; ++k) {
      float d = D[k];
      if (use_momentum) { d = B[k] * m + D[k] * keep; B[k] = d; }
      const float wk = W[k];
      if (!coupled) { W[k] = wk - lrk * (d + wd * wk); continue; }
      const float diff = wk - G[k];
      const float vn = V[k] + c * diff;
      W[k] = wk - lrk * (d + wd * wk + diff * inv_mu);
      V[k] = vn;
      G[k] = kappa * (vn - std::min(std::max(vn, -lam), lam));
    }
  });
}

// In-place on their first tensors (the schemas say so, for anything that traces them).
TORCH_LIBRARY(nnlab_slbi, m) {
  m.def("slbi_group_sgd(Tensor(a!) w, Tensor g, Tensor(b!) b, Tensor(c!) v, Tensor(d!) gam, Tensor(e!) sc, "
        "float[] s, bool use_momentum, bool write_g) -> ()", &slbi_group_sgd);
  m.def("slbi_flat_sgd(Tensor(a!) w, Tensor g, Tensor(b!) b, Tensor(c!) v, Tensor(d!) gam, float[] s, "
        "bool use_momentum, bool coupled) -> ()", &slbi_flat_sgd);
}
"""

def sgd_kernels():
    """The built operators (``torch.ops.nnlab_slbi``: ``slbi_group_sgd``, ``slbi_flat_sgd``), or ``None``
    (with one warning) if they cannot be built."""
    return build_once("nnlab_slbi", _SOURCE, "torch.compile")


def kernel_applies(p: torch.Tensor) -> bool:
    """Whether ``p`` (and its state tensors, made like it) can take the fused kernel."""
    return p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() and p.numel() > 0
