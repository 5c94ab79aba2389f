"""`ebft compare`: EBFT and SFT trained from the same base on the same chunks, and evaluated on the same
held-out chunks with the same sampling seeds, so every difference is paired.

    evaluate the base                       (the EBFT arm's step-0 evaluation; the SFT arm reuses it)
    train EBFT, evaluating every eval.every steps
    train SFT on the same chunks in the same order, for the same steps (compare.budget: steps, evaluated at
        the same steps) or until it used EBFT's measured machine time (compare.budget: compute, evaluated
        at its end)
    paired bootstrap intervals: EBFT - base, SFT - base, EBFT - SFT
    -> a console table, compare.json and compare.png in training.output_dir (compare-compute.* for compute)

Each arm is an ordinary run in its own folder (<output_dir>/ebft, <output_dir>/sft or sft-compute): an
interrupted compare started again reuses a finished arm and resumes an unfinished one from its last
checkpoint, and a compute-budget compare reuses the EBFT arm of an earlier steps-budget one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ebft.cluster.cost import machine_seconds
from ebft.config import Config, ConfigError, dump_config
from ebft.evaluation.heldout import PAIRED_METRICS, Evaluation, paired_differences
from ebft.evaluation.stats import Difference
from ebft.model_sources import resolve_run_models

# The SFT arm of a compute budget trains at most this many times EBFT's steps (its budget usually ends it first:
# an SFT step costs S/T times less on the learner alone).
COMPUTE_BUDGET_MAX_STEPS = 50
LABELS = {
    "eval/full_ce_loss": "held-out CE",
    "eval/cfm": "held-out CFM (unbiased)",
    "eval/cfm_plugin": "held-out CFM, plug-in",
    "eval/reward_pass1_gt": "alignment reward pass@1",
}
PLOTTED = ("eval/full_ce_loss", "eval/cfm")


def arm_config(config: Config, method: str, machine_budget_s: float | None = None) -> Config:
    """The run of one arm: same everything, its own method and folder; only EBFT evaluates the base. With a
    machine budget, SFT trains until it used that much machine time, with EBFT's warmup steps, and evaluates
    at its end only."""
    from ebft.learner.deepspeed_setup import warmup_steps

    raw = config.model_dump(mode="json")
    folder = method if machine_budget_s is None else f"{method}-compute"
    raw["training"].update(method=method, output_dir=str(Path(config.training.output_dir) / folder))
    raw["eval"].update(at_start=method == "ebft", every=config.eval.every or config.training.steps)
    if method == "sft":
        raw["loss"]["kl_coef"] = 0.0
    if machine_budget_s is not None:
        steps, warmup = COMPUTE_BUDGET_MAX_STEPS * config.training.steps, warmup_steps(config)
        raw["training"].update(steps=steps, machine_budget_s=machine_budget_s)
        raw["optim"]["warmup_fraction"] = (warmup - 0.5) / steps if warmup else 0.0  # ceil() gives back `warmup`
        raw["eval"]["every"] = steps
    return Config.model_validate(raw)


def run_arm(config: Config, console: Console, index: int, address: str | None) -> list[Evaluation]:
    from ebft.cluster.report import print_summary
    from ebft.cluster.train import check_same_run, load_evaluations, run
    from ebft.learner.checkpoint import latest_checkpoint

    run_dir, method = Path(config.training.output_dir), config.training.method.upper()
    steps, budget = config.training.steps, config.training.machine_budget_s
    length = f"{steps} steps" if budget is None else f"until {budget:,.0f} device-s (at most {steps} steps)"
    console.rule(f"compare {index}/2: {method}, {length}  ({run_dir})")
    earlier = load_evaluations(run_dir, steps)
    if finished(earlier, config):
        check_same_run(run_dir, config)
        console.print(f"{method}: finished earlier in {run_dir}; reusing its evaluations")
        return earlier
    resume = run_dir.exists() and latest_checkpoint(run_dir / "checkpoints") is not None
    print_summary(run(config, resume=resume, address=address), console=console)
    return load_evaluations(run_dir, steps)


def finished(evaluations: list[Evaluation], config: Config) -> bool:
    """A run with a machine budget evaluates once, at its end; any other at training.steps."""
    last = evaluations[-1].step if evaluations else 0
    return last == config.training.steps or (config.training.machine_budget_s is not None and last > 0)


def arm_machine_seconds(run_dir: Path, steps: int) -> float:
    """What an arm's training steps before `steps` cost (its metrics.jsonl; a step trained twice counts once)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_of_step = {r["step"]: r for r in records if "cost/machine_s" in r and r["step"] < steps}
    return machine_seconds(list(last_of_step.values()))


