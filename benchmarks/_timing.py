"""Small helpers shared by the benchmarks: best-of-k wall time and the final JSON line."""

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
