"""Learner benchmark: one packed forward + backward per document vs one per (document, sample).

The learner's loss needs log pi of every generated token of every (document, sample) and the
document's cross-entropy. The authors pack each (document, sample) as its own sequence
[doc] + [generated] (n rows of T + NB*G tokens per document, the document computed n times); the
learner packs a document once followed by its n samples (one row of T + n*NB*G tokens,
ebft/layout.py). Same model, same tokens, same loss terms: the script checks that both give the
same log-probs and document CE, then times forward + backward of each, alternately, best of
`--repeats`, in float32 on the CPU (the loss as the learner computes it, with the sliced
float32 log-softmax). The last line is JSON.

    python benchmarks/learner.py [--chunk-length 256] [--docs 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import emit  # noqa: E402

from ebft.layout import BlockPlan  # noqa: E402
from ebft.learner.loss import document_ce, generated_logprobs  # noqa: E402

C = S = G = 8
N = 4


def loss_terms(model, plan: BlockPlan, docs: torch.Tensor, rollouts: torch.Tensor):
    """(log-probs [docs, n, NB, G], CE [docs]) from packed rows of `plan` (samples = 1 or n)."""
    rows_per_doc = N // plan.samples
    row_docs = docs.repeat_interleave(rows_per_doc, dim=0)
    row_rollouts = rollouts.unflatten(1, (rows_per_doc, plan.samples)).flatten(0, 1)
    packed = plan.pack(row_docs, row_rollouts)
    rows = packed.shape[0]
    logits = model(
        input_ids=packed,
        attention_mask=plan.attention_mask().expand(rows, -1, -1, -1),
        position_ids=plan.position_ids.expand(rows, -1),
        use_cache=False,
    ).logits
    logprobs = generated_logprobs(logits, packed, plan, 0.6).reshape(
        docs.shape[0], N, *plan.generated_indices.shape[1:]
    )
    ce = document_ce(logits, row_docs).view(docs.shape[0], rows_per_doc).mean(1)
    return logprobs, ce


def step_seconds(model, plan, docs, rollouts) -> float:
    started = time.perf_counter()
    logprobs, ce = loss_terms(model, plan, docs, rollouts)
    (logprobs.mean() + ce.mean()).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunk-length", type=int, default=256)
    parser.add_argument("--docs", type=int, default=1, help="documents per micro-batch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from ebft.model_sources import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path()), dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    per_sample = BlockPlan(args.chunk_length, C, S, G)
    shared = replace(per_sample, samples=N)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    docs = torch.randint(3, vocab, (args.docs, args.chunk_length), generator=generator)
    rollouts = torch.randint(3, vocab, (args.docs, N, per_sample.num_blocks, G), generator=generator)
    print(
        f"SmolLM2-135M, T={args.chunk_length} C=s=G={C} n={N} NB={per_sample.num_blocks}, {args.docs} docs; "
        f"rows x tokens: per sample {N * args.docs} x {per_sample.packed_length}, "
        f"shared {args.docs} x {shared.packed_length}; "
        f"torch threads {torch.get_num_threads()}"
    )

    with torch.no_grad():
        (lp_a, ce_a), (lp_b, ce_b) = (
            loss_terms(model, per_sample, docs, rollouts),
            loss_terms(model, shared, docs, rollouts),
        )
    logprob_diff = float((lp_a - lp_b).abs().max())
    ce_diff = float((ce_a - ce_b).abs().max())
    print(f"same loss terms: max |log-prob difference| {logprob_diff:.2e}, max |CE difference| {ce_diff:.2e}")

    best_per_sample = best_shared = float("inf")
    for _ in range(args.repeats):
        best_per_sample = min(best_per_sample, step_seconds(model, per_sample, docs, rollouts))
        best_shared = min(best_shared, step_seconds(model, shared, docs, rollouts))
    print(
        f"forward + backward: per-sample rows {best_per_sample:.2f} s, shared document {best_shared:.2f} s "
        f"-> {best_per_sample / best_shared:.2f}x"
    )
    emit(
        {
            "benchmark": "learner",
            "ratio": round(best_per_sample / best_shared, 2),
            "per_sample_s": round(best_per_sample, 3),
            "shared_document_s": round(best_shared, 3),
            "per_sample_tokens": N * args.docs * per_sample.packed_length,
            "shared_document_tokens": args.docs * shared.packed_length,
            "max_logprob_diff": logprob_diff,
            "max_ce_diff": ce_diff,
            "model": "smollm2",
            "T": args.chunk_length,
            "n": N,
            "threads": torch.get_num_threads(),
        }
    )


if __name__ == "__main__":
    main()
