"""Fused CPU kernels for the causal AFT-simple, AFT-conv and AFT-local operators and for AFT-full, forward and backward.

The eager scans in aft_ops make ~12 passes over (T, D) data (exp, multiply, chunked matmuls, divide, sigmoid, ...)
and keep a segment's buffers and carries for the backward. Here one loop per batch row walks t in order, reading whole
rows (all heads of a row together for AFT-conv); rows are split into feature slices or head groups only when the batch
leaves threads idle, since a job that reads part of every row runs 2-3x slower per element.

AFT-simple keeps a running maximum m, numerator and denominator (an online softmax):

    m' = max(m, k_t);  num = num * exp(m - m') + exp(k_t - m') v_t;  den likewise;  y_t = sigmoid(q_t) num / den

so every row of q, k, v is read once and y written once. den >= 1 after the first valid key (that key contributes
exp(0)), so nothing underflows to 0/0.

AFT-conv keeps the keys older than the kernel span in such a running prefix sum and adds the span's s keys per row
with weights exp(k - max k) * exp(w - max(0, max w)) (both factors <= 1 and exact in float32); a row whose den would
underflow (the largest key meets a very negative bias) is redone with the single shift max(k + w).

AFT-local has a key per feature and a bias per row (the band of w next to the diagonal, read straight from the dense
bias or computed from its factors u vᵀ), so its span weights exp(k_t' - m_t) exp(w_t,t' - bs) are per element. They cost
no exp: exp(k_t' - m_t) = E_t' rho_t'+1 ... rho_t with E = exp(k - m) and rho = exp(m_prev - m) computed once per row
(a product of factors <= 1, each exactly 1 while the running maximum stands still), accumulated in registers over the
s keys. Elements whose den would underflow fall back to the single shift as in AFT-conv.

The backward passes save nothing but the inputs: they rerun the forward scan, writing its per-row state (r = num /
den, maxima, den) into the gradient buffers they are about to fill, then walk t backwards with a reverse scan
rescaled by exp(m_t - m_{t+1}) <= 1, overwriting that state with dq, dk, dv row by row. A training step's operator
memory is therefore y, dq, dk, dv (and, for AFT-conv, a few floats per row and head): what SDPA holds. AFT-local's
backward replays its forward 32 rows at a time from checkpoints of the running state (O(D) floats every 32 rows, kept
in rows of dq not written yet), so it holds y, dq, dk, dv, a chunk of per-row fields, a ring of E and rho and, for a
learned bias, the band's gradient. Workspaces are tensors, so torch's memory profiler counts them.

AFT-full is matrix work (num = E @ (P v), den = E @ P with E = exp(w - row max) shared by batch and features), so its
kernel walks tiles of rows x keys x features, builds E and X = [P v, P] for a tile on the fly and hands the products to
the BLAS that torch links (sgemm on raw tiles: an ATen call per tile would cost more than the tile's arithmetic). num
accumulates in y itself; for a backward, den is kept, and the backward turns den's buffer into g / den and then into
dq. Its jobs own key blocks, so dk, dv and the bias gradient need no locks. A training step holds y, den (= dq), dk, dv,
the bias gradient and L2-sized tiles: SDPA's y, dq, dk, dv, plus what a learned T x T bias must get back.

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
#include <cstring>
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

// One step of an online softmax per feature: key k (value v) joins the running maximum m, den = sum exp(k - m) and
// num = sum exp(k - m) v, rescaled by exp(m - m') when the maximum moves (one exp per element either way).
static void online_softmax_add(const float* __restrict k, const float* __restrict v, float* __restrict m,
                               float* __restrict den, float* __restrict num, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float diff = k[j] - m[j];
    const float ex = exp_nonpos(-std::fabs(diff));
    const float rescale = diff > 0.f ? ex : 1.f;
    const float add = diff > 0.f ? 1.f : ex;
    num[j] = num[j] * rescale + add * v[j];
    den[j] = den[j] * rescale + add;
    m[j] = std::fmax(m[j], k[j]);
  }
}

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
    if (valid == nullptr || valid[t]) online_softmax_add(kr, vr, m, den, num, n);  // a masked key changes nothing
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
                                                  c10::optional<torch::Tensor> valid, bool kernel_grad) {
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
    // per job, the fields of its heads' rows: a tensor, so that memory profiles see it
    const int64_t job_fields = (h + groups - 1) / groups * L * kRowFields;
    auto work = torch::empty({B * groups, job_fields}, q.options());
    at::parallel_for(0, B * groups, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t job = lo; job < hi; ++job) {
        const int64_t b = job / groups, group = job % groups, offset = b * L * D, key_offset = b * L * h;
        const int64_t i0 = group * h / groups, i1 = (group + 1) * h / groups;
        float* fields = work.data_ptr<float>() + job * job_fields;
        // r into dq, overwritten row by row below
        const auto scans = conv_heads(qp + offset, kp + key_offset, vp + offset, mp ? mp + b * L : nullptr, wp,
                                      dqp + offset, L, D, h, s, i0, i1, fields);
        std::vector<ConvGrad> grads;
        grads.reserve(i1 - i0);
        for (int64_t i = i0; i < i1; ++i)
          grads.emplace_back(scans[i - i0], gp + offset + i * Dv, fields + (i - i0) * L * kRowFields,
                             dkp + key_offset + i, dvp + offset + i * Dv, h);
        std::vector<float> scratch(Dv + s);
        for (int64_t t = L - 1; t >= 0; --t)
          for (auto& grad : grads) grad.row(t, scratch.data(), scratch.data() + Dv);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t d = 0; d < s; ++d) dwp[(b * h + i) * s + d] = static_cast<float>(grads[i - i0].dw_sum[d]);
      }
    });
  }
  return {dq, dk, dv, kernel_grad ? dw.sum(0) : torch::Tensor()};
}

// Causal AFT-local: per-feature keys; row t's bias band[g, t, d] for key t - d (d < s; feature j in group g), 0 for the
// older keys (the prefix: a running sum with its own running maximum pm, like AFT-conv's). Row t is shifted per
// feature by the running maximum m_t of every key it sees and per group by bs = max(0, max_d band): span weights
// exp(k - m_t) exp(band - bs), prefix weight exp(pm - m_t - bs), all <= 1. The span weights cost no exp: with
// E_t' = exp(k_t' - m_t') and rho_t' = exp(m_t'-1 - m_t') (one exp each per element, when row t' is reached),
//   exp(k_t' - m_t) = E_t' * rho_t'+1 * ... * rho_t,
// a product accumulated while walking d = t - t' up (every factor <= 1, and exactly 1 while the maximum stands still).
// An element whose den falls below 1e-20 (its largest key meets a very negative band) is redone with the single
// shift S = max(k + band) over what it sees and plain exps, which keeps den >= 1. O(s) multiplies per element.
// Fields of a row kept for the backward, each n floats: the shift S, 1 / den, pm, fallback (0 / 1); r = num / den
// goes to the row of dq.
enum LocalField { kS, kInvDenL, kPm, kFlag, kLocalFields };

// Where row t's bias comes from: the dense (G, side, side) bias w itself, read from the diagonal backwards
// (b[d] = w[g, t, t - d]), or the factors u, v (T', r) of w = u vᵀ (one r-long dot product per key). Either way no
// band is built, and from factors nothing is T x T.
struct LocalBias {
  const float* w;
  int64_t side;
  bool factorized = false;
  const float *u = nullptr, *v = nullptr;
  int64_t r = 0;
  void fill(int64_t g, int64_t t, int64_t span, float* __restrict b) const {
    if (factorized) {
      const float* __restrict ut = u + t * r;
      for (int64_t d = 0; d < span; ++d) {
        const float* __restrict vt = v + (t - d) * r;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < r; ++i) dot += ut[i] * vt[i];
        b[d] = dot;
      }
      return;
    }
    const float* diagonal = w + (g * side + t) * side + t;  // w[g, t, t]
    for (int64_t d = 0; d < span; ++d) b[d] = diagonal[-d];
  }
};

struct LocalRows {  // one batch row; q, k, v, y (and dq, dk, dv) at feature j0 of row 0, row stride D
  const float *q, *k, *v;
  LocalBias bias;
  const bool* valid;
  int64_t L, D, n, s, Dg, j0;
  bool use(int64_t t) const { return valid == nullptr || valid[t]; }
  // groups met by features [j0, j0 + n): local ranges [lo, hi) of group g
  int64_t first_group() const { return j0 / Dg; }
  int64_t last_group() const { return (j0 + n - 1) / Dg; }
  int64_t lo(int64_t g) const { return std::max<int64_t>(g * Dg, j0) - j0; }
  int64_t hi(int64_t g) const { return std::min<int64_t>((g + 1) * Dg, j0 + n) - j0; }
  // row t's span of the bias into b, exp(b - bs) into bw, bs = max(0, max b); returns bs
  float band_weights(int64_t g, int64_t t, int64_t span, float* __restrict b, float* __restrict bw) const {
    bias.fill(g, t, span, b);
    float bs = 0.f;
    for (int64_t d = 0; d < span; ++d) bs = std::fmax(bs, b[d]);
    for (int64_t d = 0; d < span; ++d) bw[d] = exp_nonpos(b[d] - bs);
    return bs;
  }
};

// The running state: maximum m of the keys so far, prefix maximum pm, prefix sums. What a checkpoint holds: kStateRows
// rows of n floats (stride apart) written by save and read by the loading constructor.
constexpr int64_t kStateRows = 5;
struct LocalState {
  std::vector<float> data;
  float *m, *pm, *pden, *pnum;
  bool seen = false;  // a valid key so far (the same for every feature)
  explicit LocalState(int64_t n) : data(4 * n) {
    point();
    for (int64_t j = 0; j < n; ++j) { m[j] = ConvHead::none; pm[j] = ConvHead::none; pden[j] = 0.f; pnum[j] = 0.f; }
  }
  LocalState(int64_t n, const float* saved, int64_t stride) : data(4 * n), seen(saved[4 * stride] > 0.f) {
    for (int64_t i = 0; i < 4; ++i) std::copy(saved + i * stride, saved + i * stride + n, data.data() + i * n);
    point();
  }
  LocalState(const LocalState&) = delete;
  LocalState& operator=(const LocalState&) = delete;
  void save(float* to, int64_t stride) const {
    const int64_t n = data.size() / 4;
    for (int64_t i = 0; i < 4; ++i) std::copy(data.data() + i * n, data.data() + (i + 1) * n, to + i * stride);
    to[4 * stride] = seen ? 1.f : 0.f;
  }
  void point() { const int64_t n = data.size() / 4; m = data.data(); pm = m + n; pden = pm + n; pnum = pden + n; }
};

// E and rho of the last `rows` rows, row t at slot t % rows, in ring_floats(rows, n) floats of a workspace.
static int64_t ring_floats(int64_t rows, int64_t n) { return 2 * rows * n; }
struct LocalRing {
  int64_t rows, n;
  float* data;
  std::vector<const float*> E_span, rho_span;  // row t's span: E of key t - d, rho of row t - d + 1 (d >= 1)
  LocalRing(int64_t rows_, int64_t n_, int64_t s, float* data_) : rows(rows_), n(n_), data(data_), E_span(s), rho_span(s) {}
  float* E(int64_t t) { return data + (t % rows) * 2 * n; }
  float* rho(int64_t t) { return E(t) + n; }
  // the pointers of row t's span, once per row: a modulo per key and feature block would cost more than the block
  void point_span(int64_t t, int64_t span) {
    for (int64_t d = 0; d < span; ++d) { E_span[d] = E(t - d); rho_span[d] = d > 0 ? rho(t - d + 1) : E_span[d]; }
  }
};

// Key t joins the running maximum m: E = exp(k - m_new), rho = exp(m - m_new). A masked key (valid false) leaves m
// as it is: E = 0, rho = 1. (Two loops: one with a runtime select on validity ran 10x slower, unvectorized.)
static void local_max_add(const float* __restrict k, bool valid, float* __restrict m, float* __restrict E,
                          float* __restrict rho, int64_t n) {
  if (!valid) {
    for (int64_t j = 0; j < n; ++j) { E[j] = 0.f; rho[j] = 1.f; }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float m_new = std::fmax(m[j], k[j]);
    E[j] = exp_nonpos(k[j] - m_new);
    rho[j] = exp_nonpos(m[j] - m_new);
    m[j] = m_new;
  }
}

// Row t's state update: key t - s leaves the span for the prefix, key t joins the maximum (and the ring).
static void local_advance(const LocalRows& x, LocalState& st, LocalRing& ring, int64_t t) {
  const int64_t leaving = t - x.s;
  if (leaving >= 0 && x.use(leaving))
    online_softmax_add(x.k + leaving * x.D, x.v + leaving * x.D, st.pm, st.pden, st.pnum, x.n);
  local_max_add(x.k + t * x.D, x.use(t), st.m, ring.E(t), ring.rho(t), x.n);
  st.seen = st.seen || x.use(t);
}

// 16 floats as one value (gcc/clang vector extension; one zmm register with AVX-512, two ymm otherwise). The span
// loops below keep their running sums and products in such values: written with arrays, gcc kept them in memory and
// every key waited on the store of the previous one.
typedef float Vec16 __attribute__((vector_size(64)));
static inline Vec16 load16(const float* p) { Vec16 x; std::memcpy(&x, p, sizeof x); return x; }
static inline void store16(float* p, Vec16 x) { std::memcpy(p, &x, sizeof x); }

// Row t's span for features [j, j + 16 NV): den, num += sum_d E_{t-d} c_d bw[d] (* v_{t-d}), c_d = rho_t ...
// rho_{t-d+1} (ring.point_span(t) done).
template <int NV>
static inline void local_span_block(const LocalRing& ring, const float* v, int64_t t, int64_t span, int64_t D,
                                    int64_t j, const float* __restrict bw, float* __restrict den,
                                    float* __restrict num) {
  Vec16 dacc[NV], nacc[NV], c[NV];
#pragma GCC unroll 4
  for (int i = 0; i < NV; ++i) {
    dacc[i] = load16(den + 16 * i); nacc[i] = load16(num + 16 * i);
    c[i] = load16(ring.E_span[0] + j + 16 * i) * bw[0];  // d = 0: E_t, no rho
    dacc[i] += c[i];
    nacc[i] += c[i] * load16(v + t * D + j + 16 * i);
    c[i] = Vec16{} + 1.f;
  }
  for (int64_t d = 1; d < span; ++d) {
    const float* E = ring.E_span[d] + j;
    const float* rho = ring.rho_span[d] + j;
    const float* vr = v + (t - d) * D + j;
    const float b = bw[d];
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) {
      c[i] *= load16(rho + 16 * i);
      const Vec16 e = load16(E + 16 * i) * c[i] * b;
      dacc[i] += e;
      nacc[i] += e * load16(vr + 16 * i);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < NV; ++i) { store16(den + 16 * i, dacc[i]); store16(num + 16 * i, nacc[i]); }
}

// The same for one feature (the last n % 16).
static inline void local_span_one(const LocalRing& ring, const float* v, int64_t t, int64_t span, int64_t D, int64_t j,
                                  const float* bw, float* den, float* num) {
  float c = 1.f;
  for (int64_t d = 0; d < span; ++d) {
    if (d > 0) c *= ring.rho_span[d][j];
    const float e = ring.E_span[d][j] * c * bw[d];
    *den += e;
    *num += e * v[(t - d) * D + j];
  }
}

static void local_span(LocalRing& ring, const float* v, int64_t t, int64_t span, int64_t D, const float* bw,
                       float* den, float* num, int64_t lo, int64_t hi) {
  ring.point_span(t, span);
  int64_t j = lo;
  for (; j + 32 <= hi; j += 32) local_span_block<2>(ring, v, t, span, D, j, bw, den + j, num + j);
  for (; j + 16 <= hi; j += 16) local_span_block<1>(ring, v, t, span, D, j, bw, den + j, num + j);
  for (; j < hi; ++j) local_span_one(ring, v, t, span, D, j, bw, den + j, num + j);
}

// Feature j of row t with the single shift S = max(k + band) and plain exps (den >= 1); returns S.
static float local_exact(const LocalRows& x, const LocalState& st, int64_t t, int64_t span, const float* b, int64_t j,
                         float& den, float& num) {
  const bool prefix = st.pm[j] > 0.5f * ConvHead::none;
  float shift = prefix ? st.pm[j] : ConvHead::none;
  for (int64_t d = 0; d < span; ++d)
    if (x.use(t - d)) shift = std::fmax(shift, x.k[(t - d) * x.D + j] + b[d]);
  den = prefix ? st.pden[j] * exp_nonpos(st.pm[j] - shift) : 0.f;
  num = prefix ? st.pnum[j] * exp_nonpos(st.pm[j] - shift) : 0.f;
  for (int64_t d = 0; d < span; ++d) {
    if (!x.use(t - d)) continue;
    const float e = exp_nonpos((x.k[(t - d) * x.D + j] - shift) + b[d]);
    den += e;
    num += e * x.v[(t - d) * x.D + j];
  }
  return shift;
}

// Row t after local_advance: sigmoid(q) num / den into out, or, given fields, r = num / den and the row's
// LocalFields. scratch: local_row_scratch(n, s) floats.
static int64_t local_row_scratch(int64_t n, int64_t s) { return 2 * n + 2 * s; }
static void local_row(const LocalRows& x, const LocalState& st, LocalRing& ring, int64_t t, float* __restrict out,
                      float* __restrict fields, float* __restrict scratch) {
  const int64_t n = x.n, span = std::min<int64_t>(x.s, t + 1);
  if (!st.seen) {  // no valid key yet: 0, and nothing flows back (1 / den = 0)
    for (int64_t j = 0; j < n; ++j) out[j] = 0.f;
    if (fields) {
      for (int64_t j = 0; j < kLocalFields * n; ++j) fields[j] = 0.f;
      for (int64_t j = 0; j < n; ++j) fields[kPm * n + j] = st.pm[j];  // `none`: keeps the reverse rescale <= 1
    }
    return;
  }
  float* __restrict den = scratch;
  float* __restrict num = scratch + n;
  float* __restrict bw = scratch + 2 * n;
  float* __restrict b = bw + x.s;
  const float* __restrict m = st.m;
  const float* __restrict pm = st.pm;
  float* S = fields ? fields + kS * n : nullptr;
  float* flag = fields ? fields + kFlag * n : nullptr;
  for (int64_t g = x.first_group(); g <= x.last_group(); ++g) {
    const int64_t lo = x.lo(g), hi = x.hi(g);
    const float bs = x.band_weights(g, t, span, b, bw);
    for (int64_t j = lo; j < hi; ++j) {  // branch-free (an empty prefix has pden = pnum = 0), or gcc keeps it scalar
      const float pf = exp_nonpos(pm[j] - m[j] - bs);
      den[j] = st.pden[j] * pf;
      num[j] = st.pnum[j] * pf;
    }
    local_span(ring, x.v, t, span, x.D, bw, den, num, lo, hi);
    float smallest = 1.f;
#pragma omp simd reduction(min : smallest)
    for (int64_t j = lo; j < hi; ++j) smallest = std::fmin(smallest, den[j]);
    if (fields)
      for (int64_t j = lo; j < hi; ++j) { S[j] = m[j]; flag[j] = 0.f; }
    if (smallest >= 1e-20f) continue;
    for (int64_t j = lo; j < hi; ++j) {  // rare
      if (den[j] >= 1e-20f) continue;
      const float shift = local_exact(x, st, t, span, b, j, den[j], num[j]);
      if (fields) { S[j] = shift; flag[j] = 1.f; }
    }
  }
  if (fields) {
    for (int64_t j = 0; j < n; ++j) {
      out[j] = num[j] / den[j];
      fields[kInvDenL * n + j] = 1.f / den[j];
      fields[kPm * n + j] = pm[j];
    }
    return;
  }
  const float* __restrict qr = x.q + t * x.D;
#pragma omp simd  // without it gcc keeps this loop scalar here ("no vectype"), as it did in AFT-conv's row
  for (int64_t j = 0; j < n; ++j) {
    const float xq = qr[j];
    const float ez = exp_nonpos(-std::fabs(xq));
    out[j] = (xq > 0.f ? 1.f : ez) * num[j] / (den[j] * (1.f + ez));
  }
}

// work: local_forward_work(n, s) floats
static int64_t local_forward_work(int64_t n, int64_t s) { return ring_floats(s + 1, n); }
static void local_forward(const LocalRows& x, float* y, float* work) {
  LocalState st(x.n);
  LocalRing ring(x.s + 1, x.n, x.s, work);
  std::vector<float> scratch(local_row_scratch(x.n, x.s));
  for (int64_t t = 0; t < x.L; ++t) {
    local_advance(x, st, ring, t);
    local_row(x, st, ring, t, y + t * x.D, nullptr, scratch.data());
  }
}

// The span terms of row t's backward for features [lo, hi) (fallback elements excluded: local_exact_grad): weights
// rebuilt from the ring as in local_span_block; dband's sums over features gathered per lane in lanes (s x 16) first.
template <int NV>
static inline void local_span_grad_block(const LocalRing& ring, const LocalRows& x, int64_t t, int64_t span, int64_t j,
                                         const float* __restrict bw, const float* a_in, const float* r_in,
                                         const float* flag, float* dk, float* dv, float* lanes) {
  Vec16 a[NV], r[NV], c[NV];
#pragma GCC unroll 4
  for (int i = 0; i < NV; ++i) {
    const Vec16 fallback = load16(flag + 16 * i);
    a[i] = fallback > 0.f ? Vec16{} : load16(a_in + 16 * i);
    r[i] = load16(r_in + 16 * i);
    c[i] = Vec16{} + 1.f;
  }
  for (int64_t d = 0; d < span; ++d) {
    const int64_t row = (t - d) * x.D + j;
    const float* E = ring.E_span[d] + j;
    const float* rho = ring.rho_span[d] + j;
    const float b = bw[d];
    Vec16 lane = load16(lanes + 16 * d);
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) {
      if (d > 0) c[i] *= load16(rho + 16 * i);
      const Vec16 ap = a[i] * load16(E + 16 * i) * c[i] * b;
      const Vec16 grad = ap * (load16(x.v + row + 16 * i) - r[i]);
      store16(dv + row + 16 * i, load16(dv + row + 16 * i) + ap);
      store16(dk + row + 16 * i, load16(dk + row + 16 * i) + grad);
      lane += grad;
    }
    store16(lanes + 16 * d, lane);
  }
}

static void local_span_grad(const LocalRows& x, LocalRing& ring, int64_t t, int64_t span, const float* bw,
                            const float* a, const float* r, const float* flag, float* dk, float* dv, float* db,
                            float* lanes, int64_t lo, int64_t hi) {
  ring.point_span(t, span);
  int64_t j = lo;
  for (; j + 32 <= hi; j += 32) local_span_grad_block<2>(ring, x, t, span, j, bw, a + j, r + j, flag + j, dk, dv, lanes);
  for (; j + 16 <= hi; j += 16) local_span_grad_block<1>(ring, x, t, span, j, bw, a + j, r + j, flag + j, dk, dv, lanes);
  for (; j < hi; ++j) {  // the last n % 16 features
    if (flag[j] > 0.f) continue;
    float c = 1.f;
    for (int64_t d = 0; d < span; ++d) {
      if (d > 0) c *= ring.rho_span[d][j];
      const int64_t row = (t - d) * x.D + j;
      const float ap = a[j] * ring.E_span[d][j] * c * bw[d];
      const float grad = ap * (x.v[row] - r[j]);
      dv[row] += ap;
      dk[row] += grad;
      lanes[16 * d] += grad;
    }
  }
  for (int64_t d = 0; d < span; ++d) {
    float sum = 0.f;
    for (int i = 0; i < 16; ++i) { sum += lanes[16 * d + i]; lanes[16 * d + i] = 0.f; }
    db[d] += sum;
  }
}

// The span terms of a fallback element (shift S, plain exps, as local_exact computed it).
static void local_exact_grad(const LocalRows& x, int64_t t, int64_t span, const float* b, int64_t j, float S, float a,
                             float r, float* dk, float* dv, float* db) {
  for (int64_t d = 0; d < span; ++d) {
    if (!x.use(t - d)) continue;
    const int64_t row = (t - d) * x.D + j;
    const float ap = a * exp_nonpos((x.k[row] - S) + b[d]);
    const float grad = ap * (x.v[row] - r);
    dv[row] += ap;
    dk[row] += grad;
    db[d] += grad;
  }
}

// Backward of one job, with p[t, t', j] the weight of key t' in row t and a_t = g_t sigmoid(q_t):
//   dv_t' = sum_t a_t p,   dk_t' = sum_t a_t p (v_t' - r_t),   dband[g, t, d] = sum_{j in g} a_t p[t, t - d] (v_{t-d} - r_t).
// Span terms row by row (the weights rebuilt from E and rho as in the forward); prefix terms through the reverse
// scan U_t = sum_{t'' >= t} a rho_p exp(pm_t - pm_t'') (W likewise with a r), rho_p = prefix weight / den, read by key
// t - s as it enters the prefix (as in AFT-conv, per feature here). The forward is replayed a chunk at a time from
// checkpoints of LocalState, so only 2 chunks of fields and of E, rho exist at a time: a chunk of C >= s rows is
// preceded by a replayed chunk whose E and rho its first rows' spans read.
// The rows per replayed chunk (>= s: a chunk's spans reach into the one before only; >= kStateRows: see below), and
// the workspace of local_backward in floats: a chunk's fields, and a ring for the chunk and the s rows before it.
static int64_t local_chunk(int64_t s) { return std::max<int64_t>(32, s); }
static int64_t local_backward_work(int64_t n, int64_t s) {
  const int64_t C = local_chunk(s);
  return C * kLocalFields * n + ring_floats(C + s, n);
}

// The bias of causal_local_*: with factor an empty 1-d placeholder, bias is the dense (G, T', T') w; else
// w = bias factorᵀ, both (T', r).
static bool local_factorized(const torch::Tensor& factor) { return factor.dim() == 2; }

// The bias gradient of causal_local_backward from the band's: row t's db[g * stride + d] (key t - d) added into w's
// diagonals, or taken on to the factors u, v of w = u vᵀ (passes over parts of the features add their parts).
struct LocalBiasGrad {
  torch::Tensor dw, du, dv;
  const float *u = nullptr, *v = nullptr;
  int64_t G, side = 0, r = 0, s;

  LocalBiasGrad(const torch::Tensor& bias, const torch::Tensor& factor, int64_t G_, int64_t s_, bool wanted)
      : G(G_), s(s_) {
    if (!wanted) return;  // a frozen bias: no gradient buffers at all
    if (!local_factorized(factor)) {
      dw = torch::zeros_like(bias);
      side = bias.size(2);
      return;
    }
    du = torch::zeros_like(bias);
    dv = torch::zeros_like(factor);
    u = bias.data_ptr<float>();
    v = factor.data_ptr<float>();
    r = bias.size(1);
  }

  void add_row(int64_t t, const float* db, int64_t stride) {
    const int64_t span = std::min<int64_t>(s, t + 1);
    if (dw.defined()) {
      float* out = dw.data_ptr<float>();
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < span; ++d) out[(g * side + t) * side + t - d] += db[g * stride + d];
      return;
    }
    float *dup = du.data_ptr<float>(), *dvp = dv.data_ptr<float>();
    for (int64_t d = 0; d < span; ++d) {
      const float grad = db[d];
      for (int64_t i = 0; i < r; ++i) {
        dup[t * r + i] += grad * v[(t - d) * r + i];
        dvp[(t - d) * r + i] += grad * u[t * r + i];
      }
    }
  }
};

// dband: (G, L, s) of this job, or nullptr when the bias needs no gradient; with `stream`, (G, 1, s): each row's band
// gradient goes to stream once the row is done.
static void local_backward(const LocalRows& x, const float* g, float* dq, float* dk, float* dv, float* dband,
                           float* work, LocalBiasGrad* stream) {
  const int64_t L = x.L, D = x.D, n = x.n, s = x.s;
  const int64_t C = local_chunk(s), chunks = (L + C - 1) / C;
  // Checkpoint c >= 1 (the state before row c C) lives in the first rows of dq's chunk c - 1: chunk c - 1 is
  // processed after chunks c and c + 1, the last to read it, and only then are those rows written.
  const auto checkpoint = [&](int64_t c) { return dq + (c - 1) * C * D; };
  float* fields = work;
  {
    LocalState st(n);
    std::vector<float> row(ring_floats(1, n));
    LocalRing ring(1, n, 1, row.data());  // E and rho are not needed here: one row to write them to
    for (int64_t t = 0; t < L; ++t) {
      if (t > 0 && t % C == 0) st.save(checkpoint(t / C), D);
      local_advance(x, st, ring, t);
    }
  }
  const auto load = [&](int64_t c) { return c == 0 ? LocalState(n) : LocalState(n, checkpoint(c), D); };
  for (int64_t t = 0; t < L; ++t)
    for (int64_t j = 0; j < n; ++j) { dk[t * D + j] = 0.f; dv[t * D + j] = 0.f; }
  std::vector<float> scratch(local_row_scratch(n, s) + 2 * n + 2 * s), unused_dband(s);
  float* __restrict a = scratch.data() + local_row_scratch(n, s);
  float* __restrict r = a + n;
  float* __restrict bw = r + n;
  float* __restrict b = bw + s;
  LocalRing ring(C + s, n, s, fields + C * kLocalFields * n);
  std::vector<double> sums(2 * n, 0.0);
  double* __restrict U = sums.data();
  double* __restrict W = U + n;
  std::vector<float> pm_next_buffer(n), db_lanes(s * 16, 0.f);
  float* __restrict pm_next = pm_next_buffer.data();
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t c0 = c * C, c1 = std::min(L, c0 + C);
    if (c > 0) {  // E and rho of the chunk before (its rows' own results are not needed)
      LocalState st = load(c - 1);
      for (int64_t t = c0 - C; t < c0; ++t) local_advance(x, st, ring, t);
    }
    LocalState st = load(c);
    for (int64_t t = c0; t < c1; ++t) {  // r into dq, the fields into the chunk's buffer
      local_advance(x, st, ring, t);
      local_row(x, st, ring, t, dq + t * D, fields + (t - c0) * kLocalFields * n, scratch.data());
    }
    if (c == chunks - 1)
      for (int64_t j = 0; j < n; ++j) pm_next[j] = fields[((c1 - 1 - c0) * kLocalFields + kPm) * n + j];
    for (int64_t t = c1 - 1; t >= c0; --t) {
      const float* f = fields + (t - c0) * kLocalFields * n;
      const float *S = f + kS * n, *inv_den = f + kInvDenL * n, *pm = f + kPm * n, *flag = f + kFlag * n;
      const float *qr = x.q + t * D, *gr = g + t * D;
      float* __restrict dqr = dq + t * D;
      std::copy(dqr, dqr + n, r);  // r = num / den, which dq's row held until now
      const int64_t span = std::min<int64_t>(s, t + 1);
      const int64_t entering = t - s;  // the key that enters this row's prefix
      const bool seen = inv_den[0] > 0.f;
      for (int64_t gi = x.first_group(); gi <= x.last_group(); ++gi) {
        const int64_t lo = x.lo(gi), hi = x.hi(gi);
        const float bs = x.band_weights(gi, t, span, b, bw);
#pragma omp simd  // scalar without it ("no vectype"): fwd+bwd at T=8192, D=512 took ~175 ms, now ~135
        for (int64_t j = lo; j < hi; ++j) {
          const float xq = qr[j];
          const float ez = exp_nonpos(-std::fabs(xq));
          a[j] = gr[j] * sigmoid_of(xq, ez) * inv_den[j];  // inv_den 0: a row that sees no key passes nothing on
          const float rho = exp_nonpos(pm[j] - S[j] - (flag[j] > 0.f ? 0.f : bs)) *
                            static_cast<float>(pm[j] > 0.5f * ConvHead::none);  // branch-free: 0 for an empty prefix
          const double rescale = exp_nonpos(pm[j] - pm_next[j]);  // <= 1: pm never falls
          U[j] = U[j] * rescale + static_cast<double>(a[j]) * rho;
          W[j] = W[j] * rescale + static_cast<double>(a[j]) * rho * r[j];
          pm_next[j] = pm[j];
          dqr[j] = gr[j] * r[j] * sigmoid_slope(ez);
        }
        if (entering >= 0 && x.use(entering)) {
          const float *ke = x.k + entering * D, *ve = x.v + entering * D;
          float *dke = dk + entering * D, *dve = dv + entering * D;
          for (int64_t j = lo; j < hi; ++j) {
            const double p = exp_nonpos(ke[j] - pm[j]);  // the key is in this row's prefix: k <= pm
            dve[j] += static_cast<float>(p * U[j]);
            dke[j] += static_cast<float>(p * (ve[j] * U[j] - W[j]));
          }
        }
        if (!seen) continue;
        float* db = dband == nullptr ? unused_dband.data() : stream ? dband + gi * s : dband + (gi * L + t) * s;
        local_span_grad(x, ring, t, span, bw, a, r, flag, dk, dv, db, db_lanes.data(), lo, hi);
        for (int64_t j = lo; j < hi; ++j)
          if (flag[j] > 0.f) local_exact_grad(x, t, span, b, j, S[j], a[j], r[j], dk, dv, db);
      }
      if (stream != nullptr) {
        stream->add_row(t, dband, s);
        std::fill(dband, dband + (x.last_group() + 1) * s, 0.f);  // one job: every group
      }
    }
  }
}

// Where causal_local_* read the bias (see local_factorized).
static LocalBias local_bias(const torch::Tensor& bias, const torch::Tensor& factor, int64_t L) {
  TORCH_CHECK(bias.is_contiguous() && factor.is_contiguous() && bias.scalar_type() == at::kFloat &&
              factor.scalar_type() == at::kFloat, "contiguous float32 bias expected");
  if (local_factorized(factor)) {
    TORCH_CHECK(bias.dim() == 2 && factor.sizes() == bias.sizes() && bias.size(0) >= L, "factors (T', r) expected");
    return LocalBias{nullptr, 0, true, bias.data_ptr<float>(), factor.data_ptr<float>(), bias.size(1)};
  }
  TORCH_CHECK(bias.dim() == 3 && bias.size(1) == bias.size(2) && bias.size(1) >= L, "bias (G, T', T') expected");
  return LocalBias{bias.data_ptr<float>(), bias.size(2)};
}

// The rows of one job (batch row b, features [j0, j0 + slice)) of causal_local_*.
static LocalRows local_rows(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const LocalBias& bias,
                            const c10::optional<torch::Tensor>& valid, int64_t G, int64_t s, int64_t slice,
                            int64_t job) {
  const int64_t L = q.size(1), D = q.size(2), slices = (D + slice - 1) / slice;
  const int64_t b = job / slices, j0 = (job % slices) * slice, offset = b * L * D + j0;
  const bool* mp = valid.has_value() ? valid->data_ptr<bool>() + b * L : nullptr;
  return LocalRows{q.data_ptr<float>() + offset, k.data_ptr<float>() + offset, v.data_ptr<float>() + offset, bias, mp,
                   L, D, std::min(slice, D - j0), s, D / G, j0};
}

torch::Tensor causal_local_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor bias,
                                   torch::Tensor factor, c10::optional<torch::Tensor> valid, int64_t window) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "contiguous q, k, v expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "float32 expected");
  auto y = torch::empty_like(q);
  const int64_t B = q.size(0), L = q.size(1), D = q.size(2), s = std::min(window, L);
  const LocalBias lb = local_bias(bias, factor, L);
  const int64_t G = local_factorized(factor) ? 1 : bias.size(0);
  const int64_t slice = feature_slice(B, D), jobs = B * ((D + slice - 1) / slice);
  if (L == 0) return y;
  auto work = torch::empty({jobs, local_forward_work(slice, s)}, q.options());  // seen by torch's memory profiler
  float *yp = y.data_ptr<float>(), *wp = work.data_ptr<float>();
  at::parallel_for(0, jobs, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t job = lo; job < hi; ++job) {
      const LocalRows x = local_rows(q, k, v, lb, valid, G, s, slice, job);
      local_forward(x, yp + (x.q - q.data_ptr<float>()), wp + job * work.size(1));
    }
  });
  return y;
}


// Features per pass of a job's backward: its whole slice, unless that workspace would exceed an eighth of one (B, L, D)
// activation (short sequences: at L=512, D=512 whole rows take 512 KiB, half of q); then the widest multiple of 16
// that fits (reading part of every row is slower per element, so only then).
static int64_t local_pass_width(int64_t slice, int64_t s, int64_t budget_floats) {
  if (local_backward_work(slice, s) <= budget_floats || slice <= 16) return slice;
  int64_t width = slice / 16 * 16;
  while (width > 16 && local_backward_work(width, s) > budget_floats) width -= 16;
  return width;
}

std::vector<torch::Tensor> causal_local_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor bias,
                                                 torch::Tensor factor, torch::Tensor g,
                                                 c10::optional<torch::Tensor> valid, int64_t window, bool bias_grad) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && g.is_contiguous(),
              "contiguous q, k, v, grad expected");
  const int64_t B = q.size(0), L = q.size(1), D = q.size(2), s = std::min(window, L);
  const LocalBias lb = local_bias(bias, factor, L);
  const int64_t G = local_factorized(factor) ? 1 : bias.size(0);
  const int64_t slice = feature_slice(B, D), jobs = B * ((D + slice - 1) / slice);
  const int64_t pass = local_pass_width(slice, s, B * L * D / 8), threads = at::get_num_threads();
  auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
  LocalBiasGrad bias_grads(bias, factor, G, s, bias_grad);
  // Jobs that run one after another hand each row's band gradient over as soon as the row is done (one row of G x s
  // floats); jobs on several threads each sum a whole band, added up below. Tensors, so that memory profiles see them.
  const bool streamed = jobs == 1 || threads == 1;
  auto dband = torch::zeros({bias_grad ? (streamed ? 1 : jobs) : 0, G, streamed ? 1 : L, s}, q.options());
  if (L > 0) {
    auto work = torch::empty({std::min(jobs, threads), local_backward_work(pass, s)}, q.options());
    const float* gp = g.data_ptr<float>();
    float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
    float *dbp = dband.data_ptr<float>(), *wp = work.data_ptr<float>();
    at::parallel_for(0, jobs, 1, [&](int64_t lo, int64_t hi) {
      float* job_work = wp + (at::get_thread_num() % work.size(0)) * work.size(1);
      for (int64_t job = lo; job < hi; ++job) {
        const LocalRows rows = local_rows(q, k, v, lb, valid, G, s, slice, job);
        for (int64_t p0 = 0; p0 < rows.n; p0 += pass) {
          LocalRows x = rows;
          x.q += p0; x.k += p0; x.v += p0; x.j0 += p0;
          x.n = std::min(pass, rows.n - p0);
          const int64_t offset = x.q - q.data_ptr<float>();
          float* band = !bias_grad ? nullptr : streamed ? dbp : dbp + job * G * L * s;
          local_backward(x, gp + offset, dqp + offset, dkp + offset, dvp + offset, band, job_work,
                         bias_grad && streamed ? &bias_grads : nullptr);
        }
      }
    });
  }
  if (!bias_grad) return {dq, dk, dv, torch::Tensor(), torch::Tensor()};
  if (!streamed) {
    const auto band = dband.sum(0);
    for (int64_t t = 0; t < L; ++t) bias_grads.add_row(t, band.data_ptr<float>() + t * s, L * s);
  }
  if (bias_grads.dw.defined()) return {dq, dk, dv, bias_grads.dw, torch::Tensor()};
  return {dq, dk, dv, bias_grads.du, bias_grads.dv};
}

// AFT-full. With E = exp(w - m) (m: each row's maximum of w over the keys it sees; shared by batch and features) and
// P = exp(k - S) (S: per row block, batch and feature, the running maximum of the valid keys its rows see):
//   num = E @ (P v),  den = E @ P,  y = sigmoid(q) num / den.
// Tiles of RB rows x KB keys x FC features: E (RB x KB) and X = [P v, P] (KB x 2 FC) are built on the fly and the
// products run through BLAS, so nothing the size of T x D exists besides y (and, for the backward, den). num
// accumulates in y itself. A row whose den falls below 1e-20 (its visible keys far below S, or its largest key
// meeting a very negative w) is flagged for aft_ops' exact path.

// The sgemm of the BLAS that torch links (MKL, OpenBLAS): called on raw tiles it costs ~0.1 us, against several us
// for an ATen call. Weak, so that a torch without it still loads this module and takes at::addmm instead. Its integer
// arguments point to 64-bit values: a 32-bit-integer BLAS reads their low halves (little-endian), a 64-bit one all
// of them, and both read the right number.
extern "C" void sgemm_(const char* transa, const char* transb, const int64_t* m, const int64_t* n, const int64_t* k,
                       const float* alpha, const float* a, const int64_t* lda, const float* b, const int64_t* ldb,
                       const float* beta, float* c, const int64_t* ldc) __attribute__((weak));
static bool full_blas_symbol = true;  // tests switch it off to run the at::addmm path

void full_use_blas_symbol(bool use) { full_blas_symbol = use; }

// Row-major C (M x N, row stride ldc) = op(A) op(B) + beta C, with op(X) = X^T when the flag says so; A is M x K
// (K x M transposed), B is K x N (N x K transposed), row strides lda, ldb. BLAS is column-major: it computes C^T.
static void gemm_rows(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (sgemm_ != nullptr && full_blas_symbol) {
    const char a_op = ta ? 'T' : 'N', b_op = tb ? 'T' : 'N';
    const float one = 1.f;
    sgemm_(&b_op, &a_op, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
    return;
  }
  const auto options = at::TensorOptions().dtype(at::kFloat);
  auto a = torch::from_blob(const_cast<float*>(A), {ta ? K : M, ta ? M : K}, {lda, 1}, options);
  auto b = torch::from_blob(const_cast<float*>(B), {tb ? N : K, tb ? K : N}, {ldb, 1}, options);
  auto c = torch::from_blob(C, {M, N}, {ldc, 1}, options);
  c.addmm_(ta ? a.t() : a, tb ? b.t() : b, beta, 1.0);
}

struct FullProblem {
  const float *q, *k, *v, *w;  // q (B, Lq, D); k, v (B, Lk, D); w (G, side, side), query i reads row off + i
  const bool* valid;           // (B, Lk) or nullptr
  int64_t B, Lq, Lk, D, G, Dv, side, off, RB, KB, FC;
  bool causal;
  torch::Tensor row_max_t, shift_t;  // (G, Lq) and (row blocks, B, D): tensors, so that memory profiles see them
  const float *row_max, *shift;

  int64_t row_blocks() const { return (Lq + RB - 1) / RB; }
  int64_t seen(int64_t i1) const { return causal ? std::min(Lk, off + i1) : Lk; }  // keys [0, seen) meet rows < i1
  const float* bias_row(int64_t g, int64_t i) const { return w + (g * side + off + i) * side; }

  // m: the maximum of w over the keys each row sees; S: the running maximum of the valid keys, per row block.
  void prepare(const at::TensorOptions& options) {
    row_max_t = torch::empty({G, Lq}, options);
    shift_t = torch::empty({row_blocks(), B, D}, options);
    float *row_max_out = row_max_t.data_ptr<float>(), *shift_out = shift_t.data_ptr<float>();
    row_max = row_max_out;
    shift = shift_out;
    at::parallel_for(0, G * Lq, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t gi = lo; gi < hi; ++gi) {
        const int64_t g = gi / Lq, i = gi % Lq, e = seen(i + 1);
        const float* row = bias_row(g, i);
        float m = -1e30f;
        for (int64_t j = 0; j < e; ++j) m = std::fmax(m, row[j]);
        row_max_out[gi] = e > 0 ? m : 0.f;
      }
    });
    const float none = -1e30f;  // "no valid key yet": finite (the kernels are compiled with -ffinite-math-only)
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> running(D);
      for (int64_t b = lo; b < hi; ++b) {
        std::fill(running.begin(), running.end(), none);
        int64_t done = 0;
        for (int64_t r = 0; r < row_blocks(); ++r) {
          const int64_t e = seen(std::min(Lq, (r + 1) * RB));
          for (; done < e; ++done) {
            if (valid != nullptr && !valid[b * Lk + done]) continue;
            const float* kr = k + (b * Lk + done) * D;
            for (int64_t j = 0; j < D; ++j) running[j] = std::fmax(running[j], kr[j]);
          }
          float* out = shift_out + (r * B + b) * D;
          for (int64_t j = 0; j < D; ++j) out[j] = running[j] > 0.5f * none ? running[j] : 0.f;
        }
      }
    });
  }

  // E (rows i0 + [0, n) x keys j0 + [0, kb), row stride KB) of group g; 0 where a key is after the row (causal).
  void bias_tile(int64_t g, int64_t i0, int64_t n, int64_t j0, int64_t kb, float* __restrict E) const {
    for (int64_t i = 0; i < n; ++i) {
      const float* __restrict row = bias_row(g, i0 + i) + j0;
      const float m = row_max[g * Lq + i0 + i];
      float* __restrict Ei = E + i * KB;
      const int64_t last = causal ? std::min<int64_t>(kb, off + i0 + i - j0 + 1) : kb;  // keys < last are visible
      if (i + 1 < n) for (int64_t j = 0; j < kb; j += 16) __builtin_prefetch(row + side + j);
      for (int64_t j = 0; j < std::max<int64_t>(last, 0); ++j) Ei[j] = exp_nonpos(row[j] - m);
      for (int64_t j = std::max<int64_t>(last, 0); j < kb; ++j) Ei[j] = 0.f;
    }
  }

  // X = [P v, P] (kb x 2 fc, row stride 2 FC) of batch b, keys j0 + [0, kb), features f0 + [0, fc) of group g, under
  // row block r's shift; a masked key is a row of zeros.
  void value_tile(int64_t r, int64_t b, int64_t g, int64_t j0, int64_t kb, int64_t f0, int64_t fc,
                  float* __restrict X) const {
    const int64_t col = g * Dv + f0;
    const float* __restrict S = shift + (r * B + b) * D + col;
    for (int64_t j = 0; j < kb; ++j) {
      float* __restrict Xj = X + j * 2 * FC;
      if (valid != nullptr && !valid[b * Lk + j0 + j]) {
        for (int64_t f = 0; f < 2 * fc; ++f) Xj[f] = 0.f;
        continue;
      }
      const float* __restrict kj = k + (b * Lk + j0 + j) * D + col;
      const float* __restrict vj = v + (b * Lk + j0 + j) * D + col;
      for (int64_t f = 0; f < fc; ++f) {
        const float p = exp_nonpos(kj[f] - S[f]);
        Xj[f] = p * vj[f];
        Xj[fc + f] = p;
      }
    }
  }
};

static FullProblem full_problem(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const torch::Tensor& w, const c10::optional<torch::Tensor>& valid, int64_t off,
                                bool causal, int64_t RB, int64_t KB, int64_t FC) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && w.is_contiguous(),
              "contiguous q, k, v, bias expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float32 expected");
  const int64_t G = w.size(0), D = q.size(2);
  TORCH_CHECK(w.dim() == 3 && w.size(1) == w.size(2) && D % G == 0 && w.size(1) >= k.size(1), "bias (G, T', T')");
  FullProblem p{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), w.data_ptr<float>(),
                valid.has_value() ? valid->data_ptr<bool>() : nullptr, q.size(0), q.size(1), k.size(1), D, G, D / G,
                w.size(1), off, RB, KB, std::min(FC, D / G), causal};
  p.prepare(q.options());
  return p;
}

// Floats of one thread's workspace: the forward's E, X (and, without keep, a den tile for B x RB rows); the
// backward's E, the bias gradient's tile, X, dX and dS. (Summing dS X^T straight into the (T, T) gradient instead,
// with its row stride of T floats, made the backward ~7 % slower at T=8192.)
static int64_t full_forward_work(int64_t B, int64_t Dv, int64_t RB, int64_t KB, int64_t FC, bool keep) {
  return RB * KB + KB * 2 * FC + (keep ? 0 : B * RB * Dv);
}
static int64_t full_backward_work(int64_t RB, int64_t KB, int64_t FC) { return 2 * RB * KB + 2 * KB * 2 * FC + RB * 2 * FC; }
int64_t full_workspace(int64_t B, int64_t Dv, int64_t RB, int64_t KB, int64_t FC, bool keep) {
  FC = std::min(FC, Dv);
  const int64_t forward = full_forward_work(B, Dv, RB, KB, FC, keep);
  return keep ? std::max(forward, full_backward_work(RB, KB, FC)) : forward;
}

// Forward: y (B, Lq, D), den (B, Lq, D) when keep (else empty: per-job den tiles), flags (G, B, Lq) uint8.
std::vector<torch::Tensor> full_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor w,
                                        c10::optional<torch::Tensor> valid, int64_t off, bool causal, bool keep,
                                        int64_t RB, int64_t KB, int64_t FC) {
  const FullProblem p = full_problem(q, k, v, w, valid, off, causal, RB, KB, FC);
  const int64_t B = p.B, Lq = p.Lq, D = p.D, Dv = p.Dv, G = p.G, FCc = p.FC;
  auto y = torch::zeros_like(q);
  auto den = keep ? torch::zeros_like(q) : torch::empty({0}, q.options());
  auto flags = torch::zeros({G, B, Lq}, q.options().dtype(at::kByte));
  const int64_t jobs = G * p.row_blocks();
  // one workspace per thread, a tensor so that memory profiles see it
  auto work = torch::empty({at::get_num_threads(), full_forward_work(B, Dv, RB, KB, FCc, keep)}, q.options());
  float *yp = y.data_ptr<float>(), *dp = keep ? den.data_ptr<float>() : nullptr, *wp = work.data_ptr<float>();
  uint8_t* fp = flags.data_ptr<uint8_t>();
  at::parallel_for(0, jobs, 1, [&](int64_t lo, int64_t hi) {
    float* E = wp + at::get_thread_num() * work.size(1);
    float* X = E + RB * KB;
    for (int64_t job = lo; job < hi; ++job) {
      const int64_t g = job / p.row_blocks(), r = job % p.row_blocks();
      const int64_t i0 = r * RB, n = std::min(RB, Lq - i0), e = p.seen(i0 + n);
      // den of (b, row i, feature f of the group) at dbase + (b * Lq + i) * dld + f: in den itself, or a tile
      float* dbase = keep ? dp + g * Dv : X + KB * 2 * FCc;
      const int64_t dld = keep ? D : Dv, dbatch = keep ? Lq * D : RB * Dv, drow0 = keep ? i0 : 0;
      if (!keep) std::fill(dbase, dbase + B * RB * Dv, 0.f);
      for (int64_t j0 = 0; j0 < e; j0 += KB) {
        const int64_t kb = std::min(KB, e - j0);
        p.bias_tile(g, i0, n, j0, kb, E);
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t f0 = 0; f0 < Dv; f0 += FCc) {
            const int64_t fc = std::min(FCc, Dv - f0);
            p.value_tile(r, b, g, j0, kb, f0, fc, X);
            gemm_rows(false, false, n, fc, kb, E, KB, X, 2 * FCc, 1.f, yp + (b * Lq + i0) * D + g * Dv + f0, D);
            gemm_rows(false, false, n, fc, kb, E, KB, X + fc, 2 * FCc, 1.f,
                      dbase + b * dbatch + drow0 * dld + f0, dld);
          }
        }
      }
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t i = 0; i < n; ++i) {
          const float* __restrict qr = p.q + (b * Lq + i0 + i) * D + g * Dv;
          const float* __restrict dr = dbase + b * dbatch + (drow0 + i) * dld;
          float* __restrict yr = yp + (b * Lq + i0 + i) * D + g * Dv;
          float smallest = 1.f;
          for (int64_t f = 0; f < Dv; ++f) {
            const float x = qr[f], ez = exp_nonpos(-std::fabs(x));
            smallest = std::fmin(smallest, dr[f]);
            yr[f] = sigmoid_of(x, ez) * yr[f] / std::fmax(dr[f], 1e-37f);
          }
          fp[(g * B + b) * Lq + i0 + i] = smallest < 1e-20f;
        }
      }
    }
  });
  return {y, den, flags};
}

// Backward. With a = g / den: d loss / d num = a sigmoid(q), d loss / d den = -a y, so for dS = [a sigmoid(q), -a y]
// (per tile, rows x 2 FC):  dX = E^T dS (dv = P dX_num, dk = P v dX_num + P dX_den),  dw = E * (dS X^T).
// den is consumed: a goes into its buffer, then dq = g y (1 - sigmoid(q)) does, and that buffer is returned as dq.
// Jobs own key blocks (their rows of dk, dv and their columns of dw), so no two write the same place.
std::vector<torch::Tensor> full_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor w,
                                         c10::optional<torch::Tensor> valid, torch::Tensor y, torch::Tensor den,
                                         torch::Tensor g, int64_t off, bool causal, bool bias_grad,
                                         int64_t RB, int64_t KB, int64_t FC) {
  TORCH_CHECK(y.is_contiguous() && den.is_contiguous() && g.is_contiguous(), "contiguous y, den, grad expected");
  const FullProblem p = full_problem(q, k, v, w, valid, off, causal, RB, KB, FC);
  const int64_t B = p.B, Lq = p.Lq, Lk = p.Lk, D = p.D, Dv = p.Dv, FCc = p.FC;
  const float *qp = p.q, *yp = y.data_ptr<float>(), *gp = g.data_ptr<float>();
  float* ap = den.data_ptr<float>();
  at::parallel_for(0, B * Lq * D, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t x = lo; x < hi; ++x) ap[x] = gp[x] / std::fmax(ap[x], 1e-37f);
  });
  auto dk = torch::zeros_like(k), dv = torch::zeros_like(v);
  auto dw = bias_grad ? torch::zeros_like(w) : torch::Tensor();
  const int64_t key_blocks = (Lk + KB - 1) / KB, jobs = p.G * key_blocks;
  auto work = torch::empty({at::get_num_threads(), full_backward_work(RB, KB, FCc)}, q.options());
  float *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>(), *wp = work.data_ptr<float>();
  float* dwp = bias_grad ? dw.data_ptr<float>() : nullptr;
  at::parallel_for(0, jobs, 1, [&](int64_t lo, int64_t hi) {
    float* E = wp + at::get_thread_num() * work.size(1);
    float* dwt = E + RB * KB;
    float* X = dwt + RB * KB;
    float* dX = X + KB * 2 * FCc;
    float* dS = dX + KB * 2 * FCc;
    for (int64_t job = lo; job < hi; ++job) {
      const int64_t gr = job / key_blocks, j0 = (job % key_blocks) * KB, kb_all = std::min(KB, Lk - j0);
      const int64_t first = p.causal ? std::max<int64_t>(0, j0 - p.off) / RB : 0;  // rows before never see j0
      for (int64_t r = first; r < p.row_blocks(); ++r) {
        const int64_t i0 = r * RB, n = std::min(RB, Lq - i0), e = p.seen(i0 + n);
        if (e <= j0) continue;
        const int64_t kb = std::min(kb_all, e - j0);
        p.bias_tile(gr, i0, n, j0, kb, E);
        if (bias_grad) std::fill(dwt, dwt + RB * KB, 0.f);
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t f0 = 0; f0 < Dv; f0 += FCc) {
            const int64_t fc = std::min(FCc, Dv - f0), col = gr * Dv + f0;
            p.value_tile(r, b, gr, j0, kb, f0, fc, X);
            for (int64_t i = 0; i < n; ++i) {
              const int64_t at_row = (b * Lq + i0 + i) * D + col;
              const float *__restrict a = ap + at_row, *__restrict qr = qp + at_row, *__restrict yr = yp + at_row;
              float* __restrict dSi = dS + i * 2 * FCc;
              if (i + 1 < n) {
                for (int64_t f = 0; f < fc; f += 16) {
                  __builtin_prefetch(a + D + f); __builtin_prefetch(qr + D + f); __builtin_prefetch(yr + D + f);
                }
              }
              for (int64_t f = 0; f < fc; ++f) {
                const float x = qr[f];
                dSi[f] = a[f] * sigmoid_of(x, exp_nonpos(-std::fabs(x)));
                dSi[fc + f] = -a[f] * yr[f];
              }
            }
            if (bias_grad) gemm_rows(false, true, n, kb, 2 * fc, dS, 2 * FCc, X, 2 * FCc, 1.f, dwt, KB);
            gemm_rows(true, false, kb, 2 * fc, n, E, KB, dS, 2 * FCc, 0.f, dX, 2 * FCc);
            for (int64_t j = 0; j < kb; ++j) {
              const int64_t at_key = (b * Lk + j0 + j) * D + col;
              const float *__restrict Xj = X + j * 2 * FCc, *__restrict dXj = dX + j * 2 * FCc;
              float *__restrict dkj = dkp + at_key, *__restrict dvj = dvp + at_key;
              for (int64_t f = 0; f < fc; ++f) {
                dvj[f] += Xj[fc + f] * dXj[f];
                dkj[f] += Xj[f] * dXj[f] + Xj[fc + f] * dXj[fc + f];
              }
            }
          }
        }
        if (!bias_grad) continue;
        for (int64_t i = 0; i < n; ++i) {  // d exp(w - m) / dw = E (m is a constant shift)
          float* __restrict out = dwp + (gr * p.side + p.off + i0 + i) * p.side + j0;
          const float *__restrict Ei = E + i * KB, *__restrict dwi = dwt + i * KB;
          for (int64_t j = 0; j < kb; ++j) out[j] = Ei[j] * dwi[j];
        }
      }
    }
  });
  at::parallel_for(0, B * Lq * D, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t x = lo; x < hi; ++x) {
      const float ez = exp_nonpos(-std::fabs(qp[x]));
      ap[x] = gp[x] * yp[x] * sigmoid_of(-qp[x], ez);  // y (1 - sigmoid(q)), as sigmoid(-q): no cancellation
    }
  });
  return {den, dk, dv, dw};
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

                _module = load_inline("modeling_aft_fused_v34", cpp_sources=_SOURCE,
                                      functions=["causal_simple_forward", "causal_simple_backward",
                                                 "causal_conv1d_forward", "causal_conv1d_backward",
                                                 "causal_local_forward", "causal_local_backward",
                                                 "full_forward", "full_backward", "full_workspace", "full_use_blas_symbol"],
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


class _FusedCausal(torch.autograd.Function):
    """One of the fused operators (`name`: simple, conv1d, local) as an autograd Function. Keeps only the inputs for
    the backward, which recomputes the forward's per-row state in place of its outputs."""

    @staticmethod
    def forward(ctx, module, name, valid, options, *inputs):
        ctx.module, ctx.name, ctx.options = module, name, options
        ctx.save_for_backward(valid, *inputs)
        return getattr(module, f"causal_{name}_forward")(*inputs, valid, *options)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        valid, *inputs = ctx.saved_tensors
        # kernels with inputs after q, k, v (a bias, a conv kernel) return their gradient only when it is wanted
        # (AFT-local's is T' x T' for a dense bias)
        bias_grad = (any(ctx.needs_input_grad[7:]),) if len(inputs) > 3 else ()
        grads = getattr(ctx.module, f"causal_{ctx.name}_backward")(*inputs, grad.contiguous(), valid, *ctx.options,
                                                                   *bias_grad)
        return None, None, None, None, *grads


