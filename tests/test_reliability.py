"""Bad input and half precision (issue 7): every mistake a user can make gets an error that says what is wrong.

What `test_model.py`, `test_tokenizer.py` and `test_data.py` already check is not repeated here: the basic config
field validation, a preset with an unknown field, the bf16 CPU forward with a fully padded row, the Unicode round
trip of the tokenizer, and the bad data files. This file adds the rest: more config types and sizes, preset files
that are not what they claim, every misuse of the model's forward and `generate` (through our fast search path and
transformers' own), the long-input decision (sinusoids extend), fp16 on CPU, autocast, a GPU check, and tokenizer
inputs beyond those.
"""

import json
import math
import re
import warnings

import pytest
import torch
import transformers
from transformers import AutoConfig, GenerationConfig

from modeling_seq2seq import Seq2SeqTransformerConfig, Seq2SeqTransformerForConditionalGeneration
from modeling_seq2seq.modeling_seq2seq import (
    SinusoidalPositionalEncoding,
    attention_dtype,
    causal_mask,
    eager_attention_forward,
    padding_mask,
)
from modeling_seq2seq.presets import PRESET_DIR, load_preset

VOCAB = 64


def tiny_config(**overrides):
    fields = dict(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=16, dropout=0.0,
    )
    return Seq2SeqTransformerConfig(**{**fields, **overrides})


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Seq2SeqTransformerForConditionalGeneration(tiny_config(**overrides)).eval()


