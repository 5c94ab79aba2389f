"""`ebft compare`: arms (a training method plus its own recipe each) trained from the same base on the same chunks,
and evaluated on the same held-out chunks with the same sampling seeds, so every difference is paired.

    evaluate the base                       (the reference arm's step-0 evaluation; the other arms reuse it)
    train each arm (compare.arms; by default EBFT, then SFT) with its own overrides, once per compare.seeds seed,
        evaluating every eval.every steps; at compare.budget: steps every arm trains training.steps (evaluated
        at the same steps), at compute the others train until they used the reference's measured machine time
        for the same seed (evaluated at their end); an arm with training.ema has its last evaluation of its average
    paired intervals (over the held-out files, and the seeds where there are several): every arm - base and
        every two arms
    -> a console table, compare.json and compare.png in training.output_dir (compare-compute.* for compute)

Each run is an ordinary run in its own folder (<output_dir>/<arm>, with -compute for a compute-budget arm and
-seed<s> for a seed other than training.seed): an interrupted compare started again reuses a finished run and
resumes an unfinished one from its last checkpoint, and a compute-budget compare reuses the reference runs of an
earlier steps-budget one.
In W&B the runs are one group (logging.group, else the output folder's name), each named after its folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from ebft.cluster.cost import machine_seconds
from ebft.config import Config, ConfigError, build_config, dump_config
from ebft.evaluation.heldout import PAIRED_METRICS, Evaluation, check_same_chunks, paired_differences
from ebft.evaluation.stats import Difference, seeded_paired_difference
from ebft.model_sources import resolve_run_models

if TYPE_CHECKING:
    from ebft.config_sections import CompareArm

HUMANEVAL_PASS1 = "eval/humaneval/pass@1"
# An arm under a compute budget trains at most this many times the reference's steps (its budget usually ends it
# first: an SFT step costs S/T times less on the learner alone).
COMPUTE_BUDGET_MAX_STEPS = 50


def seeds_of(config: Config) -> list[int]:
    return config.compare.seeds or [config.training.seed]


def arm_config(config: Config, arm: CompareArm, seed: int, machine_budget_s: float | None = None) -> Config:
    """The run of one arm at one training seed: the compare's config with the arm's overrides, method, seed and
    folder; only the reference arm's first seed evaluates the base. With a machine budget the arm trains until it
    used that much machine time, with the reference's warmup steps, and evaluates at its end only."""
    from ebft.learner.deepspeed_setup import warmup_steps

    raw = config.model_dump(mode="json")
    for key, value in arm.overrides.items():
        *sections, name = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    compare = config.compare
    folder = arm.name + ("" if machine_budget_s is None else "-compute")
    folder += "" if seed == config.training.seed else f"-seed{seed}"
    base_run = arm.name == compare.reference_arm.name and seed == seeds_of(config)[0]
    raw["training"].update(method=arm.method, seed=seed, output_dir=str(Path(config.training.output_dir) / folder))
    raw["eval"].update(at_start=base_run, every=config.eval.every or config.training.steps)
    raw["logging"].update(group=config.logging.group or Path(config.training.output_dir).name, run_name=folder)
    if arm.method == "sft":
        raw["loss"]["kl_coef"] = 0.0
    if machine_budget_s is not None:
        if raw["optim"]["schedule"] == "cosine":
            raise ConfigError(
                f"compare.arms {arm.name}: a cosine schedule spans training.steps, but at compare.budget=compute the "
                "arm's length is its machine time: give it optim.schedule=constant, or compare at compare.budget=steps"
            )
        # The arm's own warmup steps, kept over its longer horizon.
        steps, warmup = COMPUTE_BUDGET_MAX_STEPS * config.training.steps, warmup_steps(_arm_run(raw, arm))
        raw["training"].update(steps=steps, machine_budget_s=machine_budget_s)
        raw["optim"]["warmup_fraction"] = (warmup - 0.5) / steps if warmup else 0.0  # ceil() gives back `warmup`
        raw["eval"]["every"] = steps
    return _arm_run(raw, arm)


def _arm_run(raw: dict[str, Any], arm: CompareArm) -> Config:
    try:
        return build_config(raw)
    except ConfigError as error:
        raise ConfigError(f"compare.arms {arm.name} (its overrides {arm.overrides}): {error}") from None