def _fused(name, inputs, key_mask, options=()):
    """The fused operator `name` on contiguous float32 CPU inputs (through autograd when a gradient is wanted), or None
    when the kernels do not apply. options: the kernel's arguments after the inputs and the key mask."""
    module = _module_for(*inputs)
    if module is None:
        return None
    inputs = [x.contiguous() for x in inputs]
    valid = _valid_keys(key_mask, inputs[0].device)
    if _needs_grad(*inputs):
        return _FusedCausal.apply(module, name, valid, options, *inputs)
    return getattr(module, f"causal_{name}_forward")(*inputs, valid, *options)


def fused_causal_simple(q, k, v, key_mask=None):
    """Causal AFT-simple (gated by sigmoid(q)) with the fused kernels, or None when they do not apply.
    q, k, v (B, T, D). Differentiable: the backward is fused too and holds nothing but dq, dk, dv."""
    return _fused("simple", [q, k, v], key_mask)


def fused_causal_conv1d(q, k, v, kernel, key_mask=None):
    """Causal AFT-conv (gated by sigmoid(q)) with the fused kernels, or None when they do not apply.
    q, v (B, T, D); k (B, T, h); kernel (h, s): kernel[i, d] is head i's bias at offset t - t' = d. Differentiable
    in q, k, v and kernel, with a fused backward."""
    return _fused("conv1d", [q, k, v, kernel], key_mask)


