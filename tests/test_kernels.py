"""The fused CPU kernels for causal AFT-simple, AFT-conv and AFT-local and for AFT-full (modeling_aft/aft_kernels.py),
forward and backward, vs the float64 references and the eager paths, and when the operators use them."""

import importlib.util
from pathlib import Path

import pytest
import torch

import aft_reference as ref
from modeling_aft import aft_kernels, aft_ops


@pytest.fixture(scope="module")
def kernel():
    if not aft_kernels.fused_causal_simple_available():
        pytest.skip("the fused kernel could not be compiled here (needs a C++ compiler and ninja); "
                    "aft_simple then runs its eager scan, which tests/test_ops.py covers")
    return aft_kernels._module


class Spy:
    """Stands in for the compiled module and counts the calls that reach it: `calls` / `conv_calls` / `local_calls` /
    `full_calls` (forward of AFT-simple / AFT-conv / AFT-local / AFT-full), `backward_calls` / `conv_backward_calls` /
    `local_backward_calls` / `full_backward_calls`."""

    COUNTERS = {"causal_simple_forward": "calls", "causal_simple_backward": "backward_calls",
                "causal_conv1d_forward": "conv_calls", "causal_conv1d_backward": "conv_backward_calls",
                "causal_local_forward": "local_calls", "causal_local_backward": "local_backward_calls",
                "full_forward": "full_calls", "full_backward": "full_backward_calls"}

    def __init__(self, module):
        self.module = module
        for counter in self.COUNTERS.values():
            setattr(self, counter, 0)

    def __getattr__(self, name):
        function = getattr(self.module, name)
        counter = self.COUNTERS.get(name)
        if counter is None:  # a helper, not a kernel
            return function

        def counted(*args):
            setattr(self, counter, getattr(self, counter) + 1)
            return function(*args)
        return counted


@pytest.fixture
def spy(kernel, monkeypatch):
    spy = Spy(kernel)
    monkeypatch.setattr(aft_kernels, "_module", spy)
    return spy


FUSED_PATHS = ("fused_causal_simple", "fused_causal_conv1d", "fused_causal_local", "fused_full")


def _eager(q, k, v, key_mask=None, kernel=None, window=None, causal=None):
    """aft_simple (aft_conv1d with a `kernel`; aft_local with a pos_bias as `kernel` and a `window`; aft_full with a
    pos_bias as `kernel` and `causal` given) with the fused paths switched off."""
    originals = {name: getattr(aft_ops, name) for name in FUSED_PATHS}
    for name in FUSED_PATHS:
        setattr(aft_ops, name, lambda *args: None)
    try:
        if causal is not None:
            return aft_ops.aft_full(q, k, v, kernel, causal=causal, key_mask=key_mask)
        if kernel is None:
            return aft_ops.aft_simple(q, k, v, causal=True, key_mask=key_mask)
        if window is not None:
            return aft_ops.aft_local(q, k, v, kernel, window, causal=True, key_mask=key_mask)
        return aft_ops.aft_conv1d(q, k, v, kernel, causal=True, key_mask=key_mask)
    finally:
        for name, function in originals.items():
            setattr(aft_ops, name, function)


