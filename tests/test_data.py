"""Data layer: the built-in task, file loading and its errors, tokenisation, token batching, collation."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
from pathlib import Path
import logging
import re
import tracemalloc

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_seq2seq.data import (
    DataFileError,
    Seq2SeqCollator,
    TokenBatchSampler,
    builtin_task,
    load_parallel_data,
    read_parallel_file,
    token_lengths,
    tokenize_pairs,
)
from modeling_seq2seq.tokenization import train_tokenizer

PAIRS = [
    ("the cat", "die Katze"),
    ('He said "hi", then left', "Er sagte „hallo“, dann ging er"),
    ("Straße", "street ç 😀"),
    ("thirty-four", "vierunddreißig"),
]


def write(path, text: str | bytes):
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def jsonl(pairs, layout="translation"):
    rows = [{"translation": {"en": s, "de": t}} if layout == "translation" else {"en": s, "de": t} for s, t in pairs]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def rows_of(ds):
    return list(zip(ds["source"], ds["target"]))


@pytest.fixture(scope="module")
def builtin():
    return builtin_task()


# ------------------------------------------------------------------------------------------------
# built-in task


def test_builtin_splits_sizes_and_columns(builtin):
    assert set(builtin) == {"train", "validation", "test"}
    assert {k: len(v) for k, v in builtin.items()} == {"train": 9000, "validation": 500, "test": 500}
    for ds in builtin.values():
        assert ds.column_names == ["source", "target"]


def test_builtin_is_deterministic_and_seeded(builtin):
    again = builtin_task()
    for split in builtin:
        assert rows_of(again[split]) == rows_of(builtin[split])
    other = builtin_task(seed=1)
    assert set(other["test"]["source"]) != set(builtin["test"]["source"])


def test_builtin_splits_are_disjoint_and_cover_0_to_9999(builtin):
    sets = {k: set(v["source"]) for k, v in builtin.items()}
    assert sets["train"].isdisjoint(sets["test"])
    assert sets["train"].isdisjoint(sets["validation"])
    assert sets["validation"].isdisjoint(sets["test"])
    assert sum(len(s) for s in sets.values()) == 10_000  # no duplicate phrasing inside a split either
    from num2words import num2words

    assert set().union(*sets.values()) == {num2words(n, lang="en") for n in range(10_000)}


def test_builtin_translations_reorder_units_and_tens(builtin):
    pairs = dict(rows_of(builtin["train"]) + rows_of(builtin["validation"]) + rows_of(builtin["test"]))
    assert pairs["thirty-four"] == "vierunddreißig"
    assert pairs["one hundred and twelve"] == "einhundertzwölf"
    assert pairs["one thousand, two hundred and thirty-four"] == "eintausendzweihundertvierunddreißig"
    assert pairs["nine thousand, nine hundred and ninety-nine"] == "neuntausendneunhundertneunundneunzig"
    assert pairs["zero"] == "null"


def test_no_data_means_builtin_task(builtin):
    data = load_parallel_data()
    assert rows_of(data["test"]) == rows_of(builtin["test"])
    with pytest.raises(ValueError, match="built-in task is en->de"):
        load_parallel_data(source_lang="fr", target_lang="de")


# ------------------------------------------------------------------------------------------------
# local files: the accepted layouts


def test_all_layouts_give_the_same_pairs(tmp_path):
    files = {
        "a.jsonl": jsonl(PAIRS),
        "b.jsonl": jsonl(PAIRS, layout="flat"),
        "c.json": json.dumps([{"translation": {"en": s, "de": t}} for s, t in PAIRS], ensure_ascii=False, indent=2),
        "d.json": jsonl(PAIRS),  # JSON Lines in a .json file, as datasets' json loader accepts
        "e.csv": "id,en,de\n"
        + "".join(
            f'{i},"{s.replace(chr(34), 2 * chr(34))}","{t.replace(chr(34), 2 * chr(34))}"\n'
            for i, (s, t) in enumerate(PAIRS)
        ),
        "f.tsv": "de\ten\n" + "".join(f"{t}\t{s}\n" for s, t in PAIRS),  # raw quotes, columns in any order
    }
    for name, text in files.items():
        ds = read_parallel_file(write(tmp_path / name, text))
        assert rows_of(ds) == PAIRS, name
        assert ds.column_names == ["source", "target"]


def test_splits_and_language_direction(tmp_path):
    train = write(tmp_path / "train.jsonl", jsonl(PAIRS))
    valid = write(tmp_path / "valid.tsv", "en\tde\nx\ty\n")
    data = load_parallel_data(train_file=train, validation_file=valid, source_lang="de", target_lang="en")
    assert set(data) == {"train", "validation"}
    assert rows_of(data["train"]) == [(t, s) for s, t in PAIRS]
    assert rows_of(data["validation"]) == [("y", "x")]


def test_two_line_aligned_text_files_are_read_by_their_prefix(tmp_path, caplog):
    """The Moses layout of OPUS and WMT downloads: `P.en` and `P.de`, line N of one translating line N of the other,
    with tabs, quotes, CRLF endings and a byte order mark kept out of the text; empty lines are skipped pairs."""
    prefix = tmp_path / "corpus.de-en"
    write(tmp_path / "corpus.de-en.en", "\ufeff" + "".join(f"{s}\r\n" for s, _ in PAIRS) + "a\tb\n\nlast, no newline")
    write(tmp_path / "corpus.de-en.de", "".join(f"{t}\n" for _, t in PAIRS) + "x \"y\"\nnur deutsch\nletzte")
    with caplog.at_level(logging.WARNING):
        ds = read_parallel_file(prefix)
    assert rows_of(ds) == PAIRS + [("a\tb", 'x "y"'), ("last, no newline", "letzte")]
    assert f"{prefix}.{{en,de}}: skipped 1 pair(s) with an empty source or target (line {len(PAIRS) + 2})" in caplog.text
    both = load_parallel_data(train_file=prefix, test_file=prefix, source_lang="de", target_lang="en")
    assert rows_of(both["test"])[:len(PAIRS)] == [(t, s) for s, t in PAIRS]
    with pytest.raises(FileNotFoundError, match=re.escape(f"{prefix}.fr")):
        read_parallel_file(prefix, "en", "fr")


def test_line_aligned_files_of_different_lengths_name_the_line_where_one_ends(tmp_path):
    prefix = tmp_path / "train"
    write(tmp_path / "train.en", "a\nb\nc\n")
    write(tmp_path / "train.de", "x\ny\n")
    with pytest.raises(DataFileError, match=re.escape(f"{prefix}.de, line 3: the file ends here, but {prefix}.en goes on")):
        read_parallel_file(prefix)
    write(tmp_path / "train.de", "x\ny\nz\nw\n")
    with pytest.raises(DataFileError, match=re.escape(f"{prefix}.en, line 4: the file ends here, but {prefix}.de goes on")):
        read_parallel_file(prefix)
    # Lines ended by carriage returns alone (old Mac files) read as one line: refused, not one pair made of all. Lines
    # ended by "\r\r\n" (a "\r\n" written in text mode on Windows) and a stray one further on are read as before.
    write(tmp_path / "train.en", "a\nb\nc\n")
    write(tmp_path / "train.de", "x\ry\rz\r")
    with pytest.raises(DataFileError, match=re.escape(f"{prefix}.de, line 1: contains a carriage return inside the "
                                                      "line: are its lines ended by carriage returns alone")):
        read_parallel_file(prefix)
    write(tmp_path / "train.de", "x\r\r\ny\rw\r\r\nz \r\n")
    assert rows_of(read_parallel_file(prefix)) == [("a", "x"), ("b", "y\rw"), ("c", "z")]
    write(tmp_path / "train.de", b"x\n\xff\nz\n")
    check_error(tmp_path / "train.de", re.escape(f"give the prefix {prefix} of two line-aligned plain-text files"))
    with pytest.raises(DataFileError, match=re.escape(f"{prefix}.de, line 2: not valid UTF-8")):
        read_parallel_file(prefix)
    check_error(write(tmp_path / "train.txt", "a\n"), r"unsupported file type '\.txt'", r"prefix P of two line-aligned")


def test_whitespace_is_stripped_and_bom_accepted(tmp_path):
    f = write(tmp_path / "a.tsv", "\ufeffen\tde\n  a b  \t c \n")
    assert rows_of(read_parallel_file(f)) == [("a b", "c")]


def test_files_and_dataset_name_together_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="either dataset_name"):
        load_parallel_data(dataset_name="wmt14", train_file=tmp_path / "x.jsonl")


# ------------------------------------------------------------------------------------------------
# local files: every error names the file and the line


def check_error(path, *needles, exc=DataFileError):
    with pytest.raises(exc) as info:
        read_parallel_file(path)
    message = str(info.value)
    assert str(path) in message, message
    for needle in needles:
        assert re.search(needle, message), (needle, message)
    return message


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.jsonl"))):
        load_parallel_data(train_file=tmp_path / "missing.jsonl")


def test_missing_language_field_jsonl(tmp_path):
    f = write(tmp_path / "a.jsonl", jsonl(PAIRS[:2]) + json.dumps({"translation": {"en": "x", "fr": "y"}}) + "\n")
    check_error(f, r"line 3\b", r"missing language field\(s\) \['de'\]", r"keys found: \['en', 'fr'\]")


def test_missing_language_column_csv_names_columns_found(tmp_path):
    f = write(tmp_path / "a.csv", "english,german\nx,y\n")
    check_error(f, r"line 1\b", r"missing language column\(s\) \['en', 'de'\]", r"found: \['english', 'german'\]")


def test_non_utf8_bytes(tmp_path):
    f = write(tmp_path / "a.tsv", b"en\tde\na\tb\n" + "caf\u00e9\tx\n".encode("latin-1"))
    check_error(f, r"line 3\b", "not valid UTF-8", r"byte 4")


def test_malformed_json_line(tmp_path):
    f = write(tmp_path / "a.jsonl", jsonl(PAIRS[:1]) + '{"translation": {"en": "x", "de": }\n')
    check_error(f, r"line 2\b", "malformed JSON")
    unclosed = '{"translation": {"en": "x", "de": "y"}\n'  # the error is past the line's end, not in column 1
    g = write(tmp_path / "b.jsonl", jsonl(PAIRS[:1]) + unclosed)
    check_error(g, r"line 2\b", f"at column {len(unclosed)}\\)")


def test_a_key_given_twice_is_named_by_file_and_line(tmp_path):
    """json keeps the last of two values silently (a duplicated CSV column or YAML key is refused already)."""
    f = write(tmp_path / "a.jsonl", jsonl(PAIRS[:1]) + '{"en": "a", "de": "b", "en": "c"}\n')
    check_error(f, r"line 2\b", "the key 'en' is given twice")
    g = write(tmp_path / "b.json", '[\n  {"en": "a", "de": "b"},\n  {"translation": {"de": "d", "en": "c", "de": "e"}}\n]\n')
    check_error(g, r"line 3\b", r"array item 2", "the key 'de' is given twice")


def test_a_lone_surrogate_escape_is_named_by_file_and_line(tmp_path):
    """JSON can spell half of an emoji ("\\ud83d"), which is no text: Arrow would fail without saying where."""
    f = write(tmp_path / "a.jsonl", jsonl(PAIRS[:2]) + '{"translation": {"en": "Nice \\ud83d", "de": "Sch\\u00f6n"}}\n')
    check_error(f, r"line 3\b", r"half of a surrogate pair \(a lone \\ud83d escape\)")


def test_utf16_text_is_named_as_such(tmp_path):
    f = write(tmp_path / "a.csv", "en,de\na,b\n".encode("utf-16"))
    check_error(f, "UTF-16 text", "save it as UTF-8")


def test_malformed_json_array(tmp_path):
    f = write(tmp_path / "a.json", '[\n  {"en": "a", "de": "b"},\n  {"en": "c" "de": "d"}\n]\n')
    check_error(f, r"line 3\b", "malformed JSON")
    g = write(tmp_path / "b.json", '[\n  {"en": "a", "de": "b"},\n  {"en": "c"}\n]\n')
    check_error(g, r"line 3\b", r"array item 2", r"missing language field")


def test_json_nested_too_deeply_is_named_by_line(tmp_path):
    """Python's JSON parser recurses: a line of 100,000 brackets raised a bare RecursionError."""
    deep = "[" * 100_000 + "]" * 100_000
    check_error(write(tmp_path / "a.jsonl", jsonl(PAIRS[:1]) + deep + "\n"), r"line 2\b", "nested too deeply")
    check_error(write(tmp_path / "b.json", '[\n  {"en": "a", "de": "b"},\n  ' + deep + "\n]\n"), r"line 3\b",
                r"array item 2", "nested too deeply")


