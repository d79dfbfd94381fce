"""One harness for every AFT variant (and a hybrid): cached decoding, padding, generation, persistence, training."""

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM, GenerationConfig, TextStreamer

from modeling_aft import AFTConfig, AFTForCausalLM, AFTForImageClassification, AFTModel

VOCAB = 50
LM_VARIANTS = {
    "full": "full",
    "local": "local",
    "simple": "simple",
    "conv": "conv",
    "hybrid": ["full", "conv", "local", "simple"],
}
SHARED = Path(__file__).resolve().parents[2] / "shared"


def perturb_position_mixing(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh biases are ~0 (conv: exactly 0 via γ = β = 0), which would hide bias bugs: make them large."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "position_bias" in name or "conv_kernel" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.7)
    return model


def lm_config(variant, **overrides) -> AFTConfig:
    layers = len(variant) if isinstance(variant, list) else 2
    defaults = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, intermediate_size=64, aft_variant=variant,
        window_size=4, num_aft_heads=4, position_bias_rank=8, max_position_embeddings=48,
        # learned positions where the variant is tied to a length anyway; none where it runs at any length
        position_embedding_type="learned" if variant in ("full", "local") else "none",
        pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )
    return AFTConfig(**{**defaults, **overrides})


@pytest.fixture(params=list(LM_VARIANTS), scope="module")
def lm(request) -> AFTForCausalLM:
    torch.manual_seed(0)
    return perturb_position_mixing(AFTForCausalLM(lm_config(LM_VARIANTS[request.param]))).eval()


