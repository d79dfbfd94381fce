"""Fused CPU kernels for the causal AFT-simple and AFT-conv operators, forward and backward.

The eager scans in aft_ops make ~12 passes over (T, D) data (exp, multiply, chunked matmuls, divide, sigmoid, ...)
and keep a segment's buffers and carries for the backward. Here one loop per (batch row, feature slice or head) walks
t in order.

AFT-simple keeps a running maximum m, numerator and denominator (an online softmax):

    m' = max(m, k_t);  num = num * exp(m - m') + exp(k_t - m') v_t;  den likewise;  y_t = sigmoid(q_t) num / den

so every row of q, k, v is read once and y written once. den >= 1 after the first valid key (that key contributes
exp(0)), so nothing underflows to 0/0.

AFT-conv keeps the keys older than the kernel span in such a running prefix sum and adds the span's s keys per row
with weights exp(k - max k) * exp(w - max(0, max w)) (both factors <= 1 and exact in float32); a row whose den would
underflow (the largest key meets a very negative bias) is redone with the single shift max(k + w).

The backward passes save nothing but the inputs: they rerun the forward scan, writing its per-row state (r = num /
den, maxima, den) into the gradient buffers they are about to fill, then walk t backwards with a reverse scan
rescaled by exp(m_t - m_{t+1}) <= 1, overwriting that state with dq, dk, dv row by row. A training step's operator
memory is therefore y, dq, dk, dv (and, for AFT-conv, a few floats per row and head): what SDPA holds.

In all of them masked keys add exactly 0 and never move a maximum, and a row that has seen no valid key returns 0
(and passes no gradient on). The exp is a branch-free polynomial (Cody-Waite reduction, ~1 ulp) on non-positive
arguments, which gcc vectorizes.

The kernels are compiled on first use with torch.utils.cpp_extension.load_inline (needs a C++ compiler and ninja;
~45 s once, then cached by torch). If that fails, or AFT_FUSED_KERNELS=0 is set, aft_ops keeps its eager path:
results agree to float32 rounding either way (tests/test_kernels.py).

Only stdlib and torch are imported: this folder is copied next to checkpoints (trust_remote_code).
"""

import os
import shutil
import sysconfig
import threading
import warnings

import torch
from torch.autograd.function import once_differentiable

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#define KERNEL_INLINE __attribute__((always_inline)) inline

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

// sigmoid(x) and sigmoid'(x) = sigmoid(x) (1 - sigmoid(x)) without overflow: ez = exp(-|x|) <= 1.
static inline float sigmoid_of(float x, float ez) { return (x > 0.f ? 1.f : ez) / (1.f + ez); }
static inline float sigmoid_slope(float ez) { return ez / ((1.f + ez) * (1.f + ez)); }

// One batch row, features [0, n) of a row of D: t in order, so each row of q, k, v is one contiguous read.
// Forward (m_out == nullptr): y = sigmoid(q) num / den. For the backward (m_out, den_out given): the ungated
// r = num / den goes to y, and the running maximum and den of every row to m_out, den_out (same layout as y).
static void scan_slice(const float* __restrict q, const float* __restrict k, const float* __restrict v,
                       const bool* valid, float* __restrict y, int64_t L, int64_t D, int64_t n,
                       float* __restrict m_out = nullptr, float* __restrict den_out = nullptr) {
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
    if (m_out != nullptr) {
      for (int64_t j = 0; j < n; ++j) {
        yr[j] = den[j] > 0.f ? num[j] / den[j] : 0.f;
        m_out[t * D + j] = m[j];
        den_out[t * D + j] = den[j];
      }
      continue;
    }
    for (int64_t j = 0; j < n; ++j) {  // one division per element: sigmoid's and den's denominators multiplied
      const float x = qr[j];
      const float ez = exp_nonpos(-std::fabs(x));
      const float gate = x > 0.f ? 1.f : ez;
      yr[j] = den[j] > 0.f ? gate * num[j] / (den[j] * (1.f + ez)) : 0.f;
    }
  }
}

