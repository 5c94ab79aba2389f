"""Translation rewards against chrF and BLEU computed by hand from their definitions."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from ebft.verifiers.translation import translation_rewards

PAIRS = [
    ("the cat sat on the mat", "the cat sat on a mat"),
    ("the cat sat on", "the cat sat on the mat"),
    ("a quick brown fox jumps", "the quick brown fox jumped over"),
]


def ngrams(sequence, n: int) -> Counter:
    return Counter(tuple(sequence[i : i + n]) for i in range(len(sequence) - n + 1))


def chrf_by_hand(hypothesis: str, reference: str, order: int = 6, beta: float = 2.0) -> float:
    """Character n-gram precision and recall (spaces removed), each averaged over the orders that both
    sides have, then their F-beta."""
    hyp, ref = hypothesis.replace(" ", ""), reference.replace(" ", "")
    precisions, recalls = [], []
    for n in range(1, order + 1):
        hyp_grams, ref_grams = ngrams(hyp, n), ngrams(ref, n)
        if not hyp_grams or not ref_grams:
            continue
        matches = sum(min(count, ref_grams[gram]) for gram, count in hyp_grams.items())
        precisions.append(matches / sum(hyp_grams.values()))
        recalls.append(matches / sum(ref_grams.values()))
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    return (1 + beta**2) * p * r / (beta**2 * p + r) if p + r else 0.0


def bleu_by_hand(hypothesis: str, reference: str) -> float:
    """Geometric mean of the clipped word 1-4-gram precisions times the brevity penalty (every order
    of these pairs has a match)."""
    hyp, ref = hypothesis.split(), reference.split()
    log_precisions = []
    for n in range(1, 5):
        hyp_grams, ref_grams = ngrams(hyp, n), ngrams(ref, n)
        matches = sum(min(count, ref_grams[gram]) for gram, count in hyp_grams.items())
        log_precisions.append(math.log(matches / sum(hyp_grams.values())))
    brevity = 1.0 if len(hyp) >= len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(sum(log_precisions) / 4)


def test_chrf_reward_is_chrf_over_100():
    rewards = translation_rewards([h for h, _ in PAIRS], [[r] for _, r in PAIRS])
    assert rewards == pytest.approx([chrf_by_hand(h, r) for h, r in PAIRS], abs=1e-12)
    assert translation_rewards(["same words"], [["same words"]]) == [pytest.approx(1.0)]


def test_bleu_reward_is_sentence_bleu_over_100():
    pairs = PAIRS[:2]
    rewards = translation_rewards([h for h, _ in pairs], [[r] for _, r in pairs], metric="bleu")
    assert rewards == pytest.approx([bleu_by_hand(h, r) for h, r in pairs], abs=1e-12)


def test_with_several_references_chrf_takes_the_best():
    hypothesis, references = PAIRS[2][0], [PAIRS[0][1], PAIRS[2][1]]
    [reward] = translation_rewards([hypothesis], [references])
    assert reward == pytest.approx(max(chrf_by_hand(hypothesis, r) for r in references), abs=1e-12)


def test_misaligned_or_missing_references_are_refused():
    with pytest.raises(ValueError):
        translation_rewards(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        translation_rewards(["a"], [[]])
    with pytest.raises(ValueError):
        translation_rewards(["a"], [["a"]], metric="comet")
