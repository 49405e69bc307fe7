#!/usr/bin/env python
"""Convert between a MarianMTModel folder (e.g. an OPUS-MT model) and our model, with the tokenizer copied along.

    python scripts/convert_marian.py --to ours   --input Helsinki-NLP/opus-mt-en-de --output_dir opus-ours
    python scripts/convert_marian.py --to marian --input outputs/tiny --output_dir tiny-marian
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_seq2seq.convert import convert_folder  # noqa: E402
from modeling_seq2seq.training import stoppable  # noqa: E402


@stoppable
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", choices=["ours", "marian"], required=True, help="the format to convert into")
    parser.add_argument("--input", required=True, help="a model folder (or a Hub id, which needs network)")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output_dir {args.output_dir!r} is a file, not a folder")
    try:
        convert_folder(args.input, args.output_dir, to=args.to)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
