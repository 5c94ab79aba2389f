"""Small helpers shared by the benchmarks: best-of-k wall time, the final JSON line, real-text chunks."""

import json
import time


def best_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


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
