"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), written out by hand.

The file follows the paper: masks (Section 3.2.3); the paper's parts, one class per idea, each docstring naming its
section; the stacks and models; the loss (Section 5.4); and last, the CPU kernels the parts use for speed, which
compute the same function up to float rounding. The model is a native `transformers` model (config, outputs, cache,
generation, save/load) and runs on transformers 4.57 and 5.4 onwards (the project's docs/compatibility.md): this file
ships to the Hub with the weights, so it imports torch, transformers and the config only (and, in `generate`,
decoding_seq2seq.py, the fast greedy/beam search, and in `save_pretrained`, pipeline.py, both shipped beside it).
"""

import contextvars
import copy
import math
import warnings

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_seq2seq import Seq2SeqTransformerConfig


# ------------------------------------------------------------------------------------------------------------------
# Masks and argument checks (Section 3.2.3)
# ------------------------------------------------------------------------------------------------------------------


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Teacher forcing: the decoder reads the target shifted one position right, starting from the start token."""
    if pad_token_id is None:  # it replaces the shifted labels' -100s
        raise ValueError("`labels` need `config.pad_token_id`, which is None: set it to the padding token's id.")
    shifted = labels.new_empty(labels.shape)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill_(shifted == -100, pad_token_id)


def attention_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    """The dtype attention scores are computed in: the autocast dtype when autocast is on, except for float64, which
    autocast leaves alone."""
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type) and hidden_states.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return hidden_states.dtype


def additive_mask(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask of blocked positions -> 0 where attended, the dtype's minimum where blocked (added to the scores).

    The dtype's minimum rather than -inf: a row whose keys are all blocked then gets a uniform softmax, never NaN."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, torch.finfo(dtype).min)


def padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, keys) 1/0 mask -> additive (batch, 1, 1, keys) mask: 0 where attended, the dtype's minimum where not.
    Any value but 0 attends, as in transformers' own masks (a mask of 2s or a bool mask means the same as 1s)."""
    return additive_mask(attention_mask[:, None, None, :] == 0, dtype)


def causal_mask(query_length: int, past_length, dtype: torch.dtype, device: torch.device, key_length=None) -> torch.Tensor:
    """Section 3.2.3: position i may attend to positions <= i ("preventing leftward information flow").

    `key_length` (default: past + new positions) is larger for a static cache, whose slots beyond the current
    position are future positions and therefore masked. `past_length` may be a 0-d tensor (a static cache's count).
    """
    key_positions = torch.arange(past_length + query_length if key_length is None else key_length, device=device)
    query_positions = torch.arange(query_length, device=device) + past_length
    future = key_positions[None, :] > query_positions[:, None]
    return additive_mask(future, dtype)[None, None]


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, name: str):
    """An id outside the vocabulary would index out of bounds deep inside the embedding; say which argument."""
    # Skipped on CUDA (a device-to-host sync per call) and while compiling/exporting (data-dependent control flow).
    if input_ids.numel() and not input_ids.is_cuda and not torch.compiler.is_compiling():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"`{name}` holds token id {high if high >= vocab_size else low}, outside [0, {vocab_size}).")


def check_mask_shape(mask: torch.Tensor, expected, name: str):
    if tuple(mask.shape) != tuple(expected):
        raise ValueError(f"`{name}` has shape {tuple(mask.shape)}, expected {tuple(expected)} (batch, length).")


def static_cache_slots(cache) -> int | None:
    """The number of key slots of a static self-attention cache (`cache_implementation="static"`), else None."""
    layers = getattr(getattr(cache, "self_attention_cache", None), "layers", None)
    return getattr(layers[0], "max_cache_len", None) if layers else None


def static_cache_mask(attention_mask, batch, length, past_length, slots, dtype, device) -> torch.Tensor:
    """The self-attention mask over all slots of a static cache: slots not yet written are future positions, which
    the causal mask hides; a 2D padding mask (of the tokens so far, or of every slot) covers the rest."""
    mask = causal_mask(length, past_length, dtype, device, key_length=slots)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] > slots:
            raise ValueError(
                f"`decoder_attention_mask` has shape {tuple(attention_mask.shape)}; with a static cache of {slots} "
                f"positions it must be (batch={batch}, length <= {slots})."
            )
        attention_mask = F.pad(attention_mask.to(dtype), (0, slots - attention_mask.shape[1]), value=1.0)
        mask = mask + padding_mask(attention_mask, dtype)
    return mask


def prepared_mask(mask: torch.Tensor, expected, dtype: torch.dtype) -> torch.Tensor:
    """A 4D (batch, 1 or heads, queries, keys) mask, used as given, as transformers' models do: boolean or integer
    (true or 1 where attended) or additive (floating point). transformers' `generate` prepares one with a static
    cache."""
    batch, queries, keys = expected
    if mask.shape[0] not in (1, batch) or mask.shape[2] != queries or mask.shape[3] != keys:
        raise ValueError(
            f"The 4D `decoder_attention_mask` has shape {tuple(mask.shape)}, expected ({batch}, 1 or heads, "
            f"{queries}, {keys}) (batch, heads, queries, keys)."
        )
    if not mask.is_floating_point():  # boolean, or 1/0 integers: where to attend
        return additive_mask(mask == 0, dtype)
    # A wider dtype's minimum (a float32 mask under bf16/fp16 autocast or weights) would round to -inf, and a row
    # whose keys are all blocked would then give NaN: blocked stays the dtype's minimum, as in `additive_mask`.
    # Clamped in a dtype that holds both minimums: a half mask's tensor cannot take float32's minimum as a bound.
    return mask.to(torch.promote_types(mask.dtype, dtype)).clamp(min=torch.finfo(dtype).min).to(dtype)


# ------------------------------------------------------------------------------------------------------------------
# The paper's parts: embeddings and positions (3.4, 3.5), attention (3.2), feed-forward (3.3), layers (3.1)
# `linear`, `apply_dropout` and `add_dropout` are `module(x)`, `F.dropout` and a residual sum with dropout;
# on CPUs they pick faster kernels (at the end of the file).
# ------------------------------------------------------------------------------------------------------------------


class SinusoidalPositionalEncoding(nn.Module):
    """Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    A formula, not a parameter: nothing is learned or saved. The table is computed on first use (in float64, then
    rounded, so that it equals Marian's bit for bit) and grows when a longer sequence arrives.
    `layout="interleaved"` alternates sine and cosine as the formula is written; `layout="split"` puts all sines
    first (tensor2tensor, Marian/OPUS-MT). The two differ by a fixed permutation of dimensions.
    """

    def __init__(self, d_model: int, max_positions: int, layout: str = "split"):
        super().__init__()
        self.d_model, self.max_positions, self.layout = d_model, max_positions, layout
        self.table = None  # a plain attribute, not a buffer: never in the state dict, never on the meta device

    def compute(self, positions: torch.Tensor) -> torch.Tensor:
        """Encodings of `positions` (float64), shape (len(positions), d_model), float32."""
        dimension_pairs = torch.arange(0, self.d_model, 2, dtype=torch.float64, device=positions.device)
        timescales = 10000 ** (dimension_pairs / self.d_model)  # wavelength / 2 pi ("from 2 pi to 10000 x 2 pi")
        angles = positions[:, None] / timescales
        if self.layout == "interleaved":
            return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1).float()
        return torch.cat([angles.sin(), angles.cos()], dim=-1).float()

    def forward(self, length: int, past_length, device: torch.device) -> torch.Tensor:
        """Encodings of positions past_length .. past_length + length - 1, shape (length, d_model), float32.

        `past_length` is an int, or a 0-d tensor where a static cache counts its tokens (no host sync then).
        """
        if torch.compiler.is_compiling() or isinstance(past_length, torch.Tensor):
            # Computed, not looked up: a table sized by today's lengths would tie a compiled graph to them.
            float64_device = torch.device("cpu") if device.type == "mps" else device  # MPS has no float64
            start = torch.as_tensor(past_length, dtype=torch.float64, device=float64_device)
            return self.compute(torch.arange(length, dtype=torch.float64, device=float64_device) + start).to(device)
        end = past_length + length
        if self.table is None or self.table.shape[0] < end or self.table.device != device:
            size = max(self.max_positions, 1 << (end - 1).bit_length(), 0 if self.table is None else self.table.shape[0])
            with torch.inference_mode(False):  # made inside `generate`'s inference mode, it must serve training too
                self.table = self.compute(torch.arange(size, dtype=torch.float64)).to(device)
        return self.table[past_length:end]