def test_a_language_column_named_twice_in_the_header_is_refused(tmp_path):
    check_error(write(tmp_path / "a.csv", "en,de,en\na,b,c\n"), r"line 1\b", r"column\(s\) \['en'\] more than once")
    other = write(tmp_path / "b.tsv", "en\tde\tnote\tnote\na\tb\tx\ty\n")  # columns never read may repeat
    assert rows_of(read_parallel_file(other)) == [("a", "b")]


def test_non_string_value(tmp_path):
    f = write(tmp_path / "a.jsonl", jsonl(PAIRS[:1]) + '{"en": "x", "de": 42}\n')
    check_error(f, r"line 2\b", "'de' value must be a string")


def test_json_that_is_not_an_object(tmp_path):
    f = write(tmp_path / "a.jsonl", '["en", "de"]\n')
    check_error(f, r"line 1\b", "expected a JSON object")


def test_wrong_field_count_tsv(tmp_path):
    f = write(tmp_path / "a.tsv", "en\tde\na\tb\nc\td\te\n")
    check_error(f, r"line 3\b", "expected 2 fields", "found 3")


def test_malformed_csv_quoting(tmp_path):
    f = write(tmp_path / "a.csv", 'en,de\na,b\n"c"x,d\n')
    check_error(f, r"line 3\b", "malformed CSV")


