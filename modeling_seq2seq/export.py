"""Export our model to CTranslate2 (a C++ inference engine) through its `MarianMTModel` twin.

    >>> from modeling_seq2seq.export import export_saved_model
    >>> export_saved_model("outputs/transformer-base", "outputs/transformer-base-ct2", quantization="int8")

The path: our model -> `convert.to_marian` (same weights, same numbers) -> a CTranslate2 model spec -> files.
CTranslate2's own `TransformersConverter` reads a Marian folder (weights and tokenizer) from disk and assumes an
OPUS-MT layout that ours does not have:

- OPUS-MT decoders start from the `<pad>` token with a zero embedding, the last vocabulary entry; CTranslate2's
  Marian loader therefore sets `start_from_zero_embedding` and drops the last embedding row (and a trailing `<pad>`
  from the vocabulary). Our `<pad>` is id 0 and our decoder starts from `<s>` (`decoder_start_token_id`), a real
  embedding: the stock loader fails on our model (one vocabulary entry more than embedding rows), and would decode
  differently if it did not.

So this module converts the in-memory Marian twin with `Seq2SeqMarianLoader`, the stock loader minus those two
OPUS-MT assumptions: the decoder starts from the embedding of `decoder_start_token_id`, and the vocabulary is the
tokenizer's, unchanged (padded with `<extra_N>` entries when the model's embedding is larger). The converted model
takes and returns token *strings* (CTranslate2's interface): encode with the same tokenizer, pass
`tokenizer.convert_ids_to_tokens(ids)` (the ids end with `</s>`, as our tokenizer makes them), and map the returned
tokens back with `tokenizer.convert_tokens_to_ids`. CTranslate2 adds no `</s>` to the source by itself.

`synthetic_tokenizer(vocab_size)` builds a word-level tokenizer over made-up tokens (`t4`, `t5`, ...) for models
without a trained tokenizer (benchmarks, tests): the conversion only needs one token string per id.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")


def synthetic_token(index: int) -> str:
    return f"t{index}"


def synthetic_tokenizer(vocab_size: int, pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2,
                        unk_token_id: int | None = 3, register_bos: bool = True):
    """A `PreTrainedTokenizerFast` over `vocab_size` made-up whitespace-separated words.

    Id i is the token `t{i}`, except the special tokens `<pad>`, `<s>`, `</s>`, `<unk>` at the given ids. Encoding
    appends `</s>` (as our BPE tokenizer does), so `tokenizer("t5 t9")["input_ids"] == [5, 9, eos]`. With
    `register_bos=False`, `<s>` is an ordinary word: `decode(..., skip_special_tokens=True)` keeps it (an untrained
    model generates it often, and a comparison of decoded texts should see it).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = {PAD_TOKEN: pad_token_id, BOS_TOKEN: bos_token_id, EOS_TOKEN: eos_token_id}
    if unk_token_id is not None:
        special[UNK_TOKEN] = unk_token_id
    if len(set(special.values())) != len(special) or not all(0 <= i < vocab_size for i in special.values()):
        raise ValueError(f"special token ids {special} must be distinct and in [0, {vocab_size})")
    by_id = {i: name for name, i in special.items()}
    vocab = {by_id.get(i, synthetic_token(i)): i for i in range(vocab_size)}
    unk = UNK_TOKEN if unk_token_id is not None else None
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk or PAD_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, eos_token_id)]
    )
    kwargs = dict(pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=unk)
    if register_bos:
        kwargs["bos_token"] = BOS_TOKEN
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **kwargs)


# Positions the exported model has encodings for (at least; max_position_embeddings if more). CTranslate2 cuts a
# source at `max_input_length` (1024 by default; 0 takes it whole) and stops at `max_decoding_length` (256).
EXPORTED_POSITIONS = 4096