class ScaledWordEmbedding(nn.Embedding):
    """Section 3.4: learned embeddings whose weights are multiplied by sqrt(d_model). As in MarianMTModel and BART,
    the padding token's row gets no gradient from the lookups (`padding_idx`; it is not zeroed at initialisation).
    In CPU training of the tied model, a lookup's weight gradient is gathered with the output projection's
    (`TiedGradient`).

    The scale is part of the lookup, as in BART's `ScaledWordEmbedding`: `inputs_embeds` and `decoder_inputs_embeds`
    are used as given, so `get_input_embeddings()(ids)` passed as either equals passing `ids`. (MarianMTModel scales a
    passed `decoder_inputs_embeds` again, but not `inputs_embeds`.)"""

    def __init__(self, num_embeddings: int, embedding_dim: int, embed_scale: float = 1.0, padding_idx=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tied = None if torch.compiler.is_compiling() else tied_gradient.get()
        if tied is None or self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
            return super().forward(input_ids) * self.embed_scale
        return TiedLookup.apply(input_ids, self.weight, tied, self.padding_idx) * self.embed_scale


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Section 3.2.1, Equation 1: Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V.

    Inputs are (batch, heads, length, head_dim); returns the output as (batch, length, heads, head_dim) and the
    attention weights as (batch, heads, queries, keys). The softmax runs in float32 for half-precision inputs (and
    in float64 for float64 ones).
    """
    scores = torch.matmul(query, key.transpose(-1, -2)).to(torch.promote_types(query.dtype, torch.float32)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1).to(query.dtype)
    weights = apply_dropout(weights, dropout, module.training)
    return torch.matmul(weights, value).transpose(1, 2), weights


def sdpa_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, is_causal=False, **kwargs):
    """Equation 1 through `torch.nn.functional.scaled_dot_product_attention` (fused kernels); no weights returned."""
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal
    )
    return output.transpose(1, 2), None


ATTENTION_FUNCTIONS = {"eager": eager_attention_forward, "sdpa": sdpa_attention}


def registered_attention(implementation: str):
    """A kernel registered with transformers' `AttentionInterface.register` (the masks here are additive 4D floats, so
    flash and flex attention, which need other masks, are not offered). 5.x looks it up through `get_interface`,
    which validates the name and is how `model.set_attn_implementation(...)` knows the model can switch; 4.57
    indexes."""
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    return ALL_ATTENTION_FUNCTIONS[implementation]


def transformers_major_version() -> int:
    """Where `generate` differs between transformers 4.x and 5.x, the fast search follows the one running."""
    return int(transformers.__version__.split(".")[0])


# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`; forwards accept both.
CACHE_FIELD = "cache" if "cache" in Seq2SeqLMOutput.__dataclass_fields__ else "past_key_values"


def resolve_cache(cache, past_key_values):
    """The cache passed under either name. Where transformers has renamed it (5.x), the old name warns as the
    library's own models do; on 4.57 `past_key_values` is the current name (its `generate` passes it) and is silent."""
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError("Pass the cache as `cache` or as `past_key_values`, not both.")
    if CACHE_FIELD == "cache" and not torch.compiler.is_compiling():  # a warning breaks a compiled graph in two
        warnings.warn("`past_key_values` is deprecated: use `cache` instead.", FutureWarning, stacklevel=3)
    return past_key_values


class MultiHeadAttention(nn.Module):
    """Section 3.2.2: MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    The h per-head projections of a role are one (d_model, d_model) matrix. Self-attention computes Q, K and V
    with one fused matrix; cross-attention (Section 3.2.3: queries from the decoder, keys and values from the
    encoder output) fuses K and V, which are computed once per generated sentence and then read from the cache.
    """

    def __init__(self, config: Seq2SeqTransformerConfig, num_heads: int, is_cross_attention: bool = False, layer_idx=None):
        super().__init__()
        d_model = config.d_model
        self.config = config
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_cross_attention, self.layer_idx = is_cross_attention, layer_idx
        self.is_causal = False  # read by transformers' shared kernels; our masks say what is causal
        if is_cross_attention:
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, states: torch.Tensor, parts: int):
        """(batch, length, parts x d_model) -> `parts` views of (batch, heads, length, head_dim). Split before the
        heads are moved: the backward then stacks the parts' gradients straight into the projection's layout."""
        batch, length, _ = states.shape
        split = states.view(batch, length, parts, self.num_heads, self.head_dim).unbind(2)
        return tuple(part.transpose(1, 2) for part in split)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        output_attentions: bool = False,
        is_causal: bool = False,
        cache_position: torch.Tensor | None = None,
    ):
        if self.is_cross_attention:
            (query,) = self.split_heads(linear(self.q_proj, hidden_states), 1)
            if cache is not None and cache.is_updated.get(self.layer_idx):
                layer_cache = cache.cross_attention_cache.layers[self.layer_idx]
                key, value = layer_cache.keys, layer_cache.values
            else:
                key, value = self.split_heads(linear(self.kv_proj, key_value_states), 2)
                if cache is not None:
                    key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
                    cache.is_updated[self.layer_idx] = True
        else:
            query, key, value = self.split_heads(linear(self.qkv_proj, hidden_states), 3)
            if cache is not None:  # a static cache's slots for the new tokens (4.57's wrote each step into the first)
                cache_kwargs = None if cache_position is None else {"cache_position": cache_position}
                key, value = cache.self_attention_cache.update(key, value, self.layer_idx, cache_kwargs)

        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention = ATTENTION_FUNCTIONS.get(implementation) or registered_attention(implementation)
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        output = linear(self.out_proj, output.reshape(*hidden_states.shape[:-1], -1))
        return output, weights


