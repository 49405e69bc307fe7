#!/usr/bin/env python3
"""Train the shared source+target BPE vocabulary and save it as a PreTrainedTokenizerFast.

    python scripts/train_tokenizer.py --vocab_size 1000 --output_dir out/tokenizer            # built-in task
    python scripts/train_tokenizer.py --train_file train.jsonl --source_lang en --target_lang de \
        --vocab_size 37000 --output_dir out/tokenizer
"""

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from modeling_seq2seq.checkpointing import (SYSTEM_FILES, TOKENIZER_FILE_NAMES, CheckpointError, is_mkdtemp_folder,
                                           probe_writable)
from modeling_seq2seq.tokenization import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, STAGING_PREFIX, train_tokenizer_from_data
from modeling_seq2seq.training import stoppable


@stoppable
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to save tokenizer.json and tokenizer_config.json")
    parser.add_argument("--vocab_size", type=int, required=True, help="total size, specials and byte tokens included")
    parser.add_argument("--min_frequency", type=int, default=2)
    parser.add_argument("--train_file", help=".jsonl/.json/.csv/.tsv, or the prefix P of line-aligned P.<source_lang> and P.<target_lang>; without it and --dataset_name: the built-in task")
    parser.add_argument("--dataset_name", help="a datasets Hub dataset in the translation layout (e.g. wmt14)")
    parser.add_argument("--dataset_config_name", help="its configuration (e.g. de-en)")
    parser.add_argument("--source_lang", default="en")
    parser.add_argument("--target_lang", default="de")
    parser.add_argument("--model_max_length", type=int, default=1024)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier tokenizer in --output_dir (a folder of tokenizer files alone)")
    args = parser.parse_args(argv)
    if not MIN_VOCAB_SIZE <= args.vocab_size <= MAX_VOCAB_SIZE:
        parser.error(f"--vocab_size must be from {MIN_VOCAB_SIZE} (the special and byte tokens, and one more) to "
                     f"{MAX_VOCAB_SIZE:,}")
    if args.model_max_length < 1 or args.min_frequency < 1:
        parser.error("--model_max_length and --min_frequency must be positive")
    if args.dataset_config_name and not args.dataset_name:
        parser.error("--dataset_config_name needs --dataset_name")
    # Checked before training, which can take long: a model's folder holds its tokenizer (a new vocabulary there would
    # silently break the model), and any other file there may be the user's.
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        parser.error(f"--output_dir {args.output_dir!r} is a file, not a folder")
    held = sorted(entry.name for entry in output_dir.iterdir()) if output_dir.is_dir() else []
    for name in held[:]:  # a save's staging folder, left by a killed save: tokenizer files alone, else it is kept
        staging = output_dir / name
        if is_mkdtemp_folder(staging, STAGING_PREFIX) and all(
                entry.name in TOKENIZER_FILE_NAMES and entry.is_file() for entry in staging.iterdir()):
            shutil.rmtree(staging, ignore_errors=True)
            if not os.path.lexists(staging):
                held.remove(name)
    listed = f"{', '.join(held[:6])}{', ...' if len(held) > 6 else ''}"
    if held and not args.overwrite:
        print(f"error: --output_dir {args.output_dir} is not empty ({listed}): a new vocabulary would replace the files "
              "of a model or tokenizer there. Choose another --output_dir, or pass --overwrite.", file=sys.stderr)
        return 1
    if set(held) - set(TOKENIZER_FILE_NAMES) - SYSTEM_FILES:  # with --overwrite: a model's folder, or the user's files
        print(f"error: --output_dir {args.output_dir} holds more than an earlier tokenizer ({listed}): --overwrite "
              "replaces tokenizer files alone, and a new vocabulary beside a model's weights would silently break it. "
              "Choose another --output_dir.", file=sys.stderr)
        return 1
    try:  # a folder that cannot be made or written (under a file, read-only) fails now, not after the training
        probe_writable(output_dir)
    except CheckpointError as error:
        print(f"error: --output_dir: {error}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        tokenizer = train_tokenizer_from_data(
            args.vocab_size,
            args.output_dir,
            min_frequency=args.min_frequency,
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            train_file=args.train_file,
            source_lang=args.source_lang,
            target_lang=args.target_lang,
            model_max_length=args.model_max_length,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"saved a vocabulary of {len(tokenizer)} tokens to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
