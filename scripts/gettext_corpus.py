#!/usr/bin/env python3
"""Real parallel text without a network: the English messages of installed programs and their translations.

Linux systems ship translated messages as gettext catalogs (`/usr/share/locale/<lang>/LC_MESSAGES/*.mo`, on Ubuntu
also `/usr/share/locale-langpack/<lang>/...`): each holds English source strings and their human translations (28,632
usable pairs for German on the Debian image this was written on; minimized images drop them). This writes them,
one-line messages of 3 to 40 words, one translation per English message (so that no source sentence is in two
splits), shuffled (seeded), as train/validation/test files in transformers' translation layout, for
`scripts/train.py`:

    python scripts/gettext_corpus.py --target_lang de --output_dir data/messages
    python scripts/train.py --config configs/train-tiny.yaml --train_file data/messages/train.jsonl \\
        --validation_file data/messages/validation.jsonl --test_file data/messages/test.jsonl \\
        --vocab_size 8000 --output_dir runs/messages

The text is software messages (format placeholders such as `%s` included): real, but narrow. Damaged catalogs,
and those whose text is not in the charset they declare, are skipped with a warning.
"""

import argparse
import collections
import glob
import json
import logging
import random
import re
import struct
import sys
from pathlib import Path

from modeling_seq2seq.checkpointing import atomic_write_text

logger = logging.getLogger("gettext_corpus")
SPLITS = ("train", "validation", "test")
CATALOG_PATTERNS = ("/usr/share/locale/{lang}/LC_MESSAGES/*.mo", "/usr/share/locale-langpack/{lang}/LC_MESSAGES/*.mo",
                    "/usr/local/share/locale/{lang}/LC_MESSAGES/*.mo", "/usr/share/*/lang/{lang}/LC_MESSAGES/*.mo",
                    "/usr/share/*/*/lang/{lang}/LC_MESSAGES/*.mo")  # the last two: programs' own, as vim's


def read_catalog(path: str) -> list[tuple[str, str]]:
    """The (English, translated) pairs of one .mo file: singular messages only, without context-qualified ones.

    The binary format is read here, not by Python's `gettext`, which decodes a catalog's header as UTF-8 before it
    has read the charset the header declares: valid ISO-8859 catalogs whose header holds a translator's accented
    name (vim's French, net-tools' German) failed there."""
    data = Path(path).read_bytes()
    try:
        order = {0x950412DE: "<", 0xDE120495: ">"}[struct.unpack_from("<I", data)[0]]
        version, count, sources_at, targets_at = struct.unpack_from(order + "4I", data, 4)
        if version >> 16 > 1:
            raise ValueError(f"unknown .mo format version {version >> 16}")

        def string(table: int, index: int) -> bytes:
            length, offset = struct.unpack_from(order + "2I", data, table + 8 * index)
            if offset + length > len(data):
                raise struct.error("a string past the end of the file")
            return data[offset:offset + length]

        entries = [(string(sources_at, index), string(targets_at, index)) for index in range(count)]
    except KeyError:
        raise ValueError("not a .mo catalog (wrong magic number)") from None
    except struct.error as error:  # a file shorter than its header or index says
        raise ValueError(f"not a complete .mo catalog ({error})") from None
    header = next((target for source, target in entries if not source), b"").decode("latin-1")
    charset = re.search(r"^content-type:.*charset=([^\s;]+)", header, re.IGNORECASE | re.MULTILINE)
    encoding = charset.group(1) if charset else "ascii"  # as Python's gettext
    return [(source.decode(encoding), target.decode(encoding)) for source, target in entries
            if source and target and b"\x04" not in source + target and b"\x00" not in source + target]


def keep(source: str, target: str, min_words: int, max_words: int) -> bool:
    """One-line sentences (a line is a training example), without tabs (TSV), of a trainable length, translated."""
    text = source + target
    return (not any(c in text for c in "\n\r\t") and min_words <= len(source.split()) <= max_words
            and source.strip() != target.strip())


