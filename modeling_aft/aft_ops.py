"""Attention Free Transformer operators (Zhai et al., 2021, arXiv:2105.14103).

    Y_t = sigmoid(Q_t) * sum_t' exp(K_t' + w_{t,t'}) * V_t' / sum_t' exp(K_t' + w_{t,t'})

Five variants share this file: ``aft_full`` (learned T x T bias), ``aft_local`` (the bias only inside a
window, 0 outside), ``aft_simple`` (w = 0), ``aft_conv1d`` / ``aft_conv2d`` (a per-head convolution kernel
as the bias, one key channel per head).

How the numbers stay finite (see shared/design/aft-numerics.md):
* exp(K + w) = exp(w) * exp(K): a per-row shift of w and a per-(batch, feature) shift of K cancel in
  num / den, so we only ever exponentiate shifted, non-positive values.
* The K shift of a causal row may only come from what that row (or its block) can see: causal scans
  run segment by segment with a running maximum, rescaling the carried sums by exp(old_max - new_max).
* The banded variants never subtract: row t sums the keys outside its band with weight 1 (a prefix
  sum read d_hi + 1 rows back, plus a suffix sum when non-causal) and the band with weight exp(w). With
  the row shift m_t = max(0, max_band w) both weights are <= 1, so den is a sum of non-negative terms
  and keeps full relative precision however negative (or positive) the bias gets.
* What the fast path can still lose (den underflow below EXACT_DEN_THRESHOLD when the visible keys lie
  far below the block's shift, or the largest K meets a very negative w) is detected per row and
  recomputed exactly, from the per-row maximum of K + w over the keys that row sees (`_exact_rows`).
  Rare in practice, exact for any finite input.
* Everything accumulates in float32 (float64 stays float64); bf16/fp16 inputs are cast up and the
  result cast back, autocast is switched off inside.

Complexity: aft_full is O(T^2 D) time, O(TD + T^2) memory and never builds (B, T, T, D); the others are
O(T s D) / O(T D) time and O(T D) memory: prefix/suffix sums plus a band, computed chunk-wise with
small matrix products (torch.cumsum is a slow strided loop on CPU; a C x C triangular matmul is not). Causal simple/local/conv1d and aft_full
have hand-written backward passes that recompute per segment / block instead of storing activations.

Only stdlib and torch are imported: this folder is copied next to checkpoints (trust_remote_code).
"""

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["aft_full", "aft_local", "aft_simple", "aft_conv1d", "aft_conv2d"]

# Tunables, read at call time (tests lower them to exercise the multi-segment / multi-block paths).
SEGMENT_SIZE = 512         # rows per segment of the causal scans (a multiple of CHUNK_SIZE)
CHUNK_SIZE = 16            # rows per chunk: prefix and band sums inside a segment are (chunk x window) matmuls
FULL_BLOCK_SIZE = 512      # row / key block of aft_full
EXACT_DEN_THRESHOLD = 1e-20   # den (under the shift) below this: the row lost terms to underflow -> exact
EXACT_ROWS_BUDGET = 1 << 22   # elements of (rows, keys, features) per chunk of the exact recompute


# ----------------------------------------------------------------------------------------------------
# small helpers


def _compute_dtype(*xs):
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _up(x, dtype):
    return None if x is None else x.to(dtype)


