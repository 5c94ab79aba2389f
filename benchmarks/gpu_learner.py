"""The learner-side GPU checks of benchmarks/gpu.py (see its docstring), each also runnable on CPU (`--device cpu`):

deepspeed  a LearnerRank on the device, ZeRO 1, 2 and 3 in bf16: one step against the float64 plain-PyTorch step of
           tests/learner_reference.py, exact resume from a checkpoint (device RNG included), the ZeRO-3 export's
           memory on the device. Runs in a child process (its own process group and deterministic kernels).
cpu_pool   a child process that sees the GPU runs a CPU feature worker and a CPU learner rank: CUDA must stay
           uninitialised (the device rule of ebft/actor_resources.py).
packed     the broadcast sender's packed path (ebft/weight_broadcast.py) from device tensors: two processes over a
           gloo TransferGroup, every tensor compared exactly, and the packing checked in process against a CPU
           unpack.
"""

from __future__ import annotations

import gc
import math
import sys
import tempfile
import time
import traceback
import types
import warnings
from datetime import timedelta
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# bf16 tolerances against the float64 reference (one step of a random Llama, 2 micro-batches, AdamW at lr 1e-2).
# Gradient: bf16 keeps 8 significant bits (unit roundoff u = 2^-8 ~ 3.9e-3); every matmul output and activation is
# rounded to it, so the whole-model gradient carries a relative error of a few u: measured on CPU, 6.4e-3 (tiny
# model; ebft's CPU test 6.5e-3) and 1.5e-2 (SmolLM2's shape). 5e-2 is ~13 u; a fault (a lost micro-batch, a wrong
# loss term, scale or mask) is an O(1) error (a loss of half the scale: 1.0).
GRAD_TOLERANCE = 5e-2
# Update (W1 - W0, W0 the same bf16 weights on both sides): Adam's first step is ~lr * sign(g), so the entries whose
# gradient is below bf16's error flip sign (each a 2 lr error), and bf16 rounds W1 by up to u |W1|. Measured on
# CPU: 0.09 (tiny) and 0.135 (SmolLM2's shape) of the update's norm. A missing or doubled step is 1, a wrong sign 2.
UPDATE_TOLERANCE = 0.4


def learner_reference():
    """tests/learner_reference.py: the float64 plain-PyTorch learner step (T=24, C=s=G=4, n=3)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import learner_reference

    return learner_reference


def save_llama(directory: Path, shape: dict) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=1024)).save_pretrained(directory)
    return directory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """||got - want|| / ||want|| over all tensors together (Frobenius)."""
    if set(got) != set(want):
        raise ValueError(f"different tensors: {sorted(set(got) ^ set(want))[:4]}")
    error = sum(float((got[n].double() - want[n].double()).square().sum()) for n in want)
    return math.sqrt(error / sum(float(w.double().square().sum()) for w in want.values()))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ----------------------------------------------------------------------------- deepspeed


def quiet() -> None:
    """No weight-loading progress bars, no DeepSpeed's deprecation warnings from torch.distributed."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def run_deepspeed(device: torch.device, shape: dict) -> dict:
    """ZeRO 1, 2, 3 in bf16 on `device`, in this (child) process."""
    quiet()
    torch.use_deterministic_algorithms(True, warn_only=True)  # so that the resumed step can be equal exactly
    torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN in buffers DeepSpeed pads
    ref = learner_reference()
    from ebft.learner.engine import LearnerRank

    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        model_dir = save_llama(Path(folder) / "model", shape)
        batches = [ref.make_batch(4, seed=seed, version=seed) for seed in (0, 1)]
        started = time.perf_counter()
        expected = reference_step(ref, model_dir, batches[0], stage_config(ref, 1, device))
        print(f"float64 reference step on CPU: {time.perf_counter() - started:.1f} s")
        for stage in (1, 2, 3):
            started = time.perf_counter()
            try:
                figures.update(check_stage(ref, LearnerRank, stage, device, model_dir, batches, expected))
            except Exception as error:  # the other stages still run
                traceback.print_exc()
                figures[f"ds_zero{stage}_error"] = repr(error)[:300]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"(ZeRO-{stage}: {time.perf_counter() - started:.1f} s)")
    return figures


def check_stage(ref, LearnerRank, stage: int, device, model_dir: Path, batches, expected) -> dict:
    learner = LearnerRank(stage_config(ref, stage, device), model_dir)
    try:
        figures = first_step(ref, learner, batches[0], expected, f"zero{stage}")
        resumed, latest = resumed_step(learner, batches[1], model_dir.parent / f"zero{stage}", f"zero{stage}")
        figures.update(resumed)
        if stage == 3:
            figures.update(export_memory(learner, latest))
        return figures
    finally:
        learner.close()