// Backward of scan_slice, writing only dq, dk, dv (each laid out like q). With p[t, s] = exp(k_s - m_t) / den_t the
// weight of key s in row t and a_t = g_t sigmoid(q_t):
//   dv_s = sum_{t >= s} a_t p[t, s],   dk_s = sum_{t >= s} a_t p[t, s] (v_s - r_t).
// A reverse scan carries U_s = sum_{t >= s} a_t / den_t exp(m_s - m_t) (and W_s likewise with a_t r_t), rescaled by
// exp(m_s - m_{s+1}) <= 1 (the running maximum never falls), so dv_s = exp(k_s - m_s) U_s: every factor <= 1.
// The forward's r, m and den are recomputed into dq, dk and dv first and overwritten row by row on the way back.
static void scan_slice_backward(const float* __restrict q, const float* __restrict k, const float* __restrict v,
                                const float* __restrict g, const bool* valid, float* __restrict dq,
                                float* __restrict dk, float* __restrict dv, int64_t L, int64_t D, int64_t n) {
  scan_slice(q, k, v, valid, dq, L, D, n, dk, dv);
  // U and W sum up to L terms one after another: in double, or their rounding grows with L (float32 lost ~1e-5 of
  // dv's scale at L = 3000, where the eager chunked scan keeps ~2e-6)
  std::vector<double> sums(2 * n, 0.0);
  double* __restrict U = sums.data();
  double* __restrict W = U + n;
  std::vector<float> maxima(n);
  float* __restrict m_next = maxima.data();
  for (int64_t j = 0; j < n; ++j) m_next[j] = dk[(L - 1) * D + j];
  for (int64_t t = L - 1; t >= 0; --t) {
    const int64_t row = t * D;
    for (int64_t j = 0; j < n; ++j) {
      const float r = dq[row + j], m = dk[row + j], den = dv[row + j];
      const float x = q[row + j], gy = g[row + j];
      const float ez = exp_nonpos(-std::fabs(x));
      // den is 0 (no key seen yet: such a row passes nothing on) or >= 1; no select around a division, or gcc
      // will not vectorize the loop
      const float inv_den = static_cast<float>(den > 0.f) / std::fmax(den, 1.f);
      const float a = gy * sigmoid_of(x, ez) * inv_den;
      const double rescale = exp_nonpos(m - m_next[j]);
      U[j] = U[j] * rescale + a;
      W[j] = W[j] * rescale + static_cast<double>(a) * r;
      m_next[j] = m;
      dq[row + j] = gy * r * sigmoid_slope(ez);
    }
    if (valid != nullptr && !valid[t]) {  // a masked key gets exactly 0
      for (int64_t j = 0; j < n; ++j) { dv[row + j] = 0.f; dk[row + j] = 0.f; }
      continue;
    }
    for (int64_t j = 0; j < n; ++j) {
      const double p = exp_nonpos(k[row + j] - m_next[j]);  // m_next now holds this row's maximum, >= k
      dv[row + j] = static_cast<float>(p * U[j]);
      dk[row + j] = static_cast<float>(p * (v[row + j] * U[j] - W[j]));
    }
  }
}

// Width of the feature slice one job scans. A job that reads part of every row runs 1.6-3x slower per element than
// one that reads whole rows (measured at T=4096, D=1024: whole rows 5.7 ms, halves 9.2, quarters 12.5; the hardware
// prefetcher loses the stream), so rows are split only into as many slices as the batch leaves threads idle.
static int64_t feature_slice(int64_t B, int64_t D) {
  const int64_t threads = at::get_num_threads();
  const int64_t parts = B >= threads ? 1 : std::min<int64_t>((threads + B - 1) / B, std::max<int64_t>(D / 16, 1));
  const int64_t slice = (D + parts - 1) / parts;
  return std::min<int64_t>(D, (slice + 15) / 16 * 16);
}

torch::Tensor causal_simple_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                    c10::optional<torch::Tensor> valid) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "contiguous q, k, v expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "float32 expected");
  auto y = torch::empty_like(q);
  const int64_t B = q.size(0), L = q.size(1), D = q.size(2);
  const int64_t slice = feature_slice(B, D), slices = (D + slice - 1) / slice;
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