def run_arm(config: Config, console: Console, title: str, address: str | None) -> list[Evaluation]:
    from ebft.cluster.report import print_summary
    from ebft.cluster.train import check_same_run, load_evaluations, run
    from ebft.learner.checkpoint import latest_checkpoint

    run_dir = Path(config.training.output_dir)
    steps, budget = config.training.steps, config.training.machine_budget_s
    length = f"{steps} steps" if budget is None else f"until {budget:,.0f} device-s (at most {steps} steps)"
    console.rule(f"{title}, {length}  ({run_dir})")
    earlier = load_evaluations(run_dir, steps)
    if finished(earlier, config):
        check_same_run(run_dir, config)
        console.print(f"{run_dir.name}: finished earlier in {run_dir}; reusing its evaluations")
        return earlier
    resume = run_dir.exists() and latest_checkpoint(run_dir / "checkpoints") is not None
    print_summary(run(config, resume=resume, address=address), console=console)
    return load_evaluations(run_dir, steps)


def averaged_evaluation(config: Config, last: Evaluation, console: Console) -> Evaluation:
    """An arm with training.ema is compared by its average, the model it saves (docs/method.md section 5): its last
    evaluation is replaced by `ebft eval` of the last checkpoint's ema/ folder, on the same held-out chunks with
    the same sampling seeds (kept beside the run's evaluations, so a finished arm is not evaluated again)."""
    from ebft.evaluation import checkpoint_eval
    from ebft.learner.checkpoint import EMA_DIR, checkpoint_path

    run_dir = Path(config.training.output_dir)
    output = run_dir / "evals" / f"ema_step_{last.step:08d}{checkpoint_eval.METRICS_SUFFIX}"
    if not output.is_file():
        averaged = checkpoint_path(run_dir / "checkpoints", last.step) / EMA_DIR
        console.print(f"{run_dir.name}: evaluating its moving average {averaged}")
        checkpoint_eval.run(str(averaged), config, output=str(output), progress=False)
    evaluation, _ = checkpoint_eval.read_metrics(output)
    check_same_chunks(evaluation, last)
    return replace(evaluation, step=last.step)


def finished(evaluations: list[Evaluation], config: Config) -> bool:
    """A run with a machine budget evaluates once, at its end; any other at training.steps."""
    last = evaluations[-1].step if evaluations else 0
    return last == config.training.steps or (config.training.machine_budget_s is not None and last > 0)


