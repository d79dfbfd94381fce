"""Shared pieces of the pretrained-Transformer → AFT converters (`convert_gpt2`, `convert_vit`).

A converter builds a flat `{aft parameter name: tensor}` dict of everything it can carry over, already in the AFT
layout (transposed / split / reduced, each step commented where it happens), and hands it to `copy_into`, which
asserts every shape before copying. Whatever is not in the dict keeps the AFT model's own initialisation.
"""

import os
from dataclasses import dataclass, field

import torch
from torch import nn

# How AFT's Q and K projections start. Attention uses them in q·k, AFT as σ(Q) gates and exp(K) weights, so copying
# is a guess that `scripts/bench_transfer.py --ablate` measures against the paper's choice of re-initialising them.
# key_init "mean": AFT-conv's one-channel-per-head K (paper eq. 6) is the mean of the source's K rows (weight and
# bias) of the features head i covers (per-feature K of full/local/simple is copied as is); "random": keep the fresh
# initialisation (N(0, initializer_range), zero bias). query_init "copy" | "random" likewise for Q.
KEY_INITS = ("mean", "random")
QUERY_INITS = ("copy", "random")


def unsupported_source(what, supported: dict[str, tuple[str, ...]]) -> ValueError:
    """The error for a source of a family this converter does not read; lists what it does read."""
    listing = "; ".join(f"{model_type} ({', '.join(classes)})" for model_type, classes in supported.items())
    return ValueError(f"unsupported source {what}: supported model types are {listing}")


def check_model_type(config, supported: dict[str, tuple[str, ...]], source_class: str):
    model_type = getattr(config, "model_type", None)
    if model_type not in supported or source_class not in supported[model_type]:
        raise unsupported_source(f"{source_class} (model_type={model_type!r})", supported)


def load_source_config(source: str):
    """The config of a local folder or Hub id, read before any weights so an unsupported family fails early."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source)


def pick_source_class(config, classes_by_name: dict[str, type], default: str) -> type:
    """The class named first in the checkpoint's `architectures` that we support, else `default`."""
    for name in getattr(config, "architectures", None) or ():
        if name in classes_by_name:
            return classes_by_name[name]
    return classes_by_name[default]


