"""Rollout benchmark: generated tokens per second, vLLM rollout engine vs the authors' packed sampler.

Same model, dtype and geometry for both: SmolLM2-135M (`--model tiny` for a 4-layer random Llama) in `model.dtype:
auto` (bf16 where the CPU computes it natively, float32 elsewhere, where emulated bf16 is several times slower;
`--dtype` to choose),
T = 256, C = s = G = 8 (NB = 31), n = 4, temperature 0.6, chunks of real text (Python stdlib sources).

(a) `RolloutWorker.generate` (in-process vLLM engine): the NB nested prefixes of each chunk as prompts
    with n samples, prefix caching, all chunks in one call.
(b) the authors' approach (docs/method.md section 2), re-implemented as their sampler runs it: per
    chunk, n copies of the packed sequence [doc] + [generated, step-major], G forwards with no KV
    cache, forward t over the T + t*NB tokens that exist (the sequence grows by one token per
    block each step) with the dense strided mask, float32 logits at every position, all NB blocks
    of all n samples sampled at once. The mask is built once per run, vectorized (the authors
    rebuild it every step): a slightly faster baseline than their code.

Both run with the same number of torch threads, alternately (a change in machine load hits both),
best of `--repeats` each; the engine has one warm-up call first. The baseline costs the same per
chunk whatever the batch, so it runs on fewer chunks (`--baseline-docs`).

Besides the times it prints the work each side does, in model token passes per generated token:
the engine recomputes, for each of the n samples of a block, the part of the prompt past the
last whole KV block the prefix cache holds (vLLM caches whole blocks, and recomputes the last one
of a fully cached prompt); the baseline forwards n * sum_t (T + t*NB) tokens. The measured speed
ratio follows that work ratio. The last line is JSON.

    python benchmarks/rollout.py [--model smollm2|tiny] [--docs 8] [--baseline-docs 1] [--repeats 2] [--eager]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import best_time, emit, quiet_environment, stdlib_chunks  # noqa: E402

quiet_environment()
# vLLM drops torch to one thread unless OMP_NUM_THREADS is set; give both contenders all cores.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import torch

from ebft.config import build_config  # noqa: E402
from ebft.layout import BlockPlan  # noqa: E402
from ebft.messages import ChunkBatch  # noqa: E402

T, C, S, G, N = 256, 8, 8, 8, 4


def tiny_llama(directory: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    return directory


def text_chunks(model_path: str, docs: int) -> torch.Tensor:
    """[docs, T] token ids of stdlib source (random ids for a model without a tokenizer)."""
    from ebft.actors.rollout import has_tokenizer

    if not has_tokenizer(model_path):
        return torch.randint(3, 2048, (docs, T), generator=torch.Generator().manual_seed(0))
    return stdlib_chunks(model_path, docs, T)


@torch.inference_mode()
def packed_sampler(model, plan: BlockPlan, docs: torch.Tensor, n: int, temperature: float) -> torch.Tensor:
    """The authors' sampler: G no-cache forwards over the growing packed sequence; returns [docs, n, NB, G]."""
    NB, T, G = plan.num_blocks, plan.chunk_length, plan.block_length
    dtype = next(model.parameters()).dtype
    mask, positions, predictors = plan.attention_mask(dtype), plan.position_ids, plan.predictor_indices[0]
    generator = torch.Generator().manual_seed(0)
    out = torch.empty(docs.shape[0], n, NB, G, dtype=torch.int64)
    for d, doc in enumerate(docs):
        sequence = doc.repeat(n, 1)
        for t in range(G):
            length = T + t * NB
            logits = model(
                input_ids=sequence,
                attention_mask=mask[..., :length, :length].expand(n, 1, length, length),
                position_ids=positions[:length].expand(n, length),
            ).logits.float()
            step = logits[:, predictors[:, t]] / temperature  # [n, NB, V]
            sampled = torch.multinomial(step.softmax(-1).flatten(0, 1), 1, generator=generator).view(n, NB)
            out[d, :, :, t] = sampled
            sequence = torch.cat([sequence, sampled], dim=1)  # packed index T + t*NB + k
    return out


