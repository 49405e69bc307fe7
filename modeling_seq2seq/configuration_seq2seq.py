"""Configuration of the Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

This file ships to the Hub with the weights: it imports torch/transformers and the standard library only.
"""

import transformers
from transformers import PretrainedConfig


def refuse_broken_transformers(version: str) -> None:
    """Refuse the transformers releases that cannot run this model, or run it wrongly without an error. The Hub loads
    this file into whatever transformers a user has, so the package's own version floor (5.15) does not guard that
    path: before 4.57 the shipped decoding file does not import (`SiLUActivation`); 5.0 to 5.3 give other tokens
    with a static cache, and 5.3 leaves a loaded model's output projection untied on the meta device. 4.57 and 5.4
    onwards run it (5.10 to 5.14's Trainer miscounts its label tokens; docs/compatibility.md). Checked when a config
    is made (every load makes one), since shipped code runs nothing at import."""
    major, minor = (int(part) for part in version.split(".")[:2])
    if (major, minor) < (4, 57) or (major == 5 and minor < 4):
        raise ImportError(f"Seq2SeqTransformer models need transformers 4.57 or 5.4 and later (5.15 and later to train "
                          f"with its Trainer); transformers {version} is installed: pip install -U transformers")


ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "swish")
LAYER_NORM_POSITIONS = ("post", "pre")
POSITIONAL_ENCODING_LAYOUTS = ("split", "interleaved")


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_switch(value):
    return isinstance(value, bool)


def is_token_id(value):
    return value is None or is_int(value)


def is_token_ids(value):
    return is_token_id(value) or isinstance(value, (list, tuple)) and all(map(is_token_id, value))


def is_optional_number(value):
    return value is None or is_number(value)


INTEGERS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
            "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings")
PROBABILITIES = ("dropout", "attention_dropout", "activation_dropout", "label_smoothing")
SWITCHES = ("scale_embedding", "tie_word_embeddings", "output_bias", "use_cache")
TOKEN_IDS = ("pad_token_id", "bos_token_id", "decoder_start_token_id")
# The type each field must have whenever it is set (a check, or the tuple of allowed values), as transformers' typed
# configs (MarianConfig) check on assignment; ranges, and what one field requires of another, are checked when a model
# is built or saved, since a user may change d_model and the head count one after the other.
FIELD_TYPES = {
    **{field: (is_int, "a positive integer") for field in INTEGERS},
    **{field: (is_number, "a number in [0, 1)") for field in PROBABILITIES},
    "layer_norm_eps": (is_number, "a positive finite number"),
    **{field: (is_switch, "True or False") for field in SWITCHES},
    **{field: (is_token_id, "None or an integer in [0, vocab_size={vocab_size})") for field in TOKEN_IDS},
    "eos_token_id": (is_token_ids, "None or integers in [0, vocab_size={vocab_size})"),
    "init_std": (is_optional_number, "a positive finite number or None"),
    "activation_function": (ACTIVATIONS, f"one of {ACTIVATIONS}"),
    "layer_norm_position": (LAYER_NORM_POSITIONS, f"one of {LAYER_NORM_POSITIONS}"),
    "positional_encoding_layout": (POSITIONAL_ENCODING_LAYOUTS, f"one of {POSITIONAL_ENCODING_LAYOUTS}"),
}


def has_field_type(field: str, value) -> bool:
    check = FIELD_TYPES[field][0]
    return value in check if isinstance(check, tuple) else check(value)


