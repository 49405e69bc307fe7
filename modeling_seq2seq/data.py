"""Parallel data: loading and validation, the built-in task, tokenisation, token-count batching, collation.

Every loader returns a `datasets.DatasetDict` whose splits have two string columns, "source" and
"target". Bad input raises `DataFileError` (a `ValueError`) or `FileNotFoundError` with a message that
names the file and the line (or the Hub dataset, split and row).
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, Features, LargeList, List, TranslationVariableLanguages, Value
from datasets.table import InMemoryTable

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 1 << 20  # longer lines are rejected: a "sentence" of a megabyte is a broken file
MAX_JSON_ARRAY_BYTES = 256 << 20  # a top-level JSON array must be parsed whole; larger files: use JSON Lines
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "val": "validation"}
TEXT_FEATURES = Features({"source": Value("string"), "target": Value("string")})
_ROWS_PER_CHUNK = 100_000

# The built-in task: English number words -> German number words, 0..9999. German writes units before
# tens and the whole number as one word ("thirty-four" -> "vierunddreißig"), so it is real translation
# with reordering, yet small enough to learn to >= 99% exact match on a CPU in minutes.
BUILTIN_MAX_NUMBER = 9999
BUILTIN_VALIDATION_SIZE = 500
BUILTIN_TEST_SIZE = 500
BUILTIN_SOURCE_LANG, BUILTIN_TARGET_LANG = "en", "de"


class DataFileError(ValueError):
    """Malformed parallel data; the message names the file (or dataset) and the line (or row)."""


# --------------------------------------------------------------------------------------------------
# The built-in task


def _builtin_split_numbers(seed: int) -> dict[str, list[int]]:
    # Order by a hash of (seed, number): the same on every Python/numpy version, unlike random.shuffle.
    def key(n: int) -> bytes:
        return hashlib.sha256(f"{seed}:{n}".encode()).digest()

    numbers = sorted(range(BUILTIN_MAX_NUMBER + 1), key=key)
    n_test, n_val = BUILTIN_TEST_SIZE, BUILTIN_VALIDATION_SIZE
    return {
        "train": numbers[n_test + n_val :],
        "validation": numbers[n_test : n_test + n_val],
        "test": numbers[:n_test],
    }


@functools.cache
def _number_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    # num2words takes seconds for 20,000 calls on a slow CPU; compute once per process.
    from num2words import num2words

    numbers = range(BUILTIN_MAX_NUMBER + 1)
    return (
        tuple(num2words(n, lang=BUILTIN_SOURCE_LANG) for n in numbers),
        tuple(num2words(n, lang=BUILTIN_TARGET_LANG) for n in numbers),
    )


def builtin_task(seed: int = 0) -> DatasetDict:
    """English number words to German number words for 0..9999 (num2words), deterministic.

    Splits: "test" 500 numbers, "validation" 500, "train" the other 9,000; the three are disjoint and,
    for a given `seed`, always the same numbers in the same order. Text is lower case, as num2words
    writes it, e.g. "one thousand, two hundred and thirty-four" -> "eintausendzweihundertvierunddreißig".
    """
    english, german = _number_words()
    out = {}
    for split, numbers in _builtin_split_numbers(seed).items():
        out[split] = Dataset.from_dict(
            {"source": [english[n] for n in numbers], "target": [german[n] for n in numbers]},
            features=TEXT_FEATURES,
            split=split,
        )
    return DatasetDict(out)


# --------------------------------------------------------------------------------------------------
# Local files


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, decoded line) with bounded memory, rejecting binary and non-UTF-8 content."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)  # bounded: never reads a whole huge line into memory
            if not raw:
                return
            lineno += 1
            content = len(raw) - raw.endswith(b"\n")
            if content > MAX_LINE_BYTES:
                raise DataFileError(
                    f"{path}, line {lineno}: line longer than {MAX_LINE_BYTES:,} bytes"
                    + (" (is this a binary file?)" if lineno == 1 else "")
                )
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if lineno == 1 and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                raise DataFileError(f"{path}: UTF-16 text (it starts with a UTF-16 byte order mark); save it as UTF-8")
            if b"\x00" in raw:
                raise DataFileError(f"{path}, line {lineno}: contains NUL bytes (is this a binary file?)")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFileError(
                    f"{path}, line {lineno}: not valid UTF-8 (byte {e.start + 1} of the line is "
                    f"{raw[e.start : e.start + 1]!r}); re-encode the file as UTF-8"
                    + (" (is this a binary file?)" if lineno == 1 else "")
                ) from None
            yield lineno, text


def _text_value(value, lang: str, where: str) -> str:
    if value is None:
        return ""  # counted as an empty side and skipped like ""
    if not isinstance(value, str):
        raise DataFileError(f"{where}: the {lang!r} value must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def _pair_from_record(record, source_lang: str, target_lang: str, where: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise DataFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    fields = record["translation"] if isinstance(record.get("translation"), dict) else record
    missing = [lang for lang in (source_lang, target_lang) if lang not in fields]
    if missing:
        layout = "translation" if fields is not record else "top level"
        raise DataFileError(
            f"{where}: missing language field(s) {missing} ({layout} keys found: {sorted(fields)}); expected "
            f'{{"translation": {{"{source_lang}": ..., "{target_lang}": ...}}}} or '
            f'{{"{source_lang}": ..., "{target_lang}": ...}}'
        )
    return (
        _text_value(fields[source_lang], source_lang, where),
        _text_value(fields[target_lang], target_lang, where),
    )


class DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list) -> dict:
    """A JSON object whose keys are each given once: `json` would keep the last of two silently."""
    keys = [key for key, _ in pairs]
    for index, key in enumerate(keys):
        if key in keys[:index]:
            raise DuplicateKey(key)
    return dict(pairs)


def _read_jsonl(path: Path, source_lang: str, target_lang: str) -> Iterator[tuple[int, str, str]]:
    for lineno, line in _iter_lines(path):
        if not line.strip():
            continue  # blank lines (a trailing newline, say) carry no record
        where = f"{path}, line {lineno}"
        try:  # a column past the line's end, not column 1 of the next
            record = json.loads(line.rstrip("\r\n"), object_pairs_hook=_object_without_duplicates)
        except DuplicateKey as e:
            raise DataFileError(f"{where}: the key {str(e)!r} is given twice") from None
        except json.JSONDecodeError as e:
            raise DataFileError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataFileError(f"{where}: JSON nested too deeply to be a sentence pair") from None
        yield (lineno, *_pair_from_record(record, source_lang, target_lang, where))


def _read_json_array(path: Path, source_lang: str, target_lang: str) -> Iterator[tuple[int, str, str]]:
    size = path.stat().st_size
    if size > MAX_JSON_ARRAY_BYTES:
        raise DataFileError(
            f"{path}, line 1: a top-level JSON array of {size:,} bytes is too large to parse at once "
            f"(limit {MAX_JSON_ARRAY_BYTES:,}); convert it to JSON Lines (.jsonl), one object per line"
        )
    lines = [line for _, line in _iter_lines(path)]  # validates UTF-8 / NUL / line length with line numbers
    text = "".join(lines)
    decoder = json.JSONDecoder(object_pairs_hook=_object_without_duplicates)
    pos, line_at, lineno = text.index("[") + 1, 0, 1

    def line_of(p: int) -> int:
        nonlocal line_at, lineno
        lineno += text.count("\n", line_at, p)
        line_at = p
        return lineno

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return
    item = 0
    while True:
        pos = skip_ws(pos)
        item += 1
        where = f"{path}, line {line_of(pos)} (array item {item})"
        try:
            record, pos = decoder.raw_decode(text, pos)
        except DuplicateKey as e:
            raise DataFileError(f"{where}: the key {str(e)!r} is given twice") from None
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}, line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataFileError(f"{where}: JSON nested too deeply to be a sentence pair") from None
        yield (lineno, *_pair_from_record(record, source_lang, target_lang, where))
        pos = skip_ws(pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "]":
            if skip_ws(pos + 1) != len(text):
                raise DataFileError(f"{path}, line {line_of(skip_ws(pos + 1))}: extra data after the JSON array")
            return
        else:
            raise DataFileError(f"{path}, line {line_of(min(pos, len(text)))}: malformed JSON (expected ',' or ']')")


def _first_nonblank_char(path: Path) -> str:
    for _, line in _iter_lines(path):
        if line.strip():
            return line.lstrip()[0]
    return ""


def _read_delimited(path: Path, source_lang: str, target_lang: str, delimiter: str) -> Iterator[tuple[int, str, str]]:
    # TSV parallel corpora hold raw quotes (He said "hi"), so no quoting there; CSV follows RFC 4180.
    tsv = delimiter == "\t"
    fmt = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"delimiter": ",", "strict": True}
    current = {"line": 0}

    def lines() -> Iterator[str]:
        for lineno, line in _iter_lines(path):
            current["line"] = lineno
            yield line

    old_limit = csv.field_size_limit()
    csv.field_size_limit(MAX_LINE_BYTES)  # a quoted field spanning many lines is bounded too
    try:
        reader = csv.reader(lines(), **fmt)
        try:
            header = next(reader, None)
            if header is None:
                raise DataFileError(f"{path}, line 1: the file is empty (expected a header row)")
            header = [h.strip() for h in header]
            repeated = [lang for lang in (source_lang, target_lang) if header.count(lang) > 1]
            if repeated:
                raise DataFileError(f"{path}, line {current['line']}: the header names column(s) {repeated} more than "
                                    "once; which one holds the text would be a guess")
            missing = [lang for lang in (source_lang, target_lang) if lang not in header]
            if missing:
                raise DataFileError(
                    f"{path}, line {current['line']}: missing language column(s) {missing}; "
                    f"header columns found: {header} (the first row must name the columns, "
                    f"e.g. {source_lang}{delimiter}{target_lang})"
                )
            s_col, t_col = header.index(source_lang), header.index(target_lang)
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
                    continue  # blank line
                if len(row) != len(header):
                    raise DataFileError(
                        f"{path}, line {current['line']}: expected {len(header)} fields as in the header, "
                        f"found {len(row)}" + (" (a tab inside the text?)" if tsv and len(row) > len(header) else "")
                    )
                yield current["line"], row[s_col], row[t_col]
        except csv.Error as e:
            raise DataFileError(f"{path}, line {current['line']}: malformed {'TSV' if tsv else 'CSV'} ({e})") from None
    finally:
        csv.field_size_limit(old_limit)


def line_aligned_files(prefix: str | os.PathLike, source_lang: str, target_lang: str) -> tuple[Path, Path] | None:
    """`prefix.<source_lang>` and `prefix.<target_lang>` when both exist and `prefix` itself does not: plain text,
    one sentence per line, line N of one the translation of line N of the other (the Moses layout of OPUS and WMT
    downloads, and fairseq's `--trainpref`)."""
    prefix = Path(prefix)
    pair = (Path(f"{prefix}.{source_lang}"), Path(f"{prefix}.{target_lang}"))
    return pair if not prefix.exists() and all(p.exists() for p in pair) else None


def _sentence_line(path: Path, lineno: int, line: str) -> str:
    """A line of a one-sentence-per-line file, refused where its first line holds a carriage return inside: the file
    ends its lines with carriage returns alone, and would be read as one sentence (a stray one further on stays)."""
    if lineno == 1 and "\r" in line.strip():
        from .training import CARRIAGE_RETURN_INSIDE

        raise DataFileError(f"{path}, line {lineno}: {CARRIAGE_RETURN_INSIDE}")
    return line


def _read_line_aligned(source: Path, target: Path) -> Iterator[tuple[int, str, str]]:
    targets = _iter_lines(target)
    lineno = 0
    for lineno, src in _iter_lines(source):
        tgt = next(targets, None)
        if tgt is None:
            raise DataFileError(f"{target}, line {lineno}: the file ends here, but {source} goes on (the two files "
                                "must have one line per sentence pair, in the same order)")
        yield lineno, _sentence_line(source, lineno, src), _sentence_line(target, lineno, tgt[1])
    if next(targets, None) is not None:
        raise DataFileError(f"{source}, line {lineno + 1}: the file ends here, but {target} goes on (the two files "
                            "must have one line per sentence pair, in the same order)")


def _read_file_pairs(path: Path, source_lang: str, target_lang: str) -> Iterator[tuple[int, str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, source_lang, target_lang)
    if suffix == ".json":
        # HF's json loader accepts both JSON Lines and a top-level array in a .json file; so do we.
        if _first_nonblank_char(path) == "[":
            return _read_json_array(path, source_lang, target_lang)
        return _read_jsonl(path, source_lang, target_lang)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, source_lang, target_lang, "\t" if suffix == ".tsv" else ",")
    prefix = path.with_suffix("") if suffix[1:] in (source_lang, target_lang) else "P"
    raise DataFileError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}, or "
                        f"give the prefix {prefix} of two line-aligned plain-text files {prefix}.{source_lang} and "
                        f"{prefix}.{target_lang}")