std::vector<torch::Tensor> causal_simple_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor g,
                                                  c10::optional<torch::Tensor> valid) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && g.is_contiguous(),
              "contiguous q, k, v, grad expected");
  auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
  const int64_t B = q.size(0), L = q.size(1), D = q.size(2);
  const int64_t slice = feature_slice(B, D), slices = (D + slice - 1) / slice;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const bool* mp = valid.has_value() ? valid->data_ptr<bool>() : nullptr;
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  if (L > 0) {
    at::parallel_for(0, B * slices, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t job = lo; job < hi; ++job) {
        const int64_t b = job / slices, d0 = (job % slices) * slice, offset = b * L * D + d0;
        scan_slice_backward(qp + offset, kp + offset, vp + offset, gp + offset, mp ? mp + b * L : nullptr,
                            dqp + offset, dkp + offset, dvp + offset, L, D, std::min(slice, D - d0));
      }
    });
  }
  return {dq, dk, dv};
}

// Causal AFT-conv, one batch row and one head: k points at the head's key channel of row 0 (row stride h); w[d] is the
// bias of offset t - t' = d < s, 0 beyond.
struct ConvHead {
  static constexpr float none = -1e30f;  // "no key": finite, so no inf - inf
  int64_t L, s;
  std::vector<float> keys, use;          // the head's keys as one column; a masked key: use 0, key `none`
  std::vector<float> bias_weight;        // exp(w - bias_shift) <= 1, bias_shift = max(0, max w)
  float outside_weight;                  // exp(-bias_shift): the weight of the keys older than the span

  ConvHead(const float* k, const bool* valid, const float* w, int64_t L_, int64_t s_, int64_t h)
      : L(L_), s(s_), keys(L_), use(L_), bias_weight(s_) {
    for (int64_t t = 0; t < L; ++t) {
      use[t] = (valid == nullptr || valid[t]) ? 1.f : 0.f;
      keys[t] = use[t] > 0.f ? k[t * h] : none;
    }
    float bias_shift = 0.f;
    for (int64_t d = 0; d < s; ++d) bias_shift = std::fmax(bias_shift, w[d]);
    for (int64_t d = 0; d < s; ++d) bias_weight[d] = exp_nonpos(w[d] - bias_shift);
    outside_weight = exp_nonpos(-bias_shift);
  }

  // Span weights e[d] (key t - d, d < span) of row t under its shift: exp(k - shift) exp(w - bias_shift), or with
  // the single shift max(k + w) when that row fell back (see ConvScan::row).
  void span_weights(int64_t t, int64_t span, float shift, bool fallback, const float* w, float* e) const {
    for (int64_t d = 0; d < span; ++d) {
      e[d] = fallback ? exp_nonpos(keys[t - d] + w[d] - shift) * use[t - d]
                      : exp_nonpos(keys[t - d] - shift) * bias_weight[d] * use[t - d];  // 0 for a masked key
    }
  }
};

// What the backward needs of each row besides r = num / den: the prefix maximum, rho = prefix_scale / den (the
// weight of a prefix key is exp(k - prefix_max) rho), 1 / den, the row's shift and whether it fell back.
enum ConvRow { kPrefixMax, kRho, kInvDen, kShift, kFallback, kRowFields };

// Pointers of one batch row and one head: q, v, y (and dq, dv) at the head's first feature of row 0 (row stride D),
// k (and dk) at its key channel (row stride h), w at its kernel.
struct ConvSlices {
  const float *q, *k, *v, *w;
  float* y;
};

// One head's forward scan, advanced a row at a time so that a job can walk its heads row by row (reading whole
// rows: see feature_slice). Keys older than the kernel span sit in a running prefix sum (own running maximum); row t
// is shifted by the maximum of k + w over everything it sees, so every weight is <= 1 and the largest is exactly 1:
// den >= 1, nothing to underflow. O(s Dv) per row.
struct ConvScan {
  ConvHead head;
  ConvSlices ptr;
  int64_t D, Dv;
  std::vector<float> buffers;
  float *prefix, *acc, *e, *score;  // e: this row's span weights, e[d] for key t - d
  float prefix_den = 0.f, prefix_max = ConvHead::none;

  ConvScan(const ConvSlices& slices, const bool* valid, int64_t L, int64_t s, int64_t D_, int64_t h, int64_t Dv_)
      : head(slices.k, valid, slices.w, L, s, h), ptr(slices), D(D_), Dv(Dv_), buffers(2 * Dv_ + 2 * s, 0.f) {
    prefix = buffers.data(); acc = prefix + Dv; e = acc + Dv; score = e + s;
  }