def _forward_and_grads(fn, tensors, cotangent):
    """fn(*leaves) and d(<fn, cotangent>)/d(leaves), on fresh leaf copies of tensors."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, cotangent.to(out.dtype))


def _assert_fused_training_matches(spy, tensors, key_mask=None, atol=1e-5, rtol=1e-5, against_eager=False,
                                   window=None, causal=None):
    """Forward and every gradient of the fused op (aft_simple for q, k, v; with a 4th tensor aft_conv1d and its kernel,
    or, given a window, aft_local and its pos_bias, or, given `causal`, aft_full and its pos_bias) equal the float64
    reference (or, for long inputs, the eager path) and went through the fused backward."""
    kind = ("simple" if len(tensors) == 3 else "full" if causal is not None else "conv" if window is None
            else "local")
    fused_op, reference_op = {
        "simple": (lambda q, k, v: aft_ops.aft_simple(q, k, v, causal=True, key_mask=key_mask),
                   lambda q, k, v: ref.ref_aft_simple(q, k, v, causal=True, key_mask=key_mask)),
        "conv": (lambda q, k, v, w: aft_ops.aft_conv1d(q, k, v, w, causal=True, key_mask=key_mask),
                 lambda q, k, v, w: ref.ref_aft_conv1d(q, k, v, w, causal=True, key_mask=key_mask)),
        "local": (lambda q, k, v, w: aft_ops.aft_local(q, k, v, w, window, causal=True, key_mask=key_mask),
                  lambda q, k, v, w: ref.ref_aft_local(q, k, v, w, window, causal=True, key_mask=key_mask)),
        "full": (lambda q, k, v, w: aft_ops.aft_full(q, k, v, w, causal=causal, key_mask=key_mask),
                 lambda q, k, v, w: ref.ref_aft_full(q, k, v, w, causal=causal, key_mask=key_mask)),
    }[kind]
    expected_op = ((lambda *xs: _eager(*xs[:3], key_mask, *xs[3:], window=window, causal=causal)) if against_eager
                   else reference_op)
    counter = {"simple": "backward_calls", "conv": "conv_backward_calls", "local": "local_backward_calls",
               "full": "full_backward_calls"}[kind]
    cotangent = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    before = getattr(spy, counter)
    out, grads = _forward_and_grads(fused_op, tensors, cotangent)
    assert getattr(spy, counter) == before + 1
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    expected = tensors if against_eager else [t.double() for t in tensors]
    out_ref, grads_ref = _forward_and_grads(expected_op, expected, cotangent)
    torch.testing.assert_close(out.to(out_ref.dtype), out_ref, atol=atol, rtol=rtol)
    for name, g, g_ref in zip("q k v kernel".split(), grads, grads_ref):
        torch.testing.assert_close(g.to(g_ref.dtype), g_ref, atol=atol, rtol=rtol, msg=lambda m: f"d{name}: {m}")


def _inputs(B, T, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, D, generator=gen) for _ in range(3)]


MASKS = {
    "none": None,
    "left_padding": torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]),
    "right_padding": torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1, 1]]),
    "fully_masked_row": torch.tensor([[0, 0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0, 1]]),
}


@pytest.mark.parametrize("mask", MASKS, ids=list(MASKS))
@pytest.mark.parametrize("D", [1, 19, 300])  # a single feature, not a vector multiple, many vectors
def test_fused_equals_reference_and_eager(spy, mask, D):
    q, k, v = _inputs(2, 7, D)
    key_mask = MASKS[mask]
    with torch.no_grad():
        fused = aft_ops.aft_simple(q, k, v, causal=True, key_mask=key_mask)
    assert spy.calls == 1
    expected = ref.ref_aft_simple(q.double(), k.double(), v.double(), causal=True, key_mask=key_mask)
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, _eager(q, k, v, key_mask), atol=1e-5, rtol=1e-5)
    if mask == "fully_masked_row":
        assert torch.equal(fused[0], torch.zeros_like(fused[0]))
    _assert_fused_training_matches(spy, [q, k, v], key_mask)


def test_fused_is_stable_for_extreme_inputs(spy):
    q, k, v = _inputs(1, 64, 16, seed=1)
    k[:, 0], k[:, 1:] = 0.0, 1e4  # the first key is exp(-1e4) below every later one: rows must not mix them
    k[:, 40:, :8] = -1e4
    q[:, ::2] *= 1e3  # saturated gates
    key_mask = torch.ones(1, 64, dtype=torch.long)
    key_mask[:, 20:30] = 0
    k[:, 20:30] = 3e4  # masked keys far above the others must not move the running maximum
    with torch.no_grad():
        fused = aft_ops.aft_simple(q, k, v, causal=True, key_mask=key_mask)
    assert spy.calls == 1 and torch.isfinite(fused).all()
    expected = ref.ref_aft_simple(q.double(), k.double(), v.double(), causal=True, key_mask=key_mask)
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=1e-5)
    _assert_fused_training_matches(spy, [q, k, v], key_mask)


def test_fused_long_sequence_matches_eager(spy):
    q, k, v = _inputs(2, 3000, 40, seed=2)
    k = k * 20  # a wide spread of keys: the running maximum moves often
    with torch.no_grad():
        fused = aft_ops.aft_simple(q, k, v, causal=True)
    assert spy.calls == 1
    torch.testing.assert_close(fused, _eager(q, k, v), atol=1e-5, rtol=1e-4)
    _assert_fused_training_matches(spy, [q, k, v], atol=1e-5, rtol=1e-4, against_eager=True)


def test_bf16_inputs_run_fused_in_float32(spy):
    q, k, v = (x.bfloat16() for x in _inputs(2, 9, 24, seed=3))
    with torch.no_grad():
        fused = aft_ops.aft_simple(q, k, v, causal=True)
    assert spy.calls == 1 and fused.dtype == torch.bfloat16
    expected = ref.ref_aft_simple(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(fused.double(), expected, atol=1e-2, rtol=1e-2)


def test_training_runs_fused_and_other_calls_stay_eager(spy):
    q, k, v = (x.requires_grad_() for x in _inputs(1, 5, 8, seed=4))
    aft_ops.aft_simple(q, k, v, causal=True).sum().backward()
    assert (spy.calls, spy.backward_calls) == (1, 1) and q.grad is not None
    with torch.no_grad():
        aft_ops.aft_simple(q, k, v, causal=False)
        aft_ops.aft_simple(q.double(), k.double(), v.double(), causal=True)
    assert (spy.calls, spy.backward_calls) == (1, 1)
    with torch.no_grad():  # inference: the forward alone, nothing kept for a backward
        aft_ops.aft_simple(q, k, v, causal=True)
    assert (spy.calls, spy.backward_calls) == (2, 1)


def test_fused_backward_keeps_only_the_inputs(kernel):
    """The fused Function saves q, k, v (and the mask) and nothing the size of an activation besides."""
    q, k, v = (x.requires_grad_() for x in _inputs(2, 50, 8, seed=8))
    out = aft_ops.aft_simple(q, k, v, causal=True, key_mask=torch.ones(2, 50))
    valid, *saved = out.grad_fn.saved_tensors
    assert len(saved) == 3 and all(a is b or torch.equal(a, b) for a, b in zip(saved, (q, k, v)))
    assert valid.dtype == torch.bool


def test_env_switch_disables_the_kernel(kernel, monkeypatch):
    monkeypatch.setenv("AFT_FUSED_KERNELS", "0")
    monkeypatch.setattr(aft_kernels, "_module", None)
    q, k, v = _inputs(1, 4, 4)
    with torch.no_grad():
        assert aft_kernels.fused_causal_simple(q, k, v) is None
    assert not aft_kernels.fused_causal_simple_available()


def _conv_inputs(B, T, heads, head_dim, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, v = (torch.randn(B, T, heads * head_dim, generator=gen) for _ in range(2))
    return q, torch.randn(B, T, heads, generator=gen) * 3, v, torch.randn(heads, size, generator=gen) * 3


@pytest.mark.parametrize("mask", MASKS, ids=list(MASKS))
@pytest.mark.parametrize("heads, head_dim, size", [(1, 1, 1), (2, 5, 3), (3, 4, 9)])  # size 9 > T: a clipped kernel
def test_fused_conv1d_equals_reference_and_eager(spy, mask, heads, head_dim, size):
    q, k, v, kernel = _conv_inputs(2, 7, heads, head_dim, size)
    key_mask = MASKS[mask]
    with torch.no_grad():
        fused = aft_ops.aft_conv1d(q, k, v, kernel, causal=True, key_mask=key_mask)
    assert spy.conv_calls == 1
    expected = ref.ref_aft_conv1d(q.double(), k.double(), v.double(), kernel.double(), causal=True, key_mask=key_mask)
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, _eager(q, k, v, key_mask, kernel), atol=1e-5, rtol=1e-5)
    _assert_fused_training_matches(spy, [q, k, v, kernel], key_mask)


def test_fused_conv1d_is_stable_for_extreme_inputs(spy):
    q, k, v, kernel = _conv_inputs(1, 80, 4, 3, 8, seed=5)
    k[:, 0], k[:, 1:] = 0.0, 1e4
    k[:, 50:, :2] = -1e4
    kernel[0], kernel[1, ::2] = -1e3, 1e3  # the largest key meets a very negative bias, and the reverse
    key_mask = torch.ones(1, 80, dtype=torch.long)
    key_mask[:, 30:45] = 0
    k[:, 30:45] = 3e4
    with torch.no_grad():
        fused = aft_ops.aft_conv1d(q, k, v, kernel, causal=True, key_mask=key_mask)
    assert spy.conv_calls == 1 and torch.isfinite(fused).all()
    expected = ref.ref_aft_conv1d(q.double(), k.double(), v.double(), kernel.double(), causal=True, key_mask=key_mask)
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=1e-5)
    _assert_fused_training_matches(spy, [q, k, v, kernel], key_mask)


def test_fused_conv1d_long_sequence_matches_eager(spy):
    q, k, v, kernel = _conv_inputs(2, 2000, 4, 16, 32, seed=6)
    with torch.no_grad():
        fused = aft_ops.aft_conv1d(q, k, v, kernel, causal=True)
    assert spy.conv_calls == 1
    torch.testing.assert_close(fused, _eager(q, k, v, kernel=kernel), atol=1e-5, rtol=1e-4)
    _assert_fused_training_matches(spy, [q, k, v, kernel], atol=1e-5, rtol=1e-4, against_eager=True)


def test_conv1d_training_runs_fused_and_non_causal_stays_eager(spy):
    q, k, v, kernel = (x.requires_grad_() for x in _conv_inputs(1, 6, 2, 2, 3, seed=7))
    aft_ops.aft_conv1d(q, k, v, kernel, causal=True).sum().backward()
    assert (spy.conv_calls, spy.conv_backward_calls) == (1, 1) and kernel.grad is not None
    with torch.no_grad():
        aft_ops.aft_conv1d(q, k, v, kernel, causal=False)
    assert (spy.conv_calls, spy.conv_backward_calls) == (1, 1)


def _on_one_thread_and_on(threads, fn, tensors, cotangent):
    """_forward_and_grads of fn with 1 torch thread, then with `threads`."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _forward_and_grads(fn, tensors, cotangent)
        torch.set_num_threads(threads)
        return one, _forward_and_grads(fn, tensors, cotangent)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("op", ["simple", "conv", "local"])