def test_binary_file(tmp_path):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4
    check_error(write(tmp_path / "image.jsonl", png), r"line \d+", "binary file")
    check_error(write(tmp_path / "blob.tsv", os.urandom(4096).replace(b"\n", b"")), r"line 1\b", "binary file")


def test_huge_single_line_is_rejected_with_bounded_memory(tmp_path):
    f = tmp_path / "huge.jsonl"
    with open(f, "wb") as out:
        out.write(jsonl(PAIRS[:1]).encode())
        out.write(b'{"en": "' + b"a" * (30 << 20) + b'", "de": "b"}\n')  # a 30 MB line
    tracemalloc.start()
    try:
        check_error(f, r"line 2\b", "longer than 1,048,576 bytes")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak Python memory {peak / 2**20:.1f} MiB while rejecting a 30 MB line"


def test_unsupported_extension(tmp_path):
    check_error(write(tmp_path / "a.txt", "x\n"), "unsupported file type '.txt'")


def test_empty_pairs_are_skipped_with_a_warning(tmp_path, caplog):
    f = write(
        tmp_path / "a.jsonl",
        jsonl([("a", "b"), ("", "x"), ("c", "d"), ("y", "   ")])
        + '{"en": "e", "de": null}\n'
        + "\n"
        + jsonl([("f", "g")]),
    )
    with caplog.at_level(logging.WARNING, logger="modeling_seq2seq.data"):
        ds = read_parallel_file(f, max_bad_lines_shown=2)
    assert rows_of(ds) == [("a", "b"), ("c", "d"), ("f", "g")]
    message = " ".join(r.getMessage() for r in caplog.records)
    assert str(f) in message and "skipped 3 pair(s)" in message and "lines 2, 4 and 1 more" in message


def test_only_empty_pairs_is_an_error(tmp_path):
    check_error(write(tmp_path / "a.tsv", "en\tde\n\tx\n"), r"line 1\b", "no usable en-de pairs", "1 skipped")
    check_error(write(tmp_path / "b.jsonl", ""), "no usable", "no records")


# ------------------------------------------------------------------------------------------------
# Hub datasets (the real code path with load_dataset replaced: no network)


def test_hub_translation_layout(monkeypatch):
    raw = DatasetDict(
        {
            "train": Dataset.from_dict(
                {"translation": [{"de": t, "en": s} for s, t in PAIRS] + [{"de": "", "en": "x"}]}
            ),
            "validation": Dataset.from_dict({"translation": [{"de": "b", "en": "a"}]}),
        }
    )
    calls = []

    def fake_load_dataset(name, config=None):
        calls.append((name, config))
        return raw

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_parallel_data(dataset_name="wmt14", dataset_config_name="de-en")
    assert calls == [("wmt14", "de-en")]
    assert rows_of(data["train"]) == PAIRS  # the empty target was dropped
    assert rows_of(data["validation"]) == [("a", "b")]
    with pytest.raises(DataFileError, match=r"dataset 'wmt14', split 'train': missing language\(s\) \['fr'\]"):
        load_parallel_data(dataset_name="wmt14", dataset_config_name="de-en", source_lang="fr")


def test_hub_column_layout_and_split_alias(monkeypatch):
    raw = DatasetDict(
        {"train": Dataset.from_dict({"en": ["a"], "de": ["b"]}), "dev": Dataset.from_dict({"en": ["c"], "de": ["d"]})}
    )
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: raw)
    data = load_parallel_data(dataset_name="some/corpus")
    assert rows_of(data["validation"]) == [("c", "d")]
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, config=None: DatasetDict({"train": Dataset.from_dict({"x": ["a"]})})
    )
    with pytest.raises(DataFileError, match=r"dataset 'some/corpus', split 'train'.*columns found: \['x'\]"):
        load_parallel_data(dataset_name="some/corpus")


