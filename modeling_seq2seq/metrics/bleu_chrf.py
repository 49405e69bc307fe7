"""BLEU and chrF from sacrebleu, as an `evaluate` metric module that loads from a local path (no Hub).

Load it with `modeling_seq2seq.metrics.load_sacrebleu()` or `evaluate.load("<path to this file>")`.
evaluate reads this file's imports line by line to check dependencies: keep one import per line.
"""

import datasets
import evaluate
import sacrebleu

_CITATION = """\
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}
@inproceedings{popovic-2015-chrf,
    title = "chr{F}: character n-gram {F}-score for automatic {MT} evaluation",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Tenth Workshop on Statistical Machine Translation",
    year = "2015",
    pages = "392--395",
}
"""

_DESCRIPTION = """\
Corpus-level BLEU and chrF (or chrF++ with chrf_word_order=2) computed by sacrebleu, with sacrebleu's
signature strings so that scores are reproducible and comparable.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of hypothesis strings.
    references: one reference string per prediction, or a list of references per prediction (the same
        number of references for every prediction).
    tokenize: BLEU tokenizer ("13a" by default, "intl", "zh", "ja-mecab", "none", ...).
    lowercase: case-insensitive BLEU and chrF.
    smooth_method, smooth_value: BLEU smoothing ("exp" by default).
    effective_order: BLEU uses only the n-gram orders that occur (otherwise a corpus of one-word
        sentences, like the built-in task's German numbers, scores 0 even when every word is right).
    chrf_word_order: 0 for chrF (default), 2 for chrF++.
    use_effective_order, force: as in evaluate's "sacrebleu" module (the first is effective_order).
Returns:
    bleu, chrf: the scores (0-100); signature: {"bleu": ..., "chrf": ...}, sacrebleu's signature strings;
    counts, totals, precisions, bp, sys_len, ref_len: BLEU's statistics; score: BLEU, as "sacrebleu" names it.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BleuChrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Value("string"),
                    }
                ),
            ],
            homepage="https://github.com/mjpost/sacrebleu",
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
            reference_urls=["https://aclanthology.org/W18-6319/"],
        )

    def _compute(
        self,
        predictions,
        references,
        tokenize=None,
        lowercase=False,
        smooth_method="exp",
        smooth_value=None,
        effective_order=False,
        chrf_word_order=0,
        use_effective_order=None,
        force=False,
    ):
        if use_effective_order is not None:  # the name evaluate's "sacrebleu" module uses
            effective_order = use_effective_order
        if isinstance(references[0], str):
            references = [[ref] for ref in references]
        n_refs = len(references[0])
        if n_refs == 0:
            raise ValueError("every prediction needs at least one reference")
        if any(len(refs) != n_refs for refs in references):
            raise ValueError("every prediction needs the same number of references")
        # sacrebleu wants one stream per reference position: [[ref 1 of each sentence], [ref 2 ...], ...]
        streams = [[refs[i] for refs in references] for i in range(n_refs)]
        bleu = sacrebleu.metrics.BLEU(
            tokenize=tokenize,
            lowercase=lowercase,
            force=force,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            effective_order=effective_order,
        )
        chrf = sacrebleu.metrics.CHRF(word_order=chrf_word_order, lowercase=lowercase)
        bleu_score = bleu.corpus_score(predictions, streams)
        chrf_score = chrf.corpus_score(predictions, streams)
        return {
            "score": bleu_score.score,  # BLEU again, under the key of evaluate's "sacrebleu" module
            "bleu": bleu_score.score,
            "chrf": chrf_score.score,
            "signature": {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())},
            "counts": bleu_score.counts,
            "totals": bleu_score.totals,
            "precisions": bleu_score.precisions,
            "bp": bleu_score.bp,
            "sys_len": bleu_score.sys_len,
            "ref_len": bleu_score.ref_len,
        }