@pytest.mark.parametrize("threads", [3, 8])
def test_fused_row_splits_agree_bitwise(spy, op, threads):
    """A batch smaller than the thread count splits every row into feature slices (AFT-simple, AFT-local) or head
    groups (AFT-conv), one job each; each feature's arithmetic is the same either way, so forward and gradients must not
    change by a single bit (AFT-local's bias gradient, a sum over features, only by its order of summation)."""
    key_mask = torch.ones(1, 50)
    key_mask[0, :5] = 0
    if op == "simple":
        tensors = _inputs(1, 50, 300, seed=11)
        fused = lambda q, k, v: aft_ops.aft_simple(q, k, v, causal=True, key_mask=key_mask)
        reference = lambda q, k, v: ref.ref_aft_simple(q, k, v, causal=True, key_mask=key_mask)
    elif op == "conv":
        tensors = list(_conv_inputs(1, 50, 6, 5, 7, seed=11))
        fused = lambda q, k, v, w: aft_ops.aft_conv1d(q, k, v, w, causal=True, key_mask=key_mask)
        reference = lambda q, k, v, w: ref.ref_aft_conv1d(q, k, v, w, causal=True, key_mask=key_mask)
    else:
        tensors = [*_inputs(1, 50, 300, seed=11), _bias(50, 3, seed=11)]  # 3 bias groups across the slices
        fused = lambda q, k, v, w: aft_ops.aft_local(q, k, v, w, 8, causal=True, key_mask=key_mask)
        reference = lambda q, k, v, w: ref.ref_aft_local(q, k, v, w, 8, causal=True, key_mask=key_mask)
    cotangent = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(12))
    whole_rows, split = _on_one_thread_and_on(threads, fused, tensors, cotangent)
    assert getattr(spy, {"simple": "backward_calls", "conv": "conv_backward_calls",
                         "local": "local_backward_calls"}[op]) == 2
    outputs_and_grads = zip([whole_rows[0], *whole_rows[1]], [split[0], *split[1]])
    for i, (a, b) in enumerate(outputs_and_grads):
        if op == "local" and i == 4:  # the bias gradient sums over features: per slice first, then the slices
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(a, b)
    torch.testing.assert_close(split[0].double(), reference(*(t.double() for t in tensors)), atol=1e-5, rtol=1e-5)