def test_a_dataset_with_values_that_are_no_text_is_named_by_split_and_row(monkeypatch):
    """A number where a sentence belongs failed inside `datasets.map` ('int' object has no attribute 'strip'), and a
    0 was taken as an empty side; named now as the data files name it."""
    import datasets

    for rows, message in [
        ({"en": ["a", "b", "c"], "de": ["x", "y", "z"], "id": [1, 2, 3]}, None),
        ({"en": ["a", "b", "c"], "de": [0, 1, 2]}, "split 'train', row 0: the 'de' value must be a string, got int 0"),
        ({"translation": [{"en": 4, "de": "x"}, {"en": 5, "de": "y"}]},
         "split 'train', row 0: the 'en' value must be a string, got int 4"),
    ]:
        raw = DatasetDict({"train": Dataset.from_dict(rows)})
        monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: raw)
        if message is None:
            assert rows_of(load_parallel_data(dataset_name="./local")["train"]) == [("a", "x"), ("b", "y"), ("c", "z")]
            continue
        with pytest.raises(DataFileError, match=re.escape(f"dataset './local', {message}")):
            load_parallel_data(dataset_name="./local")


def test_a_translation_column_is_read_by_its_type_not_its_first_row(monkeypatch, tmp_path):
    """A null first row was a hard error ('row 0: missing language(s)') where a null on any other row is skipped; a
    column of text where the language mapping belongs failed inside `datasets.map` ('str' object has no attribute
    'get'), naming nothing; the same language on both sides trained a copy task (local files refuse it); a file given
    as --dataset_name got datasets' "Couldn't find any data file"."""
    import datasets

    rows = [{"en": "one", "de": "eins"}, {"en": "two", "de": "zwei"}]
    for column, expected in [([None, *rows], [("one", "eins"), ("two", "zwei")]),
                             (['{"en": "a", "de": "b"}', "x"], "the 'translation' column holds Value('string')")]:
        raw = DatasetDict({"train": Dataset.from_dict({"translation": column})})
        monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: raw)
        if isinstance(expected, list):
            assert rows_of(load_parallel_data(dataset_name="./local")["train"]) == expected
        else:
            with pytest.raises(DataFileError, match=re.escape(f"dataset './local', split 'train': {expected}")):
                load_parallel_data(dataset_name="./local")
    # datasets' TranslationVariableLanguages: rows of {"language": [...], "translation": [...]} (every row was dropped).
    from datasets import Features, TranslationVariableLanguages

    variable = Features({"translation": TranslationVariableLanguages(languages=["de", "en", "fr"])})
    raw = DatasetDict({"train": Dataset.from_dict({"translation": [
        {"en": "one", "de": "eins", "fr": "un"}, {"en": "two", "de": "zwei"}]}, features=variable)})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: raw)
    assert rows_of(load_parallel_data(dataset_name="./local")["train"]) == [("one", "eins"), ("two", "zwei")]
    # A JSON Lines folder with one row of text among the mappings: the column's type allows anything, so each row is
    # checked and the bad one named.
    folder = tmp_path / "jsonl"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"translation": value}) + "\n" for value in (rows[0], "oops")))
    monkeypatch.undo()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataFileError, match=re.escape(f"dataset '{folder}', split 'train', row 1: 'translation' must map "
                                                      "language codes to text, got str 'oops'")):
        load_parallel_data(dataset_name=str(folder))
    with pytest.raises(ValueError, match=re.escape("source_lang and target_lang (--source_lang, --target_lang) are both 'en'")):
        load_parallel_data(dataset_name=str(folder), source_lang="en", target_lang="en")
    with pytest.raises(ValueError, match=re.escape(f"--dataset_name '{folder / 'train.jsonl'}' is a file, not a dataset "
                                                   "folder or Hub name: pass it as --train_file")):
        load_parallel_data(dataset_name=str(folder / "train.jsonl"))