def fused_causal_local(q, k, v, pos_bias, window, key_mask=None):
    """Causal AFT-local (gated by sigmoid(q)) with the fused kernels, or None when they do not apply.
    q, k, v (B, T, D); pos_bias the dense (G, T', T') bias (G dividing D, T' >= T) or its factors (u, v), each (T', r):
    row t reads its window's biases w[g, t, t - d], d < window, straight from them (no band is built), and keys older
    than the window get 0. Differentiable in q, k, v and the bias, with a fused backward that holds dq, dk, dv, the
    band's gradient (when the bias needs one), O(D) state per 32 rows (in dq) and a few 32-row chunks of per-row fields."""
    bias, factor = pos_bias if isinstance(pos_bias, (tuple, list)) else (pos_bias, pos_bias.new_empty(0))
    return _fused("local", [q, k, v, bias, factor], key_mask, (window,))


# AFT-full's tiles (rows, keys, features), largest first. A call takes the largest whose workspace per thread fits in
# an eighth of one (B, T, D) activation (but at least 64 KiB) and in FULL_WORKSPACE_BYTES (training: forward and backward; inference, which
# adds a den tile: the second figure): the tiles stay in L2, and the operator's memory beyond its outputs stays within
# SDPA's scratch. Larger tiles rebuild E and [P v, P] fewer times (their exps and the reads of q, k, v, y behind them
# are ~30 % of a 256-tile backward) and give BLAS larger products.
FULL_TILES = ((256, 256, 128), (256, 128, 128), (128, 256, 128), (128, 128, 128), (64, 128, 64), (64, 64, 64),
              (32, 64, 64), (32, 32, 32), (16, 16, 16))