def _bias(T, groups=None, seed=0, scale=2.0):
    """A random pos_bias: (T, T), or (groups, T, T)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (T, T) if groups is None else (groups, T, T)
    return torch.randn(shape, generator=gen) * scale


@pytest.mark.parametrize("mask", MASKS, ids=list(MASKS))
@pytest.mark.parametrize("window, groups", [(1, None), (3, 2), (9, None)])  # window 9 > T: every key in the band
def test_fused_local_equals_reference_and_eager(spy, mask, window, groups):
    q, k, v = _inputs(2, 7, 6, seed=13)
    pos_bias = _bias(7, groups, seed=13)
    key_mask = MASKS[mask]
    with torch.no_grad():
        fused = aft_ops.aft_local(q, k, v, pos_bias, window, causal=True, key_mask=key_mask)
    assert spy.local_calls == 1
    expected = ref.ref_aft_local(q.double(), k.double(), v.double(), pos_bias.double(), window, causal=True,
                                 key_mask=key_mask)
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, _eager(q, k, v, key_mask, pos_bias, window), atol=1e-5, rtol=1e-5)
    if mask == "fully_masked_row":
        assert torch.equal(fused[0], torch.zeros_like(fused[0]))
    _assert_fused_training_matches(spy, [q, k, v, pos_bias], key_mask, window=window)


def test_fused_local_factorized_bias_and_what_stays_eager(spy):
    """The model's form w = u vᵀ: the kernel reads u and v (no band is built) and returns their gradients. Non-causal
    and float64 calls keep the eager path."""
    q, k, v = _inputs(2, 40, 8, seed=14)
    gen = torch.Generator().manual_seed(14)
    u, w = torch.randn(40, 4, generator=gen), torch.randn(40, 4, generator=gen)
    key_mask = torch.ones(2, 40)
    key_mask[1, :6] = 0
    cotangent = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    fused = lambda q, k, v, u, w: aft_ops.aft_local(q, k, v, (u, w), 8, causal=True, key_mask=key_mask)
    out, grads = _forward_and_grads(fused, [q, k, v, u, w], cotangent)
    assert (spy.local_calls, spy.local_backward_calls) == (1, 1)
    reference = lambda q, k, v, u, w: ref.ref_aft_local(q, k, v, u @ w.T, 8, causal=True, key_mask=key_mask)
    out_ref, grads_ref = _forward_and_grads(reference, [t.double() for t in (q, k, v, u, w)], cotangent)
    torch.testing.assert_close(out.double(), out_ref, atol=1e-5, rtol=1e-5)
    for name, g, g_ref in zip("q k v u w".split(), grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")
    rank0 = torch.zeros(40, 0)  # w = 0: AFT-simple
    torch.testing.assert_close(aft_ops.aft_local(q, k, v, (rank0, rank0), 8, causal=True, key_mask=key_mask),
                               aft_ops.aft_simple(q, k, v, causal=True, key_mask=key_mask), atol=1e-6, rtol=1e-5)
    assert spy.local_calls == 2
    with torch.no_grad():
        aft_ops.aft_local(q, k, v, (u, w), 8, causal=False)
        aft_ops.aft_local(q.double(), k.double(), v.double(), (u.double(), w.double()), 8, causal=True)
    assert (spy.local_calls, spy.local_backward_calls) == (2, 1)


def test_fused_local_reads_a_larger_bias_and_skips_a_frozen_ones_gradient(spy):
    """A (G, T', T') bias with T' > T is read in place (its top-left corner); a bias without requires_grad gets no
    gradient, and q, k, v's gradients are those of the trainable case."""
    q, k, v = _inputs(2, 50, 6, seed=17)
    pos_bias = _bias(57, groups=3, seed=17)
    key_mask = torch.ones(2, 50)
    key_mask[0, 40:] = 0
    _assert_fused_training_matches(spy, [q, k, v, pos_bias], key_mask, window=5)
    cotangent = torch.randn(q.shape, generator=torch.Generator().manual_seed(17))
    local = lambda q, k, v, w: aft_ops.aft_local(q, k, v, w, 5, causal=True, key_mask=key_mask)
    _, trained = _forward_and_grads(local, [q, k, v, pos_bias], cotangent)
    calls = spy.local_backward_calls
    _, frozen = _forward_and_grads(lambda q, k, v: local(q, k, v, pos_bias), [q, k, v], cotangent)
    assert spy.local_backward_calls == calls + 1
    for g_frozen, g_trained in zip(frozen, trained[:3]):
        assert torch.equal(g_frozen, g_trained)


