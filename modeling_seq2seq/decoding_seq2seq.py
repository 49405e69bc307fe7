"""Fast greedy and beam search for `Seq2SeqTransformerForConditionalGeneration.generate` (Sections 3 and 6.1).

The model's `forward` with a cache is what transformers' own generation loop runs; this file is the decode loop the
model's `generate` uses instead for plain greedy and beam search, with the same outputs (in beam search, up to
float32 rounding where two hypotheses nearly tie: see `generate`): the source is encoded once, each step runs the
decoder for one new token per row, and the search follows transformers' rules exactly.
`IncrementalDecoder` is that step, lean for CPUs, where it runs as TorchScript (`decode_step_layers`);
`StaticIncrementalDecoder` is the same step with fixed shapes, which a GPU records once as a CUDA graph and replays.
It ships to the Hub with the model (torch and transformers only).
"""

import functools
import math
import warnings
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUActivation, SiLUActivation

from .modeling_seq2seq import (
    PositionwiseFeedForward,
    attention_dtype,
    forward_is_watched,
    is_plain_linear,
    onednn_linear_kernel,
    padding_mask,
    sdpa_attention,
    search_linear,
)


class PackedDecodeWeights(dict):
    """A model's copies of its decode weights in oneDNN's layout: id(linear layer) -> (weight, its storage and
    version, a sample of its values, the copy). Kept on the model, so they live and die with it; a copy or a pickle
    of the model starts without them (oneDNN's opaque tensors can be neither copied nor saved)."""

    def __deepcopy__(self, memo):
        return PackedDecodeWeights()

    def __reduce__(self):
        return PackedDecodeWeights, ()


# How a decode step multiplies few rows, which depends on the CPU. On AMD CPUs, oneDNN's AVX-512 kernel streams a
# blocked matrix faster for 6 rows than for 1 to 5 (the 37 products of a base step on 2 cores: 7.7 ms at one row,
# 6.2 ms as 6; 8 is slower), so fewer rows are multiplied as `PADDED_ROWS` (zeros below), and MKL, behind
# `F.linear`, is about half as fast. MKL runs its AVX-512 code on Intel CPUs only. There, up to 2 rows go to
# `F.linear` (`FEW_ROWS_ON_MKL`): oneDNN's blocked kernel costs more per call (a base step's 36 layer products on a
# 2-core Xeon: 4.3 ms with MKL at one row, 4.9 ms with oneDNN, 5.7 ms padded to 6 rows; at 4 rows and more oneDNN is
# faster, 10.8 against 16.1 ms at 32), and nothing is padded (whole beam-4 searches of one sentence 1.07x faster
# without). The values below are AMD's, as in modeling_seq2seq.py (its CPU kernels' section says why); the installed
# package sets Intel's where it finds an Intel CPU (`modeling_seq2seq.cpu`).
PADDED_ROWS = 6
FEW_ROWS_ON_MKL = 0


class DecodeStepLinear:
    """`linear(module, x)` for one search: oneDNN's kernel for the plain float32 `nn.Linear` layers of the model (its
    encoder's too) on a CPU.

    A decode step multiplies 1 to 32 rows by every weight matrix, so its time is the time it takes to stream the
    weights out of memory. For such skinny products the MKL path behind `F.linear` reaches about half the bandwidth
    that oneDNN's does on AMD CPUs (the output projection at one row: 7.5 ms vs 3.6 ms on 2 cores; CTranslate2 avoids
    MKL on non-Intel CPUs too), and oneDNN is faster still with the weights stored once in its blocked
    layout (the whole base decoder at 4 rows: 23 ms plain, 14 ms blocked). The blocked copies are kept per model
    (its weights once more in memory; a search first drops those of layers the model no longer has, as after
    `resize_token_embeddings`). At the first use in a search each is checked against its layer: same tensor, same
    storage (assigning `.data`, as `vector_to_parameters` does, changes it), same version counter and same values at
    every 509th element (in rows narrower than 510, every (width - 1)th), else rebuilt. An edit in place through
    `.data` leaves the version counter alone, so only the sample can see it: it reads every row (a row replaced is
    seen; 1/32 of the cache lines at 512 wide and more), but not every element. Up to `FEW_ROWS_ON_MKL` rows go to
    `F.linear`, and fewer than `PADDED_ROWS` rows are multiplied as that many (zeros below), by CPU (see those
    settings); only the input's rows come back, and each depends on its own input row only.
    Results equal `F.linear` up to float rounding. Matrices under 1 MB (2^18 floats) stay in cache, where a oneDNN
    call's fixed cost (~40 us against ~10 us) outweighs its bandwidth: they, layers that are not plain
    (subclasses, adapters, hooks), and other devices or dtypes run the module itself.
    """

    def __init__(self, model, device: torch.device, dtype: torch.dtype):
        self.kernel = onednn_linear_kernel()
        if device.type != "cpu" or dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            self.kernel = None
        if self.kernel is None:
            vars(model).pop("_packed_decode_weights", None)  # e.g. moved to a GPU since: the CPU copies are no use
            return
        self.pack = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
        self.cache = vars(model).get("_packed_decode_weights")
        if self.cache is None:
            self.cache = model._packed_decode_weights = PackedDecodeWeights()
        layers = {id(module) for module in model.modules()}
        for key in [key for key in self.cache if (key[-1] if isinstance(key, tuple) else key) not in layers]:
            del self.cache[key]  # a replaced layer's copy (and the old weight it holds)
        self.chosen, self.padded = {}, {}
        self.mkl_rows = FEW_ROWS_ON_MKL

    def weights(self, module):
        """The (weight, bias) oneDNN multiplies `module`'s inputs by in this search, or None to run the module."""
        if self.kernel is None:
            return None
        key = id(module)
        if key not in self.chosen:  # decided once per search, not at each of a step's 37 calls (base)
            self.chosen[key] = self.choose(module)
        return self.chosen[key]

    def choose(self, module):
        if not is_plain_linear(module):
            return None
        weight = module.weight
        if weight.numel() < 2**18 or weight.dtype != torch.float32 or weight.device.type != "cpu":
            return None
        if self.pack is None:
            return weight, module.bias
        return self.kept_copy(module, id(module), lambda w: self.pack(w, 32)), module.bias  # 32: rows it is tuned for

    def kept_copy(self, module, key, make):
        """`make(weight)` for `module`'s weight, kept on the model under `key` and made again when the weight has
        changed (the check in the class docstring)."""
        weight = module.weight
        # A stride under the row's width, so that every row is read.
        stride = max(min(509, weight.shape[-1] - 1), 1)
        entry, sample = self.cache.get(key), weight.detach().reshape(-1)[::stride]
        same = entry is not None and entry[0] is weight and entry[1] == (weight.data_ptr(), weight._version)
        if not (same and torch.equal(entry[2], sample)):
            entry = (weight, (weight.data_ptr(), weight._version), sample.clone(), make(weight.detach()))
            self.cache[key] = entry
        return entry[3]

    def padding(self, width: int) -> torch.Tensor:
        """The (PADDED_ROWS, width) buffer that inputs of fewer rows are copied into."""
        buffer = self.padded.get(width)
        if buffer is None:
            buffer = self.padded[width] = torch.zeros(PADDED_ROWS, width, dtype=torch.float32)  # whatever the default
        return buffer

    def __call__(self, module, x: torch.Tensor) -> torch.Tensor:
        weights = self.weights(module)
        if weights is None:
            return module(x)
        rows = x.shape[0]
        if x.dim() == 2 and rows <= self.mkl_rows:
            return F.linear(x, module.weight, module.bias)
        if x.dim() == 2 and rows < PADDED_ROWS:
            buffer = self.padding(x.shape[1])
            buffer[:rows] = x
            return self.kernel(buffer, *weights, "none", [], "")[:rows]
        return self.kernel(x, *weights, "none", [], "")