def arm_machine_seconds(run_dir: Path, steps: int) -> float:
    """What a run's training steps before `steps` cost (its metrics.jsonl; a step trained twice counts once)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_of_step = {r["step"]: r for r in records if "cost/machine_s" in r and r["step"] < steps}
    return machine_seconds(list(last_of_step.values()))


def compare(config: Config, *, address: str | None = None, console: Console | None = None) -> dict[str, Any]:
    """Train every arm at every seed, compare them and the base; returns what compare.json holds."""
    from ebft.cluster.report import plot, print_table

    console = console or Console()
    if config.data.heldout_fraction <= 0:
        raise ConfigError("ebft compare evaluates on held-out chunks: set data.heldout_fraction > 0 (e.g. 0.05)")
    compute = config.compare.budget == "compute"
    reference, seeds = config.compare.reference_arm, seeds_of(config)
    arms = [reference] + [arm for arm in config.compare.arms if arm is not reference]  # the reference trains first
    for arm in arms:  # every arm's config is checked before anything trains
        arm_config(config, arm, seeds[0], machine_budget_s=1.0 if compute and arm is not reference else None)
    resolve_run_models(config)  # a missing or unreachable model fails before the compare folder is made
    root = Path(config.training.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(dump_config(config))

    evaluations: dict[tuple[str, int], list[Evaluation]] = {}
    elapsed, machine_s = {}, {}
    runs = [(arm, seed) for seed in seeds for arm in arms]
    for index, (arm, seed) in enumerate(runs, start=1):
        budget = None
        if compute and arm is not reference:
            budget = machine_s[reference.name, seed]
            if budget == 0:
                raise ConfigError(
                    f"the {reference.name} run at seed {seed} recorded no machine time (trained by an older ebft): "
                    "compare at compare.budget=steps, or train it again in a new training.output_dir"
                )
        run_config = arm_config(config, arm, seed, machine_budget_s=budget)
        started = time.perf_counter()
        title = f"compare {index}/{len(runs)}: {arm.name} ({arm.method.upper()}, seed {seed})"
        evaluations[arm.name, seed] = run_arm(run_config, console, title, address)
        if run_config.training.ema is not None:
            *earlier, last = evaluations[arm.name, seed]
            evaluations[arm.name, seed] = [*earlier, averaged_evaluation(run_config, last, console)]
        elapsed[arm.name, seed] = time.perf_counter() - started
        run_dir = Path(run_config.training.output_dir)
        machine_s[arm.name, seed] = arm_machine_seconds(run_dir, evaluations[arm.name, seed][-1].step)
    base = evaluations[reference.name, seeds[0]][0]
    if base.step != 0:
        raise RuntimeError(f"the {reference.name} run in {root} has no step-0 evaluation of the base model")
    result = summarize(config, base, evaluations, elapsed, machine_s)
    stem = "compare-compute" if compute else "compare"  # both can share a folder
    (root / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    result["plot"] = str(plot(result, root / f"{stem}.png"))
    print_table(result, console)
    console.print(f"written: {root / f'{stem}.json'}, {result['plot']}", soft_wrap=True)
    return result


def _interval(difference: Difference) -> dict[str, float]:
    return {**asdict(difference), "significant": difference.significant}


def seeded_differences(after: list[Evaluation], before: list[Evaluation]) -> dict[str, Difference]:
    """after[s] - before[s] over the seeds s and the held-out chunks for every per-chunk metric, and over the seeds
    and the HumanEval problems for every pass@k the evaluations share."""
    for a, b in zip(after, before):
        check_same_chunks(a, b)
    differences = {
        name: seeded_paired_difference(
            [a.per_chunk[name] for a in after], [b.per_chunk[name] for b in before], after[0].groups
        )
        for name in PAIRED_METRICS
        if all(name in e.per_chunk for e in after + before)
    }
    for name in after[0].per_problem:
        values = [e.per_problem.get(name) for e in after + before]
        if all(v is not None and len(v) == len(values[0]) for v in values):
            differences[name] = seeded_paired_difference(values[: len(after)], values[len(after) :])
    return differences


def summarize(config: Config, base: Evaluation, evaluations, elapsed, machine_s) -> dict[str, Any]:
    seeds, names = seeds_of(config), [arm.name for arm in config.compare.arms]
    final = {name: [evaluations[name, seed][-1] for seed in seeds] for name in names}
    pairs = {f"{name} - base": (final[name], [base] * len(seeds)) for name in names}
    pairs.update(
        {f"{a} - {b}": (final[a], final[b]) for i, a in enumerate(names) for b in names[i + 1 :]}  # every two arms
    )
    first = seeds[0]
    curves = {  # each arm's evaluations at the first seed, from the base
        name: [
            {
                "step": e.step,
                **{metric: e.metrics[metric] for metric in (*PAIRED_METRICS, HUMANEVAL_PASS1) if metric in e.metrics},
                "vs_base": {metric: _interval(d) for metric, d in paired_differences(e, base).items()},
            }
            for e in ([] if evaluations[name, first][0].step == 0 else [base]) + evaluations[name, first]
        ]
        for name in names
    }

    def per_seed(values: list[float], digits: int | None = None):
        values = [round(v, digits) if digits is not None else v for v in values]
        return values[0] if len(values) == 1 else values

    return {
        "steps": config.training.steps,
        "arms": [arm.model_dump(mode="json") for arm in config.compare.arms],
        "reference": config.compare.reference_arm.name,
        "seeds": seeds,
        "budget": {
            "held_equal": config.compare.budget,
            **{
                name: {
                    "steps": per_seed([e.step for e in final[name]]),
                    "machine_s": per_seed([machine_s[name, seed] for seed in seeds], 1),
                }
                for name in names
            },
        },
        "held_out": {
            "chunks": len(base.chunk_ids),
            "files": len(set(base.groups)),
            "samples_per_block": config.eval.num_samples,
            "humaneval_problems": len(base.per_problem.get(HUMANEVAL_PASS1, [])),
        },
        "metrics": {
            "base": base.metrics,
            **{
                name: {
                    key: sum(e.metrics[key] for e in runs) / len(runs)
                    for key in set.intersection(*(set(e.metrics) for e in runs))
                }
                for name, runs in final.items()
            },
        },
        "differences": {
            label: {metric: _interval(d) for metric, d in seeded_differences(after, before).items()}
            for label, (after, before) in pairs.items()
        },
        "curves": curves,
        "elapsed_s": {f"{name}/seed{seed}": round(seconds, 1) for (name, seed), seconds in elapsed.items()},
        "config": config.model_dump(mode="json"),
    }
