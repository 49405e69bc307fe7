"""The shipped BLEU + chrF `evaluate` module: offline loading and agreement with sacrebleu itself."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import socket

import pytest
import sacrebleu

from modeling_seq2seq.metrics import METRIC_PATH, load_sacrebleu

PREDICTIONS = [
    "the cat sat on the mat",
    "there is a dog in the garden",
    "vierunddreißig",
    "Die Straße ist lang, und das Größte kommt noch.",
]
REFS_1 = [
    "the cat sat on the mat",
    "a dog is in the garden",
    "vierunddreissig",
    "Die Straße ist sehr lang, und das Beste kommt noch.",
]
REFS_2 = [
    "a cat sat on the mat",
    "there is a dog in the yard",
    "vierunddreißig",
    "Die Strasse ist lang und das Größte kommt erst noch.",
]


@pytest.fixture(scope="module")
def metric():
    attempts = []
    real_connect = socket.socket.connect

    def no_network(self, address):
        attempts.append(address)
        raise OSError(f"network disabled in this test ({address})")

    socket.socket.connect = no_network
    try:
        module = load_sacrebleu()
    finally:
        socket.socket.connect = real_connect
    assert attempts == [], f"loading the metric tried to connect to {attempts}"
    return module


def test_single_reference_matches_sacrebleu(metric):
    result = metric.compute(predictions=PREDICTIONS, references=[[r] for r in REFS_1])
    bleu_metric, chrf_metric = sacrebleu.BLEU(), sacrebleu.CHRF()
    bleu = bleu_metric.corpus_score(PREDICTIONS, [REFS_1])
    chrf = chrf_metric.corpus_score(PREDICTIONS, [REFS_1])
    assert bleu.score == sacrebleu.corpus_bleu(PREDICTIONS, [REFS_1]).score
    assert 0 < result["bleu"] < 100 and 0 < result["chrf"] < 100
    assert result["bleu"] == pytest.approx(bleu.score, abs=1e-12)
    assert result["chrf"] == pytest.approx(chrf.score, abs=1e-12)
    assert result["counts"] == bleu.counts and result["sys_len"] == bleu.sys_len and result["ref_len"] == bleu.ref_len
    assert result["signature"] == {
        "bleu": str(bleu_metric.get_signature()),
        "chrf": str(chrf_metric.get_signature()),
    }
    assert result["signature"]["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")


def test_flat_references_equal_nested(metric):
    nested = metric.compute(predictions=PREDICTIONS, references=[[r] for r in REFS_1])
    flat = metric.compute(predictions=PREDICTIONS, references=REFS_1)
    assert flat == nested


def test_multiple_references_match_sacrebleu(metric):
    result = metric.compute(predictions=PREDICTIONS, references=[[a, b] for a, b in zip(REFS_1, REFS_2)])
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFS_1, REFS_2]).score, abs=1e-12)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFS_1, REFS_2]).score, abs=1e-12)
    assert result["signature"]["bleu"].startswith("nrefs:2|")
    one_ref = metric.compute(predictions=PREDICTIONS, references=REFS_1)
    assert result["bleu"] > one_ref["bleu"]  # a second reference can only add matches


def test_options_reach_sacrebleu(metric):
    result = metric.compute(
        predictions=PREDICTIONS, references=REFS_1, lowercase=True, tokenize="intl", chrf_word_order=2
    )
    assert result["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(PREDICTIONS, [REFS_1], lowercase=True, tokenize="intl").score, abs=1e-12
    )
    assert result["chrf"] == pytest.approx(
        sacrebleu.CHRF(word_order=2, lowercase=True).corpus_score(PREDICTIONS, [REFS_1]).score, abs=1e-12
    )
    assert "tok:intl" in result["signature"]["bleu"] and "nw:2" in result["signature"]["chrf"]


def test_effective_order_for_one_word_sentences(metric):
    # The built-in task's German numbers are single words: plain corpus BLEU is 0 even when all are right.
    words = ["vierunddreißig", "elf", "einhundertzwölf"]
    assert metric.compute(predictions=words, references=words)["bleu"] == 0.0
    result = metric.compute(predictions=words, references=words, effective_order=True)
    assert result["bleu"] == pytest.approx(100.0) and result["chrf"] == pytest.approx(100.0)
    assert "eff:yes" in result["signature"]["bleu"]


def test_uneven_reference_counts_are_rejected(metric):
    with pytest.raises(ValueError, match="same number of references"):
        metric.compute(predictions=["a", "b"], references=[["a"], ["b", "c"]])


def test_the_keys_and_arguments_of_evaluates_sacrebleu_module_work_too(metric):
    """Code written for `evaluate.load("sacrebleu")` reads `score` and passes `use_effective_order` and `force`; a
    prediction without references is named (sacrebleu raised a bare IndexError)."""
    words = ["vierunddreißig", "elf"]
    result = metric.compute(predictions=words, references=words, use_effective_order=True)
    assert result["score"] == result["bleu"] == pytest.approx(100.0) and "eff:yes" in result["signature"]["bleu"]
    tokenized = ["the cat sat on the mat ."]
    assert metric.compute(predictions=tokenized, references=tokenized, force=True)["score"] == pytest.approx(
        sacrebleu.corpus_bleu(tokenized, [tokenized], force=True).score)
    with pytest.raises(ValueError, match="at least one reference"):
        metric.compute(predictions=["a", "b"], references=[[], []])


def test_bleu_tokenizer_follows_the_target_language_as_sacrebleus_command_line():
    """13a splits no Chinese words: near-identical Chinese sentences scored BLEU 0. The tokenizer now follows the
    target language as `sacrebleu -l en-zh` picks it, falls back to characters (with a warning) where sacrebleu's
    Japanese or Korean extras are missing, and an explicit name sacrebleu does not know is refused before any work."""
    from modeling_seq2seq.training import bleu_tokenizer, translation_metrics

    assert [bleu_tokenizer(lang) for lang in ("de", "zh", "zh_CN", "ZH-Hans", "zho_Hans", "cmn", "yue", None)] == [
        "13a", "zh", "zh", "zh", "zh", "zh", "zh", "13a"]
    assert bleu_tokenizer("jpn_Jpan") == bleu_tokenizer("ja") and bleu_tokenizer("kor") == bleu_tokenizer("ko")
    assert bleu_tokenizer("zh", "13a") == "13a"
    hypotheses, references = ["今天天气很好。", "我喜欢喝茶。"], ["今天天气非常好。", "我喜欢喝绿茶。"]
    scores = translation_metrics(hypotheses, references, tokenize=bleu_tokenizer("zh"))
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references], tokenize="zh").score)
    assert scores["bleu"] > 30 and "tok:zh" in scores["bleu_signature"]
    assert translation_metrics(hypotheses, references)["bleu"] == 0.0  # 13a: each sentence one word
    for language, name in (("ja", "ja-mecab"), ("ko", "ko-mecab")):
        try:
            sacrebleu.metrics.BLEU(tokenize=name)
            expected = name
        except RuntimeError:  # sacrebleu's extras for the language are not installed
            expected = "char"
        assert bleu_tokenizer(language) == expected
        if expected == "char":
            with pytest.raises(ValueError, match=f"BLEU tokenizer '{name}' cannot be used here: .*sacrebleu\\[{language}\\]"):
                bleu_tokenizer(language, name)
    with pytest.raises(ValueError, match="BLEU tokenizer 'moses' is not one of sacrebleu's: 13a, char, "):
        bleu_tokenizer("de", "moses")


def test_module_imports_are_parseable_by_evaluate():
    from evaluate.loading import get_imports

    imports = get_imports(str(METRIC_PATH))
    assert sorted(name for kind, name, *_ in imports if kind == "library") == ["datasets", "evaluate", "sacrebleu"]
    assert all(kind == "library" for kind, *_ in imports)  # nothing to fetch or copy beside the file


def test_lowercase_reaches_chrf_too(metric):
    """Hypotheses that differ from the references in case only: with lowercase=True both BLEU and chrF are perfect, as
    sacrebleu's own lowercased metrics give them."""
    hypotheses = ["".join(c.upper() if c.isascii() else c for c in text) for text in REFS_1]  # "ß".upper() is "SS"
    result = metric.compute(predictions=hypotheses, references=REFS_1, lowercase=True)
    assert result["bleu"] == pytest.approx(100.0) and result["chrf"] == pytest.approx(100.0)
    assert result["chrf"] == pytest.approx(sacrebleu.CHRF(lowercase=True).corpus_score(hypotheses, [REFS_1]).score, abs=1e-12)
    assert "case:lc" in result["signature"]["chrf"] and "case:lc" in result["signature"]["bleu"]
    cased = metric.compute(predictions=hypotheses, references=REFS_1)
    assert cased["chrf"] < 50 and cased["bleu"] < 50
