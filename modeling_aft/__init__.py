"""modeling-aft: the Attention Free Transformer as a Hugging Face transformers model family.

Importing the package registers the `aft` model type with the Auto classes, and marks the classes for remote code so
that `save_pretrained` / `push_to_hub` copy these modules next to the weights (loadable with `trust_remote_code=True`
where this package is not installed).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

from .aft_ops import aft_conv1d, aft_conv2d, aft_full, aft_local, aft_simple
from .configuration_aft import AFTConfig
from .modeling_aft import AFTForCausalLM, AFTForImageClassification, AFTModel, AFTPreTrainedModel

AutoConfig.register(AFTConfig.model_type, AFTConfig, exist_ok=True)
for _auto, _model in (
    (AutoModel, AFTModel),
    (AutoModelForCausalLM, AFTForCausalLM),
    (AutoModelForImageClassification, AFTForImageClassification),
):
    _auto.register(AFTConfig, _model, exist_ok=True)
    _model.register_for_auto_class(_auto.__name__)
AFTConfig.register_for_auto_class("AutoConfig")

__all__ = [
    "AFTConfig",
    "AFTModel",
    "AFTPreTrainedModel",
    "AFTForCausalLM",
    "AFTForImageClassification",
    "aft_full",
    "aft_local",
    "aft_simple",
    "aft_conv1d",
    "aft_conv2d",
]
