"""Naive float64 references for the AFT operators, straight from the paper's equations.

    Y_t = sigmoid(Q_t) * sum_t' exp(K_t' + w_{t,t'}) V_t' / sum_t' exp(K_t' + w_{t,t'})

Each function builds the dense bias w (heads, T, T) of its variant and evaluates the formula with a
(B, Lq, Lk, D) logits tensor, shifted by the exact per-row max of K + w over the keys the row sees, so
it is exact for any finite input. O(T^2 D) memory: for tests only. Same signatures as
modeling_aft.aft_ops; computed in float64 and returned in q's dtype (pass float64 inputs to keep all
digits). Other test files import these: keep them stable.
"""

import torch

__all__ = ["ref_aft_full", "ref_aft_local", "ref_aft_simple", "ref_aft_conv1d", "ref_aft_conv2d"]


def _ref(q, k, v, w, causal, key_mask):
    """q (B, Lq, D); k, v (B, Lk, D) (k per feature); w (G, Lq, Lk) dense bias of the query rows."""
    out_dtype = q.dtype
    q, k, v, w = (x.to(torch.float64) for x in (q, k, v, w))
    B, Lq, D = q.shape
    Lk = k.shape[1]
    G = w.shape[0]
    w = w.repeat_interleave(D // G, 0).permute(1, 2, 0)  # (Lq, Lk, D): head g's bias for its features
    logits = k[:, None, :, :] + w[None]  # (B, Lq, Lk, D)
    sees = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:  # query i sits at position Lk - Lq + i
        sees = torch.arange(Lk, device=q.device)[None, :] <= (Lk - Lq + torch.arange(Lq, device=q.device))[:, None]
    sees = sees[None, :, :, None].expand(B, Lq, Lk, 1)
    if key_mask is not None:
        sees = sees & key_mask.to(torch.bool)[:, None, :, None]
    logits = torch.where(sees, logits, torch.full_like(logits, -torch.inf))
    top = logits.detach().amax(2, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(logits - top)
    num, den = (p * v[:, None]).sum(2), p.sum(2)
    ok = den > 0
    z = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))
    return (torch.sigmoid(q) * z).to(out_dtype)


def _heads(pos_bias):
    return pos_bias if pos_bias.dim() == 3 else pos_bias.unsqueeze(0)


def ref_aft_full(q, k, v, pos_bias, *, causal=False, key_mask=None):
    Lq, Lk = q.shape[1], k.shape[1]
    return _ref(q, k, v, _heads(pos_bias)[:, Lk - Lq:Lk, :Lk], causal, key_mask)


def ref_aft_local(q, k, v, pos_bias, window, *, causal=False, key_mask=None):
    T = q.shape[1]
    t = torch.arange(T, device=q.device)
    near = (t[:, None] - t[None, :]).abs() < window
    w = _heads(pos_bias)[:, :T, :T]
    return _ref(q, k, v, torch.where(near, w, torch.zeros_like(w)), causal, key_mask)


def ref_aft_simple(q, k, v, *, causal=False, key_mask=None):
    T = q.shape[1]
    return _ref(q, k, v, q.new_zeros(1, T, T), causal, key_mask)


def _kernel_bias(kernel, offsets, lo):
    """kernel (h, *s) and offsets (..., T, T, nd) -> (h, T, T) bias; entry index = offset - lo, 0 outside."""
    s = kernel.shape[1]
    idx = offsets - lo
    inside = ((idx >= 0) & (idx < s)).all(-1)
    idx = idx.clamp(0, s - 1)
    vals = kernel[(slice(None),) + tuple(idx[..., i] for i in range(idx.shape[-1]))]
    return torch.where(inside, vals, torch.zeros_like(vals))


def ref_aft_conv1d(q, k, v, kernel, *, causal=True, key_mask=None):
    T, D = q.shape[1], q.shape[2]
    h, s = kernel.shape
    t = torch.arange(T, device=q.device)
    offsets = (t[:, None] - t[None, :])[..., None]  # t - t'
    w = _kernel_bias(kernel, offsets, 0 if causal else -(s // 2))
    return _ref(q, k.repeat_interleave(D // h, -1), v, w, causal, key_mask)


def ref_aft_conv2d(q, k, v, kernel, *, key_mask=None):
    B, H, W, D = q.shape
    h, s = kernel.shape[0], kernel.shape[1]
    r, c = torch.meshgrid(torch.arange(H, device=q.device), torch.arange(W, device=q.device), indexing="ij")
    pos = torch.stack([r.reshape(-1), c.reshape(-1)], -1)  # (T, 2)
    offsets = pos[:, None, :] - pos[None, :, :]  # (T, T, 2): (r - r', c - c')
    w = _kernel_bias(kernel, offsets, -(s // 2))
    flat = lambda x: x.reshape(B, H * W, x.shape[-1])
    mask = None if key_mask is None else key_mask.reshape(B, H * W)
    y = _ref(flat(q), flat(k).repeat_interleave(D // h, -1), flat(v), w, False, mask)
    return y.reshape(B, H, W, D)
