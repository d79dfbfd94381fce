"""Numerical extremes at model level.

* Hidden states, keys or position biases scaled ×1e3 (far beyond where a naive exp overflows, even in float64): the
  float32 model stays finite, its gradients too, and its logits match the same weights run in float64.
* bf16 autocast training on enwik6 bytes: finite losses and gradients for 100 steps, and the end of the loss curve
  within 2% of the float32 run (same seed, same batches).
* 65,536 tokens through AFT-simple and AFT-conv (no positions): finite, the layer output at far positions equal to
  the paper's formula evaluated in float64, and causal (the first positions equal the same prefix run alone).
"""

from pathlib import Path

import pytest
import torch

from modeling_aft import AFTConfig, AFTForCausalLM, AFTForImageClassification
# Shared helpers; one_thread is an autouse fixture, so importing it applies it here too.
from test_reliability import HYBRID, VARIANTS, one_thread, randomize_, variant_id  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
ENWIK6 = ROOT.parent / "shared" / "data" / "enwik6.txt"
SCALE = 1e3


def tiny_config(head, variant, **overrides) -> AFTConfig:
    kwargs = dict(hidden_size=16, num_hidden_layers=len(variant) if isinstance(variant, list) else 2,
                  intermediate_size=32, num_aft_heads=4, window_size=3, position_bias_rank=4, aft_variant=variant,
                  position_embedding_type="learned", max_position_embeddings=32, eos_token_id=None)
    if head is AFTForImageClassification:
        kwargs.update(vocab_size=None, image_size=8, patch_size=2, num_channels=3, num_labels=4)
    else:
        kwargs.update(vocab_size=64)
    kwargs.update(overrides)
    return AFTConfig(**kwargs)


