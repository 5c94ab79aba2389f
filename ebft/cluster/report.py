"""What runs print and draw: the end-of-run summary of `ebft train` (and `make demo`), and the table and plot of
`ebft compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ebft.evaluation.heldout import paired_differences

SHOWN = (
    ("eval/full_ce_loss", "held-out CE"),
    ("eval/cfm", "held-out CFM (unbiased)"),
    ("eval/cfm_plugin", "held-out CFM, plug-in (+tr Cov/n)"),
    ("eval/reward_pass1_gt", "alignment reward pass@1"),
    ("eval/humaneval/pass@1", "HumanEval pass@1"),
)
LABELS = {**dict(SHOWN), "eval/cfm_plugin": "held-out CFM, plug-in"}
PLOTTED = ("eval/full_ce_loss", "eval/cfm")
PASS1, CE = "eval/humaneval/pass@1", "eval/full_ce_loss"


def print_summary(summary, console: Console | None = None) -> None:
    console = console or Console()
    first, last = summary.first_eval, summary.last_eval
    differences = {}
    if len(summary.evaluations) >= 2:
        before, after = summary.evaluations[0], summary.evaluations[-1]
        differences = paired_differences(after, before)
        title = f"{summary.method.upper()} run: {summary.steps} steps; held-out step {before.step} -> {after.step}"
    else:
        title = f"{summary.method.upper()} run: {summary.steps} steps"
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change [95% interval]", justify="right")
    table.add_column("significant", justify="center")
    for key, label in SHOWN:
        if key in first or key in last:
            before_value, after_value = first.get(key), last.get(key)
            change = differences.get(key)
            table.add_row(
                label,
                "-" if before_value is None else f"{before_value:.4f}",
                "-" if after_value is None else f"{after_value:.4f}",
                "-" if change is None else str(change),
                "-" if change is None else ("yes" if change.significant else "no"),
            )
    console.print(table)
    if differences:
        n = len(summary.evaluations[-1].chunk_ids)
        files = len(set(summary.evaluations[-1].groups))
        console.print(
            f"intervals: paired bootstrap over {files} held-out source files ({n} chunks, the same sampling seeds "
            "at every evaluation); 'no' means the change cannot be told from noise at this size"
        )
    unit = "questions" if summary.method == "rlvr" else "chunks"
    console.print(
        f"trained {unit}: {summary.trained_chunks} of {summary.scheduled_chunks} scheduled; "
        f"generated tokens: {summary.generated_tokens:,}; actor restarts: {summary.restarts}; "
        f"machine time: {summary.machine_s:,.0f} device-s"
    )
    if summary.stopped_early:
        console.print(f"stopped early at step {summary.steps}: continue with `ebft train <config> --resume`")
    console.print(f"run directory: {summary.run_dir}  (metrics.jsonl, config.yaml, evals/)")
    if summary.plot:
        console.print(f"curves: {summary.plot}")
    if summary.checkpoint:
        console.print(f"final checkpoint (HF format): {summary.checkpoint}")
    if summary.wandb_dir:
        console.print(f"W&B offline run: {summary.wandb_dir}  (upload later with `wandb sync {summary.wandb_dir}`)")


def arm_label(arm: dict[str, Any]) -> str:
    """An arm named after its method reads as the method (EBFT, SFT); any other keeps its name."""
    return arm["method"].upper() if arm["name"] == arm["method"] else arm["name"]


def print_table(result: dict[str, Any], console: Console) -> None:
    """The compare's table: the base and every arm, every arm against the base and every two arms."""
    held, budget, seeds = result["held_out"], result["budget"], result["seeds"]
    labels = {arm["name"]: arm_label(arm) for arm in result["arms"]}
    if budget["held_equal"] == "compute":
        lengths = ", ".join(f"{labels[name]} {budget[name]['steps']} steps" for name in labels)
        used = " and ".join(_seconds(budget[name]["machine_s"]) for name in labels)
        after = f"at equal machine time ({lengths}; {used} device-s)"
    else:
        after = f"after {result['steps']} steps"
    over = f"{len(seeds)} training seeds and " if len(seeds) > 1 else ""
    problems = f", {held['humaneval_problems']} HumanEval problems" if held.get("humaneval_problems") else ""
    table = Table(
        title=f"{' vs '.join(labels.values())} {after}: {over}{held['chunks']} held-out chunks from {held['files']} "
        f"files, {held['samples_per_block']} samples per block{problems}"
        + (" (each arm: its mean over the seeds)" if len(seeds) > 1 else "")
        + "; change [95% paired interval], * = interval excludes 0",
        title_justify="left",
    )
    differences = result["differences"]
    columns = {"base": "base", **labels}
    pair_labels = {}
    for label in differences:
        after_name, before_name = label.split(" - ")
        pair_labels[label] = f"{columns[after_name]} - {columns[before_name]}"
    for column in ("metric", *columns.values(), *pair_labels.values()):
        table.add_column(column, justify="left" if column == "metric" else "right")
    metrics = result["metrics"]
    for name in next(iter(differences.values())):  # the held-out metrics, then HumanEval pass@k where it ran
        cells = [f"{metrics[arm][name]:.4f}" for arm in columns]
        for label in pair_labels:
            d = differences[label][name]
            cells.append(f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{'*' if d['significant'] else ' '}")
        table.add_row(LABELS.get(name, name.replace("eval/humaneval/", "HumanEval ")), *cells)
    console.print(table)


def _seconds(value: float | list[float]) -> str:
    return "/".join(f"{v:,.0f}" for v in value) if isinstance(value, list) else f"{value:,.0f}"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Each arm's held-out curves (its first seed) with the band of its paired change since the base; where HumanEval
    ran, the paper's Figure 1 beside them: each arm's path in the (HumanEval pass@1, held-out CE) plane over its
    evaluations, with the paired 95% intervals against the base (over the seeds, where several) at its end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["metrics"]["base"]
    plane = PASS1 in base
    panels = len(PLOTTED) + plane
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if plane:
        _plot_plane(axes.flat[-1], result, colors)
    for ax, name in zip(axes.flat, PLOTTED):
        for arm, color in zip(result["arms"], colors):
            points = result["curves"][arm["name"]]
            steps = [p["step"] for p in points]
            ax.plot(steps, [p[name] for p in points], marker="o", color=color, label=arm_label(arm))
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


def _plot_plane(ax, result: dict[str, Any], colors) -> None:
    base, metrics = result["metrics"]["base"], result["metrics"]
    ax.plot([base[PASS1]], [base[CE]], marker="s", color="gray", linestyle="none", label="base")
    for arm, color in zip(result["arms"], colors):
        name = arm["name"]
        points = [p for p in result["curves"][name] if PASS1 in p]
        ax.plot([p[PASS1] for p in points], [p[CE] for p in points], marker="o", color=color, label=arm_label(arm))
        d = result["differences"][f"{name} - base"]
        x, y = metrics[name][PASS1], metrics[name][CE]
        xerr = [[x - base[PASS1] - d[PASS1]["low"]], [base[PASS1] + d[PASS1]["high"] - x]]
        yerr = [[y - base[CE] - d[CE]["low"]], [base[CE] + d[CE]["high"] - y]]
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, color=color, capsize=3)
    ax.set_xlabel("HumanEval pass@1")
    ax.set_ylabel("held-out CE")
    ax.set_title("accuracy vs held-out CE (95% paired intervals vs base at the end)")
    ax.grid(alpha=0.3)
    ax.legend()
