"""A fused CPU kernel for the SGD-flavour DessiLBI step of group-shrunk (conv) weights.

One pass over each filter (row of ``C_out x K``) does everything the rule needs::

    d     = momentum * buf + (1 - dampening) * grad        (buf <- d)
    Gamma = scale * V                                     (scale of the last step: Gamma rebuilt, not read)
    W     <- W - lr*kappa * (d + wd * W + (W - Gamma) / mu)
    V     <- V + (gamma_lr / mu) * (W_old - Gamma)        (and ||V_row||^2 on the way)
    scale <- kappa * max(0, 1 - lam / ||V_row||);  Gamma <- scale * V   (row still in cache)

so each step reads W, grad, buf, V and writes W, buf, V, Gamma once: 8 memory passes, against 6
for ``torch.optim.SGD(momentum=0.9)``. ``torch.compile`` cannot fuse the per-row norm with the
Gamma write and needs a ninth pass (:func:`nnlab.lbi.optim._materialize_gamma`).

The kernel is C++ built on first use with :func:`torch.utils.cpp_extension.load_inline` (needs a
C++ compiler and ninja, as ``torch.compile`` on CPU does); :func:`group_sgd_kernel` returns
``None`` where it cannot be built or run, and the optimiser then falls back to ``torch.compile``.
"""
from __future__ import annotations

import warnings

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
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
void slbi_group_sgd(torch::Tensor w, torch::Tensor g, torch::Tensor b, torch::Tensor v,
                    torch::Tensor gam, torch::Tensor sc, std::vector<double> s, bool use_momentum) {
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
      write_gamma(G + o, V + o, K, f);
    }
  });
#ifdef __AVX512F__
  _mm_sfence();  // order the streaming stores before anyone reads Gamma
#endif
}
"""

_STATE: dict = {}


def _build():
    from torch.utils.cpp_extension import load_inline

    return load_inline("nnlab_slbi_kernels", cpp_sources=_SOURCE, functions=["slbi_group_sgd"],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


def group_sgd_kernel():
    """The built ``slbi_group_sgd`` function, or ``None`` (with one warning) if it cannot be built."""
    if "fn" not in _STATE:
        try:
            _STATE["fn"] = _build().slbi_group_sgd
        except Exception as err:  # no compiler, no ninja, no write access to the build cache
            warnings.warn(f"DessiLBI fused CPU kernel unavailable ({type(err).__name__}: {err}); "
                          "falling back to torch.compile", RuntimeWarning, stacklevel=2)
            _STATE["fn"] = None
    return _STATE["fn"]


def kernel_applies(p: torch.Tensor) -> bool:
    """Whether ``p`` (and its state tensors, made like it) can take the fused kernel."""
    return p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() and p.numel() > 0
