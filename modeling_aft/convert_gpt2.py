"""Start an AFT causal LM (`AFTForCausalLM`) from a pretrained GPT-2.

    from modeling_aft.convert_gpt2 import convert_gpt2_to_aft
    model = convert_gpt2_to_aft("path/to/gpt2", aft_variant="conv")   # or a GPT2LMHeadModel, or a Hub id

The two architectures share everything but the token mixer: GPT-2's block is pre-LN, x + attn(ln_1(x)) then
x + mlp(ln_2(x)), exactly like an AFT block with AFT in place of attention. So the converter copies, bit for bit:

- token embeddings `wte` → `model.embed_tokens` (and the LM head, tied to it as in GPT-2; an untied head is copied);
- learned positions `wpe` → `model.embed_positions` (the AFT config uses position_embedding_type="learned" with
  max_position_embeddings = n_positions; a smaller max keeps the first rows);
- every LayerNorm (ln_1, ln_2, ln_f → norm), the MLP (c_fc → fc_in, c_proj → fc_out), attention's V and output
  projections (c_attn's V third → v_proj, c_proj → o_proj) and, by default, Q (c_attn's Q third → q_proj).
  GPT-2 stores these as `Conv1D` with weight (in, out), the transpose of nn.Linear's (out, in): every one of them is
  transposed, and c_attn's fused (in, 3·D) weight is split into its Q, K, V thirds.

What cannot be carried over, and how it starts instead:

- K. Full/local/simple AFT has a per-feature K like attention: copied. AFT-conv has one key channel per AFT head
  (paper eq. 6): by default head i's K is the mean of GPT-2's K rows (weight and bias) of the features it covers
  (`key_init="mean"`); `key_init="random"` re-initialises it, as the paper re-initialised Q/K (`query_init="random"`
  does the same for Q). `scripts/bench_transfer.py --ablate` measured which transfers better; see
  docs/benchmarks/transfer.md for the numbers behind the defaults.
- The position biases: AFT-conv kernels start with γ = β = 0, i.e. a zero bias, so a fresh layer computes exactly
  AFT-simple; AFT-full/local's factorized bias u vᵀ starts near zero (u, v ~ N(0, 0.01)). Attention has no such
  weights to copy from.
- Attention dropout has no AFT counterpart; resid_pdrop / embd_pdrop become hidden / embedding dropout.
"""

import os

from transformers import GPT2LMHeadModel, GPT2Model, PreTrainedModel

from .configuration_aft import AFTConfig
from .convert_common import (
    FRESH_POSITION_MIXING_NOTE,
    ConversionReport,
    apply_overrides,
    check_model_type,
    check_qk_init,
    finish_conversion,
    linear_params,
    load_source_config,
    module_params,
    pick_source_class,
    qk_note,
    qkv_params,
    source_dtype,
    source_name,
)
from .modeling_aft import AFTForCausalLM

SUPPORTED_SOURCES = {"gpt2": ("GPT2LMHeadModel", "GPT2Model")}
DEFAULT_TEXT_WINDOW = 32  # s of AFT-local / AFT-conv for text, as in the paper's character-level experiments


def aft_config_from_gpt2(gpt2_config, aft_variant="conv", **overrides) -> AFTConfig:
    """The AFT config that mirrors a GPT-2 config (sizes, eps, activation, vocab, positions); overrides win."""
    derived = dict(
        vocab_size=gpt2_config.vocab_size,
        hidden_size=gpt2_config.n_embd,
        num_hidden_layers=gpt2_config.n_layer,
        intermediate_size=gpt2_config.n_inner or 4 * gpt2_config.n_embd,
        hidden_act=gpt2_config.activation_function,  # "gelu_new" is also a transformers activation
        layer_norm_eps=gpt2_config.layer_norm_epsilon,
        hidden_dropout_prob=gpt2_config.resid_pdrop,
        embedding_dropout_prob=gpt2_config.embd_pdrop,
        initializer_range=gpt2_config.initializer_range,
        aft_variant=aft_variant,
        window_size=DEFAULT_TEXT_WINDOW,
        num_aft_heads=gpt2_config.n_head,
        max_position_embeddings=gpt2_config.n_positions,
        position_embedding_type="learned",
        qkv_bias=True,  # GPT-2's Conv1D always has a bias
        tie_word_embeddings=gpt2_config.tie_word_embeddings,
        bos_token_id=gpt2_config.bos_token_id,
        eos_token_id=gpt2_config.eos_token_id,
        pad_token_id=gpt2_config.pad_token_id,
    )
    return AFTConfig(**apply_overrides(derived, overrides))


