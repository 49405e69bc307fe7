"""The serving path: our saved model -> Marian twin -> CTranslate2 translates the same token ids as our `generate`."""

import json
import re
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_seq2seq import Seq2SeqTransformerForConditionalGeneration
from modeling_seq2seq.export import export_saved_model, synthetic_tokenizer
from modeling_seq2seq.presets import load_preset
from modeling_seq2seq.tokenization import save_tokenizer

ctranslate2 = pytest.importorskip("ctranslate2")

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny model with random weights saved with save_pretrained, plus a word-level tokenizer over its ids."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = Seq2SeqTransformerForConditionalGeneration(load_preset("tiny", vocab_size=VOCAB, dropout=0.0)).eval()
    model.save_pretrained(folder)
    save_tokenizer(synthetic_tokenizer(VOCAB), folder)
    return model, folder


def sources(seed=0, batch=4):
    """Right-padded random sources of different lengths, each ending with </s>."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [11, 7, 9, 4][:batch]
    ids = torch.zeros(batch, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = torch.randint(4, VOCAB, (n - 1,), generator=generator)
        ids[row, n - 1] = 2
        mask[row, :n] = 1
    return ids, mask, lengths


def ours_ids(model, ids, mask, num_beams):
    settings = dict(num_beams=num_beams, max_new_tokens=NEW_TOKENS, do_sample=False)
    if num_beams > 1:
        settings["length_penalty"] = 0.6
    output = model.generate(ids, attention_mask=mask, **settings)
    rows = []
    for row in output.tolist():
        tokens = []
        for token in row[1:]:  # after the decoder start token, up to </s> (CTranslate2 returns no </s>)
            if token in (0, 2):
                break
            tokens.append(token)
        rows.append(tokens)
    return rows


def ct2_ids(translator, tokenizer, ids, lengths, num_beams, **options):
    batch = [tokenizer.convert_ids_to_tokens(row[:n]) for row, n in zip(ids.tolist(), lengths)]
    # min_decoding_length: CTranslate2's default minimum is 1 token; ours is 0.
    options = dict(dict(beam_size=num_beams, length_penalty=0.6 if num_beams > 1 else 1.0,
                        max_decoding_length=NEW_TOKENS, min_decoding_length=0), **options)
    results = translator.translate_batch(batch, **options)
    return [tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in results]


def test_export_script_translates_like_our_generate(saved_model, tmp_path, unusual_permissions):
    model, folder = saved_model
    output = tmp_path / "ct2"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export_ctranslate2.py"), "--model_dir", str(folder), "--output_dir", str(output)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (output / "model.bin").is_file() and (output / "tokenizer.json").is_file()
    assert unusual_permissions(tmp_path) == []
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    refused = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export_ctranslate2.py"), "--model_dir", str(folder), "--output_dir",
         str(mine), "--force"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert refused.returncode == 2 and "is a file, not a folder" in refused.stderr and mine.read_text() == "mine"
    config = json.loads((output / "config.json").read_text())
    assert config["decoder_start_token"] == "<s>"  # ours starts from <s>, not from OPUS-MT's zero-embedded <pad>
    translator = ctranslate2.Translator(str(output), device="cpu", intra_threads=1)
    tokenizer = synthetic_tokenizer(VOCAB)
    for seed in (0, 1):
        ids, mask, lengths = sources(seed)
        for num_beams in (1, 4):
            expected = ours_ids(model, ids, mask, num_beams)
            assert ct2_ids(translator, tokenizer, ids, lengths, num_beams) == expected, (seed, num_beams)
            assert all(len(row) > 0 for row in expected)


def test_sentences_that_end_at_the_first_step_end_there_in_ctranslate2_too(tmp_path):
    """With `min_decoding_length=0` (as the export script's docstring calls it) a greedy translation whose likeliest
    first token is </s> is empty in both; CTranslate2's default minimum of 1 token would go on."""
    torch.manual_seed(0)
    model = Seq2SeqTransformerForConditionalGeneration(
        load_preset("tiny", vocab_size=VOCAB, dropout=0.0, output_bias=True)).eval()
    with torch.no_grad():
        model.lm_head.bias[2] = 4.0
    model.save_pretrained(tmp_path / "model")
    save_tokenizer(synthetic_tokenizer(VOCAB), tmp_path / "model")
    translator = ctranslate2.Translator(export_saved_model(tmp_path / "model", tmp_path / "ct2"), device="cpu",
                                        intra_threads=1)
    tokenizer = synthetic_tokenizer(VOCAB)
    for seed in (0, 1):
        ids, mask, lengths = sources(seed)
        expected = ours_ids(model, ids, mask, 1)
        assert [] in expected and any(expected), expected  # some end at once, some do not
        assert ct2_ids(translator, tokenizer, ids, lengths, 1) == expected, seed
        assert [] not in ct2_ids(translator, tokenizer, ids, lengths, 1, min_decoding_length=1)


def test_int8_export_runs(saved_model, tmp_path):
    model, folder = saved_model
    output = export_saved_model(folder, tmp_path / "int8", quantization="int8")
    translator = ctranslate2.Translator(output, device="cpu", compute_type="int8", intra_threads=1)
    tokenizer = synthetic_tokenizer(VOCAB)
    ids, mask, lengths = sources()
    translated = ct2_ids(translator, tokenizer, ids, lengths, 4)
    assert len(translated) == len(lengths) and all(0 < len(row) <= NEW_TOKENS for row in translated)



def test_export_script_passes_quantization_and_force_on(saved_model, tmp_path, capsys):
    """--quantization reaches the converter (int8 weights: a much smaller model.bin, though the float32 position table
    stays as it is), and --force replaces an earlier export, where without it the script refuses."""
    import runpy

    _, folder = saved_model
    main = runpy.run_path(str(REPO / "scripts" / "export_ctranslate2.py"))["main"]
    assert main(["--model_dir", str(folder), "--output_dir", str(tmp_path / "f32")]) == 0
    assert main(["--model_dir", str(folder), "--output_dir", str(tmp_path / "i8"), "--quantization", "int8"]) == 0
    float32_size = (tmp_path / "f32" / "model.bin").stat().st_size
    assert (tmp_path / "i8" / "model.bin").stat().st_size < 0.75 * float32_size
    capsys.readouterr()
    assert main(["--model_dir", str(folder), "--output_dir", str(tmp_path / "i8")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["--model_dir", str(folder), "--output_dir", str(tmp_path / "i8"), "--force"]) == 0
    assert (tmp_path / "i8" / "model.bin").stat().st_size == float32_size  # replaced by a float32 export


def test_export_needs_a_tokenizer_and_keeps_existing_output(saved_model, tmp_path, monkeypatch):
    model, _ = saved_model
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        export_saved_model(bare, tmp_path / "out")
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(FileExistsError):
        export_saved_model(saved_model[1], existing)
    # --force replaces the output folder, never the model it reads (the folder itself, or one holding it).
    run = tmp_path / "run"
    model.save_pretrained(run / "checkpoint-2")
    save_tokenizer(synthetic_tokenizer(VOCAB), run / "checkpoint-2")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for output in (run / "checkpoint-2", run):
        with pytest.raises(ValueError, match="replacing it would delete that input"):
            export_saved_model(run / "checkpoint-2", output, force=True)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    # Nor anything but an earlier export: a saved model (another one, or a checkpoint inside the model read), a run.
    other = tmp_path / "other"
    model.save_pretrained(other)
    for model_dir, output, message in [
        (saved_model[1], other, "not an earlier output of this command (one with model.bin and no sub-folders; it "
                                "holds config.json"),
        (run / "checkpoint-2", run / "checkpoint-2" / "ct2", "lies inside the checkpoint"),  # rotation deletes it
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            export_saved_model(model_dir, output, force=True)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before and (other / "config.json").is_file()
    shutil.rmtree(other)
    # --force keeps the earlier export until the new one is in place: the last rename failing (a kill would stop
    # there) left no export at all, as the old one had been deleted first. (Where the system swaps the two folders in
    # one step, as Linux does, there is no such rename: tests/test_checkpointing.py tests that path.)
    export_saved_model(saved_model[1], tmp_path / "served")
    earlier = {p.name: p.read_bytes() for p in (tmp_path / "served").iterdir()}
    real_replace = os.replace
    from modeling_seq2seq import checkpointing

    monkeypatch.setattr(checkpointing, "exchange_paths", lambda first, second: False)

    def failing_last_rename(source, target):
        if Path(target) == tmp_path / "served" and Path(source).name == "model":
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_last_rename)
    with pytest.raises(OSError, match="No space left"):
        export_saved_model(saved_model[1], tmp_path / "served", force=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "served").iterdir()} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bare", "existing", "run", "served"])
    (tmp_path / "notes.txt").write_text("mine")  # a file is no output folder, --force or not
    with pytest.raises(FileExistsError, match="is a file or a link, not a folder"):
        export_saved_model(saved_model[1], tmp_path / "notes.txt", force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_stock_marian_loader_cannot_convert_our_model(saved_model, tmp_path):
    """Why export.py has its own loader: CTranslate2's Marian loader assumes OPUS-MT's layout (the decoder starts
    from a zero-embedded <pad>, the last vocabulary row, which it drops) and fails on ours (<pad> is id 0)."""
    from ctranslate2.converters.converter import Converter
    from ctranslate2.converters.transformers import MarianMTLoader

    from modeling_seq2seq.convert import to_marian

    model, _ = saved_model
    marian = to_marian(model).eval()
    tokenizer = synthetic_tokenizer(VOCAB)

    class Stock(Converter):
        def _load(self):
            return MarianMTLoader()(marian, tokenizer)

    with pytest.raises(ValueError, match="vocabulary"):
        Stock().convert(str(tmp_path / "stock"))


def ct2_log_probs(translator, tokenizer, source_ids, target_ids, **options):
    source, target = tokenizer.convert_ids_to_tokens(source_ids), tokenizer.convert_ids_to_tokens(target_ids)
    return torch.tensor(translator.score_batch([source], [target], **options)[0].log_probs, dtype=torch.float64)


def our_log_probs(model, source_ids, target_ids):
    decoder = torch.tensor([[model.config.decoder_start_token_id] + target_ids])
    with torch.no_grad():
        log_probs = model(input_ids=torch.tensor([source_ids]), decoder_input_ids=decoder).logits[0].log_softmax(-1)
    return log_probs[torch.arange(len(target_ids) + 1), target_ids + [2]].double()


def test_decoder_heads_and_positions_past_the_table_are_exported(tmp_path):
    """Unequal encoder and decoder head counts (the stock loader gives the decoder the encoder's), and a source
    longer than max_position_embeddings (ours computes its encodings; Marian's table, which CTranslate2 got, stopped
    there): the same log-probabilities as ours."""
    from modeling_seq2seq import Seq2SeqTransformerConfig
    from modeling_seq2seq.export import EXPORTED_POSITIONS, export_to_ctranslate2

    torch.manual_seed(0)
    config = Seq2SeqTransformerConfig(vocab_size=64, d_model=64, encoder_layers=2, decoder_layers=2, dropout=0.0,
                                      encoder_attention_heads=2, decoder_attention_heads=8, encoder_ffn_dim=128,
                                      decoder_ffn_dim=128, max_position_embeddings=32)
    model = Seq2SeqTransformerForConditionalGeneration(config).eval()
    tokenizer = synthetic_tokenizer(64)
    translator = ctranslate2.Translator(export_to_ctranslate2(model, tokenizer, tmp_path / "ct2"), device="cpu",
                                        intra_threads=1)
    generator = torch.Generator().manual_seed(1)
    for length in (5, 200):
        source = torch.randint(4, 64, (length,), generator=generator).tolist() + [2]
        target = torch.randint(4, 64, (6,), generator=generator).tolist()
        torch.testing.assert_close(ct2_log_probs(translator, tokenizer, source, target, max_input_length=0),
                                   our_log_probs(model, source, target), rtol=0, atol=1e-4)
    with pytest.raises(RuntimeError, match=f"No position encodings are defined for positions >= {EXPORTED_POSITIONS}"):
        translator.score_batch([["t5"] * (EXPORTED_POSITIONS + 1)], [["t6"]], max_input_length=0)


def test_a_model_ending_with_another_token_than_its_tokenizer_is_not_exported(tmp_path, caplog):
    """CTranslate2's config holds one end token, the tokenizer's: a model that ends with another is refused, and one
    that also ends with others is exported with a warning naming `end_token`, which then gives our translation."""
    from modeling_seq2seq import Seq2SeqTransformerConfig
    from modeling_seq2seq.export import export_to_ctranslate2

    torch.manual_seed(0)
    config = Seq2SeqTransformerConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, dropout=0.0,
                                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, output_bias=True, eos_token_id=[2, 7])
    model = Seq2SeqTransformerForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.bias[7] = 6.0
    model.generation_config.eos_token_id = [2, 7]
    tokenizer = synthetic_tokenizer(64)
    with caplog.at_level("WARNING"):
        folder = export_to_ctranslate2(model, tokenizer, tmp_path / "ct2")
    assert "stops at '</s>' only, unless translate_batch(..., end_token=['</s>', 't7'])" in caplog.text
    expected = model.generate(torch.tensor([[5, 9, 17, 2]]), max_new_tokens=8, num_beams=1).tolist()[0]
    assert expected == [1, 7]
    result = ctranslate2.Translator(folder, device="cpu", intra_threads=1).translate_batch(
        [["t5", "t9", "t17", "</s>"]], beam_size=1, max_decoding_length=8, min_decoding_length=0,
        end_token=["</s>", "t7"], return_end_token=True)
    assert tokenizer.convert_tokens_to_ids(result[0].hypotheses[0]) == [7]

    model.config.eos_token_id = model.generation_config.eos_token_id = 7
    with pytest.raises(ValueError, match=r"ends sentences with token ids \[7\], its tokenizer with 2 \('</s>'\)"):
        export_to_ctranslate2(model, tokenizer, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_each_token_keeps_its_id_when_the_tokenizers_ids_skip_one(saved_model, tmp_path):
    """CTranslate2 numbers a vocabulary by position: a tokenizer whose ids skip a number (a hand-edited vocabulary)
    had every later token exported one place off, and CTranslate2 translated into other tokens without a word. Each
    token now sits at its id and the unused row gets a name of its own; an id past the model's rows is refused."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    model, folder = saved_model

    def edited(remove: str, add: dict):
        spec = json.loads(synthetic_tokenizer(VOCAB).backend_tokenizer.to_str())
        del spec["model"]["vocab"][remove]
        spec["model"]["vocab"].update(add)
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="<pad>",
                                       eos_token="</s>", unk_token="<unk>")

    tokenizer = edited("t150", {})
    shutil.copytree(folder, tmp_path / "model")
    save_tokenizer(tokenizer, tmp_path / "model")
    out = Path(export_saved_model(tmp_path / "model", tmp_path / "ct2"))
    vocabulary = json.loads((out / "shared_vocabulary.json").read_text())
    assert len(vocabulary) == VOCAB and vocabulary[149:152] == ["t149", "<extra_150>", "t151"]
    translator = ctranslate2.Translator(str(out), device="cpu", intra_threads=1)
    for seed in (0, 1):
        ids, mask, lengths = sources(seed)
        ids[ids == 150] = 151  # no word of the tokenizer's spells it
        for num_beams in (1, 4):
            batch = [[vocabulary[i] for i in row[:n]] for row, n in zip(ids.tolist(), lengths)]
            results = translator.translate_batch(batch, beam_size=num_beams, length_penalty=0.6 if num_beams > 1 else 1,
                                                 max_decoding_length=NEW_TOKENS, min_decoding_length=0)
            exported = [[tokenizer.convert_tokens_to_ids(t) if t in tokenizer.get_vocab() else vocabulary.index(t)
                         for t in r.hypotheses[0]] for r in results]
            assert exported == ours_ids(model, ids, mask, num_beams), (seed, num_beams)
    save_tokenizer(edited("t150", {f"t{VOCAB}": VOCAB}), tmp_path / "model")  # as many tokens as rows, one past them
    with pytest.raises(ValueError, match=re.escape(f"its tokenizer has {VOCAB} tokens (ids up to {VOCAB}), but the model "
                                                   f"only {VOCAB}")):
        export_saved_model(tmp_path / "model", tmp_path / "ct2-past")
