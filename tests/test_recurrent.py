"""Decoding one position at a time from the small state equals the full causal operator at that position."""

import pytest
import torch

from modeling_aft.aft_ops import aft_conv1d, aft_full, aft_local, aft_simple
from modeling_aft.aft_recurrent import (
    WindowState,
    aft_full_rows,
    conv1d_window_bias,
    window_state_from_prefix,
    window_step,
)

B, T, D, HEADS, WINDOW = 2, 13, 8, 2, 4


def _inputs(key_dim, seed=0, key_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, v = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    k = torch.randn(B, T, key_dim, generator=g) * key_scale
    return q, k, v


def _left_padding_mask():
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :4] = False
    return mask


def _local_bias_for_step(pos_bias, positions, window):
    offsets = torch.arange(window - 1, -1, -1)
    keys = positions[:, None] - offsets
    return torch.where(keys >= 0, pos_bias[positions[:, None], keys.clamp(min=0)], 0.0)[..., None]


CASES = {
    # name: (key_dim, window, full causal op, per-step window bias)
    "simple": (D, 1, lambda q, k, v, m, w: aft_simple(q, k, v, causal=True, key_mask=m),
               lambda w, pos: torch.zeros(B, 1, 1)),
    "conv": (HEADS, WINDOW, lambda q, k, v, m, w: aft_conv1d(q, k, v, w, causal=True, key_mask=m),
             lambda w, pos: conv1d_window_bias(w, B)),
    "local": (D, WINDOW, lambda q, k, v, m, w: aft_local(q, k, v, w, WINDOW, causal=True, key_mask=m),
              lambda w, pos: _local_bias_for_step(w, pos, WINDOW)),
}


@pytest.mark.parametrize("key_scale", [1.0, 300.0])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_window_steps_equal_the_causal_operator(name, padded, key_scale):
    key_dim, window, full_op, step_bias = CASES[name]
    q, k, v = _inputs(key_dim, key_scale=key_scale)
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(HEADS, WINDOW, generator=g) * 3 if name == "conv" else torch.randn(T, T, generator=g) * 3
    mask = _left_padding_mask() if padded else None
    expected = full_op(q, k, v, mask, weights)
    # prefix of 5 positions through the state builder, the rest one step at a time
    prefix = 5
    state = window_state_from_prefix(k[:, :prefix], v[:, :prefix], None if mask is None else mask[:, :prefix], window)
    positions = (mask.long().cumsum(1) - 1).clamp(min=0) if padded else torch.arange(T).expand(B, -1)
    outputs = []
    for t in range(prefix, T):
        bias = step_bias(weights, positions[:, t])
        y, state = window_step(q[:, t], k[:, t], v[:, t], bias, state, key_valid=None if mask is None else mask[:, t])
        recurrent, conv = state.pack()
        state = WindowState.unpack(recurrent, conv, key_dim, k.dtype)  # the cache round trip is lossless
        outputs.append(y)
    got = torch.stack(outputs, dim=1)
    if padded:  # a left-padded row's positions start at its first real token: compare with that row alone
        row_alone = full_op(q[1:, 4:], k[1:, 4:], v[1:, 4:], None, weights)
        torch.testing.assert_close(got[1], row_alone[0, prefix - 4:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[0], expected[0, prefix:], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got, expected[:, prefix:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_full_rows_equal_aft_full(padded):
    q, k, v = _inputs(D, key_scale=50.0)
    pos_bias = torch.randn(T, T, generator=torch.Generator().manual_seed(2)) * 30
    mask = _left_padding_mask() if padded else torch.ones(B, T, dtype=torch.bool)
    visible = torch.ones(T, T, dtype=torch.bool).tril()[None] & mask[:, None, :]
    # identical positions in every row: the bias rows are the same matrix for the whole batch
    got = aft_full_rows(q, k, v, pos_bias.expand(B, T, T), visible)
    expected = aft_full(q, k, v, pos_bias, causal=True, key_mask=mask if padded else None)
    valid_rows = mask if padded else slice(None)
    torch.testing.assert_close(got[valid_rows], expected[valid_rows], atol=1e-5, rtol=1e-5)
