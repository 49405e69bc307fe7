"""The shared BPE tokenizer: special ids, eos handling, Unicode round trip, portable saving."""

import io
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from modeling_seq2seq import tokenization
from modeling_seq2seq.data import builtin_task
from modeling_seq2seq.tokenization import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    UNK_TOKEN_ID,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
    train_tokenizer_on_pairs,
)

CORPUS = [
    "the cat sat on the mat",
    "die Katze saß auf der Matte",
    "thirty-four",
    "vierunddreißig",
    "one hundred and twelve",
    "einhundertzwölf",
    "le garçon va à l'école",
    "Ça va très bien, merci",
    "Straße, Größe, Übung, Ärger",
] * 20

UNICODE_CASES = [
    "vierunddreißig",
    "garçon ç",
    "Ça va? Très bien!",
    "Straße Größe Übung Ärger",
    "日本語のテキスト",  # unseen script: byte fallback
    "😀 👍🏽 🇩🇪 emoji",
    "Ελληνικά και русский",
    "mixed: 中文 English Deutsch ß",
    "  leading, double  and trailing spaces  ",
    "tab\tand\nnewline\r\n",
    "control \x00\x07\x1b chars",
    "e\u0301 (decomposed accent, not normalised)",
    "",
    " ",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def builtin_tok():
    return train_tokenizer_on_pairs(builtin_task()["train"], vocab_size=1000)


def test_special_token_ids_match_model_config(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, UNK_TOKEN_ID) == (0, 1, 2, 3)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]
    assert tok.padding_side == "right"
    assert tok.model_max_length == 1024
    assert len(tok) <= 400


def test_source_gets_eos_and_no_bos(tok):
    ids = tok("the cat sat")["input_ids"]
    assert ids[-1] == EOS_TOKEN_ID
    assert EOS_TOKEN_ID not in ids[:-1] and BOS_TOKEN_ID not in ids


def test_text_target_uses_same_vocabulary_and_ends_with_eos(tok):
    enc = tok(["thirty-four"], text_target=["vierunddreißig"])
    assert enc["labels"][0] == tok("vierunddreißig")["input_ids"]
    assert enc["labels"][0][-1] == EOS_TOKEN_ID
    assert enc["input_ids"][0] == tok("thirty-four")["input_ids"]


def test_padding_is_on_the_right(tok):
    enc = tok(["the cat", "the cat sat on the mat"], padding=True)
    short = enc["input_ids"][0]
    n = sum(enc["attention_mask"][0])
    assert short[n - 1] == EOS_TOKEN_ID and set(short[n:]) == {PAD_TOKEN_ID}


@pytest.mark.parametrize("text", UNICODE_CASES)
def test_unicode_round_trip_without_unk(tok, text):
    ids = tok(text)["input_ids"]
    assert UNK_TOKEN_ID not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_unseen_characters_fall_back_to_bytes(tok):
    tokens = tok.convert_ids_to_tokens(tok("😀")["input_ids"])
    assert tokens[-1] == "</s>"
    assert [t for t in tokens if t.startswith("<0x")] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_seen_words_become_few_tokens(tok):
    # "vierunddreißig" occurs 20 times in the corpus: BPE should merge it well beyond characters
    assert len(tok("vierunddreißig")["input_ids"]) <= 4


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",)), max_size=40))
def test_round_trip_property(tok, text):
    ids = tok(text)["input_ids"]
    assert UNK_TOKEN_ID not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_special_token_strings_in_text_are_plain_text(tok):
    text = "a </s> b <pad> <s> <unk>"
    ids = tok(text)["input_ids"]
    assert ids.count(EOS_TOKEN_ID) == 1 and ids[-1] == EOS_TOKEN_ID
    assert not {PAD_TOKEN_ID, BOS_TOKEN_ID, UNK_TOKEN_ID} & set(ids)
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_documented_limitation_space_mark_decodes_as_space(tok):
    assert tok.decode(tok("a\u2581b")["input_ids"], skip_special_tokens=True) == "a b"


def test_builtin_task_vocabulary(builtin_tok):
    data = builtin_task()
    assert len(builtin_tok) <= 1000
    for split in ("validation", "test"):
        for row in data[split]:
            for text in (row["source"], row["target"]):
                ids = builtin_tok(text)["input_ids"]
                assert builtin_tok.decode(ids, skip_special_tokens=True) == text
                assert len(ids) <= 16  # even "neuntausendneunhundertneunundneunzig" is a few pieces
    # test-set words are spelt with the training alphabet: no byte fallback needed
    tokens = builtin_tok.convert_ids_to_tokens(builtin_tok(list(data["test"]["target"]))["input_ids"][0])
    assert not any(t.startswith("<0x") for t in tokens)