def check_unicode(source: str, target: str, where: str) -> None:
    """JSON can spell a lone surrogate ("\\ud83d", half of an emoji), which is no Unicode text: say where it is."""
    for text in (source, target):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise DataFileError(
                f"{where}: {text[error.start]!r} is half of a surrogate pair (a lone \\u{ord(text[error.start]):04x} "
                "escape), not a character; the text around it was probably cut in the middle of an emoji."
            ) from None


def warn_skipped_pairs(what: str, lines: list[int], count: int, label: str = "line") -> None:
    if count:
        where = ""
        if lines:  # empty when the rows came from the datasets cache, where they were reported before
            more = f" and {count - len(lines)} more" if count > len(lines) else ""
            plural = "s" if count > 1 else ""
            where = f" ({label}{plural} {', '.join(str(n) for n in lines)}{more})"
        logger.warning("%s: skipped %d pair(s) with an empty source or target%s", what, count, where)


def read_parallel_file(
    path: str | os.PathLike,
    source_lang: str = "en",
    target_lang: str = "de",
    split: str = "train",
    max_bad_lines_shown: int = 10,
) -> Dataset:
    """Read one local file, or the two line-aligned files of a prefix, into a Dataset of ("source", "target"); see
    `load_parallel_data`."""
    path = Path(path)
    if source_lang == target_lang:
        raise ValueError(f"source_lang and target_lang (--source_lang, --target_lang) are both {source_lang!r}: a "
                         "translation needs two languages")
    aligned = line_aligned_files(path, source_lang, target_lang)
    if aligned is None and not path.exists():
        raise FileNotFoundError(f"data file not found: {path} (nor the line-aligned pair {path}.{source_lang} and "
                                f"{path}.{target_lang})")
    for file in aligned or (path,):
        if not file.is_file():
            raise DataFileError(f"{file}: not a regular file")
    schema = pa.schema([("source", pa.string()), ("target", pa.string())])
    batches, sources, targets = [], [], []
    skipped, skipped_lines = 0, []

    def flush() -> None:
        if sources:
            batches.append(
                pa.record_batch([pa.array(sources, pa.string()), pa.array(targets, pa.string())], schema=schema)
            )
            sources.clear()
            targets.clear()

    pairs = _read_line_aligned(*aligned) if aligned else _read_file_pairs(path, source_lang, target_lang)
    name = f"{path}.{{{source_lang},{target_lang}}}" if aligned else str(path)
    for lineno, src, tgt in pairs:
        src, tgt = src.strip(), tgt.strip()
        check_unicode(src, tgt, f"{name}, line {lineno}")
        if not src or not tgt:
            skipped += 1
            if len(skipped_lines) < max_bad_lines_shown:
                skipped_lines.append(lineno)
            continue
        sources.append(src)
        targets.append(tgt)
        if len(sources) >= _ROWS_PER_CHUNK:
            flush()
    flush()
    warn_skipped_pairs(name, skipped_lines, skipped)
    n = sum(b.num_rows for b in batches)
    if n == 0:
        raise DataFileError(
            f"{name}, line 1: no usable {source_lang}-{target_lang} pairs"
            + (f" ({skipped} skipped as empty)" if skipped else " (the file has no records)")
        )
    table = pa.Table.from_batches(batches, schema=schema)
    return Dataset(InMemoryTable(table), split=split)


