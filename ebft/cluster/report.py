"""The end-of-run summary printed by `ebft train` (and `make demo`)."""

from __future__ import annotations

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
    console.print(
        f"trained chunks: {summary.trained_chunks} of {summary.scheduled_chunks} scheduled; "
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
