"""Reliability: every failure mode is a tested behaviour.

Tables, one parametrized test each:
  * bad configurations (hand-written table + hypothesis-generated configs against an independent validity oracle);
  * bad inputs to the heads (out-of-range ids, wrong mask/label shapes, empty batches, wrong images, ...);
  * padding invariance (causal LM, left and right padding) and batch-composition invariance (image classifier);
  * persistence: save → load bit-exact, corrupted `model.safetensors`, config.json from a newer version;
  * an interrupted `Trainer` run resumed from its checkpoint ends with the uninterrupted run's weights;
  * two threads calling `generate` on one model object get what sequential calls get.

Every bad case must be a ValueError whose message names the offending field and value (no IndexError, no silent
broadcast). Models are tiny (width 16); the slowest test (Trainer, 3 short runs) takes a few seconds.
"""

import functools
import json
import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from modeling_aft import AFTConfig, AFTForCausalLM, AFTForImageClassification

AFT_VARIANTS = ("full", "local", "simple", "conv")
HYBRID = ["full", "local", "simple", "conv"]
VARIANTS = [*AFT_VARIANTS, HYBRID]
VOCAB = 32


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: one intra-op thread per test process (pytest -n 2 already fills both cores; two OpenMP threads per
    process on busy cores make these tests an order of magnitude slower, with identical results)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def variant_id(variant) -> str:
    return variant if isinstance(variant, str) else "hybrid"


def lm_kwargs(**overrides) -> dict:
    variant = overrides.get("aft_variant", "conv")
    kwargs = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=len(variant) if isinstance(variant, list) else 2,
                  intermediate_size=32, num_aft_heads=4, window_size=3, position_bias_rank=4,
                  max_position_embeddings=32, aft_variant="conv", eos_token_id=None, pad_token_id=None)
    kwargs.update(overrides)
    return kwargs


def image_kwargs(**overrides) -> dict:
    return lm_kwargs(**{"vocab_size": None, "image_size": 8, "patch_size": 4, "num_channels": 3, "num_labels": 5,
                        **overrides})


