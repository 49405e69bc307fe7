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

    def save_pretrained(self, save_directory, *args, **kwargs):
        # A value set after construction (`config.update`) must not make a folder that no longer loads.
        self.validate_hyperparameters()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def validate_hyperparameters(self):
        """Raise `ValueError` naming the field and its value when the model could not be built from it."""

        def fail(field, value, expected):
            raise ValueError(f"Seq2SeqTransformerConfig.{field}={value!r} is invalid: expected {expected}.")

        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        for field in (
            "vocab_size",
            "d_model",
            "encoder_layers",
            "decoder_layers",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, field)
            if not is_int(value) or value <= 0:
                fail(field, value, "a positive integer")
        for field in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, field):
                fail(field, getattr(self, field), f"a divisor of d_model={self.d_model}")
        if self.d_model % 2:
            fail("d_model", self.d_model, "an even number (sinusoids come in sine/cosine pairs)")
        for field in ("dropout", "attention_dropout", "activation_dropout", "label_smoothing"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                fail(field, value, "a number in [0, 1)")
        if self.activation_function not in ACTIVATIONS:
            fail("activation_function", self.activation_function, f"one of {ACTIVATIONS}")
        if self.layer_norm_position not in LAYER_NORM_POSITIONS:
            fail("layer_norm_position", self.layer_norm_position, f"one of {LAYER_NORM_POSITIONS}")
        if self.positional_encoding_layout not in POSITIONAL_ENCODING_LAYOUTS:
            fail("positional_encoding_layout", self.positional_encoding_layout, f"one of {POSITIONAL_ENCODING_LAYOUTS}")
        for field in ("scale_embedding", "tie_word_embeddings", "output_bias", "use_cache"):
            if not isinstance(getattr(self, field), bool):
                fail(field, getattr(self, field), "True or False")
        def is_positive_number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")

        if not is_positive_number(self.layer_norm_eps):
            fail("layer_norm_eps", self.layer_norm_eps, "a positive finite number")
        if self.init_std is not None and not is_positive_number(self.init_std):
            fail("init_std", self.init_std, "a positive finite number or None")
        for field in ("pad_token_id", "bos_token_id", "decoder_start_token_id"):
            value = getattr(self, field)
            if value is not None and (not is_int(value) or not 0 <= value < self.vocab_size):
                fail(field, value, f"None or an integer in [0, vocab_size={self.vocab_size})")
        eos = self.eos_token_id
        for value in eos if isinstance(eos, (list, tuple)) else [eos]:
            if value is not None and (not is_int(value) or not 0 <= value < self.vocab_size):
                fail("eos_token_id", eos, f"None or integers in [0, vocab_size={self.vocab_size})")


__all__ = ["Seq2SeqTransformerConfig"]