  // Row t. Forward (fields == nullptr): y = sigmoid(q) num / den; for the backward the ungated r goes to y and the
  // row's kRowFields to fields. Always inlined (here and in ConvGrad): called out of line, gcc must assume that the
  // stores through the member pointers may move them, keeps a loop scalar, and the forward ran 3.5x slower.
  KERNEL_INLINE void row(int64_t t, float* __restrict fields) {
    const float none = ConvHead::none;
    const int64_t s = head.s;
    const float* keys = head.keys.data();
    const float* use = head.use.data();
    const float* __restrict v = ptr.v;
    const float* __restrict w = ptr.w;
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
    float shift = prefix_den > 0.f ? prefix_max : none;
    for (int64_t d = 0; d < span; ++d) shift = std::fmax(shift, keys[t - d]);
    float* __restrict yr = ptr.y + t * D;
    if (fields != nullptr) {
      fields[kPrefixMax] = prefix_max; fields[kRho] = 0.f; fields[kInvDen] = 0.f; fields[kShift] = shift;
      fields[kFallback] = 0.f;
    }
    if (shift <= 0.5f * none) {  // no valid key visible yet
      for (int64_t j = 0; j < Dv; ++j) yr[j] = 0.f;
      return;
    }
    bool fallback = false;
    head.span_weights(t, span, shift, fallback, w, e);
    float den = 0.f, prefix_scale = 0.f;
    for (int64_t d = 0; d < span; ++d) den += e[d];
    if (prefix_den > 0.f) prefix_scale = exp_nonpos(prefix_max - shift) * head.outside_weight;
    den += prefix_den * prefix_scale;
    if (den < 1e-20f) {
      fallback = true;
      shift = prefix_den > 0.f ? prefix_max : none;
      for (int64_t d = 0; d < span; ++d) score[d] = keys[t - d] + w[d];
      for (int64_t d = 0; d < span; ++d) shift = std::fmax(shift, score[d]);
      head.span_weights(t, span, shift, fallback, w, e);
      den = 0.f;
      for (int64_t d = 0; d < span; ++d) den += e[d];
      prefix_scale = prefix_den > 0.f ? exp_nonpos(prefix_max - shift) : 0.f;
      den += prefix_den * prefix_scale;
    }
    float* __restrict a = acc;
    for (int64_t j = 0; j < Dv; ++j) a[j] = prefix[j] * prefix_scale;
    int64_t d = 0;
    for (; d + 4 <= span; d += 4) {  // four keys per pass over acc
      const float *v0 = v + (t - d) * D, *v1 = v0 - D, *v2 = v1 - D, *v3 = v2 - D;
      const float e0 = e[d], e1 = e[d + 1], e2 = e[d + 2], e3 = e[d + 3];
      for (int64_t j = 0; j < Dv; ++j) a[j] += e0 * v0[j] + e1 * v1[j] + e2 * v2[j] + e3 * v3[j];
    }
    for (; d < span; ++d) {
      const float* __restrict vd = v + (t - d) * D;
      const float ed = e[d];
      for (int64_t j = 0; j < Dv; ++j) a[j] += ed * vd[j];
    }
    if (fields != nullptr) {
      fields[kRho] = prefix_scale / den; fields[kInvDen] = 1.f / den; fields[kShift] = shift;
      fields[kFallback] = fallback;
      for (int64_t j = 0; j < Dv; ++j) yr[j] = a[j] / den;
      return;
    }
    const float* __restrict qr = ptr.q + t * D;
    for (int64_t j = 0; j < Dv; ++j) {
      const float x = qr[j];
      const float ez = exp_nonpos(-std::fabs(x));
      yr[j] = (x > 0.f ? 1.f : ez) * a[j] / (den * (1.f + ez));
    }
  }
};