def test_vocab_size_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_no_texts_is_rejected():
    with pytest.raises(ValueError, match="no texts"):
        train_tokenizer([], vocab_size=400)


def test_save_writes_portable_config_and_reloads(tok, tmp_path):
    out = tmp_path / "tok"
    save_tokenizer(tok, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "TokenizersBackend" not in (out / "tokenizer_config.json").read_text()
    assert not isinstance(config.get("extra_special_tokens"), list)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]  # no temp left

    texts = ["thirty-four", "Straße 😀", "a </s> b"]
    for loaded in (AutoTokenizer.from_pretrained(out), load_tokenizer(out), load_tokenizer(out / "tokenizer.json")):
        assert loaded(texts)["input_ids"] == tok(texts)["input_ids"]
        assert loaded(text_target=texts)["input_ids"] == tok(text_target=texts)["input_ids"]
        assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
        assert loaded.padding_side == "right" and loaded.model_max_length == 1024
    # Saved again once loaded (a training output, the Hub folder): transformers 5.x writes its load settings back.
    save_tokenizer(load_tokenizer(out), tmp_path / "again")
    again = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & again.keys() and again["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_list_valued_extra_special_tokens_move_to_additional():
    config = {"tokenizer_class": "TokenizersBackend", "extra_special_tokens": ["<2de>", "<2fr>"]}
    fixed = tokenization._portable_tokenizer_config(config)
    assert fixed == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "additional_special_tokens": ["<2de>", "<2fr>"],
        "model_input_names": ["input_ids", "attention_mask"],  # else 4.57 adds token_type_ids that generate rejects
    }