class Seq2SeqTransformerConfig(PretrainedConfig):
    r"""Hyper-parameters of the encoder-decoder Transformer; the defaults are the paper's base model (Table 3), except
    `label_smoothing` (0 here, so that `labels` give the plain cross-entropy that transformers' models return; 0.1
    in Section 5.4, the presets' value) and `positional_encoding_layout` ("split", Marian/OPUS-MT's layout).

    Names follow `transformers`' encoder-decoder models (`MarianConfig`, `BartConfig`) so that generic code
    (caches, `hidden_size`, `num_attention_heads`, `num_hidden_layers`) finds what it looks for.

    Args:
        vocab_size: size of the shared source/target vocabulary (the paper's en-de BPE had about 37,000).
        d_model: width of the residual stream, d_model in the paper.
        encoder_layers / decoder_layers: N, the number of identical layers in each stack.
        encoder_attention_heads / decoder_attention_heads: h, the number of attention heads.
        encoder_ffn_dim / decoder_ffn_dim: d_ff, the inner width of the position-wise feed-forward network.
        dropout: P_drop, applied to each sub-layer's output and to the embedding sums (Section 5.4).
        attention_dropout: dropout on the attention weights (not in the paper; 0 by default).
        activation_dropout: dropout after the feed-forward activation (not in the paper; 0 by default).
        activation_function: the feed-forward non-linearity; the paper uses "relu".
        max_position_embeddings: length for which positional encodings are precomputed. Longer inputs still
            work: the sinusoids are a formula and the table grows on demand.
        positional_encoding_layout: "split" puts sines in the first half of the vector and cosines in the
            second (tensor2tensor, Marian, OPUS-MT); "interleaved" alternates them as the paper's formula is
            written. Both carry the same frequencies; they differ by a fixed permutation of dimensions.
        layer_norm_position: "post" (the paper: LayerNorm(x + Sublayer(x))) or "pre"
            (x + Sublayer(LayerNorm(x)), with a final LayerNorm on each stack; easier to train deep).
        scale_embedding: multiply embeddings by sqrt(d_model) (Section 3.4).
        tie_word_embeddings: use the shared embedding matrix as the output projection too (Section 3.4).
            Source and target embeddings are always shared.
        output_bias: give the output projection a bias (the paper has none; OPUS-MT checkpoints do).
        label_smoothing: epsilon_ls of the loss computed when `labels` are passed (Section 5.4 uses 0.1).
        layer_norm_eps: epsilon of every LayerNorm.
        init_std: standard deviation of the embedding initialisation; `None` means d_model ** -0.5, so that
            embeddings scaled by sqrt(d_model) have unit variance.
    """

    model_type = "seq2seq_transformer"
    before_saving_code = None  # set by the installed package: refuses to write the code over a user's files
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the cache's output field in 5.x, and in 4.57
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "encoder_attention_heads",
        "num_hidden_layers": "encoder_layers",
    }

    def __init__(
        self,
        vocab_size=37000,
        d_model=512,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
        dropout=0.1,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="relu",
        max_position_embeddings=1024,
        positional_encoding_layout="split",
        layer_norm_position="post",
        scale_embedding=True,
        tie_word_embeddings=True,
        output_bias=False,
        label_smoothing=0.0,
        layer_norm_eps=1e-5,
        init_std=None,
        use_cache=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        is_encoder_decoder=True,
        **kwargs,
    ):
        refuse_broken_transformers(transformers.__version__)
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.encoder_attention_heads = encoder_attention_heads
        self.decoder_attention_heads = decoder_attention_heads
        self.encoder_ffn_dim = encoder_ffn_dim
        self.decoder_ffn_dim = decoder_ffn_dim
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.activation_dropout = activation_dropout
        self.activation_function = activation_function
        self.max_position_embeddings = max_position_embeddings
        self.positional_encoding_layout = positional_encoding_layout
        self.layer_norm_position = layer_norm_position
        self.scale_embedding = scale_embedding
        self.tie_word_embeddings = tie_word_embeddings
        self.output_bias = output_bias
        self.label_smoothing = label_smoothing
        self.layer_norm_eps = layer_norm_eps
        self.init_std = init_std
        self.use_cache = use_cache
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        self.decoder_start_token_id = decoder_start_token_id
        for alias, name in self.attribute_map.items():  # `hidden_size=...`: the base class would set it after the check
            if alias in kwargs:
                setattr(self, name, kwargs.pop(alias))
        # Ours first: the base class validates token ids against vocab_size and would fail on a bad one cryptically.
        self.validate_hyperparameters()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id,
            is_encoder_decoder=is_encoder_decoder,
            **kwargs,
        )

    def __setattr__(self, key, value):
        field = self.attribute_map.get(key, key)
        if field in FIELD_TYPES and not has_field_type(field, value):
            name = field if key == field else f"{key} ({field})"
            expected = FIELD_TYPES[field][1].format(vocab_size=getattr(self, "vocab_size", None))
            raise ValueError(f"Seq2SeqTransformerConfig.{name}={value!r} is invalid: expected {expected}.")
        super().__setattr__(key, value)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # A value set after construction (`config.update`) must not make a folder that no longer loads.
        self.validate_hyperparameters()
        if self._auto_class is not None and self.before_saving_code is not None:  # this file is copied there
            self.before_saving_code(save_directory, ("configuration_seq2seq.py",))
        return super().save_pretrained(save_directory, *args, **kwargs)

    def validate_hyperparameters(self):
        """Raise `ValueError` naming the field and its value when the model could not be built from it."""

        def fail(field, value, expected):
            expected = expected.format(vocab_size=self.vocab_size)
            raise ValueError(f"Seq2SeqTransformerConfig.{field}={value!r} is invalid: expected {expected}.")

        for field, (_, expected) in FIELD_TYPES.items():  # a value written into `__dict__` skips __setattr__
            if not has_field_type(field, getattr(self, field)):
                fail(field, getattr(self, field), expected)
        for field in INTEGERS:
            if getattr(self, field) <= 0:
                fail(field, getattr(self, field), FIELD_TYPES[field][1])
        for field in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, field):
                fail(field, getattr(self, field), f"a divisor of d_model={self.d_model}")
        if self.d_model % 2:
            fail("d_model", self.d_model, "an even number (sinusoids come in sine/cosine pairs)")
        for field in PROBABILITIES:
            if not 0.0 <= getattr(self, field) < 1.0:
                fail(field, getattr(self, field), FIELD_TYPES[field][1])
        for field in ("layer_norm_eps", "init_std"):
            value = getattr(self, field)
            if value is not None and not 0 < value < float("inf"):
                fail(field, value, FIELD_TYPES[field][1])
        for field in TOKEN_IDS:
            value = getattr(self, field)
            if value is not None and not 0 <= value < self.vocab_size:
                fail(field, value, FIELD_TYPES[field][1])
        eos = self.eos_token_id
        if any(value is not None and not 0 <= value < self.vocab_size
               for value in (eos if isinstance(eos, (list, tuple)) else [eos])):
            fail("eos_token_id", eos, FIELD_TYPES["eos_token_id"][1])


__all__ = ["Seq2SeqTransformerConfig"]
