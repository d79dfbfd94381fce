"""Fused CPU kernels for the causal AFT-simple and AFT-conv forward when no gradient is needed (inference, prefill).

The eager scans in aft_ops make ~12 passes over (T, D) data (exp, multiply, chunked matmuls, divide, sigmoid, ...).
Here one loop per (batch row, feature slice or head) walks t in order.

AFT-simple keeps a running maximum m, numerator and denominator (an online softmax):

    m' = max(m, k_t);  num = num * exp(m - m') + exp(k_t - m') v_t;  den likewise;  y_t = sigmoid(q_t) num / den

so every row of q, k, v is read once and y written once. den >= 1 after the first valid key (that key contributes
exp(0)), so nothing underflows to 0/0.

AFT-conv keeps the keys older than the kernel span in such a running prefix sum and adds the span's s keys per row
with weights exp(k - max k) * exp(w - max(0, max w)) (both factors <= 1 and exact in float32); a row whose den would
underflow (the largest key meeting a very negative bias) is redone with the single shift max(k + w).

In both, masked keys add exactly 0 and never move a maximum, and a row that has seen no valid key returns 0. The exp
is a branch-free polynomial (Cody-Waite reduction, ~1 ulp) on non-positive arguments, which gcc vectorizes.

The kernels are compiled on first use with torch.utils.cpp_extension.load_inline (needs a C++ compiler and ninja;
~40 s once, then cached by torch). If that fails, or AFT_FUSED_KERNELS=0 is set, aft_ops keeps its eager path:
results agree to float32 rounding either way (tests/test_kernels.py).

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

// Causal AFT-conv, one batch row and one head: q, v, y point at the head's first feature of row 0 (row stride D),
// k at the head's key channel of row 0 (row stride h); w[d] is the bias of offset t - t' = d < s, 0 beyond.
// Keys older than the kernel span sit in a running prefix sum (own running maximum); row t is shifted by the maximum
// of k + w over everything it sees, so every weight is <= 1 and the largest is exactly 1: den >= 1, nothing to
// underflow. O(s Dv) per row and head.
static void conv_head(const float* __restrict q, const float* __restrict k, const float* __restrict v,
                      const bool* valid, const float* __restrict w, int64_t s, float* __restrict y,
                      int64_t L, int64_t D, int64_t h, int64_t Dv) {
  const float none = -1e30f;
  // the head's keys as one contiguous column (a masked key: weight 0 and key `none`, so it never sets the shift)
  std::vector<float> buffers(2 * Dv + 2 * L + 2 * s, 0.f);
  float* __restrict prefix = buffers.data();
  float* __restrict acc = prefix + Dv;
  float* __restrict keys = acc + Dv;
  float* __restrict use = keys + L;
  float* __restrict e = use + L;           // this row's span weights, e[d] for key t - d
  float* __restrict score = e + s;
  for (int64_t t = 0; t < L; ++t) {
    use[t] = (valid == nullptr || valid[t]) ? 1.f : 0.f;
    keys[t] = use[t] > 0.f ? k[t * h] : none;
  }
  // bias weights under the bias shift max(0, max w) (keys outside the span have bias 0): all <= 1
  float bias_shift = 0.f;
  for (int64_t d = 0; d < s; ++d) bias_shift = std::fmax(bias_shift, w[d]);
  std::vector<float> bias_weights(s);
  float* __restrict bias_weight = bias_weights.data();
  for (int64_t d = 0; d < s; ++d) bias_weight[d] = exp_nonpos(w[d] - bias_shift);
  const float outside_weight = exp_nonpos(-bias_shift);
  float prefix_den = 0.f, prefix_max = none;
  for (int64_t t = 0; t < L; ++t) {
    const int64_t leaving = t - s;  // the key that moves from the kernel span into the prefix
    if (leaving >= 0 && use[leaving] > 0.f) {
      const float kl = keys[leaving];
      const float rescale = kl > prefix_max ? exp_nonpos(prefix_max - kl) : 1.f;
      const float add = kl > prefix_max ? 1.f : exp_nonpos(kl - prefix_max);
      prefix_max = std::fmax(prefix_max, kl);
      prefix_den = prefix_den * rescale + add;
      const float* __restrict vl = v + leaving * D;
      for (int64_t j = 0; j < Dv; ++j) prefix[j] = prefix[j] * rescale + add * vl[j];
    }
    const int64_t span = std::min<int64_t>(s, t + 1);
    // weights exp(k - key_shift) * exp(w - bias_shift): each factor exact however large k or w (their sum would lose
    // digits in float32); should den underflow (the largest key meets a very negative w), the row is redone with the
    // single shift max(k + w) over what it sees, which keeps den >= 1.
    float key_shift = prefix_den > 0.f ? prefix_max : none;
    for (int64_t d = 0; d < span; ++d) key_shift = std::fmax(key_shift, keys[t - d]);
    float* __restrict yr = y + t * D;
    if (key_shift <= 0.5f * none) {  // no valid key visible yet
      for (int64_t j = 0; j < Dv; ++j) yr[j] = 0.f;
      continue;
    }
    float den = 0.f, prefix_scale = 0.f;
    for (int64_t d = 0; d < span; ++d) {
      e[d] = exp_nonpos(keys[t - d] - key_shift) * bias_weight[d] * use[t - d];  // exactly 0 for a masked key
      den += e[d];
    }
    if (prefix_den > 0.f) prefix_scale = exp_nonpos(prefix_max - key_shift) * outside_weight;
    den += prefix_den * prefix_scale;
    if (den < 1e-20f) {
      float shift = prefix_den > 0.f ? prefix_max : none;
      for (int64_t d = 0; d < span; ++d) score[d] = keys[t - d] + w[d];
      for (int64_t d = 0; d < span; ++d) shift = std::fmax(shift, score[d]);
      den = 0.f;
      for (int64_t d = 0; d < span; ++d) {
        e[d] = exp_nonpos(score[d] - shift) * use[t - d];
        den += e[d];
      }
      prefix_scale = prefix_den > 0.f ? exp_nonpos(prefix_max - shift) : 0.f;
      den += prefix_den * prefix_scale;
    }
    for (int64_t j = 0; j < Dv; ++j) acc[j] = prefix[j] * prefix_scale;
    int64_t d = 0;
    for (; d + 4 <= span; d += 4) {  // four keys per pass over acc
      const float *v0 = v + (t - d) * D, *v1 = v0 - D, *v2 = v1 - D, *v3 = v2 - D;
      const float e0 = e[d], e1 = e[d + 1], e2 = e[d + 2], e3 = e[d + 3];
      for (int64_t j = 0; j < Dv; ++j) acc[j] += e0 * v0[j] + e1 * v1[j] + e2 * v2[j] + e3 * v3[j];
    }
    for (; d < span; ++d) {
      const float* __restrict vd = v + (t - d) * D;
      const float ed = e[d];
      for (int64_t j = 0; j < Dv; ++j) acc[j] += ed * vd[j];
    }
    const float* __restrict qr = q + t * D;
    for (int64_t j = 0; j < Dv; ++j) {
      const float x = qr[j];
      const float ez = exp_nonpos(-std::fabs(x));
      const float gate = x > 0.f ? 1.f : ez;
      yr[j] = gate * acc[j] / (den * (1.f + ez));
    }
  }
}

torch::Tensor causal_conv1d_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kernel,
                                    c10::optional<torch::Tensor> valid) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && kernel.is_contiguous(),
              "contiguous q, k, v, kernel expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kernel.scalar_type() == at::kFloat, "float32 expected");
  auto y = torch::empty_like(q);
  const int64_t B = q.size(0), L = q.size(1), D = q.size(2), h = kernel.size(0), s = kernel.size(1), Dv = D / h;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* wp = kernel.data_ptr<float>();
  const bool* mp = valid.has_value() ? valid->data_ptr<bool>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B * h, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t job = lo; job < hi; ++job) {
      const int64_t b = job / h, i = job % h, offset = b * L * D + i * Dv;
      conv_head(qp + offset, kp + b * L * h + i, vp + offset, mp ? mp + b * L : nullptr, wp + i * s, s,
                yp + offset, L, D, h, Dv);
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

                _module = load_inline("modeling_aft_fused_v7", cpp_sources=_SOURCE,
                                      functions=["causal_simple_forward", "causal_conv1d_forward"],
                                      extra_cflags=_FLAGS, verbose=False)
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


def _module_for(*tensors):
    """The compiled module when a fused kernel applies to these inputs (CPU, float32, no gradient needed), else None."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return _load()


def _valid_keys(key_mask, device):
    return None if key_mask is None else key_mask.to(device=device, dtype=torch.bool).contiguous()


def fused_causal_simple(q, k, v, key_mask=None):
    """Causal AFT-simple forward (gated by sigmoid(q)) with the fused kernel, or None when it does not apply.
    q, k, v (B, T, D)."""
    module = _module_for(q, k, v)
    if module is None:
        return None
    return module.causal_simple_forward(q.contiguous(), k.contiguous(), v.contiguous(), _valid_keys(key_mask, q.device))


def fused_causal_conv1d(q, k, v, kernel, key_mask=None):
    """Causal AFT-conv forward (gated by sigmoid(q)) with the fused kernel, or None when it does not apply.
    q, v (B, T, D); k (B, T, h); kernel (h, s): kernel[i, d] is head i's bias at offset t - t' = d."""
    module = _module_for(q, k, v, kernel)
    if module is None:
        return None
    return module.causal_conv1d_forward(q.contiguous(), k.contiguous(), v.contiguous(), kernel.contiguous(),
                                        _valid_keys(key_mask, q.device))