# For TorchScript, which takes no objects: a linear layer as (weight, bias, the weight oneDNN multiplies or None, its
# padding buffer, the most rows that F.linear multiplies instead), a layer norm as (weight, bias, eps).
ScriptedLinear = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, int]
ScriptedNorm = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]


def scripted_linear(x: torch.Tensor, linear: ScriptedLinear) -> torch.Tensor:
    """`DecodeStepLinear` inside TorchScript."""
    weight, bias, onednn_weight, padding, mkl_rows = linear
    rows = x.size(0)
    if onednn_weight is None or rows <= mkl_rows:
        return F.linear(x, weight, bias)
    no_scalars: List[Optional[Union[int, float, complex]]] = []
    if rows < padding.size(0):
        padding[:rows] = x
        return torch.ops.mkldnn._linear_pointwise(padding, onednn_weight, bias, "none", no_scalars, "")[:rows]
    return torch.ops.mkldnn._linear_pointwise(x, onednn_weight, bias, "none", no_scalars, "")


def scripted_layer_norm(x: torch.Tensor, norm: ScriptedNorm) -> torch.Tensor:
    return F.layer_norm(x, [x.size(-1)], norm[0], norm[1], norm[2])


def add_sublayer_output(hidden: torch.Tensor, output: torch.Tensor, norm: ScriptedNorm, pre_norm: bool) -> torch.Tensor:
    """Section 3.1's residual connection: LayerNorm(x + Sublayer(x)), or x + Sublayer(LayerNorm(x)) in pre-norm."""
    return hidden + output if pre_norm else scripted_layer_norm(hidden + output, norm)