def build_corpus(files: list[str], min_words: int, max_words: int, seed: int) -> list[tuple[str, str]]:
    """One pair per English message, its most frequent translation across the catalogs (ties: the first in sorted
    order), shuffled."""
    translations = collections.defaultdict(collections.Counter)
    for path in files:
        try:
            for source, target in read_catalog(path):
                if keep(source, target, min_words, max_words):
                    translations[source][target] += 1
        except (OSError, UnicodeDecodeError, ValueError, LookupError) as error:
            logger.warning("Skipped %s: %s", path, error)
    pairs = [(source, min(counts, key=lambda target: (-counts[target], target)))
             for source, counts in sorted(translations.items())]
    random.Random(seed).shuffle(pairs)
    return pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target_lang", default="de", help="the catalogs' language code (a folder name under the locale dirs)")
    parser.add_argument("--source_lang", default="en", help="the key the English side gets in the output")
    parser.add_argument("--catalogs", nargs="+", help="the .mo files (default: the system's, under /usr/share/locale, "
                        "/usr/local/share/locale and programs' own lang folders)")
    parser.add_argument("--output_dir", required=True, help="folder for train.jsonl, validation.jsonl and test.jsonl")
    parser.add_argument("--held_out", type=int, default=1000, help="pairs in each of validation and test")
    parser.add_argument("--min_words", type=int, default=3)
    parser.add_argument("--max_words", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace the split files already in --output_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.held_out < 1 or not 1 <= args.min_words <= args.max_words:
        parser.error("--held_out must be positive, and 1 <= --min_words <= --max_words")
    if not args.source_lang.strip() or not args.target_lang.strip() or args.source_lang == args.target_lang:
        parser.error("--source_lang and --target_lang must be two different, non-empty codes (each names a side of a pair)")
    output_dir = Path(args.output_dir)
    outputs = [output_dir / f"{split}.jsonl" for split in SPLITS]
    if output_dir.exists() and not output_dir.is_dir():
        parser.error(f"--output_dir {output_dir} is a file")
    present = [path.name for path in outputs if path.exists()]
    if present and not args.overwrite:
        parser.error(f"--output_dir {output_dir} already holds {', '.join(present)}; pass --overwrite to replace them")

    lang = glob.escape(args.target_lang)
    files = args.catalogs or sorted({path for pattern in CATALOG_PATTERNS for path in glob.glob(pattern.format(lang=lang))})
    if not files:
        parser.error(f"no gettext catalogs (.mo) for language {args.target_lang!r} in {', '.join(CATALOG_PATTERNS)}; "
                     "name some with --catalogs")
    missing = [path for path in files if not Path(path).is_file()]
    if missing:
        parser.error(f"--catalogs: no such file: {missing[0]}")
    pairs = build_corpus(files, args.min_words, args.max_words, args.seed)
    if len(pairs) < 2 * args.held_out + 1:
        print(f"error: {len(files)} catalogs gave {len(pairs)} usable pairs, too few for 2 x --held_out "
              f"{args.held_out} and a training split.", file=sys.stderr)
        return 1
    held = args.held_out
    splits = {"test": pairs[:held], "validation": pairs[held:2 * held], "train": pairs[2 * held:]}
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # The earlier splits go first: a stop while writing then leaves a split missing (an error when read), never
        # a new training split beside an old test split that overlaps it.
        for path in outputs:
            path.unlink(missing_ok=True)
        for split, path in zip(SPLITS, outputs):
            atomic_write_text(path, "".join(
                json.dumps({"translation": {args.source_lang: source, args.target_lang: target}}, ensure_ascii=False)
                + "\n" for source, target in splits[split]))
    except OSError as error:
        print(f"error: --output_dir {output_dir}: {error}", file=sys.stderr)
        return 1
    print(f"{len(pairs)} pairs from {len(files)} catalogs: {len(splits['train'])} train, {held} validation, {held} test "
          f"in {output_dir}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