class PositionwiseFeedForward(nn.Module):
    """Section 3.3, Equation 2: FFN(x) = max(0, x W_1 + b_1) W_2 + b_2, the same at every position (with the default
    `activation_function="relu"`; `activation_dropout`, 0 by default, is not in the paper)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, activation_dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.activation = ACT2FN[activation]
        self.activation_dropout = activation_dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation(linear(self.fc1, hidden_states))
        hidden_states = apply_dropout(hidden_states, self.activation_dropout, self.training)
        return linear(self.fc2, hidden_states)


class SublayerMixin:
    """Section 3.1 / 5.4: each sub-layer's output is LayerNorm(x + Dropout(Sublayer(x))) ("post"), or, with
    `layer_norm_position="pre"`, x + Dropout(Sublayer(LayerNorm(x)))."""

    def sublayer(self, hidden_states, layer_norm, function):
        if self.pre_norm:
            output, weights = function(layer_norm(hidden_states))
            return add_dropout(hidden_states, output, self.dropout, self.training), weights
        output, weights = function(hidden_states)
        return layer_norm(add_dropout(hidden_states, output, self.dropout, self.training)), weights


class EncoderLayer(SublayerMixin, GradientCheckpointingLayer):
    """Section 3.1, encoder layer: multi-head self-attention, then the position-wise feed-forward network."""

    def __init__(self, config: Seq2SeqTransformerConfig, layer_idx: int):
        super().__init__()
        self.dropout, self.pre_norm = config.dropout, config.layer_norm_position == "pre"
        self.self_attn = MultiHeadAttention(config, config.encoder_attention_heads, layer_idx=layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.feed_forward = PositionwiseFeedForward(
            config.d_model, config.encoder_ffn_dim, config.activation_function, config.activation_dropout
        )
        self.final_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        hidden_states, weights = self.sublayer(
            hidden_states,
            self.self_attn_layer_norm,
            lambda x: self.self_attn(x, attention_mask=attention_mask, output_attentions=output_attentions),
        )
        hidden_states, _ = self.sublayer(hidden_states, self.final_layer_norm, lambda x: (self.feed_forward(x), None))
        return hidden_states, weights


class DecoderLayer(SublayerMixin, GradientCheckpointingLayer):
    """Section 3.1, decoder layer: masked self-attention, attention over the encoder output, feed-forward."""

    def __init__(self, config: Seq2SeqTransformerConfig, layer_idx: int):
        super().__init__()
        self.dropout, self.pre_norm = config.dropout, config.layer_norm_position == "pre"
        heads = config.decoder_attention_heads
        self.self_attn = MultiHeadAttention(config, heads, layer_idx=layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.cross_attn = MultiHeadAttention(config, heads, is_cross_attention=True, layer_idx=layer_idx)
        self.cross_attn_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.feed_forward = PositionwiseFeedForward(
            config.d_model, config.decoder_ffn_dim, config.activation_function, config.activation_dropout
        )
        self.final_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states,
        encoder_hidden_states,
        self_attention_mask=None,
        encoder_attention_mask=None,
        cache=None,
        output_attentions=False,
        is_causal=False,
        cache_position=None,
    ):
        hidden_states, self_weights = self.sublayer(
            hidden_states,
            self.self_attn_layer_norm,
            lambda x: self.self_attn(
                x, attention_mask=self_attention_mask, cache=cache,
                output_attentions=output_attentions, is_causal=is_causal, cache_position=cache_position,
            ),
        )
        hidden_states, cross_weights = self.sublayer(
            hidden_states,
            self.cross_attn_layer_norm,
            lambda x: self.cross_attn(
                x, key_value_states=encoder_hidden_states, attention_mask=encoder_attention_mask,
                cache=cache, output_attentions=output_attentions,
            ),
        )
        hidden_states, _ = self.sublayer(hidden_states, self.final_layer_norm, lambda x: (self.feed_forward(x), None))
        return hidden_states, self_weights, cross_weights


# ------------------------------------------------------------------------------------------------------------------
# The models: stacks (Section 3.1) and transformers' classes
# ------------------------------------------------------------------------------------------------------------------


class Seq2SeqTransformerPreTrainedModel(PreTrainedModel):
    """Weights initialisation and the `transformers` plumbing shared by the models below.

    Initialisation (the paper does not state one): Xavier/Glorot-uniform linear layers with zero biases, as in
    tensor2tensor and fairseq, and embeddings from a normal distribution with standard deviation d_model^-1/2
    (`init_std`), so that embeddings scaled by sqrt(d_model) start with unit variance and so do the logits of the
    tied output projection.
    """

    config_class = Seq2SeqTransformerConfig
    config: Seq2SeqTransformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EncoderLayer", "DecoderLayer"]
    _supports_sdpa = True
    _can_compile_fullgraph = True
    before_saving_code = None  # set by the installed package: refuses to write the code over a user's files

    def __init__(self, config: Seq2SeqTransformerConfig, *inputs, **kwargs):
        # Values set after the config was made (`from_pretrained(path, encoder_attention_heads=5)` sets them with
        # setattr, as does `config.update`) skipped its check: a model is built only from a config that passes it.
        config.validate_hyperparameters()
        super().__init__(config, *inputs, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`; where the code is saved too (`register_for_auto_class`), `auto_map` lists
        both models, whichever is saved, so that `AutoModel` and `AutoModelForSeq2SeqLM` load the folder with
        `trust_remote_code=True` (as a MarianModel folder loads as MarianMTModel, its head tied to the embeddings),
        and `custom_pipelines` names the translation pipeline, as `Pipeline.save_pretrained` does for a registered
        one: `pipeline("seq2seq-translation", model=folder, trust_remote_code=True)` then imports pipeline.py, which
        the code saved with the model includes as this file imports it."""
        # Before anything is written: a config that would not load again is refused with the folder untouched.
        self.config.validate_hyperparameters()
        if self._auto_class is not None and type(self).__module__ == Seq2SeqTransformerModel.__module__:
            from .pipeline import TASK, Seq2SeqTranslationPipeline

            if self.before_saving_code is not None:  # the package's file check (this shipped file opens no file)
                self.before_saving_code(save_directory)

            module = type(self).__module__.rsplit(".", 1)[-1]  # a user's subclass elsewhere ships no such file
            self.config.auto_map = {
                "AutoModel": f"{module}.{Seq2SeqTransformerModel.__name__}",
                "AutoModelForSeq2SeqLM": f"{module}.{Seq2SeqTransformerForConditionalGeneration.__name__}",
                **(getattr(self.config, "auto_map", None) or {}),
            }
            pipeline = {"impl": f"pipeline.{Seq2SeqTranslationPipeline.__name__}", "pt": ["AutoModelForSeq2SeqLM"],
                        "type": "text"}
            self.config.custom_pipelines = {TASK: pipeline, **(getattr(self.config, "custom_pipelines", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @property
    def dummy_inputs(self):
        """A padded batch that the model runs as is (`model(**model.dummy_inputs)`), as Marian's."""
        pad = self.config.pad_token_id
        input_ids = torch.tensor([[0, 6, 10, 4, 2], [0, 8, 12, 2, pad]], device=self.device) % self.config.vocab_size
        return {"input_ids": input_ids, "attention_mask": input_ids.ne(pad), "decoder_input_ids": input_ids}

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            std = self.config.init_std if self.config.init_std is not None else self.config.d_model**-0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class Encoder(nn.Module):
    """Section 3.1, encoder: a stack of N identical layers over the embedded, position-encoded source (3.4, 3.5)."""

    def __init__(self, config: Seq2SeqTransformerConfig, embed_tokens: ScaledWordEmbedding):
        super().__init__()
        self.config = config
        self.embed_tokens_ref = [embed_tokens]  # a reference: the model owns (and saves) the shared embedding once
        self.embed_positions = SinusoidalPositionalEncoding(
            config.d_model, config.max_position_embeddings, config.positional_encoding_layout
        )
        self.layers = nn.ModuleList([EncoderLayer(config, i) for i in range(config.encoder_layers)])
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.layer_norm_position == "pre" else None
        self.gradient_checkpointing = False

    @property
    def embed_tokens(self):
        return self.embed_tokens_ref[0]

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens_ref[0] = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("The encoder needs exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is None:
            check_token_ids(input_ids, self.embed_tokens.num_embeddings, "input_ids")
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if batch == 0 or length == 0:
            raise ValueError(f"The encoder got an empty batch: input shape {tuple(inputs_embeds.shape[:2])}.")
        # In the model's dtype, as Marian's table is: `inputs_embeds` given in a lower precision are promoted.
        positions = self.embed_positions(length, 0, inputs_embeds.device).to(self.embed_tokens.weight.dtype)
        hidden_states = apply_dropout(inputs_embeds + positions, config.dropout, self.training)

        mask = None
        if attention_mask is not None:
            check_mask_shape(attention_mask, (batch, length), "attention_mask")
            mask = padding_mask(attention_mask, attention_dtype(hidden_states))

        all_hidden_states, all_attentions = (), ()
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, weights = layer(hidden_states, attention_mask=mask, output_attentions=output_attentions)
            if output_attentions:
                all_attentions += (weights,)
        if self.layer_norm is not None:
            hidden_states = self.layer_norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        hidden_states_out = all_hidden_states if output_hidden_states else None
        attentions_out = all_attentions if output_attentions else None
        if not return_dict:
            return tuple(v for v in (hidden_states, hidden_states_out, attentions_out) if v is not None)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=hidden_states_out, attentions=attentions_out)


class Decoder(nn.Module):
    """Section 3.1, decoder: N identical layers over the shifted, embedded target; each also attends to the encoder."""

    def __init__(self, config: Seq2SeqTransformerConfig, embed_tokens: ScaledWordEmbedding):
        super().__init__()
        self.config = config
        self.embed_tokens_ref = [embed_tokens]
        self.embed_positions = SinusoidalPositionalEncoding(
            config.d_model, config.max_position_embeddings, config.positional_encoding_layout
        )
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.decoder_layers)])
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.layer_norm_position == "pre" else None
        self.gradient_checkpointing = False

    embed_tokens = Encoder.embed_tokens
    get_input_embeddings = Encoder.get_input_embeddings
    set_input_embeddings = Encoder.set_input_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        use_cache = config.use_cache if use_cache is None else use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("The decoder needs exactly one of `decoder_input_ids` and `decoder_inputs_embeds`.")
        if encoder_hidden_states is None:
            raise ValueError("The decoder needs the encoder's output: pass `input_ids` or `encoder_outputs` to the model "
                             "(`encoder_hidden_states` to the decoder alone).")
        if inputs_embeds is None:
            check_token_ids(input_ids, self.embed_tokens.num_embeddings, "decoder_input_ids")
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if batch == 0 or length == 0:
            raise ValueError(f"The decoder got an empty batch: input shape {tuple(inputs_embeds.shape[:2])}.")
        if encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"Batch sizes differ: {batch} decoder sequences but {encoder_hidden_states.shape[0]} encoder outputs."
            )
        if self.training and torch.is_grad_enabled() and any(layer.gradient_checkpointing for layer in self.layers):
            # The backward's replay would write the cache again (transformers' checkpointed layers drop it); without
            # gradients there is no replay.
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        # A cache passed with use_cache=False is still read and extended, as in MarianMTModel.
        past_length = cache.get_seq_length() if cache is not None else 0  # a 0-d tensor for a static cache
        key_slots = static_cache_slots(cache)

        positions = self.embed_positions(length, past_length, inputs_embeds.device).to(self.embed_tokens.weight.dtype)
        hidden_states = apply_dropout(inputs_embeds + positions, config.dropout, self.training)  # as in the encoder

        dtype, device = attention_dtype(hidden_states), hidden_states.device
        self_mask, is_causal = None, False
        if attention_mask is not None and attention_mask.dim() == 4:
            key_length = past_length + length if key_slots is None else key_slots
            self_mask = prepared_mask(attention_mask, (batch, length, key_length), dtype)
        elif key_slots is not None:
            self_mask = static_cache_mask(attention_mask, batch, length, past_length, key_slots, dtype, device)
        elif attention_mask is not None:
            if attention_mask.shape[-1] == length and past_length:  # a mask of the new tokens only
                attention_mask = torch.cat([attention_mask.new_ones(batch, past_length), attention_mask], dim=-1)
            check_mask_shape(attention_mask, (batch, past_length + length), "decoder_attention_mask")
            if torch.compiler.is_compiling() or not bool(attention_mask.all()):
                self_mask = causal_mask(length, past_length, dtype, device) + padding_mask(attention_mask, dtype)
        if self_mask is None and length > 1:
            # One new token may see every earlier one: no mask. Several: SDPA's own causal kernel when nothing
            # is cached (its is_causal aligns queries and keys at the top-left), else an explicit mask.
            if past_length == 0 and config._attn_implementation == "sdpa" and not output_attentions:
                is_causal = True
            else:
                self_mask = causal_mask(length, past_length, dtype, device)
        cache_position = None if key_slots is None else torch.arange(length, device=device) + past_length
        cross_mask = None
        if encoder_attention_mask is not None:
            check_mask_shape(encoder_attention_mask, encoder_hidden_states.shape[:2], "encoder attention_mask")
            cross_mask = padding_mask(encoder_attention_mask, dtype)

        all_hidden_states, all_self_attentions, all_cross_attentions = (), (), ()
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, self_weights, cross_weights = layer(
                hidden_states,
                encoder_hidden_states,
                self_attention_mask=self_mask,
                encoder_attention_mask=cross_mask,
                cache=cache,
                output_attentions=output_attentions,
                is_causal=is_causal,
                cache_position=cache_position,
            )
            if output_attentions:
                all_self_attentions += (self_weights,)
                all_cross_attentions += (cross_weights,)
        if self.layer_norm is not None:
            hidden_states = self.layer_norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        outputs = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            **{CACHE_FIELD: cache},
            hidden_states=all_hidden_states if output_hidden_states else None,
            attentions=all_self_attentions if output_attentions else None,
            cross_attentions=all_cross_attentions if output_attentions else None,
        )
        return outputs if return_dict else outputs.to_tuple()