def decode_step_layers(
    hidden: torch.Tensor,
    linears: List[ScriptedLinear],
    norms: List[ScriptedNorm],
    cross_keys_values: List[Tuple[torch.Tensor, torch.Tensor]],
    cross_mask: Optional[torch.Tensor],
    past_keys_values: List[Tuple[torch.Tensor, torch.Tensor]],
    num_heads: int,
    num_beams: int,
    scaling: float,
    pre_norm: bool,
    activation: str,
    project: bool,
) -> Tuple[torch.Tensor, List[Tuple[torch.Tensor, torch.Tensor]]]:
    """`IncrementalDecoder.layers_and_output`, the same operations in the same order, for TorchScript to run.

    Dispatched from Python, a step's ~200 small operations cost several microseconds each; TorchScript's
    interpreter runs them in C++ (base, one row, 2 cores: 7.7 to 8.5 ms a step op by op, 6.2 to 7.0 ms scripted, of
    which ~6 ms are the matrix products). Each layer has 6 `linears` (self-attention QKV and output,
    cross-attention query and output, the two of the feed-forward) and 3 `norms`; the output projection and, in
    pre-norm, the final layer norm come last. Without `project`, it returns the decoder's output instead of the
    logits (for `GreedyScreen`).
    """
    rows, d_model = hidden.size(0), hidden.size(1)
    present: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(len(cross_keys_values)):
        linear, norm = 6 * i, 3 * i
        x = scripted_layer_norm(hidden, norms[norm]) if pre_norm else hidden
        query_key_value = scripted_linear(x, linears[linear]).view(rows, 3, num_heads, 1, -1)
        query, key, value = query_key_value[:, 0], query_key_value[:, 1], query_key_value[:, 2]
        if len(past_keys_values) > 0:
            key = torch.cat([past_keys_values[i][0], key], dim=2)
            value = torch.cat([past_keys_values[i][1], value], dim=2)
        present.append((key, value))
        output = F.scaled_dot_product_attention(query, key, value, scale=scaling).transpose(1, 2).reshape(rows, d_model)
        hidden = add_sublayer_output(hidden, scripted_linear(output, linears[linear + 1]), norms[norm], pre_norm)

        x = scripted_layer_norm(hidden, norms[norm + 1]) if pre_norm else hidden
        query = scripted_linear(x, linears[linear + 2]).view(-1, num_beams, num_heads, d_model // num_heads)
        key, value = cross_keys_values[i]
        output = F.scaled_dot_product_attention(query.transpose(1, 2), key, value, attn_mask=cross_mask, scale=scaling)
        output = output.transpose(1, 2).reshape(rows, d_model)
        hidden = add_sublayer_output(hidden, scripted_linear(output, linears[linear + 3]), norms[norm + 1], pre_norm)

        x = scripted_layer_norm(hidden, norms[norm + 2]) if pre_norm else hidden
        inner = scripted_linear(x, linears[linear + 4])
        if activation == "relu":
            inner = torch.relu(inner)
        elif activation == "gelu":
            inner = F.gelu(inner)
        else:
            inner = F.silu(inner)
        hidden = add_sublayer_output(hidden, scripted_linear(inner, linears[linear + 5]), norms[norm + 2], pre_norm)
    if len(norms) > 3 * len(cross_keys_values):
        hidden = scripted_layer_norm(hidden, norms[-1])
    if not project:
        return hidden, present
    return scripted_linear(hidden, linears[-1]).float(), present


@functools.cache
def scripted_decode_step():
    """`decode_step_layers` compiled by TorchScript, or None where it cannot be (a torch without TorchScript, or
    without this file's source). TorchScript is deprecated in favour of `torch.compile`, which is slower here
    (see the README); without it the same step runs op by op in Python.

    It is run with the graph executor's optimizations off (`torch.jit.optimized_execution(False)`, a thread-local
    setting): they specialise the graph to the shapes seen, which change with every batch size, beam count and
    finished sentence, and each new specialisation costs more than it saves. Four batch/beam settings in turn,
    tiny preset: optimized, the first rounds up to 1.9x slower than the Python step and the median of six rounds
    0.76 to 1.17x as fast; unoptimized, 1.07 to 1.27x faster (1.03 to 1.16x at base). At one fixed shape the
    optimizations gain 1 to 2%."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
            return torch.jit.script(decode_step_layers)
    except Exception as error:  # whatever the failure, the Python step computes the same
        warnings.warn(f"Decoding op by op in Python: TorchScript could not compile the decode step ({error}).",
                      RuntimeWarning)
        return None


def scripted_activation(activation: nn.Module) -> str | None:
    """The name `decode_step_layers` knows `activation` by, or None."""
    if "forward" in vars(activation):
        return None
    if type(activation) is nn.ReLU:
        return "relu"
    if type(activation) is GELUActivation and activation.act is F.gelu:
        return "gelu"
    if type(activation) in (SiLUActivation, nn.SiLU):
        return "silu"
    return None


class IncrementalDecoder:
    """Section 3's auto-regressive decoder at inference, one token at a time for search, as lean as the paper's math.

    The source is encoded once. Each layer's cross-attention keys and values are projected once per sentence and
    shared by all its beams: the beams of a sentence act as that sentence's queries, so nothing is copied per
    beam, and a beam reorder touches only the (small) self-attention cache. Sentences that are done leave the
    batch, so they cost nothing afterwards. A step works on (rows, d_model) matrices, and each layer's parts are
    looked up once per search. On a CPU, for a plain float32 model, the step runs as TorchScript
    (`decode_step_layers`): at one row, dispatching its ~200 operations from Python costs as much as a layer's
    matrix products. Otherwise (and with `model.decode_with_torchscript = False`) it runs op by op in Python,
    honouring hooks, adapters and autocast.
    """

    may_script = True

    def __init__(self, model, input_ids, attention_mask, num_beams: int):
        self.model, self.num_beams = model, num_beams
        self.decoder = model.get_decoder()
        self.linear = DecodeStepLinear(model, model.lm_head.weight.device, model.lm_head.weight.dtype)
        encoding = search_linear.set(self.linear)  # the encoder's products too: at base, 13 ms -> 7.5 ms (32 tokens)
        try:
            encoder_states = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        finally:
            search_linear.reset(encoding)
        layers = self.decoder.layers
        self.layers = [(layer.self_attn, layer.cross_attn, layer.feed_forward) for layer in layers]
        self.norms = [
            [plain_layer_norm(n) for n in (layer.self_attn_layer_norm, layer.cross_attn_layer_norm, layer.final_layer_norm)]
            for layer in layers
        ]
        self.pre_norm = [layer.pre_norm for layer in layers]
        self.cross_keys_values = [
            cross_attn.split_heads(self.linear(cross_attn.kv_proj, encoder_states), 2) for _, cross_attn, _ in self.layers
        ]
        self.cross_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            self.cross_mask = padding_mask(attention_mask, attention_dtype(encoder_states))
        self.cross_rows_per_sentence = 1
        if num_beams > 1 and encoder_states.dtype in (torch.float16, torch.bfloat16) and encoder_states.device.type == "cpu":
            # Half precision: each beam queries its sentence's keys alone, as transformers' loop computes it (a block of
            # beams as queries rounds differently, by an ulp in ~7% of fp16 logits, enough to change beams).
            self.cross_rows_per_sentence = num_beams
            self.cross_keys_values = [(k.repeat_interleave(num_beams, 0), v.repeat_interleave(num_beams, 0))
                                      for k, v in self.cross_keys_values]
            if self.cross_mask is not None:
                self.cross_mask = self.cross_mask.repeat_interleave(num_beams, 0)
        self.self_keys_values = [None] * len(layers)
        self.length = 0
        self.script, self.script_arguments = None, None
        if self.may_script and model.decode_with_torchscript:
            self.script_arguments = self.scripted_step_arguments()
            self.script = scripted_decode_step() if self.script_arguments is not None else None

    def scripted_step_arguments(self):
        """The decoder's weights as `decode_step_layers` takes them, or None where a step must run module by module:
        on other devices or dtypes, with hooks, adapters, other kinds of layers, autocast or a torch function mode."""
        model, decoder, device = self.model, self.decoder, self.model.lm_head.weight.device
        if device.type != "cpu" or torch.is_autocast_enabled("cpu") or not recordable(model, device):
            return None
        if any(p.dtype != torch.float32 for p in (*decoder.parameters(), *model.lm_head.parameters())):
            return None
        layers = decoder.layers
        norms = [n for layer in layers for n in (layer.self_attn_layer_norm, layer.cross_attn_layer_norm,
                                                 layer.final_layer_norm)]
        norms += [decoder.layer_norm] if decoder.layer_norm is not None else []
        if any(type(n) is not nn.LayerNorm or tuple(n.normalized_shape) != (model.config.d_model,) for n in norms):
            return None
        activations = {
            scripted_activation(layer.feed_forward.activation) if type(layer.feed_forward) is PositionwiseFeedForward
            else None
            for layer in layers
        }
        attentions = [attention for layer in layers for attention in (layer.self_attn, layer.cross_attn)]
        heads, scalings = {a.num_heads for a in attentions}, {a.scaling for a in attentions}
        if None in activations or any(len(kinds) != 1 for kinds in (activations, heads, scalings, set(self.pre_norm))):
            return None
        linears, no_padding = [], torch.empty(0)
        modules = [module for self_attn, cross_attn, feed_forward in self.layers for module in (
            self_attn.qkv_proj, self_attn.out_proj, cross_attn.q_proj, cross_attn.out_proj, feed_forward.fc1,
            feed_forward.fc2)]
        for module in modules + [model.lm_head]:
            onednn = self.linear.weights(module)
            if onednn is None:
                linears.append((module.weight, module.bias, None, no_padding, 0))
            else:
                linears.append((module.weight, module.bias, onednn[0], self.linear.padding(module.in_features),
                                self.linear.mkl_rows))
        norms = [(n.weight, n.bias, n.eps) for n in norms]
        return linears, norms, heads.pop(), self.queries_per_sentence, scalings.pop(), self.pre_norm[0], activations.pop()

    def step(self, tokens: torch.Tensor, project: bool = True) -> torch.Tensor:
        """Next-token logits in float32, (rows, vocab), for one new token per row (rows = sentences x beams); without
        `project` (scripted step only), the decoder's output before the output projection, (rows, d_model)."""
        position = self.decoder.embed_positions(1, self.length, tokens.device)
        self.length += 1
        if self.script is None:
            return self.layers_and_output(tokens, position)
        linears, norms, heads, beams, scaling, pre_norm, activation = self.script_arguments
        hidden = self.decoder.embed_tokens(tokens) + position
        past = self.self_keys_values if self.length > 1 else []
        with torch.jit.optimized_execution(False):  # see `scripted_decode_step`
            logits, self.self_keys_values = self.script(hidden, linears, norms, self.cross_keys_values, self.cross_mask,
                                                        past, heads, beams, scaling, pre_norm, activation, project)
        return logits

    def layers_and_output(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        decoder = self.decoder
        hidden = decoder.embed_tokens(tokens[:, None])[:, 0]  # (rows, 1) as in `forward`, for hooks and adapters
        hidden = hidden + position.to(hidden.dtype)
        sublayers = (self.self_attention, self.cross_attention, self.feed_forward)
        for i, (norms, pre_norm) in enumerate(zip(self.norms, self.pre_norm)):
            for sublayer, norm in zip(sublayers, norms):
                hidden = hidden + sublayer(i, norm(hidden)) if pre_norm else norm(hidden + sublayer(i, hidden))
        if decoder.layer_norm is not None:
            hidden = decoder.layer_norm(hidden)
        return self.linear(self.model.lm_head, hidden).float()

    def self_attention(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        attention = self.layers[i][0]
        rows, heads = hidden.shape[0], attention.num_heads
        # (rows, 3 d) -> 3 x (rows, heads, 1, head_dim)
        query, key, value = self.linear(attention.qkv_proj, hidden).view(rows, 3, heads, 1, -1).unbind(1)
        if self.self_keys_values[i] is not None:
            past_key, past_value = self.self_keys_values[i]
            key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
        self.self_keys_values[i] = (key, value)
        output, _ = sdpa_attention(attention, query, key, value, None, attention.scaling)
        return self.linear(attention.out_proj, output.reshape(hidden.shape))

    def cross_attention(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        attention = self.layers[i][1]
        key, value = self.cross_keys_values[i]
        # (sentences * beams, d) -> (sentences, heads, beams, head_dim): beams become queries of their sentence.
        query = self.linear(attention.q_proj, hidden).view(-1, self.queries_per_sentence, attention.num_heads,
                                                           attention.head_dim)
        output, _ = sdpa_attention(attention, query.transpose(1, 2), key, value, self.cross_mask, attention.scaling)
        return self.linear(attention.out_proj, output.reshape(hidden.shape))

    def feed_forward(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        feed_forward = self.layers[i][2]
        if type(feed_forward) is not PositionwiseFeedForward or forward_is_watched(feed_forward):
            return feed_forward(hidden)
        return self.linear(feed_forward.fc2, feed_forward.activation(self.linear(feed_forward.fc1, hidden)))

    def reorder(self, rows: torch.Tensor):
        """Continue from these rows of the self-attention cache (beam search keeps the best continuations)."""
        self.self_keys_values = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.self_keys_values]

    @property
    def queries_per_sentence(self) -> int:
        """The beams that attend to one copy of a sentence's encoder keys, as one block of queries."""
        return self.num_beams // self.cross_rows_per_sentence

    def cross_rows(self, sentences: torch.Tensor) -> torch.Tensor:
        """The rows of the cross-attention keys, values and mask that hold these sentences."""
        per_sentence = self.cross_rows_per_sentence
        if per_sentence == 1:
            return sentences
        return (sentences[:, None] * per_sentence + torch.arange(per_sentence, device=sentences.device)).flatten()

    def keep_sentences(self, sentences: torch.Tensor):
        """Keep only these sentences' encoder keys, values and mask (the caller reorders the self-attention rows)."""
        rows = self.cross_rows(sentences)
        self.cross_keys_values = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cross_keys_values]
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask.index_select(0, rows)


class GreedyScreen:
    """Greedy search's next token, exactly as from the float32 logits, reading a smaller copy of the output projection
    (and, for top-k sampling, the k largest float32 logits: `top_k_logits`).

    At one row the output projection is half of a base step's streamed bytes (76 of 164 MB). A bfloat16 copy is
    multiplied 2.6x faster by oneDNN (AVX-512 BF16; base, 6 rows: 1.06 against 2.76 ms), and at 1 to 3 rows an
    int8 copy with a scale per row, by torch's weight-only int8 kernel, faster again (base, 1 row, after a step
    has streamed the layers: 1.4 against 2.1 ms). Either copy's logits are only approximate, so they only screen.
    The approximate logit a_i and the float32 one differ by at most c1 |h| + c2 (|a_i| + B): c1 bounds, by
    Cauchy-Schwarz on each row, the copy's weight error, the input rounded to bfloat16 (unit roundoff u = 2^-8)
    and float32 accumulation over d_model terms, both the copy's and that of the float32 product that decides;
    c2 the bfloat16 output, rounded before the bias is added (B the largest |bias|; `bfloat16_copy`, `int8_copy`).
    So, after the same token suppressions as the float32 path, only tokens within 2E of the best approximate logit
    a_b can be the float32 argmax, E = (c1 |h| + c2 (|a_b| + B))(1 + c2)/(1 - c2) (derived in `__call__`): their
    logits are computed again in float32, and the first maximum among them is the token, as `argmax` over all would
    pick (up to the last bit, in which float32 kernels differ). At base with random weights that is one to a few of
    the 37k rows. c1 is one number for all rows, the largest of the rows' own bounds, except for up to
    `max_outliers` rows whose own bound is over 4x the median (a huge row, or in int8 one outlier weight that
    coarsens its row's scale): they are always candidates instead of widening every row's bound. When more than
    `max_candidates` survive (or the screen meets NaN), the full float32 product runs. Used for output projections
    of 2^22 weights or more, on CPUs where oneDNN has bfloat16 kernels or torch's int8 kernel is AVX-512 code.
    """

    max_candidates = 1024
    max_outliers = 64
    min_weights = 2**22
    int8_rows = 3  # at 4 rows the int8 kernel is no faster than the bfloat16 one, at 5 and more it is 2x slower
    u, fp32 = 2.0**-8, 2.0**-24

    @classmethod
    def for_decoder(cls, decoder):
        """A screen for `decoder`'s greedy search, or None where it would not pay off or cannot run."""
        head, linear = decoder.model.lm_head, decoder.linear
        if decoder.script is None or linear.weights(head) is None or linear.pack is None:
            return None
        if head.weight.numel() < cls.min_weights:
            return None
        screen = cls(decoder)
        return screen if screen.bfloat16 or screen.int8 else None

    @classmethod
    def int8_kernel_fits(cls, head) -> bool:
        """Whether torch's int8 kernel runs as vector code for this projection (measured there only). It reads the
        inner dimension 16 at a time: other widths would read past the rows."""
        return hasattr(torch, "_weight_int8pack_mm") and torch.backends.cpu.get_cpu_capability() == "AVX512" \
            and head.in_features % 16 == 0

    def __init__(self, decoder):
        head, linear = decoder.model.lm_head, decoder.linear
        self.decoder, self.kernel, self.weight, self.bias = decoder, linear.kernel, head.weight, head.bias
        self.bfloat16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        self.int8 = self.int8_kernel_fits(head)
        terms = head.in_features + 2
        self.accumulation = 1.01 * terms * self.fp32 / (1 - terms * self.fp32)  # gamma_n, Higham's bound
        self.c2 = 2 * self.u + 4 * self.fp32
        # The copy's logits are rounded to bfloat16 before the bias is added: c2 bounds that rounding relative to
        # |a_i| + this, as a bias may cancel the product.
        self.largest_bias = 0.0 if head.bias is None else float(head.bias.detach().abs().max())
        self.padding = torch.zeros(PADDED_ROWS, head.in_features, dtype=torch.bfloat16)
        self.copies = {}

    def bounds(self, per_row: torch.Tensor):
        """c1 and the rows that are always candidates, from each row's own c1 (float64)."""
        outliers = per_row > 4 * per_row.median()
        if int(outliers.sum()) > self.max_outliers:
            outliers = torch.zeros_like(outliers)
            outliers[per_row.topk(self.max_outliers).indices] = True
        c1 = 1.001 * float(per_row[~outliers].max()) if not bool(outliers.all()) else 0.0
        return c1, outliers.nonzero().flatten() if bool(outliers.any()) else None

    def bfloat16_copy(self, weight):
        """oneDNN's packed bfloat16 copy and its bounds: with h and W rounded, the product is off by at most
        (2u + u^2) |h| |w_i| before accumulation."""
        norms = torch.cat([rows.double().norm(dim=1) for rows in weight.split(4096)])  # float64 a slice at a time
        per_row = (2 * self.u + self.u**2 + 2 * (1 + self.u) ** 2 * self.accumulation) * norms
        return self.decoder.linear.pack(weight.bfloat16(), 32), *self.bounds(per_row)

    def int8_copy(self, weight):
        """int8 rows q_i with bfloat16 scales s_i (rounded up, so that |q_i| <= 127) and bounds: with the weight error
        e_i = w_i - s_i q_i computed exactly (in float64), the product of the rounded h is off by at most
        u |h| |w_i| + (1 + u) |h| (|e_i| + gamma |s_i q_i|), and the float32 one by gamma |h| |w_i|. The kernel
        multiplies q by s in float32 without rounding (8 and 7 significant bits) and accumulates in float32."""
        quantized, scales, per_row = [], [], []
        for rows in weight.split(4096):  # float64 a slice at a time
            exact = rows.double()
            largest = exact.abs().amax(dim=1)
            scale = (torch.where(largest > 0, largest / 127, 1.0).clamp_min(2.0**-100) * (1 + 2.0**-7)).bfloat16()
            rounded = torch.round(exact / scale.double()[:, None])
            dequantized = scale.double()[:, None] * rounded
            error = (exact - dequantized).norm(dim=1)
            per_row.append((self.u + self.accumulation) * exact.norm(dim=1)
                           + (1 + self.u) * (error + self.accumulation * dequantized.norm(dim=1)))
            quantized.append(rounded.to(torch.int8))
            scales.append(scale)
        return torch.cat(quantized), torch.cat(scales), *self.bounds(torch.cat(per_row))

    def copy(self, kind: str, make):
        """The model's kept `kind` copy of the output projection, looked up (and checked against the weight) once per
        search: the check reads 37k scattered values, ~0.25 ms after a step has streamed the weights."""
        if kind not in self.copies:
            head = self.decoder.model.lm_head
            self.copies[kind] = self.decoder.linear.kept_copy(head, (kind, id(head)), make)
        return self.copies[kind]

    def approximate_logits(self, hidden: torch.Tensor):
        """The screening logits of `hidden`'s rows, c1 and the rows that are always candidates (or None); None where
        neither copy serves."""
        rows = hidden.shape[0]
        if self.int8 and rows <= self.int8_rows:
            quantized, scales, c1, outliers = self.copy("int8", self.int8_copy)
            return torch._weight_int8pack_mm(hidden.bfloat16(), quantized, scales).float(), c1, outliers
        if not self.bfloat16:
            return None
        packed, c1, outliers = self.copy("bfloat16", self.bfloat16_copy)
        if rows < PADDED_ROWS:
            self.padding[:rows].copy_(hidden)
            x = self.padding
        else:
            x = hidden.bfloat16()
        return self.kernel(x, packed, None, "none", [], "")[:rows].float(), c1, outliers

    def screened(self, hidden: torch.Tensor, step: int, settings: dict, keep: int = 1):
        """The tokens that can be among the `keep` largest float32 logits of their row of `hidden`, after
        `suppress_tokens`: (columns, each row's candidates as a (rows, vocab) mask), or None where the full product
        must run (NaN or infinity met, or more than `max_candidates` columns)."""
        # Each operation here costs ~25 us, whatever its size: the step has just streamed the weights through every
        # cache, code included. Hence few of them, and the per-row bounds in Python floats.
        rows = hidden.shape[0]
        screened = self.approximate_logits(hidden)
        if screened is None:
            return None
        approximate, c1, outliers = screened
        if self.bias is not None:
            approximate += self.bias
        approximate = suppress_tokens(approximate, step, settings)
        if outliers is not None:  # candidates unless suppressed (NaN included); the bounds below are for the others
            unsuppressed = approximate[:, outliers] != -math.inf
            approximate[:, outliers] = -math.inf
        norms = torch.linalg.vector_norm(hidden, dim=1, dtype=torch.float64).tolist()  # float32 may underflow
        # With a_1 >= ... the approximations in decreasing order and B the largest |bias|, each of the `keep` best
        # approximations is off from its float32 logit by at most e = c1 |h| + c2 (M + B), M = max(|a_1|, |a_keep|);
        # so the keep-th largest float32 logit is at least a_keep - e. A token t among the `keep` largest then has
        # a_keep - e - e_t <= a_t <= a_1, and e_t <= c1 |h| + c2 (M + e + e_t + B): e_t <= E = e (1 + c2) / (1 - c2),
        # and t is among the tokens within 2E of a_keep (for keep = 1: of the best).
        widen = (1 + self.c2) / (1 - self.c2)
        best = approximate.amax(dim=1).tolist()
        kth = best if keep == 1 else approximate.topk(min(keep, approximate.shape[1]), dim=1).values[:, -1].tolist()
        thresholds = [
            last - 2 * widen * (c1 * norm + self.c2 * (max(abs(first), abs(last)) + self.largest_bias))
            for first, last, norm in zip(best, kth, norms)
        ]
        if not all(map(math.isfinite, thresholds)):
            return None
        candidates = approximate >= (thresholds[0] if rows == 1 else torch.tensor(thresholds)[:, None])
        if outliers is not None:
            candidates[:, outliers] = unsuppressed
        columns = (candidates[0] if rows == 1 else candidates.any(dim=0)).nonzero().flatten()
        if not 0 < columns.numel() <= self.max_candidates:  # no gain
            return None
        return columns, candidates

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.linear(self.decoder.model.lm_head, hidden).float()

    def candidate_logits(self, hidden: torch.Tensor, columns: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The float32 logits of `columns`, -inf where a row's own candidates do not include the column."""
        exact = F.linear(hidden, self.weight[columns], None if self.bias is None else self.bias[columns])
        if hidden.shape[0] > 1:
            exact.masked_fill_(~candidates[:, columns], -math.inf)
        return exact

    def __call__(self, tokens: torch.Tensor, step: int, settings: dict) -> torch.Tensor:
        hidden = self.decoder.step(tokens, project=False)
        found = self.screened(hidden, step, settings)
        if found is None:
            return suppress_tokens(self.full_logits(hidden), step, settings).argmax(dim=-1)
        columns, candidates = found
        return columns[self.candidate_logits(hidden, columns, candidates).argmax(dim=1)]

    def top_k_logits(self, tokens: torch.Tensor, step: int, settings: dict, keep: int) -> torch.Tensor:
        """Next-token logits (after `suppress_tokens`) that keep the float32 values of each row's `keep` largest
        and -inf for tokens that cannot be among them: what top-k sampling keeps, without the full product."""
        hidden = self.decoder.step(tokens, project=False)
        found = self.screened(hidden, step, settings, keep)
        if found is None:
            return suppress_tokens(self.full_logits(hidden), step, settings)
        columns, candidates = found
        scores = hidden.new_full((hidden.shape[0], self.weight.shape[0]), -math.inf)
        scores[:, columns] = self.candidate_logits(hidden, columns, candidates)
        return suppress_tokens(scores, step, settings)


class StaticIncrementalDecoder(IncrementalDecoder):
    """`IncrementalDecoder` with every shape fixed for the whole search, so that on a GPU its step is recorded once as
    a CUDA graph and then replayed: one launch per step instead of ~190. On a GPU a decode step is bound by the CPU
    that launches its small kernels (base, beam 4, 32 sentences: ~1.5 ms of GPU work behind ~4 ms of launches).

    The self-attention cache is allocated for a number of positions and masked beyond the current one; it grows (and
    the step is recorded again) when the search goes past it, so that a generous `max_new_tokens` costs memory
    only as sentences get that long. The batch keeps its first number of rows (a finished sentence's rows stay,
    unused: the search reads the first rows); a beam reorder becomes a gather at the start of the next step. The
    same code runs without a graph where `use_graph` is False (how the CPU tests check it).
    """

    may_script = False  # its step is its own

    def __init__(self, model, input_ids, attention_mask, num_beams: int, max_new_tokens: int, use_graph: bool,
                 initial_capacity: int = 64):
        super().__init__(model, input_ids, attention_mask, num_beams)
        key = self.cross_keys_values[0][0]
        device, self.dtype = key.device, key.dtype  # the activations' dtype (a weight's may be a quantized one)
        self.rows, self.max_new_tokens, self.capacity = input_ids.shape[0] * num_beams, max_new_tokens, 0
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.tokens = torch.zeros(self.rows, dtype=torch.long, device=device)
        self.parents = torch.arange(self.rows, device=device)
        self.use_graph, self.graph, self.graph_logits = use_graph, None, None
        self.grow(initial_capacity)

    def grow(self, capacity: int):
        """Hold `capacity` positions (a multiple of 16, the mask alignment fused kernels want; at most what the
        search can reach), keeping the cached ones. The recorded step read the old tensors: it is recorded again."""
        capacity = -(-min(capacity, self.max_new_tokens) // 16) * 16
        device = self.position.device
        grown = []
        for (attention, _, _), cached in zip(self.layers, self.self_keys_values):
            pair = tuple(torch.zeros(self.rows, attention.num_heads, capacity, attention.head_dim, device=device,
                                     dtype=self.dtype) for _ in range(2))
            if cached is not None:
                for new, old in zip(pair, cached):
                    new[:, :, : self.capacity].copy_(old)
            grown.append(pair)
        self.self_keys_values, self.capacity = grown, capacity
        self.key_positions = torch.arange(capacity, device=device)
        self.position_table = self.decoder.embed_positions(capacity, 0, device)
        self.graph = self.graph_logits = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.length >= self.capacity:
            self.grow(2 * self.capacity)
        rows = tokens.shape[0]
        self.tokens[:rows].copy_(tokens)
        if self.graph is not None:
            self.graph.replay()
            logits = self.graph_logits
        elif self.use_graph:
            logits = self.record()
        else:
            logits = self.static_step()
        self.length += 1
        return logits[:rows]

    def record(self) -> torch.Tensor:
        """Run the first step for real (it is also the warm-up a capture needs, on a side stream), then record it."""
        device = self.tokens.device
        with torch.cuda.device(device):
            caller = torch.cuda.current_stream(device)
            stream = torch.cuda.Stream(device)
            stream.wait_stream(caller)
            with torch.cuda.stream(stream):
                logits = self.static_step()
            caller.wait_stream(stream)
            logits.record_stream(caller)  # made on the side stream, read on the caller's
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=stream):
                    self.graph_logits = self.static_step()
            except RuntimeError as error:  # a kernel that cannot be recorded: the same step, launched op by op
                torch.cuda.set_stream(caller)  # a failed capture can leave its stream current
                warnings.warn(f"Decoding without a CUDA graph: recording the decode step failed ({error}).",
                              RuntimeWarning)
                self.use_graph = False
            else:
                self.graph = graph
        return logits

    def static_step(self) -> torch.Tensor:
        if self.num_beams > 1:
            for key, value in self.self_keys_values:
                key.copy_(key.index_select(0, self.parents))
                value.copy_(value.index_select(0, self.parents))
        self.self_mask = (self.key_positions <= self.position)[None, None, None]
        logits = self.layers_and_output(self.tokens, self.position_table.index_select(0, self.position))
        self.position.add_(1)
        return logits

    def self_attention(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        attention = self.layers[i][0]
        rows, heads = hidden.shape[0], attention.num_heads
        query, key, value = self.linear(attention.qkv_proj, hidden).view(rows, 3, heads, 1, -1).unbind(1)
        cached_key, cached_value = self.self_keys_values[i]
        cached_key.index_copy_(2, self.position, key)
        cached_value.index_copy_(2, self.position, value)
        output, _ = sdpa_attention(attention, query, cached_key, cached_value, self.self_mask, attention.scaling)
        return self.linear(attention.out_proj, output.reshape(hidden.shape))

    def reorder(self, rows: torch.Tensor):
        if self.num_beams > 1:  # gathered inside the next step
            self.parents[: rows.shape[0]].copy_(rows)
            return
        for key, value in self.self_keys_values:
            key[: rows.shape[0]].copy_(key.index_select(0, rows))
            value[: rows.shape[0]].copy_(value.index_select(0, rows))

    def keep_sentences(self, sentences: torch.Tensor):
        rows = self.cross_rows(sentences)
        kept = rows.shape[0]  # in place: the recorded step reads these very tensors
        for key, value in self.cross_keys_values:
            key[:kept].copy_(key.index_select(0, rows))
            value[:kept].copy_(value.index_select(0, rows))
        if self.cross_mask is not None:
            self.cross_mask[:kept].copy_(self.cross_mask.index_select(0, rows))


def graph_safe(model) -> bool:
    """Whether generate may record its decode step as a CUDA graph: on one GPU, not inside another recording."""
    device = model.lm_head.weight.device
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing() and recordable(model, device)


def recordable(model, device: torch.device) -> bool:
    """Whether a recorded decode step computes what running the modules would. A recording runs Python once, so
    nothing may act at each call: no hooks (also accelerate's, which replace `forward`), no autocast (its weight
    cache is not recorded), no torch function or dispatch modes, no compiling. The layers must be plain
    `nn.Linear` with floating-point weights on `device` (quantized, adapter and offloaded layers run step by step)."""
    if torch.is_autocast_enabled(device.type) or torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    decoder = model.get_decoder()
    modules = [model, model.lm_head, model.get_input_embeddings(), *decoder.modules()]
    if any(forward_is_watched(m) for m in modules):
        return False
    linears = [model.lm_head] + [
        linear for layer in decoder.layers
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.out_proj, layer.cross_attn.q_proj,
                       layer.cross_attn.kv_proj, layer.cross_attn.out_proj,
                       layer.feed_forward.fc1, layer.feed_forward.fc2)
    ]
    if not all(is_plain_linear(linear) for linear in linears):
        return False
    tensors = [*model.get_encoder().parameters(), *decoder.parameters(), *model.lm_head.parameters()]
    return all(t.device == device and t.is_floating_point() for t in tensors)


def plain_layer_norm(module):
    """`module` as a function; a plain `nn.LayerNorm` without hooks becomes the functional call (no module dispatch)."""
    if type(module) is not nn.LayerNorm or forward_is_watched(module):
        return module
    shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
    return lambda x: F.layer_norm(x, shape, weight, bias, eps)


def suppress_tokens(scores: torch.Tensor, new_tokens: int, settings: dict) -> torch.Tensor:
    """The logits processors the fast path supports, applied as transformers applies them: banned single tokens,
    no end-of-sentence before `min_new_tokens`, end-of-sentence forced at the last position."""
    if settings["banned"]:
        scores[:, settings["banned"]] = -math.inf
    if new_tokens < settings["min_new_tokens"]:
        scores[:, settings["eos"]] = -math.inf
    if settings["forced_eos"] is not None and new_tokens == settings["max_new_tokens"] - 1:
        scores.fill_(-math.inf)[:, settings["forced_eos"]] = 0
    return scores


class MultinomialDraw:
    """The token choice of transformers' sampling loop: its logits warpers (temperature, top-k, top-p: the same
    classes, in its order), a softmax, and `torch.multinomial` over a (batch, vocab) matrix that holds every sentence
    of the search, the finished ones too. transformers draws for finished sentences as well (and pads their draws
    afterwards); a row's draw depends only on its own probabilities and its place in the matrix, so the same draws
    come out, and the random generator ends where transformers' loop leaves it."""

    def __init__(self, batch: int, warpers: list):
        self.batch, self.warpers, self.everyone = batch, warpers, None

    def __call__(self, scores: torch.Tensor, active: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(sequences, scores)
        probabilities = F.softmax(scores, dim=-1)
        if active.numel() == self.batch:
            return torch.multinomial(probabilities, num_samples=1).squeeze(1)
        if self.everyone is None:  # the finished sentences' rows: any distribution draws the same for the others
            self.everyone = probabilities.new_ones(self.batch, probabilities.shape[1])
        self.everyone[active] = probabilities
        return torch.multinomial(self.everyone, num_samples=1).squeeze(1)[active]


@torch.no_grad()
def greedy_search(decoder: IncrementalDecoder, batch: int, settings: dict) -> torch.Tensor:
    """Pick the most likely token at each step, or with `settings["sample"]` draw it as transformers' multinomial
    sampling does (`MultinomialDraw`); a finished sentence is padded (transformers' semantics)."""
    device = decoder.cross_keys_values[0][0].device
    eos = torch.tensor(settings["eos"], device=device)
    limit = settings["max_new_tokens"] + 1
    # Grown as the sentences go on: a generous limit, far past where they end, costs no memory up front.
    output = torch.full((batch, min(limit, 64)), settings["pad"], dtype=torch.long, device=device)
    output[:, 0] = settings["start"]
    active, tokens, length = torch.arange(batch, device=device), output[:, 0], 1
    draw = MultinomialDraw(batch, settings["warpers"]) if settings["sample"] else None
    # Sampling reads the full distribution unless top-k keeps few tokens: then the screen finds them.
    top_k = settings["top_k"]
    screened_top_k = top_k is not None and top_k <= GreedyScreen.max_candidates // 4
    screen = GreedyScreen.for_decoder(decoder) if draw is None or screened_top_k else None
    for step in range(settings["max_new_tokens"]):
        if draw is not None:
            scores = (suppress_tokens(decoder.step(tokens), step, settings) if screen is None
                      else screen.top_k_logits(tokens, step, settings, top_k))
            tokens = draw(scores, active, output[active, : step + 1])
        elif screen is not None:
            tokens = screen(tokens, step, settings)
        else:
            tokens = suppress_tokens(decoder.step(tokens), step, settings).argmax(dim=-1)
        if step + 1 == output.shape[1]:
            more = min(output.shape[1], limit - output.shape[1])
            output = torch.cat([output, output.new_full((batch, more), settings["pad"])], dim=1)
        output[active, step + 1] = tokens
        length = step + 2
        ended = torch.isin(tokens, eos)
        if bool(ended.any()):
            keep = (~ended).nonzero().flatten()
            if keep.numel() == 0:
                break
            active, tokens = active[keep], tokens[keep]
            decoder.keep_sentences(keep)
            decoder.reorder(keep)
    return output[:, :length]


@torch.no_grad()
def beam_search(decoder: IncrementalDecoder, batch: int, settings: dict) -> torch.Tensor:
    """Section 6.1's beam search with transformers' exact rules, so that outputs equal `GenerationMixin.generate`:
    keep the best max(2, 1 + number of end-of-sentence ids) x beams continuations; those among the top `beams`
    that end (end-of-sentence or length limit) become finished hypotheses scored log-probability sum /
    length^length_penalty; a sentence is done when its best running beam cannot beat its worst finished hypothesis
    (transformers' `early_stopping=False` rule)."""
    beams, penalty, max_new = settings["num_beams"], settings["length_penalty"], settings["max_new_tokens"]
    device = decoder.cross_keys_values[0][0].device
    eos = torch.tensor(settings["eos"], device=device)
    candidates_kept = max(2, 1 + len(settings["eos"])) * beams
    among_top_beams = torch.arange(candidates_kept, device=device) < beams
    fill = settings["pad"] or settings["eos"][0]  # transformers pads beam outputs with eos when the pad id is 0

    def gather(tensor, index):  # pick beams (dim 1) of per-sentence tensors
        return tensor.gather(1, index.view(*index.shape, *[1] * (tensor.dim() - 2)).expand(-1, -1, *tensor.shape[2:]))

    running = torch.full((batch, beams, max_new + 1), fill, dtype=torch.long, device=device)
    running[:, :, 0] = settings["start"]
    running_scores = torch.zeros(batch, beams, dtype=torch.float32, device=device)  # not the default dtype
    running_scores[:, 1:] = -1e9  # all beams start identical: expand only the first
    finished, finished_scores = running.clone(), torch.full((batch, beams), -1e9, dtype=torch.float32, device=device)
    finished_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    results, results_lengths = finished.clone(), finished_lengths.clone()
    active, any_dropped = torch.arange(batch, device=device), False
    for step in range(max_new):
        logits = decoder.step(running[:, :, step].flatten())
        # In place where the scripted step made the logits (a hook on the output projection could hold them otherwise):
        # at many rows they fill much of the last-level cache, and a new buffer would evict them. Same values.
        log_probs = torch.log_softmax(logits, dim=-1, out=logits) if decoder.script is not None else logits.log_softmax(-1)
        log_probs = suppress_tokens(log_probs, step, settings)
        vocab = log_probs.shape[-1]
        scores = log_probs.view(-1, beams, vocab).add_(running_scores[:, :, None]).flatten(1)
        top_scores, top_indices = torch.topk(scores, candidates_kept)
        parents, tokens = top_indices // vocab, top_indices % vocab
        top_sequences = gather(running, parents)
        top_sequences[:, :, step + 1] = tokens
        ends = torch.isin(tokens, eos) | (step + 1 >= max_new)

        alive_scores = top_scores + ends.float() * -1e9
        choice = torch.topk(alive_scores, beams).indices
        running, running_scores, parent_beams = gather(top_sequences, choice), alive_scores.gather(1, choice), parents.gather(1, choice)

        just_finished = ends & among_top_beams
        merged_scores = torch.cat([finished_scores, top_scores / (step + 1) ** penalty + (~just_finished).float() * -1e9], 1)
        best = torch.topk(merged_scores, beams).indices
        finished_scores = merged_scores.gather(1, best)
        finished = gather(torch.cat([finished, top_sequences], 1), best)
        finished_lengths = torch.cat([finished_lengths, torch.full_like(tokens, step + 1)], 1).gather(1, best)
        is_finished = torch.cat([is_finished, just_finished], 1).gather(1, best)

        best_possible = running_scores[:, :1] / (step + 1) ** penalty
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, -1e9)
        done = ~(best_possible > worst_finished).any(dim=1)
        if step + 1 >= max_new or (not any_dropped and bool(ends.all())):
            done[:] = True
        sentence_rows = torch.arange(active.numel(), device=device)[:, None] * beams
        if bool(done.any()):
            results[active[done]], results_lengths[active[done]] = finished[done], finished_lengths[done]
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                break
            any_dropped = True
            active, running, running_scores, parent_beams = active[keep], running[keep], running_scores[keep], parent_beams[keep]
            finished, finished_scores = finished[keep], finished_scores[keep]
            finished_lengths, is_finished = finished_lengths[keep], is_finished[keep]
            sentence_rows = sentence_rows[keep]
            decoder.keep_sentences(keep)
        decoder.reorder((sentence_rows + parent_beams).flatten())
    returned = settings["num_return_sequences"]
    length = int(results_lengths[:, :returned].max()) + 1
    return results[:, :returned, :length].reshape(batch * returned, length)


__all__ = [
    "IncrementalDecoder", "StaticIncrementalDecoder", "greedy_search", "beam_search", "graph_safe", "DecodeStepLinear"
]