def test_fused_local_is_stable_for_extreme_inputs(spy):
    q, k, v = _inputs(1, 64, 16, seed=15)
    pos_bias = _bias(64, seed=15)
    k[:, 0], k[:, 1:] = 0.0, 1e4  # the first key is exp(-1e4) below every later one
    k[:, 40:, :8] = -1e4
    q[:, ::2] *= 1e3
    pos_bias[10:20] *= 1e3  # biases of +-2000 beside 0 outside the band
    # rows with no prefix yet whose every key meets a bias near -1000 (3 apart from key to key): exp(bias) underflows,
    # the single-shift fallback must keep the differences
    pos_bias[2:6] = -1e3 + 3 * torch.arange(64.0)
    key_mask = torch.ones(1, 64, dtype=torch.long)
    key_mask[:, 20:30] = 0
    k[:, 20:30] = 3e4  # masked keys far above the others must not move any maximum
    with torch.no_grad():
        fused = aft_ops.aft_local(q, k, v, pos_bias, 8, causal=True, key_mask=key_mask)
    assert spy.local_calls == 1 and torch.isfinite(fused).all()
    expected = ref.ref_aft_local(q.double(), k.double(), v.double(), pos_bias.double(), 8, causal=True,
                                 key_mask=key_mask)
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=1e-5)
    _assert_fused_training_matches(spy, [q, k, v, pos_bias], key_mask, window=8)


