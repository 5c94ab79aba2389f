"""Translation quality: corpus BLEU (sacrebleu) and, when installed, COMET.

Test sets are read from local jsonl files of {source, reference}; sacrebleu's own test-set
download is never used. `reference` may be a string or a list of strings (several references).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TranslationExample:
    source: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class BleuScore:
    score: float  # 0-100
    precisions: tuple[float, ...]  # modified n-gram precisions (%), n = 1..4
    brevity_penalty: float
    hypothesis_length: int
    reference_length: int
    signature: str  # sacrebleu's signature (tokenizer, smoothing, version) for reproducibility


def load_translation_jsonl(path: str) -> list[TranslationExample]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "source" not in row or "reference" not in row:
                raise ValueError(f"{path}, line {line_number}: needs `source` and `reference`")
            reference = row["reference"]
            references = (reference,) if isinstance(reference, str) else tuple(reference)
            examples.append(TranslationExample(row["source"], references))
    return examples


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], tokenize: str = "13a") -> BleuScore:
    """Corpus BLEU: n-gram matches and lengths are summed over all sentences before the
    precisions and the brevity penalty are computed (not a mean of sentence scores).

    `references[i]` lists the references of hypothesis i (all hypotheses need the same count)."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no hypotheses")
    counts = {len(refs) for refs in references}
    if len(counts) != 1:
        raise ValueError("every hypothesis needs the same number of references")
    # sacrebleu wants one stream per reference position: refs[j][i] is reference j of sentence i.
    reference_streams = [[refs[j] for refs in references] for j in range(counts.pop())]
    metric = BLEU(tokenize=tokenize)
    result = metric.corpus_score(list(hypotheses), reference_streams)
    return BleuScore(
        score=result.score,
        precisions=tuple(result.precisions),
        brevity_penalty=result.bp,
        hypothesis_length=result.sys_len,
        reference_length=result.ref_len,
        signature=str(metric.get_signature()),
    )


def comet_score(
    sources: Sequence[str],
    hypotheses: Sequence[str],
    references: Sequence[str],
    checkpoint_path: str,
    batch_size: int = 16,
    gpus: int = 0,
) -> float:
    """System-level COMET from a LOCAL checkpoint (e.g. Unbabel/wmt22-comet-da's model.ckpt).

    Optional: needs the `unbabel-comet` package, which is not a dependency of this project."""
    try:
        from comet import load_from_checkpoint
    except ImportError as error:
        raise ImportError(
            "COMET is optional and not installed: `pip install unbabel-comet`, then pass the path "
            "of a downloaded checkpoint (there is no hub access at run time)"
        ) from error
    model = load_from_checkpoint(checkpoint_path)
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hypotheses, references, strict=True)]
    return float(model.predict(data, batch_size=batch_size, gpus=gpus).system_score)


def score_translations(
    examples: Sequence[TranslationExample], hypotheses: Sequence[str], comet_checkpoint: str | None = None
) -> dict[str, float | str]:
    """BLEU (and COMET when a checkpoint is given) for hypotheses aligned with `examples`."""
    if len(examples) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(examples)} examples")
    bleu = corpus_bleu(hypotheses, [e.references for e in examples])
    report: dict[str, float | str] = {"bleu": bleu.score, "bleu_signature": bleu.signature}
    if comet_checkpoint is not None:
        report["comet"] = comet_score(
            [e.source for e in examples], hypotheses, [e.references[0] for e in examples], comet_checkpoint
        )
    return report
