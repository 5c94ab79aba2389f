"""The checks to run when a GPU is lent: the learner's and the feature network's forward on CUDA in bf16,
block-sparse (`blocks`) vs dense attention at the paper's geometry, and the reward kernel's speed.

Geometry: T = 1024, C = s = G = 8 (NB = 127), n = 4: one packed row of S = 5,088 tokens. The model is a random
Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads of 64, 3 KV heads) or of Qwen2.5-1.5B's
(`--shape qwen2.5-1.5b`, the paper's model), so its figures are those of a real model without a download.
(1) learner: forward + backward of the learner's loss terms (log-probs of every generated token and the
    document CE, as ebft/learner/engine.py computes them) over one packed row; `blocks` vs `dense`, bf16 and
    float32; time (median of --repeats after a warm-up), peak GPU memory, and the log-probs compared.
(2) features: `FeatureExtractor.extract` of --docs documents and their n rollouts on CUDA, `blocks` vs `dense`.
(3) rewards: `compute_rewards` at 16 docs x 127 blocks x 4 samples x D = 4608 on CUDA vs this machine's CPU.
DeepSpeed, vLLM and Ray are not on the GPU machine, so the learner runs without its DeepSpeed engine.

    python benchmarks/gpu.py [--shape smollm2-135m|qwen2.5-1.5b] [--repeats 5] [--docs 4] [--only learner]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import emit  # noqa: E402

from ebft.layout import BlockPlan  # noqa: E402

C = S = G = 8
N = 4


# Random Llamas of these models' shapes (Qwen2.5-1.5B's with its vocabulary, 12 heads and 2 KV heads).
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True),
}  # fmt: skip


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[args.shape], max_position_embeddings=args.chunk_length + 64)


def timed(step, repeats: int, device: torch.device) -> tuple[float, float, object]:
    """Median seconds of `repeats` calls after one warm-up, peak memory (GiB) and the last output."""
    output = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        output = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak, output


def learner_step(attention: str, args, dtype, device):
    """The learner's forward + backward of one packed row; returns a call that gives its log-probs."""
    from transformers import LlamaForCausalLM

    from ebft import packed_attention
    from ebft.learner.loss import document_ce, generated_logprobs

    torch.manual_seed(0)  # the same weights in every dtype: made in float32, then cast
    implementation = packed_attention.register() if attention == "blocks" else "sdpa"
    model = LlamaForCausalLM._from_config(llama_config(args), attn_implementation=implementation, dtype=torch.float32)
    model = model.to(device=device, dtype=dtype).train()
    vocab = model.config.vocab_size
    plan = replace(BlockPlan(args.chunk_length, C, S, G), samples=N)
    generator = torch.Generator().manual_seed(1)
    docs = torch.randint(3, vocab, (1, plan.chunk_length), generator=generator)
    packed = plan.pack(docs, torch.randint(3, vocab, (1, N, plan.num_blocks, G), generator=generator)).to(device)
    docs, positions = docs.to(device), plan.position_ids[None].to(device)
    extra = {"block_plan": plan} if attention == "blocks" else {"attention_mask": plan.attention_mask(dtype).to(device)}

    def step():
        logits = model(input_ids=packed, position_ids=positions, use_cache=False, **extra).logits
        logprobs = generated_logprobs(logits, packed, plan, 0.6)
        (document_ce(logits, docs).mean() + logprobs.mean()).backward()
        model.zero_grad(set_to_none=True)
        return logprobs.detach().float()

    return step


def check_learner(args, device) -> dict:
    figures, outputs = {}, {}
    for dtype_name in ("bfloat16", "float32"):
        for attention in ("dense", "blocks"):
            seconds, peak, output = timed(
                learner_step(attention, args, getattr(torch, dtype_name), device), args.repeats, device
            )
            key = f"{attention}_{dtype_name}"
            figures[f"learner_{key}_s"], figures[f"learner_{key}_peak_gib"] = seconds, peak
            outputs[key] = output
            tokens = BlockPlan(args.chunk_length, C, S, G, samples=N).packed_length
            rate = f"{tokens / seconds:9.0f} tok/s"
            print(f"learner {attention:6s} {dtype_name:8s}: {seconds * 1e3:8.1f} ms  {rate}  peak {peak:6.2f} GiB")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    figures["learner_blocks_vs_dense_float32_max_abs"] = (
        (outputs["blocks_float32"] - outputs["dense_float32"]).abs().max().item()
    )
    figures["learner_blocks_vs_dense_bf16_max_abs"] = (
        (outputs["blocks_bfloat16"] - outputs["dense_bfloat16"]).abs().max().item()
    )
    figures["learner_bf16_vs_float32_mean_abs"] = (
        (outputs["blocks_bfloat16"] - outputs["blocks_float32"]).abs().mean().item()
    )
    figures["learner_speedup_blocks_bf16"] = figures["learner_dense_bfloat16_s"] / figures["learner_blocks_bfloat16_s"]
    print(
        "log-probs, max |blocks - dense|: float32 {learner_blocks_vs_dense_float32_max_abs:.2e}, "
        "bf16 {learner_blocks_vs_dense_bf16_max_abs:.2e}; "
        "mean |bf16 - float32| {learner_bf16_vs_float32_mean_abs:.2e}".format(**figures)
    )
    return figures