def compare(config: Config, *, address: str | None = None, console: Console | None = None) -> dict[str, Any]:
    """Train both arms, compare them and the base; returns what compare.json holds."""
    console = console or Console()
    if config.data.heldout_fraction <= 0:
        raise ConfigError("ebft compare evaluates on held-out chunks: set data.heldout_fraction > 0 (e.g. 0.05)")
    resolve_run_models(config)  # a missing or unreachable model fails before the compare folder is made
    root = Path(config.training.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(dump_config(config))

    evaluations, elapsed, machine_s, configs = {}, {}, {}, {"ebft": arm_config(config, "ebft")}
    for index, method in enumerate(("ebft", "sft"), start=1):
        if method == "sft":
            budget = machine_s["ebft"] if config.compare.budget == "compute" else None
            if budget == 0:
                raise ConfigError(
                    f"the EBFT arm in {root / 'ebft'} recorded no machine time (trained by an older ebft): "
                    "compare at compare.budget=steps, or train it again in a new training.output_dir"
                )
            configs[method] = arm_config(config, method, machine_budget_s=budget)
        started = time.perf_counter()
        evaluations[method] = run_arm(configs[method], console, index, address)
        elapsed[method] = time.perf_counter() - started
        run_dir = Path(configs[method].training.output_dir)
        machine_s[method] = arm_machine_seconds(run_dir, evaluations[method][-1].step)
    base = evaluations["ebft"][0]
    if base.step != 0:
        raise RuntimeError(f"the EBFT arm in {root / 'ebft'} has no step-0 evaluation of the base model")
    result = summarize(config, base, evaluations, elapsed, machine_s)
    stem = "compare" if config.compare.budget == "steps" else "compare-compute"  # both can share a folder
    (root / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    result["plot"] = str(plot(result, root / f"{stem}.png"))
    print_table(result, console)
    console.print(f"written: {root / f'{stem}.json'}, {result['plot']}", soft_wrap=True)
    return result


def _interval(difference: Difference) -> dict[str, float]:
    return {**asdict(difference), "significant": difference.significant}


def summarize(
    config: Config, base: Evaluation, evaluations: dict[str, list[Evaluation]], elapsed, machine_s
) -> dict[str, Any]:
    final = {method: runs[-1] for method, runs in evaluations.items()}
    pairs = {
        "ebft - base": (final["ebft"], base),
        "sft - base": (final["sft"], base),
        "ebft - sft": (final["ebft"], final["sft"]),
    }
    curves = {
        method: [
            {
                "step": e.step,
                **{name: e.metrics[name] for name in PAIRED_METRICS},
                "vs_base": {name: _interval(d) for name, d in paired_differences(e, base).items()},
            }
            for e in ([base] if method == "sft" else []) + runs
        ]
        for method, runs in evaluations.items()
    }
    return {
        "steps": config.training.steps,
        "budget": {
            "held_equal": config.compare.budget,
            **{method: {"steps": final[method].step, "machine_s": round(machine_s[method], 1)} for method in final},
        },
        "held_out": {
            "chunks": len(base.chunk_ids),
            "files": len(set(base.groups)),
            "samples_per_block": config.eval.num_samples,
        },
        "metrics": {"base": base.metrics, **{method: e.metrics for method, e in final.items()}},
        "differences": {
            label: {name: _interval(d) for name, d in paired_differences(after, before).items()}
            for label, (after, before) in pairs.items()
        },
        "curves": curves,
        "elapsed_s": {method: round(seconds, 1) for method, seconds in elapsed.items()},
        "config": config.model_dump(mode="json"),
    }


def print_table(result: dict[str, Any], console: Console) -> None:
    held, budget = result["held_out"], result["budget"]
    arms = f"EBFT {budget['ebft']['steps']} steps, SFT {budget['sft']['steps']} steps"
    if budget["held_equal"] == "compute":
        used = f"{budget['ebft']['machine_s']:,.0f} and {budget['sft']['machine_s']:,.0f} device-s"
        after = f"at equal machine time ({arms}; {used})"
    else:
        after = f"after {result['steps']} steps"
    table = Table(
        title=f"EBFT vs SFT {after}: {held['chunks']} held-out chunks from "
        f"{held['files']} files, "
        f"{held['samples_per_block']} samples per block; change [95% paired interval], * = interval excludes 0",
        title_justify="left",
    )
    for column in ("metric", "base", "EBFT", "SFT", "EBFT - base", "SFT - base", "EBFT - SFT"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    metrics, differences = result["metrics"], result["differences"]
    for name in PAIRED_METRICS:
        cells = [f"{metrics[arm][name]:.4f}" for arm in ("base", "ebft", "sft")]
        for label in ("ebft - base", "sft - base", "ebft - sft"):
            d = differences[label][name]
            cells.append(f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{'*' if d['significant'] else ' '}")
        table.add_row(LABELS[name], *cells)
    console.print(table)


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(6 * len(PLOTTED), 4), squeeze=False)
    base = result["metrics"]["base"]
    for ax, name in zip(axes.flat, PLOTTED):
        for method, color in (("ebft", "tab:blue"), ("sft", "tab:orange")):
            points = result["curves"][method]
            steps = [p["step"] for p in points]
            ax.plot(steps, [p[name] for p in points], marker="o", color=color, label=method.upper())
            # The band: base + the 95% interval of the paired change since the base.
            low = [base[name] + p["vs_base"][name]["low"] for p in points]
            high = [base[name] + p["vs_base"][name]["high"] for p in points]
            ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        ax.axhline(base[name], color="gray", linestyle="--", linewidth=1, label="base")
        ax.set_title(f"{LABELS[name]} (95% paired interval vs base)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