# --------------------------------------------------------------------------------------------------
# Hub datasets


def _convert_hub_split(ds: Dataset, name: str, split: str, source_lang: str, target_lang: str, max_bad: int) -> Dataset:
    columns = ds.column_names
    where = f"dataset {name!r}, split {split!r}"
    if len(ds) == 0:
        return Dataset.from_dict({"source": [], "target": []}, features=TEXT_FEATURES, split=split)
    if "translation" in columns:
        feature = ds.features["translation"]
        # From the column's type, not row 0 (which may be null): a struct or datasets.Translation names its languages.
        keys = list(feature) if isinstance(feature, dict) else list(getattr(feature, "languages", None) or []) or None
        variable = isinstance(feature, TranslationVariableLanguages)  # rows {"language": [...], "translation": [...]}
        if isinstance(feature, (Value, List, LargeList)):  # text or a list: no language mapping at all
            raise DataFileError(f"{where}: the 'translation' column holds {feature}, not a mapping of language codes to "
                                f'text such as {{"{source_lang}": ..., "{target_lang}": ...}}')
        missing = [lang for lang in (source_lang, target_lang) if keys is not None and lang not in keys]
        if missing:
            raise DataFileError(f"{where}: missing language(s) {missing} in 'translation' (keys found: {sorted(keys)})")

        def extract(batch, indices):
            pairs = []
            for i, p in zip(indices, batch["translation"]):
                if p is not None and not isinstance(p, dict):  # rows of a loosely typed (Json) column
                    raise DataFileError(f"{where}, row {i}: 'translation' must map language codes to text, got "
                                        f"{type(p).__name__} {p!r:.60}")
                if variable and p is not None:  # the first translation into each language
                    mapping = {}
                    for lang, text in zip(p["language"], p["translation"]):
                        mapping.setdefault(lang, text)
                    p = mapping
                pairs.append(p or {})
            return {"source": [p.get(source_lang) for p in pairs], "target": [p.get(target_lang) for p in pairs]}

    elif source_lang in columns and target_lang in columns:

        def extract(batch, indices):
            return {"source": batch[source_lang], "target": batch[target_lang]}

    else:
        raise DataFileError(
            f"{where}: no 'translation' column and no {source_lang!r}/{target_lang!r} columns; columns found: {columns}"
        )

    def clean(batch, indices):
        keep = {"source": [], "target": []}
        bad = []
        for i, s, t in zip(indices, *extract(batch, indices).values()):
            row = f"{where}, row {i}"  # a number or a list where text belongs: named, as in data files
            s, t = _text_value(s, source_lang, row).strip(), _text_value(t, target_lang, row).strip()
            if s and t:
                keep["source"].append(s)
                keep["target"].append(t)
            else:
                bad.append(i)
        if bad:
            keep_bad.extend(bad[: max(0, max_bad - len(keep_bad))])
        return keep

    keep_bad: list[int] = []
    out = ds.map(
        clean, batched=True, with_indices=True, remove_columns=columns, features=TEXT_FEATURES, desc=f"{split}: pairs"
    )
    skipped = len(ds) - len(out)
    # keep_bad is only filled when the map actually ran (not when it came from the datasets cache)
    warn_skipped_pairs(where, keep_bad, skipped, label="row")
    return out


