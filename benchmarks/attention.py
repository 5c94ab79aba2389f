"""Packed-row attention at the paper's geometry: blocks vs dense, time and peak memory, in the learner
(`learner.attention`) or the feature network (`features.attention`).

Geometry: T = 1024, C = s = G = 8 (NB = 127), n = 4: one packed row of S = T + n*NB*G = 5,088 tokens. The
model is a random Llama with SmolLM2-135M's attention (9 heads of 64, 3 KV heads) and `--layers` layers,
so attention is a large share of the step. `--network learner` runs the learner's forward + backward (its
log-probs of every generated token and the document CE, as in ebft/learner/engine.py);
`--network features` runs `FeatureExtractor.extract` on one document and its n rollouts (the document once,
then the n rows of generated tokens against its cached keys). Each path runs in a fresh process, best of
`--repeats`; peak memory is the process's maximum resident set over that, minus the resident set before the
first call. The outputs of the two paths (log-probs, or features) are compared. The last line is JSON.

    python benchmarks/attention.py [--network learner|features] [--layers 4] [--chunk-length 1024] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import emit  # noqa: E402

from ebft.layout import BlockPlan  # noqa: E402

C = S = G = 8
N = 4


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=args.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=args.chunk_length + 64,
        tie_word_embeddings=True,
    )


def learner_path(attention: str, args, dtype):
    """The learner's forward + backward of one packed row, as a call that returns its log-probs."""
    import torch
    from transformers import LlamaForCausalLM

    from ebft import packed_attention
    from ebft.learner.loss import document_ce, generated_logprobs

    implementation = packed_attention.register() if attention == "blocks" else "sdpa"
    model = LlamaForCausalLM._from_config(llama_config(args), attn_implementation=implementation, dtype=dtype).train()
    plan = replace(BlockPlan(args.chunk_length, C, S, G), samples=N)
    generator = torch.Generator().manual_seed(1)
    docs = torch.randint(3, 49152, (1, plan.chunk_length), generator=generator)
    packed = plan.pack(docs, torch.randint(3, 49152, (1, N, plan.num_blocks, G), generator=generator))
    positions = plan.position_ids[None]
    extra = {"block_plan": plan} if attention == "blocks" else {"attention_mask": plan.attention_mask(dtype)}

    def step():
        logits = model(input_ids=packed, position_ids=positions, use_cache=False, **extra).logits
        logprobs = generated_logprobs(logits, packed, plan, 0.6)
        (document_ce(logits, docs).mean() + logprobs.mean()).backward()
        model.zero_grad(set_to_none=True)
        return logprobs.detach()

    return step


def features_path(attention: str, args, dtype):
    """`FeatureExtractor.extract` of one document and its n rollouts, as a call that returns the features."""
    import torch

    from ebft.config import build_config
    from ebft.features.extractor import FeatureExtractor
    from ebft.messages import ChunkBatch, RolloutBatch

    config = build_config(
        overrides=[
            f"data.chunk_length={args.chunk_length}",
            f"sampling.num_samples={N}",
            f"model.dtype={args.dtype}",
            f"features.attention={attention}",
        ]
    )
    extractor = FeatureExtractor(args.model_dir, config, device="cpu")
    plan = BlockPlan(args.chunk_length, C, S, G)
    generator = torch.Generator().manual_seed(1)
    docs = torch.randint(3, 49152, (1, plan.chunk_length), generator=generator)
    rollouts = torch.randint(3, 49152, (1, N, plan.num_blocks, G), generator=generator)
    batch = RolloutBatch(ChunkBatch([0], docs, 0), rollouts, torch.zeros(rollouts.shape), weight_version=0)
    return lambda: extractor.extract(batch).rollout_features


def run_path(attention: str, args) -> dict:
    """In this (child) process: time one path and return its figures and an output checksum."""
    import torch

    torch.manual_seed(0)
    path = features_path if args.network == "features" else learner_path
    step = path(attention, args, getattr(torch, args.dtype))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        output = step()
        best = min(best, time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    return {
        "seconds": best,
        "peak_mib": peak / 1024,
        "output": output.float().flatten()[:: max(1, output.numel() // 4096)].tolist(),
        "threads": torch.get_num_threads(),
        "S": BlockPlan(args.chunk_length, C, S, G, samples=N).packed_length,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--network", choices=["learner", "features"], default="learner")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunk-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="auto: model.dtype auto"
    )
    parser.add_argument("--child", choices=["dense", "blocks"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dtype == "auto":  # bf16 where the CPU (or a GPU) computes it natively, else float32
        from ebft.config import build_config

        args.dtype = build_config({}).model.dtype
    if args.child:
        print(json.dumps(run_path(args.child, args)))
        return

    with tempfile.TemporaryDirectory() as model_dir:
        if args.network == "features":
            from transformers import LlamaForCausalLM

            LlamaForCausalLM._from_config(llama_config(args)).save_pretrained(model_dir)
        results = {}
        for attention in ("dense", "blocks"):
            command = [sys.executable, __file__, "--child", attention, "--model-dir", model_dir, *sys.argv[1:]]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[attention] = json.loads(output.strip().splitlines()[-1])
    dense, blocks = results["dense"], results["blocks"]
    difference = max(abs(a - b) for a, b in zip(dense["output"], blocks["output"]))
    from ebft.packed_attention import blocks_per_group

    T = args.chunk_length
    samples = 1 if args.network == "features" else N  # feature rows hold one sample each
    plan = BlockPlan(T, C, S, G, samples=samples)
    NB, K = plan.num_blocks, blocks_per_group(plan)
    queries = samples * NB * G
    grouped = -(-NB // K) * K * samples * G * (T + K * samples * G)
    scores = (
        {"dense": queries * plan.packed_length, "blocks": grouped}
        if args.network == "features"
        else {"dense": plan.packed_length**2, "blocks": T * T // 2 + grouped}
    )
    what = "feature extraction" if args.network == "features" else "forward + backward"
    print(
        f"{args.network}: {args.layers}-layer Llama (SmolLM2-135M attention), T={T} n={N} NB={NB}, {args.dtype}, "
        f"{dense['threads']} threads; attention scores per head and row: dense {scores['dense']:,}, "
        f"blocks {scores['blocks']:,}"
    )
    for name, r in results.items():
        print(f"  {name:6s} {what} {r['seconds']:.2f} s, peak memory +{r['peak_mib']:.0f} MiB")
    speedup = dense["seconds"] / blocks["seconds"]
    print(f"  blocks vs dense: {speedup:.2f}x faster, max |output difference| {difference:.1e}")
    emit(
        {
            "benchmark": "attention" if args.network == "learner" else "feature_attention",
            "speedup": round(speedup, 2),
            "dense_s": round(dense["seconds"], 3),
            "blocks_s": round(blocks["seconds"], 3),
            "dense_peak_mib": round(dense["peak_mib"]),
            "blocks_peak_mib": round(blocks["peak_mib"]),
            "max_output_diff": difference,
            "S": dense["S"],
            "layers": args.layers,
            "dtype": args.dtype,
        }
    )


if __name__ == "__main__":
    main()