def test_a_dataset_that_cannot_be_loaded_is_named_by_its_flags(monkeypatch, tmp_path):
    """Offline, a misspelt name or a builder without data files: datasets raises from deep inside, with no word of
    which flag asked for it."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"--dataset_name 'json': could not be loaded \(DatasetGenerationError"):
        load_parallel_data(dataset_name="json")
    with pytest.raises(ValueError, match=rf"--dataset_name '{tmp_path}/nowhere' --dataset_config_name 'de-en': could not"):
        load_parallel_data(dataset_name=str(tmp_path / "nowhere"), dataset_config_name="de-en")


def test_a_folder_saved_with_save_to_disk_loads_as_a_dataset_dict_and_a_bare_dataset_is_refused_clearly(tmp_path,
                                                                                                         caplog):
    """A DatasetDict saved with save_to_disk loads by its folder; a bare Dataset has no split names, and datasets'
    own advice ("Please use `load_from_disk`") is not one a train.py user can take."""
    dataset = Dataset.from_dict({"translation": [{"en": "one", "de": "eins"}, {"en": "two", "de": "zwei"}]})
    DatasetDict({"train": dataset}).save_to_disk(tmp_path / "dict")
    loaded = load_parallel_data(dataset_name=str(tmp_path / "dict"))
    assert rows_of(loaded["train"]) == [("one", "eins"), ("two", "zwei")]
    dataset.save_to_disk(tmp_path / "bare")
    message = (f"--dataset_name '{tmp_path / 'bare'}': the folder holds one Dataset saved with save_to_disk, which has "
               "no split names; save it as a DatasetDict instead")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_parallel_data(dataset_name=str(tmp_path / "bare"))
    # Its split names are its own (load_dataset guessed them from the file names, and merged a held-out split into
    # train): other splits are left out, with a warning, and two splits of the same role are refused.
    other = Dataset.from_dict({"translation": [{"en": "three", "de": "drei"}]})
    DatasetDict({"train": dataset, "heldout": other, "dev": other}).save_to_disk(tmp_path / "named")
    with caplog.at_level(logging.WARNING):
        loaded = load_parallel_data(dataset_name=str(tmp_path / "named"))
    assert sorted(loaded) == ["train", "validation"] and rows_of(loaded["train"]) == [("one", "eins"), ("two", "zwei")]
    assert f"dataset '{tmp_path / 'named'}': split 'heldout' is not used" in caplog.text
    DatasetDict({"train": dataset, "validation": other, "dev": other}).save_to_disk(tmp_path / "twice")
    with pytest.raises(DataFileError, match="the splits 'validation' and 'dev' are both its validation split"):
        load_parallel_data(dataset_name=str(tmp_path / "twice"))
    # A language that no row has (all null) is no usable pair at all, named by dataset and split: an error for the
    # training split, a warning for another (a blind test split), which is left out.
    blind = Dataset.from_dict({"en": ["a", "b"], "de": [None, None]})
    DatasetDict({"train": blind}).save_to_disk(tmp_path / "null")
    with pytest.raises(DataFileError, match=r"split 'train': no usable en-de pairs \(2 rows, every one with an empty"):
        load_parallel_data(dataset_name=str(tmp_path / "null"))
    DatasetDict({"train": dataset, "test": blind}).save_to_disk(tmp_path / "blind")
    with caplog.at_level(logging.WARNING):
        assert sorted(load_parallel_data(dataset_name=str(tmp_path / "blind"))) == ["train"]
    assert "split 'test': no usable en-de pairs (2 rows, every one with an empty or null source or target): the " \
        "split is left out" in caplog.text
    with pytest.raises(ValueError, match="^--dataset_name .* saved with save_to_disk, which has no configurations"):
        load_parallel_data(dataset_name=str(tmp_path / "blind"), dataset_config_name="de-en")


# ------------------------------------------------------------------------------------------------
# tokenisation


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([w for pair in PAIRS for w in pair] * 10, vocab_size=300)


def test_tokenize_pairs_adds_ids_and_filters_long_pairs(tok):
    ds = Dataset.from_dict({"source": [s for s, _ in PAIRS], "target": [t for _, t in PAIRS]})
    src_len = [len(tok(s)["input_ids"]) for s, _ in PAIRS]
    tgt_len = [len(tok(t)["input_ids"]) for _, t in PAIRS]
    max_src, max_tgt = sorted(src_len)[2], sorted(tgt_len)[2]
    kept = [i for i in range(len(PAIRS)) if src_len[i] <= max_src and tgt_len[i] <= max_tgt]
    assert 0 < len(kept) < len(PAIRS)  # the test exercises filtering
    out, n_filtered = tokenize_pairs(ds, tok, max_src, max_tgt)
    assert n_filtered == len(PAIRS) - len(kept)
    assert rows_of(out) == [PAIRS[i] for i in kept]
    for row in out:
        assert row["input_ids"] == tok(row["source"])["input_ids"]
        assert row["labels"] == tok(text_target=row["target"])["input_ids"]
        assert row["labels"][-1] == tok.eos_token_id and row["input_ids"][-1] == tok.eos_token_id
    s, t = token_lengths(out)
    assert s.tolist() == [len(x) for x in out["input_ids"]] and t.tolist() == [len(x) for x in out["labels"]]
    sub = out.select([len(out) - 1])  # an indices mapping: lengths must follow it
    assert token_lengths(sub)[0].tolist() == [len(out[-1]["input_ids"])]


def test_the_fingerprint_of_tokenized_pairs_sees_ids_order_and_boundaries():
    """What a resume compares: equal for the same pairs (however the dataset holds them), different for one id
    changed at the same lengths, two pairs swapped, or ids moved from one pair's end to the next one's start."""
    import hashlib

    def fingerprint(input_ids, labels, **select):
        ds = Dataset.from_dict({"input_ids": input_ids, "labels": labels})
        if select:
            ds = ds.select(select["rows"])
        digest = hashlib.sha256()
        token_lengths(ds, digest)
        return digest.hexdigest()

    base = fingerprint([[5, 6, 2], [7, 2]], [[8, 2], [9, 9, 2]])
    assert base == fingerprint([[5, 6, 2], [7, 2], [1, 2]], [[8, 2], [9, 9, 2], [3, 2]], rows=[0, 1])
    assert base != fingerprint([[5, 6, 2], [7, 2]], [[8, 2], [9, 4, 2]])
    assert base != fingerprint([[7, 2], [5, 6, 2]], [[9, 9, 2], [8, 2]])
    assert base != fingerprint([[5, 6], [2, 7, 2]], [[8, 2], [9, 9, 2]])


# ------------------------------------------------------------------------------------------------
# token batching


def random_lengths(n=1000, seed=0, high=60):
    rng = np.random.default_rng(seed)
    src = rng.integers(1, high, n)
    tgt = np.clip(src + rng.integers(-5, 6, n), 1, None)
    return src, tgt


def check_epoch(batches, src, tgt, max_tokens, n=None):
    for b in batches:
        assert len(b) * max(src[i] for i in b) <= max_tokens
        assert len(b) * max(tgt[i] for i in b) <= max_tokens
    flat = [i for b in batches for i in b]
    if n is not None:
        assert sorted(flat) == list(range(n))  # every example exactly once


def test_token_batches_respect_budget_and_cover_epoch():
    src, tgt = random_lengths()
    sampler = TokenBatchSampler(src, tgt, max_tokens=300, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        check_epoch(batches, src, tgt, 300, n=len(src))
        orders.append(batches)
    assert orders[0] != orders[1] != orders[2]
    again = TokenBatchSampler(src, tgt, max_tokens=300, seed=3)
    again.set_epoch(1)
    assert list(again) == orders[1]  # deterministic given seed and epoch


def test_similar_lengths_are_batched_together():
    src, tgt = random_lengths()
    batches = list(TokenBatchSampler(src, tgt, max_tokens=600, seed=0))
    padded = sum(len(b) * max(src[i] for i in b) for b in batches)
    assert src.sum() / padded > 0.9  # little padding; random batches of these sizes would waste ~half
    assert len(batches) < len(src) / 5  # and batches are real batches, not singletons


def test_max_sentences():
    src, tgt = np.ones(100, int), np.ones(100, int)
    batches = list(TokenBatchSampler(src, tgt, max_tokens=1000, max_sentences=7))
    assert max(len(b) for b in batches) == 7 and sum(len(b) for b in batches) == 100


def test_no_shuffle_is_length_ordered_and_epoch_independent():
    src, tgt = random_lengths(200)
    sampler = TokenBatchSampler(src, tgt, max_tokens=200, shuffle=False)
    first = list(sampler)
    sampler.set_epoch(5)
    assert list(sampler) == first
    maxima = [max(src[i] for i in b) for b in first]
    assert maxima == sorted(maxima)


def test_too_long_example_is_an_error():
    with pytest.raises(
        ValueError, match=r"2 example\(s\) do not fit in max_tokens=40, e.g. example 2 with 50 source / 3 target tokens"
    ):
        TokenBatchSampler([3, 4, 50, 5], [3, 3, 3, 41], max_tokens=40)


@pytest.mark.parametrize("num_replicas", [2, 3])
def test_distributed_shares_are_disjoint_equal_and_complete(num_replicas):
    src, tgt = random_lengths(777, seed=1)
    for epoch in range(3):
        shares = []
        for rank in range(num_replicas):
            s = TokenBatchSampler(src, tgt, max_tokens=250, seed=9, num_replicas=num_replicas, rank=rank)
            s.set_epoch(epoch)
            shares.append(list(s))
            assert len(shares[-1]) == len(s)
        assert len({len(share) for share in shares}) == 1  # equal counts: no rank waits at a barrier
        check_epoch([b for share in shares for b in share], src, tgt, 250, n=len(src))  # disjoint + complete


def test_batch_count_is_made_a_multiple_by_splitting():
    # 3 batches of 4 identical examples -> 2 replicas need 4 batches: one batch is split in two
    src = tgt = np.full(12, 10)
    one = TokenBatchSampler(src, tgt, max_tokens=40, shuffle=False)
    assert [len(b) for b in one] == [4, 4, 4]
    shares = [list(TokenBatchSampler(src, tgt, max_tokens=40, shuffle=False, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [len(s) for s in shares] == [2, 2]
    assert sorted(i for s in shares for b in s for i in b) == list(range(12))


def test_one_process_can_reproduce_the_multi_process_order():
    src, tgt = random_lengths(301, seed=2)
    single = TokenBatchSampler(src, tgt, max_tokens=200, seed=4, batch_count_multiple=2)
    merged = list(single)
    ranks = [list(TokenBatchSampler(src, tgt, max_tokens=200, seed=4, num_replicas=2, rank=r)) for r in (0, 1)]
    assert merged[0::2] == ranks[0] and merged[1::2] == ranks[1]


def test_too_few_examples_for_the_replicas_drop_surplus(caplog):
    with caplog.at_level(logging.WARNING, logger="modeling_seq2seq.data"):
        # three examples that cannot share a batch: 3 singleton batches, 2 replicas, nothing to split
        shares = [
            list(TokenBatchSampler([60, 60, 60], [5, 5, 5], max_tokens=100, num_replicas=2, rank=r)) for r in (0, 1)
        ]
    assert [len(s) for s in shares] == [1, 1]
    assert len({i for s in shares for b in s for i in b}) == 2
    assert "dropping 1 batch" in caplog.text
    # Fewer pairs than batches per update: refused when the sampler is made, naming the setting to lower.
    with pytest.raises(ValueError, match=r"1 training pairs are too few for 2 batches per update \(2 process\(es\) x 1 "
                                         r"accumulated micro-batches\): lower gradient_accumulation_steps"):
        TokenBatchSampler([5], [5], max_tokens=100, num_replicas=2, rank=1)
    with pytest.raises(ValueError, match=r"3 training pairs are too few for 4 batches per update \(1 process\(es\) x 4"):
        TokenBatchSampler([5, 5, 5], [5, 5, 5], max_tokens=100, batch_count_multiple=4)


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_resume_continues_the_same_order(num_replicas):
    src, tgt = random_lengths(500, seed=5)
    kwargs = {"max_tokens": 200, "seed": 11, "num_replicas": num_replicas, "rank": num_replicas - 1}
    full = TokenBatchSampler(src, tgt, **kwargs)
    full.set_epoch(2)
    epoch2 = list(full)
    full.set_epoch(3)
    epoch3 = list(full)

    first = TokenBatchSampler(src, tgt, **kwargs)
    first.set_epoch(2)
    it = iter(first)
    consumed = [next(it) for _ in range(7)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state["epoch"] == 2 and state["batches_consumed"] == 7

    resumed = TokenBatchSampler(src, tgt, **kwargs)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the loop re-announcing the same epoch must not restart it
    assert consumed + list(resumed) == epoch2
    resumed.set_epoch(3)
    assert list(resumed) == epoch3
    moved_on = TokenBatchSampler(src, tgt, **kwargs)
    moved_on.load_state_dict(state)
    moved_on.set_epoch(3)  # a new epoch starts from its first batch, whatever the saved position
    assert list(moved_on) == epoch3


def test_resume_with_explicit_count_and_mismatch_errors():
    src, tgt = random_lengths(300, seed=6)
    s = TokenBatchSampler(src, tgt, max_tokens=200)
    batches = list(s)
    state = s.state_dict(batches_consumed=4)  # e.g. a DataLoader with workers prefetched further
    r = TokenBatchSampler(src, tgt, max_tokens=200)
    r.load_state_dict(state)
    assert list(r) == batches[4:]
    with pytest.raises(ValueError, match="max_tokens: saved 200 vs now 300"):
        TokenBatchSampler(src, tgt, max_tokens=300).load_state_dict(state)
    # Gradient accumulation groups batches in multiples: another multiple is another data order.
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps\): saved 1 vs now 2"):
        TokenBatchSampler(src, tgt, max_tokens=200, batch_count_multiple=2).load_state_dict(state)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=120),
    max_tokens=st.integers(40, 300),
    num_replicas=st.integers(1, 4),
    seed=st.integers(0, 3),
    bucket_size=st.sampled_from([None, 7, 50]),
)
def test_batching_property(lengths, max_tokens, num_replicas, seed, bucket_size):
    src, tgt = [a for a, _ in lengths], [b for _, b in lengths]
    n = len(lengths)
    if n < num_replicas:
        return  # refused when made: test_too_few_examples_for_the_replicas_drop_surplus
    samplers = [
        TokenBatchSampler(src, tgt, max_tokens, seed=seed, num_replicas=num_replicas, rank=r, bucket_size=bucket_size)
        for r in range(num_replicas)
    ]
    shares = [list(s) for s in samplers]
    assert len({len(x) for x in shares}) == 1
    flat = [i for share in shares for b in share for i in b]
    assert len(flat) == len(set(flat))  # disjoint
    check_epoch([b for share in shares for b in share], src, tgt, max_tokens)
    # Complete whenever splitting can fix the count: a batch of s examples splits into at most s batches,
    # so n - L more batches are available, where L is the unsplit count (the one-replica sampler's).
    unsplit = len(TokenBatchSampler(src, tgt, max_tokens, seed=seed, bucket_size=bucket_size))
    if n - unsplit >= (-unsplit) % num_replicas:
        assert sorted(flat) == list(range(n))
    else:
        assert len(flat) < n  # the documented fallback: surplus batches dropped, shares still equal


# ------------------------------------------------------------------------------------------------
# collation and the whole path into a DataLoader


def test_collator_pads():
    batch = Seq2SeqCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 2], "labels": [7, 2]}, {"input_ids": [9, 2], "labels": [4, 4, 4, 2]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 2], [9, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 2, -100, -100], [4, 4, 4, 2]]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError, match="empty batch"):
        Seq2SeqCollator(0)([])


def test_dataloader_end_to_end(builtin):
    tok = train_tokenizer(builtin["train"]["source"][:2000] + builtin["train"]["target"][:2000], vocab_size=600)
    ds, dropped = tokenize_pairs(builtin["validation"], tok, max_source_length=64, max_target_length=64)
    assert dropped == 0
    src, tgt = token_lengths(ds)
    sampler = TokenBatchSampler(src, tgt, max_tokens=256, seed=0)
    loader = torch.utils.data.DataLoader(
        ds.with_format(columns=["input_ids", "labels"]),
        batch_sampler=sampler,
        collate_fn=Seq2SeqCollator(tok.pad_token_id),
    )
    seen = 0
    for batch in loader:
        assert batch["input_ids"].numel() <= 256 and batch["labels"].numel() <= 256
        assert (batch["labels"] == -100).sum() == (batch["labels"].shape[1] - (batch["labels"] != -100).sum(1)).sum()
        seen += batch["input_ids"].shape[0]
    assert seen == len(ds) == 500


def write_mo(path, messages: dict, charset="UTF-8", encoding=None, translator="Anna Schmidt"):
    """A GNU gettext catalog (.mo), as msgfmt writes it: a header entry, then the messages' two string tables (in
    `encoding`, by default the header's charset)."""
    import struct

    entries = {"": f"Last-Translator: {translator}\nContent-Type: text/plain; charset={charset}\n", **messages}
    keys = sorted(entries)
    sources = [key.encode(encoding or charset) for key in keys]
    targets = [entries[key].encode(encoding or charset) for key in keys]
    count, tables = len(keys), 28
    data_start = tables + 16 * count
    blob, source_table, target_table = b"", [], []
    for strings, table in ((sources, source_table), (targets, target_table)):
        for text in strings:
            table.append((len(text), data_start + len(blob)))
            blob += text + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, count, tables, tables + 8 * count, 0, 0)
    tables_bytes = b"".join(struct.pack("<2I", *entry) for entry in source_table + target_table)
    path.write_bytes(header + tables_bytes + blob)


