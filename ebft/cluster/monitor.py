"""What a person watching a run sees: W&B, a console progress bar, metrics.jsonl (with each step's throughput), sample
tables and a PNG of the curves."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ebft.config import Config
from ebft.evaluation.stats import Difference
from ebft.layout import BlockPlan

if TYPE_CHECKING:
    from ebft.cluster.controller import StepResult

log = logging.getLogger(__name__)

RUNNING_MEAN_STEPS = 5
CONSOLE_METRICS = ("train/reward", "train/cfm", "train/ce_loss", "eval/full_ce_loss", "eval/cfm")
PLOTTED = (
    "train/gt_reward",
    "train/diversity_reward",
    "train/cfm",
    "train/policy_loss",
    "train/ce_loss",
    "eval/full_ce_loss",
    "eval/cfm",
    "eval/cfm_plugin",
    "eval/humaneval/pass@1",
)


class Monitor:
    def __init__(self, config: Config, run_dir: Path, *, start_step: int = 0, resumed: bool = False):
        self.config = config
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        if resumed and self.metrics_path.exists():
            self.history = list(map(json.loads, self.metrics_path.read_text().splitlines()))
            self.rewind(start_step)
        self.wandb = self._start_wandb(resumed)
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn(f"[bold]{config.training.method.upper()}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task("", total=config.training.steps, completed=start_step)
        self.progress.start()

    def _start_wandb(self, resumed: bool):
        logging_config = self.config.logging
        if logging_config.wandb_mode == "disabled":
            return None
        import wandb

        id_file = self.run_dir / "wandb_run_id"  # W&B continues a run only when told its id
        run = wandb.init(
            project=logging_config.project,
            entity=logging_config.entity,
            name=logging_config.run_name,
            group=logging_config.group,
            mode=logging_config.wandb_mode,
            dir=str(self.run_dir),
            config=self.config.model_dump(mode="json"),
            id=id_file.read_text().strip() if resumed and id_file.is_file() else None,
            resume="allow" if resumed else None,
            settings=wandb.Settings(silent=True),  # its banner is five lines; the one that matters is below
        )
        id_file.write_text(run.id)
        log.info("W&B (%s): %s", logging_config.wandb_mode, run.url or Path(run.dir).parent)
        run.define_metric("step")
        for prefix in ("train", "eval", "timing", "perf"):
            run.define_metric(f"{prefix}/*", step_metric="step")
        return run

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(record)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record)
        shown = "  ".join(f"{name.split('/', 1)[1]}={record[name]:.4g}" for name in CONSOLE_METRICS if name in record)
        done = step if is_evaluation(record) else step + 1  # an evaluation's step counts the steps before it
        self.progress.update(self.task, completed=min(done, self.config.training.steps), description=shown)

    def rewind(self, step: int) -> None:
        """Forget the training steps from `step` on (they are trained again); an evaluation at `step` is of the
        weights the run goes back to, so it stays."""
        self.history = [r for r in self.history if r["step"] < step or r["step"] == step and is_evaluation(r)]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def status(self, text: str) -> None:
        """Say on the progress line what the run is doing between steps (e.g. evaluating)."""
        self.progress.update(self.task, description=text)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if self.wandb is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        self.wandb.log(
            {"step": step, "samples": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])}
        )

    def plot(self, intervals: dict[int, dict[str, Difference]] | None = None) -> Path | None:
        """curves.png: each training metric's raw points with their running mean; each held-out metric at its
        evaluations, with `intervals` ({step: {metric: the paired change since the first evaluation}}) as bars."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        series = {
            name: [(r["step"], r[name]) for r in self.history if name in r and math.isfinite(r[name])]
            for name in PLOTTED
        }
        series = {name: points for name, points in series.items() if points}
        if not series:
            return None
        fig, axes = plt.subplots(
            math.ceil(len(series) / 3),
            min(3, len(series)),
            figsize=(12, 3.2 * math.ceil(len(series) / 3)),
            squeeze=False,
        )
        for ax, (name, points) in zip(axes.flat, series.items()):
            steps, values = zip(*points)
            if name.startswith("eval/"):
                plot_evaluations(ax, name, steps, values, intervals or {})
            else:
                window = min(RUNNING_MEAN_STEPS, len(values))
                ax.plot(steps, values, marker=".", linestyle="none", alpha=0.4, color="tab:blue", label="step")
                running = [sum(values[max(0, i + 1 - window) : i + 1]) / min(window, i + 1) for i in range(len(values))]
                ax.plot(steps, running, color="tab:blue", label=f"running mean of {window}")
                ax.set_title(name)
                ax.legend(fontsize=7)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(series) :]:
            ax.axis("off")
        fig.tight_layout()
        path = self.run_dir / "curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self) -> None:
        self.progress.stop()
        if self.wandb is not None:
            self.wandb.finish()

    @property
    def wandb_dir(self) -> str | None:
        return None if self.wandb is None else str(Path(self.wandb.dir).parent)


