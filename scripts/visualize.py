#!/usr/bin/env python
"""Pictures of the Transformer (needs matplotlib: pip install ".[viz]").

    python scripts/visualize.py attention --model outputs/transformer-tiny --source "thirty-four" --out pictures
    python scripts/visualize.py positions --d_model 512 --length 100 --out pictures
    python scripts/visualize.py training --run outputs/transformer-tiny --out pictures
    python scripts/visualize.py alignment --model outputs/transformer-tiny --out pictures

Every command writes PNG files into --out and prints their paths, one per line, on standard output;
anything else it reports goes to standard error.
"""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

# Run as `python scripts/x.py`, Python puts scripts/ first on sys.path, where evaluate.py would shadow the
# `evaluate` library: drop it (this file imports nothing from scripts/).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from modeling_seq2seq import viz  # noqa: E402
from modeling_seq2seq.checkpointing import CheckpointError, probe_writable  # noqa: E402
from modeling_seq2seq.training import stoppable, write_output_file  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    attention = commands.add_parser("attention", help="cross- (and self-) attention heatmaps of one translation")
    attention.add_argument("--model", required=True, help="a saved model folder (model and tokenizer)")
    attention.add_argument("--source", required=True, help="the source sentence")
    attention.add_argument("--target", help="the target sentence (default: the model's greedy translation)")
    attention.add_argument("--self_attention", action="store_true", help="also draw encoder and decoder self-attention")
    attention.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    attention.add_argument("--out", required=True, help="folder for the PNG files")

    positions = commands.add_parser("positions", help="the sinusoidal positional encoding (Section 3.5)")
    positions.add_argument("--d_model", type=int, default=512, help="model width (default: 512)")
    positions.add_argument("--length", type=int, default=100, help="number of positions (default: 100)")
    positions.add_argument("--layout", choices=("split", "interleaved"), default="split",
                           help="where the sines and cosines sit (the model config's positional_encoding_layout)")
    positions.add_argument("--dims", type=int, nargs="+", help="dimensions drawn as curves (default: four frequencies)")
    positions.add_argument("--out", required=True, help="folder for the PNG files")

    training = commands.add_parser("training", help="loss, learning rate and BLEU of a training run")
    training.add_argument("--run", required=True, help="the run's output folder (or its training_log.jsonl)")
    training.add_argument("--out", required=True, help="folder for the PNG files")

    alignment = commands.add_parser(
        "alignment", help="built-in task: how often a German unit word's cross-attention peaks on its English word")
    alignment.add_argument("--model", required=True, help="a model trained on the built-in task")
    alignment.add_argument("--split", default="test", choices=("train", "validation", "test"))
    alignment.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    alignment.add_argument("--out", required=True, help="folder for the PNG file and alignment.json")
    return parser


MAX_POSITIONS = 20_000  # --length: its similarity map is length x length floats
MAX_TABLE = 20_000 * 1024  # --length x --d_model: the encoding table's floats (80 MB)


def run(args) -> list:
    if os.path.exists(args.out) and not os.path.isdir(args.out):  # before any work
        raise ValueError(f"--out {args.out!r} is a file, not a folder.")
    if args.command == "positions":
        if args.length > MAX_POSITIONS:
            raise ValueError(f"--length must be at most {MAX_POSITIONS}, got {args.length}.")
        if args.length * args.d_model > MAX_TABLE:
            raise ValueError(f"--length x --d_model must be at most {MAX_TABLE:,} (the table's values), got "
                             f"{args.length:,} x {args.d_model:,}.")
        return viz.draw_positions(args.d_model, args.length, args.out, args.layout, args.dims)
    if args.command == "training":
        return viz.draw_training(args.run, args.out)
    viz.require_matplotlib()  # fail before loading a model
    for name in ("source", "target"):
        text = getattr(args, name, None)
        if text is not None and not text.strip():
            raise ValueError(f"--{name} is empty.")
        try:  # bytes the terminal's encoding did not decode reach Python as lone surrogates
            None if text is None else text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"--{name} is not UTF-8 text (set the terminal to UTF-8, or type it again).") from None
    missing = [folder for folder in (Path(args.out), *Path(args.out).parents) if not folder.exists()]
    probe_writable(args.out)  # a folder that cannot be written fails before the model is loaded, named as --out
    try:
        return draw_from_model(args)
    except BaseException:  # the folders the probe made, if still empty: not left behind by a run that drew nothing
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def draw_from_model(args) -> list:
    model, tokenizer = viz.load_model(args.model, args.device)
    if args.command == "attention":
        maps = viz.attention_maps(model, tokenizer, args.source, args.target)
        print(f"{'translation' if maps.generated else 'target'}: {maps.translation}", file=sys.stderr)
        return viz.draw_attention(maps, args.out, self_attention=args.self_attention)
    from modeling_seq2seq.data import builtin_task

    split = builtin_task()[args.split]
    report = viz.unit_word_alignment(model, tokenizer, split["source"], split["target"])
    os.makedirs(args.out, exist_ok=True)
    write_output_file(os.path.join(args.out, "alignment.json"), json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    parts = [f"{args.split} split: {report.compound_examples} numbers ending in a compound such as thirty-four"]
    for name in ("separable", "all", "own_subwords"):
        share = getattr(report, name)
        parts.append(f"  {name}: the unit word's averaged cross-attention row peaks on the English unit word for "
                     f"{share.hits} of {share.examples} ({share.share:.1%}; chance {share.chance:.1%})")
    parts.append("  separable, by layer: " + ", ".join(f"{s:.1%}" for s in report.layer_shares))
    print("\n".join(parts), file=sys.stderr)
    return viz.draw_alignment(report, args.out)


@stoppable
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = run(args)
    except viz.MatplotlibMissing as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except CheckpointError as error:
        print(f"error: --out: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:  # a missing or unwritable path, a bad argument or file
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
