"""The checks to run when a GPU is lent, one prepared script (about 3-5 minutes on an H200; each check prints its
seconds, and one that fails prints why and the others still run). On the lent machine, from the repository root,
with benchmarks/.wheels built by benchmarks/gpu_wheels.sh and carried (DeepSpeed and the packages it needs; that
machine has torch and transformers but no network, vLLM, Ray or DeepSpeed):

    PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install --no-index --find-links benchmarks/.wheels deepspeed==0.19.8 peft accelerate hjson py-cpuinfo msgpack ninja psutil einops 'pydantic>=2.7' pyyaml 2>&1 | tail -3; python benchmarks/gpu.py

Geometry: T = 1024, C = s = G = 8 (NB = 127), n = 4: one packed row of S = 5,088 tokens. The model is a random
Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads of 64, 3 KV heads) or of Qwen2.5-1.5B's
(`--shape qwen2.5-1.5b`, the paper's model), so its figures are those of a real model without a download.
(1) learner: forward + backward of the learner's loss terms (log-probs of every generated token and the
    document CE, as ebft/learner/engine.py computes them) over one packed row; `blocks` vs `dense`, bf16 and
    float32; time (median of --repeats after a warm-up), peak GPU memory, and the log-probs compared.
(2) features: `FeatureExtractor.extract` of --docs documents and their n rollouts, `blocks` vs `dense`, on the
    device its config's resources give it (resources.features.gpus_per_actor = 1: cuda:0).
(3) rewards: `compute_rewards` at 16 docs x 127 blocks x 4 samples x D = 4608 on CUDA vs this machine's CPU.
(4) deepspeed: a LearnerRank with DeepSpeed on the device (resources.learner.gpus_per_actor = 1), ZeRO 1, 2 and 3,
    bf16, SmolLM2-135M's shape: one step against tests/learner_reference.py's float64 step (gradient and update
    within bf16 tolerances), checkpoint save + load giving the same next step exactly with the device RNG
    restored, and ZeRO-3's export to cuda:0 under a whole-model copy's memory (gpu_learner.py; a child process).
(5) lora: a LoRA LearnerRank (rank 8, every projection, ZeRO-2, bf16) on the device: one step against PEFT + AdamW
    in float64 (the adapters' gradients and update), and the push's adapters merged on the device vs on the CPU.
(6) cpu_pool: a child process that sees the GPU runs a CPU feature worker and a CPU learner rank: CUDA stays
    uninitialised.
(7) packed: the broadcast's packed wire format from CUDA tensors to CUDA (else to CPU) between two processes over
    ebft's CPU communicator (gloo with NCCL's failure semantics; that machine has no vLLM, so not its NCCL
    communicator, the abort or tensor parallelism), every tensor equal, GB/s; and send_packed on CUDA against a
    CPU unpack, with a float32 view off its alignment. Exits non-zero when any check fails.
(8) mfu: the learner's forward + backward tokens/s and MFU at the paper geometry, Qwen2.5-1.5B's shape, `blocks`,
    bf16, without and with gradient checkpointing; MFU = 6 * parameters * tokens/s / the dense bf16 peak.

    python benchmarks/gpu.py [--shape smollm2-135m|qwen2.5-1.5b] [--repeats 5] [--docs 4] [--only learner] ...
    python benchmarks/gpu.py --device cpu --quick --only deepspeed --only lora --only cpu_pool --only packed  # CPU
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the repository's ebft: it is not installed on the lent machine
import gpu_learner
import gpu_lora
from _timing import emit

from ebft.layout import BlockPlan

C = S = G = 8
N = 4


# Random Llamas of these models' shapes (Qwen2.5-1.5B's with its vocabulary, 12 heads and 2 KV heads).
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,  # --quick
                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
}  # fmt: skip
# Dense bf16 peak of an H100/H200 SXM (no sparsity), for MFU; other devices: --peak-tflops.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
# Set by a learner rank's rendezvous (ebft/learner/deepspeed_setup.py): a child process must not inherit them.
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def llama_config(args, shape: str | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape or args.shape], max_position_embeddings=args.chunk_length + 64)


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


def learner_step(attention: str, args, dtype, device, shape: str | None = None, checkpointing: bool = False):
    """The learner's forward + backward of one packed row; returns a call that gives its log-probs. With `shape`
    (the mfu check) the weights are made on the device in `dtype`, else in float32 on the CPU, then cast."""
    from transformers import LlamaForCausalLM

    from ebft import packed_attention
    from ebft.learner.loss import document_ce, generated_logprobs

    torch.manual_seed(0)  # the same weights in every dtype: made in float32, then cast
    implementation = packed_attention.register() if attention == "blocks" else "sdpa"
    with torch.device(device if shape else "cpu"):
        model = LlamaForCausalLM._from_config(
            llama_config(args, shape), attn_implementation=implementation, dtype=dtype if shape else torch.float32
        )
    model = model.to(device=device, dtype=dtype).train()
    if checkpointing:  # as the learner does (ebft/learner/deepspeed_setup.py)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
            overrides.append(f"resources.features.gpus_per_actor={int(device.type == 'cuda')}")
            config = build_config(overrides=[*overrides, f"features.attention={attention}"])
            extractor = FeatureExtractor(model_dir, config)  # on the device its resources give (actor_resources.py)
            seconds, peak, output = timed(lambda e=extractor: e.extract(batch).rollout_features, args.repeats, device)
            figures[f"features_{attention}_s"], figures[f"features_{attention}_peak_gib"] = seconds, peak
            figures["features_device"] = str(extractor.device)
            outputs[attention] = output.float()
            shape = f"{args.docs} docs x {N} samples on {extractor.device}"
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
    X = torch.nn.functional.normalize(torch.randn(16, 127, N, 4608), dim=-1)  # [docs, NB, n, D], as training has it
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


def check_mfu(args, device) -> dict:
    """Tokens/s and MFU of the learner's forward + backward at the paper geometry (Qwen2.5-1.5B's shape)."""
    from transformers import LlamaForCausalLM

    shape = "tiny" if args.quick else "qwen2.5-1.5b"
    with torch.device("meta"):
        parameters = sum(p.numel() for p in LlamaForCausalLM(llama_config(args, shape)).parameters())  # tied: once
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_flops = (
        args.peak_tflops * 1e12
        if args.peak_tflops
        else next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), float("nan"))
    )
    tokens = BlockPlan(args.chunk_length, C, S, G, samples=N).packed_length
    print(
        f"mfu: {shape} shape, {parameters / 1e6:,.1f} M parameters, S = {tokens} packed tokens, `blocks`, bf16; "
        f"MFU = 6 * parameters * tokens/s / {peak_flops / 1e12:g} TFLOP/s (dense bf16 peak assumed for {name}; "
        "6N counts no attention-score FLOPs and no recomputation)"
    )
    figures = {"mfu_parameters": parameters, "mfu_tokens": tokens, "mfu_peak_tflops": peak_flops / 1e12}
    for checkpointing in (False, True):
        step = learner_step("blocks", args, torch.bfloat16, device, shape=shape, checkpointing=checkpointing)
        seconds, peak, _ = timed(step, args.repeats, device)
        del step
        rate = tokens / seconds
        mfu = 6 * parameters * rate / peak_flops
        key = "checkpointing" if checkpointing else "plain"
        figures.update({f"mfu_{key}_s": seconds, f"mfu_{key}_tokens_per_s": rate, f"mfu_{key}": mfu})
        figures[f"mfu_{key}_peak_gib"] = peak
        print(f"mfu {key:13s}: {seconds * 1e3:8.1f} ms  {rate:9.0f} tok/s  MFU {mfu:.1%}  peak {peak:6.2f} GiB")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return figures


def run_child(name: str, args, device, timeout_s: float) -> dict:
    """Run `--child name` in a fresh process (its own process group, DeepSpeed accelerator and CUDA state); its
    output goes to ours, its figures come back through a file."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", device.type]
        command += ["--result-file", str(result), *(["--quick"] if args.quick else [])]
        environment = {key: value for key, value in os.environ.items() if key not in RENDEZVOUS}
        environment["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS (the resume check)
        sys.stdout.flush()
        completed = subprocess.run(command, env=environment, timeout=timeout_s)
        if completed.returncode:
            raise RuntimeError(f"the {name} child process exited with status {completed.returncode}")
        return json.loads(result.read_text())


def check_deepspeed(args, device) -> dict:
    return run_child("deepspeed", args, device, timeout_s=300)


def check_lora(args, device) -> dict:
    return run_child("lora", args, device, timeout_s=180)


def check_cpu_pool(args, device) -> dict:
    return run_child("cpu_pool", args, device, timeout_s=180)


def check_packed(args, device) -> dict:
    buffer_bytes = 4096 if args.quick else 64 * 2**20  # several buffers per push (ebft's default is 1 GiB)
    return gpu_learner.run_packed(device, SHAPES["tiny" if args.quick else "smollm2-135m"], buffer_bytes)


CHECKS = {
    "learner": check_learner,
    "features": check_features,
    "rewards": check_rewards,
    "deepspeed": check_deepspeed,
    "lora": check_lora,
    "cpu_pool": check_cpu_pool,
    "packed": check_packed,
    "mfu": check_mfu,
}
CHILDREN = {
    "deepspeed": lambda args, device: gpu_learner.run_deepspeed(
        device, SHAPES["tiny" if args.quick else "smollm2-135m"]
    ),
    "lora": lambda args, device: gpu_lora.run_lora(device, SHAPES["tiny" if args.quick else "smollm2-135m"]),
    "cpu_pool": lambda args, device: gpu_learner.run_cpu_pool(SHAPES["tiny"]),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="smollm2-135m")
    parser.add_argument("--chunk-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--docs", type=int, default=4, help="documents per feature extraction")
    parser.add_argument("--only", choices=list(CHECKS), action="append")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if there is one")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU run): tiny shape, T=64, 1 repeat")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: known GPUs)")
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.shape, args.chunk_length, args.repeats, args.docs = "tiny", 64, 1, 1
    return args


def main() -> None:
    args = parse_args()
    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device("cuda", 0) if kind == "cuda" else torch.device("cpu")  # an index: torch.cuda.set_device
    if args.child:
        Path(args.result_file).write_text(json.dumps(CHILDREN[args.child](args, device)))
        return
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; python {sys.version.split()[0]}; model shape {args.shape}")
    result = {"benchmark": "gpu", "device": name, "shape": args.shape, "quick": args.quick}
    total = time.perf_counter()
    for check in args.only or CHECKS:
        started = time.perf_counter()
        try:
            result.update(CHECKS[check](args, device))
        except Exception as error:  # the other checks still run
            traceback.print_exc()
            result[f"{check}_error"] = repr(error)[:300]
        result[f"{check}_seconds"] = round(time.perf_counter() - started, 1)
        print(f"({check}: {time.perf_counter() - started:.0f} s)", flush=True)
    print(f"(all: {time.perf_counter() - total:.0f} s)")
    emit(result)
    failed = sorted(
        key for key, value in result.items() if key.endswith("_error") or (key.endswith("_pass") and not value)
    )
    if failed:
        sys.exit(f"FAILED: {', '.join(failed)}")


if __name__ == "__main__":
    main()