class Seq2SeqTransformerModel(Seq2SeqTransformerPreTrainedModel):
    """Section 3: the encoder-decoder, with one embedding matrix shared by source and target (Section 3.4)."""

    def __init__(self, config: Seq2SeqTransformerConfig):
        super().__init__(config)
        embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.shared = ScaledWordEmbedding(config.vocab_size, config.d_model, embed_scale, config.pad_token_id)
        self.encoder = Encoder(config, self.shared)
        self.decoder = Decoder(config, self.shared)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, value):
        self.shared = value
        self.encoder.set_input_embeddings(value)
        self.decoder.set_input_embeddings(value)

    def get_encoder(self, modality=None):
        """The (text) encoder. There is no image or audio encoder: for those `self` is returned, transformers'
        answer for "none" (else its exporters would take the text encoder for an image tower)."""
        return self.encoder if modality is None else self

    def get_decoder(self, *args, **kwargs):
        return self.decoder

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        encoder_outputs=None,
        past_key_values=None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache=None,
        **kwargs,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
            )
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError("Pass `decoder_input_ids`, `decoder_inputs_embeds` or `labels` (the target to shift right).")
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            cache=resolve_cache(cache, past_key_values),
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        outputs = Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            **{CACHE_FIELD: getattr(decoder_outputs, CACHE_FIELD)},
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )
        return outputs if return_dict else outputs.to_tuple()


# ------------------------------------------------------------------------------------------------------------------
# Section 5.4's label-smoothed loss, and the gradient of Section 3.4's shared matrix
# ------------------------------------------------------------------------------------------------------------------


class LabelSmoothedCrossEntropy(torch.autograd.Function):
    """Section 5.4, label smoothing: cross-entropy against (1 - eps) x the one-hot target + eps x the uniform
    distribution, averaged over the positions whose label is not `ignore_index`. Same value as
    `F.cross_entropy(..., label_smoothing=eps)`, in fewer passes over the (tokens x vocabulary) logits.

    Per position, with p = softmax(z) and log p = z - logsumexp(z): loss = -(1 - eps) log p_target - eps mean(log p),
    and d loss / dz = p - (1 - eps) onehot(target) - eps / V. The forward keeps p, not log p, so that the backward
    forms the gradient in one pass, without the exponential that torch's log-softmax backward takes. logsumexp(z)
    is z_target - log p_target on CPUs (recomputed for the rare positions whose p_target nears underflow), elsewhere
    max z - log p at the largest logit, which never underflows: no extra pass over the logits, or one that needs no
    host sync. (`torch.logsumexp` over all positions would take longer on CPUs than the softmax.)
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, epsilon: float, ignore_index: int = -100):
        valid = labels != ignore_index
        targets = labels.masked_fill(~valid, 0)
        probs = torch.softmax(logits, dim=-1)
        target_logits = logits.gather(1, targets[:, None]).squeeze(1)
        if probs.is_cpu and not torch.compiler.is_compiling():
            # From each target's probability (no pass over the logits), where it is far from underflow.
            target_probs = probs.gather(1, targets[:, None]).squeeze(1)
            log_normaliser = target_logits - target_probs.log()
            underflowing = (target_probs < 1e-30).nonzero().squeeze(1)
            log_normaliser[underflowing] = torch.logsumexp(logits[underflowing], dim=-1)
        else:
            log_normaliser = logits.amax(-1) - probs.amax(-1).log()
        target_log_probs = target_logits - log_normaliser
        per_position = -(1 - epsilon) * target_log_probs - epsilon * (logits.mean(-1) - log_normaliser)
        count = valid.sum()
        ctx.save_for_backward(probs, targets, valid, count)
        ctx.epsilon = epsilon
        return torch.where(valid, per_position, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # `once_differentiable` would return a constant: second derivatives would lack it
            raise RuntimeError(
                "the model's label-smoothed loss has no second derivative: for a double backward (create_graph=True), "
                "compute the loss from `logits` with F.cross_entropy(..., label_smoothing=config.label_smoothing)"
            )
        probs, targets, valid, count = ctx.saved_tensors
        weight = (valid * (grad_loss / count.clamp(min=1))).to(probs.dtype)[:, None]  # no labels: zero, as torch's
        uniform = -ctx.epsilon / probs.shape[-1]
        if probs.is_cpu and not torch.compiler.is_compiling():
            # One pass with a scalar weight, then the unlabelled rows zeroed: on CPUs, a pass with the (tokens, 1)
            # weight broadcast takes about twice as long.
            scale = grad_loss.item() / max(count.item(), 1)
            grad = torch.add(probs.new_full((), scale * uniform), probs, alpha=scale)
            grad.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)
        else:
            grad = torch.addcmul(weight * uniform, probs, weight)
        return grad.scatter_add_(1, targets[:, None], weight * (ctx.epsilon - 1)), None, None, None


class TiedGradient:
    """The gradient of the matrix that Section 3.4 shares between the two embeddings and the output projection, for
    one forward, gathered in one buffer. The projection's backward (`TiedOutputProjection`) keeps its dense d/dW;
    each lookup's backward (`TiedLookup`), which autograd runs after it, adds its rows there in place, and the last
    one hands the sum to autograd as the forward's whole gradient of the matrix. Left to autograd, each lookup's
    gradient is a zero-filled copy of the whole matrix, then added to the others (out of place, behind `F.linear`):
    ~25 ms of a base training step on a 2-core Xeon (37,000 x 512), where gathering takes ~0.5 ms.

    Only within the backward pass (autograd's graph task) that ran the projection; any other backward (the logits
    unused, or the graph backpropagated in parts) gets each lookup's own dense gradient. A backward that builds a
    graph (double backward) uses plain differentiable products throughout."""

    def __init__(self):
        self.buffer, self.task = None, None
        self.lookups = self.pending = 0  # lookups made in the forward; those yet to add their rows in this backward

    def keep(self, grad_weight: torch.Tensor) -> bool:
        """From the projection's backward: whether the lookups take d/dW over (then the projection returns None)."""
        if self.lookups == 0 or torch.is_grad_enabled():
            self.buffer = None
            return False
        self.buffer, self.task, self.pending = grad_weight, torch._C._current_graph_task_id(), self.lookups
        return True

    def add(self, ids: torch.Tensor, rows: torch.Tensor, weight_shape: torch.Size):
        """From a lookup's backward: its d/dW (None while other lookups have rows to add)."""
        if self.buffer is None or self.task != torch._C._current_graph_task_id() or torch.is_grad_enabled():
            return rows.new_zeros(weight_shape).index_add(0, ids, rows)
        self.buffer.index_add_(0, ids, rows)
        self.pending -= 1
        if self.pending:
            return None
        gathered, self.buffer = self.buffer, None
        return gathered


