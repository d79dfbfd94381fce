"""Configuration of the Attention Free Transformer (Zhai et al., 2021, arXiv 2105.14103)."""

from transformers import PreTrainedConfig

AFT_VARIANTS = ("full", "local", "simple", "conv")
POSITION_EMBEDDING_TYPES = ("learned", "none")

# transformers picks a cache layer per entry of `layer_types`: AFT-full must keep every past K/V (its bias row changes
# with t), the others only keep running sums plus the last s positions, which is what a linear-attention layer holds.
CACHE_LAYER_TYPE = {
    "full": "full_attention",
    "local": "linear_attention",
    "simple": "linear_attention",
    "conv": "linear_attention",
}


AUTO_MAP = {
    "AutoConfig": "configuration_aft.AFTConfig",
    "AutoModel": "modeling_aft.AFTModel",
    "AutoModelForCausalLM": "modeling_aft.AFTForCausalLM",
    "AutoModelForImageClassification": "modeling_aft.AFTForImageClassification",
}


def _fail(field: str, value, why: str):
    raise ValueError(f"AFTConfig.{field}={value!r}: {why}")


class AFTConfig(PreTrainedConfig):
    r"""
    Configuration of an AFT model: a causal LM over tokens (`vocab_size` set) or a non-causal image classifier over a
    grid of patches (`image_size` set).

    Args:
        aft_variant (`str` or `list[str]`): "full" | "local" | "simple" | "conv", or one entry per layer (hybrids).
        window_size (`int`, defaults to 32 for text, 11 for images): s, the band of the learned bias for AFT-local and the kernel size of AFT-conv (odd for
            image models, whose kernel is centred).
        num_aft_heads (`int`): h, the number of AFT-conv heads; K has one channel per head (paper eq. 6).
        position_bias_rank (`int`): d' of the factorized bias w = u vᵀ for AFT-full / AFT-local; 0 learns the full T×T.
        max_position_embeddings (`int`): longest sequence for learned positions and for the T×T bias of full/local.
        position_embedding_type (`str`): "learned" absolute positions, or "none" (AFT-simple/conv then run at any length).
        image_size / patch_size / num_channels: the image model's input; None `image_size` means a language model.
    """

    model_type = "aft"

    vocab_size: int | None = 256
    hidden_size: int = 256
    num_hidden_layers: int = 4
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    hidden_dropout_prob: float = 0.0
    embedding_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    aft_variant: str | list[str] = "conv"
    window_size: int | None = None
    num_aft_heads: int = 8
    position_bias_rank: int = 128
    max_position_embeddings: int | None = 1024
    position_embedding_type: str = "none"
    qkv_bias: bool = True
    image_size: int | None = None
    patch_size: int = 16
    num_channels: int = 3
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.window_size is None:  # the paper's AFT-local-32 for text; image kernels are centred, hence odd
            self.window_size = 11 if self.is_image_model else 32
        if isinstance(self.aft_variant, tuple):
            self.aft_variant = list(self.aft_variant)
        self._validate_aft()
        derived = [CACHE_LAYER_TYPE[v] for v in self.layer_variants]
        if self.layer_types is not None and list(self.layer_types) != derived:
            _fail("layer_types", self.layer_types, f"must follow aft_variant, i.e. be {derived}")
        self.layer_types = derived
        # save_pretrained only records the auto class it was called through; remote-code users need all four.
        self.auto_map = dict(AUTO_MAP)
        super().__post_init__(**kwargs)

    @property
    def layer_variants(self) -> list[str]:
        if isinstance(self.aft_variant, str):
            return [self.aft_variant] * self.num_hidden_layers
        return list(self.aft_variant)

    @property
    def is_image_model(self) -> bool:
        return self.image_size is not None

    @property
    def patch_grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def needs_positions(self) -> bool:
        """Whether some part of the model is tied to absolute positions (and so to max_position_embeddings)."""
        return self.position_embedding_type == "learned" or any(v in ("full", "local") for v in self.layer_variants)

    def _validate_aft(self):
        for field in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_aft_heads", "patch_size",
                      "num_channels"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(field, value, "must be a positive integer")
        variants = self.aft_variant if isinstance(self.aft_variant, list) else [self.aft_variant]
        for variant in variants:
            if variant not in AFT_VARIANTS:
                _fail("aft_variant", self.aft_variant,
                      f"unknown variant {variant!r}; expected one of {AFT_VARIANTS} (or a list of them, one per layer);"
                      " a checkpoint from a newer modeling-aft may need an upgrade")
        if isinstance(self.aft_variant, list) and len(self.aft_variant) != self.num_hidden_layers:
            _fail("aft_variant", self.aft_variant,
                  f"a per-layer list needs num_hidden_layers={self.num_hidden_layers} entries")
        if not isinstance(self.window_size, int) or self.window_size < 1:
            _fail("window_size", self.window_size, "must be an integer >= 1")
        if self.position_bias_rank is None or self.position_bias_rank < 0:
            _fail("position_bias_rank", self.position_bias_rank, "must be >= 0 (0 = a full T×T bias)")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            _fail("position_embedding_type", self.position_embedding_type, f"expected one of {POSITION_EMBEDDING_TYPES}")
        if self.hidden_size % self.num_aft_heads and "conv" in self.layer_variants:
            _fail("num_aft_heads", self.num_aft_heads,
                  f"must divide hidden_size={self.hidden_size} (each AFT-conv head owns hidden_size/h features)")
        for field in ("hidden_dropout_prob", "embedding_dropout_prob"):
            if not 0.0 <= getattr(self, field) < 1.0:
                _fail(field, getattr(self, field), "must be in [0, 1)")
        if self.is_image_model:
            self._validate_image()
        elif self.vocab_size is None or self.vocab_size < 1:
            _fail("vocab_size", self.vocab_size, "a language model needs vocab_size >= 1 (or set image_size)")
        if self.needs_positions and (self.max_position_embeddings is None or self.max_position_embeddings < 1):
            _fail("max_position_embeddings", self.max_position_embeddings,
                  "learned positions and the AFT-full/local bias need a fixed maximum length >= 1")

    def _validate_image(self):
        if not isinstance(self.image_size, int) or self.image_size < 1:
            _fail("image_size", self.image_size, "must be a positive integer")
        if self.image_size % self.patch_size:
            _fail("image_size", self.image_size, f"must be divisible by patch_size={self.patch_size}")
        if "conv" in self.layer_variants and self.window_size % 2 == 0:
            _fail("window_size", self.window_size, "image AFT-conv kernels are centred, so the size must be odd")
        rows, cols = self.patch_grid
        # The image bias and positions cover exactly the patch grid; derived, so users never size a T×T bias by hand.
        self.max_position_embeddings = rows * cols


__all__ = ["AFTConfig"]