FULL_WORKSPACE_BYTES = (768 << 10, 448 << 10)


def _full_tile(module, B, T, D, groups, training):
    budget = max(64 << 10, min(FULL_WORKSPACE_BYTES[0 if training else 1], B * T * D * 4 // 8))
    fits = [t for t in FULL_TILES if 4 * module.full_workspace(B, D // groups, *t, training) <= budget]
    return fits[0] if fits else FULL_TILES[-1]


class _FusedFull(torch.autograd.Function):
    """aft_full's fused kernels as an autograd Function. Saves the inputs, the output y and den (B, Lq, D); the backward
    turns den's buffer into g / den, then into dq, which it returns: a training step holds y, den, dk, dv (and the bias
    gradient), as SDPA holds y, dq, dk, dv."""

    @staticmethod
    def forward(ctx, module, valid, options, q, k, v, w):
        y, den, flags = module.full_forward(q, k, v, w, valid, *options[:2], True, *options[2:])
        ctx.module, ctx.options, ctx.den_consumed = module, options, False
        ctx.save_for_backward(valid, q, k, v, w, y, den)
        ctx.mark_non_differentiable(flags)
        return y, flags

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_flags):
        valid, q, k, v, w, y, den = ctx.saved_tensors
        off, causal, *tile = ctx.options
        if ctx.den_consumed:  # a second backward (retain_graph): the first one turned den into dq
            den = ctx.module.full_forward(q, k, v, w, valid, off, causal, True, *tile)[1]
        ctx.den_consumed = True
        dq, dk, dv, dw = ctx.module.full_backward(q, k, v, w, valid, y, den, grad.contiguous(), off, causal,
                                                  ctx.needs_input_grad[6], *tile)
        return None, None, None, dq, dk, dv, dw if ctx.needs_input_grad[6] else None


def fused_full(q, k, v, pos_bias, causal, key_mask=None):
    """AFT-full (gated by sigmoid(q)) with the fused kernels, or None when they do not apply (not CPU float32).

    q (B, Lq, D), k and v (B, Lk, D), Lq <= Lk: query i sits at position Lk - Lq + i and reads row Lk - Lq + i of
    pos_bias (G, T', T') (T' >= Lk, G dividing D). Returns (y, flags): flags (B, Lq) marks the rows whose den fell
    below 1e-20, for aft_ops' exact path. Differentiable in q, k, v and pos_bias; a 16-bit pos_bias (autocast) is read
    as a float32 copy."""
    module = _module_for(q, k, v)
    if module is None or pos_bias.device.type != "cpu":
        return None
    q, k, v, w = (x.contiguous() for x in (q, k, v, pos_bias.float()))
    valid = _valid_keys(key_mask, q.device)
    B, Lk, D = k.shape
    training = _needs_grad(q, k, v, w)
    options = (Lk - q.shape[1], causal, *_full_tile(module, B, Lk, D, w.shape[0], training))
    if training:
        y, flags = _FusedFull.apply(module, valid, options, q, k, v, w)
    else:
        y, _, flags = module.full_forward(q, k, v, w, valid, *options[:2], False, *options[2:])
    return y, flags.any(0)