def plot_evaluations(ax, name: str, steps, values, intervals: dict[int, dict[str, Difference]]) -> None:
    """The metric at each evaluation; a bar from first + low to first + high of its paired change since the first."""
    first = values[0]
    ax.plot(steps, values, marker="o", color="tab:orange")
    ax.axhline(first, color="gray", linestyle="--", linewidth=1)
    changes = {step: intervals[step][name] for step in steps if name in intervals.get(step, {})}
    for step, change in changes.items():
        ax.vlines(step, first + change.low, first + change.high, color="tab:orange", linewidth=2)
    ax.ticklabel_format(axis="y", useOffset=False)
    bars = f"\n(bars: 95% paired interval of the change since step {steps[0]})" if changes else ""
    ax.set_title(name + bars, fontsize=9 if bars else None)


def is_evaluation(record: dict[str, Any]) -> bool:
    """A held-out evaluation's row: logged at the number of steps trained before it (a training row at its index)."""
    return any(name.startswith("eval/") for name in record)


def throughput(config: Config, result: StepResult) -> dict[str, float]:
    """Tokens and features per second of a training step, and its wall time."""
    m = result.metrics
    step_time = m["timing/waiting"] + m["timing/train"] + m["timing/weight_sync"]
    if not result.rollouts:  # sft: no rollouts
        docs = config.training.docs_per_step
        return {
            "perf/trained_tokens_per_s": docs * config.data.chunk_length / max(m["timing/train"], 1e-9),
            "perf/step_time_s": step_time,
        }
    if config.training.method == "rlvr":
        generated = sum(len(completion) for r in result.rollouts for group in r.tokens for completion in group)
        return {
            "perf/generated_tokens_per_s": generated / max(m["timing/generate"], 1e-9),
            "perf/step_time_s": step_time,
        }
    docs = sum(len(r.chunks.chunk_ids) for r in result.rollouts)
    s = config.sampling
    generated = docs * s.num_samples * config.num_blocks * s.block_length
    return {
        "perf/generated_tokens_per_s": generated / max(m["timing/generate"], 1e-9),
        "perf/features_per_s": docs * s.num_samples * config.num_blocks / max(m["timing/features"], 1e-9),
        "perf/trained_tokens_per_s": (generated + docs * config.data.chunk_length) / max(m["timing/train"], 1e-9),
        "perf/step_time_s": step_time,
    }


def sample_rows(config: Config, tokenizer, result: StepResult, blocks: int = 4) -> list[dict[str, Any]]:
    """(prefix tail, rollout, ground truth, reward) of a few blocks of the step's first document."""
    from ebft.rewards import compute_rewards

    plan = BlockPlan.from_config(config)
    rollout, features = result.rollouts[0], result.features[0]
    rewards = compute_rewards(
        features.rollout_features[0],
        features.gt_features[0],
        config.reward,  # [NB, n, D], [NB, D]
    ).rewards
    doc = rollout.chunks.tokens[0]
    rows = []
    for k in np.linspace(0, plan.num_blocks - 1, num=min(blocks, plan.num_blocks)).round().astype(int).tolist():
        prefix_end = int(plan.prefix_lengths[k])
        rows.append(
            {
                "step": result.step,
                "block": k,
                "prefix": tokenizer.decode(doc[max(0, prefix_end - 64) : prefix_end]),
                "rollout": tokenizer.decode(rollout.tokens[0, 0, k]),
                "ground_truth": tokenizer.decode(doc[prefix_end : prefix_end + plan.block_length]),
                "reward": float(rewards[k, 0]),
            }
        )
    return rows