// Heads [i0, i1) of one batch row: q, k, v, y at that row's first element; the scans (and, when fields is given,
// each head's kRowFields per row, head after head) walk t in order, all heads per row.
static std::vector<ConvScan> conv_heads(const float* q, const float* k, const float* v, const bool* valid,
                                        const float* w, float* y, int64_t L, int64_t D, int64_t h, int64_t s,
                                        int64_t i0, int64_t i1, float* fields = nullptr) {
  const int64_t Dv = D / h;
  std::vector<ConvScan> scans;
  scans.reserve(i1 - i0);
  for (int64_t i = i0; i < i1; ++i)
    scans.emplace_back(ConvSlices{q + i * Dv, k + i, v + i * Dv, w + i * s, y + i * Dv}, valid, L, s, D, h, Dv);
  for (int64_t t = 0; t < L; ++t)
    for (int64_t i = 0; i < i1 - i0; ++i)
      scans[i].row(t, fields == nullptr ? nullptr : fields + (i * L + t) * kRowFields);
  return scans;
}

// Backward of one head, a row at a time in reverse: dq and dv (head slices, row stride D), dk (the head's column,
// stride h), and dw[d]. With p the weight of key s in row t (span: e[t - s] / den; prefix: exp(k_s - prefix_max_t)
// rho_t), a_t = g_t sigmoid(q_t) and r_t the row's mean of v:
//   dv_s = sum_t a_t p,   dk_s = sum_t p (a_t . v_s - a_t . r_t),   dw[d] = sum_t p[t, t - d] (a_t . v_{t-d} - a_t . r_t).
// The span terms are summed row by row; the prefix terms through a reverse scan U_t = sum_{t' >= t} a_t' rho_t'
// exp(prefix_max_t - prefix_max_t') (and W_t likewise with a_t' . r_t'), read by key t - s as it enters the prefix.
struct ConvGrad {
  const ConvScan& scan;  // its head and slices; its y holds r (overwritten with dq row by row)
  const float *g, *fields;
  float *dk, *dv;
  int64_t h;  // dk's row stride
  // the sums over up to L rows (the prefix scan U, W and the kernel gradient) run in double, as in the AFT-simple
  // backward; per-key sums have at most s + 1 terms and stay float
  std::vector<double> sums;
  double* U;
  double* dw_sum;
  double W = 0.0;
  float prefix_max_next;

  ConvGrad(const ConvScan& scan_, const float* g_, const float* fields_, float* dk_, float* dv_, int64_t h_)
      : scan(scan_), g(g_), fields(fields_), dk(dk_), dv(dv_), h(h_), sums(scan_.Dv + scan_.head.s, 0.0) {
    U = sums.data(); dw_sum = U + scan.Dv;
    const int64_t L = scan.head.L;
    prefix_max_next = fields[(L - 1) * kRowFields + kPrefixMax];
    for (int64_t t = 0; t < L; ++t) dk[t * h] = 0.f;
    for (int64_t t = 0; t < L; ++t)
      for (int64_t j = 0; j < scan.Dv; ++j) dv[t * scan.D + j] = 0.f;
  }