# The `TiedGradient` of the running forward, set by `Seq2SeqTransformerForConditionalGeneration.forward`.
tied_gradient = contextvars.ContextVar("tied_gradient", default=None)


class TiedLookup(torch.autograd.Function):
    """`F.embedding(ids, weight, padding_idx)`, whose d/dweight is gathered by `TiedGradient`."""

    @staticmethod
    def forward(ctx, ids, weight, tied, padding_idx):
        ctx.save_for_backward(ids)
        ctx.tied, ctx.weight_shape, ctx.padding_idx = tied, weight.shape, padding_idx
        tied.lookups += 1
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_embeddings):
        ids = ctx.saved_tensors[0].reshape(-1)
        rows = grad_embeddings.reshape(-1, grad_embeddings.shape[-1])
        if ctx.padding_idx is not None:
            rows = rows.masked_fill((ids == ctx.padding_idx)[:, None], 0)
        return None, ctx.tied.add(ids, rows, ctx.weight_shape), None, None


class TiedOutputProjection(torch.autograd.Function):
    """Section 3.4's output projection, logits = h W^T + b, where W is also the embedding matrix, whose d/dW is
    gathered by `TiedGradient`. Products as `linear` computes them: oneDNN's where `ONEDNN_PRODUCTS`, else
    MKL's."""

    @staticmethod
    def forward(ctx, rows, weight, bias, tied):
        ctx.tied, ctx.onednn = tied, ONEDNN_PRODUCTS and onednn_linear_kernel() is not None
        if ctx.onednn:
            return OneDNNLinear.forward(ctx, rows, weight, bias)
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return F.linear(rows, weight, bias)

    @staticmethod
    def backward(ctx, grad_logits):
        if ctx.onednn:
            grad_rows, grad_weight, grad_bias = OneDNNLinear.backward(ctx, grad_logits)
        else:
            rows, weight = ctx.saved_tensors
            grad_rows, grad_weight = grad_logits @ weight, grad_logits.t() @ rows
            grad_bias = grad_logits.sum(0) if ctx.has_bias else None
        return grad_rows, None if ctx.tied.keep(grad_weight) else grad_weight, grad_bias, None


