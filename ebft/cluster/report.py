"""The end-of-run summary printed by `ebft train` (and `make demo`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

SHOWN = (
    ("eval/full_ce_loss", "held-out CE"),
    ("eval/full_perplexity", "held-out perplexity"),
    ("eval/feature_matching_loss", "held-out feature-matching loss"),
    ("eval/reward_pass1_gt", "alignment reward pass@1"),
    ("eval/humaneval/pass@1", "HumanEval pass@1"),
)


def print_summary(summary, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"EBFT run: {summary.steps} steps", show_header=True)
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key, label in SHOWN:
        if key in summary.first_eval or key in summary.last_eval:
            before, after = summary.first_eval.get(key), summary.last_eval.get(key)
            table.add_row(label, "-" if before is None else f"{before:.4f}", "-" if after is None else f"{after:.4f}")
    console.print(table)
    console.print(
        f"trained chunks: {summary.trained_chunks} of {summary.scheduled_chunks} scheduled; "
        f"generated tokens: {summary.generated_tokens:,}; actor restarts: {summary.restarts}"
    )
    if summary.stopped_early:
        console.print(f"stopped early at step {summary.steps}: continue with `ebft train <config> --resume`")
    console.print(f"run directory: {summary.run_dir}  (metrics.jsonl, config.yaml)")
    if summary.plot:
        console.print(f"curves: {summary.plot}")
    if summary.checkpoint:
        console.print(f"final checkpoint (HF format): {summary.checkpoint}")
    if summary.wandb_dir:
        console.print(f"W&B offline run: {summary.wandb_dir}  (upload later with `wandb sync {summary.wandb_dir}`)")
