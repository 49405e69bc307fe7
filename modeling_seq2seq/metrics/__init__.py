"""Evaluation metrics shipped with the package, loadable offline."""

from __future__ import annotations

from pathlib import Path

METRIC_PATH = Path(__file__).with_name("bleu_chrf.py")


def load_sacrebleu(**kwargs):
    """The BLEU + chrF `evaluate` module from this package's folder (no Hub, no network).

    `compute(predictions=[...], references=[[...], ...] or [...])` returns "bleu", "chrf", "signature"
    (sacrebleu's signature strings) and BLEU's statistics. Keyword arguments go to `evaluate.load`;
    predictions are kept in memory unless `keep_in_memory=False` is given.
    """
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(METRIC_PATH), **kwargs)


__all__ = ["METRIC_PATH", "load_sacrebleu"]