class Seq2SeqTransformerForConditionalGeneration(Seq2SeqTransformerPreTrainedModel, GenerationMixin):
    """Section 3.4: the encoder-decoder plus the output projection to next-token logits (tied to the embeddings).

    Generation defaults follow Section 6.1 where transformers can: beam search with beam size 4 and length penalty
    0.6. Two differ: the penalty is transformers' (the log-probability sum divided by length^0.6, not GNMT's
    ((5 + length) / 6)^0.6 that the paper cites), and the output stops at `max_position_embeddings` tokens (the
    paper: input length + 50).
    """

    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}
    decode_with_cuda_graphs = True  # on a GPU, greedy/beam `generate` replays a recorded step (StaticIncrementalDecoder)
    decode_with_torchscript = True  # on a CPU, greedy/beam `generate` runs its step as TorchScript (decode_step_layers)

    def __init__(self, config: Seq2SeqTransformerConfig):
        super().__init__(config)
        self.model = Seq2SeqTransformerModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=config.output_bias)
        self.post_init()
        if self.generation_config is not None:
            self.generation_config.num_beams = 4
            self.generation_config.length_penalty = 0.6
            self.generation_config.max_length = config.max_position_embeddings

    def get_input_embeddings(self):
        return self.model.shared

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_encoder(self, modality=None):
        return self.model.encoder if modality is None else self

    def get_decoder(self, *args, **kwargs):
        return self.model.decoder

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    def generate(self, inputs=None, generation_config=None, *args, **kwargs):
        """`GenerationMixin.generate`, with a faster path for plain greedy search, sampling and beam search.

        When the request is greedy or beam search, or multinomial sampling with one beam on a CPU (with temperature,
        top-k and top-p), with length penalty, min/max length, single banned tokens and a forced final
        end-of-sentence, and asks for token ids only, the search runs on `IncrementalDecoder` and returns what
        transformers' own loop returns: greedy search exactly; sampling the same draws from the same random state
        (leaving the generator where the loop leaves it); beam search too. Near-ties apart: where two hypotheses'
        scores (or two tokens' sampling odds) lie within float32 rounding of each other (~1e-6), as its logits and
        the loop's differ in the last bits (the cross-attention keys and values are projected once per sentence rather
        than once per beam, and a sentence's beams attend as one block of queries, except in half precision on a CPU,
        where that rounding would differ by an ulp in a few percent of the logits). On a CPU its step runs as
        TorchScript (compiled at the first call in a process; `model.decode_with_torchscript = False` runs it op by
        op in Python, with the same results). On a GPU it runs on `StaticIncrementalDecoder`, a recorded step
        replayed as a CUDA graph: the same tokens in float32, near-ties apart; in half precision its attention over a
        masked fixed-size cache may round differently, as transformers' own static cache does
        (`model.decode_with_cuda_graphs = False` keeps the step-by-step arithmetic). Anything else (beam sampling,
        other warpers, scores, custom processors, stopping criteria, streamers, ...) goes to transformers'
        implementation unchanged.
        """
        search = None if args else self.fast_search_settings(inputs, generation_config, kwargs)
        if search is None:  # (`args`: the processors, criteria... that transformers takes by position)
            return super().generate(inputs, generation_config, *args, **kwargs)
        input_ids, attention_mask, settings = search
        if settings["sample"] and settings["num_return_sequences"] > 1:  # as transformers: each source n times over
            input_ids = input_ids.repeat_interleave(settings["num_return_sequences"], dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(settings["num_return_sequences"], dim=0)
        # Imported here: the decode loop is built from this file's attention and feed-forward.
        from .decoding_seq2seq import IncrementalDecoder, StaticIncrementalDecoder, beam_search, graph_safe, greedy_search

        # On a CPU in inference mode, which spares each of a step's ~200 operations autograd's bookkeeping (base,
        # batch 1: 1.06 to 1.08x faster); the tokens come back as a normal tensor, which callers may edit in place.
        on_cpu = input_ids.device.type == "cpu"
        with torch.inference_mode() if on_cpu else torch.no_grad():
            if self.decode_with_cuda_graphs and graph_safe(self):
                decoder = StaticIncrementalDecoder(self, input_ids, attention_mask, settings["num_beams"],
                                                   settings["max_new_tokens"], use_graph=True)
            else:
                decoder = IncrementalDecoder(self, input_ids, attention_mask, settings["num_beams"])
            search = greedy_search if settings["num_beams"] == 1 else beam_search
            sequences = search(decoder, input_ids.shape[0], settings)
        return sequences.clone() if on_cpu else sequences

    FAST_SEARCH_FIELDS = {
        "num_beams", "length_penalty", "early_stopping", "do_sample", "temperature", "top_k", "top_p",
        "num_return_sequences", "use_cache",
        "max_length", "max_new_tokens", "min_length", "min_new_tokens", "pad_token_id", "bos_token_id",
        "eos_token_id", "decoder_start_token_id", "forced_eos_token_id", "bad_words_ids",
    }

    def forward_calls_are_observed(self) -> bool:
        """Whether something watches or changes a `forward` that the fast search skips (the model's, its stacks',
        the decoder layers' and their attentions'): hooks, a `forward` replaced on the instance (accelerate's hooks,
        transformers' exporters capturing the prefill and decode calls) or overridden by a subclass. `generate` then
        runs transformers' loop, which calls them. (The search calls the embeddings, layer norms, feed-forward
        blocks, linear layers and output projection as modules where `forward_is_watched` or their class is not
        the plain one.)"""
        hooks = nn.modules.module
        if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
            return True
        skipped = [(self, Seq2SeqTransformerForConditionalGeneration), (self.model, Seq2SeqTransformerModel),
                   (self.model.encoder, Encoder), (self.model.decoder, Decoder)]
        for layer in self.model.decoder.layers:
            skipped += [(layer, DecoderLayer), (layer.self_attn, MultiHeadAttention), (layer.cross_attn, MultiHeadAttention)]
        return any(forward_is_watched(module) or type(module).forward is not ours.forward for module, ours in skipped)

    def fast_search_settings(self, inputs, generation_config, kwargs):
        """The settings of a greedy/beam search the fast path reproduces exactly, or None to use transformers'."""
        # transformers' own merge: what a passed config leaves unset comes from the model's generation config.
        config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        # Values transformers' search accepts silently (negative minimum lengths) or fails on deep inside (no beams).
        # Integers of other types (numpy's, a tensor's) are integers too; `True` is not taken for 1.
        counts = ("num_beams", "num_return_sequences", "min_new_tokens", "min_length", "max_new_tokens", "max_length")
        for field, low in zip(counts[:4], (1, 1, 0, 0)):
            value = getattr(config, field, None)
            try:
                valid = value is None or (not isinstance(value, bool) and value.__index__() >= low)
            except (AttributeError, TypeError):  # 2.5, a float tensor
                valid = False
            if not valid:
                raise ValueError(f"`{field}` must be an integer >= {low}, got {value!r}.")
        if self.training or self.forward_calls_are_observed():
            return None
        # Anything but plain ints (None beams, numpy counts), and bad words that are not one-token lists (empty,
        # longer, tuples, which transformers refuses): transformers' loop takes or refuses them.
        bad_words = config.bad_words_ids
        if (
            config.num_beams is None or config.num_return_sequences is None
            or any(getattr(config, field) is not None and type(getattr(config, field)) is not int for field in counts)
            or (config.num_beams > 1 and config.length_penalty is None)
            or (bad_words is not None and (type(bad_words) is not list or not bad_words
                                           or any(type(words) is not list or len(words) != 1 for words in bad_words)))
        ):
            return None
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        attention_mask = model_kwargs.pop("attention_mask", None)
        if model_kwargs or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            return None
        global_defaults = getattr(config, "_get_default_generation_params", dict)()  # 5.x fills these in; 4.x has them
        changed = {
            k for k, v in config.to_diff_dict().items()
            if not k.startswith("_") and k != "transformers_version" and not (k.startswith(("output_", "return_")) and not v)
            and not (k in global_defaults and global_defaults[k] == v)
        }
        if changed - self.FAST_SEARCH_FIELDS:
            return None
        num_beams, returned = config.num_beams, config.num_return_sequences
        eos = config.eos_token_id if isinstance(config.eos_token_id, (list, tuple)) else [config.eos_token_id]
        if any(type(token) is not int for token in eos):  # None, a tensor...: transformers' loop takes or names it
            return None
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
        # As transformers' NoBadWordsLogitsProcessor: a banned end of sentence is dropped from the list.
        banned = [words[0] for words in bad_words or [] if words not in ([token] for token in eos)]
        forced_eos = config.forced_eos_token_id
        pad = config.pad_token_id if config.pad_token_id is not None else eos[0] if eos else None
        forced = forced_eos if isinstance(forced_eos, list) else [] if forced_eos is None else [forced_eos]
        token_ids = [*eos, start, pad, *banned, *forced]
        sample = bool(config.do_sample)
        if (
            config.early_stopping or config.use_cache is False or start is None
            # Sampling with one beam, on a CPU (on a GPU the recorded step was never measured with it).
            or (sample and (num_beams != 1 or input_ids.device.type != "cpu"))
            or (not sample and (returned > num_beams or (num_beams == 1 and returned != 1)))
            # Ids that are not plain ints in the vocabulary (tensors, negative, True): transformers' checks name them.
            or any(type(token) is not int or not 0 <= token < self.config.vocab_size for token in token_ids)
        ):
            return None
        if config.max_new_tokens is not None:
            max_new_tokens = config.max_new_tokens
        elif config.max_length is not None:
            max_length = config.max_length  # counts the decoder start token
            if "max_length" not in kwargs and (
                config.max_length == 20 if transformers_major_version() < 5
                else (generation_config is None or generation_config.max_length is None)
                and self.generation_config.max_length is None
            ):  # transformers' default length: that many new tokens, within max_position_embeddings
                max_length = min(max_length + 1, self.config.max_position_embeddings)
            max_new_tokens = max_length - 1
        else:
            return None
        min_new_tokens = config.min_new_tokens if config.min_new_tokens is not None else max((config.min_length or 0) - 1, 0)
        if max_new_tokens < 1 or min_new_tokens < 0:
            return None
        # transformers 4.x infers a missing source mask from pad tokens; 5.x only for decoder-only models.
        if (attention_mask is None and transformers_major_version() < 5 and config.pad_token_id is not None and pad not in eos
                and bool((input_ids == pad).any())):
            attention_mask = input_ids.ne(pad).long()  # as transformers 4.x infers it
        self.warn_about_lengths(config, generation_config, kwargs, max_new_tokens, min_new_tokens)
        settings = dict(
            num_beams=num_beams, num_return_sequences=returned, length_penalty=config.length_penalty if num_beams > 1 else 1.0,
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            eos=eos, pad=pad, start=start, banned=banned, forced_eos=forced_eos,
            sample=sample, warpers=self.sampling_warpers(config) if sample else [],
            top_k=config.top_k if sample and config.top_k else None,  # what TopKLogitsWarper keeps (min 1 token)
        )
        return input_ids, attention_mask, settings

    def warn_about_lengths(self, config, generation_config, kwargs, max_new_tokens: int, min_new_tokens: int) -> None:
        """The warnings transformers' `generate` gives about the lengths asked for (a minimum that the maximum cuts
        short; transformers' own default maximum), which the fast search would skip. Its note that `max_new_tokens`
        takes precedence over a saved `max_length` is left out: every generate(max_new_tokens=...) of a saved model
        would print it."""
        if transformers_major_version() < 5:
            default_max = kwargs.get("max_length") is None and config.max_length is not None
        else:
            default_max = kwargs.get("max_length") is None and self.generation_config.max_length is None and (
                generation_config is None or generation_config.max_length is None)
        lengths = copy.copy(config)  # the maximum and minimum as transformers' `_prepare_generated_length` sets them
        lengths.max_length = max_new_tokens + 1
        if config.min_new_tokens is not None:
            lengths.min_length = min_new_tokens + 1
        self._validate_generated_length(lengths, 1, default_max)

    @staticmethod
    def sampling_warpers(config) -> list:
        """The logits warpers transformers' `_get_logits_processor` makes for sampling with one beam, in its order:
        the same classes, so that the same values (and the same errors) come out."""
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        warpers = []
        if config.temperature is not None and config.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
        return warpers

    def gathers_tied_gradient(self) -> bool:
        """Whether this forward gathers the shared matrix's gradient in one buffer (`TiedGradient`): in eager
        float32 CPU training of the tied model, with a plain output projection."""
        if capturing_a_graph():
            return False
        weight = self.lm_head.weight
        return (
            self.training and torch.is_grad_enabled() and weight.requires_grad and weight.device.type == "cpu"
            and type(weight) is nn.Parameter and weight is self.get_input_embeddings().weight
            and weight.dtype == torch.float32 and is_plain_linear(self.lm_head)
            and not torch.is_autocast_enabled("cpu") and getattr(torch.autograd.forward_ad, "_current_level", -1) < 0
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        encoder_outputs=None,
        past_key_values=None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache=None,
        project_scored_positions_only=False,
        **kwargs,
    ):
        """`labels`: target ids, -100 where ignored; the loss is cross-entropy with `config.label_smoothing`
        (Section 5.4), and, without `decoder_input_ids`, the decoder reads the labels shifted right.

        With `num_items_in_batch` (transformers' Trainer passes it under gradient accumulation), the loss is this
        batch's summed token loss over that many tokens, as in transformers' own models.

        `project_scored_positions_only=True` (with `labels`; what our training loop passes) computes the output
        projection only at the positions whose label is not -100: `logits` is then (positions, vocab_size), those
        positions in order, and the loss is the same. (Its name has no "label" in it: transformers' Trainer takes
        every `forward` argument named so for a label column, and would then find no labels in a batch.) Why: the
        projection with its loss is about a quarter of a base training step, and token batches leave ~30% of the
        label positions as padding. Not under `torch.compile`, where the count of positions would be data-dependent:
        there all positions are computed."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if labels is not None:
            use_cache = False
            check_token_ids(labels.masked_fill(labels == -100, 0), self.lm_head.out_features, "labels")  # -100: ignored
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
            decoder_shape = (decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds).shape[:2]
            if decoder_shape != labels.shape:
                raise ValueError(f"`labels` {tuple(labels.shape)} and the decoder's inputs {tuple(decoder_shape)} must have "
                                 "the same (batch, length): one label per decoder position.")
        tied = TiedGradient() if self.gathers_tied_gradient() else None
        gathering = tied_gradient.set(tied) if tied is not None else None
        try:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                encoder_outputs=encoder_outputs,
                cache=resolve_cache(cache, past_key_values),
                inputs_embeds=inputs_embeds,
                decoder_inputs_embeds=decoder_inputs_embeds,
                use_cache=use_cache,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        finally:
            if gathering is not None:
                tied_gradient.reset(gathering)
        hidden_states = outputs.last_hidden_state
        if labels is not None and project_scored_positions_only and not torch.compiler.is_compiling():
            labels = labels.to(hidden_states.device)
            kept = labels != -100
            hidden_states, labels = hidden_states[kept], labels[kept]
        if tied is None:
            logits = linear(self.lm_head, hidden_states)
        else:
            rows = hidden_states.reshape(-1, hidden_states.shape[-1])
            rows = TiedOutputProjection.apply(rows, self.lm_head.weight, self.lm_head.bias, tied)
            logits = rows.view(*hidden_states.shape[:-1], rows.shape[-1])
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = LabelSmoothedCrossEntropy.apply(
                logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1]),
                labels.reshape(-1), self.config.label_smoothing,
            )
            num_items_in_batch = kwargs.get("num_items_in_batch")
            if num_items_in_batch is not None:
                # transformers' Trainer passes the labelled tokens of all the micro-batches of an update (and of all
                # processes) and then neither averages over micro-batches nor processes: the sum over this batch's
                # tokens, divided by that count, makes the update's loss the mean over all its tokens.
                loss = loss * (labels != -100).sum() / num_items_in_batch
        output = Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
        )
        return output if return_dict else output.to_tuple()


# ------------------------------------------------------------------------------------------------------------------
# CPU kernels: oneDNN products and a counter-based dropout mask (measurements in docs/speed.md)
#
# The MKL behind `F.linear` runs AVX-512 code on Intel CPUs only; on AMD CPUs oneDNN's products are faster. This file
# cannot tell which CPU it runs on (it ships as remote code, which opens no file), so its settings are AMD's; the
# installed package sets Intel's where it finds an Intel CPU (`modeling_seq2seq.cpu`). So does decoding_seq2seq.py.
# ------------------------------------------------------------------------------------------------------------------


def capturing_a_graph() -> bool:
    """Whether a compiler, a tracer or a functorch transform (vmap, grad) is running: they get torch's own operations,
    whose rules they know, instead of the kernels below."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()


def onednn_linear_kernel():
    """oneDNN's `linear(x, weight, bias, ...)` kernel, or None where torch lacks it or `torch.backends.mkldnn` is
    disabled."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def forward_is_watched(module: nn.Module) -> bool:
    """Whether calling `module` does more than its class's `forward`: its own hooks, or a `forward` replaced on the
    instance (accelerate's hooks, exporters, a user's patch)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module)
                or hasattr(module, "_hf_hook"))