@pytest.mark.parametrize("window", [32, 100])  # the backward replays chunks of max(32, window) rows
def test_fused_local_long_sequence_matches_reference(spy, window):
    q, k, v = _inputs(2, 700, 24, seed=16)
    k = k * 20  # a wide spread of keys: the running maximum moves often (the span weights' products of rho)
    pos_bias = _bias(700, seed=16)
    key_mask = torch.ones(2, 700)
    key_mask[1, 300:360] = 0
    with torch.no_grad():
        fused = aft_ops.aft_local(q, k, v, pos_bias, window, causal=True, key_mask=key_mask)
    assert spy.local_calls == 1
    torch.testing.assert_close(fused, _eager(q, k, v, key_mask, pos_bias, window), atol=1e-5, rtol=1e-4)
    # the gradients' float32 rounding grows with T in the eager scan as here (both ~1e-5 of dk at T=1500): against
    # the float64 reference, with the long-sequence tolerance of the other operators
    _assert_fused_training_matches(spy, [q, k, v, pos_bias], key_mask, atol=1e-5, rtol=1e-4, window=window)


def _peak_bytes(fn):
    """Peak bytes allocated and not yet freed while fn() runs: scripts/benchmark.py's peak_memory_mb (profiler
    allocation events), which the ops benchmark reports."""
    spec = importlib.util.spec_from_file_location("benchmark", Path(__file__).resolve().parents[1] / "scripts" /
                                                  "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark.peak_memory_mb(fn) * 2**20


@pytest.fixture
def small_full_tiles(monkeypatch):
    """AFT-full tiles of 2 rows x 3 keys x 4 features: 7 positions and 6 features already cross several of each."""
    monkeypatch.setattr(aft_kernels, "FULL_TILES", ((2, 3, 4),))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("mask", MASKS, ids=list(MASKS))
@pytest.mark.parametrize("groups", [None, 2])
def test_fused_full_equals_reference_and_eager(spy, small_full_tiles, causal, mask, groups):
    q, k, v = _inputs(2, 7, 6, seed=21)
    k = k * 3
    pos_bias = _bias(7, groups, seed=21)
    key_mask = MASKS[mask]
    with torch.no_grad():
        fused = aft_ops.aft_full(q, k, v, pos_bias, causal=causal, key_mask=key_mask)
    assert spy.full_calls == 1
    expected = ref.ref_aft_full(q.double(), k.double(), v.double(), pos_bias.double(), causal=causal,
                                key_mask=key_mask)
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, _eager(q, k, v, key_mask, pos_bias, causal=causal), atol=1e-5, rtol=1e-5)
    if mask == "fully_masked_row":
        assert torch.equal(fused[0], torch.zeros_like(fused[0]))
    _assert_fused_training_matches(spy, [q, k, v, pos_bias], key_mask, causal=causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_fused_full_shorter_queries_and_a_larger_bias(spy, small_full_tiles, causal):
    """Queries at the last Lq of Lk positions (cached decoding) read bias rows Lk - Lq + i of a (G, T', T') bias with
    T' > Lk."""
    gen = torch.Generator().manual_seed(22)
    q = torch.randn(2, 5, 6, generator=gen)
    k, v = (torch.randn(2, 11, 6, generator=gen) for _ in range(2))
    pos_bias = _bias(14, groups=3, seed=22)
    key_mask = torch.ones(2, 11)
    key_mask[0, :4] = 0
    _assert_fused_training_matches(spy, [q, k, v, pos_bias], key_mask, causal=causal)


def test_fused_full_is_stable_for_extreme_inputs(spy, small_full_tiles):
    """Keys 1e4 apart, masked keys far above the rest, saturated gates and biases of +-1e3: rows whose den underflows
    under the tile's shifts are flagged and redone by aft_ops' exact path; the rest must be exact as they are."""
    q, k, v = _inputs(1, 40, 8, seed=23)
    pos_bias = _bias(40, seed=23)
    k[:, 0], k[:, 1:] = 0.0, 1e4  # row 0 sees only a key 1e4 below the ones that come later in its tile
    k[:, 25:, :4] = -1e4
    q[:, ::2] *= 1e3
    pos_bias[10:20] *= 5e2  # biases of +-1000: the largest key meets a very negative bias
    key_mask = torch.ones(1, 40, dtype=torch.long)
    key_mask[:, 12:16] = 0
    k[:, 12:16] = 3e4  # masked keys far above the others must move no shift
    for causal in (True, False):
        with torch.no_grad():
            fused = aft_ops.aft_full(q, k, v, pos_bias, causal=causal, key_mask=key_mask)
        expected = ref.ref_aft_full(q.double(), k.double(), v.double(), pos_bias.double(), causal=causal,
                                    key_mask=key_mask)
        assert torch.isfinite(fused).all()
        torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=1e-5)
        _assert_fused_training_matches(spy, [q, k, v, pos_bias], key_mask, causal=causal)
    assert spy.full_calls == 4