def stage_config(ref, stage: int, device: torch.device):
    """The reference geometry (4 documents, 2 micro-batches of 2), bf16, the learner's device from its resources."""
    return ref.make_config(
        model={"dtype": "bfloat16"},
        learner={"zero_stage": stage, "gradient_checkpointing": True},
        optim={"lr": 1e-2, "warmup_fraction": 0.0, "weight_decay": 0.1},
        resources={"learner": {"gpus_per_actor": 1 if device.type == "cuda" else 0}},
    )


def reference_step(ref, model_dir: Path, batch, config) -> dict:
    """The float64 step from the bf16-rounded weights the bf16 learner starts from: loss, gradients, weights."""
    model = ref.float64_model(model_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).double())
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss, _, _ = ref.reference_loss(model, [batch], config, current_version=0)
    loss.backward()
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    o = config.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    ref.reference_update(model, optimizer, o.lr, o.grad_clip)
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"loss": float(loss.detach()), "gradients": gradients, "start": start, "after": after}


def weights(learner) -> dict[str, torch.Tensor]:
    """The learner's weights as its weight push streams them, in float64 on the CPU (copies)."""
    return {name: tensor.double() for name, tensor in learner.stream_weights("cpu").tensors}


def first_step(ref, learner, batch, expected: dict, key: str) -> dict:
    captured = ref.capture_gradients(learner)
    metrics = learner.train_step([batch[0]], [batch[1]], current_version=0)
    after = weights(learner)
    start = expected["start"]
    figures = {
        "loss_abs": abs(metrics["train/loss"] - expected["loss"]),
        "grad_rel": relative_error(captured, expected["gradients"]),
        "update_rel": relative_error(
            {n: after[n] - start[n] for n in start}, {n: expected["after"][n] - start[n] for n in start}
        ),
        "weights_rel": relative_error(after, expected["after"]),
    }
    figures["step_pass"] = figures["grad_rel"] < GRAD_TOLERANCE and figures["update_rel"] < UPDATE_TOLERANCE
    print(
        "{key} bf16 on {device}, one step vs float64: loss {loss:.5f} (|diff| {loss_abs:.1e}), gradient rel "
        "{grad_rel:.2e} (< {grad:g}), update rel {update_rel:.3f} (< {update:g}), weights rel {weights_rel:.1e}: "
        "{verdict}".format(
            **figures,
            key=key,
            device=learner.device,
            loss=metrics["train/loss"],
            grad=GRAD_TOLERANCE,
            update=UPDATE_TOLERANCE,
            verdict=verdict(figures["step_pass"]),
        )
    )
    return {f"ds_{key}_{name}": value for name, value in figures.items()}