def padded_batch(seed=0, batch=3, length=7):
    """Right-padded source ids ending in eos; row 1 is shorter than row 0."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        n = length - 3 * (row % 2)
        ids[row, n - 1], ids[row, n:], mask[row, n:] = 2, 0, 0
    return ids, mask


def exactly(message: str) -> str:
    """A `pytest.raises(match=...)` pattern for exactly this message."""
    return "^" + re.escape(message) + "$"


@pytest.fixture(autouse=True, scope="module")
def quiet_single_thread():
    """One intra-op thread (tiny models on a shared CPU) and no "both max_new_tokens and max_length" log lines."""
    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    yield
    transformers.logging.set_verbosity(verbosity)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return make_model()


# --- Config: types and sizes not covered by test_model.py ---------------------------------------------------------

POSITIVE_INT = "a positive integer"


@pytest.mark.parametrize(
    "overrides, field, value, expected",
    [
        (dict(encoder_layers=True), "encoder_layers", True, POSITIVE_INT),  # bool is not an int here
        (dict(decoder_layers=-1), "decoder_layers", -1, POSITIVE_INT),
        (dict(d_model=None), "d_model", None, POSITIVE_INT),
        (dict(d_model=32.0), "d_model", 32.0, POSITIVE_INT),
        (dict(vocab_size=0), "vocab_size", 0, POSITIVE_INT),
        (dict(encoder_ffn_dim=0), "encoder_ffn_dim", 0, POSITIVE_INT),
        (dict(decoder_attention_heads=0), "decoder_attention_heads", 0, POSITIVE_INT),
        (dict(max_position_embeddings=0), "max_position_embeddings", 0, POSITIVE_INT),
        (dict(decoder_attention_heads=3), "decoder_attention_heads", 3, "a divisor of d_model=32"),
        (dict(d_model=9, encoder_attention_heads=3, decoder_attention_heads=3), "d_model", 9,
         "an even number (sinusoids come in sine/cosine pairs)"),
        (dict(dropout=math.nan), "dropout", math.nan, "a number in [0, 1)"),
        (dict(attention_dropout="0.1"), "attention_dropout", "0.1", "a number in [0, 1)"),
        (dict(label_smoothing=1.0), "label_smoothing", 1.0, "a number in [0, 1)"),
        (dict(activation_dropout=True), "activation_dropout", True, "a number in [0, 1)"),
        (dict(scale_embedding="yes"), "scale_embedding", "yes", "True or False"),
        (dict(use_cache=1), "use_cache", 1, "True or False"),
        (dict(layer_norm_eps=0), "layer_norm_eps", 0, "a positive finite number"),
        (dict(layer_norm_eps=math.nan), "layer_norm_eps", math.nan, "a positive finite number"),
        (dict(init_std=-1.0), "init_std", -1.0, "a positive finite number or None"),
        (dict(init_std=True), "init_std", True, "a positive finite number or None"),
        (dict(init_std=math.inf), "init_std", math.inf, "a positive finite number or None"),
        (dict(bos_token_id=2.0), "bos_token_id", 2.0, f"None or an integer in [0, vocab_size={VOCAB})"),
        (dict(decoder_start_token_id=-1), "decoder_start_token_id", -1, f"None or an integer in [0, vocab_size={VOCAB})"),
        (dict(eos_token_id=[2, 500]), "eos_token_id", [2, 500], f"None or integers in [0, vocab_size={VOCAB})"),
        (dict(eos_token_id=-1), "eos_token_id", -1, f"None or integers in [0, vocab_size={VOCAB})"),
    ],
)
def test_config_rejects_wrong_types_and_impossible_sizes(overrides, field, value, expected):
    message = f"Seq2SeqTransformerConfig.{field}={value!r} is invalid: expected {expected}."
    with pytest.raises(ValueError, match=exactly(message)):
        tiny_config(**overrides)


def test_config_json_from_a_stranger_is_validated_on_load(tmp_path):
    """`AutoConfig.from_pretrained` runs the same validation: a bad config.json fails at load, not deep in a layer."""
    tiny_config().save_pretrained(tmp_path)
    fields = json.loads((tmp_path / "config.json").read_text())
    for key, value, message in [
        ("d_model", "abc", "Seq2SeqTransformerConfig.d_model='abc' is invalid: expected a positive integer."),
        ("d_model", 30, "Seq2SeqTransformerConfig.encoder_attention_heads=4 is invalid: expected a divisor of d_model=30."),
        ("vocab_size", 2, "Seq2SeqTransformerConfig.eos_token_id=2 is invalid: expected None or integers in [0, vocab_size=2)."),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**fields, key: value}))
        with pytest.raises(ValueError, match=exactly(message)):
            AutoConfig.from_pretrained(tmp_path)


def test_values_set_after_the_config_was_made_are_checked_before_a_model_or_a_folder(tmp_path):
    """`from_pretrained(path, field=value)` sets the value after the config's own check (transformers' `from_dict`),
    and so does `config.update`: the model then loaded and failed at its first forward in a reshape (heads), or
    ignored the value (a layout). As MarianMTModel refuses heads that do not divide d_model at load, ours refuses
    every bad value when a model is built, and when a config is saved."""
    from transformers import AutoModelForSeq2SeqLM

    Seq2SeqTransformerForConditionalGeneration(tiny_config()).save_pretrained(tmp_path)
    for field, value, expected in [("encoder_attention_heads", 5, "a divisor of d_model=32"),
                                   ("positional_encoding_layout", "bogus", "one of")]:
        with pytest.raises(ValueError, match=re.escape(f"Seq2SeqTransformerConfig.{field}={value!r} is invalid: "
                                                       f"expected {expected}")):
            AutoModelForSeq2SeqLM.from_pretrained(tmp_path, **{field: value})
    config = AutoConfig.from_pretrained(tmp_path)
    config.update({"d_model": -1})
    with pytest.raises(ValueError, match=exactly("Seq2SeqTransformerConfig.d_model=-1 is invalid: expected a positive integer.")):
        config.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "config.json").exists()
    # A model's save too, before anything is written (the code files were, and a refused save left a half folder).
    model = Seq2SeqTransformerForConditionalGeneration(tiny_config())
    model.config.dropout = 2.0
    with pytest.raises(ValueError, match=exactly("Seq2SeqTransformerConfig.dropout=2.0 is invalid: expected a number in [0, 1).")):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()
    # transformers' names (hidden_size=...) were set after the check: accepted, and refused only when a model was built.
    with pytest.raises(ValueError, match=exactly("Seq2SeqTransformerConfig.encoder_attention_heads=4 is invalid: expected a "
                                                 "divisor of d_model=30.")):
        tiny_config(hidden_size=30)
    assert (tiny_config(hidden_size=64).d_model, tiny_config(num_hidden_layers=3).encoder_layers) == (64, 3)


def test_a_value_of_the_wrong_type_is_refused_when_it_is_set():
    """As transformers' typed configs (MarianConfig) refuse a wrong type on assignment: `label_smoothing = "0.1"` was
    accepted and failed inside the loss, `use_cache = "no"` counted as true. Ranges wait for a model or a save
    (a user may set d_model, then the heads; transformers' own config tests set the sizes one by one)."""
    config = tiny_config()
    for key, value, message in [
        ("label_smoothing", "0.1", "label_smoothing='0.1' is invalid: expected a number in [0, 1)."),
        ("use_cache", "no", "use_cache='no' is invalid: expected True or False."),
        ("hidden_size", 2.5, "hidden_size (d_model)=2.5 is invalid: expected a positive integer."),
        ("pad_token_id", "0", f"pad_token_id='0' is invalid: expected None or an integer in [0, vocab_size={VOCAB})."),
        ("activation_function", "tanh", "activation_function='tanh' is invalid: expected one of"),
    ]:
        with pytest.raises(ValueError, match=re.escape(f"Seq2SeqTransformerConfig.{message}")):
            setattr(config, key, value)
    assert (config.label_smoothing, config.use_cache, config.d_model) == (0.0, True, 32)
    config.d_model, config.dropout, config.eos_token_id = 30, 2.0, [2, None]  # each of the right type: taken
    assert (config.hidden_size, config.dropout, config.eos_token_id) == (30, 2.0, [2, None])


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{d_model: 64", "not a valid UTF-8 JSON file (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))."),
        ("", "not a valid UTF-8 JSON file (Expecting value: line 1 column 1 (char 0))."),
        (b"\x89PNG\r\n\x1a\n\x00\xff", "not a valid UTF-8 JSON file ('utf-8' codec can't decode byte 0x89 in position 0: invalid start byte)."),
        ("[1, 2]", "expected a JSON object of config fields, got list."),
        ('"tiny"', "expected a JSON object of config fields, got str."),
        ('{"model_type": "marian", "d_model": 64}', "model_type is 'marian', expected 'seq2seq_transformer'."),
        ('{"d_model": "512"}', "Seq2SeqTransformerConfig.d_model='512' is invalid: expected a positive integer."),
        ('{"encoder_layers": true}', "Seq2SeqTransformerConfig.encoder_layers=True is invalid: expected a positive integer."),
        ('{"d_model": null}', "Seq2SeqTransformerConfig.d_model=None is invalid: expected a positive integer."),
        ('{"decoder_layers": -1}', "Seq2SeqTransformerConfig.decoder_layers=-1 is invalid: expected a positive integer."),
        ('{"eos_token_id": [2, 99999]}',
         "Seq2SeqTransformerConfig.eos_token_id=[2, 99999] is invalid: expected None or integers in [0, vocab_size=37000)."),
    ],
)
def test_preset_file_errors_name_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "preset.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=exactly(f"{path}: {problem}")):
        load_preset(path)


