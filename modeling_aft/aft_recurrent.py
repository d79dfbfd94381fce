"""Cached decoding for AFT: one position at a time from a small state, never recomputing the prefix.

AFT-simple, AFT-local and AFT-conv are all "a bias-free running sum + a bias inside the last s positions":

    num_t = Σ_{t' ≤ t-s} exp(K_t') V_t'  +  Σ_{t-s < t' ≤ t} exp(K_t' + w_{t,t'}) V_t'          (den: the same without V)

so a layer's state is the first sum (kept as numerator, denominator and their running max, for stability) plus the raw
K, V of the last s-1 positions. Each step adds the new position, reads the output exactly (the window part is summed
directly rather than as `exp(w) - 1` corrections, so nothing cancels), then moves the oldest window position into the
running sums. AFT-simple is the same with s = 1. AFT-full's bias row changes with t, so it keeps every past K/V and
reads one row exactly (`aft_full_rows`).
"""

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


def expand_key_heads(k: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., h) per-head keys (AFT-conv, paper eq. 6) → (..., dim): head i covers features [i·dim/h, (i+1)·dim/h)."""
    heads = k.shape[-1]
    return k if heads == dim else k.repeat_interleave(dim // heads, dim=-1)


def _rescale(x: torch.Tensor, old_max: torch.Tensor, new_max: torch.Tensor) -> torch.Tensor:
    # exp(-inf - -inf) would be NaN; an empty sum stays 0 whatever the new max.
    factor = torch.where(old_max == NEG_INF, torch.zeros_like(old_max), torch.exp(old_max - new_max))
    return x * factor


@dataclass
class WindowState:
    """Decoding state of one AFT-simple/local/conv layer (fp32 sums, raw window in the model's dtype).

    out_num, out_den, out_max: (B, D) — Σ exp(K - out_max) V and Σ exp(K - out_max) over positions outside the window.
    win_k (B, s-1, Dk), win_v (B, s-1, D), win_valid (B, s-1): the last s-1 positions, oldest first.
    """

    out_num: torch.Tensor
    out_den: torch.Tensor
    out_max: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    win_valid: torch.Tensor

    @property
    def window(self) -> int:
        return self.win_k.shape[1] + 1

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(recurrent (B, 3, D), conv (B, Dk + D + 1, s-1)) in the layout transformers' linear-attention cache keeps."""
        recurrent = torch.stack([self.out_num, self.out_den, self.out_max], dim=1)
        return recurrent, self.pack_window(self.win_k, self.win_v, self.win_valid)

    @staticmethod
    def pack_window(k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Positions k (B, L, Dk), v (B, L, D), valid (B, L) → conv-state columns (B, Dk + D + 1, L), oldest first."""
        return torch.cat([k.float(), v.float(), valid.float().unsqueeze(-1)], dim=-1).transpose(1, 2)

    @classmethod
    def unpack(cls, recurrent: torch.Tensor, conv: torch.Tensor, key_dim: int, dtype: torch.dtype) -> "WindowState":
        window = conv.transpose(1, 2)  # (B, s-1, Dk + D + 1)
        value_dim = recurrent.shape[-1]
        return cls(
            out_num=recurrent[:, 0], out_den=recurrent[:, 1], out_max=recurrent[:, 2],
            win_k=window[..., :key_dim].to(dtype), win_v=window[..., key_dim:key_dim + value_dim].to(dtype),
            win_valid=window[..., -1] > 0.5,
        )


def window_state_from_prefix(k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, window: int) -> WindowState:
    """State after the prefix k, v (B, T, Dk) / (B, T, D): positions ≤ T-s summed, the last s-1 kept raw."""
    batch, length, _ = k.shape
    dim = v.shape[-1]
    valid = torch.ones(batch, length, dtype=torch.bool, device=k.device) if key_mask is None else key_mask.bool()
    split = max(length - (window - 1), 0)
    logits = torch.where(valid[:, :split, None], expand_key_heads(k[:, :split].float(), dim), NEG_INF)  # (B, T-s+1, D)
    if split > 0:
        out_max = logits.amax(dim=1)
    else:
        out_max = torch.full((batch, dim), NEG_INF, device=k.device)
    weights = torch.exp(logits - torch.where(out_max == NEG_INF, 0.0, out_max)[:, None])  # masked → exp(-inf) = 0
    out_num = (weights * v[:, :split].float()).sum(dim=1)
    out_den = weights.sum(dim=1)

    def last_window(x: torch.Tensor, fill) -> torch.Tensor:
        kept = x[:, split:]
        missing = window - 1 - kept.shape[1]
        if missing == 0:
            return kept
        pad = torch.full((batch, missing, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
        return torch.cat([pad, kept], dim=1)

    return WindowState(out_num, out_den, out_max, last_window(k, 0), last_window(v, 0), last_window(valid, False))


def window_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_bias: torch.Tensor, state: WindowState,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, WindowState]:
    """Consume one position. q, v (B, D); k (B, Dk); window_bias (B, s, Dk): the bias of each window slot, oldest
    first, the new position last. key_valid (B,) marks padding. Returns y (B, D) in q's dtype and the next state."""
    batch, dim = v.shape
    if key_valid is None:
        key_valid = torch.ones(batch, dtype=torch.bool, device=k.device)
    keys = torch.cat([state.win_k, k[:, None]], dim=1)  # (B, s, Dk)
    values = torch.cat([state.win_v, v[:, None]], dim=1).float()  # (B, s, D)
    valid = torch.cat([state.win_valid, key_valid[:, None].bool()], dim=1)  # (B, s)
    logits = torch.where(valid[..., None], expand_key_heads((keys.float() + window_bias.float()), dim), NEG_INF)
    new_max = torch.maximum(state.out_max, logits.amax(dim=1))  # (B, D)
    safe_max = torch.where(new_max == NEG_INF, 0.0, new_max)
    weights = torch.exp(logits - safe_max[:, None])  # (B, s, D)
    num = _rescale(state.out_num, state.out_max, safe_max) + (weights * values).sum(dim=1)
    den = _rescale(state.out_den, state.out_max, safe_max) + weights.sum(dim=1)
    y = torch.sigmoid(q.float()) * torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)

    # The oldest slot's bias becomes 0 from the next position on: move it into the running sums.
    leaving = torch.where(valid[:, :1, None], expand_key_heads(keys[:, :1].float(), dim), NEG_INF)[:, 0]  # (B, D)
    out_max = torch.maximum(state.out_max, leaving)
    safe_out = torch.where(out_max == NEG_INF, 0.0, out_max)
    leaving_weight = torch.exp(leaving - safe_out)
    next_state = WindowState(
        out_num=_rescale(state.out_num, state.out_max, safe_out) + leaving_weight * values[:, 0],
        out_den=_rescale(state.out_den, state.out_max, safe_out) + leaving_weight,
        out_max=out_max,
        win_k=keys[:, 1:], win_v=values[:, 1:].to(state.win_v.dtype), win_valid=valid[:, 1:],
    )
    return y.to(q.dtype), next_state


def conv1d_window_bias(kernel: torch.Tensor, batch: int) -> torch.Tensor:
    """Causal kernel (h, s), kernel[i, j] = bias of offset j → (B, s, h) over window slots, oldest (offset s-1) first."""
    return kernel.flip(-1).transpose(0, 1).unsqueeze(0).expand(batch, -1, -1)


def aft_full_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """AFT-full for a few query rows against all cached keys, exact for any finite input.

    q (B, Lq, D); k, v (B, Lk, D); bias (B, Lq, Lk) — each row's own bias (rows may sit at different positions when
    batches are padded); visible (B, Lq, Lk) bool. Costs O(Lq·Lk·D), which is what one decoding step of AFT-full is.
    """
    rows = []
    for i in range(q.shape[1]):
        logits = torch.where(visible[:, i, :, None], k.float() + bias[:, i, :, None].float(), NEG_INF)  # (B, Lk, D)
        row_max = logits.amax(dim=1, keepdim=True)
        weights = torch.exp(logits - torch.where(row_max == NEG_INF, 0.0, row_max))
        num = (weights * v.float()).sum(dim=1)
        den = weights.sum(dim=1)
        rows.append(torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0))
    return (torch.sigmoid(q.float()) * torch.stack(rows, dim=1)).to(q.dtype)