  // Row t; a and e are scratch of Dv and s floats.
  KERNEL_INLINE void row(int64_t t, float* __restrict a, float* __restrict e) {
    const ConvHead& head = scan.head;
    const int64_t D = scan.D, Dv = scan.Dv, s = head.s;
    const float* row = fields + t * kRowFields;
    const float inv_den = row[kInvDen];  // 0 for a row that sees no key: it passes no gradient on
    const float *qr = scan.ptr.q + t * D, *gr = g + t * D, *v = scan.ptr.v;
    float* __restrict dqr = scan.ptr.y + t * D;
    float ar = 0.f;
#pragma omp simd reduction(+ : ar)
    for (int64_t j = 0; j < Dv; ++j) {
      const float x = qr[j], r = dqr[j];
      const float ez = exp_nonpos(-std::fabs(x));
      a[j] = gr[j] * sigmoid_of(x, ez) * static_cast<float>(inv_den > 0.f);
      ar += a[j] * r;
      dqr[j] = gr[j] * r * sigmoid_slope(ez);
    }
    const double rescale = exp_nonpos(row[kPrefixMax] - prefix_max_next);  // <= 1: the prefix maximum never falls
    const double rho = row[kRho];
    prefix_max_next = row[kPrefixMax];
    for (int64_t j = 0; j < Dv; ++j) U[j] = U[j] * rescale + a[j] * rho;
    W = W * rescale + ar * rho;
    const int64_t entering = t - s;
    if (entering >= 0 && head.use[entering] > 0.f) {
      const double p = exp_nonpos(head.keys[entering] - row[kPrefixMax]);
      const float* __restrict ve = v + entering * D;
      float* __restrict dve = dv + entering * D;
      double vU = 0.0;
#pragma omp simd reduction(+ : vU)
      for (int64_t j = 0; j < Dv; ++j) { dve[j] += static_cast<float>(p * U[j]); vU += ve[j] * U[j]; }
      dk[entering * h] += static_cast<float>(p * (vU - W));
    }
    if (inv_den == 0.f) return;
    const int64_t span = std::min<int64_t>(s, t + 1);
    head.span_weights(t, span, row[kShift], row[kFallback] > 0.f, scan.ptr.w, e);
    for (int64_t d = 0; d < span; ++d) {
      const float p = e[d] * inv_den;
      if (p == 0.f) continue;
      const float* __restrict vs = v + (t - d) * D;
      float* __restrict dvs = dv + (t - d) * D;
      float av = 0.f;
#pragma omp simd reduction(+ : av)
      for (int64_t j = 0; j < Dv; ++j) { av += a[j] * vs[j]; dvs[j] += p * a[j]; }
      const float c = p * (av - ar);
      dk[(t - d) * h] += c;
      dw_sum[d] += c;
    }
  }
};

static void check_conv_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& kernel) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && kernel.is_contiguous(),
              "contiguous q, k, v, kernel expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kernel.scalar_type() == at::kFloat, "float32 expected");
}

// Heads per job: all of them (whole rows, see feature_slice) unless the batch leaves threads idle.
static int64_t head_groups(int64_t B, int64_t h) {
  const int64_t threads = at::get_num_threads();
  return B >= threads ? 1 : std::min<int64_t>(h, (threads + B - 1) / B);
}

torch::Tensor causal_conv1d_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kernel,
                                    c10::optional<torch::Tensor> valid) {
  check_conv_inputs(q, k, v, kernel);
  auto y = torch::empty_like(q);
  const int64_t B = q.size(0), L = q.size(1), D = q.size(2), h = kernel.size(0), s = kernel.size(1);
  const int64_t groups = head_groups(B, h);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* wp = kernel.data_ptr<float>();
  const bool* mp = valid.has_value() ? valid->data_ptr<bool>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B * groups, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t job = lo; job < hi; ++job) {
      const int64_t b = job / groups, group = job % groups, offset = b * L * D;
      conv_heads(qp + offset, kp + b * L * h, vp + offset, mp ? mp + b * L : nullptr, wp, yp + offset, L, D, h, s,
                 group * h / groups, (group + 1) * h / groups);
    }
  });
  return y;
}