def test_missing_preset_lists_the_builtin_ones(tmp_path):
    available = "transformer-base, transformer-big, transformer-tiny"
    with pytest.raises(FileNotFoundError, match=exactly(f"No model preset at {tmp_path / 'nope.json'} (built-in presets: {available}).")):
        load_preset(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"transformer-huge\.json \(built-in presets: " + re.escape(available)):
        load_preset("huge")


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    """A run's output folder `tiny/` in the working directory made `--model_config tiny` "No model preset at tiny"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "transformer-base").mkdir()
    assert load_preset("tiny").d_model == load_preset(PRESET_DIR / "transformer-tiny.json").d_model
    assert load_preset("transformer-base").d_model == 512


def test_a_saved_config_json_is_accepted_as_a_preset(tmp_path):
    """save_pretrained's bookkeeping fields (model_type, transformers_version, auto_map...) are not 'unknown'."""
    config = load_preset("tiny", vocab_size=300)
    config.save_pretrained(tmp_path)
    loaded = load_preset(tmp_path / "config.json").to_diff_dict()
    assert loaded == {k: v for k, v in config.to_diff_dict().items() if k != "auto_map"}
    Seq2SeqTransformerForConditionalGeneration(config).save_pretrained(tmp_path / "model")  # custom_pipelines too
    assert load_preset(tmp_path / "model" / "config.json").d_model == config.d_model