def _loader_class():
    """`Seq2SeqMarianLoader`, defined lazily so that importing this module does not need ctranslate2."""
    from ctranslate2.converters.transformers import BartLoader, MarianMTLoader

    class Seq2SeqMarianLoader(MarianMTLoader):
        """CTranslate2's Marian loader without the OPUS-MT assumptions (zero-embedding start, trailing `<pad>`)."""

        def get_model_spec(self, model):
            import numpy as np

            model.config.normalize_before = False  # post-LN
            model.config.normalize_embedding = False  # no LayerNorm on the embeddings
            spec = BartLoader.get_model_spec(self, model)  # keeps every vocabulary row (no _remove_pad_weights)
            # The stock loader gives both stacks the encoder's head count.
            spec.decoder.num_heads = np.dtype("int16").type(model.config.decoder_attention_heads)
            return spec

        def set_position_encodings(self, spec, module):
            # Marian's table stops at max_position_embeddings, where our encoding (a formula) goes on; CTranslate2
            # needs one row per position, and its own sinusoid is laid out otherwise.
            from .modeling_seq2seq import SinusoidalPositionalEncoding

            rows, d_model = max(module.weight.shape[0], EXPORTED_POSITIONS), module.weight.shape[1]
            spec.encodings = SinusoidalPositionalEncoding(d_model, rows).compute(torch.arange(rows, dtype=torch.float64))

        def set_config(self, config, model, tokenizer):
            config.bos_token = tokenizer.bos_token or tokenizer.convert_ids_to_tokens(model.config.decoder_start_token_id)
            config.eos_token = tokenizer.eos_token
            config.unk_token = tokenizer.unk_token or tokenizer.pad_token
            config.decoder_start_token = tokenizer.convert_ids_to_tokens(model.config.decoder_start_token_id)
            config.layer_norm_epsilon = 1e-5  # Marian's (to_marian requires our layer_norm_eps to be 1e-5)

        def set_decoder(self, spec, decoder):
            BartLoader.set_decoder(self, spec, decoder)  # start from the start token's embedding, as ours does

        def get_vocabulary(self, model, tokenizer):
            """Each token at its id (CTranslate2 numbers them by position); rows no token uses (a tokenizer smaller
            than the embedding, or one whose ids skip a number) get names of their own."""
            vocab, size = tokenizer.get_vocab(), model.config.vocab_size
            if len(vocab) > size or not all(0 <= index < size for index in vocab.values()):
                raise ValueError(f"the tokenizer has {len(vocab)} tokens (ids up to {max(vocab.values())}) but the "
                                 f"model's vocabulary only {size} rows")
            by_id = {index: token for token, index in vocab.items()}
            unused = [f"<extra_{index}>" if f"<extra_{index}>" not in vocab else f"<extra_{index}_unused>"
                      for index in range(size)]
            return [by_id.get(index, unused[index]) for index in range(size)]

    return Seq2SeqMarianLoader


def ctranslate2_spec(marian, tokenizer):
    """The CTranslate2 model spec of a `MarianMTModel` (e.g. `to_marian(ours)`) and its tokenizer."""
    if marian.config.decoder_start_token_id is None:
        raise ValueError("the Marian model has no decoder_start_token_id")
    return _loader_class()()(marian, tokenizer)


def convert_marian_to_ctranslate2(marian, tokenizer, output_dir: str | os.PathLike, quantization: str | None = None,
                                  force: bool = False) -> str:
    """Write the CTranslate2 model of an in-memory `MarianMTModel` into `output_dir`; returns the folder."""
    from ctranslate2.converters.converter import Converter

    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")

    class InMemoryConverter(Converter):
        def _load(self):
            return ctranslate2_spec(marian, tokenizer)

    return InMemoryConverter().convert(str(output_dir), quantization=quantization, force=force)