def test_gettext_corpus_writes_real_message_pairs_as_translation_splits(tmp_path, capsys, caplog):
    """scripts/gettext_corpus.py: one-line, translated, 3-40 word messages only, each pair once, split without
    overlap, in the layout train.py reads; a catalog in the charset its header declares is read whatever the
    charset (Python's gettext refuses an ISO-8859 header with an accented name), one whose text is not in it is
    skipped by name; nothing is replaced without --overwrite."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gettext_corpus", Path(__file__).parent.parent / "scripts" / "gettext_corpus.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    kept = {f"cannot open file number {i}": f"Datei Nummer {i} kann nicht geöffnet werden" for i in range(12)}
    left_out = {
        "two words": "zwei Wörter",                       # too short
        "a message\nof two lines here": "eine Meldung\nzweizeilig hier",
        "a tab\tinside the message": "ein Tab\tin der Meldung",
        "not translated at all here": "not translated at all here",
        "ctx\x04with a context here": "mit Kontext hier",
    }
    write_mo(tmp_path / "one.mo", {**kept, **left_out})
    write_mo(tmp_path / "two.mo", dict(list(kept.items())[:5]))  # the same pairs again: kept once
    # Another translation of a kept message, in one catalog against two: the more frequent one only, so that the
    # English sentence cannot be in two splits.
    write_mo(tmp_path / "three.mo", {"cannot open file number 0": "Datei 0 lässt sich nicht öffnen"})
    write_mo(tmp_path / "legacy.mo", {"a legacy message here": "eine ältere Meldung hier"}, encoding="latin-1")
    latin = {"a message in latin one": "eine Meldung in Latin-1, schön"}
    write_mo(tmp_path / "latin.mo", latin, charset="ISO-8859-1", translator="Jürgen Müller")
    out = tmp_path / "corpus"
    args = ["--catalogs", *(str(tmp_path / name) for name in ("one.mo", "two.mo", "three.mo", "legacy.mo", "latin.mo")), "--output_dir",
            str(out), "--held_out", "2"]
    with caplog.at_level("WARNING"):
        assert script.main(args) == 0
    assert "13 pairs from 5 catalogs: 9 train, 2 validation, 2 test" in capsys.readouterr().out
    assert f"Skipped {tmp_path / 'legacy.mo'}: 'utf-8' codec can't decode" in caplog.text
    splits = load_parallel_data(train_file=str(out / "train.jsonl"), validation_file=str(out / "validation.jsonl"),
                         test_file=str(out / "test.jsonl"), source_lang="en", target_lang="de")
    pairs = [pair for split in ("train", "validation", "test") for pair in rows_of(splits[split])]
    assert sorted(pairs) == sorted({**kept, **latin}.items())
    with pytest.raises(SystemExit):
        script.main(args)
    assert "already holds train.jsonl, validation.jsonl, test.jsonl; pass --overwrite" in capsys.readouterr().err
    # Stopped while replacing the splits: what is left never pairs a new split with an old one.
    real_write, written = script.atomic_write_text, []

    def stop_at_the_second(path, text):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        real_write(path, text)

    script.atomic_write_text = stop_at_the_second
    with pytest.raises(KeyboardInterrupt):
        script.main(args + ["--overwrite", "--seed", "1"])
    script.atomic_write_text = real_write
    assert sorted(path.name for path in out.iterdir()) == ["train.jsonl"]
    assert script.main(args + ["--overwrite", "--seed", "1"]) == 0
    with pytest.raises(SystemExit):
        script.main(["--catalogs", str(tmp_path / "none.mo"), "--output_dir", str(tmp_path / "x")])
    assert "--catalogs: no such file: " in capsys.readouterr().err
    assert script.main(args[:-1] + ["7", "--overwrite"]) == 1
    assert "5 catalogs gave 13 usable pairs, too few for 2 x --held_out 7" in capsys.readouterr().err
    # A catalog shorter than its header says (empty, cut in its index) is skipped by name, as other damaged ones
    # (it raised struct.error and ended the run); equal or empty language codes and an output under a file are named.
    (tmp_path / "empty.mo").write_bytes(b"")
    (tmp_path / "cut.mo").write_bytes((tmp_path / "one.mo").read_bytes()[:40])
    with caplog.at_level("WARNING"):
        assert script.main(["--catalogs", str(tmp_path / "one.mo"), str(tmp_path / "empty.mo"), str(tmp_path / "cut.mo"),
                            "--output_dir", str(tmp_path / "damaged"), "--held_out", "2"]) == 0
    for name in ("empty.mo", "cut.mo"):
        assert f"Skipped {tmp_path / name}: not a complete .mo catalog" in caplog.text
    for languages in (["--source_lang", "de"], ["--source_lang", " "]):
        with pytest.raises(SystemExit):
            script.main(args + ["--overwrite", *languages])
        assert "--source_lang and --target_lang must be two different, non-empty codes" in capsys.readouterr().err
    (tmp_path / "afile").write_text("mine")
    assert script.main(args[:-4] + ["--output_dir", str(tmp_path / "afile" / "x"), "--held_out", "2"]) == 1
    assert f"error: --output_dir {tmp_path / 'afile' / 'x'}: " in capsys.readouterr().err


def test_shuffled_batches_come_in_random_length_order():
    """Section 5.1 batches sentences of similar length; the batch order must still be shuffled, or every epoch would run
    from the shortest batches to the longest (and with one bucket, the same curriculum each epoch)."""
    src, tgt = random_lengths(400, seed=7)
    for epoch in range(3):
        sampler = TokenBatchSampler(src, tgt, max_tokens=200, seed=1)
        sampler.set_epoch(epoch)
        maxima = [max(src[i] for i in b) for b in sampler]
        assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
        firsts = maxima[: len(maxima) // 4]
        assert max(firsts) > np.median(maxima)  # long batches early on too, not only at the end


def test_a_resumed_sampler_records_its_position_for_the_next_resume():
    """Resume, consume more, save again, resume again: the third sampler continues where the second stopped (the saved
    position counts the batches yielded before the first resume too), and the epoch comes out whole."""
    src, tgt = random_lengths(500, seed=8)
    full = TokenBatchSampler(src, tgt, max_tokens=200, seed=2)
    epoch = list(full)
    first = TokenBatchSampler(src, tgt, max_tokens=200, seed=2)
    it = iter(first)
    seen = [next(it) for _ in range(3)]
    second = TokenBatchSampler(src, tgt, max_tokens=200, seed=2)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert second.state_dict()["batches_consumed"] == 3  # saved again before it yields anything
    it = iter(second)
    seen += [next(it) for _ in range(4)]
    state = json.loads(json.dumps(second.state_dict()))
    assert state["batches_consumed"] == 7 and state["epoch"] == 0
    third = TokenBatchSampler(src, tgt, max_tokens=200, seed=2)
    third.load_state_dict(state)
    assert seen + list(third) == epoch


def test_batches_group_similar_target_lengths_too():
    """Sources of one length and targets of many: the bucket sort breaks the tie by target length, so the target side
    is packed without much padding either (the budget counts both sides' padding)."""
    rng = np.random.default_rng(4)
    src, tgt = np.full(600, 5), rng.integers(1, 41, 600)
    batches = list(TokenBatchSampler(src, tgt, max_tokens=400, seed=0))
    check_epoch(batches, src, tgt, 400, n=600)
    padded = sum(len(b) * max(tgt[i] for i in b) for b in batches)
    assert tgt.sum() / padded > 0.9


def test_tsv_fields_that_start_with_a_quote_are_read_as_written(tmp_path):
    """A TSV sentence may begin with a quotation mark (dialogue: "Hi," he said.); TSV has no quoting, so the field is
    the text as written, quotes included, and a line never swallows the next one."""
    pairs = [('"Hi," he said.', '„Hallo", sagte er.'), ('"Run!"', '"Lauf!"'), ("plain", "schlicht"),
             ('"unclosed', 'offen"')]
    ds = read_parallel_file(write(tmp_path / "q.tsv", "en\tde\n" + "".join(f"{s}\t{t}\n" for s, t in pairs)))
    assert rows_of(ds) == pairs