def test_saving_never_writes_the_code_over_a_users_files(tmp_path):
    """save_pretrained copies the model's code files beside the weights (transformers' custom_object_save, for
    trust_remote_code): a user's own pipeline.py there was overwritten without a word (MarianMTModel writes no code)."""
    model = Seq2SeqTransformerForConditionalGeneration(tiny_config())
    (tmp_path / "pipeline.py").write_text("my own pipeline")
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / 'pipeline.py'} exists and is not this model's code")):
        model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.py"]
    assert (tmp_path / "pipeline.py").read_text() == "my own pipeline"
    model.save_pretrained(tmp_path / "saved")
    model.save_pretrained(tmp_path / "saved")  # over its own earlier save: fine
    # The config alone copies its own file (configuration_seq2seq.py), and only that one is checked.
    (tmp_path / "configuration_seq2seq.py").write_text("my notes")
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / 'configuration_seq2seq.py'} exists and is not")):
        model.config.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configuration_seq2seq.py", "pipeline.py", "saved"]
    assert (tmp_path / "configuration_seq2seq.py").read_text() == "my notes"
    (tmp_path / "configuration_seq2seq.py").unlink()
    model.config.save_pretrained(tmp_path)  # beside the user's pipeline.py, which a config's save does not write
    assert (tmp_path / "pipeline.py").read_text() == "my own pipeline"


# --- Model calls ---------------------------------------------------------------------------------------------------


def test_token_ids_outside_the_vocabulary_are_named(model):
    source, _ = padded_batch()
    cases = [
        (dict(input_ids=torch.tensor([[5, VOCAB]]), decoder_input_ids=torch.tensor([[1]])), "input_ids", VOCAB),
        (dict(input_ids=torch.tensor([[-1, 5]]), decoder_input_ids=torch.tensor([[1]])), "input_ids", -1),
        (dict(input_ids=source, decoder_input_ids=source.masked_fill(source == 0, 1000)), "decoder_input_ids", 1000),
        (dict(input_ids=source[:, :2], labels=torch.tensor([[5, 70]] * 3)), "labels", 70),  # the last label too
        (dict(input_ids=source[:, :2], labels=torch.tensor([[5, -7]] * 3)), "labels", -7),  # -100 is the only negative
    ]
    for kwargs, name, bad in cases:
        with pytest.raises(ValueError, match=exactly(f"`{name}` holds token id {bad}, outside [0, {VOCAB}).")):
            model(**kwargs)
    # -100 in labels means "ignore": accepted.
    assert torch.isfinite(model(input_ids=source[:, :2], labels=torch.tensor([[5, -100]] * 3)).loss)


def test_attention_masks_of_the_wrong_shape_are_named(model):
    source, mask = padded_batch()  # (3, 7)
    encoder_outputs = model.get_encoder()(input_ids=source, attention_mask=mask)
    cases = [
        (dict(input_ids=source, attention_mask=mask[:, :4], decoder_input_ids=source), "attention_mask", (3, 4), (3, 7)),
        (dict(input_ids=source, attention_mask=mask[:2], decoder_input_ids=source), "attention_mask", (2, 7), (3, 7)),
        (dict(input_ids=source, attention_mask=mask[:, None], decoder_input_ids=source), "attention_mask", (3, 1, 7), (3, 7)),
        (dict(input_ids=source, decoder_input_ids=source, decoder_attention_mask=mask[:, :3]),
         "decoder_attention_mask", (3, 3), (3, 7)),
        (dict(encoder_outputs=encoder_outputs, attention_mask=mask[:, :5], decoder_input_ids=source),
         "encoder attention_mask", (3, 5), (3, 7)),
    ]
    for kwargs, name, got, expected in cases:
        with pytest.raises(ValueError, match=exactly(f"`{name}` has shape {got}, expected {expected} (batch, length).")):
            model(**kwargs)


