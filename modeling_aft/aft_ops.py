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
small matrix products (torch.cumsum is a slow strided loop on CPU; a C x C triangular matmul is not).
Causal simple/local/conv1d and aft_full have hand-written backward passes that recompute per segment /
block instead of storing activations. On the CPU in float32, aft_full and the causal simple/local/conv1d run the fused
kernels of aft_kernels instead (same results to float32 rounding; tests/test_kernels.py); the code here is their
fallback and the path for float64 and other devices.

Only stdlib, torch and the sibling aft_kernels are imported: this folder is copied next to checkpoints
(trust_remote_code).
"""

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .aft_kernels import fused_causal_conv1d, fused_causal_local, fused_causal_simple, fused_full

__all__ = ["aft_full", "aft_local", "aft_simple", "aft_conv1d", "aft_conv2d"]

# Tunables, read at call time (tests lower them to exercise the multi-segment / multi-block paths).
SEGMENT_SIZE = 512         # at most this many rows per segment of the causal scans; fewer are used so
SEGMENT_ELEMENTS = 1 << 18  # that one segment's X buffer holds about this many numbers (1 MiB in fp32: each
                            # segment costs ~15 eager ops of Python overhead, so at 1 << 16 AFT-simple spent
                            # 40% of its time there; the price is a few MiB of peak memory), but at least
                            # 8 band widths (the band's halo is recomputed in every segment)
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
    return torch.nan_to_num(m, neginf=0.0)


def _valid_keys(key_mask):
    """(B, T) bool: which keys are real, or None for no mask."""
    return None if key_mask is None else key_mask.to(torch.bool)


def _masked_keys(k, key_mask):
    """Masked keys become -inf so that they drop out of every max and every exp exactly."""
    valid = _valid_keys(key_mask)
    if valid is None:
        return k, None
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


def _bias_factors(pos_bias, T):
    """(u, v) when pos_bias is given factorized as w = u vᵀ (paper eq. 7), each (T', r) with T' >= T; else None."""
    if not isinstance(pos_bias, (tuple, list)):
        return None
    _check(len(pos_bias) == 2, "a factorized pos_bias is a pair (u, v) with w = u vᵀ")
    u, v = pos_bias
    _check(u.dim() == 2 and u.shape == v.shape, f"u and v must both be (T', r), got {tuple(u.shape)}, {tuple(v.shape)}")
    _check(u.shape[0] >= T, f"pos_bias factors are {u.shape[0]} long, smaller than the sequence ({T})")
    return u, v


def _band_from_factors(u, v, T, d_lo, d_hi, C=32):
    """(T, nb) band of w = u vᵀ, slot j of row t = u_t · v_{t-d} (d = d_lo + j), 0 where t - d is outside [0, T).

    Rows go in chunks of C: one batched matmul of each chunk's u rows against the C + nb - 1 rows of v its band
    reads (a strided window view, not a copy), then the diagonals are gathered. O(T (C + nb) r) time; autograd
    keeps the (T, C + nb - 1) scores, never T x T.
    """
    nb, r = d_hi - d_lo + 1, u.shape[1]
    n = -(-T // C)
    u_chunks = F.pad(u[:T], (0, 0, 0, n * C - T)).view(n, C, r)  # (n, C, r)
    # key t - d of row t = c*C + i lives at row t - d + d_hi of the padded v: window c starts at row c*C
    v_padded = F.pad(v[:T], (0, 0, d_hi, n * C - T - d_lo))  # (n*C + nb - 1, r), zero rows outside [0, T)
    windows = v_padded.unfold(0, C + nb - 1, C)  # (n, r, C + nb - 1)
    scores = torch.bmm(u_chunks, windows)  # (n, C, C + nb - 1)
    band = scores.gather(-1, _band_cols(C, nb, u.device).expand(n, C, nb))  # (n, C, nb)
    return band.reshape(n * C, nb)[:T]


class _BandOfMatrix(torch.autograd.Function):
    """(G, T, nb) band of a dense bias w (G, T', T'): slot j of row t = w[g, t, t - d], d = d_lo + j (the key is
    clamped into [0, T): such slots lie outside the sequence and the caller masks them).

    The gradient is one zero-filled (G, T', T') buffer with the band written through a strided view (rows whose
    whole band lies inside the sequence) and a small index_put_ (the others): autograd's scatter-add of an
    advanced index into a dense T' x T' gradient cost as much as the rest of AFT-local's fwd+bwd.
    """

    @staticmethod
    def forward(ctx, w, T, d_lo, d_hi):
        key = _band_keys(T, d_lo, d_hi, w.device)
        ctx.geometry = (w.shape, T, d_lo, d_hi)
        return w[:, torch.arange(T, device=w.device)[:, None].expand_as(key), key.clamp(0, T - 1)]

    @staticmethod
    def backward(ctx, grad_band):
        shape, T, d_lo, d_hi = ctx.geometry
        G, side = shape[0], shape[-1]
        grad = grad_band.new_zeros(shape)
        r0, r1 = d_hi, T + d_lo  # rows t whose keys t - d_hi .. t - d_lo all lie in [0, T)
        if r1 > r0:
            # element (t, t - d) sits at t * (side + 1) - d: slots in reverse order are contiguous within a row
            band_view = grad.as_strided((G, r1 - r0, d_hi - d_lo + 1), (side * side, side + 1, 1),
                                        grad.storage_offset() + r0 * (side + 1) - d_hi)
            band_view.copy_(grad_band[:, r0:r1].flip(-1))
        key = _band_keys(T, d_lo, d_hi, grad.device)
        t = torch.arange(T, device=grad.device)[:, None].expand_as(key)
        edge = ((t < r0) | (t >= r1)) & (key >= 0) & (key < T)
        grad[:, t[edge], key[edge]] = grad_band[:, edge]
        return grad, None, None, None


def _band_keys(T, d_lo, d_hi, device):
    """(T, nb) key t - d of row t, slot j (d = d_lo + j); may fall outside [0, T)."""
    return torch.arange(T, device=device)[:, None] - torch.arange(d_lo, d_hi + 1, device=device)[None, :]


def _no_autocast(device_type):
    """The body runs in float32 (float64 stays): autocast must not push its matmuls back to 16 bits."""
    return torch.autocast(device_type=device_type, enabled=False)


# ----------------------------------------------------------------------------------------------------
# the exact path: one row at a time semantics, vectorized over a chunk of rows, per-row max of K + w


def _exact_rows(q, k, v, valid, rows_b, rows_i, rows_pos, bias_rows, groups, causal):
    """Exact Y for the rows (rows_b[n], rows_i[n]) whose fast-path den underflowed.

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
    if n_all == 0:
        return q.new_zeros(0, D)
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


def _fix_flagged(y, flags, has_vis, q, k, v, valid, bias_rows, groups, causal, offset=0):
    """Replace the flagged rows of the fast result y (B, Lq, D): exact values where the row sees a key,
    0 where it sees none (the fast path may leave 0/0 there)."""
    if not bool(flags.any()):
        return y
    redo, empty = flags & has_vis, flags & ~has_vis
    rows_b, rows_i = redo.nonzero(as_tuple=True)
    vals = [_exact_rows(q, k, v, valid, rows_b, rows_i, rows_i + offset, bias_rows, groups, causal).to(y.dtype)]
    if bool(empty.any()):
        eb, ei = empty.nonzero(as_tuple=True)
        rows_b, rows_i = torch.cat([rows_b, eb]), torch.cat([rows_i, ei])
        vals.append(y.new_zeros(eb.numel(), y.shape[-1]))
    return y.index_put((rows_b, rows_i), torch.cat(vals))


def _causal_bias(w, pos, Tk):
    """-inf on keys after pos: w (n, G, Tk), pos (n,)."""
    future = torch.arange(Tk, device=w.device)[None, :] > pos[:, None]  # (n, Tk)
    return w.masked_fill(future[:, None, :], -math.inf)


# ----------------------------------------------------------------------------------------------------
# building blocks of the linear-time variants: X = [P*V, P] in a grouped layout, chunked prefix sums,
# banded corrections as (chunk x window) matmuls


def _build_X(kg, vg, shift, k0, k1, extra=0):
    """X (B, G, k1-k0+extra, Dv+Dkg) = [P*V, P] with P = exp(K - shift) for keys [k0, k1); zero rows
    for keys outside [0, T) and for the `extra` rows at the end (room for the band's block matmuls).

    kg (B, T, G, Dkg) (masked keys are -inf), vg (B, T, G, Dv), shift (B, G, Dkg).
    """
    B, T, G, Dkg = kg.shape
    Dv = vg.shape[-1]
    lo, hi = max(k0, 0), min(k1, T)
    shift = shift.view(B, 1, G, Dkg)
    if torch.is_grad_enabled():  # differentiable version (the non-causal path runs under autograd)
        P = torch.exp(kg[:, lo:hi] - shift)  # (B, n, G, Dkg)
        X = torch.cat([P * vg[:, lo:hi], P], -1).transpose(1, 2)  # (B, G, n, Fg)
        return F.pad(X, (0, 0, lo - k0, k1 - hi + extra)).contiguous()
    # inside the custom Functions: write straight into one buffer, no temporaries
    X = kg.new_empty(B, G, k1 - k0 + extra, Dv + Dkg)
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
    if n > 1:  # the chunk totals, scanned exclusively (again a small triangular matmul)
        tot = S[:, :, :, 0] if reverse else S[:, :, :, -1]  # (B, G, n, F)
        ones = torch.ones(n, n, dtype=X.dtype, device=X.device)
        excl = torch.matmul(ones.triu(1) if reverse else ones.tril(-1), tot)
        offset = excl if init is None else excl.add_(init)
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


def _pieces(M, C):
    """Split (..., C, L) band matrices into ceil(L / C) blocks (..., C, C); block p multiplies the
    chunk p positions further along the window."""
    L = M.shape[-1]
    P = -(-L // C)
    M = F.pad(M, (0, P * C - L))
    return [M[..., p * C:(p + 1) * C] for p in range(P)]


def _chunks(X, C, n):
    """The first n chunks of X (B, G, >= n*C, F) as a (B, G, n, C, F) view."""
    return X[:, :, :n * C].unflatten(2, (n, C))


def _mm_acc(out, A, X):
    """out (B, G, n, C, F) += A (G, n|1, C, C) @ X (B, G, n, C, F), in place.

    With a single (batch, group) the chunk views are plain strided batches: baddbmm_ straight into the
    destination, no window copies. Otherwise torch.matmul folds the batch dims (one copy).
    """
    B, G, n = out.shape[:3]
    if B * G == 1:
        out[0, 0].baddbmm_(A[0].expand(n, -1, -1), X[0, 0])
    else:
        out += torch.matmul(A, X)
    return out


def _band_apply(M, Xw, C, out):
    """out (B, G, n*C, F) += band part: row i of chunk c gets sum_l M[c, i, l] * Xw[c*C + l].

    Done as ceil(L / C) chunk-aligned block matmuls instead of materializing overlapping windows;
    Xw needs (n + ceil(L / C) - 1) * C rows (extra rows meet zero columns).
    """
    n = out.shape[2] // C
    oc = out.unflatten(2, (n, C))
    for p, Mp in enumerate(_pieces(M, C)):
        _mm_acc(oc, Mp, _chunks(Xw[:, :, p * C:], C, n))
    return out


def _band_apply_t(M, dY, C, dXw):
    """Adjoint of _band_apply: dXw += M^T applied to dY (B, G, n*C, F), block by block."""
    n = dY.shape[2] // C
    dYc = dY.unflatten(2, (n, C))
    for p, Mp in enumerate(_pieces(M, C)):
        _mm_acc(_chunks(dXw[:, :, p * C:], C, n), Mp.transpose(-1, -2), dYc)
    return dXw


def _band_grad(dY, Xw, C, nb, toeplitz):
    """d(loss)/d(beta rows) from dY (B, G, n*C, F) and Xw: (G, n*C, nb), or (G, 1, nb) for a convolution."""
    B, G, Tp, Fc = dY.shape
    n, L = Tp // C, C + nb - 1
    dYc = dY.unflatten(2, (n, C))
    P = -(-L // C)
    dM = torch.cat([torch.matmul(dYc, _chunks(Xw[:, :, p * C:], C, n).transpose(-1, -2)).sum(0)
                    for p in range(P)], -1)  # (G, n, C, P*C): d loss / d M
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


def _frame_factor(prev, cur, Dv):
    """exp(prev - cur) per X channel (B, G, 1, Fg), <= 1: moves the carried sums from one segment's
    shift (B, G, Dkg) to the next one's. A -inf prev means nothing was carried yet: factor 0."""
    f = torch.exp(prev - _safe_shift(cur))  # prev = -inf gives 0 (cur >= prev, finite once prev is)
    return _to_fg(f, Dv).unsqueeze(2)


def _scan_segment(kg, vg, beta, alpha, M, shift, carry, a, b, nb, C):
    """Recomputable forward of segment [a, b) under the shift (B, G, Dkg); no autograd.

    Returns Xw (B, G, H + Tp, Fg) = X of keys [a - H, a + Tp), the carry for the next segment
    (sum of X over keys < b - H), the total S (B, G, Tp, Fg) and the band matrices M.
    Tp = (b - a) rounded up to chunks; rows and keys outside [0, T) are zeros.
    """
    Tp, H = _round_up(b - a, C), _round_up(nb, C)
    Xw = _build_X(kg, vg, shift, a - H, a + Tp, extra=C if nb else 0)  # keys past a + Tp: zeros
    Sw = _chunk_scan(Xw, C, init=carry)  # Sw[u] = sum of X over keys <= a - H + u
    carry_next = Sw[:, :, b - a - 1:b - a].clone()
    S = Sw[:, :, H - nb:H - nb + Tp]  # keys <= t - nb: outside row t's band
    if beta is None:
        return Xw, carry_next, S, None
    S.mul_(_rows_of(alpha, a, Tp).unsqueeze(-1))
    if M is None:  # (a convolution's matrices are built once and shared by all segments)
        M = _band_matrices(beta, a, Tp // C, C)
    return Xw, carry_next, _band_apply(M, Xw[:, :, H - nb + 1:], C, S), M


def _read_out(S, Ts, Dv, clamp):
    """num / den of the first Ts rows of S (B, G, Tp, Fg), in place; and the per-row min of den.

    Without clamp a row with den == 0 gives 0/0: it is flagged (den_min < EXACT_DEN_THRESHOLD) and
    replaced afterwards, so the forward saves that pass. The backward clamps (no 0/0 in gradients).
    """
    num, den = S[:, :, :Ts, :Dv], S[:, :, :Ts, Dv:]
    den_min = den.amin(-1).amin(1)  # (B, Ts)
    if clamp:
        den.clamp_min_(torch.finfo(S.dtype).tiny)
    return num.div_(den), den, den_min


class _CausalScan(torch.autograd.Function):
    """Causal prefix + band (see above). Forward and backward walk the segments keeping only a
    (B, G, 1, Fg) carry per segment: memory is O(T D) (inputs, output, grads) plus one segment.

    With per-row band weights (aft_local, whose dense (T, T) bias gradient dwarfs two (T, D) tensors)
    the forward also keeps Z = num / den and den, and the backward skips re-running scan and band.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, alpha, groups, nb, seg, C, keep):
        B, T, D = q.shape
        G, Dk = groups, k.shape[-1]
        Dv, Dkg = D // G, Dk // G
        kg, vg = k.view(B, T, G, Dkg), v.view(B, T, G, Dv)
        M = _band_matrices(beta, 0, 1, C) if beta is not None and beta.shape[1] == 1 else None
        out = torch.empty_like(q)
        flags = torch.empty(B, T, dtype=torch.bool, device=q.device)
        segs = _segments(T, seg)
        # a backward needs, besides the inputs, each segment's shift and entering carry (keep: one will run)
        shifts, carries = [], (q.new_empty(B, len(segs), G, 1, Dv + Dkg) if keep else None)
        readout = keep and beta is not None and beta.shape[1] > 1
        Zs, dens = (q.new_empty(B, G, T, Dv), q.new_empty(B, G, T, Dkg)) if readout else (None, None)
        carry = q.new_zeros(B, G, 1, Dv + Dkg)
        for s, (a, b) in enumerate(segs):
            R = kg[:, a:b].amax(1)  # the shift: running max of K up to the end of this segment
            if s:
                R = torch.maximum(R, R_prev)
                carry = carry_next.mul_(_frame_factor(R_prev, R, Dv))
            if keep:
                carries[:, s] = carry
                shifts.append(R)
            R_prev, S = R, None  # (free the previous segment's buffers before making the next ones)
            _, carry_next, S, _ = _scan_segment(kg, vg, beta, alpha, M, _safe_shift(R), carry, a, b, nb, C)
            if readout:
                dens[:, :, a:b] = S[:, :, :b - a, Dv:]
            Z, _, den_min = _read_out(S, b - a, Dv, clamp=False)  # (B, G, Ts, Dv)
            if readout:
                Zs[:, :, a:b] = Z
            torch.lt(den_min, EXACT_DEN_THRESHOLD, out=flags[:, a:b])
            o = out[:, a:b]
            torch.sigmoid(q[:, a:b], out=o).mul_(Z.transpose(1, 2).reshape(B, b - a, D))
        ctx.save_for_backward(q, k, v, beta, alpha, torch.stack(shifts, 1) if keep else None, carries, Zs, dens)
        ctx.cfg = (groups, nb, seg, C)
        ctx.mark_non_differentiable(flags)
        return out, flags

    @staticmethod
    def backward(ctx, gout, _gflags):
        q, k, v, beta, alpha, R, carries, Zs, dens = ctx.saved_tensors
        G, nb, seg, C = ctx.cfg
        B, T, D = q.shape
        Dk = k.shape[-1]
        Dv, Dkg = D // G, Dk // G
        H = _round_up(nb, C)
        kg, vg = k.view(B, T, G, Dkg), v.view(B, T, G, Dv)
        M = _band_matrices(beta, 0, 1, C) if beta is not None and beta.shape[1] == 1 else None
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dbeta = torch.zeros_like(beta) if beta is not None and ctx.needs_input_grad[3] else None
        dcarry = None  # d loss / d (carry of segment s + 1), in segment s + 1's frame
        segs = _segments(T, seg)
        for s in reversed(range(len(segs))):
            a, b = segs[s]
            Ts = b - a
            Xw = S = dS = dSw = dX = None  # free the previous segment's buffers first
            Tp, shift = _round_up(Ts, C), _safe_shift(R[:, s])
            if Zs is None:  # recompute the forward of this segment
                Xw, _, S, Ms = _scan_segment(kg, vg, beta, alpha, M, shift, carries[:, s], a, b, nb, C)
                Z, den, _ = _read_out(S, Ts, Dv, clamp=True)  # flagged / empty rows get no gradient anyway
            else:  # only X is needed again; 0/0 rows (flagged, replaced outside) get no gradient
                Xw = _build_X(kg, vg, shift, a - H, a + Tp, extra=C)
                Ms = _band_matrices(beta, a, Tp // C, C)
                Z, den = torch.nan_to_num(Zs[:, :, a:b], nan=0.0), dens[:, :, a:b].clamp_min(torch.finfo(q.dtype).tiny)
            sig = torch.sigmoid(q[:, a:b])
            gy = gout[:, a:b]
            dq[:, a:b] = gy * Z.transpose(1, 2).reshape(B, Ts, D) * sig * (1 - sig)
            # d loss / d S = [dZ / den, -sum(dZ * Z) / den] (B, G, Tp, Fg), padded rows 0
            dS = Xw.new_empty(B, G, Tp, Dv + Dkg)
            dS[:, :, Ts:].zero_()
            dZ = dS[:, :, :Ts, :Dv]
            heads = lambda x: x.view(B, Ts, G, Dv).transpose(1, 2)
            torch.mul(heads(gy), heads(sig), out=dZ)
            dZZ = dZ * Z
            torch.neg(dZZ.sum(-1, keepdim=True) if Dkg == 1 else dZZ, out=dS[:, :, :Ts, Dv:])
            dS[:, :, :Ts].div_(_to_fg(den, Dv))
            # back through S = alpha * Sw[H - nb + i] + band, and the next segment's carry = Sw[Ts - 1]
            dSw = dS.new_empty(B, G, Xw.shape[2], Dv + Dkg)
            dSw[:, :, :H - nb].zero_()
            dSw[:, :, H - nb + Tp:].zero_()
            if beta is None:
                dSw[:, :, H - nb:H - nb + Tp] = dS
            else:
                torch.mul(dS, _rows_of(alpha, a, Tp).unsqueeze(-1), out=dSw[:, :, H - nb:H - nb + Tp])
            if dcarry is not None:
                dSw[:, :, Ts - 1:Ts] += dcarry.mul_(_frame_factor(R[:, s], R[:, s + 1], Dv))
            dX = _chunk_scan(dSw, C, reverse=True)  # key u feeds every prefix row u' >= u
            dcarry = dX[:, :, :1].clone()  # the carry was added to every row of Sw
            if beta is not None:
                _band_apply_t(Ms, dS, C, dX[:, :, H - nb + 1:])
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
        return dq, dk, dv, dbeta, None, None, None, None, None, None


def _causal_scan(q, k, v, beta, alpha, groups, nb):
    C = CHUNK_SIZE
    B, T, D = q.shape
    rows = SEGMENT_ELEMENTS // (B * (D + k.shape[-1]))
    rows = max(rows, 8 * _round_up(nb, C), 64)  # each segment recomputes its band halo: keep that small
    seg = max(C, _round_up(min(SEGMENT_SIZE, rows), C))
    keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, beta))
    return _CausalScan.apply(q, k, v, beta, alpha, groups, nb, seg, C, keep)


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
        Xw = _build_X(kg, vg, shift, -Hl, Tp + Hr, extra=C)  # keys [-Hl, Tp + Hr) and C zero rows
        pre, suf = _chunk_scan(Xw, C), _chunk_scan(Xw, C, reverse=True)
        outside = pre[:, :, Hl - d_hi - 1:Hl - d_hi - 1 + Tp] + suf[:, :, Hl - d_lo + 1:Hl - d_lo + 1 + Tp]
        S = outside * _rows_of(alpha, 0, Tp).unsqueeze(-1)
        S = _band_apply(_band_matrices(beta, 0, Tp // C, C), Xw[:, :, Hl - d_hi:], C, S)[:, :, :T]
    num, den = S[..., :Dv], S[..., Dv:]
    y = torch.sigmoid(q) * _safe_div(num, den).expand(B, G, T, Dv).transpose(1, 2).reshape(B, T, D)
    flags = (den.detach() < EXACT_DEN_THRESHOLD).any(-1).any(1).expand(B, T)
    return y, flags


# ----------------------------------------------------------------------------------------------------
# AFT-full: E = exp(w - rowmax) against X = [P*V, P], blocked over rows and keys; custom backward


def _full_X(kg, vg, shift, j0, j1):
    """(G, KB, B, 2, Dv): [P*V, P] of keys [j0, j1), laid out for (G, rows, KB) @ (G, KB, B*2*Dv)."""
    B, _, G, Dv = kg.shape
    X = kg.new_empty(G, j1 - j0, B, 2, Dv)
    P = X[:, :, :, 1].permute(2, 1, 0, 3)  # (B, KB, G, Dv) view
    torch.sub(kg[:, j0:j1], shift, out=P).exp_()
    torch.mul(P, vg[:, j0:j1], out=X[:, :, :, 0].permute(2, 1, 0, 3))
    return X


class _FullBias:
    """Bias rows of the queries: query i uses row off + i of w (G, T', T'); blocks come out in the
    compute dtype, exp(w - m) with m the per-row max over the keys the row sees (0 on unseen keys)."""

    def __init__(self, w, off, causal, dtype):
        self.w, self.off, self.causal, self.dtype = w, off, causal, dtype

    def rows(self, i0, i1, j0, j1):
        return self.w[:, self.off + i0:self.off + i1, j0:j1].to(self.dtype)

    def future(self, i0, i1, j0, j1):
        """(RB, KB) True where key j is after query i (causal), or None when no such pair."""
        if not self.causal or j1 - 1 <= self.off + i0:
            return None
        keys = torch.arange(j0, j1, device=self.w.device)
        rows = torch.arange(self.off + i0, self.off + i1, device=self.w.device)
        return keys[None, :] > rows[:, None]

    def row_max(self, i0, i1, e):
        """(G, RB): max of w over keys [0, e) each row sees."""
        if not self.causal:
            return _safe_shift(self.rows(i0, i1, 0, e).amax(-1))
        d0 = self.off + i0  # keys before d0 are seen by every row of the block
        diag, fut = self.rows(i0, i1, d0, e), self.future(i0, i1, d0, e)
        m = (diag if fut is None else diag.masked_fill(fut, -math.inf)).amax(-1)
        if d0 > 0:
            m = torch.maximum(m, self.rows(i0, i1, 0, d0).amax(-1))
        return _safe_shift(m)

    def exp(self, m, i0, i1, j0, j1):
        E = (self.rows(i0, i1, j0, j1) - m.unsqueeze(-1)).exp_()  # (G, RB, KB)
        fut = self.future(i0, i1, j0, j1)
        return E if fut is None else E.masked_fill_(fut, 0.0)


def _full_blocks(Lq, Lk, off, causal, FB):
    """(i0, i1, e) per row block: keys [0, e) are seen by some row of the block."""
    for i0 in range(0, Lq, FB):
        i1 = min(Lq, i0 + FB)
        yield i0, i1, (off + i1 if causal else Lk)


def _full_tiles(i0, i1, j0, j1, off, causal, FB):
    """(r0, r1, k1) tiles of rows [i0, i1) x keys [j0, j1). A key block that the causal edge crosses is
    cut into row quarters, each taking keys only up to its last row: most of the masked-out upper
    triangle is then never multiplied (1/8 of all the work at FB = T / 8 otherwise)."""
    if not causal or j1 - 1 <= off + i0:
        return [(i0, i1, j1)]
    step = max(1, FB // 4)
    return [(r0, min(i1, r0 + step), min(j1, off + min(i1, r0 + step)))
            for r0 in range(i0, i1, step) if min(j1, off + min(i1, r0 + step)) > j0]



def _full_setup(q, k, v, w, off, causal):
    """Shapes and per-group views shared by _FullFn's forward and backward: K, V as (B, Lk, G, D/G)."""
    B, Lq, D = q.shape
    Lk, G = k.shape[1], w.shape[0]
    Dv = D // G
    kg, vg = k.view(B, Lk, G, Dv), v.view(B, Lk, G, Dv)
    return B, Lq, Lk, D, G, Dv, B * 2 * Dv, kg, vg, _FullBias(w, off, causal, q.dtype)

class _FullScan(torch.autograd.Function):
    """AFT-full's eager path (float64, devices other than the CPU; CPU float32 calls take aft_kernels' fused kernel),
    blocked over (row block, key block) tiles so no T x T intermediate exists.

    Row blocks take their own K shift (the max over the keys they see, a running max when causal).
    With a backward ahead, den (B, Lq, D) is kept beside the output y = sigmoid(q) num / den, so the
    backward needs two matmuls per tile (d/dw and d/dX) rather than three: one E @ X fewer than
    recomputing. It needs num / den only multiplied by sigmoid(q), i.e. as y: nothing else is stored.
    """

    @staticmethod
    def forward(ctx, q, k, v, w, off, causal, FB, keep):
        B, Lq, Lk, D, G, Dv, N, kg, vg, bias = _full_setup(q, k, v, w, off, causal)
        out = torch.empty_like(q)
        den = torch.empty_like(q) if keep else None
        flags = torch.empty(B, Lq, dtype=torch.bool, device=q.device)
        shifts, shift, seen = [], None, 0
        for i0, i1, e in _full_blocks(Lq, Lk, off, causal, FB):
            if e > seen:  # running max of K over the keys seen so far
                new = kg[:, seen:e].amax(1, keepdim=True)
                shift = new if shift is None else torch.maximum(shift, new)
                seen = e
            shifts.append(shift)
            m = bias.row_max(i0, i1, e)  # (G, RB)
            S = q.new_zeros(G, i1 - i0, N)
            for j0 in range(0, e, FB):
                j1 = min(e, j0 + FB)
                X = _full_X(kg, vg, _safe_shift(shift), j0, j1).view(G, j1 - j0, N)
                for r0, r1, k1 in _full_tiles(i0, i1, j0, j1, off, causal, FB):
                    S[:, r0 - i0:r1 - i0].baddbmm_(bias.exp(m[:, r0 - i0:r1 - i0], r0, r1, j0, k1), X[:, :k1 - j0])
                del X  # before the next block's is built: one X at a time
            # [num, den] as (B, RB, G, Dv) views of S; the output is built in place (no copy of S, no z buffer)
            num, dsum = S.view(G, i1 - i0, B, 2, Dv).permute(2, 1, 0, 3, 4).unbind(3)
            torch.lt(dsum.amin((-2, -1)), EXACT_DEN_THRESHOLD, out=flags[:, i0:i1])
            o = out[:, i0:i1].view(B, i1 - i0, G, Dv)
            torch.sigmoid(q[:, i0:i1].view(B, i1 - i0, G, Dv), out=o).mul_(num).div_(dsum)  # 0/0 rows: flagged
            if keep:
                den[:, i0:i1].view(B, i1 - i0, G, Dv).copy_(dsum)
        ctx.save_for_backward(q, k, v, w, torch.stack(shifts, 0), out if keep else None, den)
        ctx.cfg = (off, causal, FB)
        ctx.mark_non_differentiable(flags)
        return out, flags

    @staticmethod
    def backward(ctx, gout, _gflags):
        q, k, v, w, shifts, y, den = ctx.saved_tensors
        off, causal, FB = ctx.cfg
        B, Lq, Lk, D, G, Dv, N, kg, vg, bias = _full_setup(q, k, v, w, off, causal)
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dw = torch.zeros_like(w) if ctx.needs_input_grad[3] else None
        for r, (i0, i1, e) in enumerate(_full_blocks(Lq, Lk, off, causal, FB)):
            RB = i1 - i0
            shift = _safe_shift(shifts[r])
            sig, gy, yb = torch.sigmoid(q[:, i0:i1]), gout[:, i0:i1], y[:, i0:i1]
            yb = torch.where(torch.isnan(yb), torch.zeros_like(yb), yb)  # rows that were 0/0 (no key seen)
            dq[:, i0:i1] = gy * yb * (1 - sig)  # y = sigmoid(q) z: dy/dq = z sigmoid (1 - sigmoid)
            inv_den = den[:, i0:i1].clamp_min(torch.finfo(den.dtype).tiny).reciprocal()
            dS = torch.stack([gy * sig * inv_den, -gy * yb * inv_den], 2)  # (B, RB, 2, D): d loss / d [num, den]
            dS = dS.view(B, RB, 2, G, Dv).permute(3, 1, 0, 2, 4).reshape(G, RB, N)
            m = bias.row_max(i0, i1, e)
            for j0 in range(0, e, FB):
                j1 = min(e, j0 + FB)
                KB = j1 - j0
                X = _full_X(kg, vg, shift, j0, j1)  # (G, KB, B, 2, Dv)
                tiles = _full_tiles(i0, i1, j0, j1, off, causal, FB)
                dX = X.new_zeros(G, KB, N) if len(tiles) > 1 else None
                for r0, r1, k1 in tiles:
                    E = bias.exp(m[:, r0 - i0:r1 - i0], r0, r1, j0, k1)
                    dSt, Xt = dS[:, r0 - i0:r1 - i0], X.view(G, KB, N)[:, :k1 - j0]
                    if dw is not None:  # d exp(w - m) / dw = E (m is a constant shift)
                        dw_t = dw[:, off + r0:off + r1, j0:k1]
                        if dw.dtype == E.dtype:
                            torch.bmm(dSt, Xt.transpose(1, 2), out=dw_t).mul_(E)
                        else:
                            dw_t.copy_(torch.bmm(dSt, Xt.transpose(1, 2)).mul_(E))
                    if dX is None:
                        dX = torch.bmm(E.transpose(1, 2), dSt)
                    else:
                        dX[:, :k1 - j0].baddbmm_(E.transpose(1, 2), dSt)
                # X = [P V, P] with P = exp(K - shift): dV = P dX_pv, dK = (P V) dX_pv + P dX_p
                dX = dX.view(G, KB, B, 2, Dv)
                PV, P, dXpv, dXp = (t[:, :, :, i].permute(2, 1, 0, 3) for t in (X, dX) for i in (0, 1))
                dv[:, j0:j1].view(B, KB, G, Dv).addcmul_(P, dXpv)
                dk[:, j0:j1].view(B, KB, G, Dv).addcmul_(PV, dXpv).addcmul_(P, dXp)
        return dq, dk, dv, dw, None, None, None, None


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
        qf, kf, vf = _up(q, dt), _up(k, dt), _up(v, dt)
        fused = fused_full(qf, kf, vf, wh, causal, key_mask)  # reads the mask itself: no -inf copy of k
        if fused is not None:
            (y, flags), valid = fused, _valid_keys(key_mask)
        else:
            km, valid = _masked_keys(kf, key_mask)
            keep = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, pos_bias))
            # the bias goes in whole (blocks are cast on the fly): its gradient is then one T' x T' buffer
            y, flags = _FullScan.apply(qf, km, vf, wh, off, causal, FULL_BLOCK_SIZE, keep)
        has_vis = _has_visible(valid, B, Lq, Lk, causal, q.device)

        def bias_rows(pos, Tk):  # (n, G, Tk): the dense bias rows of these positions
            rows = wh[:, pos, :Tk].transpose(0, 1).to(dt)
            return _causal_bias(rows, pos, Tk) if causal else rows

        y = _fix_flagged(y, flags, has_vis, qf, kf, vf, valid, bias_rows, G, causal, offset=off)
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
    has_vis = _has_visible(valid, B, T, T, causal, q.device)

    def bias_rows(pos, Tk):
        rows = dense_bias(pos, Tk)  # (n, G, Tk)
        return _causal_bias(rows, pos, Tk) if causal else rows

    return _fix_flagged(y, flags, has_vis, q, k, v, valid, bias_rows, groups, causal)


def aft_simple(q, k, v, *, causal=False, key_mask=None):
    """AFT-simple (w = 0): Y_t = sigmoid(Q_t) * softmax over keys (per feature) of K, applied to V.

    q, k, v (B, T, D); causal: keys t' <= t (a stable prefix scan). O(T D) time and memory. Causal calls on
    the CPU in float32 (or cast up to it) run the fused kernels of aft_kernels, forward and backward, when they
    can be compiled.
    """
    _check_qkv(q, k, v)
    B, T, D = q.shape
    _check(k.shape[-1] == D, f"aft_simple needs k with D={D} features, got {k.shape[-1]}")
    _check_mask(key_mask, (B, T))
    dt = _compute_dtype(q, k, v)
    with _no_autocast(q.device.type):
        qf, kf, vf = _up(q, dt), _up(k, dt), _up(v, dt)
        y = fused_causal_simple(qf, kf, vf, key_mask) if causal else None  # on the CPU: one pass each way
        if y is None:
            zero = lambda pos, Tk: qf.new_zeros(pos.numel(), 1, Tk)
            y = _linear_variant(qf, kf, vf, None, None, 1, 0, -1, causal, key_mask, zero)
    return y.to(q.dtype)


def aft_local(q, k, v, pos_bias, window, *, causal=False, key_mask=None):
    """AFT-local: the learned bias w_{t,t'} only where |t - t'| < window, 0 elsewhere.

    Every position still sees the whole (causal) context; the window only limits where the bias applies.
    q, k, v (B, T, D); pos_bias (T', T') or (H, T', T') with T' >= T (top-left T x T used, D divisible
    by H), or the factors (u, v), each (T', r), of w = u vᵀ — then neither the bias nor its gradient is
    ever T x T. Out-of-band keys come from prefix (and suffix) sums, the band from pos_bias' diagonals:
    O(T window D) time, O(T D) memory, no T x T intermediate. Causal calls on the CPU in float32 (or cast up
    to it) run the fused kernels of aft_kernels, forward and backward, when they can be compiled: they read the
    window's biases straight from pos_bias or its factors, so no band is built either.
    """
    _check_qkv(q, k, v)
    B, T, D = q.shape
    _check(k.shape[-1] == D, f"aft_local needs k with D={D} features, got {k.shape[-1]}")
    _check(isinstance(window, int) and window >= 1, f"window must be an int >= 1, got {window!r}")
    _check_mask(key_mask, (B, T))
    factors = _bias_factors(pos_bias, T)
    wh = None if factors is not None else _heads_of_bias(pos_bias, D, T, T)
    G = 1 if factors is not None else wh.shape[0]
    reach = min(window, T) - 1  # offsets beyond the sequence never apply
    d_lo, d_hi = (0, reach) if causal else (-reach, reach)
    dt = _compute_dtype(q, k, v, *(factors if factors is not None else (pos_bias,)))
    with _no_autocast(q.device.type):
        qf, kf, vf = _up(q, dt), _up(k, dt), _up(v, dt)
        factors = None if factors is None else tuple(_up(f, dt) for f in factors)
        if causal:  # on the CPU, fused both ways: the kernels read the window's biases from wh or the factors
            y = fused_causal_local(qf, kf, vf, factors if factors is not None else wh.to(dt), window, key_mask)
            if y is not None:
                return y.to(q.dtype)
        # the band as diagonals: slot j of row t is w[g, t, t - d], d = d_lo + j. Gathered straight
        # from pos_bias, so its gradient is a single T' x T' buffer; from factors, it is never T x T.
        key = _band_keys(T, d_lo, d_hi, q.device)  # (T, nb)
        inside = (key >= 0) & (key < T)
        if factors is not None:
            band = _band_from_factors(*factors, T, d_lo, d_hi)[None]  # (1, T, nb)
        else:
            band = _BandOfMatrix.apply(wh, T, d_lo, d_hi).to(dt)  # (G, T, nb)

        def dense_bias(pos, Tk):
            if factors is not None:  # only the rows the exact path recomputes
                rows = (factors[0][pos] @ factors[1][:Tk].T)[:, None, :]  # (n, 1, Tk)
            else:
                rows = wh[:, pos, :Tk].transpose(0, 1).to(dt)  # (n, G, Tk)
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
    span from a convolution with exp(w): O(T s D) time, O(T D) memory. Causal calls on the CPU in float32
    (or cast up to it) run the fused kernels of aft_kernels, forward and backward, when they can be compiled.
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
        y = fused_causal_conv1d(qf, kf, vf, kern, key_mask) if causal else None  # on the CPU, fused both ways
        if y is None:
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
        has_vis = _has_visible(valid, B, T, T, False, q.device)

        def bias_rows(pos, Tk):
            rr, cc = pos // Ww, pos % Ww
            kr, kc = torch.arange(Tk, device=q.device) // Ww, torch.arange(Tk, device=q.device) % Ww
            a, b = rr[:, None] - kr[None, :] + r, cc[:, None] - kc[None, :] + r  # (n, Tk)
            inside = (a >= 0) & (a < s) & (b >= 0) & (b < s)
            rows = kern[:, a.clamp(0, s - 1), b.clamp(0, s - 1)].transpose(0, 1)  # (n, h, Tk)
            return torch.where(inside[:, None, :], rows, torch.zeros_like(rows))

        y = _fix_flagged(flat(y), flags, has_vis, flat(qf), flat(kf), flat(vf), valid, bias_rows, h, False)
    return y.reshape(B, Hh, Ww, D).to(q.dtype)