def random_ids(batch, length, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def greedy(model, ids, **kwargs):
    config = GenerationConfig(max_new_tokens=kwargs.pop("max_new_tokens", 8), do_sample=False, pad_token_id=0)
    return model.generate(ids, generation_config=config, return_dict_in_generate=True, output_logits=True, **kwargs)


# -- cached decoding ------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_cached_decode_matches_full_forward_at_every_step(lm):
    ids = random_ids(2, 20)
    reference = lm(ids, use_cache=False).logits  # (B, T, V)
    out = lm(ids[:, :6], use_cache=True)
    pieces, cache, seen = [out.logits], out.cache, 6
    for chunk in (3, 1, 1, 4, 1, 1, 1, 1, 1):  # multi-token continuations as well as single steps
        mask = torch.ones(2, seen + chunk, dtype=torch.long)
        out = lm(ids[:, seen:seen + chunk], cache=cache, attention_mask=mask, use_cache=True)
        pieces.append(out.logits)
        seen += chunk
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cache_state_is_used(lm):
    """A decode step that ignored its cache would still produce logits; they must differ from a cacheless step."""
    ids = random_ids(1, 10)
    out = lm(ids[:, :9], use_cache=True)
    with_cache = lm(ids[:, 9:], cache=out.cache, attention_mask=torch.ones(1, 10, dtype=torch.long)).logits
    without = lm(ids[:, 9:], use_cache=False).logits
    assert (with_cache - without).abs().max() > 1e-3


@torch.no_grad()
def test_left_padded_batch_matches_each_prompt_alone(lm):
    prompts = [random_ids(1, n, seed=n)[0] for n in (7, 3, 11)]
    ids, mask = left_pad(prompts)
    batched_logits = lm(ids, attention_mask=mask, use_cache=False).logits
    batched = greedy(lm, ids, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone_logits = lm(prompt[None], use_cache=False).logits[0]
        torch.testing.assert_close(batched_logits[row, -len(prompt):], alone_logits, atol=1e-5, rtol=1e-5)
        alone = greedy(lm, prompt[None])
        assert torch.equal(batched.sequences[row, ids.shape[1]:], alone.sequences[0, len(prompt):])
        for step_batched, step_alone in zip(batched.logits, alone.logits):
            torch.testing.assert_close(step_batched[row], step_alone[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_right_padding_does_not_change_real_tokens(lm):
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    padded = lm(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(padded[1, :6], lm(ids[1:, :6], use_cache=False).logits[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_beam_search_with_cache_equals_without(lm):
    ids = random_ids(2, 5)
    config = GenerationConfig(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, early_stopping=False)
    cached = lm.generate(ids, generation_config=config, use_cache=True, output_scores=True,
                         return_dict_in_generate=True)
    uncached = lm.generate(ids, generation_config=config, use_cache=False, output_scores=True,
                           return_dict_in_generate=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sampling_with_cache_equals_without(lm):
    ids = random_ids(2, 4)
    config = GenerationConfig(max_new_tokens=8, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, pad_token_id=0)
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        samples.append(lm.generate(ids, generation_config=config, use_cache=use_cache))
    assert torch.equal(*samples)


@torch.no_grad()
def test_generation_continues_from_returned_cache(lm):
    ids = random_ids(2, 5)
    first = greedy(lm, ids, max_new_tokens=4)
    continued = greedy(lm, first.sequences, cache=first.cache, max_new_tokens=5,
                       attention_mask=torch.ones_like(first.sequences))
    uninterrupted = greedy(lm, ids, max_new_tokens=9)
    assert torch.equal(continued.sequences, uninterrupted.sequences)
    for got, expected in zip(continued.logits, uninterrupted.logits[4:]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _assisted_decoding_can_crop(model) -> bool:
    """transformers < 5.25 cannot roll a linear-attention layer back, so it refuses assisted decoding for them."""
    return model.config.layer_types == ["full_attention"] * len(model.config.layer_types) or hasattr(
        transformers.cache_utils.LinearAttentionLayer, "get_seq_length"
    )


@pytest.mark.parametrize("drafts", ["prompt_lookup", "assistant_model"])
@torch.no_grad()
def test_assisted_decoding_equals_plain_greedy(lm, drafts, monkeypatch):
    """Draft tokens are verified in one forward and the rejected ones cropped off the cache again: the logits of
    every token must still equal plain greedy decoding (tokens alone could match with a wrongly restored state)."""
    crops = []
    original_crop = transformers.DynamicCache.crop
    monkeypatch.setattr(transformers.DynamicCache, "crop", lambda cache, n: (crops.append(n), original_crop(cache, n))[1])
    ids = random_ids(1, 6).repeat(1, 3)  # repeated n-grams give prompt lookup something to propose
    if drafts == "prompt_lookup":
        kwargs = dict(prompt_lookup_num_tokens=3)
    else:  # lm with its vocabulary permuted: every draft it makes is wrong, so every verification rolls back
        assistant = copy.deepcopy(lm)
        assistant.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.roll(1, dims=0))
        kwargs = dict(assistant_model=assistant)
    if not _assisted_decoding_can_crop(lm):
        with pytest.raises(ValueError, match="cropped"):
            greedy(lm, ids, max_new_tokens=12, **kwargs)
        return
    assisted = greedy(lm, ids, max_new_tokens=12, **kwargs)
    plain = greedy(lm, ids, max_new_tokens=12)
    assert torch.equal(assisted.sequences, plain.sequences)
    assert len(assisted.logits) == len(plain.logits)
    for got, expected in zip(assisted.logits, plain.logits):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if drafts == "assistant_model":
        assert any(n < 0 for n in crops), f"no draft was rejected (crops: {crops}): the rollback went untested"


class _ByteDecoder:
    def decode(self, ids, **kwargs):
        return "".join(chr(65 + int(i) % 26) for i in ids)


@torch.no_grad()
def test_text_streamer_receives_generated_tokens(capsys):
    model = AFTForCausalLM(lm_config("conv")).eval()
    out = model.generate(random_ids(1, 3), max_new_tokens=5, do_sample=False, pad_token_id=0,
                         streamer=TextStreamer(_ByteDecoder(), skip_prompt=True))
    assert capsys.readouterr().out.strip() == _ByteDecoder().decode(out[0, 3:])


# -- model surface --------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_outputs_tuple_hidden_states_and_inputs_embeds(lm):
    ids = random_ids(2, 6)
    out = lm(ids, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == lm.config.num_hidden_layers + 1
    as_tuple = lm(ids, return_dict=False, use_cache=False)
    torch.testing.assert_close(as_tuple[0], out.logits)
    from_embeds = lm(inputs_embeds=lm.get_input_embeddings()(ids), use_cache=False).logits
    torch.testing.assert_close(from_embeds, out.logits)


def test_loss_and_tied_embeddings(lm):
    ids = random_ids(2, 8)
    out = lm(ids, labels=ids, use_cache=False)
    logits = out.logits[:, :-1].reshape(-1, VOCAB)
    expected = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    torch.manual_seed(0)
    model = perturb_position_mixing(AFTForCausalLM(lm_config(LM_VARIANTS["hybrid"]))).train()
    ids = random_ids(2, 12)

    def loss_and_grads(m):
        m.zero_grad()
        loss = m(ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = loss_and_grads(model)
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    again = loss_and_grads(checkpointed)
    torch.testing.assert_close(again[0], plain[0])
    assert again[1].keys() == plain[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(again[1][name], plain[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("variant", ["simple", "conv"])
@torch.no_grad()
def test_unbounded_variants_run_past_the_configured_length(variant):
    model = AFTForCausalLM(lm_config(variant, max_position_embeddings=32)).eval()
    logits = model(random_ids(1, 4 * 32), use_cache=False).logits
    assert logits.shape == (1, 128, VOCAB) and torch.isfinite(logits).all()


@pytest.mark.parametrize("variant", ["full", "local"])
def test_prompt_longer_than_learned_positions_is_a_clear_error(variant):
    model = AFTForCausalLM(lm_config(variant, max_position_embeddings=16)).eval()
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model.generate(random_ids(1, 20), max_new_tokens=2, pad_token_id=0)


# -- persistence and Auto classes -----------------------------------------------------------------------------------
def test_save_load_round_trip_is_bit_exact(lm, tmp_path):
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    for module in ("modeling_aft.py", "configuration_aft.py", "aft_ops.py", "aft_recurrent.py"):
        assert (tmp_path / module).exists(), f"remote code file {module} not saved"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is AFTForCausalLM
    expected = lm.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    ids = random_ids(1, 7)
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, lm(ids, use_cache=False).logits)


def test_remote_code_loads_in_a_process_without_the_package(tmp_path):
    from isolated import run_isolated

    torch.manual_seed(0)
    model = perturb_position_mixing(AFTForCausalLM(lm_config(LM_VARIANTS["hybrid"]))).eval()
    model.save_pretrained(tmp_path / "lm")
    ids = random_ids(1, 6)
    expected = greedy(model, ids).sequences[0].tolist()
    printed = run_isolated(
        "import torch, json\n"
        "from transformers import AutoModelForCausalLM, GenerationConfig\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'lm')!r}, trust_remote_code=True).eval()\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        f"ids = torch.tensor([{ids[0].tolist()}])\n"
        "cfg = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0)\n"
        "print(json.dumps(m.generate(ids, generation_config=cfg)[0].tolist()))\n"
    )
    assert json.loads(printed.strip().splitlines()[-1]) == expected


# -- image classifier -----------------------------------------------------------------------------------------------
def image_config(variant="conv", **overrides) -> AFTConfig:
    defaults = dict(
        vocab_size=None, image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
        intermediate_size=64, aft_variant=variant, window_size=3, num_aft_heads=4, position_bias_rank=8,
        num_labels=3,
    )
    return AFTConfig(**{**defaults, **overrides})


@pytest.mark.parametrize("variant", ["conv", "full", "local", "simple"])
def test_image_classifier_forward_loss_and_batch_independence(variant):
    torch.manual_seed(0)
    model = perturb_position_mixing(AFTForImageClassification(image_config(variant))).eval()
    pixels = torch.rand(3, 1, 16, 16)
    labels = torch.tensor([0, 2, 1])
    out = model(pixel_values=pixels, labels=labels, output_hidden_states=True)
    assert out.logits.shape == (3, 3) and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    assert out.hidden_states[-1].shape == (3, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels[1:2]).logits, out.logits[1:2], atol=1e-5, rtol=1e-5)


def test_image_sizes_conv_accepts_any_full_refuses():
    conv = AFTForImageClassification(image_config("conv")).eval()
    assert conv(pixel_values=torch.rand(2, 1, 24, 20)).logits.shape == (2, 3)
    full = AFTForImageClassification(image_config("full")).eval()
    with pytest.raises(ValueError, match="16x16 images only"):
        full(pixel_values=torch.rand(2, 1, 24, 20))


def test_fresh_conv_layer_is_aft_simple():
    """γ = β = 0 at init (paper eq. 8): the conv kernel is exactly 0, so AFT-conv computes AFT-simple."""
    torch.manual_seed(0)
    conv = AFTForCausalLM(lm_config("conv")).eval()
    simple = AFTForCausalLM(lm_config("simple")).eval()
    state = {k: v for k, v in conv.state_dict().items() if "conv_kernel" not in k and "k_proj" not in k}
    simple.load_state_dict(state, strict=False)
    for conv_layer, simple_layer in zip(conv.model.layers, simple.model.layers):
        # give the simple layer a K whose per-feature channels repeat the conv layer's per-head channels
        simple_layer.aft.k_proj.weight.data = conv_layer.aft.k_proj.weight.data.repeat_interleave(8, dim=0)
        simple_layer.aft.k_proj.bias.data = conv_layer.aft.k_proj.bias.data.repeat_interleave(8, dim=0)
    ids = random_ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(conv(ids).logits, simple(ids).logits, atol=1e-5, rtol=1e-5)


def test_auto_model_loads_both_kinds_of_checkpoint(tmp_path):
    AFTForImageClassification(image_config()).save_pretrained(tmp_path / "image")
    AFTForCausalLM(lm_config("conv")).save_pretrained(tmp_path / "lm")
    image_trunk = AutoModel.from_pretrained(tmp_path / "image")
    text_trunk = AutoModel.from_pretrained(tmp_path / "lm")
    assert type(image_trunk) is AFTModel and type(text_trunk) is AFTModel
    assert image_trunk(pixel_values=torch.rand(1, 1, 16, 16)).last_hidden_state.shape == (1, 16, 32)
    assert text_trunk(random_ids(1, 5)).last_hidden_state.shape == (1, 5, 32)


# -- Trainer on real data -------------------------------------------------------------------------------------------
def _train(model, dataset, tmp_path, steps, lr):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=16, learning_rate=lr,
        report_to=[], use_cpu=True, logging_steps=5, save_strategy="no", seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses


@pytest.mark.skipif(not (SHARED / "data" / "enwik6.txt").exists(), reason="../shared/data/enwik6.txt not present")
def test_trainer_fine_tunes_the_lm_on_enwik6(tmp_path):
    data = torch.frombuffer(bytearray((SHARED / "data" / "enwik6.txt").read_bytes()[:200_000]), dtype=torch.uint8)
    blocks = data[: (len(data) // 64) * 64].long().view(-1, 64)
    dataset = [{"input_ids": row, "labels": row} for row in blocks]
    torch.manual_seed(0)
    model = AFTForCausalLM(lm_config("conv", vocab_size=256, max_position_embeddings=64))
    losses = _train(model, dataset, tmp_path, steps=50, lr=3e-3)
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.skipif(not (SHARED / "data" / "mnist_5k.csv.gz").exists(), reason="../shared MNIST-5k not present")
def test_trainer_fine_tunes_the_image_classifier_on_mnist(tmp_path):
    import gzip

    import numpy as np

    rows = np.loadtxt(gzip.open(SHARED / "data" / "mnist_5k.csv.gz"), delimiter=",", dtype=np.float32)
    rows = rows[np.random.default_rng(0).permutation(len(rows))[:1200]]
    pixels = torch.from_numpy(rows[:, :784] / 255.0).view(-1, 1, 28, 28)
    labels = torch.from_numpy(rows[:, 784]).long()
    dataset = [{"pixel_values": p, "labels": y} for p, y in zip(pixels[:1000], labels[:1000])]
    torch.manual_seed(0)
    config = image_config(image_size=28, patch_size=7, hidden_size=64, num_labels=10, position_embedding_type="learned")
    model = AFTForImageClassification(config)
    losses = _train(model, dataset, tmp_path, steps=240, lr=3e-3)  # ~4 epochs of 1000 images
    assert losses[-1] < losses[0] * 0.8, losses
    with torch.no_grad():
        accuracy = (model.eval()(pixel_values=pixels[1000:]).logits.argmax(-1) == labels[1000:]).float().mean()
    assert accuracy > 0.4, accuracy  # chance is 0.1; a 2×64 model after 4 short epochs, not a converged one