def _safe_shift(m):
    """A max over nothing is -inf; any finite shift works there (all its terms are exactly 0)."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _masked_keys(k, key_mask):
    """Masked keys become -inf so that they drop out of every max and every exp exactly."""
    if key_mask is None:
        return k, None
    valid = key_mask.to(torch.bool)
    return torch.where(valid.unsqueeze(-1), k, torch.full_like(k, -math.inf)), valid


def _has_visible(valid, B, Lq, Lk, causal, device):
    """(B, Lq) bool: does row i see at least one real key? Rows that do not return exactly 0."""
    if valid is None:
        return torch.ones(B, Lq, dtype=torch.bool, device=device)
    if causal:
        return valid.cumsum(1)[:, Lk - Lq:] > 0
    return valid.any(1, keepdim=True).expand(B, Lq)


def _safe_div(num, den):
    """num / den, and 0 where den == 0 (no visible key); never NaN, no NaN gradient either.

    All our weights are >= 0, so den == 0 means every term is 0 and num is 0 as well: clamping den to
    the smallest normal number is exact wherever den > 0 matters (den < EXACT_DEN_THRESHOLD is redone).
    """
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def _to_fg(x, Dv):
    """Per-key-channel tensor (..., Dkg) -> per-X-channel (..., Dv + Dkg): [PV features, P channels]."""
    return torch.cat([x.expand(*x.shape[:-1], Dv) if x.shape[-1] == 1 else x, x], -1)


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def _check_qkv(q, k, v, seq_dims=1):
    _check(q.dim() == 2 + seq_dims and k.dim() == 2 + seq_dims and v.dim() == 2 + seq_dims,
           f"q, k, v must have {2 + seq_dims} dims, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _check(k.shape[:-1] == v.shape[:-1], f"k {tuple(k.shape)} and v {tuple(v.shape)} must share (B, T)")
    _check(q.shape[0] == k.shape[0], f"batch of q {q.shape[0]} != batch of k {k.shape[0]}")
    _check(q.shape[-1] == v.shape[-1], f"feature dim of q {q.shape[-1]} != feature dim of v {v.shape[-1]}")


def _check_mask(key_mask, shape):
    _check(key_mask is None or tuple(key_mask.shape) == tuple(shape),
           f"key_mask must have shape {tuple(shape)}, got {None if key_mask is None else tuple(key_mask.shape)}")


def _heads_of_bias(pos_bias, D, Lq, Lk):
    """pos_bias (T', T') or (H, T', T') -> (H, T', T') view, validated against D and the lengths."""
    _check(pos_bias.dim() in (2, 3), f"pos_bias must be (T', T') or (H, T', T'), got {tuple(pos_bias.shape)}")
    w = pos_bias if pos_bias.dim() == 3 else pos_bias.unsqueeze(0)
    H = w.shape[0]
    _check(w.shape[-1] == w.shape[-2], f"pos_bias must be square in its last two dims, got {tuple(pos_bias.shape)}")
    _check(w.shape[-1] >= max(Lq, Lk), f"pos_bias is {w.shape[-1]} long, smaller than the sequence ({Lk})")
    _check(H >= 1 and D % H == 0, f"feature dim {D} is not divisible by the {H} heads of pos_bias")
    return w


def _no_autocast(device_type):
    """The body runs in float32 (float64 stays): autocast must not push its matmuls back to 16 bits."""
    return torch.autocast(device_type=device_type, enabled=False)


# ----------------------------------------------------------------------------------------------------
# the exact path: one row at a time semantics, vectorized over a chunk of rows, per-row max of K + w


def _exact_rows(q, k, v, valid, rows_b, rows_i, rows_pos, bias_rows, groups, causal):
    """Exact Y for the rows (rows_b[n], rows_i[n]) whose fast-path den underflowed or cancelled.

    bias_rows(pos, Tk) -> (n, G, Tk) dense bias of those rows against keys [0, Tk), 0 outside a band.
    Memory is bounded by EXACT_ROWS_BUDGET; under autograd each chunk is checkpointed so its
    (rows, keys, features) temporaries are not kept for backward.
    """
    B, Lk, Dk = k.shape
    D = v.shape[-1]
    G = groups
    order = torch.argsort(rows_pos)  # causal rows sorted by position need only keys [0, pos]
    rows_b, rows_i, rows_pos = rows_b[order], rows_i[order], rows_pos[order]
    n_all = rows_b.numel()
    step = max(1, EXACT_ROWS_BUDGET // max(1, Lk * D))

    def rows_fn(qr, kr, vr, w, ok):
        # qr (n, D), kr (n, Tk, Dk), vr (n, Tk, D), w (n, G, Tk) (-inf = not visible), ok (n, Tk)
        n, Tk = kr.shape[:2]
        w = w.transpose(1, 2)  # (n, Tk, G)
        sees = ok.unsqueeze(-1) & torch.isfinite(w)
        kk = torch.where(sees.unsqueeze(-1), kr.view(n, Tk, G, Dk // G), -math.inf)  # (n, Tk, G, Dkg)
        ww = torch.where(sees, w, -math.inf)
        # shift K and w separately first: K + w rounded in fp32 would lose w's digits when |K| ~ 1e4
        kk = kk - _safe_shift(kk.detach().amax(1, keepdim=True))
        ww = ww - _safe_shift(ww.detach().amax(1, keepdim=True))
        logits = kk + ww.unsqueeze(-1)
        p = torch.exp(logits - _safe_shift(logits.detach().amax(1, keepdim=True)))
        num = (p * vr.view(n, Tk, G, D // G)).sum(1)  # (n, G, Dv)
        den = p.sum(1)  # (n, G, Dkg)
        return torch.sigmoid(qr) * _safe_div(num, den).reshape(n, D)

    outs = []
    for s in range(0, n_all, step):
        b, i, pos = rows_b[s:s + step], rows_i[s:s + step], rows_pos[s:s + step]
        Tk = int(pos.max()) + 1 if causal else Lk
        ok = valid[b, :Tk] if valid is not None else torch.ones(b.numel(), Tk, dtype=torch.bool, device=k.device)
        args = (q[b, i], k[b, :Tk], v[b, :Tk], bias_rows(pos, Tk), ok)
        if torch.is_grad_enabled() and any(a.requires_grad for a in args):
            outs.append(checkpoint(rows_fn, *args, use_reentrant=False))
        else:
            outs.append(rows_fn(*args))
    y = torch.cat(outs, 0)
    return y[torch.argsort(order)]


def _fix_flagged(y, flags, q, k, v, valid, bias_rows, groups, causal, offset=0):
    """Replace the flagged rows of the fast result y (B, Lq, D) by their exact values."""
    if not bool(flags.any()):
        return y
    rows_b, rows_i = flags.nonzero(as_tuple=True)
    exact = _exact_rows(q, k, v, valid, rows_b, rows_i, rows_i + offset, bias_rows, groups, causal)
    return y.index_put((rows_b, rows_i), exact.to(y.dtype))


def _causal_bias(w, pos, Tk):
    """-inf on keys after pos: w (n, G, Tk), pos (n,)."""
    future = torch.arange(Tk, device=w.device)[None, :] > pos[:, None]  # (n, Tk)
    return w.masked_fill(future[:, None, :], -math.inf)


# ----------------------------------------------------------------------------------------------------
# building blocks of the linear-time variants: X = [P*V, P] in a grouped layout, chunked prefix sums,
# banded corrections as (chunk x window) matmuls


def _build_X(kg, vg, shift, k0, k1):
    """X (B, G, k1-k0, Dv+Dkg) = [P*V, P] with P = exp(K - shift) for keys [k0, k1); zero rows outside [0, T).

    kg (B, T, G, Dkg) (masked keys are -inf), vg (B, T, G, Dv), shift (B, G, Dkg).
    """
    B, T, G, Dkg = kg.shape
    Dv = vg.shape[-1]
    lo, hi = max(k0, 0), min(k1, T)
    shift = shift.view(B, 1, G, Dkg)
    if torch.is_grad_enabled():  # differentiable version (the non-causal path runs under autograd)
        P = torch.exp(kg[:, lo:hi] - shift)  # (B, n, G, Dkg)
        X = torch.cat([P * vg[:, lo:hi], P], -1).transpose(1, 2)  # (B, G, n, Fg)
        return F.pad(X, (0, 0, lo - k0, k1 - hi)).contiguous()
    # inside the custom Functions: write straight into one buffer, no temporaries
    X = kg.new_empty(B, G, k1 - k0, Dv + Dkg)
    X[:, :, :lo - k0].zero_()
    X[:, :, hi - k0:].zero_()
    P = X[:, :, lo - k0:hi - k0, Dv:]
    torch.sub(kg[:, lo:hi].transpose(1, 2), shift.transpose(1, 2), out=P).exp_()
    torch.mul(P, vg[:, lo:hi].transpose(1, 2), out=X[:, :, lo - k0:hi - k0, :Dv])
    return X


def _chunk_scan(X, C, reverse=False, init=None):
    """Inclusive prefix (suffix if reverse) sums over dim 2 of X (B, G, n*C, F), plus init (B, G, 1, F).

    torch.cumsum on CPU is a strided scalar loop; a tiny triangular matmul per chunk runs at roughly
    the cost of one elementwise pass. The n chunk totals are scanned on their own (n is small).
    """
    B, G, Tp, Fc = X.shape
    n = Tp // C
    tri = torch.ones(C, C, dtype=X.dtype, device=X.device)
    tri = tri.triu() if reverse else tri.tril()
    S = torch.matmul(tri, X.view(B, G, n, C, Fc))  # (B, G, n, C, F)
    offset = init
    if n > 1:
        tot = S[:, :, :, 0] if reverse else S[:, :, :, -1]  # (B, G, n, F) chunk totals
        excl = tot.flip(2).cumsum(2).flip(2) - tot if reverse else tot.cumsum(2) - tot
        offset = excl if init is None else excl + init
    if offset is not None:
        S.add_(offset.view(B, G, -1, 1, Fc))  # fine under autograd too: matmul keeps its inputs, not S
    return S.view(B, G, Tp, Fc)


def _band_cols(C, nb, device):
    """Window column of (row i of a chunk, band slot j): offsets d = d_lo + j read key t - d."""
    return torch.arange(C, device=device)[:, None] + (nb - 1) - torch.arange(nb, device=device)[None, :]


def _band_matrices(beta, row0, n, C):
    """(G, n or 1, C, C + nb - 1) chunk matrices holding the band weights beta.

    beta (G, T, nb) (one row of weights per query row) or (G, 1, nb) (a convolution: one matrix for
    every chunk). Row i of chunk c is query row0 + c*C + i; window column l is key row0 + c*C - d_hi + l.
    """
    G, Tb, nb = beta.shape
    if Tb == 1:
        b = beta.view(G, 1, 1, nb).expand(G, 1, C, nb)
    else:
        b = _rows_of(beta, row0, n * C).reshape(G, n, C, nb)
    cols = _band_cols(C, nb, beta.device).expand(*b.shape)
    M = torch.zeros(*b.shape[:3], C + nb - 1, dtype=beta.dtype, device=beta.device)
    return M.scatter(-1, cols, b)


def _rows_of(x, row0, n):
    """Rows [row0, row0 + n) of x (G, T, ...) with zero rows past T; a (G, 1, ...) x is per-group."""
    if x.shape[1] == 1:
        return x
    r = x[:, row0:row0 + n]
    return F.pad(r, (0, 0) * (x.dim() - 2) + (0, n - r.shape[1])) if r.shape[1] < n else r


def _windows(Xw, C, L):
    """Overlapping windows (B, G, n, L, F) of Xw (B, G, (n-1)*C + L, F), stride C, as a view."""
    return Xw.unfold(2, L, C).transpose(-1, -2)


def _band_apply(M, Xw, C):
    """Y (B, G, n*C, F): row i of chunk c gets sum_l M[c, i, l] * Xw[c*C + l]."""
    L = M.shape[-1]
    Y = torch.matmul(M, _windows(Xw, C, L))  # (B, G, n, C, F)
    return Y.flatten(2, 3)


def _band_apply_t(M, dY, C):
    """Adjoint of _band_apply: dXw ((n-1)*C + L rows) from dY (B, G, n*C, F), by overlap-add."""
    B, G, Tp, Fc = dY.shape
    n, L = Tp // C, M.shape[-1]
    dwin = torch.matmul(M.transpose(-1, -2), dY.view(B, G, n, C, Fc))  # (B, G, n, L, F)
    pieces = -(-L // C)
    dwin = F.pad(dwin, (0, 0, 0, pieces * C - L))
    dXw = dY.new_zeros(B, G, (n + pieces - 1) * C, Fc)
    for p in range(pieces):  # window piece p of chunk c lands on chunk c + p
        dXw[:, :, p * C:(p + n) * C] += dwin[:, :, :, p * C:(p + 1) * C].reshape(B, G, n * C, Fc)
    return dXw[:, :, :(n - 1) * C + L]


def _band_grad(dY, Xw, C, nb, toeplitz):
    """d(loss)/d(beta rows) from dY (B, G, n*C, F) and the windows of Xw: (G, n*C, nb) or (G, 1, nb)."""
    B, G, Tp, Fc = dY.shape
    n, L = Tp // C, C + nb - 1
    dM = torch.matmul(dY.view(B, G, n, C, Fc), _windows(Xw, C, L).transpose(-1, -2)).sum(0)  # (G, n, C, L)
    db = dM.gather(-1, _band_cols(C, nb, dY.device).expand(G, n, C, nb))  # (G, n, C, nb)
    return db.sum((1, 2)).unsqueeze(1) if toeplitz else db.reshape(G, Tp, nb)


def _round_up(x, m):
    return -(-x // m) * m


def _band_weights(w, inside):
    """Band weights exp(w - m) and the weight exp(-m) of everything outside the band, m = max(0, w_band).

    w (G, T|1, nb), inside (T|1, nb) marks the band slots that exist. Both weights are <= 1: no overflow
    for a large positive bias, and no subtraction (den stays a sum of non-negative terms).
    """
    w = torch.where(inside, w, -math.inf)
    m = w.detach().amax(-1).clamp_min(0)  # (G, T|1); rows with no slot have m = 0
    return torch.exp(w - m.unsqueeze(-1)), torch.exp(-m)


# ----------------------------------------------------------------------------------------------------
# causal prefix + band scan (aft_simple / aft_local / aft_conv1d, causal): custom autograd Function
#
#   S_t = alpha_t * sum_{t' <= t - nb} X_t'  +  sum_{d = 0}^{nb - 1} beta[t, d] * X_{t - d},   X = [P V, P]
#
# (nb = 0 for aft_simple: a plain prefix sum.) Each segment [a, b) works on the keys [a - H, a + Tp)
# (H = nb rounded up to a chunk) under its own shift R_s; the prefix over that window starts from the
# carry sum_{t' < a - H} X, moved into the segment's frame by exp(R_{s-1} - R_s) <= 1.


def _segments(T, seg):
    return [(a, min(T, a + seg)) for a in range(0, T, seg)]


def _frame_factor(R_prev, R_cur, Dv):
    """exp(R_prev - R_cur) per X channel (B, G, 1, Fg): moves sums from one shift to the next (<= 1)."""
    f = torch.where(torch.isfinite(R_prev), torch.exp(R_prev - _safe_shift(R_cur)), torch.zeros_like(R_prev))
    return _to_fg(f, Dv).unsqueeze(2)


def _segment_shifts(kg, seg):
    """Running max of K over segments (B, nseg, G, Dkg): the shift of segment s sees keys < end of s."""
    B, T = kg.shape[:2]
    nseg = -(-T // seg)
    kp = F.pad(kg, (0, 0, 0, 0, 0, nseg * seg - T), value=-math.inf) if nseg * seg > T else kg
    return kp.reshape(B, nseg, seg, *kg.shape[2:]).amax(2).cummax(1).values


def _scan_segment(kg, vg, beta, alpha, R, carry, a, b, nb, C):
    """Recomputable forward of segment [a, b) under the shift R (B, G, Dkg); no autograd.

    Returns Xw (B, G, H + Tp, Fg) = X of keys [a - H, a + Tp), the carry for the next segment
    (sum of X over keys < b - H), the total S (B, G, Tp, Fg) and the band matrices M.
    Tp = (b - a) rounded up to chunks; rows and keys outside [0, T) are zeros.
    """
    Tp, H = _round_up(b - a, C), _round_up(nb, C)
    Xw = _build_X(kg, vg, _safe_shift(R), a - H, a + Tp)
    Sw = _chunk_scan(Xw, C, init=carry)  # Sw[u] = sum of X over keys <= a - H + u
    carry_next = Sw[:, :, b - a - 1:b - a].clone()
    S = Sw[:, :, H - nb:H - nb + Tp]  # keys <= t - nb: outside row t's band
    if beta is None:
        return Xw, carry_next, S, None
    S.mul_(_rows_of(alpha, a, Tp).unsqueeze(-1))
    M = _band_matrices(beta, a, Tp // C, C)
    return Xw, carry_next, S.add_(_band_apply(M, Xw[:, :, H - nb + 1:], C)), M


def _read_out(S, Ts, Dv):
    """num / den of the first Ts rows of S (B, G, Tp, Fg), in place; and the per-row min of den.

    den == 0 only when every term is 0 (all weights are >= 0), so num is 0 too and the clamp gives 0.
    """
    num, den = S[:, :, :Ts, :Dv], S[:, :, :Ts, Dv:]
    den_min = den.amin(-1).amin(1)  # (B, Ts)
    den.clamp_min_(torch.finfo(S.dtype).tiny)
    return num.div_(den), den, den_min


class _CausalScan(torch.autograd.Function):
    """Causal prefix + band (see above). Forward and backward walk the segments keeping only a
    (B, G, 1, Fg) carry per segment: memory is O(T D) (inputs, output, grads) plus one segment."""

    @staticmethod
    def forward(ctx, q, k, v, beta, alpha, groups, nb, seg, C):
        B, T, D = q.shape
        G, Dk = groups, k.shape[-1]
        Dv, Dkg = D // G, Dk // G
        kg, vg = k.view(B, T, G, Dkg), v.view(B, T, G, Dv)
        R = _segment_shifts(kg, seg)  # (B, nseg, G, Dkg)
        out = torch.empty_like(q)
        flags = torch.empty(B, T, dtype=torch.bool, device=q.device)
        carries = []
        carry = q.new_zeros(B, G, 1, Dv + Dkg)
        for s, (a, b) in enumerate(_segments(T, seg)):
            if s:
                carry = carry_next.mul_(_frame_factor(R[:, s - 1], R[:, s], Dv))
            carries.append(carry)
            Xw, carry_next, S, _ = _scan_segment(kg, vg, beta, alpha, R[:, s], carry, a, b, nb, C)
            Z, _, den_min = _read_out(S, b - a, Dv)  # (B, G, Ts, Dv)
            torch.lt(den_min, EXACT_DEN_THRESHOLD, out=flags[:, a:b])
            o = out[:, a:b]
            torch.sigmoid(q[:, a:b], out=o).mul_(Z.transpose(1, 2).reshape(B, b - a, D))
        ctx.save_for_backward(q, k, v, beta, alpha, R, torch.stack(carries, 1))
        ctx.cfg = (groups, nb, seg, C)
        ctx.mark_non_differentiable(flags)
        return out, flags

    @staticmethod
    def backward(ctx, gout, _gflags):
        q, k, v, beta, alpha, R, carries = ctx.saved_tensors
        G, nb, seg, C = ctx.cfg
        B, T, D = q.shape
        Dk = k.shape[-1]
        Dv, Dkg = D // G, Dk // G
        H = _round_up(nb, C)
        kg, vg = k.view(B, T, G, Dkg), v.view(B, T, G, Dv)
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dbeta = torch.zeros_like(beta) if beta is not None and ctx.needs_input_grad[3] else None
        dcarry = None  # d loss / d (carry of segment s + 1), in segment s + 1's frame
        segs = _segments(T, seg)
        for s in reversed(range(len(segs))):
            a, b = segs[s]
            Ts = b - a
            Xw, _, S, M = _scan_segment(kg, vg, beta, alpha, R[:, s], carries[:, s], a, b, nb, C)
            Tp = S.shape[2]
            Z, den, _ = _read_out(S, Ts, Dv)  # den clamped: flagged / empty rows get no gradient anyway
            sig = torch.sigmoid(q[:, a:b])
            gy = gout[:, a:b]
            dq[:, a:b] = gy * Z.transpose(1, 2).reshape(B, Ts, D) * sig * (1 - sig)
            # d loss / d S = [dZ / den, -sum(dZ * Z) / den] (B, G, Tp, Fg), padded rows 0
            dS = S.new_zeros(B, G, Tp, Dv + Dkg)
            dZ = dS[:, :, :Ts, :Dv]
            heads = lambda x: x.view(B, Ts, G, Dv).transpose(1, 2)
            torch.mul(heads(gy), heads(sig), out=dZ)
            dZZ = dZ * Z
            torch.neg(dZZ.sum(-1, keepdim=True) if Dkg == 1 else dZZ, out=dS[:, :, :Ts, Dv:])
            dS[:, :, :Ts].div_(_to_fg(den, Dv))
            # back through S = alpha * Sw[H - nb + i] + band, and the next segment's carry = Sw[Ts - 1]
            dSw = dS.new_zeros(B, G, H + Tp, Dv + Dkg)
            dSw[:, :, H - nb:H - nb + Tp] = dS if beta is None else dS * _rows_of(alpha, a, Tp).unsqueeze(-1)
            if dcarry is not None:
                dSw[:, :, Ts - 1:Ts] += dcarry.mul_(_frame_factor(R[:, s], R[:, s + 1], Dv))
            dX = _chunk_scan(dSw, C, reverse=True)  # key u feeds every prefix row u' >= u
            dcarry = dX[:, :, :1].clone()  # the carry was added to every row of Sw
            if beta is not None:
                dX[:, :, H - nb + 1:] += _band_apply_t(M, dS, C)
                if dbeta is not None:
                    db = _band_grad(dS, Xw[:, :, H - nb + 1:], C, nb, beta.shape[1] == 1)
                    if beta.shape[1] == 1:
                        dbeta += db
                    else:
                        dbeta[:, a:b] += db[:, :Ts]
            # chain rule through X = [P V, P], P = exp(K - R): keys [a - H, a + Tp) within [0, T)
            lo, hi = max(a - H, 0), min(a + Tp, T)
            sl = slice(lo - (a - H), hi - (a - H))
            P, dPV, dP = Xw[:, :, sl, Dv:], dX[:, :, sl, :Dv], dX[:, :, sl, Dv:]
            VdPV = vg[:, lo:hi].transpose(1, 2) * dPV  # (B, G, n, Dv)
            dP = dP.add_(VdPV.sum(-1, keepdim=True) if Dkg == 1 else VdPV).mul_(P)
            dk[:, lo:hi] += dP.transpose(1, 2).reshape(B, hi - lo, Dk)
            dv[:, lo:hi] += dPV.mul_(P).transpose(1, 2).reshape(B, hi - lo, D)
        return dq, dk, dv, dbeta, None, None, None, None, None


def _causal_scan(q, k, v, beta, alpha, groups, nb):
    C = CHUNK_SIZE
    seg = max(C, _round_up(SEGMENT_SIZE, C))
    return _CausalScan.apply(q, k, v, beta, alpha, groups, nb, seg, C)


# ----------------------------------------------------------------------------------------------------
# non-causal: prefix + suffix outside the band, plus the band, under one shift per (batch, feature)


def _global_band(q, k, v, beta, alpha, groups, d_lo, d_hi):
    """Non-causal AFT with band offsets d_lo..d_hi (key t' = t - d) and weights beta (or no band).

    S_t = alpha_t * (sum_{t' < t - d_hi} X + sum_{t' > t - d_lo} X) + band; plain autograd, O(T D) memory.
    """
    B, T, D = q.shape
    G, Dk = groups, k.shape[-1]
    Dv, Dkg = D // G, Dk // G
    kg, vg = k.view(B, T, G, Dkg), v.view(B, T, G, Dv)
    shift = _safe_shift(kg.detach().amax(1))  # (B, G, Dkg): every row sees every key
    if beta is None:
        S = _build_X(kg, vg, shift, 0, T).sum(2, keepdim=True)  # (B, G, 1, Fg)
    else:
        C = CHUNK_SIZE
        Tp, Hl, Hr = _round_up(T, C), _round_up(d_hi + 1, C), _round_up(1 - d_lo, C)
        Xw = _build_X(kg, vg, shift, -Hl, Tp + Hr)  # keys [-Hl, Tp + Hr)
        pre, suf = _chunk_scan(Xw, C), _chunk_scan(Xw, C, reverse=True)
        outside = pre[:, :, Hl - d_hi - 1:Hl - d_hi - 1 + T] + suf[:, :, Hl - d_lo + 1:Hl - d_lo + 1 + T]
        band = _band_apply(_band_matrices(beta, 0, Tp // C, C), Xw[:, :, Hl - d_hi:Hl - d_lo + Tp], C)[:, :, :T]
        S = outside * _rows_of(alpha, 0, T).unsqueeze(-1) + band
    num, den = S[..., :Dv], S[..., Dv:]
    y = torch.sigmoid(q) * _safe_div(num, den).expand(B, G, T, Dv).transpose(1, 2).reshape(B, T, D)
    flags = (den.detach() < EXACT_DEN_THRESHOLD).any(-1).any(1).expand(B, T)
    return y, flags


# ----------------------------------------------------------------------------------------------------
# AFT-full: E = exp(w - rowmax) against X = [P*V, P], blocked over rows and keys; custom backward


def _full_X(kg, vg, shift, j0, j1):
    """(G, KB, B*2*Dv): [P*V, P] of keys [j0, j1) laid out for a (G, rows, KB) @ (G, KB, .) matmul."""
    B = kg.shape[0]
    P = torch.exp(kg[:, j0:j1] - shift)  # (B, KB, G, Dv)
    X = torch.stack([P * vg[:, j0:j1], P], 3)  # (B, KB, G, 2, Dv)
    return X.permute(2, 1, 0, 3, 4).reshape(kg.shape[2], j1 - j0, B * 2 * kg.shape[3])


def _full_E(w, m, i0, i1, j0, j1, off, causal):
    """exp(w - m) for rows [i0, i1) and keys [j0, j1); 0 on keys after the row (causal)."""
    E = torch.exp(w[:, i0:i1, j0:j1] - m.unsqueeze(-1))  # (G, RB, KB)
    if causal and j1 - 1 > off + i0:
        future = torch.arange(j0, j1, device=w.device)[None, :] > torch.arange(off + i0, off + i1, device=w.device)[:, None]
        E = E.masked_fill(future, 0.0)
    return E


def _full_row_max(w, i0, i1, off, causal):
    """Per-row max of w over the keys the row sees: (G, RB)."""
    Lk = w.shape[-1]
    if not causal:
        return _safe_shift(w[:, i0:i1].amax(-1))
    e = off + i1
    wd = w[:, i0:i1, off + i0:e]
    future = torch.arange(off + i0, e, device=w.device)[None, :] > torch.arange(off + i0, e, device=w.device)[:, None]
    m = wd.masked_fill(future, -math.inf).amax(-1)
    if off + i0 > 0:
        m = torch.maximum(m, w[:, i0:i1, :off + i0].amax(-1))
    return _safe_shift(m)


def _full_blocks(Lq, Lk, off, causal, FB):
    """(i0, i1, e, M-update range) per row block: keys [0, e) are visible to some row of the block."""
    for i0 in range(0, Lq, FB):
        i1 = min(Lq, i0 + FB)
        yield i0, i1, (off + i1 if causal else Lk)


class _FullScan(torch.autograd.Function):
    """AFT-full fast path. w (G, Lq, Lk) are the bias rows of the queries; query i sits at key position
    off + i (off = Lk - Lq). Row blocks keep their own K shift (max over the keys they see)."""

    @staticmethod
    def forward(ctx, q, k, v, w, causal, FB):
        B, Lq, D = q.shape
        Lk = k.shape[1]
        G = w.shape[0]
        Dv = D // G
        off = Lk - Lq
        kg, vg = k.view(B, Lk, G, Dv), v.view(B, Lk, G, Dv)
        out = torch.empty_like(q)
        flags = torch.zeros(B, Lq, dtype=torch.bool, device=q.device)
        shifts, shift, seen = [], None, 0
        for i0, i1, e in _full_blocks(Lq, Lk, off, causal, FB):
            if e > seen:  # the K shift of this block: max over keys [0, e) (running, never shrinks)
                new = kg[:, seen:e].amax(1, keepdim=True)
                shift = new if shift is None else torch.maximum(shift, new)
                seen = e
            shifts.append(shift)
            S, _ = _FullScan._rows(kg, vg, w, _safe_shift(shift), i0, i1, e, off, causal, FB)
            num, den = S[..., 0, :], S[..., 1, :]  # (G, RB, B, Dv)
            Z = _safe_div(num, den).permute(2, 1, 0, 3).reshape(B, i1 - i0, D)
            out[:, i0:i1] = torch.sigmoid(q[:, i0:i1]) * Z
            flags[:, i0:i1] = (den < EXACT_DEN_THRESHOLD).any(-1).any(0).T
        ctx.save_for_backward(q, k, v, w, torch.stack(shifts, 0))
        ctx.cfg = (causal, FB)
        ctx.mark_non_differentiable(flags)
        return out, flags

    @staticmethod
    def _rows(kg, vg, w, shift, i0, i1, e, off, causal, FB):
        """S (G, RB, B, 2, Dv) = sum over key blocks of E @ X for rows [i0, i1), and the row max m."""
        B = kg.shape[0]
        m = _full_row_max(w, i0, i1, off, causal)
        S = None
        for j0 in range(0, e, FB):
            j1 = min(e, j0 + FB)
            E = _full_E(w, m, i0, i1, j0, j1, off, causal)
            X = _full_X(kg, vg, shift, j0, j1)
            S = torch.bmm(E, X) if S is None else S.baddbmm_(E, X)
        G, Dv = kg.shape[2], kg.shape[3]
        return S.view(G, i1 - i0, B, 2, Dv), m

    @staticmethod
    def backward(ctx, gout, _gflags):
        q, k, v, w, shifts = ctx.saved_tensors
        causal, FB = ctx.cfg
        B, Lq, D = q.shape
        Lk = k.shape[1]
        G = w.shape[0]
        Dv = D // G
        off = Lk - Lq
        kg, vg = k.view(B, Lk, G, Dv), v.view(B, Lk, G, Dv)
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dw = torch.zeros_like(w) if ctx.needs_input_grad[3] else None
        for r, (i0, i1, e) in enumerate(_full_blocks(Lq, Lk, off, causal, FB)):
            shift = _safe_shift(shifts[r])
            S, m = _FullScan._rows(kg, vg, w, shift, i0, i1, e, off, causal, FB)
            num, den = S[..., 0, :], S[..., 1, :]  # (G, RB, B, Dv)
            Z = _safe_div(num, den)
            RB = i1 - i0
            sig = torch.sigmoid(q[:, i0:i1])
            gy = gout[:, i0:i1]
            dq[:, i0:i1] = gy * Z.permute(2, 1, 0, 3).reshape(B, RB, D) * sig * (1 - sig)
            dZ = (gy * sig).view(B, RB, G, Dv).permute(2, 1, 0, 3)  # (G, RB, B, Dv)
            den_safe = torch.where(den > 0, den, torch.ones_like(den))
            dS = torch.stack([dZ / den_safe, -dZ * Z / den_safe], 3).reshape(G, RB, B * 2 * Dv)
            for j0 in range(0, e, FB):
                j1 = min(e, j0 + FB)
                E = _full_E(w, m, i0, i1, j0, j1, off, causal)
                X = _full_X(kg, vg, shift, j0, j1)
                if dw is not None:  # d/dw of exp(w - m) is E itself (m is a constant shift)
                    dw[:, i0:i1, j0:j1] += torch.bmm(dS, X.transpose(1, 2)) * E
                dX = torch.bmm(E.transpose(1, 2), dS).view(G, j1 - j0, B, 2, Dv).permute(2, 1, 0, 3, 4)
                P = torch.exp(kg[:, j0:j1] - shift)  # (B, KB, G, Dv)
                dv[:, j0:j1] += (P * dX[..., 0, :]).reshape(B, j1 - j0, D)
                dk[:, j0:j1] += (P * (vg[:, j0:j1] * dX[..., 0, :] + dX[..., 1, :])).reshape(B, j1 - j0, D)
        return dq, dk, dv, dw, None, None


# ----------------------------------------------------------------------------------------------------
# public operators


def aft_full(q, k, v, pos_bias, *, causal=False, key_mask=None):
    """AFT-full: Y_t = sigmoid(Q_t) * sum_t' exp(K_t' + w_{t,t'}) V_t' / sum_t' exp(K_t' + w_{t,t'}).

    q (B, Lq, D), k and v (B, Lk, D) with Lq <= Lk: query i sits at position Lk - Lq + i (cached
    decoding) and uses bias row Lk - Lq + i; causal: keys t' <= that position.
    pos_bias (T', T') or (H, T', T') with T' >= Lk (the top-left corner is used); with H heads, feature
    group h = features [h*D/H, (h+1)*D/H) uses pos_bias[h]. key_mask (B, Lk): 1 = real token.
    Returns (B, Lq, D) in q's dtype. O(T^2 D) time, O(T D + T^2) memory, blocked over rows and keys.
    """
    _check_qkv(q, k, v)
    B, Lq, D = q.shape
    Lk = k.shape[1]
    _check(Lq <= Lk, f"q has {Lq} positions, more than k ({Lk})")
    _check(k.shape[-1] == D, f"aft_full needs k with D={D} features, got {k.shape[-1]}")
    _check_mask(key_mask, (B, Lk))
    wh = _heads_of_bias(pos_bias, D, Lq, Lk)
    G, off = wh.shape[0], Lk - Lq
    dt = _compute_dtype(q, k, v, pos_bias)
    with _no_autocast(q.device.type):
        qf, kf, vf, w = _up(q, dt), _up(k, dt), _up(v, dt), _up(wh[:, off:Lk, :Lk], dt)
        km, valid = _masked_keys(kf, key_mask)
        y, flags = _FullScan.apply(qf, km, vf, w, causal, FULL_BLOCK_SIZE)
        flags = flags & _has_visible(valid, B, Lq, Lk, causal, q.device)

        def bias_rows(pos, Tk):  # (n, G, Tk): the dense bias rows of these positions
            rows = w[:, pos - off, :Tk].transpose(0, 1)
            return _causal_bias(rows, pos, Tk) if causal else rows

        y = _fix_flagged(y, flags, qf, kf, vf, valid, bias_rows, G, causal, offset=off)
    return y.to(q.dtype)


def _linear_variant(q, k, v, w, inside, groups, d_lo, d_hi, causal, key_mask, dense_bias):
    """Shared body of aft_simple / aft_local / aft_conv1d: w (G, T|1, nb) is the bias of band slot j
    (offset d = d_lo + j), inside (T|1, nb) which slots exist; w None = no band (aft_simple)."""
    B, T, D = q.shape
    km, valid = _masked_keys(k, key_mask)
    beta = alpha = None
    if w is not None:
        beta, alpha = _band_weights(w, inside)
    if causal:
        y, flags = _causal_scan(q, km, v, beta, alpha, groups, d_hi + 1 if w is not None else 0)
    else:
        y, flags = _global_band(q, km, v, beta, alpha, groups, d_lo, d_hi)
    flags = flags & _has_visible(valid, B, T, T, causal, q.device)

    def bias_rows(pos, Tk):
        rows = dense_bias(pos, Tk)  # (n, G, Tk)
        return _causal_bias(rows, pos, Tk) if causal else rows

    return _fix_flagged(y, flags, q, k, v, valid, bias_rows, groups, causal)


def aft_simple(q, k, v, *, causal=False, key_mask=None):
    """AFT-simple (w = 0): Y_t = sigmoid(Q_t) * softmax over keys (per feature) of K, applied to V.

    q, k, v (B, T, D); causal: keys t' <= t (a stable prefix scan). O(T D) time and memory.
    """
    _check_qkv(q, k, v)
    B, T, D = q.shape
    _check(k.shape[-1] == D, f"aft_simple needs k with D={D} features, got {k.shape[-1]}")
    _check_mask(key_mask, (B, T))
    dt = _compute_dtype(q, k, v)
    with _no_autocast(q.device.type):
        qf, kf, vf = _up(q, dt), _up(k, dt), _up(v, dt)
        zero = lambda pos, Tk: qf.new_zeros(pos.numel(), 1, Tk)
        y = _linear_variant(qf, kf, vf, None, None, 1, 0, -1, causal, key_mask, zero)
    return y.to(q.dtype)


def aft_local(q, k, v, pos_bias, window, *, causal=False, key_mask=None):
    """AFT-local: the learned bias w_{t,t'} only where |t - t'| < window, 0 elsewhere.

    Every position still sees the whole (causal) context; the window only limits where the bias applies.
    q, k, v (B, T, D); pos_bias (T', T') or (H, T', T') with T' >= T (top-left T x T used, D divisible
    by H). Out-of-band keys come from prefix (and suffix) sums, the band from pos_bias' diagonals:
    O(T window D) time, O(T D) memory, no T x T intermediate.
    """
    _check_qkv(q, k, v)
    B, T, D = q.shape
    _check(k.shape[-1] == D, f"aft_local needs k with D={D} features, got {k.shape[-1]}")
    _check(isinstance(window, int) and window >= 1, f"window must be an int >= 1, got {window!r}")
    _check_mask(key_mask, (B, T))
    wh = _heads_of_bias(pos_bias, D, T, T)
    G = wh.shape[0]
    reach = min(window, T) - 1  # offsets beyond the sequence never apply
    d_lo, d_hi = (0, reach) if causal else (-reach, reach)
    dt = _compute_dtype(q, k, v, pos_bias)
    with _no_autocast(q.device.type):
        qf, kf, vf, w = _up(q, dt), _up(k, dt), _up(v, dt), _up(wh[:, :T, :T], dt)
        # the band as diagonals: slot j of row t is w[g, t, t - d], d = d_lo + j
        t = torch.arange(T, device=q.device)[:, None]
        key = t - torch.arange(d_lo, d_hi + 1, device=q.device)[None, :]  # (T, nb)
        inside = (key >= 0) & (key < T)
        band = w[:, t.expand_as(key), key.clamp(0, T - 1)]  # (G, T, nb)

        def dense_bias(pos, Tk):
            rows = w[:, pos, :Tk].transpose(0, 1)  # (n, G, Tk)
            near = (pos[:, None] - torch.arange(Tk, device=q.device)[None, :]).abs() < window
            return torch.where(near[:, None, :], rows, torch.zeros_like(rows))

        y = _linear_variant(qf, kf, vf, band, inside, G, d_lo, d_hi, causal, key_mask, dense_bias)
    return y.to(q.dtype)


def _kernel_bias_1d(kernel, d_lo, pos, Tk):
    """(n, h, Tk) dense bias rows of a 1-d kernel: kernel[:, j] at offset t - t' = d_lo + j, 0 outside."""
    s = kernel.shape[-1]
    j = pos[:, None] - torch.arange(Tk, device=kernel.device)[None, :] - d_lo  # (n, Tk)
    inside = (j >= 0) & (j < s)
    rows = kernel[:, j.clamp(0, s - 1)].transpose(0, 1)  # (n, h, Tk)
    return torch.where(inside[:, None, :], rows, torch.zeros_like(rows))


def aft_conv1d(q, k, v, kernel, *, causal=True, key_mask=None):
    """AFT-conv (1-d): the bias is a per-head convolution kernel, one key channel per head (paper eq. 6).

    q, v (B, T, D); k (B, T, h) (key channel i is broadcast over head i's D/h features); kernel (h, s).
    Causal: kernel[i, j] is the bias for t - t' = j, 0 <= j < s. Non-causal: s odd, centred,
    kernel[i, j] is the bias for t - t' = j - s//2. Outside the kernel the bias is 0, so every position
    sees the whole (causal) context: out-of-kernel keys come from prefix (suffix) sums, the kernel
    span from a convolution with exp(w): O(T s D) time, O(T D) memory.
    """
    _check_qkv(q, k, v)
    B, T, D = q.shape
    _check(kernel.dim() == 2, f"kernel must be (h, s), got {tuple(kernel.shape)}")
    h, s = kernel.shape
    _check(k.shape[-1] == h, f"k has {k.shape[-1]} channels but kernel has {h} heads")
    _check(h >= 1 and D % h == 0, f"feature dim {D} is not divisible by the {h} heads")
    _check(s >= 1, "kernel size must be >= 1")
    _check(causal or s % 2 == 1, f"a centred (non-causal) kernel needs an odd size, got {s}")
    _check_mask(key_mask, (B, T))
    d_lo = 0 if causal else -(s // 2)
    # offsets outside [-(T-1), T-1] never apply: trim the kernel so the band stays within the sequence
    lo, hi = max(d_lo, -(T - 1)), min(d_lo + s - 1, T - 1)
    dt = _compute_dtype(q, k, v, kernel)
    with _no_autocast(q.device.type):
        qf, kf, vf, kern = _up(q, dt), _up(k, dt), _up(v, dt), _up(kernel, dt)
        w = kern[:, lo - d_lo:hi - d_lo + 1].unsqueeze(1)  # (h, 1, nb)
        inside = torch.ones(1, hi - lo + 1, dtype=torch.bool, device=q.device)
        dense_bias = lambda pos, Tk: _kernel_bias_1d(kern, d_lo, pos, Tk)
        y = _linear_variant(qf, kf, vf, w, inside, h, lo, hi, causal, key_mask, dense_bias)
    return y.to(q.dtype)


def _shifted(x, dim, by):
    """x moved by `by` positions along dim (positive: towards higher indices), zero-filled."""
    n = x.shape[dim]
    if abs(by) >= n:
        return torch.zeros_like(x)
    pad = [0, 0] * (x.dim() - 1 - dim) + ([by, 0] if by > 0 else [0, -by])
    kept = x.narrow(dim, 0, n - by) if by > 0 else x.narrow(dim, -by, n + by)
    return F.pad(kept, pad)


def aft_conv2d(q, k, v, kernel, *, key_mask=None):
    """AFT-conv (2-d, non-causal): q, v (B, H, W, D); k (B, H, W, h); kernel (h, s, s), s odd, centred.

    kernel[i, a, b] is the bias between query (r, c) and key (r', c') with r - r' = a - s//2 and
    c - c' = b - s//2; 0 outside the kernel (global connectivity kept). key_mask (B, H, W) optional.
    Keys outside the s x s box come from row / column prefix and suffix sums (no subtraction), the box
    from a depthwise conv2d with exp(w): O(H W s^2 D).
    """
    _check_qkv(q, k, v, seq_dims=2)
    B, Hh, Ww, D = q.shape
    _check(k.shape[:3] == q.shape[:3], f"k {tuple(k.shape)} must match q {tuple(q.shape)} in (B, H, W)")
    _check(kernel.dim() == 3 and kernel.shape[1] == kernel.shape[2],
           f"kernel must be (h, s, s), got {tuple(kernel.shape)}")
    h, s = kernel.shape[0], kernel.shape[1]
    _check(k.shape[-1] == h, f"k has {k.shape[-1]} channels but kernel has {h} heads")
    _check(D % h == 0, f"feature dim {D} is not divisible by the {h} heads")
    _check(s % 2 == 1, f"a centred kernel needs an odd size, got {s}")
    _check_mask(key_mask, (B, Hh, Ww))
    T, Dv, r = Hh * Ww, D // h, s // 2
    dt = _compute_dtype(q, k, v, kernel)
    with _no_autocast(q.device.type):
        qf, kf, vf, kern = _up(q, dt), _up(k, dt), _up(v, dt), _up(kernel, dt)
        flat = lambda x: x.reshape(B, T, x.shape[-1])
        mask = None if key_mask is None else key_mask.reshape(B, T)
        km, valid = _masked_keys(flat(kf), mask)
        shift = _safe_shift(km.detach().amax(1, keepdim=True))  # (B, 1, h)
        P = torch.exp(km - shift).view(B, Hh, Ww, h, 1)
        X = torch.cat([P * vf.view(B, Hh, Ww, h, Dv), P], -1)  # (B, H, W, h, Fh)
        # outside the box: whole rows above / below, and within the box's rows the columns left / right
        rows = X.sum(2).cumsum(1)  # (B, H, h, Fh): keys in rows <= r'
        rows_rev = X.sum(2).flip(1).cumsum(1).flip(1)  # keys in rows >= r'
        above, below = _shifted(rows, 1, r + 1), _shifted(rows_rev, 1, -(r + 1))
        cols = _shifted(X.cumsum(2), 2, r + 1) + _shifted(X.flip(2).cumsum(2).flip(2), 2, -(r + 1))
        strip = sum(_shifted(cols, 1, o) for o in range(-r, r + 1))  # (B, H, W, h, Fh)
        outside = (above + below).unsqueeze(2) + strip
        # the box: depthwise conv2d of every X channel with its head's exp(w - m) (cross-correlation: flip)
        beta, alpha = _band_weights(kern.reshape(h, 1, s * s), torch.ones(1, s * s, dtype=torch.bool, device=q.device))
        wgt = beta.view(h, s, s).flip(-1, -2).repeat_interleave(Dv + 1, 0).unsqueeze(1)
        Xc = X.permute(0, 3, 4, 1, 2).reshape(B, h * (Dv + 1), Hh, Ww)
        box = F.conv2d(Xc, wgt, padding=r, groups=h * (Dv + 1)).view(B, h, Dv + 1, Hh, Ww).permute(0, 3, 4, 1, 2)
        S = outside * alpha.view(h, 1) + box
        num, den = S[..., :Dv], S[..., Dv:]
        y = torch.sigmoid(qf) * _safe_div(num, den).reshape(B, Hh, Ww, D)
        flags = (den.detach() < EXACT_DEN_THRESHOLD).reshape(B, T, h).any(-1)
        flags = flags & _has_visible(valid, B, T, T, False, q.device)

        def bias_rows(pos, Tk):
            rr, cc = pos // Ww, pos % Ww
            kr, kc = torch.arange(Tk, device=q.device) // Ww, torch.arange(Tk, device=q.device) % Ww
            a, b = rr[:, None] - kr[None, :] + r, cc[:, None] - kc[None, :] + r  # (n, Tk)
            inside = (a >= 0) & (a < s) & (b >= 0) & (b < s)
            rows = kern[:, a.clamp(0, s - 1), b.clamp(0, s - 1)].transpose(0, 1)  # (n, h, Tk)
            return torch.where(inside[:, None, :], rows, torch.zeros_like(rows))

        y = _fix_flagged(flat(y), flags, flat(qf), flat(kf), flat(vf), valid, bias_rows, h, False)
    return y.reshape(B, Hh, Ww, D).to(q.dtype)