def test_fused_full_long_sequence_matches_eager_with_default_tiles(spy):
    q, k, v = _inputs(1, 600, 64, seed=24)
    k = k * 10
    pos_bias = _bias(600, seed=24)
    key_mask = torch.ones(1, 600)
    key_mask[0, 200:260] = 0
    tile = aft_kernels._full_tile(aft_kernels._load(), 1, 600, 64, 1, training=True)
    assert tile[0] < 600 and tile[1] < 600  # several row and key blocks
    with torch.no_grad():
        fused = aft_ops.aft_full(q, k, v, pos_bias, causal=True, key_mask=key_mask)
    torch.testing.assert_close(fused, _eager(q, k, v, key_mask, pos_bias, causal=True), atol=1e-5, rtol=1e-4)
    _assert_fused_training_matches(spy, [q, k, v, pos_bias], key_mask, atol=1e-5, rtol=1e-4, against_eager=True,
                                   causal=True)


def test_fused_full_second_backward_and_frozen_bias(spy, small_full_tiles):
    """The backward turns the saved den into dq: a second backward through the same graph (retain_graph) recomputes
    den and gets the same gradients. A bias without requires_grad gets no gradient and changes no other one."""
    q, k, v = (x.requires_grad_() for x in _inputs(2, 9, 6, seed=25))
    pos_bias = _bias(9, seed=25).requires_grad_()
    y = aft_ops.aft_full(q, k, v, pos_bias, causal=True)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(25))
    first = torch.autograd.grad(y, [q, k, v, pos_bias], cotangent, retain_graph=True)
    second = torch.autograd.grad(y, [q, k, v, pos_bias], cotangent)
    assert spy.full_backward_calls == 2
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    frozen = torch.autograd.grad(aft_ops.aft_full(q, k, v, pos_bias.detach(), causal=True), [q, k, v], cotangent)
    for a, b in zip(frozen, first[:3]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [3, 8])