def export_to_ctranslate2(model, tokenizer, output_dir: str | os.PathLike, quantization: str | None = None,
                          force: bool = False) -> str:
    """Our model (in memory) -> its Marian twin -> a CTranslate2 model in `output_dir`; returns the folder."""
    import copy

    from .convert import to_marian

    check_end_tokens(model, tokenizer)

    source = model if model.dtype == torch.float32 else copy.deepcopy(model).float()  # leave the caller's model as is
    with torch.no_grad():
        marian = to_marian(source).eval()
    return convert_marian_to_ctranslate2(marian, tokenizer, output_dir, quantization=quantization, force=force)


def check_end_tokens(model, tokenizer) -> None:
    """CTranslate2's config holds one end-of-sentence token, the tokenizer's: refuse a model that does not end with
    it, and warn where the model also ends with others (a search stopping at those needs `end_token=[...]`)."""
    ends = set()
    for setting in (model.config.eos_token_id, model.generation_config.eos_token_id):
        ends.update(setting if isinstance(setting, list) else [] if setting is None else [setting])
    if ends and tokenizer.eos_token_id not in ends:
        raise ValueError(f"the model ends sentences with token ids {sorted(ends)}, its tokenizer with "
                         f"{tokenizer.eos_token_id} ({tokenizer.eos_token!r}): the two do not belong together.")
    if len(ends) > 1:
        tokens = tokenizer.convert_ids_to_tokens(sorted(ends))
        logger.warning("The model ends sentences with any of %s; the CTranslate2 model stops at %r only, unless "
                       "translate_batch(..., end_token=%r) is passed.", tokens, tokenizer.eos_token, tokens)


def export_saved_model(model_dir: str | os.PathLike, output_dir: str | os.PathLike, quantization: str | None = None,
                       tokenizer_path: str | os.PathLike | None = None, force: bool = False) -> str:
    """A folder saved by `save_pretrained` (plus its tokenizer) -> a CTranslate2 model in `output_dir`.

    The tokenizer is read from `tokenizer_path`, else from the model folder (or its `tokenizer/` sub-folder). The
    tokenizer files are copied next to the CTranslate2 model so that the folder is self-contained.
    """
    from .checkpointing import refuse_to_replace_inputs, replace_dir, staging_beside
    from .tokenization import load_tokenizer
    from .training import check_tokenizer_matches, load_saved_model

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"No saved model in {str(model_dir)!r} (config.json is missing).")
    candidates = [Path(tokenizer_path)] if tokenizer_path is not None else [model_dir, model_dir / "tokenizer"]
    tokenizer_dir = next((c for name in ("tokenizer.json", "tokenizer_config.json") for c in candidates
                          if c.is_file() or (c / name).is_file()), None)
    if tokenizer_dir is None:
        raise FileNotFoundError(
            f"No tokenizer found in {', '.join(map(str, candidates))}: CTranslate2 needs the vocabulary; pass "
            "--tokenizer PATH (a folder with tokenizer.json)."
        )
    output_dir = Path(output_dir)
    refuse_to_replace_inputs(output_dir, [model_dir, tokenizer_dir], "--output_dir", ("model.bin",))
    if output_dir.exists() and (output_dir.is_symlink() or not output_dir.is_dir()):
        raise FileExistsError(f"{output_dir} is a file or a link, not a folder: choose another output folder")
    if output_dir.exists() and not force:
        raise FileExistsError(f"{output_dir} already exists (pass force=True / --force to replace it)")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = load_saved_model(model_dir).eval()
    check_tokenizer_matches(tokenizer, model.config, tokenizer_dir)
    # Convert into a temporary sibling and move it in, so a failed conversion leaves no half-written folder.
    staging = staging_beside(output_dir)
    try:
        export_to_ctranslate2(model, tokenizer, staging / "model", quantization=quantization, force=True)
        tokenizer.save_pretrained(staging / "model")
        replace_dir(staging / "model", output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(output_dir)


__all__ = [
    "synthetic_tokenizer",
    "ctranslate2_spec",
    "convert_marian_to_ctranslate2",
    "export_to_ctranslate2",
    "export_saved_model",
]
