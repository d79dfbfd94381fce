"""Start an AFT image classifier (`AFTForImageClassification`) from a pretrained ViT or DeiT.

    from modeling_aft.convert_vit import convert_vit_to_aft
    model = convert_vit_to_aft("path/to/vit", aft_variant="conv")   # or a loaded model, or a Hub id

Sources: `ViTForImageClassification`, `DeiTForImageClassification`, `DeiTForImageClassificationWithTeacher` (the
distilled DeiT) and the bare trunks `ViTModel` / `DeiTModel`. Weights are read from the loaded modules, never from
raw checkpoint keys (transformers 5 renames ViT's keys at load time).

A ViT/DeiT layer is pre-LN like an AFT block, so these are copied bit for bit (all already in nn.Linear / Conv2d
layout, nothing transposed): the patch projection → `model.patch_embed`, layernorm_before / layernorm_after → ln_1 /
ln_2, attention's V and output projections → v_proj / o_proj and, by default, Q → q_proj, fc1 / fc2 → fc_in /
fc_out, the final layernorm → `model.norm`, and the classifier.

What cannot be carried over, and how it starts instead:

- The class token (and DeiT's distillation token) is dropped: the AFT head reads the mean over patch outputs. The
  copied classifier therefore sees a mean-pooled feature instead of the class token's, and fine-tuning adapts it.
  A distilled DeiT's two heads are averaged into one (its inference logits are the average of both heads).
  A bare trunk gets a new randomly initialised head for `num_labels` (or `id2label`) given as an override.
- Position embeddings: ViT's are carried over by default into learned absolute positions
  (position_embedding_type="learned"), the patch part only (the class-token row is dropped; bicubic-interpolated
  when the target patch grid differs). This holds for AFT-conv too, although the paper's AFT-conv has no position
  embeddings: measured on vit-mnist5k (docs/benchmarks/transfer.md), a position-free AFT-conv starts as a bag of
  patches (its kernels start at zero bias), the copied MLPs were trained on positional inputs, and after one epoch
  it is no better than scratch, while keeping the positions transfers clearly. Pass
  position_embedding_type="none" to drop them and get an AFT-conv that accepts any image size.
- K: copied for full/local/simple (per-feature, like attention). AFT-conv's K has one channel per AFT head (paper
  eq. 6): by default the mean of the source K rows (weight and bias) of that head's features (`key_init="mean"`), or
  re-initialised (`key_init="random"`; `query_init="random"` re-initialises Q), as the paper re-initialised Q/K.
- Position biases / conv kernels: AFT-conv kernels start with γ = β = 0, a zero bias, so a fresh layer computes
  exactly AFT-simple; AFT-full/local's factorized bias starts near zero. The paper also re-initialised position
  embeddings and the class token when starting from a pretrained model.
- The pooler of a bare `ViTModel` and its mask token have no AFT counterpart and are dropped.
"""

import os

import torch
import torch.nn.functional as F
from transformers import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    PreTrainedModel,
    ViTForImageClassification,
    ViTModel,
)

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
from .modeling_aft import AFTForImageClassification

_SOURCE_CLASSES = {
    cls.__name__: cls
    for cls in (ViTForImageClassification, ViTModel, DeiTForImageClassification,
                DeiTForImageClassificationWithTeacher, DeiTModel)
}
SUPPORTED_SOURCES = {
    "vit": ("ViTForImageClassification", "ViTModel"),
    "deit": ("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher", "DeiTModel"),
}
_DEFAULT_CLASS = {"vit": "ViTForImageClassification", "deit": "DeiTForImageClassification"}
DEFAULT_IMAGE_WINDOW = 7  # kernel side of image AFT-conv: odd, since image kernels are centred


