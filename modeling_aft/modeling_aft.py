"""Attention Free Transformer models (Zhai et al., 2021) for transformers: a causal LM and an image classifier.

A block is pre-LN: x + AFT(LN(x)), then x + MLP(LN(x)). The AFT layer projects Q, K, V, mixes positions with one of
the four operators of `aft_ops` and projects back. Cached decoding lives in `aft_recurrent`.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    ImageClassifierOutput,
)

from .aft_ops import aft_conv1d, aft_conv2d, aft_full, aft_local, aft_simple
from .aft_recurrent import WindowState, aft_full_rows, conv1d_window_bias, window_state_from_prefix, window_step
from .configuration_aft import AFTConfig

# The number of tokens a cache has consumed is ours to track: transformers 5.24's linear-attention layers do not count.
_SEEN_TOKENS_ATTR = "_aft_seen_tokens"


def _record_cache_length(cache: Cache, length: int):
    setattr(cache, _SEEN_TOKENS_ATTR, length)
    # From 5.25 a linear-attention layer counts its tokens itself, but only through update_conv_state, which these
    # layers never call; generate() reads that count to decide which tokens of a continued prompt are new.
    for layer in cache.layers:
        if hasattr(layer, "cumulative_length_linear"):
            layer.cumulative_length_linear.fill_(length)


def _records_past(layer_cache) -> bool:
    # transformers 5.24 sets record_past too, but keeps no history and refuses to crop linear layers
    return getattr(layer_cache, "record_past", False) and hasattr(layer_cache, "recurrent_states_history")


def _recorded_steps(layer_cache, length: int) -> int:
    """How many of the last positions of a prefix assisted decoding may crop again (0 unless it records the past)."""
    if not _records_past(layer_cache):
        return 0
    return min(length, getattr(layer_cache, "recurrent_states_to_keep", None) or length)


class AFTPositionBias(nn.Module):
    """The learned pairwise bias w ∈ R^{T×T}: factorized w = u vᵀ (paper eq. 7) when rank > 0, else a full matrix."""

    def __init__(self, max_length: int, rank: int):
        super().__init__()
        self.rank = rank
        if rank > 0:
            self.u = nn.Parameter(torch.zeros(max_length, rank))
            self.v = nn.Parameter(torch.zeros(max_length, rank))
        else:
            self.weight = nn.Parameter(torch.zeros(max_length, max_length))

    def matrix(self, length: int) -> torch.Tensor:
        """The top-left (T, T) block."""
        if self.rank > 0:
            return self.u[:length] @ self.v[:length].T
        return self.weight[:length, :length]

    def local_operand(self, length: int):
        """What `aft_local` takes: the factors (u, v) when factorized, so no T×T bias or gradient is ever built."""
        if self.rank > 0:
            return self.u[:length], self.v[:length]
        return self.weight[:length, :length]

    def pairs(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """w[rows_b,i, cols_b,j] for per-sequence positions rows (B, Lq), cols (B, Lk) → (B, Lq, Lk)."""
        if self.rank > 0:
            return torch.bmm(self.u[rows], self.v[cols].transpose(1, 2))
        return self.weight[rows[:, :, None], cols[:, None, :]]


class AFTConvKernel(nn.Module):
    """AFT-conv's per-head kernel, reparameterized w = γ (w − mean) / std + β (paper eq. 8).

    γ and β start at 0, so a fresh layer has a zero bias and computes exactly AFT-simple.
    """

    def __init__(self, heads: int, size: int, spatial_dims: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, *([size] * spatial_dims)))
        self.gamma = nn.Parameter(torch.zeros(heads))
        self.beta = nn.Parameter(torch.zeros(heads))

    def forward(self) -> torch.Tensor:
        flat = self.weight.flatten(1)  # (h, s) or (h, s·s)
        normalized = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, unbiased=False, keepdim=True) + 1e-5)
        kernel = self.gamma[:, None] * normalized + self.beta[:, None]
        return kernel.view_as(self.weight)


@dataclass
class AFTSequenceContext:
    """What every layer needs to know about the current chunk of a token sequence.

    positions (B, L): position of each new token counted over real tokens only, so a left-padded row behaves like the
    same prompt alone. key_mask (B, L) or None: 1 = real token. history_mask / history_positions (B, S + L): the same
    over everything the cache has seen plus the chunk (AFT-full reads all of it). seen: tokens already in the cache.
    """

    positions: torch.Tensor
    key_mask: torch.Tensor | None
    history_mask: torch.Tensor | None
    history_positions: torch.Tensor
    cache: Cache | None
    seen: int


def _is_valid_first(mask: torch.Tensor) -> bool:
    """True when every row is real tokens followed by padding (so indices already equal positions)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def _compact_rows(mask: torch.Tensor) -> torch.Tensor:
    """Per-row permutation that moves real tokens to the front, in order: index t then holds position t."""
    return torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices


def _gather_rows(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))


class AFTLayer(nn.Module):
    """Q, K, V projections → AFT operator → output projection. K has one channel per head for AFT-conv (eq. 6)."""

    def __init__(self, config: AFTConfig, variant: str):
        super().__init__()
        dim = config.hidden_size
        self.variant = variant
        self.is_image = config.is_image_model
        self.key_dim = config.num_aft_heads if variant == "conv" else dim
        self.window = {"simple": 1, "local": config.window_size, "conv": config.window_size, "full": None}[variant]
        self.q_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(dim, self.key_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(dim, dim)
        if variant in ("full", "local"):
            self.position_bias = AFTPositionBias(config.max_position_embeddings, config.position_bias_rank)
        if variant == "conv":
            self.conv_kernel = AFTConvKernel(config.num_aft_heads, config.window_size, 2 if self.is_image else 1)

    def forward(self, x: torch.Tensor, context: AFTSequenceContext | None) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.is_image:
            return self.o_proj(self._image(q, k, v))  # (B, H, W, D)
        layer_cache = None if context.cache is None else context.cache.layers[self.layer_idx]
        if layer_cache is not None and context.seen > 0:
            y = self._decode(q, k, v, context, layer_cache)
        else:
            y = self._causal(q, k, v, context.key_mask)
            if layer_cache is not None:
                self._store_prefix(q, k, v, context, layer_cache)
        return self.o_proj(y)

    # -- full sequences ---------------------------------------------------------------------------------------------
    def _causal(self, q, k, v, key_mask):  # (B, T, D) each, k (B, T, Dk)
        if self.variant == "simple":
            return aft_simple(q, k, v, causal=True, key_mask=key_mask)
        if self.variant == "conv":
            return aft_conv1d(q, k, v, self.conv_kernel(), causal=True, key_mask=key_mask)
        # full / local: the bias is indexed by absolute position, so padding must not shift real tokens.
        order = None
        if key_mask is not None and not _is_valid_first(key_mask):
            order = _compact_rows(key_mask)
            q, k, v = (_gather_rows(t, order) for t in (q, k, v))
            key_mask = torch.gather(key_mask, 1, order)
        length = q.shape[1]
        if self.variant == "full":
            y = aft_full(q, k, v, self.position_bias.matrix(length), causal=True, key_mask=key_mask)
        else:
            y = aft_local(q, k, v, self.position_bias.local_operand(length), self.window, causal=True,
                          key_mask=key_mask)
        if order is not None:
            y = torch.empty_like(y).scatter_(1, order[..., None].expand_as(y), y)
        return y

    def _image(self, q, k, v):  # (B, H, W, D) each, k (B, H, W, Dk)
        if self.variant == "conv":
            return aft_conv2d(q, k, v, self.conv_kernel())
        batch, rows, cols, dim = q.shape
        q, k, v = (t.reshape(batch, rows * cols, t.shape[-1]) for t in (q, k, v))
        if self.variant == "simple":
            y = aft_simple(q, k, v, causal=False)
        elif self.variant == "full":
            y = aft_full(q, k, v, self.position_bias.matrix(rows * cols), causal=False)
        else:
            y = aft_local(q, k, v, self.position_bias.local_operand(rows * cols), self.window, causal=False)
        return y.view(batch, rows, cols, dim)

    # -- cached decoding --------------------------------------------------------------------------------------------
    # Assisted / prompt-lookup decoding (transformers >= 5.25) feeds a few draft tokens, then crops the rejected ones
    # off the cache: a linear-attention layer then takes its window back from conv_states[..., -n - (s-1):-n] and its
    # running sums from recurrent_states_history[-n]. So while the cache records its past, conv_states grows by one
    # column per token and every step's running sums are kept.
    def _store_prefix(self, q, k, v, context, layer_cache):
        if self.variant == "full":
            layer_cache.update(k, v)
            return
        length = k.shape[1]
        split = length - _recorded_steps(layer_cache, length)
        prefix_mask = None if context.key_mask is None else context.key_mask[:, :split]
        self._write_window_state(layer_cache, window_state_from_prefix(k[:, :split], v[:, :split], prefix_mask, self.window))
        if split < length:
            self._step_window(q, k, v, context, layer_cache, start=split)

    def _decode(self, q, k, v, context, layer_cache):
        if self.variant == "full":
            keys, values = layer_cache.update(k, v)  # (B, S + L, D)
            return self._full_rows(q, keys, values, context)
        return self._step_window(q, k, v, context, layer_cache, start=0)

    def _step_window(self, q, k, v, context, layer_cache, start: int):
        """Steps positions start… of q, k, v (B, L, ·) through the layer's window state; returns their outputs."""
        recurrent, window = layer_cache.recurrent_states[0], layer_cache.conv_states[0]
        state = WindowState.unpack(recurrent, window[..., window.shape[-1] - (self.window - 1):], self.key_dim, k.dtype)
        recording = _records_past(layer_cache)
        outputs, history = [], [recurrent]
        for i in range(start, q.shape[1]):  # only the new tokens: the prefix lives in the state
            key_valid = None if context.key_mask is None else context.key_mask[:, i]
            bias = self._window_bias(context.positions[:, i], k)
            y, state = window_step(q[:, i], k[:, i], v[:, i], bias, state, key_valid=key_valid)
            outputs.append(y)
            if recording:
                history.append(state.pack()[0])
        self._write_window_state(layer_cache, state)
        if recording:
            layer_cache.recurrent_states_history[0].extend(history[:-1])
            if self.window > 1:  # AFT-simple keeps no window: its empty conv state crops to itself
                valid = k.new_ones(k[:, start:, 0].shape, dtype=torch.bool)
                if context.key_mask is not None:
                    valid = context.key_mask[:, start:].bool()
                stepped = WindowState.pack_window(k[:, start:], v[:, start:], valid)
                layer_cache.conv_states[0] = torch.cat([window, stepped], dim=-1)
        return torch.stack(outputs, dim=1)

    def _write_window_state(self, layer_cache, state: WindowState):
        recurrent, window = state.pack()
        layer_cache.recurrent_states[0], layer_cache.conv_states[0] = recurrent, window
        layer_cache.is_recurrent_states_initialized[0] = layer_cache.is_conv_states_initialized[0] = True
        layer_cache.conv_kernel_size[0] = self.window - 1  # how many columns crop keeps
        # update_recurrent_state would not set this, and a layer without it is treated as empty by transformers.
        layer_cache.has_previous_state[0] = True
        layer_cache.device, layer_cache.dtype = recurrent.device, recurrent.dtype

    def _window_bias(self, positions: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Bias of the s window slots (oldest first) for one new token per row at `positions` (B,) → (B, s, 1|h)."""
        batch = positions.shape[0]
        if self.variant == "simple":
            return k.new_zeros(batch, 1, 1)
        if self.variant == "conv":
            return conv1d_window_bias(self.conv_kernel(), batch)
        offsets = torch.arange(self.window - 1, -1, -1, device=positions.device)  # slot i sits t − t' = s−1−i back
        key_positions = positions[:, None] - offsets  # (B, s)
        bias = self.position_bias.pairs(positions[:, None], key_positions.clamp(min=0))[:, 0]  # (B, s)
        return torch.where(key_positions >= 0, bias, 0.0)[..., None]

    def _full_rows(self, q, keys, values, context):
        batch, new, _ = q.shape
        total = keys.shape[1]
        bias = self.position_bias.pairs(context.positions, context.history_positions)  # (B, L, S + L)
        key_index = torch.arange(total, device=q.device)
        query_index = torch.arange(total - new, total, device=q.device)
        visible = (key_index[None, :] <= query_index[:, None]).expand(batch, -1, -1)  # causal within the chunk
        if context.history_mask is not None:
            visible = visible & context.history_mask[:, None, :].bool()
        return aft_full_rows(q, keys, values, bias, visible)


class AFTMLP(nn.Module):
    def __init__(self, config: AFTConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x):
        return self.dropout(self.fc_out(self.act(self.fc_in(x))))


class AFTBlock(GradientCheckpointingLayer):
    def __init__(self, config: AFTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.aft = AFTLayer(config, config.layer_variants[layer_idx])
        self.aft.layer_idx = layer_idx
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = AFTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, context: AFTSequenceContext | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.dropout(self.aft(self.ln_1(hidden_states), context))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class AFTPreTrainedModel(PreTrainedModel):
    config: AFTConfig
    config_class = AFTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AFTBlock"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        try:
            model = super().from_pretrained(*args, **kwargs)
        except Exception as error:
            # safetensors' own message names no file; matched by name since remote code may not import safetensors.
            if type(error).__name__ != "SafetensorError":
                raise
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise OSError(
                f"could not read the weights of {where}: model.safetensors is truncated or corrupted ({error})"
            ) from error
        _realign_tensors(model)
        return model

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AFTPositionBias):
            if module.rank > 0:
                init.normal_(module.u, mean=0.0, std=1e-2)
                init.normal_(module.v, mean=0.0, std=1e-2)
            else:
                init.zeros_(module.weight)
        elif isinstance(module, AFTConvKernel):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.gamma)
            init.zeros_(module.beta)


def _realign_tensors(model: nn.Module, alignment: int = 64):
    """Move parameters and buffers that start off an `alignment`-byte boundary into storage of their own.

    Loaded tensors can view the checkpoint's bytes at 8-byte offsets (safetensors pads its header to 8). BLAS on
    some CPUs (AMD EPYC here) then takes another path for small products such as the position bias u vᵀ and rounds
    differently, so a reloaded model would not reproduce the saved model's logits bit for bit.
    """
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.data_ptr() % alignment:
                tensor.data = tensor.data.clone()  # fresh allocations are 64-byte aligned; tied weights stay tied


def _fail(name: str, value, why: str):
    raise ValueError(f"{name}={value}: {why}")


class AFTModel(AFTPreTrainedModel):
    """The AFT trunk: token (or patch) embeddings → AFT blocks → final LayerNorm."""

    def __init__(self, config: AFTConfig):
        super().__init__(config)
        dim = config.hidden_size
        if config.is_image_model:
            self.patch_embed = nn.Conv2d(config.num_channels, dim, config.patch_size, stride=config.patch_size)
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, dim)
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, dim)
        self.dropout = nn.Dropout(config.embedding_dropout_prob)
        self.layers = nn.ModuleList(AFTBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return getattr(self, "embed_tokens", None)

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values is not None or self.config.is_image_model:
            hidden, context = self._embed_image(pixel_values), None
            cache = None
        else:
            hidden, context, cache = self._embed_tokens(
                input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache
            )
        all_hidden = []
        for block in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden)
            hidden = block(hidden, context)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        if context is None:  # image: report (B, H·W, D) like other vision models
            hidden, all_hidden = hidden.flatten(1, 2), [h.flatten(1, 2) for h in all_hidden]
        if cache is not None:
            _record_cache_length(cache, context.seen + context.positions.shape[1])
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden, cache=cache, hidden_states=tuple(all_hidden) if output_hidden_states else None
        )
        return output if return_dict else output.to_tuple()

    # -- inputs -----------------------------------------------------------------------------------------------------
    def _embed_image(self, pixel_values: torch.Tensor | None) -> torch.Tensor:
        config = self.config
        if not config.is_image_model:
            raise ValueError("pixel_values given to a language model (config.image_size is None)")
        if pixel_values is None:
            raise ValueError("an image model needs pixel_values")
        if pixel_values.dim() != 4 or pixel_values.shape[0] == 0:
            _fail("pixel_values.shape", tuple(pixel_values.shape), "expected a non-empty (B, C, H, W) batch")
        channels, height, width = pixel_values.shape[1:]
        if channels != config.num_channels:
            _fail("pixel_values channels", channels, f"config.num_channels is {config.num_channels}")
        if height % config.patch_size or width % config.patch_size:
            _fail("pixel_values size", (height, width), f"must be divisible by patch_size={config.patch_size}")
        fixed_size = config.position_embedding_type == "learned" or any(
            v in ("full", "local") for v in config.layer_variants
        )
        if fixed_size and (height, width) != (config.image_size, config.image_size):
            _fail("pixel_values size", (height, width),
                  f"this model has learned positions/biases for {config.image_size}x{config.image_size} images only; "
                  "AFT-conv without position embeddings accepts any size")
        patches = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).permute(0, 2, 3, 1)  # (B, H, W, D)
        if config.position_embedding_type == "learned":
            rows, cols = patches.shape[1:3]
            patches = patches + self.embed_positions.weight[: rows * cols].view(rows, cols, -1)
        return self.dropout(patches)

    def _embed_tokens(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache):
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens.dim() != (2 if input_ids is not None else 3) or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            _fail("input shape", tuple(tokens.shape), "expected a non-empty (batch, length) input")
        use_cache = use_cache if use_cache is not None else (config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        seen = self._seen_tokens(cache)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != tokens.shape[0]:
                _fail("attention_mask.shape", tuple(attention_mask.shape),
                      f"expected (batch, past + new) = ({tokens.shape[0]}, {seen + tokens.shape[1]})")
            if attention_mask.shape[1] != seen + tokens.shape[1]:
                _fail("attention_mask.shape", tuple(attention_mask.shape),
                      f"expected (batch, past + new) = ({tokens.shape[0]}, {seen + tokens.shape[1]})")
        batch, length = tokens.shape[:2]
        if input_ids is not None:
            input_ids = tokens
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= config.vocab_size:
                _fail("input_ids", high if high >= config.vocab_size else low,
                      f"token ids must lie in [0, vocab_size={config.vocab_size})")
            inputs_embeds = self.embed_tokens(input_ids)
        else:
            inputs_embeds = tokens

        if attention_mask is not None:
            history_mask = attention_mask.bool()
            history_positions = (history_mask.long().cumsum(1) - 1).clamp(min=0)
            key_mask = history_mask[:, -length:]
            if bool(history_mask.all()):
                history_mask = key_mask = None
        else:
            history_mask = key_mask = None
            history_positions = torch.arange(seen + length, device=tokens.device).expand(batch, -1)
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
                _fail("position_ids.shape", tuple(position_ids.shape), f"expected ({batch}, {length})")
            if int(position_ids.min()) < 0:
                _fail("position_ids", int(position_ids.min()), "positions must be >= 0")
        positions = history_positions[:, -length:] if position_ids is None else position_ids.expand(batch, -1)
        if config.needs_positions and int(positions.max()) >= config.max_position_embeddings:
            _fail("sequence length", int(positions.max()) + 1,
                  f"exceeds max_position_embeddings={config.max_position_embeddings} of this model's learned "
                  "positions/bias (AFT-simple/conv with position_embedding_type='none' have no limit)")
        if config.position_embedding_type == "learned":
            inputs_embeds = inputs_embeds + self.embed_positions(positions)
        context = AFTSequenceContext(positions, key_mask, history_mask, history_positions, cache, seen)
        return self.dropout(inputs_embeds), context, cache

    @staticmethod
    def _seen_tokens(cache: Cache | None) -> int:
        if cache is None or not cache.layers:
            return 0
        first = cache.layers[0]
        if hasattr(first, "cumulative_length_linear"):  # transformers >= 5.25 counts (and crops) it with us
            return int(first.cumulative_length_linear)
        if not hasattr(first, "has_previous_state"):  # keys and values: their length is the truth, also after a crop
            return first.get_seq_length() if first.is_initialized else 0
        return getattr(cache, _SEEN_TOKENS_ATTR, 0) if any(first.has_previous_state.values()) else 0


class AFTForCausalLM(AFTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AFTConfig):
        super().__init__(config)
        if config.is_image_model:
            _fail("config.image_size", config.image_size, "AFTForCausalLM needs a token model (image_size=None)")
        self.model = AFTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, **kwargs):
        # transformers cannot count the tokens of a cache whose layers are all linear, so when generation restarts from
        # a returned cache it would feed the whole sequence again: keep only what the cache has not seen.
        seen = AFTModel._seen_tokens(cache)
        if next_sequence_length is None and seen and kwargs.get("inputs_embeds") is None:
            next_sequence_length = input_ids.shape[1] - seen
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, **kwargs
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                _fail("labels.shape", tuple(labels.shape), f"must equal the input's (batch, length) {tuple(logits.shape[:2])}")
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()


class AFTForImageClassification(AFTPreTrainedModel):
    main_input_name = "pixel_values"

    def __init__(self, config: AFTConfig):
        super().__init__(config)
        if not config.is_image_model:
            _fail("config.image_size", config.image_size, "AFTForImageClassification needs an image size")
        self.num_labels = config.num_labels
        self.model = AFTModel(config)
        # The paper's AFT-conv drops the class token: the head reads the mean over patches.
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        pooled = outputs.last_hidden_state.mean(dim=1)  # (B, D)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            if labels.shape[0] != logits.shape[0]:
                _fail("labels.shape", tuple(labels.shape), f"needs one label per image ({logits.shape[0]})")
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()


__all__ = ["AFTPreTrainedModel", "AFTModel", "AFTForCausalLM", "AFTForImageClassification"]
