#!/usr/bin/env python
"""Average the weights of several checkpoints (the paper averaged the last 5 or 20) into a loadable model.

    python scripts/average_checkpoints.py --checkpoints out/checkpoint-800 out/checkpoint-900 --output out/avg
    python scripts/average_checkpoints.py --input_dir out --last 5 --output out/averaged
"""

import os
import sys

# Run as `python scripts/x.py`, Python puts scripts/ first on sys.path, where evaluate.py would shadow the
# `evaluate` library that the metrics use: drop it (this file imports nothing from scripts/).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

import argparse
from pathlib import Path

from modeling_seq2seq.checkpointing import CheckpointError, average_checkpoints, last_checkpoints
from modeling_seq2seq.training import stoppable


@stoppable
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoints", nargs="+", help="model folders to average")
    source.add_argument("--input_dir", help="a training output folder: average its newest complete checkpoints")
    parser.add_argument("--last", type=int, default=5, help="with --input_dir: how many checkpoints (default 5)")
    parser.add_argument("--output", required=True, help="folder for the averaged model")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it holds an earlier average (averaged_from.json)")
    args = parser.parse_args(argv)
    if args.input_dir is not None and args.last < 1:
        parser.error("--last must be at least 1")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        parser.error(f"--output {args.output!r} is a file, not a folder")
    try:
        if args.input_dir is not None and not Path(args.input_dir).is_dir():
            raise CheckpointError(f"--input_dir {args.input_dir!r} does not exist or is not a folder.")
        folders = args.checkpoints or last_checkpoints(args.input_dir, args.last)
        if not folders:
            raise CheckpointError(f"No complete checkpoints in {args.input_dir!r}.")
        if args.input_dir is not None and len(folders) < args.last:
            print(f"Asked for the last {args.last} checkpoints; {args.input_dir} holds only {len(folders)} complete ones.")
        output = average_checkpoints(folders, args.output, overwrite=args.overwrite)
    except (CheckpointError, ValueError, OSError) as error:  # OSError: an unreadable input, an unwritable --output
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Averaged {len(folders)} checkpoints into {output}:")
    for folder in folders:
        print(f"  {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
