"""Translation rewards: a sentence-level metric of each hypothesis against its references, in [0, 1].

chrF (sacrebleu's default: character 1-6-grams, beta = 2, whitespace ignored) is the default: unlike
BLEU it stays informative on one short sentence, where BLEU's 4-gram precision is often zero. BLEU is
sacrebleu's sentence BLEU with effective order (orders without any n-gram are left out).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

METRICS = ("chrf", "bleu")


@cache
def _metric(name: str):
    from sacrebleu.metrics import BLEU, CHRF

    if name == "chrf":
        return CHRF()
    if name == "bleu":
        return BLEU(effective_order=True)
    raise ValueError(f"translation metric {name!r}: expected one of {METRICS}")


def translation_rewards(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], metric: str = "chrf"
) -> list[float]:
    """reward[i] = metric(hypotheses[i] against references[i]) / 100; with several references,
    sacrebleu scores against all of them (chrF: the best one; BLEU: n-grams clipped by the most in any)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    scorer = _metric(metric)
    return [
        scorer.sentence_score(hypothesis, list(refs)).score / 100 for hypothesis, refs in zip(hypotheses, references)
    ]