def engine_token_passes(plan: BlockPlan, n: int, kv_block: int) -> int:
    """Tokens the vLLM engine runs through the model for one chunk (prompt tails and decode steps)."""
    tails = sum(length - (length - 1) // kv_block * kv_block for length in plan.prefix_lengths.tolist())
    return n * tails + n * plan.num_blocks * (plan.block_length - 1)


def packed_token_passes(plan: BlockPlan, n: int) -> int:
    """Tokens the authors' sampler runs through the model for one chunk."""
    return n * sum(plan.chunk_length + t * plan.num_blocks for t in range(plan.block_length))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--docs", type=int, default=8, help="chunks per rollout-engine call")
    parser.add_argument("--baseline-docs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eager", action="store_true", help="no torch.compile in vLLM: ~1 min faster start")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        if args.model == "smollm2":
            from ebft.model_sources import smollm2_path

            model_path = str(smollm2_path())
        else:
            model_path = tiny_llama(scratch)
        config = build_config(
            {
                "model": {"policy": model_path, "dtype": args.dtype},
                "data": {"chunk_length": T},
                "sampling": {"context_length": C, "stride": S, "block_length": G, "num_samples": N},
                "rollout": {"kv_cache_gib": 1.0},
            }
        )
        plan = BlockPlan.from_config(config)
        docs = text_chunks(model_path, args.docs)
        tokens_per_doc = N * plan.num_blocks * G
        print(
            f"model {args.model} ({model_path}, {config.model.dtype}); T={T} C={C} s={S} G={G} n={N} "
            f"NB={plan.num_blocks}; torch threads {torch.get_num_threads()}"
        )

        from transformers import AutoModelForCausalLM

        from ebft.actors.rollout import RolloutWorker

        dtype = getattr(torch, config.model.dtype)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
        model.eval()
        baseline_docs = docs[: args.baseline_docs]
        started = time.perf_counter()
        worker = RolloutWorker(config, model_path, enforce_eager=args.eager)
        print(f"rollout engine ready in {time.perf_counter() - started:.1f} s")
        steps = iter(range(1_000_000))

        def rollout_once():
            # Training never sees a chunk twice: start from an empty prefix cache, with fresh seeds.
            worker.llm.reset_prefix_cache()
            worker.generate(ChunkBatch(chunk_ids=list(range(len(docs))), tokens=docs, step=next(steps)))

        rollout_once()  # warm-up (the first log-probs request costs seconds)
        # Alternate the two so that a change in machine load hits both; keep each one's best.
        actor_s = baseline_s = float("inf")
        for _ in range(args.repeats):
            baseline_s = min(
                baseline_s, best_time(lambda: packed_sampler(model, plan, baseline_docs, N, 0.6), 1, warmup=0)
            )
            actor_s = min(actor_s, best_time(rollout_once, 1, warmup=0))
        kv_block = worker.llm.llm_engine.vllm_config.cache_config.block_size
        worker.shutdown()
        engine_work = engine_token_passes(plan, N, kv_block) / tokens_per_doc
        baseline_work = packed_token_passes(plan, N) / tokens_per_doc
        baseline_rate = len(baseline_docs) * tokens_per_doc / baseline_s
        actor_rate = len(docs) * tokens_per_doc / actor_s
        print(
            f"(b) authors' packed sampler: {len(baseline_docs)} chunks in {baseline_s:.2f} s "
            f"-> {baseline_rate:,.0f} generated tok/s"
        )
        print(f"(a) rollout engine (vLLM): {len(docs)} chunks in {actor_s:.2f} s -> {actor_rate:,.0f} generated tok/s")
        print(
            f"model token passes per generated token: authors {baseline_work:.2f}, engine {engine_work:.2f} "
            f"(KV block {kv_block}: {engine_work - (G - 1) / G:.2f} of it recomputed prompt tails) "
            f"-> work ratio {baseline_work / engine_work:.2f}"
        )

    emit(
        {
            "benchmark": "rollout",
            "ratio": round(actor_rate / baseline_rate, 2),
            "actor_tok_s": round(actor_rate, 1),
            "baseline_tok_s": round(baseline_rate, 1),
            "model": args.model,
            "dtype": config.model.dtype,
            "T": T,
            "C": C,
            "s": S,
            "G": G,
            "n": N,
            "docs": len(docs),
            "baseline_docs": len(baseline_docs),
            "work_ratio": round(baseline_work / engine_work, 2),
            "kv_block": kv_block,
            "engine": "eager" if args.eager else "compiled",
            "threads": torch.get_num_threads(),
        }
    )


if __name__ == "__main__":
    main()
