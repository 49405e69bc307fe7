#!/usr/bin/env python
"""BLEU and chrF (with sacrebleu's signatures) and exact match of a saved model on a test set.

    python scripts/evaluate.py --model outputs/transformer-tiny                      # built-in test split
    python scripts/evaluate.py --model M --test_file test.jsonl --source_lang en --target_lang de
    python scripts/evaluate.py --model M --source_file newstest.en --reference_file newstest.de
"""

import os
import sys

# Run as `python scripts/x.py`, Python puts scripts/ first on sys.path, where evaluate.py would shadow the
# `evaluate` library that the metrics use: drop it (this file imports nothing from scripts/).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

import argparse
import json
import time
from pathlib import Path

from modeling_seq2seq.checkpointing import recorded_run
from modeling_seq2seq.data import line_aligned_files
from modeling_seq2seq.training import (
    bleu_tokenizer,
    check_device,
    check_num_beams,
    check_output_file,
    finite_float,
    load_model_and_tokenizer,
    read_text_lines,
    stoppable,
    translate_texts,
    translation_metrics,
    write_output_file,
)


def load_test_pairs(args) -> tuple[list[str], list[str], str, bool, tuple[list[int], int] | None]:
    """(sources, references, description, effective_order, lines) from the arguments; for --source_file, `lines` is
    (the line indices of the evaluated pairs, the number of lines), else None."""
    if args.source_file or args.reference_file:
        if not (args.source_file and args.reference_file):
            raise ValueError("--source_file and --reference_file go together")
        from modeling_seq2seq.data import warn_skipped_pairs

        sources = read_text_lines(args.source_file, "--source_file")
        references = read_text_lines(args.reference_file, "--reference_file")
        if len(sources) != len(references):
            raise ValueError(f"{args.source_file} has {len(sources)} lines but {args.reference_file} has {len(references)}")
        # As in the data files: a pair with an empty side is skipped, not translated and scored.
        kept = [i for i, (s, r) in enumerate(zip(sources, references)) if s.strip() and r.strip()]
        empty = sorted(set(range(len(sources))) - set(kept))
        warn_skipped_pairs(f"{args.source_file} / {args.reference_file}", [i + 1 for i in empty[:10]], len(empty))
        return ([sources[i].strip() for i in kept], [references[i].strip() for i in kept], args.source_file, False,
                (kept, len(sources)))
    if args.test_file:
        from modeling_seq2seq.data import read_parallel_file

        split = read_parallel_file(args.test_file, args.source_lang, args.target_lang, split="test")
        return list(split["source"]), list(split["target"]), args.test_file, False, None
    from modeling_seq2seq.data import builtin_task
    from modeling_seq2seq.training import BUILTIN_DATASET

    split = builtin_task()["test"]
    # One-word German numbers: BLEU needs effective order, or it is 0 even for perfect output.
    return list(split["source"]), list(split["target"]), BUILTIN_DATASET, True, None


# The options evaluate.py takes from train.py's record when unset: (recorded name, fallback, least valid value).
RECORDED_DEFAULTS = {"source_lang": ("source_lang", "en", None), "target_lang": ("target_lang", "de", None),
                     "batch_size": ("eval_batch_size", 64, 1), "max_source_length": ("max_source_length", None, 2),
                     "max_new_tokens_extra": ("max_new_tokens_extra", 50, 0)}