def test_empty_batches_are_refused(model):
    empty_batch, empty_rows = torch.zeros(0, 5, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)
    source = torch.randint(4, VOCAB, (2, 5))
    with pytest.raises(ValueError, match=exactly("The encoder got an empty batch: input shape (0, 5).")):
        model(input_ids=empty_batch, decoder_input_ids=empty_batch)
    with pytest.raises(ValueError, match=exactly("The encoder got an empty batch: input shape (2, 0).")):
        model(input_ids=empty_rows, decoder_input_ids=source)
    with pytest.raises(ValueError, match=exactly("The decoder got an empty batch: input shape (2, 0).")):
        model(input_ids=source, decoder_input_ids=empty_rows)
    with pytest.raises(ValueError, match=exactly("The encoder got an empty batch: input shape (0, 5).")):
        model.generate(empty_batch, num_beams=1, max_new_tokens=3)


def test_decoder_input_without_encoder_input_is_refused(model):
    target = torch.randint(4, VOCAB, (2, 3))
    for call in (model, model.model):
        with pytest.raises(ValueError, match=exactly("The encoder needs exactly one of `input_ids` and `inputs_embeds`.")):
            call(decoder_input_ids=target)
    with pytest.raises(ValueError, match=exactly("The decoder needs the encoder's output: pass `input_ids` or `encoder_outputs` "
                                                 "to the model (`encoder_hidden_states` to the decoder alone).")):
        model.get_decoder()(input_ids=target)
    with pytest.raises(ValueError, match=re.escape("Pass `decoder_input_ids`, `decoder_inputs_embeds` or `labels`")):
        model(input_ids=target)


def test_batch_size_mismatch_between_encoder_and_decoder_is_named(model):
    source, target = torch.randint(4, VOCAB, (2, 5)), torch.randint(4, VOCAB, (3, 4))
    message = exactly("Batch sizes differ: 3 decoder sequences but 2 encoder outputs.")
    with pytest.raises(ValueError, match=message):
        model(input_ids=source, decoder_input_ids=target)
    encoder_outputs = model.get_encoder()(input_ids=source)
    with pytest.raises(ValueError, match=message):
        model(encoder_outputs=encoder_outputs, decoder_input_ids=target)
    with pytest.raises(ValueError, match=message):
        model(encoder_outputs=(encoder_outputs.last_hidden_state,), decoder_input_ids=target)  # tuple form too


# --- Inputs longer than max_position_embeddings: the sinusoids extend ---------------------------------------------


def test_the_sinusoid_table_grows_with_the_formula_and_keeps_earlier_positions():
    encoding = SinusoidalPositionalEncoding(16, 4, "split")
    first = encoding(3, 0, torch.device("cpu")).clone()
    later = encoding(5, 10, torch.device("cpu"))  # positions 10..14, past the 4 precomputed
    assert encoding.table.shape[0] >= 15
    assert torch.equal(encoding(3, 0, torch.device("cpu")), first)  # growing changes nothing already there
    positions = torch.arange(10, 15, dtype=torch.float64)[:, None]
    angles = positions / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert torch.allclose(later.double(), torch.cat([angles.sin(), angles.cos()], dim=1), atol=1e-6)


def test_generation_and_cached_decoding_past_max_position_embeddings():
    """A model with 4 precomputed positions generates 12 tokens; fast path, transformers' loop, and the full
    forward of the result agree, and the same model with a table of 64 gives the same logits."""
    short = make_model(max_position_embeddings=4)
    source, mask = padded_batch(length=9)
    for search in (dict(num_beams=1), dict(num_beams=3, length_penalty=0.6)):
        search.update(max_new_tokens=12, min_new_tokens=12)
        ours = short.generate(source, attention_mask=mask, **search)
        stock = transformers.GenerationMixin.generate(short, source, attention_mask=mask, **search)
        assert ours.shape == (3, 13) and torch.equal(ours, stock), search
    long_table = make_model(max_position_embeddings=64)
    with torch.no_grad():
        logits = short(input_ids=source, attention_mask=mask, decoder_input_ids=ours).logits
        reference = long_table(input_ids=source, attention_mask=mask, decoder_input_ids=ours).logits
        assert torch.allclose(logits, reference, atol=1e-6)
        encoder_outputs = short.get_encoder()(input_ids=source, attention_mask=mask)
        cache, steps = None, []
        for t in range(ours.shape[1]):
            out = short(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=ours[:, t : t + 1],
                        cache=cache, use_cache=True)
            cache, steps = out.cache if hasattr(out, "cache") else out.past_key_values, steps + [out.logits]
    assert torch.allclose(torch.cat(steps, dim=1), logits, atol=1e-5)