def test_fused_full_threads_agree(spy, small_full_tiles, threads):
    """Forward jobs own row blocks, backward jobs key blocks, each with its own workspace: more threads than jobs or
    fewer must give the same result (up to BLAS's order of summation)."""
    tensors = [*_inputs(2, 30, 12, seed=26), _bias(30, groups=2, seed=26)]
    key_mask = torch.ones(2, 30)
    key_mask[1, :7] = 0
    full = lambda q, k, v, w: aft_ops.aft_full(q, k, v, w, causal=True, key_mask=key_mask)
    cotangent = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(26))
    one, many = _on_one_thread_and_on(threads, full, tensors, cotangent)
    assert spy.full_backward_calls == 2
    for a, b in zip([one[0], *one[1]], [many[0], *many[1]]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_fused_full_holds_four_activations_and_its_tiles(kernel):
    """A training step of the fused AFT-full holds y, den (which becomes dq), dk, dv, the bias gradient and its tiles,
    as SDPA holds y, dq, dk, dv: measured from the profiler's allocation events."""
    B, T, D = 1, 512, 64
    q, k, v = (x.requires_grad_() for x in _inputs(B, T, D, seed=27))
    pos_bias = _bias(T, seed=27).requires_grad_()
    cotangent = torch.randn(B, T, D)
    module = aft_kernels._load()
    tile = aft_kernels._full_tile(module, B, T, D, 1, training=True)
    peak = _peak_bytes(lambda: aft_ops.aft_full(q, k, v, pos_bias, causal=True).backward(cotangent))
    activation, bias_grad = 4 * B * T * D, 4 * T * T
    tiles = 4 * module.full_workspace(B, D, *tile, True) * torch.get_num_threads()
    row_state = 4 * (T + (T // tile[0] + 1) * B * D) + 64 * 1024  # row maxima, shifts, flags and small tensors
    assert peak <= 4 * activation + bias_grad + tiles + row_state
    assert q.grad is not None and pos_bias.grad is not None


def test_fused_full_covers_both_directions_and_float64_stays_eager(spy):
    q, k, v = _inputs(1, 6, 4, seed=28)
    pos_bias = _bias(6, seed=28)
    with torch.no_grad():
        aft_ops.aft_full(q, k, v, pos_bias, causal=True)
        aft_ops.aft_full(q, k, v, pos_bias, causal=False)
        assert spy.full_calls == 2
        aft_ops.aft_full(q.double(), k.double(), v.double(), pos_bias.double(), causal=True)
    assert spy.full_calls == 2


def test_fused_full_without_the_blas_symbol(kernel, small_full_tiles):
    """Where torch's library exports no sgemm_, the kernel multiplies its tiles with at::addmm: same results."""
    tensors = [*_inputs(2, 9, 6, seed=29), _bias(9, groups=3, seed=29)]
    full = lambda q, k, v, w: aft_ops.aft_full(q, k, v, w, causal=True)
    cotangent = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(29))
    with_blas = _forward_and_grads(full, tensors, cotangent)
    kernel.full_use_blas_symbol(False)
    try:
        with_aten = _forward_and_grads(full, tensors, cotangent)
    finally:
        kernel.full_use_blas_symbol(True)
    for a, b in zip([with_blas[0], *with_blas[1]], [with_aten[0], *with_aten[1]]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_fused_local_frozen_bias_allocates_no_bias_gradient(kernel):
    """A training step with a frozen dense (T, T) bias holds q, k, v's gradients and kernel scratch, nothing of T x T
    (a buffer of the bias's size would show up here: T x T = 32x the activations)."""
    B, T, D = 1, 512, 16
    q, k, v = (x.requires_grad_() for x in _inputs(B, T, D, seed=30))
    pos_bias = _bias(T, seed=30)
    peak = _peak_bytes(lambda: aft_ops.aft_local(q, k, v, pos_bias, 8, causal=True).backward(torch.ones(B, T, D)))
    assert peak < 4 * T * T


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_fused_full_under_autocast(spy, small_full_tiles, dtype, atol):
    """16-bit inputs under autocast run the float32 kernel: finite, close to the reference, returned in 16 bits."""
    q, k, v = (x.to(dtype).requires_grad_() for x in _inputs(2, 9, 6, seed=31))
    k.data += 30.0  # exp(K) alone would overflow float16
    pos_bias = _bias(9, seed=31).to(dtype).requires_grad_()
    key_mask = torch.ones(2, 9)
    key_mask[0, :3] = 0
    with torch.autocast("cpu", dtype=dtype):
        y = aft_ops.aft_full(q, k, v, pos_bias, causal=True, key_mask=key_mask)
        y.float().sum().backward()
    assert (spy.full_calls, spy.full_backward_calls) == (1, 1) and y.dtype == dtype
    assert all(torch.isfinite(x.grad.float()).all() for x in (q, k, v, pos_bias))
    expected = ref.ref_aft_full(q.double(), k.double(), v.double(), pos_bias.double(), causal=True, key_mask=key_mask)
    torch.testing.assert_close(y.double(), expected, atol=atol, rtol=atol)