def check_features(args, device) -> dict:
    from transformers import LlamaForCausalLM

    from ebft.config import build_config
    from ebft.features.extractor import FeatureExtractor
    from ebft.messages import ChunkBatch, RolloutBatch

    figures, outputs = {}, {}
    with tempfile.TemporaryDirectory() as model_dir:
        torch.manual_seed(0)
        LlamaForCausalLM._from_config(llama_config(args)).save_pretrained(model_dir)
        plan, vocab = BlockPlan(args.chunk_length, C, S, G), llama_config(args).vocab_size
        generator = torch.Generator().manual_seed(1)
        docs = torch.randint(3, vocab, (args.docs, plan.chunk_length), generator=generator)
        rollouts = torch.randint(3, vocab, (args.docs, N, plan.num_blocks, G), generator=generator)
        batch = RolloutBatch(ChunkBatch(list(range(args.docs)), docs, 0), rollouts, torch.zeros(rollouts.shape), 0)
        for attention in ("dense", "blocks"):
            overrides = [f"data.chunk_length={args.chunk_length}", f"sampling.num_samples={N}", "model.dtype=bfloat16"]
            config = build_config(overrides=[*overrides, f"features.attention={attention}"])
            extractor = FeatureExtractor(model_dir, config, device=device)
            seconds, peak, output = timed(lambda e=extractor: e.extract(batch).rollout_features, args.repeats, device)
            figures[f"features_{attention}_s"], figures[f"features_{attention}_peak_gib"] = seconds, peak
            outputs[attention] = output.float()
            shape = f"{args.docs} docs x {N} samples"
            print(f"features {attention:6s} bf16, {shape}: {seconds * 1e3:8.1f} ms  peak {peak:6.2f} GiB")
            del extractor
            if device.type == "cuda":
                torch.cuda.empty_cache()
    figures["features_blocks_vs_dense_max_abs"] = (outputs["blocks"] - outputs["dense"]).abs().max().item()
    figures["features_speedup_blocks"] = figures["features_dense_s"] / figures["features_blocks_s"]
    print("features, max |blocks - dense| (bf16): {features_blocks_vs_dense_max_abs:.2e}".format(**figures))
    return figures


def check_rewards(args, device) -> dict:
    from ebft.config import RewardConfig
    from ebft.rewards import compute_rewards

    torch.manual_seed(0)
    X = torch.nn.functional.normalize(torch.randn(16, N, 127, 4608), dim=-1).transpose(1, 2)  # as training has it
    y = torch.nn.functional.normalize(torch.randn(16, 127, 4608), dim=-1)
    reward = RewardConfig(diversity_coef=1.0, whitening="sample")
    cpu_s, _, cpu_out = timed(lambda: compute_rewards(X, y, reward).advantages, args.repeats, torch.device("cpu"))
    Xd, yd = X.to(device), y.to(device)
    gpu_s, _, gpu_out = timed(lambda: compute_rewards(Xd, yd, reward).advantages, args.repeats, device)
    difference = (gpu_out.cpu() - cpu_out).abs().max().item()
    print(
        f"rewards 16x127x{N}x4608 float32: cpu ({torch.get_num_threads()} threads) {cpu_s * 1e3:.1f} ms, "
        f"{device.type} {gpu_s * 1e3:.2f} ms; max |gpu - cpu| {difference:.2e}"
    )
    return {"rewards_cpu_s": cpu_s, "rewards_gpu_s": gpu_s, "rewards_gpu_vs_cpu_max_abs": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="smollm2-135m")
    parser.add_argument("--chunk-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--docs", type=int, default=4, help="documents per feature extraction")
    parser.add_argument("--only", choices=["learner", "features", "rewards"], action="append")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; model shape {args.shape}")
    result = {"benchmark": "gpu", "device": name, "shape": args.shape}
    checks = {"learner": check_learner, "features": check_features, "rewards": check_rewards}
    for check in args.only or checks:
        started = time.perf_counter()
        result.update(checks[check](args, device))
        print(f"({check}: {time.perf_counter() - started:.0f} s)")
    emit(result)


if __name__ == "__main__":
    main()