def randomize_(model, std: float = 0.3, seed: int = 0):
    """Non-trivial weights everywhere (AFT-conv's γ/β start at 0, the position bias near 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def build(head, seed=0, **config_kwargs):
    torch.manual_seed(seed)
    return randomize_(head(AFTConfig(**config_kwargs)), seed=seed).eval()


def assert_names(message: str, *needles):
    missing = [n for n in needles if str(n) not in message]
    assert not missing, f"error message {message!r} does not name {missing}"


# ---------------------------------------------------------------------------------------------------------------------
# Bad configurations
# ---------------------------------------------------------------------------------------------------------------------
BAD_CONFIGS = [  # (id, config kwargs, field, value)
    ("unknown-variant", lm_kwargs(aft_variant="sparse"), "aft_variant", "sparse"),
    ("unknown-in-hybrid", lm_kwargs(aft_variant=["conv", "mamba"]), "aft_variant", "mamba"),
    ("hybrid-length", lm_kwargs(aft_variant=["conv"] * 3, num_hidden_layers=2), "aft_variant", "num_hidden_layers=2"),
    ("window-zero", lm_kwargs(window_size=0), "window_size", 0),
    ("window-negative-local", lm_kwargs(aft_variant="local", window_size=-2), "window_size", -2),
    ("image-even-kernel", image_kwargs(window_size=4), "window_size", 4),
    ("heads-not-dividing", lm_kwargs(hidden_size=16, num_aft_heads=3), "num_aft_heads", 3),
    ("heads-zero", lm_kwargs(num_aft_heads=0), "num_aft_heads", 0),
    ("rank-negative", lm_kwargs(aft_variant="full", position_bias_rank=-1), "position_bias_rank", -1),
    ("hidden-negative", lm_kwargs(hidden_size=-16), "hidden_size", -16),
    ("hidden-zero", lm_kwargs(hidden_size=0), "hidden_size", 0),
    ("layers-zero", lm_kwargs(num_hidden_layers=0), "num_hidden_layers", 0),
    ("intermediate-negative", lm_kwargs(intermediate_size=-1), "intermediate_size", -1),
    ("vocab-zero", lm_kwargs(vocab_size=0), "vocab_size", 0),
    ("vocab-negative", lm_kwargs(vocab_size=-5), "vocab_size", -5),
    ("max-positions-zero", lm_kwargs(aft_variant="full", max_position_embeddings=0), "max_position_embeddings", 0),
    ("max-positions-negative", lm_kwargs(position_embedding_type="learned", max_position_embeddings=-4),
     "max_position_embeddings", -4),
    ("max-positions-none", lm_kwargs(aft_variant="local", max_position_embeddings=None), "max_position_embeddings",
     None),
    ("position-type", lm_kwargs(position_embedding_type="rotary"), "position_embedding_type", "rotary"),
    ("dropout", lm_kwargs(hidden_dropout_prob=1.5), "hidden_dropout_prob", 1.5),
    ("patch-zero", image_kwargs(patch_size=0), "patch_size", 0),
    ("channels-zero", image_kwargs(num_channels=0), "num_channels", 0),
    ("image-negative", image_kwargs(image_size=-8), "image_size", -8),
    ("image-not-divisible", image_kwargs(image_size=10), "image_size", 10),
]


@pytest.mark.parametrize("kwargs,field,value", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_a_value_error_naming_field_and_value(kwargs, field, value):
    with pytest.raises(ValueError) as info:
        AFTConfig(**kwargs)
    assert_names(str(info.value), field, value)


def config_problems(kw: dict) -> set[str]:
    """Independent oracle: the fields of `kw` that make it an invalid AFT configuration (empty set = valid)."""
    bad = set()
    for field in ("hidden_size", "num_hidden_layers", "num_aft_heads", "patch_size", "num_channels"):
        if kw.get(field, 1) < 1:
            bad.add(field)
    if kw.get("intermediate_size") is not None and kw["intermediate_size"] < 1:
        bad.add("intermediate_size")
    variant = kw["aft_variant"]
    variants = variant if isinstance(variant, list) else [variant] * max(kw["num_hidden_layers"], 1)
    if any(v not in AFT_VARIANTS for v in variants) or (
            isinstance(variant, list) and len(variant) != kw["num_hidden_layers"]):
        bad.add("aft_variant")
    if kw["window_size"] < 1:
        bad.add("window_size")
    if kw["position_bias_rank"] < 0:
        bad.add("position_bias_rank")
    if kw["position_embedding_type"] not in ("learned", "none"):
        bad.add("position_embedding_type")
    if "conv" in variants and kw["hidden_size"] >= 1 and kw["num_aft_heads"] >= 1 \
            and kw["hidden_size"] % kw["num_aft_heads"]:
        bad.add("num_aft_heads")
    if kw.get("image_size") is not None:
        if kw["image_size"] < 1 or (kw["patch_size"] >= 1 and kw["image_size"] % kw["patch_size"]):
            bad.add("image_size")
        if "conv" in variants and kw["window_size"] % 2 == 0:
            bad.add("window_size")
    else:
        if kw["vocab_size"] < 1:
            bad.add("vocab_size")
        needs_positions = kw["position_embedding_type"] == "learned" or any(v in ("full", "local") for v in variants)
        if needs_positions and (kw["max_position_embeddings"] is None or kw["max_position_embeddings"] < 1):
            bad.add("max_position_embeddings")
    return bad


BAD_VALUES = {  # what a generated config may break a field with (the oracle decides whether it really is invalid)
    "hidden_size": [-4, 0, 10], "num_hidden_layers": [-1, 0], "intermediate_size": [-1, 0],
    "num_aft_heads": [-1, 0, 3, 5], "window_size": [-1, 0, 2, 4], "position_bias_rank": [-3, -1],
    "position_embedding_type": ["rope", "alibi"], "aft_variant": ["mamba", ["conv", "mamba"], ["conv"] * 5],
    "vocab_size": [-1, 0], "max_position_embeddings": [None, -1, 0], "image_size": [-2, 0, 5, 6],
    "patch_size": [-1, 0], "num_channels": [-1, 0],
}


@st.composite
def aft_config_kwargs(draw):
    """A valid config, then (half the time) one to three of its fields replaced by suspicious values."""
    layers = draw(st.integers(1, 3))
    variant = st.sampled_from(AFT_VARIANTS)
    kw = dict(
        hidden_size=draw(st.sampled_from([4, 8, 12])), num_hidden_layers=layers,
        intermediate_size=draw(st.sampled_from([None, 8])), num_aft_heads=draw(st.sampled_from([1, 2, 4])),
        window_size=draw(st.sampled_from([1, 3, 5])), position_bias_rank=draw(st.integers(0, 2)),
        position_embedding_type=draw(st.sampled_from(["learned", "none"])),
        aft_variant=draw(st.lists(variant, min_size=layers, max_size=layers) | variant), eos_token_id=None,
    )
    if draw(st.booleans()):  # image classifier
        patch = draw(st.integers(1, 4))
        kw.update(vocab_size=None, image_size=patch * draw(st.integers(1, 3)), patch_size=patch,
                  num_channels=draw(st.integers(1, 2)), num_labels=3)
    else:
        kw.update(vocab_size=draw(st.integers(1, 12)), max_position_embeddings=draw(st.integers(1, 8)))
    if draw(st.booleans()):
        for field in draw(st.lists(st.sampled_from(sorted(BAD_VALUES)), min_size=1, max_size=3, unique=True)):
            if field in kw or field in ("patch_size", "num_channels"):
                kw[field] = draw(st.sampled_from(BAD_VALUES[field]))
    return kw


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(aft_config_kwargs())
def test_generated_configs_build_and_run_or_name_the_bad_field(kw):
    problems = config_problems(kw)
    if problems:
        with pytest.raises(ValueError) as info:
            AFTConfig(**kw)
        assert any(field in str(info.value) for field in problems), (problems, str(info.value))
        return
    config = AFTConfig(**kw)
    torch.manual_seed(0)
    if config.is_image_model:
        model = AFTForImageClassification(config).eval()
        out = model(pixel_values=torch.randn(2, config.num_channels, config.image_size, config.image_size)).logits
        assert out.shape == (2, 3)
    else:
        model = AFTForCausalLM(config).eval()
        length = min(5, config.max_position_embeddings) if config.needs_positions else 5
        out = model(torch.randint(0, config.vocab_size, (2, length))).logits
        assert out.shape == (2, length, config.vocab_size)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------------------
@functools.cache
def input_model(name: str):
    return {
        "lm": lambda: build(AFTForCausalLM, **lm_kwargs()),
        "lm-learned": lambda: build(AFTForCausalLM, **lm_kwargs(aft_variant="full", position_embedding_type="learned",
                                                                max_position_embeddings=16)),
        "img": lambda: build(AFTForImageClassification, **image_kwargs()),
        "img-learned": lambda: build(AFTForImageClassification, **image_kwargs(aft_variant="full",
                                                                               position_embedding_type="learned")),
    }[name]()


def ids(*shape, high=VOCAB):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(1))


def with_token(value):
    x = ids(2, 5)
    x[1, 3] = value
    return x


BAD_INPUTS = [  # (id, model, forward kwargs (lazy), needles the message must contain)
    ("id-eq-vocab", "lm", lambda: dict(input_ids=with_token(VOCAB)), ["input_ids", VOCAB]),
    ("id-above-vocab", "lm", lambda: dict(input_ids=with_token(1000)), ["input_ids", 1000]),
    ("id-negative", "lm", lambda: dict(input_ids=with_token(-1)), ["input_ids", -1]),
    ("too-long-learned", "lm-learned", lambda: dict(input_ids=ids(1, 17)), ["max_position_embeddings", 17]),
    ("position-ids-too-large", "lm-learned",
     lambda: dict(input_ids=ids(1, 4), position_ids=torch.tensor([[0, 1, 2, 20]])), ["max_position_embeddings", 21]),
    ("position-ids-negative", "lm-learned",
     lambda: dict(input_ids=ids(1, 4), position_ids=torch.tensor([[-1, 0, 1, 2]])), ["position_ids", -1]),
    ("mask-too-long", "lm", lambda: dict(input_ids=ids(2, 5), attention_mask=torch.ones(2, 6)),
     ["attention_mask", (2, 6)]),
    ("mask-too-short", "lm", lambda: dict(input_ids=ids(2, 5), attention_mask=torch.ones(2, 4)),
     ["attention_mask", (2, 4)]),
    ("mask-broadcast-batch", "lm", lambda: dict(input_ids=ids(2, 5), attention_mask=torch.ones(1, 5)),
     ["attention_mask", (1, 5)]),
    ("mask-1d", "lm", lambda: dict(input_ids=ids(2, 5), attention_mask=torch.ones(5)), ["attention_mask", (5,)]),
    ("mask-3d", "lm", lambda: dict(input_ids=ids(2, 5), attention_mask=torch.ones(2, 5, 1)),
     ["attention_mask", (2, 5, 1)]),
    ("labels-short", "lm", lambda: dict(input_ids=ids(2, 5), labels=ids(2, 4)), ["labels", (2, 4)]),
    ("labels-1d", "lm", lambda: dict(input_ids=ids(2, 5), labels=ids(5)), ["labels", (5,)]),
    ("empty-batch", "lm", lambda: dict(input_ids=ids(0, 5)), ["input", (0, 5)]),
    ("zero-length", "lm", lambda: dict(input_ids=ids(2, 0)), ["input", (2, 0)]),
    ("ids-1d", "lm", lambda: dict(input_ids=ids(5)), ["input", (5,)]),
    ("embeds-zero-length", "lm", lambda: dict(inputs_embeds=torch.randn(2, 0, 16)), ["input", (2, 0, 16)]),
    ("ids-and-embeds", "lm", lambda: dict(input_ids=ids(2, 5), inputs_embeds=torch.randn(2, 5, 16)),
     ["input_ids", "inputs_embeds"]),
    ("wrong-channels", "img", lambda: dict(pixel_values=torch.randn(2, 7, 8, 8)), ["channels", 7]),
    ("image-not-divisible", "img", lambda: dict(pixel_values=torch.randn(2, 3, 10, 10)), ["pixel_values", (10, 10)]),
    ("image-wrong-size-learned", "img-learned", lambda: dict(pixel_values=torch.randn(2, 3, 12, 12)),
     ["pixel_values", (12, 12)]),
    ("image-empty-batch", "img", lambda: dict(pixel_values=torch.randn(0, 3, 8, 8)), ["pixel_values", (0, 3, 8, 8)]),
    ("image-3d", "img", lambda: dict(pixel_values=torch.randn(3, 8, 8)), ["pixel_values", (3, 8, 8)]),
    ("image-none", "img", lambda: dict(pixel_values=None), ["pixel_values"]),
    ("image-labels-batch", "img", lambda: dict(pixel_values=torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 1, 2])),
     ["labels", (3,)]),
    ("lm-head-on-image-config", None, lambda: dict(head=AFTForCausalLM, config=image_kwargs()), ["image_size"]),
    ("image-head-on-lm-config", None, lambda: dict(head=AFTForImageClassification, config=lm_kwargs()),
     ["image_size"]),
]


@pytest.mark.parametrize("model_name,make_inputs,needles", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_value_error_naming_field_and_value(model_name, make_inputs, needles):
    inputs = make_inputs()
    with pytest.raises(ValueError) as info:
        if model_name is None:  # a head built on the other kind of config
            inputs["head"](AFTConfig(**inputs["config"]))
        else:
            with torch.no_grad():
                input_model(model_name)(**inputs)
    assert_names(str(info.value), *needles)


# ---------------------------------------------------------------------------------------------------------------------
# Padding invariance
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("position_type", ["learned", "none"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_causal_lm_padding_invariance(variant, position_type, side):
    model = build(AFTForCausalLM, **lm_kwargs(aft_variant=variant, position_embedding_type=position_type))
    lengths, width = [5, 2, 7], 7
    prompts = [ids(1, n, high=VOCAB).roll(i, dims=1) for i, n in enumerate(lengths)]
    junk = torch.randint(0, VOCAB, (len(lengths), width), generator=torch.Generator().manual_seed(9))
    batch, mask = junk.clone(), torch.zeros(len(lengths), width, dtype=torch.long)
    spans = [slice(width - n, width) if side == "left" else slice(0, n) for n in lengths]
    for row, (prompt, span) in enumerate(zip(prompts, spans)):
        batch[row, span], mask[row, span] = prompt[0], 1
    with torch.no_grad():
        padded = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
        for row, (prompt, span) in enumerate(zip(prompts, spans)):
            alone = model(input_ids=prompt, use_cache=False).logits[0]
            torch.testing.assert_close(padded[row, span], alone, atol=1e-5, rtol=0,
                                       msg=lambda m: f"row {row} ({side} padding): {m}")


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_image_classifier_batch_composition_invariance(variant):
    model = build(AFTForImageClassification, **image_kwargs(aft_variant=variant, position_embedding_type="learned"))
    gen = torch.Generator().manual_seed(3)
    images, others = torch.randn(3, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen) * 5
    with torch.no_grad():
        alone = torch.cat([model(pixel_values=images[i:i + 1]).logits for i in range(3)])
        together = model(pixel_values=images).logits
        mixed = model(pixel_values=torch.cat([others[:2], images.flip(0), others[2:]])).logits[2:5].flip(0)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------------------------------------------------
def persistence_model(head, variant):
    kwargs = lm_kwargs if head is AFTForCausalLM else image_kwargs
    return build(head, seed=5, **kwargs(aft_variant=variant, position_embedding_type="learned"))


def persistence_inputs(model):
    if isinstance(model, AFTForImageClassification):
        return dict(pixel_values=torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)))
    return dict(input_ids=ids(2, 9), use_cache=False)


@pytest.mark.parametrize("head", [AFTForCausalLM, AFTForImageClassification], ids=["lm", "image"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_save_load_is_bit_exact(tmp_path, head, variant):
    model = persistence_model(head, variant)
    model.save_pretrained(tmp_path)
    loaded = head.from_pretrained(tmp_path).eval()
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    unequal = [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])]
    assert not unequal, f"not restored bit-exactly: {unequal}"
    inputs = persistence_inputs(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def _truncate_half(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


CORRUPTIONS = {
    "truncated-half": _truncate_half,
    "truncated-to-header-size": lambda raw: raw[:8],
    "empty": lambda raw: b"",
    "header-length-garbage": lambda raw: b"\xff" * 8 + raw[8:],
    "header-not-json": lambda raw: raw[:8] + b"#" * 16 + raw[24:],
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupted_safetensors_error_names_the_file(tmp_path, corrupt):
    persistence_model(AFTForCausalLM, "conv").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(Exception) as info:
        AFTForCausalLM.from_pretrained(tmp_path)
    assert "model.safetensors" in str(info.value), f"{type(info.value).__name__}: {info.value}"


@pytest.mark.parametrize("loader", [AFTConfig.from_pretrained, AutoConfig.from_pretrained,
                                    AFTForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained],
                         ids=["AFTConfig", "AutoConfig", "AFTForCausalLM", "AutoModelForCausalLM"])
def test_config_from_newer_version_names_aft_variant(tmp_path, loader):
    persistence_model(AFTForCausalLM, "conv").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config.update(aft_variant="aft-mamba-v2", transformers_version="9.0.0")
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        loader(tmp_path)
    assert_names(str(info.value), "aft_variant", "aft-mamba-v2")


# ---------------------------------------------------------------------------------------------------------------------
# Interrupted training
# ---------------------------------------------------------------------------------------------------------------------
class _Interrupt(RuntimeError):
    pass


class InterruptAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Interrupt(f"simulated crash after step {self.step}")


class RecordSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, VOCAB, (48, 12), generator=torch.Generator().manual_seed(11))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture
def restore_determinism(monkeypatch):
    """`full_determinism` flips process-wide switches; put them back for the other tests of this worker."""
    for var in ("CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG", "ASCEND_LAUNCH_BLOCKING", "HCCL_DETERMINISTIC",
                "FLASH_ATTENTION_DETERMINISTIC"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # recorded, so monkeypatch restores (or removes) it
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[2:]


def train(output_dir, callbacks=(), resume=None, init_seed=0):
    torch.manual_seed(init_seed)
    # Dropout on, so a resume that does not restore the RNG state (or the data order) diverges.
    model = AFTForCausalLM(AFTConfig(**lm_kwargs(aft_variant=["full", "conv"], hidden_dropout_prob=0.1)))
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3,
        warmup_steps=2, save_steps=3, logging_steps=100, report_to=[], use_cpu=True, dataloader_num_workers=0,
        seed=7, data_seed=13, full_determinism=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trainer_resume_after_interruption_matches_uninterrupted_run(tmp_path, restore_determinism):
    reference = train(tmp_path / "straight").model.state_dict()
    with pytest.raises(_Interrupt):
        train(tmp_path / "crashed", callbacks=[InterruptAfter(5)])
    checkpoints = sorted(p.name for p in (tmp_path / "crashed").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3"], checkpoints  # saved at step 3, crashed at 5 before the step-6 save
    steps = RecordSteps()  # a differently initialised model: everything must come from the checkpoint
    resumed = train(tmp_path / "crashed", callbacks=[steps], resume=True, init_seed=1)
    assert steps.steps == [4, 5, 6, 7, 8] and resumed.state.global_step == 8
    weights = resumed.model.state_dict()
    assert weights.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    fresh = AFTForCausalLM(AFTConfig(**lm_kwargs(aft_variant=["full", "conv"])))
    assert not all(torch.equal(fresh.state_dict()[k], reference[k]) for k in reference)  # training did move weights


# ---------------------------------------------------------------------------------------------------------------------
# Concurrent generate
# ---------------------------------------------------------------------------------------------------------------------
def greedy_without_cache(model, prompt, new_tokens):
    """The independent expectation: argmax of a full forward at every step, no cache, no generate()."""
    sequence = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=sequence, use_cache=False).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    return sequence


@pytest.mark.parametrize("variant", ["conv", "full"])
def test_concurrent_generate_matches_sequential(variant):
    model = build(AFTForCausalLM, **lm_kwargs(aft_variant=variant, max_position_embeddings=40))
    prompts = [ids(1, 6), ids(1, 11).flip(1)]
    generate = functools.partial(model.generate, do_sample=False, max_new_tokens=16, min_new_tokens=16,
                                 pad_token_id=0)
    expected = [greedy_without_cache(model, p, 16) for p in prompts]
    sequential = [generate(p) for p in prompts]
    for got, want in zip(sequential, expected):
        assert torch.equal(got, want)
    for _ in range(3):  # several rounds: threads released together on a barrier so their decode steps interleave
        results, errors, barrier = [None] * len(prompts), [], threading.Barrier(len(prompts))

        def worker(i):
            try:
                barrier.wait()
                results[i] = generate(prompts[i])
            except Exception as e:  # surfaced below with the thread's index
                errors.append((i, repr(e)))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for got, want in zip(results, expected):
            assert torch.equal(got, want), (got, want)