def linear_params(prefix: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """{prefix.weight, prefix.bias} for an nn.Linear / LayerNorm / Conv2d target (weight already in its layout)."""
    params = {f"{prefix}.weight": weight}
    if bias is not None:
        params[f"{prefix}.bias"] = bias
    return params


def module_params(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """Same as `linear_params` for a source module whose layout already matches (nn.Linear, LayerNorm, Conv2d)."""
    return linear_params(prefix, module.weight, getattr(module, "bias", None))


def reduce_key_heads(weight: torch.Tensor, bias: torch.Tensor | None, heads: int):
    """(D, D_in) per-feature key projection → (h, D_in): the mean of each head's contiguous block of D/h rows.

    AFT-conv head i covers features [i·D/h, (i+1)·D/h) (see `aft_recurrent.expand_key_heads`), which is also how
    GPT-2 / ViT lay out attention head i, so with h = source heads each AFT head averages its own attention head.
    """
    rows = weight.shape[0]
    if rows % heads:
        raise ValueError(f"k_proj: {rows} key features cannot be split into num_aft_heads={heads} equal heads")
    mean_weight = weight.reshape(heads, rows // heads, -1).mean(1)
    mean_bias = None if bias is None else bias.reshape(heads, rows // heads).mean(1)
    return mean_weight, mean_bias


def check_qk_init(query_init: str, key_init: str):
    if query_init not in QUERY_INITS:
        raise ValueError(f"query_init={query_init!r}: expected one of {QUERY_INITS}")
    if key_init not in KEY_INITS:
        raise ValueError(f"key_init={key_init!r}: expected one of {KEY_INITS}")


def qk_note(query_init: str, key_init: str) -> str:
    """The model-card line saying how Q and K started."""
    query = "copied" if query_init == "copy" else "re-initialised"
    key = "re-initialised" if key_init == "random" else "copied (AFT-conv: the mean of each head's rows)"
    return f"Q: {query}; K: {key}"


FRESH_POSITION_MIXING_NOTE = ("position biases / conv kernels: fresh (AFT-conv: zero bias, so each layer starts as "
                              "AFT-simple; AFT-full/local: a near-zero factorized bias)")


def qkv_params(prefix: str, aft_layer: nn.Module, q, k, v, *, query_init: str, key_init: str) -> dict[str, torch.Tensor]:
    """The q/k/v_proj entries of one AFT layer from (weight, bias) pairs already in nn.Linear layout.

    V is always copied; Q and K as `query_init` / `key_init` say. A re-initialised projection is simply left out, so
    it keeps the AFT model's fresh initialisation.
    """
    params = linear_params(f"{prefix}.v_proj", *v)
    if query_init == "copy":
        params.update(linear_params(f"{prefix}.q_proj", *q))
    if key_init == "random":
        return params
    key_dim = aft_layer.k_proj.out_features
    if key_dim == k[0].shape[0]:  # full / local / simple: K is per feature, as in attention
        params.update(linear_params(f"{prefix}.k_proj", *k))
    else:  # conv: one key channel per AFT head
        params.update(linear_params(f"{prefix}.k_proj", *reduce_key_heads(*k, key_dim)))
    return params


def copy_into(model: nn.Module, params: dict[str, torch.Tensor]) -> list[str]:
    """Copy `params` into `model` by name; every name must exist and every shape match (ValueError naming it).

    Returns the copied names. Tied parameters (lm_head ↔ embed_tokens) are one tensor, so copying one fills both.
    """
    targets = dict(model.named_parameters(remove_duplicate=False))
    problems = []
    for name, source in params.items():
        if name not in targets:
            problems.append(f"{name}: no such parameter in the AFT model")
        elif tuple(targets[name].shape) != tuple(source.shape):
            problems.append(f"{name}: AFT shape {tuple(targets[name].shape)} != source shape {tuple(source.shape)}")
    if problems:
        raise ValueError("cannot copy the source weights:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for name, source in params.items():
            targets[name].copy_(source.detach().to(device=targets[name].device, dtype=targets[name].dtype))
    return list(params)


@dataclass
class ConversionReport:
    """What a converter did, attached to the converted model as `model.aft_conversion` (the CLIs' model card reads it).

    copied: AFT parameter names filled from the source; initialised: those left at the AFT model's own init;
    dropped: source parameters with no AFT counterpart; notes: one line per non-trivial mapping.
    """

    source: str
    source_class: str
    copied: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def finish_conversion(model: nn.Module, params: dict[str, torch.Tensor], report: ConversionReport) -> nn.Module:
    """Copy `params` (shape-checked), fill the report's copied / initialised lists, attach it, return the model."""
    report.copied = copy_into(model, params)
    copied = set(report.copied)
    report.initialised = [name for name, _ in model.named_parameters() if name not in copied]
    model.aft_conversion = report
    return model.eval()  # like from_pretrained; call .train() to fine-tune


def apply_overrides(derived: dict, overrides: dict) -> dict:
    """The AFT config kwargs: values derived from the source, replaced by any user override (overrides win)."""
    return {**derived, **overrides}


def source_name(source, loaded: nn.Module) -> str:
    """How the report names the source: the path / Hub id given, else the loaded model's name_or_path."""
    return str(source) if isinstance(source, (str, os.PathLike)) else loaded.config.name_or_path


def source_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# -- what the two conversion CLIs (scripts/convert_*_to_aft.py) share --------------------------------------------------
def add_conversion_arguments(parser, default_window: int):
    """The options both converter CLIs take: source, output, variant, Q/K init, a few overrides, Hub push."""
    parser.add_argument("--source", required=True, help="a local checkpoint folder or a Hub model id")
    parser.add_argument("--output", required=True, help="folder to write the AFT checkpoint to (save_pretrained)")
    parser.add_argument("--variant", default="conv",
                        help="AFT variant: full | local | simple | conv, or a comma-separated list, one per layer")
    parser.add_argument("--query_init", choices=QUERY_INITS, default="copy", help="copy attention's Q, or re-init it")
    parser.add_argument("--key_init", choices=KEY_INITS, default="mean",
                        help="K from attention's K (AFT-conv: per-head mean of its rows), or re-initialised")
    parser.add_argument("--window_size", type=int, default=default_window, help="s of AFT-local / AFT-conv")
    parser.add_argument("--num_aft_heads", type=int, default=None, help="AFT-conv heads (default: source heads)")
    parser.add_argument("--base_model", default=None,
                        help="Hub id recorded as the card's base_model (default: --source when it is a Hub id)")
    parser.add_argument("--push_to_hub", action="store_true", help="also upload the output folder to the Hub")
    parser.add_argument("--hub_model_id", default=None, help="repo id for --push_to_hub (default: output folder name)")


def base_model_of(args) -> str | None:
    """The model card's base_model: explicit, or the source when it is a Hub id (a local folder is no Hub model)."""
    if args.base_model or os.path.exists(args.source):
        return args.base_model
    return args.source


def conversion_kwargs(args) -> dict:
    """convert_*_to_aft keyword arguments from the parsed shared options."""
    variants = args.variant.split(",")
    kwargs = dict(aft_variant=variants[0] if len(variants) == 1 else variants, query_init=args.query_init,
                  key_init=args.key_init, window_size=args.window_size)
    if args.num_aft_heads is not None:
        kwargs["num_aft_heads"] = args.num_aft_heads
    return kwargs


def _bullets(items) -> str:
    return "\n".join(f"- {item}" for item in items) or "- (none)"


def conversion_model_card(model: nn.Module, *, task: str, base_model: str | None, repo_id: str | None = None) -> str:
    """README.md for a converted model (modeling_aft.model_card's template), from its `aft_conversion` report."""
    from .model_card import render_model_card

    report: ConversionReport = model.aft_conversion
    config = model.config
    # "model.layers.3.aft.conv_kernel.gamma" → "aft.conv_kernel.gamma": one line per kind of fresh tensor.
    fresh = sorted({".".join(part for part in name.split(".") if not part.isdigit()).removeprefix("model.layers.")
                    for name in report.initialised})
    training = f"""Not trained after conversion: initialised from the pretrained `{report.source_class}` at
`{report.source}` by `modeling_aft`'s converter, with attention replaced by AFT. {len(report.copied)} tensors were
copied bit for bit (after the transposes noted):

{_bullets(report.notes)}

Starting from the AFT model's own initialisation (no counterpart in the source):

{_bullets(fresh)}

Dropped from the source: {", ".join(report.dropped) or "nothing"}."""
    return render_model_card(
        model_name=repo_id or f"{describe_source(report)}-aft-{_variant_name(config.aft_variant)}",
        task=task,
        variant=config.aft_variant,
        metrics={},
        datasets=[],
        base_model=base_model,
        limitations="Freshly converted, not fine-tuned: the AFT layers replaced attention, so the model must be "
                    "fine-tuned before its outputs mean anything. Inherits the source model's data and biases.",
        training=training,
        architecture={"Converted from": f"`{report.source_class}` (`{report.source}`)",
                      "Layers / width": f"{config.num_hidden_layers} / {config.hidden_size}"},
        tags=["converted"],
        repo_id=repo_id,
    )


def describe_source(report: ConversionReport) -> str:
    return str(report.source).rstrip("/").split("/")[-1] or report.source_class


def _variant_name(variant) -> str:
    return variant if isinstance(variant, str) else "hybrid"


def save_converted(model: nn.Module, output: str, *, companions=(), card: str, push_to_hub=False,
                   hub_model_id: str | None = None):
    """save_pretrained the model (safetensors) and its tokenizer / image processor, write README.md, maybe push."""
    model.save_pretrained(output)
    for companion in companions:
        companion.save_pretrained(output)
    with open(os.path.join(output, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
    if push_to_hub:
        from transformers.utils.hub import HfApi  # huggingface_hub's client, as transformers re-exports it

        repo_id = hub_model_id or os.path.basename(os.path.abspath(output))
        api = HfApi()
        repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=output, commit_message="Add AFT model converted with modeling_aft")
        return repo_id
    return None


__all__ = ["KEY_INITS", "QUERY_INITS", "ConversionReport", "copy_into", "reduce_key_heads", "unsupported_source"]
