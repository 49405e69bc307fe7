#!/usr/bin/env python
"""Translate a file (or stdin) line by line with a saved model.

    python scripts/translate.py --model outputs/transformer-tiny --input sentences.txt --output out.txt
    echo "three hundred and forty-two" | python scripts/translate.py --model outputs/transformer-tiny

Lines are translated in batches of similar length (sorted within the file) and written back in the input
order; empty lines stay empty. Beam size and length penalty default to the model's generation config.
"""

import os
import sys

# Run as `python scripts/x.py`, Python puts scripts/ first on sys.path, where evaluate.py would shadow the
# `evaluate` library that the metrics use: drop it (this file imports nothing from scripts/).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

import argparse

from modeling_seq2seq.training import (
    check_device,
    check_num_beams,
    check_output_file,
    finite_float,
    load_model_and_tokenizer,
    read_text_lines,
    stoppable,
    translate_texts,
    write_output_file,
)


@stoppable
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved model folder (from scripts/train.py)")
    parser.add_argument("--input", default="-", help="text file, one sentence per line (default: stdin)")
    parser.add_argument("--output", default="-", help="where to write translations (default: stdout)")
    parser.add_argument("--num_beams", type=int, default=None, help="beam size (default: the model's generation config)")
    parser.add_argument("--length_penalty", type=finite_float, default=None, help="beam length penalty (default: generation config)")
    parser.add_argument("--batch_size", type=int, default=64, help="sentences per batch")
    parser.add_argument("--max_new_tokens_extra", type=int, default=50, help="a batch may produce up to its longest source length + N tokens (so a line's limit depends on the lines batched with it; --batch_size 1 gives each line its own)")
    parser.add_argument("--max_source_length", type=int, default=None,
                        help="truncate longer inputs (tokens), with a warning naming their lines (default: the model's "
                             "max_position_embeddings: a runaway line would otherwise take minutes to translate)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="weights dtype")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.num_beams is not None and args.num_beams < 1):
        parser.error("--batch_size and --num_beams must be positive")
    if args.max_new_tokens_extra < 0:
        parser.error("--max_new_tokens_extra must be 0 or more")
    if args.max_source_length is not None and args.max_source_length < 2:
        parser.error("--max_source_length must be at least 2 (a token and </s>)")

    try:
        check_device(args.device)
        check_output_file(args.output, "--output", {"--input": args.input}, args.model)
        model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype)
        check_num_beams(args.num_beams, model)
        lines = read_text_lines(args.input, "--input")  # after the model: stdin may be a pipe still being written
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    wanted = [i for i, line in enumerate(lines) if line.strip()]
    translations = translate_texts(
        model,
        tokenizer,
        [lines[i].strip() for i in wanted],
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        max_new_tokens_extra=args.max_new_tokens_extra,
        max_source_length=args.max_source_length or model.config.max_position_embeddings,
        names=[f"{args.input if args.input != '-' else 'stdin'}, line {i + 1}" for i in wanted],
    )
    outputs = [""] * len(lines)
    for index, translation in zip(wanted, translations):
        outputs[index] = translation
    text = "".join(line + "\n" for line in outputs)
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    try:
        write_output_file(args.output, text)
    except OSError as error:
        print(f"error: --output {args.output!r} could not be written ({error}); the file is as it was.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
