"""Fused CPU kernel for the causal AFT-simple forward when no gradient is needed (inference, prefill).

The eager scan in aft_ops makes ~12 passes over (T, D) data (exp, multiply, chunked matmuls, divide,
sigmoid, ...). Here one loop per (batch row, feature slice) walks t in order with a running maximum m,
numerator and denominator (an online softmax):

    m' = max(m, k_t);  num = num * exp(m - m') + exp(k_t - m') v_t;  den likewise;  y_t = sigmoid(q_t) num / den

so every row of q, k, v is read once and y written once. den >= 1 after the first valid key (that key
contributes exp(0)), so nothing underflows to 0/0; masked keys never move m and add exactly 0; a row that
has seen no valid key returns 0. The exp is a branch-free polynomial (Cody-Waite reduction, ~1 ulp) on
non-positive arguments, which gcc vectorizes.

The kernel is compiled on first use with torch.utils.cpp_extension.load_inline (needs a C++ compiler and
ninja; ~40 s once, then cached by torch). If that fails, or AFT_FUSED_KERNELS=0 is set, aft_ops keeps
its eager path: results agree to float32 rounding either way (tests/test_kernels.py).

Only stdlib and torch are imported: this folder is copied next to checkpoints (trust_remote_code).
"""

import os
import shutil
import sysconfig
import threading
import warnings

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// exp(x) for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for exp(r), 2^n from the exponent
// bits. Clamped at -87 (exp(-87) ~ 1.6e-38, the smallest normal float): the caller's sums are >= 1, so the clamp
// changes them by < 1e-37 relative.
static inline float exp_nonpos(float x) {
  x = std::fmax(x, -87.0f);
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f - 0.5f));  // round, x <= 0
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// One batch row, features [0, n) of a row of D: t in order, so each row of q, k, v is one contiguous read.
static void scan_slice(const float* __restrict q, const float* __restrict k, const float* __restrict v,
                       const bool* valid, float* __restrict y, int64_t L, int64_t D, int64_t n) {
  const float none = -1e30f;  // "no key yet": finite, so no inf - inf
  std::vector<float> state(3 * n);
  float* __restrict m = state.data();
  float* __restrict num = m + n;
  float* __restrict den = num + n;
  for (int64_t j = 0; j < n; ++j) { m[j] = none; num[j] = 0.f; den[j] = 0.f; }
  for (int64_t t = 0; t < L; ++t) {
    const float* __restrict kr = k + t * D;
    const float* __restrict vr = v + t * D;
    const float* __restrict qr = q + t * D;
    float* __restrict yr = y + t * D;
    if (valid == nullptr || valid[t]) {  // a masked key leaves m, num and den as they are
      for (int64_t j = 0; j < n; ++j) {
        const float kj = kr[j];
        const float diff = kj - m[j];
        const float ex = exp_nonpos(-std::fabs(diff));
        const float rescale = diff > 0.f ? ex : 1.f;
        const float add = diff > 0.f ? 1.f : ex;
        num[j] = num[j] * rescale + add * vr[j];
        den[j] = den[j] * rescale + add;
        m[j] = std::fmax(m[j], kj);
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const float x = qr[j];
      const float ez = exp_nonpos(-std::fabs(x));  // sigmoid(x) = (x > 0 ? 1 : ez) / (1 + ez), never overflows
      const float gate = x > 0.f ? 1.f : ez;
      yr[j] = den[j] > 0.f ? gate * num[j] / (den[j] * (1.f + ez)) : 0.f;
    }
  }
}

torch::Tensor causal_simple_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                    c10::optional<torch::Tensor> valid) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "contiguous q, k, v expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "float32 expected");
  auto y = torch::empty_like(q);
  const int64_t B = q.size(0), L = q.size(1), D = q.size(2);
  const int64_t slice = std::min<int64_t>(D, 256), slices = (D + slice - 1) / slice;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const bool* mp = valid.has_value() ? valid->data_ptr<bool>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B * slices, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t job = lo; job < hi; ++job) {
      const int64_t b = job / slices, d0 = (job % slices) * slice, offset = b * L * D + d0;
      scan_slice(qp + offset, kp + offset, vp + offset, mp ? mp + b * L : nullptr, yp + offset, L, D,
                 std::min(slice, D - d0));
    }
  });
  return y;
}
"""

# -ffinite-math-only lets gcc vectorize fmax/fabs and the selects; the kernel never produces inf or NaN
# from finite inputs (the operators' contract), and the "no key yet" maximum is a finite -1e30.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffinite-math-only"]
_lock = threading.Lock()
_module = None
_failed = False


def _enabled() -> bool:
    return os.environ.get("AFT_FUSED_KERNELS", "1") != "0"


def _load():
    """The compiled extension, or None (disabled, or it could not be built: warned once)."""
    global _module, _failed
    if _module is not None or _failed or not _enabled():
        return _module
    with _lock:
        if _module is None and not _failed:
            try:
                _put_ninja_on_path()
                from torch.utils.cpp_extension import load_inline

                _module = load_inline("modeling_aft_fused_v4", cpp_sources=_SOURCE,
                                      functions=["causal_simple_forward"], extra_cflags=_FLAGS, verbose=False)
            except Exception as error:  # no compiler, no ninja, a read-only cache: the eager path still works
                _failed = True
                warnings.warn(f"modeling_aft: fused CPU kernel unavailable, using the eager scan ({error})",
                              RuntimeWarning, stacklevel=3)
    return _module


def _put_ninja_on_path():
    """torch runs `ninja` from PATH; pip puts the ninja package's launcher in this environment's scripts folder,
    which is not on PATH when the interpreter is called by its full path (as `make test` does)."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def fused_causal_simple_available() -> bool:
    """True when the fused kernel is (or can be) compiled here and AFT_FUSED_KERNELS is not 0."""
    return _load() is not None


def fused_causal_simple(q, k, v, key_mask=None):
    """Causal AFT-simple forward (gated by sigmoid(q)) with the fused kernel, or None when it does not apply:
    not a CPU float32 call, a gradient is needed, or the kernel is unavailable. q, k, v (B, T, D)."""
    tensors = (q, k, v)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    module = _load()
    if module is None:
        return None
    valid = None if key_mask is None else key_mask.to(device=q.device, dtype=torch.bool).contiguous()
    return module.causal_simple_forward(q.contiguous(), k.contiguous(), v.contiguous(), valid)
