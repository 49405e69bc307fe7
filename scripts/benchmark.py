#!/usr/bin/env python
"""Speed of our model vs. its MarianMTModel twin vs. CTranslate2, side by side (issue 6).

    python scripts/benchmark.py                       # CPU, 2 threads, tiny + base presets (~5 minutes)
    python scripts/benchmark.py --quick --json out.json   # tiny preset only, few repeats (under a minute)
    python scripts/benchmark.py --device cuda         # the same on a GPU (bf16), plus the big preset

Prints one table and, with --json, writes one record per measurement. What is measured and how is documented in
`modeling_seq2seq/benchmark.py`.
"""

import argparse
import sys

from modeling_seq2seq.benchmark import PHASES, BenchmarkSettings, format_table, run_benchmark, write_json
from modeling_seq2seq.training import stoppable


def train_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxSOURCExTARGET with positive numbers, e.g. 200x128x128")
    return tuple(int(part) for part in parts)


@stoppable(outputs="a --json file holds the measurements finished before the stop")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and CTranslate2 intra_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="tiny preset only, few repeats")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--presets", nargs="+", help="presets to run (default: tiny base; on cuda also big)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="measurements to run (default: all)")
    parser.add_argument("--repeats", type=int, help="override every repeat count")
    parser.add_argument("--no_ctranslate2", action="store_true", help="leave CTranslate2 out even when installed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="also time the training step under torch.compile (auto: on a GPU only)")
    parser.add_argument("--train_shapes", nargs="+", type=train_shape, metavar="BxSxT",
                        help="training batches to time, batch x source x target tokens (default: 16x32x32; on cuda "
                             "also 128x64x64 and 200x128x128)")
    parser.add_argument("--in_process", action="store_true",
                        help="run every phase in this process (default: each preset's decoding phases and its "
                             "training phases in a fresh process each, as CTranslate2 always is)")
    args = parser.parse_args(argv)
    if args.threads < 1 or (args.repeats is not None and args.repeats < 1):
        parser.error("--threads and --repeats must be positive")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
    # Before minutes of measuring: a JSON path that cannot be written, or a preset that does not exist.
    from modeling_seq2seq.presets import load_preset, preset_path
    from modeling_seq2seq.training import check_device, check_output_file

    try:
        check_device(args.device)
        # The preset files read (a default run's included): --json must not overwrite one of them.
        read = {f"--presets {name}": str(preset_path(name)) for name in (args.presets or ("tiny", "base", "big"))}
        check_output_file(args.json, "--json", read)
        for preset in args.presets or ():
            load_preset(preset)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    settings = BenchmarkSettings(
        device=args.device, threads=args.threads, quick=args.quick, presets=tuple(args.presets) if args.presets else None,
        phases=tuple(args.phases), use_ctranslate2=not args.no_ctranslate2, seed=args.seed, repeats=args.repeats,
        compile_training={"auto": None, "on": True, "off": False}[args.compile], isolate=not args.in_process,
        training_shapes=tuple(args.train_shapes) if args.train_shapes else None,
    )
    # With --json, the results so far are written after each measurement: a run cut short keeps what it measured.
    result = run_benchmark(settings, on_progress=(lambda partial: write_json(partial, args.json)) if args.json else None)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 1 if result["failures"] else 0  # the table and JSON still hold every measurement that ran


if __name__ == "__main__":
    sys.exit(main())