# --- generate: invalid requests fail clearly, through our fast path and transformers' ------------------------------


@pytest.mark.parametrize(
    "request_, error, message",
    [
        # transformers' checks, reached through our override
        (dict(num_beams=2, num_return_sequences=3), ValueError,
         "`num_return_sequences` (3) has to be smaller or equal to `num_beams` (2)."),
        (dict(num_beams=1, num_return_sequences=2), ValueError,
         "Greedy methods (do_sample != True) without beam search do not support `num_return_sequences` different than 1 (got 2)."),
        (dict(max_new_tokens=0), ValueError, "`max_new_tokens` must be greater than 0, but is 0."),
        (dict(max_new_tokens=-1), ValueError, "`max_new_tokens` must be greater than 0, but is -1."),
        (dict(max_new_tokens=-1, num_beams=1), ValueError, "`max_new_tokens` must be greater than 0, but is -1."),
        (dict(max_length=-3, max_new_tokens=None), ValueError,
         "Input length of decoder_input_ids is 1, but `max_length` is set to -3. This can lead to unexpected behavior. "
         "You should consider increasing `max_length` or, better yet, setting `max_new_tokens`."),
        # ours: values transformers accepts silently (negative minimum lengths) or crashes on (no beams)
        (dict(min_new_tokens=-1), ValueError, "`min_new_tokens` must be an integer >= 0, got -1."),
        (dict(min_new_tokens=-1, do_sample=True), ValueError, "`min_new_tokens` must be an integer >= 0, got -1."),
        (dict(min_length=-5), ValueError, "`min_length` must be an integer >= 0, got -5."),
        (dict(num_beams=0), ValueError, "`num_beams` must be an integer >= 1, got 0."),
        (dict(num_beams=-2), ValueError, "`num_beams` must be an integer >= 1, got -2."),
        (dict(num_beams=2.5), ValueError, "`num_beams` must be an integer >= 1, got 2.5."),
        (dict(num_return_sequences=0), ValueError, "`num_return_sequences` must be an integer >= 1, got 0."),
    ],
)
def test_invalid_generate_requests_fail_clearly(model, request_, error, message):
    source, mask = padded_batch()
    request_ = {"max_new_tokens": 4, **request_}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=exactly(message)):
            model.generate(source, attention_mask=mask, **request_)
        # The same through a GenerationConfig object, and in training mode (where the fast path is skipped).
        with pytest.raises(error, match=exactly(message)):
            model.generate(source, attention_mask=mask, generation_config=GenerationConfig(
                **{**model.generation_config.to_dict(), **request_}))
        model.train()
        try:
            with pytest.raises(error, match=exactly(message)):
                model.generate(source, attention_mask=mask, **request_)
        finally:
            model.eval()


def test_unfeasible_minimum_length_warns_and_stops_at_the_maximum(model):
    """min_new_tokens > max_new_tokens is legal in transformers (it warns); the fast path agrees with it."""
    source, mask = padded_batch()
    request = dict(num_beams=2, max_new_tokens=3, min_new_tokens=10)
    with pytest.warns(UserWarning, match="Unfeasible length constraints"):
        stock = transformers.GenerationMixin.generate(model, source, attention_mask=mask, **request)
    assert torch.equal(model.generate(source, attention_mask=mask, **request), stock)
    assert stock.shape == (3, 4)