@stoppable
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved model folder")
    parser.add_argument("--test_file", help="a .jsonl/.json/.csv/.tsv file of pairs, or the prefix P of line-aligned P.<source_lang> and P.<target_lang>")
    parser.add_argument("--source_lang", default=None,
                        help="default: the language pair the model was trained on (as train.py recorded it in the "
                             "folder: eval_results.json, a checkpoint's trainer_state.json, an average's checkpoints), "
                             "else en, with a warning")
    parser.add_argument("--target_lang", default=None, help="default: as --source_lang's, else de")
    parser.add_argument("--source_file", help="plain text sources, one per line (with --reference_file)")
    parser.add_argument("--reference_file", help="plain text references, line-aligned with --source_file")
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N pairs")
    parser.add_argument("--num_beams", type=int, default=None, help="beam size (default: the model's generation config)")
    parser.add_argument("--length_penalty", type=finite_float, default=None)
    parser.add_argument("--batch_size", type=int, default=None,
                        help="sentences per generate call (default: train.py's eval_batch_size where recorded, else "
                             "64); a batch may generate up to its longest source + N tokens (train.py's "
                             "max_new_tokens_extra where recorded, else 50), so a sentence that does not end can be "
                             "cut at another length in another batch")
    parser.add_argument("--max_source_length", type=int, default=None,
                        help="truncate sources to this many tokens (default: train.py's max_source_length where "
                             "recorded, as its test cut them, else the model's max_position_embeddings)")
    parser.add_argument("--effective_order", action=argparse.BooleanOptionalAction, default=None,
                        help="BLEU effective order (default: on for the built-in task only)")
    parser.add_argument("--tokenize", default=None,
                        help="sacrebleu's BLEU tokenizer (13a, intl, char, zh, ja-mecab, ...; default: as sacrebleu's "
                             "command line for --target_lang: zh for Chinese, ja-mecab for Japanese, ko-mecab for "
                             "Korean, else 13a)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output_json", help="also write the scores here")
    parser.add_argument("--predictions_file", help="also write the translations here, one per line (with --source_file, "
                        "line for line: a pair skipped for an empty side leaves its line empty)")
    args = parser.parse_args(argv)
    for option in ("max_samples", "num_beams", "batch_size"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option} must be positive")
    if args.max_source_length is not None and args.max_source_length < 2:
        parser.error("--max_source_length must be at least 2 (a token and </s>)")
    # Unset, the options take what train.py used for this model, so that its test score is reproduced.
    trained, recorded_in = recorded_run(Path(args.model))
    taken, shown = {}, []  # option -> the recorded value used (None: the fallback)
    for option, (name, fallback, least) in RECORDED_DEFAULTS.items():
        if getattr(args, option, None) is not None:  # given (max_new_tokens_extra is no option: always recorded's)
            continue
        recorded = trained.get(name)
        usable = (isinstance(recorded, str) and recorded.strip()) if least is None else (
            type(recorded) is int and recorded >= least)
        taken[option] = recorded if usable else None
        setattr(args, option, recorded if usable else fallback)
        if usable:
            shown.append(f"{name} {recorded}")
    if shown:
        print(f"As train.py ran this model ({recorded_in}): {', '.join(shown)}", file=sys.stderr)
    unknown = [f"--{k}" for k in ("source_lang", "target_lang") if k in taken and taken[k] is None]
    if unknown and (args.test_file or args.source_file):
        print(f"warning: {args.model} records no language pair (no eval_results.json or checkpoint state of train.py's): "
              f"taking {args.source_lang}->{args.target_lang}; pass {' and '.join(unknown)} (the target language picks "
              "the BLEU tokenizer).", file=sys.stderr)
    if args.test_file and (args.source_file or args.reference_file):
        parser.error("--test_file or --source_file/--reference_file: one test set, not both")

    try:
        check_device(args.device)
        try:
            tokenize = bleu_tokenizer(args.target_lang, args.tokenize)
        except ValueError as error:
            raise ValueError(f"--tokenize: {error}") from None
        inputs = {"--test_file": args.test_file, "--source_file": args.source_file, "--reference_file": args.reference_file}
        if args.test_file and (aligned := line_aligned_files(args.test_file, args.source_lang, args.target_lang)):
            inputs.update({f"--test_file's {path.suffix[1:]} side": str(path) for path in aligned})
        check_output_file(args.output_json, "--output_json", {**inputs, "--predictions_file": args.predictions_file},
                          args.model)
        check_output_file(args.predictions_file, "--predictions_file", inputs, args.model)
        sources, references, description, effective_order, lines = load_test_pairs(args)
        if not sources:
            raise ValueError(f"{description}: no sentences to evaluate.")
        model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
        check_num_beams(args.num_beams, model)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.max_samples is not None:
        sources, references = sources[: args.max_samples], references[: args.max_samples]
    if args.effective_order is not None:
        effective_order = args.effective_order
    start = time.monotonic()
    names = [f"{args.source_file}, line {i + 1}" for i in lines[0]] if lines else None  # --source_file's
    predictions = translate_texts(model, tokenizer, sources, batch_size=args.batch_size, num_beams=args.num_beams,
                                  length_penalty=args.length_penalty,
                                  max_source_length=args.max_source_length or model.config.max_position_embeddings,
                                  max_new_tokens_extra=args.max_new_tokens_extra, names=names)
    seconds = time.monotonic() - start
    scores = translation_metrics(predictions, references, effective_order=effective_order, tokenize=tokenize)
    result = {
        "dataset": description,
        "samples": len(sources),
        "num_beams": args.num_beams or model.generation_config.num_beams or 1,  # what generate uses when unset
        "bleu": scores["bleu"],
        "chrf": scores["chrf"],
        "exact_match": scores["exact_match"],
        "bleu_signature": scores["bleu_signature"],
        "chrf_signature": scores["chrf_signature"],
        "translate_time_s": round(seconds, 2),
    }
    print(f"{description}: {len(sources)} sentences, beam {result['num_beams']}: BLEU {scores['bleu']:.2f}  "
          f"chrF {scores['chrf']:.2f}  exact match {100 * scores['exact_match']:.2f}%  ({seconds:.1f}s)")
    print(f"BLEU signature: {scores['bleu_signature']}")
    print(f"chrF signature: {scores['chrf_signature']}")
    outputs = {}
    if args.output_json:
        outputs["--output_json"] = (args.output_json, json.dumps(result, indent=2) + "\n")
    if args.predictions_file:
        if lines is not None:  # line for line with --source_file: a skipped pair leaves its line empty
            kept, line_count = lines
            if len(predictions) < len(kept):  # --max_samples: up to the last line translated
                line_count = kept[len(predictions) - 1] + 1
            aligned = [""] * line_count
            for index, prediction in zip(kept, predictions):
                aligned[index] = prediction
            predictions = aligned
        outputs["--predictions_file"] = (args.predictions_file, "".join(p + "\n" for p in predictions))
    for option, (path, text) in outputs.items():
        try:
            write_output_file(path, text)
        except OSError as error:
            print(f"error: {option} {path!r} could not be written ({error}); the file is as it was.", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
