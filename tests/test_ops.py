"""AFT operators vs. the naive float64 references (tests/aft_reference.py).

One harness (`_check`) compares forward and all input gradients; the tests parametrize it over
operators, causal / non-causal, masks, lengths and adversarial inputs. Block sizes are lowered
(`small_blocks`) so that short sequences already cross several segments, chunks and key blocks.
These tests cover the eager scans: the fused CPU kernels that float32 AFT-full and causal float32 AFT-simple / AFT-local /
AFT-conv calls take when they can be compiled are switched off here and tested against the same references in
tests/test_kernels.py.
"""

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import aft_reference as ref
from modeling_aft import aft_ops as ops

B, D, HEADS = 3, 8, 2
DEFAULT_BLOCKS = {n: getattr(ops, n) for n in ("SEGMENT_SIZE", "CHUNK_SIZE", "FULL_BLOCK_SIZE")}


@pytest.fixture(autouse=True)
def eager_scans(monkeypatch):
    monkeypatch.setattr(ops, "fused_causal_simple", lambda *args: None)
    monkeypatch.setattr(ops, "fused_causal_conv1d", lambda *args: None)
    monkeypatch.setattr(ops, "fused_causal_local", lambda *args: None)
    monkeypatch.setattr(ops, "fused_full", lambda *args: None)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(ops, "SEGMENT_SIZE", 8)
    monkeypatch.setattr(ops, "CHUNK_SIZE", 4)
    monkeypatch.setattr(ops, "FULL_BLOCK_SIZE", 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation (and stalls on a busy box)
    yield
    torch.set_num_threads(threads)


@dataclass
class Case:
    fast: Callable
    ref: Callable
    make: Callable  # (T, gen) -> (tensors, extra positional args); tensors = q, k, v, bias/kernel?
    causal: tuple = (True, False)
    image: bool = False  # conv2d: T is (H, W)


def _qkv(T, gen, k_dim=D):
    shape = T if isinstance(T, tuple) else (T,)
    return [torch.randn(B, *shape, d, generator=gen, dtype=torch.float64) for d in (D, k_dim, D)]


def _bias(T, gen, heads=0, extra=0):
    shape = ((heads,) if heads else ()) + (T + extra, T + extra)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _kernel(gen, *shape):
    return torch.randn(HEADS, *shape, generator=gen, dtype=torch.float64)


CASES = {
    "full": Case(ops.aft_full, ref.ref_aft_full, lambda T, g: (_qkv(T, g) + [_bias(T, g, extra=3)], ())),
    "full_heads": Case(ops.aft_full, ref.ref_aft_full, lambda T, g: (_qkv(T, g) + [_bias(T, g, HEADS)], ())),
    "local": Case(ops.aft_local, ref.ref_aft_local, lambda T, g: (_qkv(T, g) + [_bias(T, g, extra=2)], (5,))),
    "local_heads_w1": Case(ops.aft_local, ref.ref_aft_local, lambda T, g: (_qkv(T, g) + [_bias(T, g, HEADS)], (1,))),
    "local_wide": Case(ops.aft_local, ref.ref_aft_local, lambda T, g: (_qkv(T, g) + [_bias(T, g)], (64,))),
    "simple": Case(ops.aft_simple, ref.ref_aft_simple, lambda T, g: (_qkv(T, g), ())),
    "conv1d": Case(ops.aft_conv1d, ref.ref_aft_conv1d, lambda T, g: (_qkv(T, g, HEADS) + [_kernel(g, 5)], ())),
    "conv1d_even": Case(ops.aft_conv1d, ref.ref_aft_conv1d, lambda T, g: (_qkv(T, g, HEADS) + [_kernel(g, 4)], ()),
                        causal=(True,)),
    "conv2d": Case(ops.aft_conv2d, ref.ref_aft_conv2d, lambda T, g: (_qkv(T, g, HEADS) + [_kernel(g, 3, 3)], ()),
                   causal=(False,), image=True),
}
LENGTHS = {1: (1, 1), 5: (1, 5), 37: (6, 7)}  # sequence length -> image size for conv2d


def _params(lengths=(1, 5, 37)):
    return [pytest.param(name, causal, T, id=f"{name}-{'causal' if causal else 'bidir'}-T{T}")
            for name, case in CASES.items() for causal in case.causal for T in lengths]


def _inputs(name, T, seed):
    """(case, size, tensors, extra args) of operator `name` at sequence length T."""
    case = CASES[name]
    size = LENGTHS[T] if case.image else T
    tensors, extra = case.make(size, torch.Generator().manual_seed(seed))
    return case, size, tensors, extra


def _mixed_mask(T):
    """Row 0 left-padded, row 1 right-padded, row 2 without any real token."""
    shape = T if isinstance(T, tuple) else (T,)
    n = math.prod(shape)
    m = torch.ones(B, n, dtype=torch.bool)
    m[0, : n // 3] = False
    m[1, n - n // 2:] = False
    m[2] = False
    return m.view(B, *shape)


def _run(fn, case, tensors, extra, causal, key_mask, dtype):
    """fn(*inputs) with fresh leaf copies in dtype; returns (output, inputs)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    kwargs = {"key_mask": key_mask} if case.image else {"causal": causal, "key_mask": key_mask}
    return fn(*leaves[:3], *leaves[3:], *extra, **kwargs), leaves


def _check(name, causal, T, key_mask=None, tensors=None, extra=None, atol=1e-5, seed=0, grads=True):
    """Fast op in float32 against the float64 reference: forward and d/d(every input)."""
    case = CASES[name]
    size = LENGTHS.get(T, T) if case.image else T
    gen = torch.Generator().manual_seed(seed)
    if tensors is None:
        tensors, extra = case.make(size, gen)
    if key_mask == "mixed":
        key_mask = _mixed_mask(size)
    y, xs = _run(case.fast, case, tensors, extra, causal, key_mask, torch.float32)
    y_ref, xs_ref = _run(case.ref, case, tensors, extra, causal, key_mask, torch.float64)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=atol)
    if not grads:
        return y
    cot = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    g = torch.autograd.grad(y, xs, cot.float())
    g_ref = torch.autograd.grad(y_ref, xs_ref, cot)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert torch.isfinite(a).all(), f"non-finite gradient of input {i}"
        scale = 1 + b.abs().max().item()
        torch.testing.assert_close(a.double(), b, atol=atol * scale, rtol=atol, msg=lambda m: f"grad {i}: {m}")
    return y


@pytest.mark.parametrize("name, causal, T", _params())
@pytest.mark.parametrize("mask", [None, "mixed"])
def test_matches_reference(name, causal, T, mask):
    _check(name, causal, T, key_mask=mask)


@pytest.mark.parametrize("name, causal, T", _params(lengths=(37,)))
def test_exact_path_matches_reference(monkeypatch, name, causal, T):
    """Every row through the exact (per-row max) recompute, as if all had underflowed."""
    monkeypatch.setattr(ops, "EXACT_DEN_THRESHOLD", math.inf)
    _check(name, causal, T, key_mask="mixed")


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("name, causal, T", _params(lengths=(5,)))
def test_gradcheck(monkeypatch, name, causal, T, exact):
    if exact:
        monkeypatch.setattr(ops, "EXACT_DEN_THRESHOLD", math.inf)
    case, size, tensors, extra = _inputs(name, T, seed=1)
    mask = _mixed_mask(size)
    kwargs = {"key_mask": mask} if case.image else {"causal": causal, "key_mask": mask}
    leaves = [t.detach().requires_grad_() for t in tensors]
    fn = lambda *xs: case.fast(*xs, *extra, **kwargs)
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("name", ["full", "local", "simple", "conv1d"])
def test_default_block_sizes(monkeypatch, name):
    """The shipped block sizes (not the lowered test ones): several segments / row blocks, odd T."""
    for attr, value in DEFAULT_BLOCKS.items():
        monkeypatch.setattr(ops, attr, value)
    T = 800
    _, _, tensors, extra = _inputs(name, T, seed=9)
    tensors = [t[:1] for t in tensors[:3]] + tensors[3:]  # one batch row keeps the reference small
    _check(name, True, T, tensors=tensors, extra=extra)


def test_fully_masked_row_is_zero():
    mask = _mixed_mask(9)
    for name in ("full", "local", "simple", "conv1d"):
        _, _, tensors, extra = _inputs(name, 9, seed=2)
        for causal in (True, False):
            y, xs = _run(CASES[name].fast, CASES[name], tensors, extra, causal, mask, torch.float32)
            assert (y[2] == 0).all()
            if causal:  # left padding: rows before the first real token see nothing
                assert (y[0, : 9 // 3] == 0).all()
            y.sum().backward()
            assert all(torch.isfinite(x.grad).all() for x in xs)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if True in c.causal])
def test_causality(name):
    """Changing anything after position t0 (even to extreme values) leaves outputs <= t0 alone."""
    T, t0 = 37, 20
    _, _, tensors, extra = _inputs(name, T, seed=3)
    y0 = _run(CASES[name].fast, CASES[name], tensors, extra, True, None, torch.float32)[0]
    for poke in (1.0, 1e4, -1e4):
        changed = [t.clone() for t in tensors]
        for t in changed[:3]:
            t[:, t0 + 1:] += poke
        if name.startswith(("full", "local")):
            changed[3][..., t0 + 1:, :] += poke  # future bias rows too
        y1 = _run(CASES[name].fast, CASES[name], changed, extra, True, None, torch.float32)[0]
        torch.testing.assert_close(y1[:, : t0 + 1], y0[:, : t0 + 1], atol=1e-6, rtol=1e-6)


def _extreme_keys(pattern, T, k):
    k = k.clone()
    if pattern == "first_low":  # the first key far below all later ones: row 0 underflows under a block max
        k[:, 0], k[:, 1:] = 0.0, 1e4
    elif pattern == "first_high":
        k[:, 0], k[:, 1:] = 1e4, 0.0
    elif pattern == "ramp":  # every new key dominates all earlier ones
        k += 300.0 * torch.arange(T, dtype=k.dtype)[:, None]
    elif pattern == "half_low":
        k[:, : T // 2] = -1e4
    return k


@pytest.mark.parametrize("pattern", ["first_low", "first_high", "ramp", "half_low"])
@pytest.mark.parametrize("name, causal, T", _params(lengths=(37,)))
def test_extreme_keys(name, causal, T, pattern):
    case, size, tensors, extra = _inputs(name, T, seed=4)
    n = math.prod(size) if case.image else T
    tensors[1] = _extreme_keys(pattern, n, tensors[1].reshape(B, n, -1)).reshape(tensors[1].shape)
    _check(name, causal, T, tensors=tensors, extra=extra)


@pytest.mark.parametrize("bias", ["pm1e3", "neg1e3", "pos1e3", "neg5", "bigK_negw"])
@pytest.mark.parametrize("name, causal, T", [p for p in _params(lengths=(37,)) if not p.values[0].startswith("simple")])
def test_extreme_bias(name, causal, T, bias):
    """Huge / very negative biases: overflow of exp(w), underflow of exp(w) * exp(K), and the key with
    the largest K meeting a very negative w for its rows."""
    case, size, tensors, extra = _inputs(name, T, seed=5)
    gen = torch.Generator().manual_seed(5)
    w = tensors[3]
    values = {"pm1e3": 1e3 * torch.randn(w.shape, generator=gen, dtype=w.dtype), "neg1e3": torch.full_like(w, -1e3),
              "pos1e3": torch.full_like(w, 1e3), "neg5": torch.full_like(w, -5.0)}
    if bias == "bigK_negw":
        k = tensors[1].reshape(B, math.prod(size) if case.image else T, -1)
        k[:, 3] = 50.0
        tensors[1] = k.reshape(tensors[1].shape)
        w = w.clone()
        if name.startswith(("full", "local")):
            w[..., 3] = -1e3  # column of key 3
        else:
            w[:] = -1e3
    else:
        w = values[bias]
    tensors[3] = w
    _check(name, causal, T, tensors=tensors, extra=extra, atol=2e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("name, causal, T", _params(lengths=(37,)))
def test_autocast_half(name, causal, T, dtype, atol):
    """16-bit inputs under autocast: accumulate in fp32 inside, finite, close, returned in 16 bits."""
    case, size, tensors, extra = _inputs(name, T, seed=6)
    tensors[1] = tensors[1] + 30.0  # large keys: exp(K) alone would overflow fp16
    mask = _mixed_mask(size)
    with torch.autocast("cpu", dtype=dtype):
        y, xs = _run(case.fast, case, tensors, extra, causal, mask, dtype)
        y.float().sum().backward()
    y_ref = _run(case.ref, case, [t.to(dtype) for t in tensors], extra, causal, mask, torch.float64)[0]
    assert y.dtype == dtype
    assert all(torch.isfinite(x.grad.float()).all() for x in xs)
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=atol)


@pytest.mark.parametrize("causal", [True, False])
def test_full_with_shorter_queries(causal):
    """Cached decoding: q covers the last Lq of Lk positions (bias rows Lk - Lq ... Lk - 1)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = _qkv(19, gen)
    tensors = [q[:, -6:], k, v, _bias(19, gen, HEADS, extra=1)]
    _check("full_heads", causal, 19, key_mask=_mixed_mask(19), tensors=tensors, extra=())


def test_bias_gradient_is_banded():
    """aft_local only reads the band of pos_bias; the rest of its gradient is exactly zero."""
    q, k, v = (x.float() for x in _qkv(12, torch.Generator().manual_seed(8)))
    w = torch.randn(15, 15, requires_grad=True)
    ops.aft_local(q, k, v, w, 3, causal=True).sum().backward()
    t = torch.arange(15)
    in_band = ((t[:, None] - t[None, :]) >= 0) & ((t[:, None] - t[None, :]) < 3) & (t[:, None] < 12)
    assert (w.grad[~in_band] == 0).all() and (w.grad[in_band] != 0).all()


_q, _k1, _v = torch.zeros(1, 4, 6), torch.zeros(1, 4, 6), torch.zeros(1, 4, 6)
BAD_CALLS = {
    "bias_too_small": lambda: ops.aft_full(_q, _k1, _v, torch.zeros(3, 3)),
    "heads_not_dividing": lambda: ops.aft_full(_q, _k1, _v, torch.zeros(4, 4, 4)),
    "q_longer_than_k": lambda: ops.aft_full(torch.zeros(1, 5, 6), _k1, _v, torch.zeros(5, 5), causal=True),
    "bad_mask_shape": lambda: ops.aft_simple(_q, _k1, _v, key_mask=torch.ones(1, 5)),
    "qkv_dims": lambda: ops.aft_simple(_q[0], _k1, _v),
    "window_zero": lambda: ops.aft_local(_q, _k1, _v, torch.zeros(4, 4), 0),
    "local_bias_small": lambda: ops.aft_local(_q, _k1, _v, torch.zeros(2, 2), 2),
    "conv_even_centred": lambda: ops.aft_conv1d(_q, torch.zeros(1, 4, 2), _v, torch.zeros(2, 4), causal=False),
    "conv_heads_mismatch": lambda: ops.aft_conv1d(_q, torch.zeros(1, 4, 3), _v, torch.zeros(2, 3)),
    "conv_heads_not_dividing": lambda: ops.aft_conv1d(_q, torch.zeros(1, 4, 4), _v, torch.zeros(4, 3)),
    "conv2d_even": lambda: ops.aft_conv2d(torch.zeros(1, 2, 2, 6), torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 6),
                                          torch.zeros(2, 2, 2)),
    "conv2d_not_square": lambda: ops.aft_conv2d(torch.zeros(1, 2, 2, 6), torch.zeros(1, 2, 2, 2),
                                                torch.zeros(1, 2, 2, 6), torch.zeros(2, 3, 1)),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_shapes_raise(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["mild", "extreme"])  # extreme: rows take the exact path
@pytest.mark.parametrize("causal", [True, False])
def test_local_with_factorized_bias_equals_the_dense_bias(causal, scale):
    """aft_local(pos_bias=(u, v)) is aft_local(pos_bias=u vᵀ), in values and in the gradients of u and v."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = _qkv(23, gen)
    u, w = (torch.randn(26, 3, generator=gen, dtype=torch.float64) * math.sqrt(scale) for _ in range(2))
    mask = _mixed_mask(23)
    results = []
    for factorized in (True, False):
        inputs = [x.clone().requires_grad_() for x in (q, k, v, u, w)]
        bias = tuple(inputs[3:]) if factorized else inputs[3] @ inputs[4].T
        out = ops.aft_local(*inputs[:3], bias, 4, causal=causal, key_mask=mask)
        out.backward(torch.ones_like(out))
        results.append([out.detach()] + [x.grad for x in inputs])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-7)