def _square(value, field: str) -> int:
    """ViT configs allow (height, width); the AFT image model is square."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{field}={value}: only square images / patches can be converted")
        value = value[0]
    return int(value)


def _has_head(source: PreTrainedModel) -> bool:
    return hasattr(source, "classifier") or hasattr(source, "cls_classifier")


def aft_config_from_vit(vit_config, aft_variant="conv", *, has_head=True, **overrides) -> AFTConfig:
    """The AFT config that mirrors a ViT/DeiT config (sizes, eps, activation, image, labels); overrides win."""
    derived = dict(
        vocab_size=None,
        hidden_size=vit_config.hidden_size,
        num_hidden_layers=vit_config.num_hidden_layers,
        intermediate_size=vit_config.intermediate_size,
        hidden_act=vit_config.hidden_act,
        layer_norm_eps=vit_config.layer_norm_eps,
        hidden_dropout_prob=vit_config.hidden_dropout_prob,
        embedding_dropout_prob=vit_config.hidden_dropout_prob,  # ViT applies it after the embeddings too
        initializer_range=vit_config.initializer_range,
        aft_variant=aft_variant,
        window_size=DEFAULT_IMAGE_WINDOW,
        num_aft_heads=vit_config.num_attention_heads,
        # Kept even for AFT-conv (see the module docstring): without them the copied trunk does not transfer.
        position_embedding_type="learned",
        qkv_bias=vit_config.qkv_bias,
        image_size=_square(vit_config.image_size, "image_size"),
        patch_size=_square(vit_config.patch_size, "patch_size"),
        num_channels=vit_config.num_channels,
    )
    if has_head:
        derived.update(id2label=dict(vit_config.id2label), label2id=dict(vit_config.label2id))
    elif "num_labels" not in overrides and "id2label" not in overrides:
        raise ValueError("a bare ViTModel/DeiTModel has no classifier: pass num_labels=... (or id2label=...)")
    return AFTConfig(**apply_overrides(derived, overrides))


def load_vit(source) -> PreTrainedModel:
    """A supported ViT/DeiT model as is, or loaded from a folder / Hub id (safetensors only: never unpickled)."""
    if isinstance(source, (str, os.PathLike)):
        config = load_source_config(source)
        default = _DEFAULT_CLASS.get(config.model_type, "ViTForImageClassification")
        vit_class = pick_source_class(config, _SOURCE_CLASSES, default=default)
        check_model_type(config, SUPPORTED_SOURCES, vit_class.__name__)
        return vit_class.from_pretrained(source, use_safetensors=True)
    check_model_type(getattr(source, "config", None), SUPPORTED_SOURCES, type(source).__name__)
    return source


def patch_positions(position_embeddings: torch.Tensor, num_special_tokens: int, grid: int) -> torch.Tensor:
    """ViT's (1, special + g·g, D) positions → (grid·grid, D): drop the special tokens' rows, resize the g×g grid."""
    patches = position_embeddings[0, num_special_tokens:]
    side = int(round(patches.shape[0] ** 0.5))
    if side * side != patches.shape[0]:
        raise ValueError(f"embed_positions: {patches.shape[0]} source patch positions do not form a square grid")
    if side == grid:
        return patches
    image = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # as ViT's interpolate_pos_encoding
    resized = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(patches.dtype)


def _head_params(source: PreTrainedModel, model: AFTForImageClassification, notes: list[str]) -> dict:
    if hasattr(source, "cls_classifier"):  # distilled DeiT: inference logits = mean of the two heads = one mean head
        heads = (source.cls_classifier, source.distillation_classifier)
        weight, bias = (torch.stack([getattr(h, name) for h in heads]).mean(0) for name in ("weight", "bias"))
        notes.append("classifier = mean of DeiT's cls_classifier and distillation_classifier")
    elif hasattr(source, "classifier"):
        weight, bias = source.classifier.weight, source.classifier.bias
    else:
        notes.append("classifier: new, randomly initialised (the source is a bare trunk)")
        return {}
    if model.config.num_labels != weight.shape[0]:
        notes.append(f"classifier: re-initialised for {model.config.num_labels} labels (the source has {weight.shape[0]})")
        return {}
    return linear_params("classifier", weight, bias)


def _trunk(source: PreTrainedModel):
    return getattr(source, "vit", None) or getattr(source, "deit", None) or source


def _dropped_source_parts(source: PreTrainedModel, config: AFTConfig) -> list[str]:
    embeddings, trunk = _trunk(source).embeddings, _trunk(source)
    dropped = [name for name, present in (
        ("class token", True),
        ("distillation token", hasattr(embeddings, "distillation_token")),
        ("mask token", getattr(embeddings, "mask_token", None) is not None),
        ("position embeddings", config.position_embedding_type == "none"),
        ("pooler", getattr(trunk, "pooler", None) is not None),
    ) if present]
    return dropped


def vit_params(source: PreTrainedModel, model: AFTForImageClassification, *, query_init: str, key_init: str,
               notes: list[str]) -> dict:
    """{AFT parameter name: source tensor in the AFT layout} for everything ViT/DeiT can provide."""
    trunk, config = _trunk(source), model.config
    if len(trunk.layers) != config.num_hidden_layers:
        raise ValueError(f"num_hidden_layers: AFT has {config.num_hidden_layers}, the source has {len(trunk.layers)}")
    embeddings = trunk.embeddings
    params = module_params("model.patch_embed", embeddings.patch_embeddings.projection)
    # ViT has [CLS]; DeiT [CLS, DIST]: their positions precede the patches' and are dropped with the tokens.
    num_special = 1 + hasattr(embeddings, "distillation_token")
    if config.position_embedding_type == "learned":
        params["model.embed_positions.weight"] = patch_positions(
            embeddings.position_embeddings, num_special, config.patch_grid[0])
        notes.append("position embeddings: the patch rows copied (class-token row dropped)")
    else:
        notes.append("position embeddings dropped (position_embedding_type='none')")
    for i, (layer, target) in enumerate(zip(trunk.layers, model.model.layers)):
        prefix, attention = f"model.layers.{i}", layer.attention
        q, k, v = ((proj.weight, proj.bias) for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
        params.update(module_params(f"{prefix}.ln_1", layer.layernorm_before))
        params.update(qkv_params(f"{prefix}.aft", target.aft, q, k, v, query_init=query_init, key_init=key_init))
        params.update(module_params(f"{prefix}.aft.o_proj", attention.o_proj))
        params.update(module_params(f"{prefix}.ln_2", layer.layernorm_after))
        params.update(module_params(f"{prefix}.mlp.fc_in", layer.mlp.fc1))
        params.update(module_params(f"{prefix}.mlp.fc_out", layer.mlp.fc2))
    params.update(module_params("model.norm", trunk.layernorm))
    params.update(_head_params(source, model, notes))
    return params


def convert_vit_to_aft(source, *, aft_variant="conv", query_init="copy", key_init="mean",
                       **overrides) -> AFTForImageClassification:
    """An `AFTForImageClassification` initialised from ViT/DeiT `source` (model, folder or Hub id).

    `aft_variant` and `overrides` (any AFTConfig field, e.g. num_labels for a bare trunk) shape the target; the rest
    follows the source config. The result is in eval mode and carries `model.aft_conversion` (a ConversionReport).
    """
    check_qk_init(query_init, key_init)
    vit = load_vit(source)
    config = aft_config_from_vit(vit.config, aft_variant, has_head=_has_head(vit), **overrides)
    model = AFTForImageClassification(config).to(source_dtype(vit))
    notes = [qk_note(query_init, key_init), FRESH_POSITION_MIXING_NOTE,
             "the head reads the mean over patches (no class token)"]
    params = vit_params(vit, model, query_init=query_init, key_init=key_init, notes=notes)
    report = ConversionReport(
        source=source_name(source, vit),
        source_class=type(vit).__name__,
        dropped=_dropped_source_parts(vit, config),
        notes=notes,
    )
    return finish_conversion(model, params, report)


__all__ = ["convert_vit_to_aft", "aft_config_from_vit", "SUPPORTED_SOURCES"]