def is_plain_linear(module: nn.Module) -> bool:
    """An `nn.Linear` that computes x W^T + b and nothing else, so that another kernel may compute its product:
    not a subclass (adapters, quantized or parametrized layers), no hooks (its own, global ones, or a `forward`
    replaced on the instance, as accelerate does), and a weight that is a plain tensor (not a DTensor)."""
    hooks = nn.modules.module
    return (
        type(module) is nn.Linear
        and "forward" not in vars(module)
        and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)
        and not (hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                 or hooks._global_backward_pre_hooks)
        and type(module.weight.data) is torch.Tensor
    )


# The setting found outside our products: each product restores it, not what it found, which may be another
# thread's "bf16" (a save and restore per product, interleaved by two threads, could leave "bf16" for good).
fp32_precision_outside = {}


def matmul_under_bf16_precision(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right with `torch.backends.mkldnn.matmul.fp32_precision` set to "bf16" (process-wide, while it runs)."""
    settings = torch.backends.mkldnn.matmul
    found = settings.fp32_precision
    if found != "bf16":
        fp32_precision_outside["value"] = found
    settings.fp32_precision = "bf16"
    try:
        return left @ right
    finally:
        settings.fp32_precision = fp32_precision_outside.get("value", found)


def computes_in_float32(product) -> bool:
    """Whether `product(left, right)` multiplies float32 matrices without rounding them to bfloat16 first. One operand
    holds 1 + 2^-10 (exact in float32, 1 in bfloat16) and the other ones, then the other way round, so the sums are
    exact in float32 and show either operand rounded. Both layouts that `OneDNNLinear.backward` uses are tried (a
    transposed left operand for d/dW, a plain one for d/dx), at a small shape and at one as large as a training
    step's (oneDNN picks its kernel by shape)."""
    fine = 1 + 2**-10
    for depth, rows, columns in ((37, 64, 48), (512, 256, 512)):
        for left_value, right_value in ((fine, 1.0), (1.0, fine)):
            left = torch.full((depth, rows), left_value)
            if not (
                torch.equal(product(left.t(), torch.full((depth, columns), right_value)),
                            torch.full((rows, columns), depth * fine))
                and torch.equal(product(left, torch.full((rows, columns), right_value)),
                                torch.full((depth, columns), rows * fine))
            ):
                return False
    return True


onednn_matmul_probe = {}  # the probe's answer, once per process


def onednn_matmul_keeps_float32() -> bool:
    """Whether `onednn_matmul` may route float32 products to oneDNN's matmul primitive on this machine. torch sends
    them there only under the "bf16" matmul precision, which allows oneDNN to round the inputs to bfloat16; it does
    so on CPUs with a kernel for that (AMX) and computes in float32 elsewhere. `computes_in_float32` tells which; a
    CPU with AMX is ruled out beforehand, since no probe can try every shape for which oneDNN may pick an AMX kernel."""
    if "keeps_float32" not in onednn_matmul_probe:
        has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # a torch that cannot tell: assume AMX
        try:
            keeps = (
                onednn_linear_kernel() is not None and not has_amx()
                and computes_in_float32(matmul_under_bf16_precision)
            )
        except (AttributeError, RuntimeError):  # a torch without the setting (< 2.9) or without oneDNN
            keeps = False
        onednn_matmul_probe["keeps_float32"] = keeps
    return onednn_matmul_probe["keeps_float32"]


def onednn_matmul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right for float32 CPU matrices on oneDNN's matmul primitive where `onednn_matmul_keeps_float32`, else
    by `torch.mm` (MKL). The primitive reads a transposed operand in place; oneDNN's inner product (`OneDNNLinear`'s
    forward kernel) copies it first. At the base preset's backward shapes it is ~10% faster than MKL on an AMD CPU,
    where MKL has no AVX-512 kernels. While it runs, other threads' float32 products go to oneDNN too, which the probe
    showed to compute in float32 as well, and `torch.get_float32_matmul_precision()` raises in them (torch refuses to
    read its legacy setting while the new one is "bf16")."""
    return matmul_under_bf16_precision(left, right) if onednn_matmul_keeps_float32() else left @ right


class OneDNNLinear(torch.autograd.Function):
    """rows W^T + b for float32 (rows, in_features) on a CPU, by oneDNN. On AMD CPUs oneDNN uses AVX-512 and the MKL
    behind `F.linear` does not: at the base preset's training shapes oneDNN reaches about 1.25x MKL's FLOP/s for the
    product, and its matmul primitive about 1.1x for d/dx and d/dW (`onednn_matmul`). Same results as `F.linear` up
    to float rounding. A backward that builds a graph (double backward) uses plain differentiable products."""

    @staticmethod
    def forward(ctx, rows, weight, bias):
        ctx.save_for_backward(rows if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return onednn_linear_kernel()(rows, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad_rows):
        rows, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():
                grad_x = grad_rows @ weight
            elif onednn_matmul_keeps_float32():
                grad_x = onednn_matmul(grad_rows, weight)
            else:
                grad_x = onednn_linear_kernel()(grad_rows, weight.t(), None, "none", [], "")
        if ctx.needs_input_grad[1]:
            grad_weight = grad_rows.t() @ rows if torch.is_grad_enabled() else onednn_matmul(grad_rows.t(), rows)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def lowbias32_(bits: torch.Tensor) -> torch.Tensor:
    """C. Wellons' lowbias32 integer hash, in place on int32 values (read as uint32): every output bit depends on
    every input bit. int32 products wrap modulo 2^32, as the hash needs, and `>>` is made logical by a mask."""
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B - 2**32), (16, None)):
        bits.bitwise_xor_(bits.bitwise_right_shift(shift).bitwise_and_((1 << (32 - shift)) - 1))
        if multiplier is not None:
            bits.mul_(multiplier)
    return bits


def dropout_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """Section 5.4's dropout as a CPU mask: 1 / (1 - p) where an element is kept, 0 where it is dropped, each dropped
    with probability p, independently.

    torch's own CPU dropout draws one number per element from its Mersenne Twister, serially: ~7 ns an element,
    3% of a base training step on 2 cores (32 masks of 16 x 32 x 512). This mask is a counter-based generator, as
    CUDA's Philox dropout is: element i gets lowbias32(a i + b), with a (odd) and b drawn from torch's default
    generator once per mask, so `torch.manual_seed` reproduces it and `torch.utils.checkpoint`'s recompute gets
    the same mask. Vectorised int32 work: ~1 ns an element.

    Each hash serves two elements, one 16-bit half each, where a multiple of 2^-16 is within 0.01% of both p and 1 - p
    (for p = 0.1, 6554 / 2^16 = 0.100006; so for any p from 0.077 to 0.923). The hash is most of the work: halving it
    takes a 16 x 32 x 512 mask from ~0.43 to ~0.29 ms on 2 cores (32 such masks a base training step). Other p get
    one 32-bit number per element."""
    count = math.prod(shape)
    stride, offset = (torch.randint(-(2**31), 2**31 - 1, (2,)) | torch.tensor([1, 0])).tolist()
    threshold = p * 2**16
    halves = abs(round(threshold) - threshold) <= min(threshold, 2**16 - threshold) * 1e-4
    bits = lowbias32_(torch.arange(-(-count // 2) if halves else count, dtype=torch.int32).mul_(stride).add_(offset))
    if halves:  # the halves of a uniform 32-bit value are two independent uniform 16-bit values
        keep = bits.view(torch.int16)[:count].ge_(round(threshold) - 2**15)
    else:
        keep = bits.ge_(round(p * 2**32) - 2**31)
    return keep.to(dtype).mul_(1 / (1 - p)).view(shape)


def uses_dropout_mask(x: torch.Tensor, p: float, training: bool) -> bool:
    """Whether `apply_dropout` draws `dropout_mask` for x: CPU training in eager mode on a plain tensor (a compiler,
    a tracer, vmap or a tensor subclass gets torch's dropout, which they know how to handle), within int32's
    counter range."""
    return (
        training and 0 < p < 1 and type(x) is torch.Tensor and x.device.type == "cpu" and x.numel() < 2**31
        and not capturing_a_graph()
    )


def apply_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with `dropout_mask` on CPUs."""
    return x * dropout_mask(x.shape, p, x.dtype) if uses_dropout_mask(x, p, training) else F.dropout(x, p, training)


def add_dropout(residual: torch.Tensor, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`residual + apply_dropout(x, p, training)` (Section 5.4, residual dropout), in one pass on CPUs."""
    if uses_dropout_mask(x, p, training):
        return torch.addcmul(residual, x, dropout_mask(x.shape, p, x.dtype))
    return residual + F.dropout(x, p, training)


# The decode loop's `linear(module, x)` while it encodes the source (`decoding_seq2seq.IncrementalDecoder`).
search_linear = contextvars.ContextVar("search_linear", default=None)

# Whether float32 products go to oneDNN (AMD CPUs; the section's head says why): `OneDNNLinear` where autograd
# records, oneDNN's kernel alone where it does not. On an Intel CPU a base training step with every product on MKL
# was 1.4 to 3.5% faster (a 2-core Xeon, three alternating runs), and MKL gives MarianMTModel's logits bit for bit.
ONEDNN_PRODUCTS = True


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, with oneDNN computing the product of a plain float32 `nn.Linear` on a CPU where `ONEDNN_PRODUCTS`
    and the product has enough work to pay for oneDNN's dearer call (~10 us more than MKL's): 2^23 multiply-adds, or
    a weight of 2^20 values or more. When training, `OneDNNLinear` (with its backward); in evaluation, the kernel
    alone: at the base preset on 2 AMD cores a forward without gradients runs 1.15 to 1.4x as fast as with
    `F.linear` (MarianMTModel's), and its logits equal Marian's up to float rounding (~1e-5) rather than bit for bit.
    Inside our `generate` the search picks its own kernels (`search_linear`, `decoding_seq2seq.DecodeStepLinear`)."""
    # Not while compiling: dynamo cannot trace `ContextVar.get` and would break the graph there.
    search = None if module.training or torch.compiler.is_compiling() else search_linear.get()
    if search is not None:
        return search(module, x)
    if not (ONEDNN_PRODUCTS and is_plain_linear(module)):
        return module(x)
    weight = module.weight
    if (
        capturing_a_graph()
        or x.device.type != "cpu" or weight.device.type != "cpu"
        or x.dtype != torch.float32 or weight.dtype != torch.float32
        or (work := x.numel() // max(x.shape[-1], 1) * weight.numel()) == 0
        or (work < 2**23 and weight.numel() < 2**20)
        or torch.is_autocast_enabled("cpu")
        or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0  # forward-mode AD: no rule here
        or onednn_linear_kernel() is None
    ):
        return module(x)
    rows, bias = x.reshape(-1, x.shape[-1]), module.bias
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        rows = OneDNNLinear.apply(rows, weight, bias)
    else:
        rows = onednn_linear_kernel()(rows, weight, bias, "none", [], "")
    return rows.view(*x.shape[:-1], rows.shape[-1])  # a view outside the Function: in-place edits stay allowed


__all__ = [
    "Seq2SeqTransformerPreTrainedModel",
    "Seq2SeqTransformerModel",
    "Seq2SeqTransformerForConditionalGeneration",
]