def test_save_with_extra_special_tokens_reloads(tmp_path):
    tok = train_tokenizer(CORPUS, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<2de>"]})
    save_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["additional_special_tokens"] == ["<2de>"] and "extra_special_tokens" not in config
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert "<2de>" in loaded.all_special_tokens
    assert loaded.convert_tokens_to_ids("<2de>") == tok.convert_tokens_to_ids("<2de>")
    assert loaded("<2de> the cat")["input_ids"] == tok("<2de> the cat")["input_ids"]


def test_failed_save_keeps_previous_files(tok, tmp_path, monkeypatch):
    save_tokenizer(tok, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = train_tokenizer(CORPUS[:9] * 3, vocab_size=300)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(other), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_tokenizer(other, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # intact, no temp folder left


def test_save_leaves_other_files_alone(tok, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    save_tokenizer(tok, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"


def test_load_errors_name_the_path(tok, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_tokenizer(empty)
    ours_without_vocabulary = tmp_path / "ours"  # our config names the class that needs tokenizer.json
    ours_without_vocabulary.mkdir()
    (ours_without_vocabulary / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_tokenizer(ours_without_vocabulary)
    # A folder whose config asks for its own code is refused without asking (a prompt would read translate.py's
    # input) and without running it.
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "FooTokenizer", "auto_map": {"AutoTokenizer": ["tok_foo.FooTokenizer", None]}}))
    (remote / "tok_foo.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    stdin = sys.stdin
    sys.stdin = io.StringIO("y\n")
    try:
        with pytest.raises(ValueError, match=f"could not load the FooTokenizer saved in {remote}"):
            load_tokenizer(remote)
    finally:
        sys.stdin = stdin
    assert not (tmp_path / "ran").exists()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match=f"{corrupt / 'tokenizer.json'} is corrupt"):
        load_tokenizer(corrupt)
    (corrupt / "tokenizer.json").write_text('{"a": 1}')  # tokenizers' error points into JSON that is fine
    with pytest.raises(ValueError, match=f"{corrupt / 'tokenizer.json'} is valid JSON but not a tokenizers file"):
        load_tokenizer(corrupt)
    good = (tmp_path / "good.json")
    tok.backend_tokenizer.save(str(good))
    (corrupt / "tokenizer.json").write_bytes(b"\xef\xbb\xbf" + good.read_bytes())
    with pytest.raises(ValueError, match=f"{corrupt / 'tokenizer.json'} starts with a UTF-8 byte order mark"):
        load_tokenizer(corrupt)



@pytest.mark.parametrize("limit", [0, -5])
def test_a_length_limit_that_is_not_above_zero_is_refused(tok, tmp_path, limit):
    """model_max_length 0 would truncate every input to nothing."""
    save_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": limit}))
    with pytest.raises(ValueError, match=rf"'model_max_length' must be a number above 0, got {limit}"):
        load_tokenizer(tmp_path)


def test_text_that_spells_a_byte_token_stays_text():
    """BPE learned the piece "<0x41>" from text that often holds it (a hex dump, a log) and the vocabulary gave it the
    byte token's id, so the text decoded as "A". Such pieces, and those built on them, are no longer learned."""
    import random

    random.seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    corpus = ["".join(random.choices(letters, k=3)) + random.choice(["<0x41>", "<0x0A>"]) + "".join(random.choices(letters, k=3))
              for _ in range(3000)]
    trained = train_tokenizer(corpus, vocab_size=340)
    for text in corpus[:200] + ["q<0x41>z", "<0x41>", "x<0x0A>y"]:
        assert trained.decode(trained(text)["input_ids"], skip_special_tokens=True) == text


def sentencepiece_marian_tokenizer(folder):
    """OPUS-MT's kind of tokenizer: a MarianTokenizer over a SentencePiece model trained here on CORPUS-like text."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import MarianTokenizer

    corpus = folder / "corpus.txt"
    corpus.write_text("".join(f"file {w} not found, cannot open the {w} folder\n" for w in CORPUS))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=60, bos_id=-1,
                                   eos_id=0, unk_id=1, pad_id=-1, num_threads=1, minloglevel=2)
    processor = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    (folder / "vocab.json").write_text(json.dumps({**vocab, "<pad>": len(vocab)}))
    return MarianTokenizer(source_spm=str(folder / "sp.model"), target_spm=str(folder / "sp.model"),
                           vocab=str(folder / "vocab.json"))


def test_an_opus_mt_sentencepiece_tokenizer_loads_and_saves_as_its_own_class(tmp_path):
    """OPUS-MT's MarianTokenizer keeps its vocabulary in SentencePiece files, without a tokenizer.json: a model
    converted by convert_marian.py could not be used by translate.py, evaluate.py or finetune_trainer.py, whose loader
    demanded one. It now loads through transformers' own class, and saving keeps that class (it was renamed
    PreTrainedTokenizerFast, which cannot load SentencePiece files)."""
    from transformers import MarianTokenizer

    marian = sentencepiece_marian_tokenizer(tmp_path)
    marian.save_pretrained(tmp_path / "opus")
    assert not (tmp_path / "opus" / "tokenizer.json").exists()
    texts = ["file not found", "cannot open the Katze folder"]
    for folder in (tmp_path / "opus", tmp_path / "saved"):
        loaded = load_tokenizer(folder)
        assert type(loaded) is MarianTokenizer and loaded(texts)["input_ids"] == marian(texts)["input_ids"]
        save_tokenizer(loaded, tmp_path / "saved")
        assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["tokenizer_class"] == "MarianTokenizer"


def test_an_opus_mt_folder_without_its_sentencepiece_file_names_the_file(tmp_path):
    """transformers' MarianTokenizer without its source.spm fails with "expected str, bytes or os.PathLike object,
    not NoneType"; the loader's message names the folder and the file it lacks."""
    sentencepiece_marian_tokenizer(tmp_path).save_pretrained(tmp_path / "opus")
    (tmp_path / "opus" / "source.spm").unlink()
    with pytest.raises(ValueError) as error:
        load_tokenizer(tmp_path / "opus")
    message = str(error.value)
    assert f"could not load the MarianTokenizer saved in {tmp_path / 'opus'}" in message
    lacks = message.split(" lacks ")[1].rstrip(")").split(", ")
    assert "source.spm" in lacks and "target.spm" not in lacks and "vocab.json" not in lacks


def test_a_converted_opus_mt_folder_translates_with_our_scripts_as_marian_does(tmp_path):
    """The OPUS-MT path end to end: a tiny MarianMTModel with a SentencePiece MarianTokenizer (random weights, a
    vocabulary trained here) converted by convert_marian.py, then translated by translate.py: the same text as the
    MarianMTModel's own beam search. Before the eleventh session translate.py refused the folder (no tokenizer.json)."""
    import runpy

    import torch
    from transformers import MarianConfig, MarianMTModel

    marian_tokenizer = sentencepiece_marian_tokenizer(tmp_path)
    size = len(marian_tokenizer.get_vocab())
    torch.manual_seed(0)
    marian = MarianMTModel(MarianConfig(
        vocab_size=size, decoder_vocab_size=size, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=128, pad_token_id=size - 1, eos_token_id=0, decoder_start_token_id=size - 1,
        forced_eos_token_id=0)).eval()
    marian.save_pretrained(tmp_path / "opus")
    marian_tokenizer.save_pretrained(tmp_path / "opus")
    root = Path(__file__).resolve().parents[1] / "scripts"
    convert = runpy.run_path(str(root / "convert_marian.py"))["main"]
    assert convert(["--to", "ours", "--input", str(tmp_path / "opus"), "--output_dir", str(tmp_path / "ours")]) == 0
    sources = ["file not found", "cannot open the Katze folder", "Straße"]
    (tmp_path / "in.txt").write_text("".join(line + "\n" for line in sources))
    translate = runpy.run_path(str(root / "translate.py"))["main"]
    assert translate(["--model", str(tmp_path / "ours"), "--input", str(tmp_path / "in.txt"), "--output",
                      str(tmp_path / "out.txt"), "--num_beams", "4", "--length_penalty", "0.6", "--batch_size", "1"]) == 0
    expected = []
    for line in sources:
        ids = marian_tokenizer([line], return_tensors="pt")["input_ids"]
        generated = marian.generate(input_ids=ids, num_beams=4, length_penalty=0.6, max_length=ids.shape[1] + 51)
        expected.append(marian_tokenizer.decode(generated[0], skip_special_tokens=True).strip())
    assert (tmp_path / "out.txt").read_text().split("\n")[:-1] == expected and all(expected), expected


def test_train_tokenizer_script(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_tokenizer.py"
    spec = importlib.util.spec_from_file_location("train_tokenizer_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = tmp_path / "train.tsv"
    data.write_text("en\tde\n" + "".join(f"{s}\t{t}\n" for s, t in zip(CORPUS[0::2], CORPUS[1::2])), encoding="utf-8")
    out = tmp_path / "out"
    assert module.main(["--train_file", str(data), "--vocab_size", "400", "--output_dir", str(out)]) == 0
    loaded = AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert loaded.decode(loaded("die Katze saß")["input_ids"], skip_special_tokens=True) == "die Katze saß"
    # A folder that already holds a tokenizer (a model's folder, say) keeps it unless --overwrite is passed.
    saved = (out / "tokenizer.json").read_bytes()
    args = ["--train_file", str(data), "--vocab_size", "300", "--output_dir", str(out)]
    assert module.main(args) == 1
    assert (out / "tokenizer.json").read_bytes() == saved
    assert module.main(args + ["--overwrite"]) == 0
    assert (out / "tokenizer.json").read_bytes() != saved
    # A save that was killed leaves its staging folder: no file of the user's, it is removed (it blocked --overwrite).
    (out / ".tokenizer-tmp-abc_1234").mkdir()
    (out / ".tokenizer-tmp-abc_1234" / "tokenizer.json").write_text("{}")
    assert module.main(args + ["--overwrite"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    # Look-alikes are the user's: kept, and they count as the folder's content (the first was deleted without
    # --overwrite, the second made the folder count as empty).
    for name, content in ((".tokenizer-tmp-notes", "mine.txt"), (".tokenizer-tmp-abcd1234", "mine.txt")):
        (out / name).mkdir()
        (out / name / content).write_text("mine")
        assert module.main(args + ["--overwrite"]) == 1
        assert (out / name / content).read_text() == "mine"
        shutil.rmtree(out / name)
    (out / ".tokenizer-tmp-abcd1234").write_text("a file")
    assert module.main(args) == 1 and (out / ".tokenizer-tmp-abcd1234").read_text() == "a file"
    # --overwrite replaces an earlier tokenizer alone: beside a model's weights a new vocabulary silently broke the
    # model (it translated into nothing), and the user's other files stayed mixed with it.
    model_folder = tmp_path / "model"
    model_folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_folder / name).write_bytes((out / name).read_bytes())
    (model_folder / "config.json").write_text('{"vocab_size": 500}')
    (model_folder / "model.safetensors").write_bytes(b"weights")
    before = {path.name: path.read_bytes() for path in model_folder.iterdir()}
    assert module.main(["--train_file", str(data), "--vocab_size", "300", "--output_dir", str(model_folder), "--overwrite"]) == 1
    assert {path.name: path.read_bytes() for path in model_folder.iterdir()} == before
    assert module.main(["--train_file", str(tmp_path / "missing.tsv"), "--vocab_size", "300", "--output_dir", str(tmp_path / "o2")]) == 1
    # Any other file of the user's there too (a SentencePiece model's tokenizer_config.json, notes), and before training.
    users = tmp_path / "users"
    users.mkdir()
    (users / "tokenizer_config.json").write_text('{"mine": true}')
    assert module.main(["--train_file", str(data), "--vocab_size", "300", "--output_dir", str(users)]) == 1
    assert (users / "tokenizer_config.json").read_text() == '{"mine": true}' and len(list(users.iterdir())) == 1
    # A folder that cannot be made fails before the training too (it failed after it).
    trained = []
    module.train_tokenizer_from_data = lambda *args, **kwargs: trained.append(args)
    assert module.main(["--train_file", str(data), "--vocab_size", "300", "--output_dir", str(data / "sub")]) == 1
    assert trained == []
    for bad in (["--vocab_size", str(2**40)], ["--vocab_size", "100"], ["--dataset_config_name", "de-en"],
                ["--output_dir", str(data)]):
        with pytest.raises(SystemExit):
            module.main(["--train_file", str(data), "--vocab_size", "300", "--output_dir", str(tmp_path / "o3"), *bad])