# --- Half precision -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masks_use_the_dtype_minimum_never_minus_infinity(dtype):
    minimum = torch.finfo(dtype).min
    pad = padding_mask(torch.tensor([[1, 1, 0]]), dtype)
    assert pad.dtype == dtype and pad.shape == (1, 1, 1, 3)
    assert pad[..., :2].eq(0).all() and pad[..., 2].eq(minimum).all()
    future = causal_mask(3, 2, dtype, torch.device("cpu"))  # 3 new queries after 2 cached positions
    assert future.shape == (1, 1, 3, 5) and torch.isfinite(future).all()
    assert torch.equal(future[0, 0] == minimum, torch.ones(3, 5).triu(3).bool())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_dtype(torch.zeros(1)) == torch.bfloat16  # masks are built in the autocast dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_row_with_every_key_masked_gives_no_nan(dtype):
    query = torch.randn(1, 2, 3, 4).to(dtype) * 30
    key, value = torch.randn(1, 2, 5, 4).to(dtype) * 30, torch.randn(1, 2, 5, 4).to(dtype)
    mask = padding_mask(torch.zeros(1, 5), dtype) + causal_mask(3, 2, dtype, torch.device("cpu"))
    output, weights = eager_attention_forward(torch.nn.Module().eval(), query, key, value, mask, scaling=0.5)
    assert torch.isfinite(output).all() and torch.isfinite(weights).all()
    assert torch.allclose(weights.float().sum(-1), torch.ones(1, 2, 3), atol=1e-2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.5)
    assert torch.isfinite(sdpa).all()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_fp16_on_cpu_is_finite_and_close_to_fp32(implementation):
    """fp16 weights on CPU (bf16 is in test_model.py): fully padded source and target rows stay finite, the other
    rows match fp32, the loss and gradients are finite, and generate runs."""
    reference = make_model()
    half = make_model().half()
    for m in (reference, half):
        m.config._attn_implementation = implementation
    source, mask = padded_batch()
    mask[2], source[2] = 0, 0  # a source that is all padding
    target_mask = mask[:, :5].clone()
    target_mask[2] = 0  # and a target that is all padding
    inputs = dict(input_ids=source, attention_mask=mask, decoder_input_ids=source[:, :5], decoder_attention_mask=target_mask)
    with torch.no_grad():
        logits, expected = half(**inputs).logits, reference(**inputs).logits
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    assert (logits[:2].float() - expected[:2]).abs().max() < 2e-2
    half.train()
    loss = half(input_ids=source, attention_mask=mask, labels=source[:, :5]).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in half.parameters() if p.grad is not None)
    half.eval()
    for search in (dict(num_beams=1), dict(num_beams=3)):
        generated = half.generate(source, attention_mask=mask, max_new_tokens=6, **search)
        assert generated.shape[0] == 3 and 0 <= generated.min() and generated.max() < VOCAB


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_forward_and_backward_are_finite(dtype):
    model = make_model().train()
    source, mask = padded_batch()
    mask[2] = 0
    labels = source[:, :5]
    with torch.no_grad():
        expected = model(input_ids=source, attention_mask=mask, labels=labels).logits
    with torch.autocast("cpu", dtype=dtype):
        out = model(input_ids=source, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert (out.logits[:2].float() - expected[:2]).abs().max() < 0.25  # dropout is 0: only rounding differs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_gpu_autocast_forward_backward_generate_are_finite_and_close_to_fp32(dtype, implementation):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    model = make_model().cuda()
    model.config._attn_implementation = implementation
    source, mask = (t.cuda() for t in padded_batch())
    mask[2] = 0  # a fully padded row
    inputs = dict(input_ids=source, attention_mask=mask, decoder_input_ids=source[:, :5])
    with torch.no_grad():
        expected = model(**inputs).logits
        with torch.autocast("cuda", dtype=dtype):
            logits = model(**inputs).logits
        fp32_ids = model.generate(source, attention_mask=mask, num_beams=3, max_new_tokens=6)
        with torch.autocast("cuda", dtype=dtype):
            ids = model.generate(source, attention_mask=mask, num_beams=3, max_new_tokens=6)
    assert torch.isfinite(logits).all()
    tolerance = 0.1 if dtype == torch.bfloat16 else 2e-2
    assert (logits[:2].float() - expected[:2]).abs().max() < tolerance * max(1.0, expected[:2].abs().max().item())
    assert ids.shape[0] == fp32_ids.shape[0] == 3 and 0 <= ids.min() and ids.max() < VOCAB

    model.train()
    with torch.autocast("cuda", dtype=dtype):
        loss = model(input_ids=source, attention_mask=mask, labels=source[:, :5]).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # Half-precision weights (no autocast) through the fused CUDA kernels, with the fully padded row.
    half = make_model().cuda().to(dtype)
    half.config._attn_implementation = implementation
    with torch.no_grad():
        logits = half(**inputs).logits
        ids = half.generate(source, attention_mask=mask, num_beams=3, max_new_tokens=6)
    assert torch.isfinite(logits).all() and ids.max() < VOCAB


# --- Tokenizer: inputs beyond test_tokenizer.py's ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from modeling_seq2seq.tokenization import train_tokenizer

    corpus = ["the cat sat on the mat", "die Katze saß auf der Matte", "thirty-four", "vierunddreißig"] * 10
    return train_tokenizer(corpus, vocab_size=320)


INVISIBLE_AND_ODD = [
    "".join(chr(c) for c in range(0x00, 0x20)) + "\x7f" + "".join(chr(c) for c in range(0x80, 0xA0)),  # C0, DEL, C1
    "zero\u200bwidth\u200cnon\u200djoiner\u2060word joiner",
    "\ufeffbyte order mark and \u00adsoft hyphen",
    "right-to-left \u202eoverride\u202c and \u2067isolate\u2069 marks",
    "noncharacters \ufdd0 \ufffe \uffff \U0001fffe \U0010ffff",
    "tag characters \U000e0001\U000e0064\U000e0065 and variation selectors \u2764\ufe0f \U000e0100",
    "z" + "\u0301\u0308\u0323" * 30,  # a stack of combining marks
    "family 👨‍👩‍👧‍👦 flag 🏴󠁧󠁢󠁳󠁣󠁴󠁿 skin 🧑🏿‍🚀",
    "中文、日本語、한국어، العربية، עברית، हिन्दी, ไทย, ქართული",
    "\u3000ideographic space\u2003em space\u00a0no-break",
]


@pytest.mark.parametrize("text", INVISIBLE_AND_ODD, ids=range(len(INVISIBLE_AND_ODD)))
def test_invisible_unassigned_and_mixed_characters_round_trip_without_unk(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_empty_strings_in_a_batch_become_a_lone_eos(tok):
    encoded = tok(["", "the cat", ""], text_target=["", "", "die Katze"], padding=True)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    width = len(encoded["input_ids"][1])
    assert encoded["input_ids"][0] == encoded["input_ids"][2] == [eos] + [pad] * (width - 1)
    assert encoded["attention_mask"][0] == [1] + [0] * (width - 1)
    assert encoded["labels"][0][0] == eos and set(encoded["labels"][0][1:]) <= {pad}
    assert tok.batch_decode(encoded["input_ids"], skip_special_tokens=True) == ["", "the cat", ""]


def test_long_text_is_truncated_to_model_max_length(tok):
    ids = tok("the cat " * 3000, truncation=True)["input_ids"]
    assert len(ids) == tok.model_max_length and ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("bad", [None, 5, b"bytes", ["fine", None]])
def test_non_text_input_is_refused(tok, bad):
    with pytest.raises((ValueError, TypeError)) as error:
        tok(bad)
    assert str(error.value) in {
        "You need to specify either `text` or `text_target`.",
        "TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]",
    } or str(error.value).startswith("text input must be of type `str` (single example)")


@pytest.mark.xfail(strict=True, reason="tokenizers raises an unclear TypeError for a lone surrogate (reported)")
def test_lone_surrogate_is_refused_with_a_clear_message(tok):
    with pytest.raises(ValueError, match="surrogate"):
        tok("a\ud800b")


def test_messy_text_goes_through_the_model(tok):
    """Tokenizer -> model -> tokenizer with control characters, emoji, mixed scripts and empty strings."""
    torch.manual_seed(0)
    model = Seq2SeqTransformerForConditionalGeneration(tiny_config(vocab_size=len(tok))).eval()
    texts = ["", "\x00\x1b[31m", *INVISIBLE_AND_ODD[7:9]]
    encoded = tok(texts, return_tensors="pt", padding=True)
    for search in (dict(num_beams=1), dict(num_beams=2)):
        generated = model.generate(**encoded, max_new_tokens=5, **search)
        assert generated.shape[0] == len(texts)
        assert all(isinstance(text, str) for text in tok.batch_decode(generated, skip_special_tokens=True))
