#!/usr/bin/env python
"""Train the Transformer: `python scripts/train.py --config configs/train-tiny.yaml` (or `accelerate launch ...`).

Without data arguments it trains the tiny preset on the built-in English -> German number-words task and
prints test-set exact match, BLEU and sample translations. `--help` lists every setting.
"""

import os
import sys

# Run as `python scripts/x.py`, Python puts scripts/ first on sys.path, where evaluate.py would shadow the
# `evaluate` library that the metrics use: drop it (this file imports nothing from scripts/).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from modeling_seq2seq.training import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