def _convert_hub_dataset(raw, name: str, source_lang: str, target_lang: str, max_bad: int) -> DatasetDict:
    """The train, validation and test splits (dev, valid and val are validation) in our columns. Two splits of
    the same role are refused (one would replace the other); other splits are left out, with a warning."""
    if not isinstance(raw, DatasetDict):
        raw = DatasetDict({"train": raw})
    out, origins = {}, {}
    for split, ds in raw.items():
        role = SPLIT_ALIASES.get(split, split)
        if role not in ("train", "validation", "test"):
            logger.warning("dataset %r: split %r is not used (only train, validation (or dev, valid, val) and test "
                           "are).", name, split)
            continue
        if role in origins:
            raise DataFileError(f"dataset {name!r}: the splits {origins[role]!r} and {split!r} are both its {role} "
                                "split; keep one, or rename the other")
        origins[role] = split
        pairs = _convert_hub_split(ds, name, split, source_lang, target_lang, max_bad)
        if len(ds) and not len(pairs):  # every row empty or null (a language no row has, or a blind test split)
            problem = (f"dataset {name!r}, split {split!r}: no usable {source_lang}-{target_lang} pairs ({len(ds)} rows, "
                       "every one with an empty or null source or target)")
            if role == "train":
                raise DataFileError(problem)
            logger.warning("%s: the split is left out.", problem)
            continue
        out[role] = pairs
    return DatasetDict(out)