def resumed_step(learner, batch, folder: Path, key: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Save, step; load, step again: equal exactly, and the device RNG restored (a draw after each equal)."""
    path = learner.save_checkpoint(folder / "step_1")
    draws, results = [], []
    for attempt in range(3):
        if attempt:
            learner.load_checkpoint(path)
        draws.append((torch.rand(4, device=learner.device), torch.rand(4)))
        loss = learner.train_step([batch[0]], [batch[1]], current_version=1)["train/loss"]
        results.append((loss, weights(learner)))
        if attempt == 1 and results[0][0] == results[1][0] and relative_error(results[1][1], results[0][1]) == 0:
            break  # equal exactly: no third run needed to tell a resume fault from non-deterministic kernels
    rng_equal = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(draws[0], draws[1]))
    difference = relative_error(results[1][1], results[0][1])
    exact = difference == 0 and results[0][0] == results[1][0]
    figures = {f"ds_{key}_resume_exact": exact, f"ds_{key}_resume_rel": difference, f"ds_{key}_rng_restored": rng_equal}
    note = ""
    if not exact and len(results) == 3:
        repeat = relative_error(results[2][1], results[1][1])
        figures[f"ds_{key}_resume_repeat_rel"] = repeat
        note = f"; two steps from the same loaded checkpoint differ by {repeat:.1e} " + (
            "(non-deterministic kernels)" if repeat else "(so the checkpoint misses state)"
        )
    print(
        f"{key} resume: step 2 continued vs after load_checkpoint: loss {results[0][0]:.6f} vs {results[1][0]:.6f}, "
        f"weights rel {difference:.1e}: {verdict(exact)}{note}; "
        f"{learner.device.type} RNG restored: {verdict(rng_equal)}"
    )
    return figures, results[-1][1]


def module_bytes(metadata) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name, shape, dtype in metadata:
        module = name.rsplit(".", 1)[0]
        sizes[module] = sizes.get(module, 0) + math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return sizes


def export_memory(learner, latest: dict[str, torch.Tensor]) -> dict:
    """ZeRO-3's weight export to the learner's device, consumed one tensor at a time: its peak memory above the
    training state (gathered module + its copy, never the whole model) and the tensors equal to the weights."""
    device = learner.device
    stream = learner.stream_weights(device)
    sizes = module_bytes(stream.metadata)
    model, largest = sum(sizes.values()), max(sizes.values())
    synchronize(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    count, elsewhere, unequal = 0, 0, 0
    for name, tensor in stream.tensors:
        count += 1
        elsewhere += tensor.device != device
        unequal += not torch.equal(tensor.cpu().double(), latest[name])  # no float64 copy on the device
    figures = {"ds_export_tensors": count, "ds_export_off_device": elsewhere, "ds_export_unequal": unequal}
    mib = 2**20
    line = f"ZeRO-3 export to {device}: {count} tensors, {elsewhere} elsewhere, {unequal} unequal to the weights"
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
        figures.update(ds_export_peak_mib=peak / mib, ds_model_mib=model / mib, ds_largest_module_mib=largest / mib)
        ok = peak < model and count and not elsewhere and not unequal
        line += (
            f"; peak {peak / mib:.1f} MiB above the training state, model {model / mib:.1f} MiB, largest module "
            f"{largest / mib:.1f} MiB (gathered + copy: ~{2 * largest / mib:.1f}): {verdict(ok)} (no whole-model copy)"
        )
        figures["ds_export_pass"] = bool(ok)
    print(line)
    return figures


# ----------------------------------------------------------------------------- cpu_pool


def run_cpu_pool(shape: dict) -> dict:
    """In a child process that can see the GPU: a CPU feature worker and a CPU learner rank never initialise CUDA."""
    quiet()
    ref = learner_reference()
    from ebft.features.extractor import FeatureExtractor
    from ebft.learner import checkpoint as ckpt
    from ebft.learner.engine import LearnerRank

    config = ref.make_config()  # every pool's resources at their default: gpus_per_actor = 0
    states = {"start": torch.cuda.is_initialized()}
    with tempfile.TemporaryDirectory() as folder:
        model_dir = save_llama(Path(folder), shape)
        rollouts, _ = ref.make_batch(4, seed=0, version=0)
        extractor = FeatureExtractor(model_dir, config)
        features = extractor.extract(rollouts)
        states["features"] = torch.cuda.is_initialized()
        ckpt.capture_rng_state(torch.device("cpu"))
        states["rng_state"] = torch.cuda.is_initialized()
        learner = LearnerRank(config, model_dir)
        loss = learner.train_step([rollouts], [features], current_version=0)["train/loss"]
        ckpt.capture_rng_state(learner.device)
        states["learner"] = torch.cuda.is_initialized()
    ok = not any(states.values())
    print(
        f"cpu pool (CUDA visible: {torch.cuda.is_available()}): feature worker on {extractor.device}, learner on "
        f"{learner.device} (loss {loss:.4f}); torch.cuda.is_initialized() at start / after extract / after "
        f"capture_rng_state(cpu) / after a learner step: {' / '.join(str(v) for v in states.values())}: {verdict(ok)}"
    )
    return {"cpu_pool_cuda_visible": torch.cuda.is_available(), "cpu_pool_pass": ok}


# ----------------------------------------------------------------------------- packed


def packed_tensors(shape: dict, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """A random Llama's parameters in bf16 (the same values in every process), after an odd-length bf16 tensor and
    a float32 one, so a float32 view starts off its alignment and takes receive_packed's copy path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    generator = torch.Generator().manual_seed(0)
    named = [("extra.odd", torch.randn(1001, generator=generator).bfloat16())]
    named.append(("extra.float32", torch.randn(3, 333, generator=generator)))
    named += [(n, torch.randn(p.shape, generator=generator).bfloat16()) for n, p in model.named_parameters()]
    return [(name, tensor.to(device)) for name, tensor in named]


def pack_round_trip(named, buffer_bytes: int) -> tuple[int, int]:
    """send_packed on the tensors' device into recorded buffers, receive_packed of those on the CPU: (tensors,
    unequal)."""
    from ebft.weight_broadcast import receive_packed, send_packed

    buffers = []
    sent = types.SimpleNamespace(start_broadcast=lambda tensor: (buffers.append(tensor.cpu()), lambda: True)[1])
    send_packed(named, sent, buffer_bytes, lambda done: done())
    replay = types.SimpleNamespace(start_broadcast=lambda tensor: (tensor.copy_(buffers.pop(0)), lambda: True)[1])
    expected = {name: tensor.cpu() for name, tensor in named}
    metadata = [(name, list(t.shape), t.dtype) for name, t in named]
    checked = []
    receive_packed(
        metadata, replay, buffer_bytes, torch.device("cpu"), lambda views: checked.extend(views_equal(views, expected))
    )
    return len(checked), checked.count(False)


def views_equal(views, expected) -> list[bool]:
    return [torch.equal(view, expected[name]) for name, view in views]


def packed_worker(rank: int, port: int, spec: dict, queue) -> None:
    """One end of a gloo TransferGroup (built without vLLM's rendezvous: a TCPStore served by rank 0)."""
    from ebft.weight_broadcast import CpuCommunicator, TransferGroup, receive_packed, send_packed, wait_complete

    device = torch.device(spec["send_device"] if rank == 0 else spec["receive_device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    named = packed_tensors(spec["shape"], device)  # the receiver's copy is what it must receive
    expected = dict(named)
    metadata = [(name, list(t.shape), t.dtype) for name, t in named]
    timeout = timedelta(seconds=spec["timeout_s"])
    store = torch.distributed.TCPStore("127.0.0.1", port, 2, rank == 0, timeout)
    gloo = CpuCommunicator(torch.distributed.PrefixStore("ebft/gloo/", store), rank, 2)
    group = TransferGroup(rank, 2, store, gloo, spec["timeout_s"])
    checked, seconds = [], []
    for _ in range(spec["rounds"]):
        checked.clear()
        synchronize(device)
        started = time.perf_counter()
        if rank == 0:
            send_packed(named, group, spec["buffer_bytes"], wait_complete)
        else:
            receive_packed(
                metadata, group, spec["buffer_bytes"], device, lambda v: checked.extend(views_equal(v, expected))
            )
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    queue.put({"rank": rank, "seconds": seconds[-1], "received": len(checked), "unequal": checked.count(False)})


def two_process_broadcast(shape: dict, send: torch.device, receive: torch.device, buffer_bytes: int) -> dict:
    from ebft.learner.deepspeed_setup import free_port

    context = torch.multiprocessing.get_context("spawn")
    queue = context.SimpleQueue()
    spec = {"shape": shape, "send_device": str(send), "receive_device": str(receive)}
    spec.update(buffer_bytes=buffer_bytes, rounds=2, timeout_s=60.0)
    torch.multiprocessing.spawn(packed_worker, args=(free_port(), spec, queue), nprocs=2, join=True)
    results = {r["rank"]: r for r in (queue.get(), queue.get())}
    return results[1] | {"sender_seconds": results[0]["seconds"]}


def run_packed(device: torch.device, shape: dict, buffer_bytes: int) -> dict:
    named = packed_tensors(shape, device)
    total = sum(t.numel() * t.element_size() for _, t in named)
    count, unequal = pack_round_trip(named, buffer_bytes)
    print(
        f"packed, in process: send_packed on {device} ({len(named)} tensors, {total / 2**20:.1f} MiB, buffers of "
        f"{buffer_bytes:,} bytes), receive_packed on cpu: {count} tensors, {unequal} unequal: "
        f"{verdict(count == len(named) and not unequal)}"
    )
    figures = {"packed_inprocess_pass": count == len(named) and not unequal, "packed_mib": total / 2**20}
    del named
    receivers = [device, torch.device("cpu")] if device.type == "cuda" else [device]
    for receive in receivers:
        try:
            result = two_process_broadcast(shape, device, receive, buffer_bytes)
        except Exception as error:  # gloo may refuse device tensors: then receive on the CPU and say so
            print(f"packed, two processes {device.type} -> {receive.type} over gloo failed: {error!r}"[:600])
            continue
        ok = result["received"] == count and not result["unequal"]
        rate = total / result["seconds"] / 1e9
        print(
            f"packed, two processes over gloo, {device.type} -> {receive.type}: {result['received']} tensors, "
            f"{result['unequal']} unequal: {verdict(ok)}; {result['seconds'] * 1e3:.0f} ms on the receiver "
            f"({rate:.2f} GB/s), sender {result['sender_seconds'] * 1e3:.0f} ms (second of 2 rounds)"
        )
        figures.update(packed_mode=f"{device.type}->{receive.type}", packed_pass=ok, packed_gbps=rate)
        return figures
    figures["packed_mode"] = "in-process only"
    return figures
