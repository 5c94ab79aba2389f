"""Packed-row attention at the paper's geometry: `learner.attention` blocks vs dense, time and peak memory.

Geometry: T = 1024, C = s = G = 8 (NB = 127), n = 4: one packed row of S = T + n*NB*G = 5,088 tokens. The
model is a random Llama with SmolLM2-135M's attention (9 heads of 64, 3 KV heads) and `--layers` layers,
so attention is a large share of the step. Each path runs the learner's forward + backward (its
log-probs of every generated token and the document CE, as in ebft/learner/engine.py) in a fresh
process, best of `--repeats`; peak memory is the process's maximum resident set over that, minus the
resident set before the first forward. Log-probs of the two paths are compared. The last line is JSON.

    python benchmarks/attention.py [--layers 4] [--chunk-length 1024] [--repeats 2] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import emit  # noqa: E402

C = S = G = 8
N = 4


def run_path(attention: str, args) -> dict:
    """In this (child) process: time one path and return its figures and log-probs checksum."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ebft.layout import BlockPlan
    from ebft.learner import packed_attention
    from ebft.learner.loss import document_ce, generated_logprobs

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=args.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=args.chunk_length + 64,
        tie_word_embeddings=True,
    )
    implementation = packed_attention.register() if attention == "blocks" else "sdpa"
    model = LlamaForCausalLM._from_config(config, attn_implementation=implementation, dtype=dtype).train()
    plan = replace(BlockPlan(args.chunk_length, C, S, G), samples=N)
    generator = torch.Generator().manual_seed(1)
    docs = torch.randint(3, 49152, (1, plan.chunk_length), generator=generator)
    packed = plan.pack(docs, torch.randint(3, 49152, (1, N, plan.num_blocks, G), generator=generator))
    positions = plan.position_ids[None]
    extra = {"block_plan": plan} if attention == "blocks" else {"attention_mask": plan.attention_mask(dtype)}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        logits = model(input_ids=packed, position_ids=positions, use_cache=False, **extra).logits
        logprobs = generated_logprobs(logits, packed, plan, 0.6)
        (document_ce(logits, docs).mean() + logprobs.mean()).backward()
        model.zero_grad(set_to_none=True)
        return logprobs.detach()

    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        logprobs = step()
        best = min(best, time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    return {
        "seconds": best,
        "peak_mib": peak / 1024,
        "logprobs": logprobs.float().flatten()[:: max(1, logprobs.numel() // 4096)].tolist(),
        "threads": torch.get_num_threads(),
        "S": plan.packed_length,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunk-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--child", choices=["dense", "blocks"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_path(args.child, args)))
        return

    results = {}
    for attention in ("dense", "blocks"):
        command = [sys.executable, __file__, "--child", attention, *sys.argv[1:]]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[attention] = json.loads(output.strip().splitlines()[-1])
    dense, blocks = results["dense"], results["blocks"]
    difference = max(abs(a - b) for a, b in zip(dense["logprobs"], blocks["logprobs"]))
    from ebft.layout import BlockPlan
    from ebft.learner.packed_attention import blocks_per_group

    T = args.chunk_length
    plan = replace(BlockPlan(T, C, S, G), samples=N)
    NB, K = plan.num_blocks, blocks_per_group(plan)
    grouped = -(-NB // K) * K * N * G
    scores = {"dense": dense["S"] ** 2, "blocks": T * T // 2 + grouped * (T + K * N * G)}
    print(
        f"{args.layers}-layer Llama (SmolLM2-135M attention), T={T} n={N} NB={NB}: S={dense['S']}, {args.dtype}, "
        f"{dense['threads']} threads; attention scores per head: dense {scores['dense']:,}, blocks {scores['blocks']:,}"
    )
    for name, r in results.items():
        print(f"  {name:6s} forward + backward {r['seconds']:.2f} s, peak memory +{r['peak_mib']:.0f} MiB")
    speedup = dense["seconds"] / blocks["seconds"]
    print(f"  blocks vs dense: {speedup:.2f}x faster, max |log-prob difference| {difference:.1e}")
    emit(
        {
            "benchmark": "attention",
            "speedup": round(speedup, 2),
            "dense_s": round(dense["seconds"], 3),
            "blocks_s": round(blocks["seconds"], 3),
            "dense_peak_mib": round(dense["peak_mib"]),
            "blocks_peak_mib": round(blocks["peak_mib"]),
            "max_logprob_diff": difference,
            "S": dense["S"],
            "layers": args.layers,
            "dtype": args.dtype,
        }
    )


if __name__ == "__main__":
    main()