# --------------------------------------------------------------------------------------------------


def load_parallel_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    source_lang: str = "en",
    target_lang: str = "de",
    max_bad_lines_shown: int = 10,
) -> DatasetDict:
    """Parallel text as a DatasetDict of ("source", "target") string columns.

    - `dataset_name` (+ `dataset_config_name`): `datasets.load_dataset` (a folder saved with `save_to_disk`:
      `datasets.load_from_disk`), in the HF translation layout (a "translation" dict column, as wmt14) or with one
      column per language code; its train, validation (or dev, valid, val) and test splits.
    - `train_file` / `validation_file` / `test_file`: local `.jsonl`, `.json` (JSON Lines or one array),
      `.csv` or `.tsv` (tab-separated, no quoting), either in the translation layout (JSON) or with
      fields/columns named by the language codes (CSV/TSV: a header row); or a prefix `P` of two plain-text
      files `P.<source_lang>` and `P.<target_lang>`, one sentence per line (`line_aligned_files`). Only the
      splits given are returned.
      Local files are read into memory (compact Arrow); for corpora of many GB use a Hub/`datasets` dataset.
    - nothing: `builtin_task()` (requires `source_lang="en"`, `target_lang="de"`, the defaults).

    Text is stripped of surrounding whitespace. Pairs whose source or target is empty (or null) are
    skipped, and a warning gives their count and the first `max_bad_lines_shown` line numbers; a file
    with no usable pair is an error. Anything else malformed raises `DataFileError` (a ValueError) or
    `FileNotFoundError` naming the file and line: unreadable or non-UTF-8 bytes, a binary file, a line
    over 1 MiB, malformed JSON/CSV, a missing language column, a non-string value.
    """
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    given = {split: f for split, f in files.items() if f is not None}
    if dataset_name is not None and given:
        raise ValueError(f"give either dataset_name ({dataset_name!r}) or local files ({sorted(given)}), not both")
    if dataset_name is not None:
        import datasets

        if source_lang == target_lang:
            raise ValueError(f"source_lang and target_lang (--source_lang, --target_lang) are both {source_lang!r}: a "
                             "translation needs two languages")

        if Path(dataset_name).is_file():  # datasets says "Couldn't find any data file at <the file>"
            raise ValueError(f"--dataset_name {dataset_name!r} is a file, not a dataset folder or Hub name: pass it as "
                             "--train_file (or --validation_file/--test_file), or give the folder that holds it")
        saved = (Path(dataset_name) / "dataset_dict.json").is_file()  # with save_to_disk: its own split names
        if saved and dataset_config_name:
            raise ValueError(f"--dataset_name {dataset_name!r} is a dataset saved with save_to_disk, which has no "
                             f"configurations: drop --dataset_config_name {dataset_config_name!r}")
        try:
            if saved:
                raw = datasets.load_from_disk(dataset_name)
            else:
                raw = datasets.load_dataset(dataset_name, dataset_config_name)
        except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
            # Offline, a misspelt name, a configuration it lacks, a builder that needs data files: datasets' own
            # message says which, ours says where it came from.
            where = f"--dataset_name {dataset_name!r}" + (f" --dataset_config_name {dataset_config_name!r}"
                                                        if dataset_config_name else "")
            if (Path(dataset_name) / "state.json").is_file():  # datasets' advice (load_from_disk) is no flag of ours
                raise ValueError(f"{where}: the folder holds one Dataset saved with save_to_disk, which has no split "
                                 "names; save it as a DatasetDict instead, e.g. DatasetDict({'train': dataset})"
                                 ".save_to_disk(folder)") from error
            raise ValueError(f"{where}: could not be loaded ({type(error).__name__}: {error})") from error
        return _convert_hub_dataset(raw, dataset_name, source_lang, target_lang, max_bad_lines_shown)
    if given:
        return DatasetDict(
            {
                split: read_parallel_file(
                    f, source_lang, target_lang, split=split, max_bad_lines_shown=max_bad_lines_shown
                )
                for split, f in given.items()
            }
        )
    if (source_lang, target_lang) != (BUILTIN_SOURCE_LANG, BUILTIN_TARGET_LANG):
        raise ValueError(
            f"no data given and the built-in task is {BUILTIN_SOURCE_LANG}->{BUILTIN_TARGET_LANG}, "
            f"not {source_lang}->{target_lang}; pass --train_file (or --dataset_name, where the script has it)"
        )
    return builtin_task()


