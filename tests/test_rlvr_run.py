"""training.method = rlvr through the whole loop: the rollout actors sample completions of each question, the verifier
pool scores them, the learner steps; a verifier killed mid-run is replaced and nothing is lost."""

from __future__ import annotations

import json
import threading
from itertools import combinations

import pytest
import torch
from helpers import kill_actor_processes, tiny_run_config
from rich.console import Console

from ebft.config import ConfigError, build_config, load_config
from ebft.messages import CompletionBatch, PromptBatch, VerifiableTask
from ebft.verifiers.pool import VerifierWorker

WORDS = ["apple", "banana", "cherry", "delta", "echo", "falcon", "garden", "harbor", "island", "jungle", "kernel"]


def write_questions(path, count: int = 40):
    with path.open("w") as out:
        for i in range(count):
            words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3))
            answer = f"{words}. {words}, and {words} again."
            out.write(json.dumps({"q": f"Repeat: {words}\n", "a": answer, "r": [answer]}) + "\n")
    return path


def rlvr_run_config(model_dir, tmp_path, **sections):
    source = {"path": str(write_questions(tmp_path / "questions.jsonl")), "question_key": "q", "answer_key": "a"}
    raw = tiny_run_config(model_dir, tmp_path / "run", **sections)
    raw["data"].update(sources=[{**source, "references_key": "r"}], heldout_fraction=0.3, max_examples=None)
    raw["training"].update(method="rlvr", steps=3, docs_per_step=2)
    raw["rlvr"] = {"completions_per_prompt": 3, "max_new_tokens": 6, "reward": "chrf", "max_prompt_tokens": 32}
    raw["resources"]["verifiers"] = {"num_actors": 1, "cpus_per_actor": 0.5}
    return build_config(raw)


def completions(tasks, texts) -> CompletionBatch:
    ids = list(range(len(tasks)))
    batch = PromptBatch(ids, [[1]] * len(tasks), tasks, step=0)
    tokens = [[[1]] * len(group) for group in texts]
    return CompletionBatch(batch, tokens, [[[0.0]] * len(group) for group in texts], texts, weight_version=0)


@pytest.mark.parametrize("reward, expected", [("all_passed", [1.0, 0.0, 0.0]), ("fraction_passed", [1.0, 0.5, 0.0])])
def test_the_verifier_scores_code_with_the_questions_tests(tmp_path, reward, expected):
    config = build_config(
        {"training": {"method": "rlvr"}, "rlvr": {"reward": reward}, "data": {"sources": [_code_source()]}}
    )
    task = VerifiableTask("Write add(a, b).", tests=("assert add(1, 2) == 3", "assert add(-1, 1) == 0"))
    answers = [
        "def add(a, b):\n    return a + b\n",
        "def add(a, b):\n    return 3\n",
        "def add(a, b):\n    return a +\n",
    ]
    scored = VerifierWorker(config).score(completions([task], [answers]))
    assert scored.rewards.tolist() == [expected]
    assert scored.outcomes == {"passed": 1, "assertion": 1, "runtime": 1}  # unparsable code is dropped: no add()


def test_the_verifier_scores_text_against_its_references():
    source = {"path": "q.jsonl", "question_key": "q", "answer_key": "a", "references_key": "r"}
    config = build_config({"training": {"method": "rlvr"}, "rlvr": {"reward": "chrf"}, "data": {"sources": [source]}})
    task = VerifiableTask("Repeat: apple", references=("apple",))
    scored = VerifierWorker(config).score(completions([task], [["apple", "xyz", "appl"]]))
    exact, disjoint, close = scored.rewards[0].tolist()
    assert exact == pytest.approx(1.0) and disjoint == 0.0 and 0 < close < 1


def _code_source():
    return {"path": "q.jsonl", "question_key": "q", "answer_key": "a", "tests_key": "tests"}


def test_rlvr_without_checks_in_the_data_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match=r"data.sources\[0\].question_key and .tests_key"):
        load_config(None, ["training.method=rlvr"])
    with pytest.raises(ConfigError, match=r"eval.verifier_questions .*data.sources\[0\].question_key"):
        load_config(None, ["eval.verifier_questions=4"])  # held-out questions to score need their checks too


