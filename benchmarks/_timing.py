"""Small helpers shared by the benchmarks: a quiet offline environment, wall times after a warm-up, the final JSON
line, real-text chunks."""

import json
import os
import time

QUIET_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process CPU engines, as the rollout actors run them
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_environment() -> None:
    """Offline, no usage reports, CPU engines as ebft runs them; call before importing ray or vllm (the caller's
    own settings win)."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def wall_times(fn, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    return min(wall_times(fn, repeats, warmup))


def emit(result: dict) -> None:
    print(json.dumps(result))


def stdlib_chunks(tokenizer_path: str, docs: int, length: int):
    """[docs, length] token ids of consecutive stretches of Python standard-library source."""
    import torch
    from transformers import AutoTokenizer

    from ebft.data.chunks import python_stdlib_files

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    ids: list[int] = []
    for _, path in python_stdlib_files():
        ids += tokenizer(path.read_text(errors="replace"))["input_ids"]
        if len(ids) >= docs * length:
            break
    return torch.tensor(ids[: docs * length]).view(docs, length)