# --------------------------------------------------------------------------------------------------
# Tokenisation


def tokenize_pairs(
    dataset: Dataset, tokenizer, max_source_length: int, max_target_length: int, num_proc: int | None = None
) -> tuple[Dataset, int]:
    """Add "input_ids" and "labels" (each ending with eos) and drop over-long pairs.

    Keeps "source" and "target" so evaluation can use the same rows. Returns (dataset, number dropped)
    where a pair is dropped when its source has more than `max_source_length` tokens or its target
    more than `max_target_length` (eos included). `num_proc` parallelises `datasets.map`.
    """
    if max_source_length < 1 or max_target_length < 1:
        raise ValueError(f"max lengths must be >= 1, got {max_source_length}, {max_target_length}")
    features = Features(
        {
            "source": Value("string"),
            "target": Value("string"),
            "input_ids": List(Value("int32")),  # int32 halves memory; the collator makes int64 tensors
            "labels": List(Value("int32")),
        }
    )

    def encode(batch):
        src = tokenizer(batch["source"])["input_ids"]
        tgt = tokenizer(text_target=batch["target"])["input_ids"]
        out = {name: [] for name in features}
        for s_text, t_text, s, t in zip(batch["source"], batch["target"], src, tgt):
            if len(s) <= max_source_length and len(t) <= max_target_length:
                out["source"].append(s_text)
                out["target"].append(t_text)
                out["input_ids"].append(s)
                out["labels"].append(t)
        return out

    extra = [c for c in dataset.column_names if c not in ("source", "target")]
    if extra:
        dataset = dataset.remove_columns(extra)
    out = dataset.map(
        encode,
        batched=True,
        remove_columns=dataset.column_names,
        features=features,
        num_proc=num_proc,
        desc="tokenize",
    )
    return out, len(dataset) - len(out)


