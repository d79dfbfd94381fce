"""GPT-2 / ViT / DeiT → AFT converters: exact copies, refusals, persistence (incl. remote code), and real transfer.

The pretrained checkpoints live in ../shared/checkpoints (tests that need them skip without them); API and shape
tests build tiny random BERT / GPT-2 / ViT / DeiT models in memory.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    BertConfig,
    BertModel,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from modeling_aft.convert_common import copy_into
from modeling_aft.convert_gpt2 import convert_gpt2_to_aft
from modeling_aft.convert_vit import convert_vit_to_aft

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
GPT2_CHAR = SHARED / "checkpoints" / "gpt2-char-shakespeare"
VIT_MNIST = SHARED / "checkpoints" / "vit-mnist5k"
needs_gpt2 = pytest.mark.skipif(not (GPT2_CHAR / "model.safetensors").exists(),
                                reason=f"shared checkpoint {GPT2_CHAR} is absent")
needs_vit = pytest.mark.skipif(not (VIT_MNIST / "model.safetensors").exists(),
                               reason=f"shared checkpoint {VIT_MNIST} is absent")
SHAKESPEARE, MNIST = SHARED / "data" / "tinyshakespeare.txt", SHARED / "data" / "mnist_5k.csv.gz"
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"shared data {SHAKESPEARE} is absent")
needs_mnist = pytest.mark.skipif(not MNIST.exists(), reason=f"shared data {MNIST} is absent")
# What a converter may leave at the AFT model's own init: position mixing always, Q / K when asked to re-initialise.
POSITION_MIXING = re.compile(r"\.aft\.(position_bias|conv_kernel)\.")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# -- independent statements of what each AFT tensor must equal ------------------------------------------------------
def gpt2_expected(gpt2: GPT2LMHeadModel, aft_config) -> dict:
    """AFT name → the GPT-2 tensor it must equal. Conv1D weights are (in, out): `.T` gives nn.Linear's (out, in)."""
    trunk, width, heads = gpt2.transformer, gpt2.config.n_embd, aft_config.num_aft_heads
    expected = {"model.embed_tokens.weight": trunk.wte.weight, "model.embed_positions.weight": trunk.wpe.weight,
                "lm_head.weight": trunk.wte.weight,
                "model.norm.weight": trunk.ln_f.weight, "model.norm.bias": trunk.ln_f.bias}
    for i, block in enumerate(trunk.h):
        qkv_weight, qkv_bias = block.attn.c_attn.weight, block.attn.c_attn.bias  # (D, 3D), (3D,)
        key_weight, key_bias = qkv_weight[:, width:2 * width].T, qkv_bias[width:2 * width]
        if aft_config.layer_variants[i] == "conv":  # one key per AFT head: the mean of the head's rows
            key_weight = key_weight.reshape(heads, width // heads, width).mean(1)
            key_bias = key_bias.reshape(heads, width // heads).mean(1)
        layer = {
            "ln_1.weight": block.ln_1.weight, "ln_1.bias": block.ln_1.bias,
            "aft.q_proj.weight": qkv_weight[:, :width].T, "aft.q_proj.bias": qkv_bias[:width],
            "aft.k_proj.weight": key_weight, "aft.k_proj.bias": key_bias,
            "aft.v_proj.weight": qkv_weight[:, 2 * width:].T, "aft.v_proj.bias": qkv_bias[2 * width:],
            "aft.o_proj.weight": block.attn.c_proj.weight.T, "aft.o_proj.bias": block.attn.c_proj.bias,
            "ln_2.weight": block.ln_2.weight, "ln_2.bias": block.ln_2.bias,
            "mlp.fc_in.weight": block.mlp.c_fc.weight.T, "mlp.fc_in.bias": block.mlp.c_fc.bias,
            "mlp.fc_out.weight": block.mlp.c_proj.weight.T, "mlp.fc_out.bias": block.mlp.c_proj.bias,
        }
        expected.update({f"model.layers.{i}.{name}": tensor for name, tensor in layer.items()})
    return expected


def vit_expected(source, aft_config, head: tuple | None) -> dict:
    """AFT name → the ViT/DeiT tensor it must equal (all nn.Linear/Conv2d already, nothing transposed)."""
    trunk = getattr(source, "vit", None) or getattr(source, "deit", None) or source
    width, heads = aft_config.hidden_size, aft_config.num_aft_heads
    special_tokens = 2 if hasattr(trunk.embeddings, "distillation_token") else 1  # [CLS] (+ DeiT's [DIST])
    expected = {"model.patch_embed.weight": trunk.embeddings.patch_embeddings.projection.weight,
                "model.patch_embed.bias": trunk.embeddings.patch_embeddings.projection.bias,
                "model.norm.weight": trunk.layernorm.weight, "model.norm.bias": trunk.layernorm.bias}
    if aft_config.position_embedding_type == "learned":
        expected["model.embed_positions.weight"] = trunk.embeddings.position_embeddings[0, special_tokens:]
    if head is not None:
        expected["classifier.weight"], expected["classifier.bias"] = head
    for i, layer in enumerate(trunk.layers):
        attention = layer.attention
        key_weight, key_bias = attention.k_proj.weight, attention.k_proj.bias
        if aft_config.layer_variants[i] == "conv":
            key_weight = key_weight.reshape(heads, width // heads, width).mean(1)
            key_bias = key_bias.reshape(heads, width // heads).mean(1)
        pairs = {"ln_1": layer.layernorm_before, "aft.q_proj": attention.q_proj, "aft.v_proj": attention.v_proj,
                 "aft.o_proj": attention.o_proj, "ln_2": layer.layernorm_after, "mlp.fc_in": layer.mlp.fc1,
                 "mlp.fc_out": layer.mlp.fc2}
        for name, module in pairs.items():
            expected[f"model.layers.{i}.{name}.weight"] = module.weight
            expected[f"model.layers.{i}.{name}.bias"] = module.bias
        expected[f"model.layers.{i}.aft.k_proj.weight"] = key_weight
        expected[f"model.layers.{i}.aft.k_proj.bias"] = key_bias
    return expected


def assert_copied(model, expected: dict, may_stay_fresh=POSITION_MIXING):
    """Every expected tensor bit-identical; every other parameter is one the converter may leave fresh."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, source in expected.items():
        assert name in params, f"{name} missing from the AFT model"
        assert torch.equal(params[name].detach(), source.detach()), f"{name} differs from its source tensor"
    unexpected = [name for name in params if name not in expected and not may_stay_fresh.search(name)]
    assert not unexpected, f"parameters neither copied nor allowed to stay fresh: {unexpected}"


# -- tiny in-memory sources -----------------------------------------------------------------------------------------
def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=24, n_embd=32, n_layer=2, n_head=4)).eval()


def tiny_vision_config(config_class, **overrides):
    sizes = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=64, num_labels=5)
    return config_class(**{**sizes, **overrides})


# -- exact copies ---------------------------------------------------------------------------------------------------
@needs_gpt2
@pytest.mark.parametrize("variant", ["conv", "full", "local", "simple", ["conv", "full", "local", "simple"]],
                         ids=["conv", "full", "local", "simple", "hybrid"])
def test_gpt2_every_copied_tensor_is_bit_identical(variant):
    gpt2 = GPT2LMHeadModel.from_pretrained(GPT2_CHAR, use_safetensors=True)
    model = convert_gpt2_to_aft(GPT2_CHAR, aft_variant=variant)
    assert_copied(model, gpt2_expected(gpt2, model.config))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in GPT-2
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (256, 256, 4,
                                                                                                           1024)
    assert (config.hidden_act, config.layer_norm_eps, config.num_aft_heads) == ("gelu_new", 1e-5, 4)
    assert (config.max_position_embeddings, config.position_embedding_type) == (256, "learned")


@needs_vit
@pytest.mark.parametrize("variant", ["conv", "full", "simple"])
def test_vit_every_copied_tensor_is_bit_identical(variant):
    vit = ViTForImageClassification.from_pretrained(VIT_MNIST, use_safetensors=True)
    model = convert_vit_to_aft(VIT_MNIST, aft_variant=variant)
    assert_copied(model, vit_expected(vit, model.config, (vit.classifier.weight, vit.classifier.bias)))
    config = model.config
    assert (config.image_size, config.patch_size, config.num_channels, config.window_size) == (28, 4, 1, 7)
    assert config.id2label == vit.config.id2label and config.layer_norm_eps == 1e-12
    # The class token goes; the patch positions stay (even for AFT-conv, where they measurably carry the transfer).
    assert config.position_embedding_type == "learned" and "class token" in model.aft_conversion.dropped


@pytest.mark.parametrize("teacher", [False, True], ids=["deit", "deit-distilled"])
def test_deit_drops_both_tokens_and_merges_the_distilled_heads(teacher):
    torch.manual_seed(0)
    source_class = DeiTForImageClassificationWithTeacher if teacher else DeiTForImageClassification
    deit = source_class(tiny_vision_config(DeiTConfig)).eval()
    model = convert_vit_to_aft(deit, aft_variant="simple")  # learned positions: checks the [CLS, DIST] offset
    if teacher:  # inference logits are the mean of the two heads, i.e. one head with the mean weights
        heads = (deit.cls_classifier, deit.distillation_classifier)
        head = tuple(torch.stack([getattr(h, p) for h in heads]).mean(0) for p in ("weight", "bias"))
    else:
        head = (deit.classifier.weight, deit.classifier.bias)
    assert_copied(model, vit_expected(deit, model.config, head))
    assert "distillation token" in model.aft_conversion.dropped
    assert model(pixel_values=torch.rand(2, 3, 16, 16)).logits.shape == (2, 5)


def test_bare_vit_gets_a_new_head_for_num_labels():
    torch.manual_seed(0)
    vit = ViTModel(tiny_vision_config(ViTConfig)).eval()
    with pytest.raises(ValueError, match="num_labels"):
        convert_vit_to_aft(vit)
    model = convert_vit_to_aft(vit, num_labels=3, position_embedding_type="none")
    assert_copied(model, vit_expected(vit, model.config, None), re.compile(rf"{POSITION_MIXING.pattern}|^classifier"))
    assert {"class token", "position embeddings", "pooler"} <= set(model.aft_conversion.dropped)
    # AFT-conv without positions takes any image size divisible by the patch.
    assert model(pixel_values=torch.rand(1, 3, 24, 20)).logits.shape == (1, 3)
    # With positions at another size, the 4x4 grid of ViT's patch positions is resized to 6x6.
    larger = convert_vit_to_aft(vit, num_labels=3, image_size=24)
    assert larger.model.embed_positions.weight.shape == (36, 32)
    assert larger(pixel_values=torch.rand(1, 3, 24, 24)).logits.shape == (1, 3)


def test_reinitialised_query_and_key_keep_the_fresh_init():
    gpt2 = tiny_gpt2()
    torch.manual_seed(1)
    model = convert_gpt2_to_aft(gpt2, query_init="random", key_init="random")
    expected = {name: tensor for name, tensor in gpt2_expected(gpt2, model.config).items()
                if ".q_proj." not in name and ".k_proj." not in name}
    assert_copied(model, expected, re.compile(rf"{POSITION_MIXING.pattern}|\.(q|k)_proj\."))
    assert not torch.equal(model.model.layers[0].aft.q_proj.weight, gpt2.transformer.h[0].attn.c_attn.weight[:, :32].T)


# -- refusals -------------------------------------------------------------------------------------------------------
def test_unsupported_sources_are_refused_naming_the_supported_types(tmp_path):
    bert = BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    with pytest.raises(ValueError, match=r"supported model types are gpt2 \(GPT2LMHeadModel"):
        convert_gpt2_to_aft(bert)
    with pytest.raises(ValueError, match=r"supported model types are vit \(.*deit \(.*WithTeacher"):
        convert_vit_to_aft(bert)
    bert.save_pretrained(tmp_path / "bert")  # a checkpoint folder is refused from its config, before any weights
    with pytest.raises(ValueError, match="model_type='bert'.*supported model types are gpt2"):
        convert_gpt2_to_aft(tmp_path / "bert")
    with pytest.raises(ValueError, match="GPT2ForSequenceClassification"):  # right family, unsupported head
        convert_gpt2_to_aft(GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=1, n_head=2)))


def test_shape_mismatches_name_the_parameter():
    # The target is wider than the source: the very first copies cannot fit.
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight: AFT shape \(40, 64\) != source shape"):
        convert_gpt2_to_aft(tiny_gpt2(), hidden_size=64, num_aft_heads=4)
    with pytest.raises(ValueError, match=r"model\.embed_positions\.weight: AFT shape \(30, 32\)"):
        convert_gpt2_to_aft(tiny_gpt2(), max_position_embeddings=30)  # longer than GPT-2's 24 positions
    with pytest.raises(ValueError, match="num_hidden_layers"):
        convert_gpt2_to_aft(tiny_gpt2(), num_hidden_layers=3)
    with pytest.raises(ValueError, match="no such parameter"):
        copy_into(torch.nn.Linear(2, 2), {"weights": torch.zeros(2, 2)})


def test_overrides_win_over_the_derived_config():
    model = convert_gpt2_to_aft(tiny_gpt2(), aft_variant="local", window_size=5, max_position_embeddings=16,
                                hidden_dropout_prob=0.0)
    assert (model.config.aft_variant, model.config.window_size, model.config.max_position_embeddings,
            model.config.hidden_dropout_prob) == ("local", 5, 16, 0.0)
    # a shorter context keeps GPT-2's first positions
    assert torch.equal(model.model.embed_positions.weight, tiny_gpt2().transformer.wpe.weight[:16])


# -- CLIs, persistence, remote code ---------------------------------------------------------------------------------
REMOTE_LOAD = """
import json, torch, transformers
text = transformers.AutoModelForCausalLM.from_pretrained({text!r}, trust_remote_code=True).eval()
ids = torch.tensor([{prompt}])
tokens = text.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0].tolist()
image = transformers.AutoModelForImageClassification.from_pretrained({image!r}, trust_remote_code=True).eval()
torch.manual_seed(0)
with torch.no_grad():
    logits = image(pixel_values=torch.rand(2, 1, 28, 28)).logits.tolist()
print(json.dumps({{"tokens": tokens, "logits": logits, "module": type(text).__module__}}))
"""


@needs_gpt2
@needs_vit
def test_clis_write_checkpoints_that_reload_and_generate_the_same(tmp_path):
    from isolated import run_isolated

    text_dir, image_dir = tmp_path / "text", tmp_path / "image"
    load_script("convert_gpt2_to_aft").main(["--source", str(GPT2_CHAR), "--output", str(text_dir)])
    load_script("convert_vit_to_aft").main(["--source", str(VIT_MNIST), "--output", str(image_dir)])
    for folder, pipeline_tag in ((text_dir, "text-generation"), (image_dir, "image-classification")):
        assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
        card = (folder / "README.md").read_text()
        assert card.startswith("---\n") and f'pipeline_tag: "{pipeline_tag}"' in card and "2105.14103" in card
        assert '"attention-free-transformer"' in card and "base_model" not in card  # a local source is no Hub id
    assert "class token" in (image_dir / "README.md").read_text()
    assert (text_dir / "tokenizer.json").exists()  # no tokenizer in the source: the 256-byte one
    processor = json.loads((image_dir / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 28, "width": 28} and processor["do_normalize"] is False

    converted = convert_gpt2_to_aft(GPT2_CHAR)
    prompt = list(b"ROMEO:\n")
    ids = torch.tensor([prompt])
    expected = converted.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0].tolist()
    reloaded = AutoModelForCausalLM.from_pretrained(text_dir).eval()
    assert reloaded.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0].tolist() == expected
    image = AutoModelForImageClassification.from_pretrained(image_dir).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        image_logits = image(pixel_values=torch.rand(2, 1, 28, 28)).logits
    # A fresh interpreter that cannot import modeling_aft: only the code saved with the weights.
    remote = json.loads(run_isolated(REMOTE_LOAD.format(text=str(text_dir), image=str(image_dir),
                                                        prompt=prompt)).strip().splitlines()[-1])
    assert remote["module"].startswith("transformers_modules.")
    assert remote["tokens"] == expected
    torch.testing.assert_close(torch.tensor(remote["logits"]), image_logits, rtol=0, atol=0)


PUSH_CLI = """
import runpy, sys
sys.argv = ["convert_vit_to_aft.py", "--source", {source!r}, "--output", {output!r}, "--push_to_hub",
            "--hub_model_id", "user/tiny-aft-from-vit"]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_cli_pushes_the_converted_checkpoint(hub, tmp_path):
    from isolated import run_python

    torch.manual_seed(0)
    ViTForImageClassification(tiny_vision_config(ViTConfig, num_channels=1)).save_pretrained(tmp_path / "vit")
    run_python(PUSH_CLI.format(source=str(tmp_path / "vit"), output=str(tmp_path / "aft"),
                               script=str(REPO / "scripts" / "convert_vit_to_aft.py")), env=hub.env, isolated=False)
    repo = hub.repos["user/tiny-aft-from-vit"]
    files = repo.commits[repo.branches["main"]][0]
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_aft.py",
                 "aft_ops.py", "configuration_aft.py"):
        assert name in files, f"{name} was not pushed: {sorted(files)}"
    assert files["README.md"] == (tmp_path / "aft" / "README.md").read_bytes()


# -- transfer is real -----------------------------------------------------------------------------------------------
@needs_gpt2
@needs_shakespeare
@pytest.mark.slow
def test_converted_gpt2_fine_tunes_below_scratch():
    """10 steps of 4x128 bytes: the converted LM starts ~4 bits/byte below scratch and stays well ahead."""
    bench = load_script("bench_transfer")
    results = bench.compare_text(steps=10, batch=4, seq_len=128, eval_windows=8, with_teacher=False,
                                 measure_before=False)
    converted, scratch = (run["bits_per_byte"] for run in results["runs"].values())
    assert converted < scratch - 0.2, results


@needs_vit
@needs_mnist
@pytest.mark.slow
def test_converted_vit_fine_tunes_below_scratch():
    """24 steps of 64 digits (a third of an epoch): about where the converted model, whose copied head starts
    confidently wrong on mean-pooled features, has clearly overtaken scratch on held-out loss."""
    bench = load_script("bench_transfer")
    results = bench.compare_image(epochs=0.34, batch=64, with_teacher=False, measure_before=False)
    converted, scratch = results["runs"].values()
    assert converted["loss"] < scratch["loss"], results
