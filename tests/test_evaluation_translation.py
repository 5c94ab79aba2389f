"""Corpus BLEU against a hand computation (whitespace tokens, so 13a tokenization is the identity)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from ebft.evaluation.translation import (
    TranslationExample,
    comet_score,
    corpus_bleu,
    load_translation_jsonl,
    score_translations,
)


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def reference_bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Papineni et al. corpus BLEU: clipped n-gram matches and lengths summed over the corpus,
    closest reference length (shorter on ties) for the brevity penalty."""
    matches, totals = [0] * 4, [0] * 4
    hypothesis_length = reference_length = 0
    for hypothesis, refs in zip(hypotheses, references):
        tokens, ref_tokens = hypothesis.split(), [r.split() for r in refs]
        hypothesis_length += len(tokens)
        reference_length += min((abs(len(r) - len(tokens)), len(r)) for r in ref_tokens)[1]
        for n in range(1, 5):
            counts = ngrams(tokens, n)
            max_ref_counts = Counter()
            for r in ref_tokens:
                max_ref_counts |= ngrams(r, n)
            matches[n - 1] += sum(min(c, max_ref_counts[g]) for g, c in counts.items())
            totals[n - 1] += sum(counts.values())
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if hypothesis_length > reference_length else math.exp(1 - reference_length / hypothesis_length)
    return 100 * brevity * math.exp(log_precision)


def test_identical_corpus_scores_100():
    sentences = ["the quick brown fox jumps over the lazy dog", "a b c d e f"]
    assert corpus_bleu(sentences, [[s] for s in sentences]).score == pytest.approx(100.0)


def test_single_pair_by_hand():
    # Precisions 5/6, 3/5, 2/4, 1/3 and equal lengths: BLEU = (1/12)^(1/4).
    result = corpus_bleu(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert result.score == pytest.approx(100 * (1 / 12) ** 0.25)
    assert result.precisions == pytest.approx((500 / 6, 60.0, 50.0, 100 / 3))
    assert result.brevity_penalty == pytest.approx(1.0)


def test_brevity_penalty_by_hand():
    result = corpus_bleu(["the cat sat on the"], [["the cat sat on the mat"]])
    assert result.score == pytest.approx(100 * math.exp(1 - 6 / 5))
    assert (result.hypothesis_length, result.reference_length) == (5, 6)


def test_corpus_bleu_sums_counts_instead_of_averaging_sentences():
    # A short perfect sentence and a long imperfect one: the long one dominates the corpus counts.
    hypotheses = ["a b c d", "we saw the dog run to the big house in the night"]
    references = [["a b c d"], ["yesterday we saw a cat walk to the big house in the morning"]]
    corpus = corpus_bleu(hypotheses, references).score
    assert corpus == pytest.approx(reference_bleu(hypotheses, references))
    sentence_mean = sum(reference_bleu([h], [r]) for h, r in zip(hypotheses, references)) / 2
    assert sentence_mean - corpus > 10


def test_multiple_references_clip_by_the_best_reference():
    hypotheses = ["the cat is on the mat now"]
    references = [["there is a cat on the mat", "the cat is on the red mat"]]
    assert corpus_bleu(hypotheses, references).score == pytest.approx(reference_bleu(hypotheses, references))


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        corpus_bleu(["a", "b"], [["a"], ["b", "c"]])


def test_jsonl_round_trip_and_report(tmp_path):
    path = tmp_path / "wmt.jsonl"
    rows = [
        {"source": "le chat est sur le tapis", "reference": "the cat sat on a mat"},
        {"source": "bonjour", "reference": ["hello there friend", "hi there my friend"]},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    examples = load_translation_jsonl(str(path))
    assert examples[0] == TranslationExample("le chat est sur le tapis", ("the cat sat on a mat",))
    assert examples[1].references == ("hello there friend", "hi there my friend")
    with pytest.raises(ValueError):  # different reference counts per example
        score_translations(examples, ["x", "y"])
    report = score_translations(examples[:1], ["the cat sat on the mat"])
    assert report["bleu"] == pytest.approx(100 * (1 / 12) ** 0.25)
    assert "tok:13a" in report["bleu_signature"]


def test_comet_without_the_package_explains_what_to_install():
    pytest.importorskip("sacrebleu")
    try:
        import comet  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="unbabel-comet"):
            comet_score(["s"], ["h"], ["r"], checkpoint_path="model.ckpt")
    else:
        pytest.skip("COMET is installed here")