std::vector<torch::Tensor> causal_conv1d_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                  torch::Tensor kernel, torch::Tensor g,
                                                  c10::optional<torch::Tensor> valid) {
  check_conv_inputs(q, k, v, kernel);
  TORCH_CHECK(g.is_contiguous(), "contiguous grad expected");
  const int64_t B = q.size(0), L = q.size(1), D = q.size(2), h = kernel.size(0), s = kernel.size(1), Dv = D / h;
  const int64_t groups = head_groups(B, h);
  auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
  auto dw = torch::empty({B, h, s}, kernel.options());  // one row per batch row and head, summed over the batch below
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *wp = kernel.data_ptr<float>(), *gp = g.data_ptr<float>();
  const bool* mp = valid.has_value() ? valid->data_ptr<bool>() : nullptr;
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  float* dwp = dw.data_ptr<float>();
  if (L > 0) {
    at::parallel_for(0, B * groups, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t job = lo; job < hi; ++job) {
        const int64_t b = job / groups, group = job % groups, offset = b * L * D, key_offset = b * L * h;
        const int64_t i0 = group * h / groups, i1 = (group + 1) * h / groups;
        std::vector<float> fields((i1 - i0) * L * kRowFields);
        // r into dq, overwritten row by row below
        const auto scans = conv_heads(qp + offset, kp + key_offset, vp + offset, mp ? mp + b * L : nullptr, wp,
                                      dqp + offset, L, D, h, s, i0, i1, fields.data());
        std::vector<ConvGrad> grads;
        grads.reserve(i1 - i0);
        for (int64_t i = i0; i < i1; ++i)
          grads.emplace_back(scans[i - i0], gp + offset + i * Dv, fields.data() + (i - i0) * L * kRowFields,
                             dkp + key_offset + i, dvp + offset + i * Dv, h);
        std::vector<float> scratch(Dv + s);
        for (int64_t t = L - 1; t >= 0; --t)
          for (auto& grad : grads) grad.row(t, scratch.data(), scratch.data() + Dv);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t d = 0; d < s; ++d) dwp[(b * h + i) * s + d] = static_cast<float>(grads[i - i0].dw_sum[d]);
      }
    });
  }
  return {dq, dk, dv, dw.sum(0)};
}
"""

# -ffinite-math-only lets gcc vectorize fmax/fabs and the selects; the kernel never produces inf or NaN
# from finite inputs (the operators' contract), and the "no key yet" maximum is a finite -1e30.
# -fopenmp-simd honours the `omp simd reduction` pragmas (vectorized dot products: gcc may not reorder a float sum
# otherwise) and nothing else: no OpenMP runtime, and no global -ffast-math that could fold exp_nonpos' Cody-Waite
# split.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffinite-math-only", "-fopenmp-simd"]
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

                _module = load_inline("modeling_aft_fused_v20", cpp_sources=_SOURCE,
                                      functions=["causal_simple_forward", "causal_simple_backward",
                                                 "causal_conv1d_forward", "causal_conv1d_backward"],
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
    """The compiled module when a fused kernel applies to these inputs (CPU, float32), else None."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    return _load()


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _valid_keys(key_mask, device):
    return None if key_mask is None else key_mask.to(device=device, dtype=torch.bool).contiguous()


class _FusedCausalSimple(torch.autograd.Function):
    """Keeps only the inputs for the backward, which recomputes the forward's per-row state in place of its outputs."""

    @staticmethod
    def forward(ctx, module, q, k, v, valid):
        ctx.module = module
        ctx.save_for_backward(q, k, v, valid)
        return module.causal_simple_forward(q, k, v, valid)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, valid = ctx.saved_tensors
        return None, *ctx.module.causal_simple_backward(q, k, v, grad.contiguous(), valid), None


class _FusedCausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, q, k, v, kernel, valid):
        ctx.module = module
        ctx.save_for_backward(q, k, v, kernel, valid)
        return module.causal_conv1d_forward(q, k, v, kernel, valid)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, kernel, valid = ctx.saved_tensors
        return None, *ctx.module.causal_conv1d_backward(q, k, v, kernel, grad.contiguous(), valid), None


def fused_causal_simple(q, k, v, key_mask=None):
    """Causal AFT-simple (gated by sigmoid(q)) with the fused kernels, or None when they do not apply.
    q, k, v (B, T, D). Differentiable: the backward is fused too and holds nothing but dq, dk, dv."""
    module = _module_for(q, k, v)
    if module is None:
        return None
    q, k, v, valid = q.contiguous(), k.contiguous(), v.contiguous(), _valid_keys(key_mask, q.device)
    if _needs_grad(q, k, v):
        return _FusedCausalSimple.apply(module, q, k, v, valid)
    return module.causal_simple_forward(q, k, v, valid)


def fused_causal_conv1d(q, k, v, kernel, key_mask=None):
    """Causal AFT-conv (gated by sigmoid(q)) with the fused kernels, or None when they do not apply.
    q, v (B, T, D); k (B, T, h); kernel (h, s): kernel[i, d] is head i's bias at offset t - t' = d. Differentiable
    in q, k, v and kernel, with a fused backward."""
    module = _module_for(q, k, v, kernel)
    if module is None:
        return None
    q, k, v, kernel = q.contiguous(), k.contiguous(), v.contiguous(), kernel.contiguous()
    valid = _valid_keys(key_mask, q.device)
    if _needs_grad(q, k, v, kernel):
        return _FusedCausalConv1d.apply(module, q, k, v, kernel, valid)
    return module.causal_conv1d_forward(q, k, v, kernel, valid)
