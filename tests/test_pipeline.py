"""The `seq2seq-translation` pipeline (issue 4): in memory, from a Hub folder, batching, generate kwargs, output."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
from transformers import pipeline

from modeling_seq2seq.pipeline import TASK, Seq2SeqTranslationPipeline

_spec = importlib.util.spec_from_file_location("hub_test_helpers", Path(__file__).with_name("test_hub.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

TEXTS = helpers.TEXTS
GREEDY = helpers.GREEDY


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return helpers.shared_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def model_and_tokenizer(model_dir):
    return helpers.load_original(model_dir)


@pytest.fixture(scope="module")
def translator(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    return pipeline(TASK, model=model, tokenizer=tokenizer)  # on a GPU machine transformers moves the model there


def generate_one(model, tokenizer, text, **kwargs):
    with torch.no_grad():
        return model.generate(**tokenizer([text], return_tensors="pt").to(model.device), **kwargs)[0].tolist()


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_task_is_registered_with_the_seq2seq_auto_class():
    assert TASK == "seq2seq-translation"
    from transformers.pipelines import PIPELINE_REGISTRY

    _, info, _ = PIPELINE_REGISTRY.check_task(TASK)
    assert info["impl"] is Seq2SeqTranslationPipeline
    assert info["pt"] == (transformers.AutoModelForSeq2SeqLM,)


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="4.x still has the translation task")
@pytest.mark.parametrize("users_file", ["pipeline.py", "decoding_seq2seq.py"])
def test_saving_the_pipeline_never_writes_the_code_over_a_users_file(translator, tmp_path, users_file):
    """transformers' `Pipeline.save_pretrained` copies pipeline.py into the folder before the model's save checks it:
    a user's own pipeline.py was replaced without a word, and with a user's decoding_seq2seq.py the model's refusal
    came after pipeline.py was written."""
    (tmp_path / users_file).write_text("mine")
    with pytest.raises(FileExistsError, match=f"{tmp_path / users_file} exists and is not this model's code"):
        translator.save_pretrained(tmp_path)
    assert [(p.name, p.read_text()) for p in tmp_path.iterdir()] == [(users_file, "mine")]
    translator.save_pretrained(tmp_path / "saved")
    assert "class Seq2SeqTranslationPipeline(" in (tmp_path / "saved" / "pipeline.py").read_text()


def test_stock_translation_task_is_gone_in_v5(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(KeyError, match="translation"):
        pipeline("translation", model=model, tokenizer=tokenizer)


def test_single_string_gives_what_generate_gives_with_the_model_defaults(translator, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert model.generation_config.num_beams == 4  # the pipeline adds no defaults of its own: beam search it is
    for text in TEXTS:
        expected = decode(tokenizer, generate_one(model, tokenizer, text))
        assert translator(text) == [{"translation_text": expected}]
    assert any(translator(text)[0]["translation_text"] for text in TEXTS)


def test_a_list_gives_a_flat_list_and_batching_changes_nothing(translator, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    expected = [{"translation_text": decode(tokenizer, generate_one(model, tokenizer, t, **GREEDY))} for t in TEXTS]
    assert translator(TEXTS, **GREEDY) == expected
    assert translator(TEXTS, batch_size=3, **GREEDY) == expected  # padded batches of 3 and 1
    assert translator(tuple(TEXTS), batch_size=4, **GREEDY) == expected
    assert translator([]) == []


def test_return_tensors_gives_generate_ids_without_batch_padding(translator, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    expected = [generate_one(model, tokenizer, t, **GREEDY) for t in TEXTS]
    assert all(ids[0] == 1 and ids[-1] == 2 for ids in expected), expected  # start token ... </s>
    assert len({len(ids) for ids in expected}) > 1  # different lengths, so batching pads
    for batch_size in (1, 4):
        records = translator(TEXTS, return_tensors=True, batch_size=batch_size, **GREEDY)
        assert records == [{"translation_token_ids": ids} for ids in expected]
    # Beam search pads finished hypotheses (with </s> when pad_token_id is 0); that filler is removed too.
    beam = [generate_one(model, tokenizer, t, max_new_tokens=12) for t in TEXTS]
    records = translator(TEXTS, return_tensors=True, batch_size=4, max_new_tokens=12)
    assert [r["translation_token_ids"] for r in records] == beam


def test_the_calls_own_end_and_padding_are_taken_off_too(translator, model_and_tokenizer):
    """An end token or a padding id passed per call (not the generation config's) is what generate() used: the
    filler after it is batching's too, so the ids do not depend on the batch."""
    model, tokenizer = model_and_tokenizer
    ends = [2, generate_one(model, tokenizer, TEXTS[0], **GREEDY)[2]]  # one that the first text produces early
    for options in (dict(eos_token_id=ends), dict(pad_token_id=5)):
        expected = [generate_one(model, tokenizer, t, **GREEDY, **options) for t in TEXTS]
        for batch_size in (1, 4):
            records = translator(TEXTS, return_tensors=True, batch_size=batch_size, **GREEDY, **options)
            assert [r["translation_token_ids"] for r in records] == expected, (options, batch_size)


def test_source_and_target_languages_are_taken_and_unused_as_in_4x(translator):
    assert translator(TEXTS[0], src_lang="en", tgt_lang="de", **GREEDY) == translator(TEXTS[0], **GREEDY)


def test_several_sequences_per_input(translator, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=10)
    out = translator(TEXTS[:2], batch_size=2, **kwargs)
    assert [len(records) for records in out] == [2, 2]
    for text, records in zip(TEXTS[:2], out):
        with torch.no_grad():
            ids = model.generate(**tokenizer([text], return_tensors="pt").to(model.device), **kwargs)
        assert [r["translation_text"] for r in records] == tokenizer.batch_decode(ids, skip_special_tokens=True)
    single = translator(TEXTS[0], **kwargs)
    assert single == out[0]


def test_generate_kwargs_at_construction_and_per_call(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    short = pipeline(TASK, model=model, tokenizer=tokenizer, num_beams=1, max_new_tokens=2)
    ids = short(TEXTS[0], return_tensors=True)[0]["translation_token_ids"]
    assert ids == generate_one(model, tokenizer, TEXTS[0], num_beams=1, max_new_tokens=2) and len(ids) == 3
    longer = short(TEXTS[0], return_tensors=True, max_new_tokens=4)[0]["translation_token_ids"]  # the call wins
    assert longer == generate_one(model, tokenizer, TEXTS[0], num_beams=1, max_new_tokens=4)
    as_dict = short(TEXTS[0], return_tensors=True, generate_kwargs={"max_new_tokens": 3})[0]["translation_token_ids"]
    assert as_dict == generate_one(model, tokenizer, TEXTS[0], num_beams=1, max_new_tokens=3)
    config = transformers.GenerationConfig.from_model_config(model.config)
    config.update(num_beams=1, max_new_tokens=1, decoder_start_token_id=1, eos_token_id=2, pad_token_id=0)
    assert len(short(TEXTS[0], return_tensors=True, generation_config=config)[0]["translation_token_ids"]) == 2
    with pytest.raises(ValueError):  # a typo reaches generate(), which names it
        short(TEXTS[0], num_beems=2)


def test_prefix_truncation_and_clean_output(translator, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prefixed = translator("cat sat", prefix="the ", **GREEDY)
    assert prefixed == translator("the cat sat", **GREEDY)
    text = prefixed[0]["translation_text"]
    assert "<" not in text and "</s>" not in text and "<pad>" not in text
    tokenizer.model_max_length, saved = 3, tokenizer.model_max_length
    try:
        truncated = translator(TEXTS[0], truncation=True, return_tensors=True, **GREEDY)
        with torch.no_grad():
            encoded = tokenizer([TEXTS[0]], truncation=True, return_tensors="pt").to(model.device)
            assert encoded["input_ids"].shape[1] == 3
            expected = model.generate(**encoded, **GREEDY)[0].tolist()
    finally:
        tokenizer.model_max_length = saved
    assert truncated == [{"translation_token_ids": expected}]


def test_bad_inputs_and_components_are_refused(translator, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(TypeError, match="strings"):
        translator(["fine", 3])
    with pytest.raises(TypeError, match="strings"):
        translator(42)
    with pytest.raises(ValueError, match="at most one"):
        translator("x", return_tensors=True, return_text=True)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        Seq2SeqTranslationPipeline(model=model, tokenizer=None)
    decoder_only = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=8, n_layer=1, n_head=2, n_positions=16)
    )
    with pytest.raises(ValueError, match="encoder-decoder"):
        Seq2SeqTranslationPipeline(model=decoder_only, tokenizer=tokenizer)


def test_works_with_a_stock_encoder_decoder_model(model_and_tokenizer):
    """Nothing in the pipeline is specific to our model: a MarianMTModel runs through it the same way."""
    _, tokenizer = model_and_tokenizer
    torch.manual_seed(0)
    config = transformers.MarianConfig(
        vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None,
    )
    marian = transformers.MarianMTModel(config).eval()
    marian_pipe = pipeline(TASK, model=marian, tokenizer=tokenizer)
    expected = [decode(tokenizer, generate_one(marian, tokenizer, t, **GREEDY)) for t in TEXTS]
    assert [r["translation_text"] for r in marian_pipe(TEXTS, batch_size=2, **GREEDY)] == expected


def test_from_a_hub_folder_with_trust_remote_code(model_dir, translator, tmp_path):
    from modeling_seq2seq.hub import build_hub_folder

    folder = tmp_path / "repo"
    build_hub_folder(model_dir, folder, template=helpers.TEMPLATE)
    remote = pipeline(TASK, model=str(folder), trust_remote_code=True)
    # The class comes from the folder's pipeline.py. (The model class is ours: with the package imported,
    # transformers prefers the registered local class; test_hub.py loads it where the package is absent.)
    assert type(remote).__module__.startswith("transformers_modules.")
    assert type(remote).__module__.endswith(".pipeline")
    assert remote(TEXTS, batch_size=2, **GREEDY) == translator(TEXTS, **GREEDY)
    assert remote(TEXTS[0]) == translator(TEXTS[0])
    # The folder declares the task; running its code needs consent.
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline(TASK, model=str(folder))


# --- Behaviours no test above could fail on (a mutation review) ----------------------------------


def test_return_text_false_gives_the_token_ids(translator):
    """`return_text=False` asks for the ids, as `return_tensors=True` does; `return_tensors=False` for the text."""
    assert translator(TEXTS, return_text=False, **GREEDY) == translator(TEXTS, return_tensors=True, **GREEDY)
    assert translator(TEXTS[0], return_tensors=False, **GREEDY) == translator(TEXTS[0], **GREEDY)


def test_padding_is_taken_off_after_an_end_at_the_first_step_and_after_a_generation_configs_ends(
        translator, model_and_tokenizer):
    """A sequence that ends at its first generated token, and ends and padding given by a `generation_config`
    (not loose keywords): batched ids equal each input's own `generate()` ids."""
    import copy

    model, tokenizer = model_and_tokenizer
    first = generate_one(model, tokenizer, TEXTS[0], **GREEDY)[1]
    assert first != 2
    config = copy.deepcopy(model.generation_config)
    config.update(num_beams=1, max_new_tokens=12, eos_token_id=[2, first], pad_token_id=5)
    for options in (dict(eos_token_id=[2, first], **GREEDY), dict(generation_config=config)):
        expected = [generate_one(model, tokenizer, t, **options) for t in TEXTS]
        assert expected[0] == [1, first] and max(len(ids) for ids in expected) > 2, expected
        for batch_size in (1, 4):
            records = translator(TEXTS, return_tensors=True, batch_size=batch_size, **options)
            assert [r["translation_token_ids"] for r in records] == expected, (options, batch_size)


def test_generate_kwargs_from_construction_still_apply_when_the_call_passes_others(model_and_tokenizer):
    """The module docstring: kwargs given at construction "apply to every call", the call's "win" (key by key; a loose
    keyword over the same key in `generate_kwargs`). transformers' Pipeline alone would drop the construction's
    generate kwargs as soon as a call passes one."""
    model, tokenizer = model_and_tokenizer
    short = pipeline(TASK, model=model, tokenizer=tokenizer, max_new_tokens=2)
    for call in (dict(num_beams=1), dict(generate_kwargs={"num_beams": 1})):
        ids = short(TEXTS[0], return_tensors=True, **call)[0]["translation_token_ids"]
        assert ids == generate_one(model, tokenizer, TEXTS[0], num_beams=1, max_new_tokens=2), call
    ids = short(TEXTS[0], return_tensors=True, generate_kwargs={"max_new_tokens": 3}, max_new_tokens=5, num_beams=1)
    assert ids[0]["translation_token_ids"] == generate_one(model, tokenizer, TEXTS[0], num_beams=1, max_new_tokens=5)
    assert short(TEXTS[0], return_tensors=True)[0]["translation_token_ids"] == generate_one(
        model, tokenizer, TEXTS[0], max_new_tokens=2)
    config = transformers.GenerationConfig.from_model_config(model.config)  # a whole set of settings: it wins
    config.update(num_beams=1, max_new_tokens=4, decoder_start_token_id=1, eos_token_id=2, pad_token_id=0)
    ids = short(TEXTS[0], return_tensors=True, generation_config=config, num_beams=2)[0]["translation_token_ids"]
    assert ids == generate_one(model, tokenizer, TEXTS[0], generation_config=config, num_beams=2)