def load_gpt2(source) -> PreTrainedModel:
    """A GPT2LMHeadModel / GPT2Model as is, or loaded from a folder / Hub id (safetensors only: never unpickled)."""
    classes = {"GPT2LMHeadModel": GPT2LMHeadModel, "GPT2Model": GPT2Model}
    if isinstance(source, (str, os.PathLike)):
        config = load_source_config(source)
        gpt2_class = pick_source_class(config, classes, default="GPT2LMHeadModel")
        check_model_type(config, SUPPORTED_SOURCES, gpt2_class.__name__)
        return gpt2_class.from_pretrained(source, use_safetensors=True)
    check_model_type(getattr(source, "config", None), SUPPORTED_SOURCES, type(source).__name__)
    return source


def gpt2_params(gpt2_lm: PreTrainedModel, model: AFTForCausalLM, *, query_init: str, key_init: str) -> dict:
    """{AFT parameter name: source tensor in the AFT layout} for everything GPT-2 can provide."""
    gpt2 = getattr(gpt2_lm, "transformer", gpt2_lm)  # GPT2LMHeadModel wraps the GPT2Model trunk
    config = model.config
    if len(gpt2.h) != config.num_hidden_layers:
        raise ValueError(f"num_hidden_layers: AFT has {config.num_hidden_layers}, GPT-2 has {len(gpt2.h)}")
    params = {"model.embed_tokens.weight": gpt2.wte.weight}
    if config.position_embedding_type == "learned":
        # A shorter AFT context keeps GPT-2's first positions; a longer one fails the shape check in copy_into.
        params["model.embed_positions.weight"] = gpt2.wpe.weight[: config.max_position_embeddings]
    width = gpt2.config.n_embd
    for i, (block, target) in enumerate(zip(gpt2.h, model.model.layers)):
        prefix = f"model.layers.{i}"
        # Conv1D weights are (in, out): transpose to nn.Linear's (out, in). c_attn is Q | K | V along `out`.
        q, k, v = zip(block.attn.c_attn.weight.T.split(width), block.attn.c_attn.bias.split(width))
        params.update(module_params(f"{prefix}.ln_1", block.ln_1))
        params.update(qkv_params(f"{prefix}.aft", target.aft, q, k, v, query_init=query_init, key_init=key_init))
        params.update(linear_params(f"{prefix}.aft.o_proj", block.attn.c_proj.weight.T, block.attn.c_proj.bias))
        params.update(module_params(f"{prefix}.ln_2", block.ln_2))
        params.update(linear_params(f"{prefix}.mlp.fc_in", block.mlp.c_fc.weight.T, block.mlp.c_fc.bias))
        params.update(linear_params(f"{prefix}.mlp.fc_out", block.mlp.c_proj.weight.T, block.mlp.c_proj.bias))
    params.update(module_params("model.norm", gpt2.ln_f))
    if not config.tie_word_embeddings and hasattr(gpt2_lm, "lm_head"):
        params["lm_head.weight"] = gpt2_lm.lm_head.weight  # already nn.Linear layout
    return params


def convert_gpt2_to_aft(source, *, aft_variant="conv", query_init="copy", key_init="mean",
                        **config_overrides) -> AFTForCausalLM:
    """An `AFTForCausalLM` initialised from GPT-2 `source` (model, folder or Hub id); see the module docstring.

    `aft_variant` and `config_overrides` (any AFTConfig field) shape the target; the rest follows GPT-2's config.
    The result is in eval mode and carries `model.aft_conversion`, a `ConversionReport` of what was copied.
    """
    check_qk_init(query_init, key_init)
    gpt2_lm = load_gpt2(source)
    config = aft_config_from_gpt2(gpt2_lm.config, aft_variant, **config_overrides)
    model = AFTForCausalLM(config).to(source_dtype(gpt2_lm))
    params = gpt2_params(gpt2_lm, model, query_init=query_init, key_init=key_init)
    report = ConversionReport(
        source=source_name(source, gpt2_lm),
        source_class=type(gpt2_lm).__name__,
        dropped=["attention dropout (attn_pdrop)"],
        notes=[
            "GPT-2 Conv1D weights (c_attn, c_proj, c_fc, mlp.c_proj) transposed to nn.Linear layout",
            qk_note(query_init, key_init),
            FRESH_POSITION_MIXING_NOTE,
        ],
    )
    finish_conversion(model, params, report)
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise ValueError("lm_head.weight: expected to be tied to model.embed_tokens.weight, as in GPT-2")
    return model


__all__ = ["convert_gpt2_to_aft", "aft_config_from_gpt2", "SUPPORTED_SOURCES"]