def token_lengths(dataset: Dataset, digest=None) -> tuple[np.ndarray, np.ndarray]:
    """(source lengths, target lengths) of a tokenised dataset, read from Arrow without Python lists. With `digest`
    (a `hashlib` object), every pair's ids, in order, and the lengths that delimit them are fed to it: a fingerprint
    of the data as trained on (at 4.5M pairs a few seconds)."""
    src, tgt = [], []
    for batch in dataset.with_format("arrow").iter(batch_size=100_000):
        src.append(pc.list_value_length(batch["input_ids"]).to_numpy(zero_copy_only=False))
        tgt.append(pc.list_value_length(batch["labels"]).to_numpy(zero_copy_only=False))
        if digest is not None:
            for column, lengths in (("input_ids", src[-1]), ("labels", tgt[-1])):
                digest.update(lengths.astype(np.int64).tobytes())
                digest.update(pc.list_flatten(batch[column]).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    if not src:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(src).astype(np.int64), np.concatenate(tgt).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Batching


class TokenBatchSampler:
    """Batches by token count, as the paper did ("approximately 25000 source tokens and 25000 target tokens").

    Per epoch: the example order is shuffled (seeded by `seed` and the epoch), cut into buckets of
    `bucket_size` examples, each bucket sorted by (source, target) length, and packed greedily into
    batches such that ``len(batch) * max(length in batch) <= max_tokens`` for sources and targets
    alike (the padded size the memory sees); then the batch order is shuffled. `max_sentences` caps
    examples per batch. Every example is in exactly one batch per epoch. An example longer than
    `max_tokens` on either side is an error at construction (filter with `tokenize_pairs` first).

    With `shuffle=False` there is no randomness: buckets follow the dataset order and batches come in
    length order (good for evaluation).

    Distributed (`num_replicas` > 1): the epoch's batch count is made a multiple of `num_replicas` by
    splitting the largest batches in two, which keeps every example exactly once and the token bound;
    rank r takes batches r, r + num_replicas, ... so ranks get disjoint, equal-count shares whose union is
    the epoch. Only if there are too few examples to split (fewer examples than needed batches) are the
    last surplus batches dropped, with a warning. `batch_count_multiple` overrides the multiple, so a
    one-process run can reproduce the batches of a k-process run (give it k).

    Resuming: `state_dict()` records the epoch and how many of this rank's batches were yielded (or the
    count you pass, if a DataLoader with workers prefetched ahead); after `load_state_dict`, the next
    `__iter__` continues with the next batch of the same order. `len()` is this rank's full epoch.
    """

    def __init__(
        self,
        source_lengths: Sequence[int],
        target_lengths: Sequence[int],
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        bucket_size: int | None = 100_000,
        max_sentences: int | None = None,
        batch_count_multiple: int | None = None,
    ):
        self.source_lengths = np.asarray(source_lengths, dtype=np.int64).reshape(-1)
        self.target_lengths = np.asarray(target_lengths, dtype=np.int64).reshape(-1)
        n = len(self.source_lengths)
        if len(self.target_lengths) != n:
            raise ValueError(f"{n} source lengths but {len(self.target_lengths)} target lengths")
        if n == 0:
            raise ValueError("TokenBatchSampler got no examples")
        if int(max_tokens) != max_tokens or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        if bucket_size is not None and bucket_size < 1:
            raise ValueError(f"bucket_size must be positive or None, got {bucket_size}")
        if max_sentences is not None and max_sentences < 1:
            raise ValueError(f"max_sentences must be positive or None, got {max_sentences}")
        if (self.source_lengths < 0).any() or (self.target_lengths < 0).any():
            raise ValueError("lengths must be non-negative")
        too_long = np.flatnonzero((self.source_lengths > max_tokens) | (self.target_lengths > max_tokens))
        if len(too_long):
            i = int(too_long[0])
            raise ValueError(
                f"{len(too_long)} example(s) do not fit in max_tokens={max_tokens}, e.g. example {i} with "
                f"{self.source_lengths[i]} source / {self.target_lengths[i]} target tokens; drop long pairs "
                f"(tokenize_pairs max lengths <= max_tokens) or raise max_tokens"
            )
        self.max_tokens = int(max_tokens)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        self.bucket_size = bucket_size or n
        self.max_sentences = max_sentences
        self.batch_count_multiple = batch_count_multiple or num_replicas
        if n < self.batch_count_multiple:
            raise ValueError(self._too_few_message(n))
        self.epoch = 0
        self._start = 0  # batches to skip at the next __iter__ (set by load_state_dict)
        self._consumed = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def _too_few_message(self, n: int) -> str:
        return (f"{n} training pairs are too few for {self.batch_count_multiple} batches per update "
                f"({self.num_replicas} process(es) x {self.batch_count_multiple // self.num_replicas} accumulated "
                "micro-batches): lower gradient_accumulation_steps, or train on more pairs.")

    # -- building an epoch -----------------------------------------------------------------------

    def _pack(self, idx: np.ndarray) -> list[list[int]]:
        src, tgt = self.source_lengths[idx].tolist(), self.target_lengths[idx].tolist()
        cap_n = self.max_sentences or math.inf
        batches, cur, max_s, max_t = [], [], 0, 0
        for i, s, t in zip(idx.tolist(), src, tgt):
            ms, mt = max(max_s, s), max(max_t, t)
            k = len(cur) + 1
            if cur and (k * ms > self.max_tokens or k * mt > self.max_tokens or k > cap_n):
                batches.append(cur)
                cur, ms, mt = [], s, t
            cur.append(i)
            max_s, max_t = ms, mt
        if cur:
            batches.append(cur)
        return batches

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of `epoch`, in order (rank r takes items r, r + num_replicas, ...)."""
        n = len(self.source_lengths)
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        order = rng.permutation(n) if rng is not None else np.arange(n)
        batches: list[list[int]] = []
        for start in range(0, n, self.bucket_size):
            bucket = order[start : start + self.bucket_size]
            # stable sort keeps the shuffled order among equal lengths: random tie-breaking
            key = self.source_lengths[bucket] * (int(self.target_lengths.max()) + 1) + self.target_lengths[bucket]
            batches.extend(self._pack(bucket[np.argsort(key, kind="stable")]))
        m = self.batch_count_multiple
        while len(batches) % m:
            j = max(range(len(batches)), key=lambda b: len(batches[b]))  # first largest
            if len(batches[j]) < 2:
                break
            half = len(batches[j]) // 2
            batches[j : j + 1] = [batches[j][:half], batches[j][half:]]
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if len(batches) % m:
            dropped = len(batches) % m
            logger.warning(
                "TokenBatchSampler: %d examples cannot form a multiple of %d batches; dropping %d batch(es) this epoch",
                n,
                m,
                dropped,
            )
            batches = batches[: len(batches) - dropped]
            if not batches:
                raise ValueError(self._too_few_message(n))
        return batches

    def _rank_batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self.global_batches(self.epoch)[self.rank :: self.num_replicas])
        return self._cache[1]

    # -- the sampler protocol --------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (the shuffling seed); a new epoch starts from its first batch."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._start = 0
            self._consumed = 0

    def __len__(self) -> int:
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        start, self._start = self._start, 0
        self._consumed = start
        for batch in batches[start:]:
            self._consumed += 1
            yield list(batch)

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        """The position in the data order; the same on every rank."""
        return {
            "epoch": self.epoch,
            "batches_consumed": self._consumed if batches_consumed is None else int(batches_consumed),
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "max_tokens": self.max_tokens,
            "num_examples": len(self.source_lengths),
            "shuffle": self.shuffle,
            "batch_count_multiple": self.batch_count_multiple,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next `__iter__` yields batch `batches_consumed` of epoch `epoch` onwards."""
        mine = self.state_dict()
        mismatched = {
            k: (state.get(k), mine[k])
            for k in ("seed", "num_replicas", "max_tokens", "num_examples", "shuffle", "batch_count_multiple")
            if k in state and state[k] != mine[k]
        }
        if mismatched:
            names = {"batch_count_multiple": "batch_count_multiple (processes x gradient_accumulation_steps)"}
            detail = ", ".join(f"{names.get(k, k)}: saved {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"cannot resume the data order, the batching settings changed ({detail})")
        self.epoch = int(state["epoch"])
        self._start = self._consumed = int(state["batches_consumed"])
        if not 0 <= self._start <= len(self):
            raise ValueError(f"batches_consumed={self._start} is outside epoch {self.epoch}'s {len(self)} batches")


# --------------------------------------------------------------------------------------------------
# Collation


class Seq2SeqCollator:
    """Pad a list of {"input_ids", "labels"} examples into LongTensors.

    Returns `input_ids` (padded with `pad_token_id`), `attention_mask` (1 on real tokens) and `labels`
    (padded with -100, which the loss ignores). The model builds `decoder_input_ids` from `labels`.
    """

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    def _pad(self, seqs: list, value: int) -> torch.Tensor:
        width = max((len(s) for s in seqs), default=0)
        out = torch.full((len(seqs), width), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            if len(s):
                out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        return out

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("Seq2SeqCollator got an empty batch")
        inputs = [e["input_ids"] for e in examples]
        batch = {"input_ids": self._pad(inputs, self.pad_token_id)}
        lengths = torch.tensor([len(s) for s in inputs])
        batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1])[None, :] < lengths[:, None]).long()
        if "labels" in examples[0]:
            batch["labels"] = self._pad([e["labels"] for e in examples], -100)
        return batch