@pytest.mark.slow
def test_a_three_arm_compare_pairs_rlvr_with_ebft_and_sft_through_a_killed_verifier(
    local_ray, tiny_model_with_tokenizer, tmp_path, monkeypatch
):
    """SFT, RLVR and EBFT from the same base on the same questions' rows, evaluated on the same held-out chunks;
    the RLVR arm's verifier is killed after its first step: it is replaced and every question is trained once."""
    from ebft.cluster.compare import compare
    from ebft.learner.group import LearnerGroup

    arms = [{"name": "ebft", "method": "ebft"}, {"name": "sft", "method": "sft"}, {"name": "rlvr", "method": "rlvr"}]
    config = rlvr_run_config(
        tiny_model_with_tokenizer,
        tmp_path,
        training={"max_staleness": 0},
        eval={"every": 3, "num_docs": 3, "num_samples": 2, "verifier_questions": 4},
        compare={"arms": arms},
    )
    root = tmp_path / "run"
    trained, rlvr_step = [], LearnerGroup.rlvr_step

    def recorded(group, completions, rewards, version):
        trained.extend(i for batch in completions for i in batch.prompts.task_ids)
        return rlvr_step(group, completions, rewards, version)

    monkeypatch.setattr(LearnerGroup, "rlvr_step", recorded)
    killed = []
    killer = threading.Thread(
        target=kill_actor_processes, args=("VerifierWorker", 1, root / "rlvr" / "metrics.jsonl", killed)
    )
    killer.start()
    console = Console(record=True, width=300)
    result = compare(config, console=console)
    killer.join(timeout=5)
    assert killed, "the verifier was never killed"
    assert set(result["differences"]) == {f"{a} - {b}" for a, b in combinations(["ebft", "sft", "rlvr"], 2)} | {
        f"{arm} - base" for arm in ("ebft", "sft", "rlvr")
    }
    rows = [json.loads(line) for line in (root / "rlvr" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "train/policy_loss" in row]
    assert [row["step"] for row in steps] == [0, 1, 2]
    for row in steps:
        assert row["verify/scored"] == 2 * 3  # questions x completions
        assert 0 <= row["train/reward"] <= 1 and row["train/completion_tokens"] <= 6
        assert row["cost/verifiers_s"] > 0 and torch.isfinite(torch.tensor(row["train/policy_loss"]))
    assert sorted(trained) == list(range(6))  # every question once, none twice, the killed verifier's too
    printed = console.export_text()
    assert "trained questions: 6 of 6 scheduled" in printed and "actor restarts: 1" in printed
    assert (root / "rlvr" / "logs" / "verifier-0.log").exists()
    # Every arm was evaluated on the same held-out chunks, the base once.
    evaluations = sorted(root.glob("*/evals/step_*.json"))
    assert [p.relative_to(root).as_posix() for p in evaluations] == [
        "ebft/evals/step_00000000.json",
        "ebft/evals/step_00000003.json",
        "rlvr/evals/step_00000003.json",
        "sft/evals/step_00000003.json",
    ]
    assert len({tuple(json.loads(p.read_text())["chunk_ids"]) for p in evaluations}) == 1
    # The held-out questions' accuracy: the same 4 questions scored for every arm, paired question by question.
    chrf = {p.relative_to(root).parts[0] + p.stem[-1]: json.loads(p.read_text())["per_problem"] for p in evaluations}
    chrf = {run: values["eval/verifier/chrf"] for run, values in chrf.items()}
    assert all(len(values) == 4 and all(0 <= v <= 1 for v in values) for values in chrf.values())
    for label, after, before in (("sft - rlvr", "sft3", "rlvr3"), ("rlvr - base", "rlvr3", "ebft0")):
        by_hand = sum(a - b for a, b in zip(chrf[after], chrf[before])) / 4
        assert result["differences"][label]["eval/verifier/chrf"]["mean"] == pytest.approx(by_hand, abs=1e-12)
