"""What an EBFT step costs against an SFT step on the same chunks, against the floor S/T.

Both methods train through `ebft.cluster.train.run`, the code path `ebft train` runs, one after the other in
one process, on the same machine, model and chunks (the demo's settings by default, evaluation and
checkpoints off). From each run's metrics.jsonl, after `--warmup` steps:

    step_ratio       median EBFT step time / median SFT step time  (perf/step_time_s: the controller's wall
                     time per step; with max_staleness >= 1 generation overlaps training)
    machine_ratio    EBFT / SFT machine time per trained document  (ebft.cluster.cost: each pool's cores or
                     GPUs times the seconds it was busy)
    floor            S/T = (T + n*NB*G) / T: the learner tokens of an EBFT document over an SFT document's
    ratio_to_floor   step_ratio / floor

The profile splits EBFT's machine time per document by pool, and the learner's part against the floor
(EBFT's learner time over SFT's, which packing makes S/T at best). Then the measured throughput of each
pool (tokens per device-second) sizes the pools for a paper-geometry config (`--size-for`, default
configs/qa_code.yaml) on paper: the device-seconds per document of each pool at that geometry, and the
split of 8 and 16 devices that makes the pipeline balanced (the slowest pool sets the step). The
throughputs are this machine's: run the script on the GPUs you size for.

    python benchmarks/cost_vs_sft.py [--config configs/quickstart.yaml] [--steps 8] [--warmup 2] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import emit  # noqa: E402

from ebft.cluster.cost import floor_ratio  # noqa: E402
from ebft.config import Config, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
POOLS = ("rollout", "features", "learner")


def run_method(config: Config, method: str, output_dir: Path) -> list[dict]:
    from ebft.cluster.train import run

    raw = config.model_dump(mode="json")
    raw["training"].update(method=method, output_dir=str(output_dir / method))
    if method == "sft":
        raw["loss"]["kl_coef"] = 0.0
    run(Config.model_validate(raw))
    records = [json.loads(line) for line in (output_dir / method / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "cost/machine_s" in r]


def summarize(records: list[dict], warmup: int, docs_per_step: int) -> dict[str, float]:
    steady = [r for r in records if r["step"] >= warmup]
    docs = docs_per_step * len(steady)
    return {
        "steps": len(steady),
        "step_time_s": statistics.median(r["perf/step_time_s"] for r in steady),
        "train_s": statistics.median(r["timing/train"] for r in steady),
        **{f"{name}_per_doc": sum(r.get(f"cost/{name}_s", 0.0) for r in steady) / docs for name in ("machine", *POOLS)},
    }


def pool_tokens_per_doc(config: Config) -> dict[str, float]:
    """Tokens each pool processes per document: generated, embedded (document + every sample's blocks), and
    trained (the packed row of S tokens)."""
    s, blocks = config.sampling, config.num_blocks
    generated = s.num_samples * blocks * s.block_length
    packed = config.data.chunk_length + generated
    return {"rollout": generated, "features": packed, "learner": packed}


def balanced_split(seconds_per_doc: dict[str, float], devices: int) -> tuple[dict[str, int], float]:
    """The whole-device split across the pools that minimises the slowest pool's time per document."""
    best, best_time = None, float("inf")
    for split in itertools.product(range(1, devices - 1), repeat=2):
        counts = dict(zip(POOLS, (*split, devices - sum(split))))
        if counts["learner"] < 1:
            continue
        slowest = max(seconds_per_doc[pool] / counts[pool] for pool in POOLS)
        if slowest < best_time:
            best, best_time = counts, slowest
    return best, best_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out (engine and kernel warm-up)")
    parser.add_argument("--size-for", default=str(ROOT / "configs" / "qa_code.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()

    overrides = [
        f"training.steps={args.steps}",
        *("eval.every=0", "checkpoint.every=0", "logging.wandb_mode=disabled"),
        *args.overrides,
    ]
    config = load_config(args.config, overrides)
    docs = config.training.docs_per_step
    with tempfile.TemporaryDirectory(prefix="cost_vs_sft-") as folder:
        measured = {
            method: summarize(run_method(config, method, Path(folder)), args.warmup, docs) for method in ("ebft", "sft")
        }
    ebft, sft = measured["ebft"], measured["sft"]
    floor = floor_ratio(config)
    step_ratio = ebft["step_time_s"] / sft["step_time_s"]
    machine_ratio = ebft["machine_per_doc"] / sft["machine_per_doc"]
    learner_ratio = ebft["learner_per_doc"] / sft["learner_per_doc"]

    print(
        f"{config.model.policy} ({config.model.dtype}), T={config.data.chunk_length}, {docs} docs/step, "
        f"{ebft['steps']} steps each after {args.warmup} warm-up"
    )
    print(f"{'':24}{'EBFT':>10}{'SFT':>10}{'ratio':>8}   floor S/T = {floor:.2f}")
    print(f"{'step time (s)':24}{ebft['step_time_s']:10.2f}{sft['step_time_s']:10.2f}{step_ratio:8.2f}")
    print(
        f"{'machine s / document':24}{ebft['machine_per_doc']:10.2f}{sft['machine_per_doc']:10.2f}{machine_ratio:8.2f}"
    )
    print("where EBFT's machine time per document goes:")
    for pool in POOLS:
        share = ebft[f"{pool}_per_doc"] / ebft["machine_per_doc"]
        print(f"  {pool:10} {ebft[f'{pool}_per_doc']:8.2f} device-s  {share:6.1%}")
    print(f"  learner alone: {learner_ratio:.2f}x SFT's learner time ({learner_ratio / floor:.2f}x the floor)")

    tokens = pool_tokens_per_doc(config)
    throughput = {pool: tokens[pool] / ebft[f"{pool}_per_doc"] for pool in POOLS}
    print("measured throughput, tokens per device-second: " + ", ".join(f"{p} {throughput[p]:,.0f}" for p in POOLS))
    target = load_config(args.size_for)
    target_tokens = pool_tokens_per_doc(target)
    seconds = {pool: target_tokens[pool] / throughput[pool] for pool in POOLS}
    print(
        f"on paper, {Path(args.size_for).name} (T={target.data.chunk_length}, floor {floor_ratio(target):.2f}) "
        "at these throughputs: device-s per document " + ", ".join(f"{p} {seconds[p]:.1f}" for p in POOLS)
    )
    splits = {}
    for devices in (8, 16):
        counts, per_doc = balanced_split(seconds, devices)
        splits[devices] = counts
        print(
            f"  {devices:2} devices: rollout {counts['rollout']}, features {counts['features']}, "
            f"learner {counts['learner']} -> {per_doc:.2f} s per document, "
            f"{target.training.docs_per_step * per_doc:.1f} s per {target.training.docs_per_step}-document step"
        )
    emit(
        {
            "benchmark": "cost_vs_sft",
            "step_ratio": round(step_ratio, 3),
            "machine_ratio": round(machine_ratio, 3),
            "learner_ratio": round(learner_ratio, 3),
            "floor": round(floor, 4),
            "ratio_to_floor": round(step_ratio / floor, 3),
            "machine_ratio_to_floor": round(machine_ratio / floor, 3),
            "ebft_step_s": round(ebft["step_time_s"], 3),
            "sft_step_s": round(sft["step_time_s"], 3),
            "pool_splits": splits,
        }
    )


if __name__ == "__main__":
    main()