def scale_(model, mode: str):
    """Blow up one part of the computation by SCALE (in place)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if mode == "keys" and ".k_proj." in name:
                p.mul_(SCALE)  # K ~ 1e3: exp(K) overflows float32 and float64 unless max-subtracted
            elif mode == "bias" and ".position_bias." in name:
                p.mul_(SCALE ** 0.5)  # w = u vᵀ ~ 1e3
            elif mode == "bias" and (".gamma" in name or ".beta" in name):
                p.mul_(SCALE)  # AFT-conv kernel ~ 1e3
    return model


def extreme_inputs(model, mode: str, gen: torch.Generator) -> dict:
    """Random inputs with labels; mode 'hidden' feeds hidden states ~1e3 (inputs_embeds / pixel_values ×1e3)."""
    scale = SCALE if mode == "hidden" else 1.0
    if isinstance(model, AFTForImageClassification):
        return dict(pixel_values=torch.randn(3, 3, 8, 8, generator=gen) * scale,
                    labels=torch.randint(0, 4, (3,), generator=gen))
    ids = torch.randint(0, 64, (3, 12), generator=gen)
    embeds = model.get_input_embeddings()(ids).detach() * scale + torch.randn(3, 12, 16, generator=gen) * scale
    return dict(inputs_embeds=embeds, labels=ids, use_cache=False)


@pytest.mark.parametrize("mode", ["hidden", "keys", "bias"])
@pytest.mark.parametrize("head", [AFTForCausalLM, AFTForImageClassification], ids=["lm", "image"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_scaled_hidden_states_keys_and_biases_stay_finite(variant, head, mode):
    torch.manual_seed(0)
    model = scale_(randomize_(head(tiny_config(head, variant))), mode).train()
    inputs = extreme_inputs(model, mode, torch.Generator().manual_seed(1))
    out = model(**inputs)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and not [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert any(g.abs().sum() > 0 for g in grads.values())
    # The independent expectation: the same weights and inputs in float64.
    reference = model.to(torch.float64)
    with torch.no_grad():
        expected = reference(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                for k, v in inputs.items()}).logits
    torch.testing.assert_close(out.logits.detach().double(), expected, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# bf16 autocast training
# ---------------------------------------------------------------------------------------------------------------------
def train_bytes(data: torch.Tensor, autocast: bool, steps=100, batch=8, length=64):
    torch.manual_seed(0)
    config = AFTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_aft_heads=4,
                       window_size=8, position_bias_rank=16, aft_variant=HYBRID,
                       position_embedding_type="learned", max_position_embeddings=length, eos_token_id=None)
    model = AFTForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=gen)
        ids = torch.stack([data[s:s + length] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        assert torch.isfinite(loss) and torch.isfinite(grad_norm), (step, loss.item(), grad_norm.item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_bf16_autocast_training_tracks_fp32():
    if not ENWIK6.is_file():
        pytest.skip(f"enwik6 not found at {ENWIK6} (../shared/data/enwik6.txt relative to the repository root)")
    data = torch.frombuffer(bytearray(ENWIK6.read_bytes()[:200_000]), dtype=torch.uint8).long()
    fp32 = train_bytes(data, autocast=False)
    bf16 = train_bytes(data, autocast=True)
    tail32, tail16 = sum(fp32[-10:]) / 10, sum(bf16[-10:]) / 10
    # The comparison only means something if the model learned.
    assert tail32 < 0.75 * fp32[0], f"fp32 did not learn: {fp32[0]:.3f} → {tail32:.3f}"
    assert abs(tail16 - tail32) <= 0.02 * tail32, f"bf16 {tail16:.4f} vs fp32 {tail32:.4f} over the last 10 steps"


# ---------------------------------------------------------------------------------------------------------------------
# 65,536 tokens
# ---------------------------------------------------------------------------------------------------------------------
def aft_rows_reference(layer, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The AFT layer's output at `rows`, straight from the paper's formula in float64 (x: the layer's input (T, D)).

    y_t = σ(Q_t) ⊙ Σ_{t'≤t} exp(K_t' + w_{t-t'}) V_t' / Σ_{t'≤t} exp(K_t' + w_{t-t'}),
    K_t' broadcast from its head, w the causal AFT-conv kernel (w_j for 0 ≤ t-t' = j < s, 0 elsewhere) or 0 for
    AFT-simple.
    """
    linear = lambda proj, t: torch.nn.functional.linear(t, proj.weight.double(), proj.bias.double())
    x = x.double()
    q, k, v = linear(layer.q_proj, x), linear(layer.k_proj, x), linear(layer.v_proj, x)
    dim = v.shape[-1]
    k = k.repeat_interleave(dim // k.shape[-1], dim=-1)
    kernel = layer.conv_kernel().double() if layer.variant == "conv" else None  # (heads, s)
    out = []
    for t in rows:
        logits = k[: t + 1].clone()
        if kernel is not None:
            heads = kernel.shape[0]
            for j in range(min(kernel.shape[1], t + 1)):  # key t - j gets the kernel's offset-j bias
                logits[t - j] += kernel[:, j].repeat_interleave(dim // heads)
        weights = torch.softmax(logits, dim=0)
        out.append(torch.sigmoid(q[t]) * (weights * v[: t + 1]).sum(0))
    return linear(layer.o_proj, torch.stack(out))


@pytest.mark.parametrize("variant", ["simple", "conv"])
def test_65536_tokens_without_positions(variant):
    length, prefix, rows = 65_536, 512, [0, 1, 4095, 32768, 65534, 65535]
    config = AFTConfig(vocab_size=256, hidden_size=8, num_hidden_layers=1, intermediate_size=16, num_aft_heads=2,
                       window_size=5, aft_variant=variant, position_embedding_type="none", eos_token_id=None)
    torch.manual_seed(0)
    model = randomize_(AFTForCausalLM(config), std=0.5).eval()
    layer = model.model.layers[0].aft
    with torch.no_grad():
        layer.k_proj.weight.mul_(10)  # keys ~ ±10: the sums over 65k positions span many orders of magnitude
    seen = {}
    layer.register_forward_hook(lambda module, args, output: seen.update(x=args[0], y=output))
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        x, y = seen["x"][0], seen["y"][0]
        assert logits.shape == (1, length, 256) and torch.isfinite(logits).all()
        torch.testing.assert_close(y[rows].double(), aft_rows_reference(layer, x, rows), atol=1e-4, rtol=1e-4)
        alone = model(input_ids=ids[:, :prefix], use_cache=False).logits  # causal: a prefix alone gives the same
        torch.testing.assert_close(logits[:, :prefix], alone, atol=1e-5, rtol=0)
