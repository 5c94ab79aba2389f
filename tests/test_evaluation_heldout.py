"""Held-out evaluation: CE and feature matching against hand computations, HumanEval glue through the
real sandbox, and `ebft eval` end to end on SmolLM2."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from ebft import cli
from ebft.config import ConfigError, build_config
from ebft.evaluation.checkpoint_eval import (
    default_metrics_path,
    load_causal_lm,
    resolve_evaluated_model,
    run,
)
from ebft.evaluation.code import HUMANEVAL_STOP_SEQUENCES
from ebft.evaluation.heldout import HeldoutEvaluator
from ebft.evaluation.humaneval import code_eval, humaneval_problems
from ebft.features.extractor import FeatureExtractor
from ebft.learner.loss import chunks_document_ce
from ebft.messages import ChunkBatch, RolloutBatch

# T=16, C=4, s=4, G=4 -> NB=3 blocks; n=3 samples; the tiny Llama has 4 layers -> feature layers 1, 2, 3.
T, C, S, G, N = 16, 4, 4, 4, 3
NB = (T - G - C) // S + 1
FEATURE_LAYERS = (1, 2, 3)


@pytest.fixture
def one_thread():
    """Forwards of a tiny model: one thread beats two, by far when other processes share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(model_dir, pooling="last"):
    return build_config(
        {
            "model": {"policy": str(model_dir), "dtype": "float32"},
            "data": {"chunk_length": T},
            "sampling": {"context_length": C, "stride": S, "block_length": G, "num_samples": N},
            "features": {"pooling": pooling},
            "reward": {"whitening": "none"},
            "eval": {"num_samples": N},
        }
    )


def reference_model(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float64)
    return model.eval().requires_grad_(False)


def expected_cross_entropy(model, docs: torch.Tensor) -> list[float]:
    """Per document: mean over positions t = 0..T-2 of -log softmax(logits_t)[doc[t + 1]], one forward each."""
    losses = []
    for doc in docs:
        logits = model(input_ids=doc[None]).logits[0].double()
        log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        nll = [-log_probs[t, doc[t + 1]].item() for t in range(len(doc) - 1)]
        losses.append(sum(nll) / len(nll))
    return losses


def block_feature(model, tokens: torch.Tensor, last: int, pooling: str) -> torch.Tensor:
    """phi of the block formed by the `last` final tokens of `tokens`: one causal forward of exactly these
    tokens; layers concatenated, each token L2-normalized, then the last token or the mean."""
    hidden = model(input_ids=tokens[None], output_hidden_states=True).hidden_states
    per_token = []
    for position in range(len(tokens) - last, len(tokens)):
        vector = torch.cat([hidden[layer][0, position] for layer in FEATURE_LAYERS])
        per_token.append(vector / vector.norm())
    return per_token[-1] if pooling == "last" else torch.stack(per_token).mean(dim=0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_heldout_metrics_match_hand_computation(tiny_model_dir, pooling, one_thread):
    config = tiny_config(tiny_model_dir, pooling)
    generator = torch.Generator().manual_seed(1)
    docs = torch.randint(3, 512, (2, T), generator=generator)
    rollouts = torch.randint(3, 512, (2, N, NB, G), generator=generator)
    requested = []

    def generate(chunks: ChunkBatch, num_samples: int) -> RolloutBatch:
        assert num_samples == N
        requested.append(chunks)
        return RolloutBatch(chunks, rollouts, torch.zeros(rollouts.shape), weight_version=0)

    policy = load_causal_lm(str(tiny_model_dir), config, torch.device("cpu"))
    evaluator = HeldoutEvaluator(config, ChunkBatch(chunk_ids=[5, 9], tokens=docs, step=0), groups=[0, 7])
    evaluation = evaluator.run(
        generate,
        FeatureExtractor(tiny_model_dir, config, device="cpu").extract,
        # 16 tokens per forward: one document at a time, so the micro-batching is exercised too.
        lambda tokens: chunks_document_ce(policy, tokens, 1, torch.device("cpu")),
        step=4,
    )
    metrics = evaluation.metrics
    assert evaluation.step == 4 and evaluation.chunk_ids == [5, 9] and evaluation.groups == [0, 7]
    assert requested[0].chunk_ids == [5, 9] and torch.equal(requested[0].tokens, docs)

    reference = reference_model(tiny_model_dir)
    per_doc_ce = expected_cross_entropy(reference, docs)
    ce = sum(per_doc_ce) / len(per_doc_ce)
    assert metrics["eval/full_ce_loss"] == pytest.approx(ce, abs=1e-5)
    assert metrics["eval/full_perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)

    squared_distances, unbiased, alignments, best_alignments = [], [], [], []
    for d in range(docs.shape[0]):
        for k in range(NB):
            prefix = docs[d, : C + k * S]
            phi_y = block_feature(reference, docs[d, : C + k * S + G], G, pooling)
            phis = [block_feature(reference, torch.cat([prefix, rollouts[d, j, k]]), G, pooling) for j in range(N)]
            mean_phi = sum(phis) / N
            squared_distances.append(sum((mean_phi[i] - phi_y[i]).item() ** 2 for i in range(len(phi_y))))
            pairs = [float(phis[a] @ phis[b]) for a in range(N) for b in range(N) if a != b]
            unbiased.append(
                sum(pairs) / len(pairs) - 2 * sum(float(p @ phi_y) for p in phis) / N + float(phi_y @ phi_y)
            )
            group = [2 * cosine(phi, phi_y) for phi in phis]
            alignments.extend(group)
            best_alignments.append(max(group))
    assert metrics["eval/cfm_plugin"] == pytest.approx(sum(squared_distances) / len(squared_distances), rel=1e-4)
    assert metrics["eval/cfm"] == pytest.approx(sum(unbiased) / len(unbiased), rel=1e-4, abs=1e-6)
    # Per-chunk values (means over each chunk's blocks) are kept for paired comparisons.
    per_chunk_cfm = [sum(unbiased[d * NB : (d + 1) * NB]) / NB for d in range(docs.shape[0])]
    assert evaluation.per_chunk["eval/cfm"] == pytest.approx(per_chunk_cfm, rel=1e-4, abs=1e-6)
    assert evaluation.per_chunk["eval/full_ce_loss"] == pytest.approx(per_doc_ce, abs=1e-5)
    assert metrics["eval/reward_pass1_gt"] == pytest.approx(sum(alignments) / len(alignments), abs=1e-5)
    assert metrics["eval/reward_passk_gt"] == pytest.approx(sum(best_alignments) / len(best_alignments), abs=1e-5)


def test_document_cross_entropy_batches_agree(tiny_model_dir, one_thread):
    config = tiny_config(tiny_model_dir)
    model = load_causal_lm(str(tiny_model_dir), config, torch.device("cpu"))
    docs = torch.randint(3, 512, (5, T), generator=torch.Generator().manual_seed(2))
    one_at_a_time = chunks_document_ce(model, docs, 1, torch.device("cpu"))
    calls = []
    two_at_a_time = chunks_document_ce(model, docs, 2, torch.device("cpu"), on_batch=lambda: calls.append(1))
    assert len(calls) == 3 and one_at_a_time.shape == (5,)
    torch.testing.assert_close(two_at_a_time, one_at_a_time, atol=1e-5, rtol=0)


def test_humaneval_pass_at_k_from_known_completions():
    config = build_config(
        overrides=["eval.num_completions=2", "eval.temperature=0.8", "eval.max_new_tokens=64", "eval.timeout_s=10"]
    )
    problems = humaneval_problems(3)
    wrong, broken = "    return None\n", "    return (\n"
    samples = {  # problem index -> its two completions: 2/2, 0/2 and 1/2 correct
        0: [problems[0].canonical_solution, problems[0].canonical_solution],
        1: [wrong, broken],
        2: [problems[2].canonical_solution, wrong],
    }
    calls = []

    def complete(prompts, *, n, temperature, top_p, max_tokens, stop):
        calls.append(dict(prompts=prompts, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop))
        return [samples[i] for i in range(len(prompts))]

    metrics, per_problem = code_eval(complete, problems, config)
    (call,) = calls
    assert call["prompts"] == [p.prompt for p in problems]
    assert (call["n"], call["temperature"], call["max_tokens"]) == (2, 0.8, 64)
    assert tuple(call["stop"]) == HUMANEVAL_STOP_SEQUENCES
    assert metrics["eval/humaneval/pass@1"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert metrics["eval/humaneval/pass@2"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    assert metrics["eval/humaneval/outcome/passed"] == 3
    assert metrics["eval/humaneval/outcome/assertion"] == 2
    assert metrics["eval/humaneval/outcome/syntax"] == 1
    assert metrics["eval/humaneval/num_problems"] == 3
    # Each problem's own pass@k, what pairs two evaluations problem by problem: 2/2, 0/2, 1/2 correct.
    assert per_problem == {"eval/humaneval/pass@1": [1.0, 0.0, 0.5], "eval/humaneval/pass@2": [1.0, 0.0, 1.0]}


def test_missing_model_is_a_config_error_before_any_work(tmp_path, monkeypatch, capsys):
    import ebft.data.chunks

    def must_not_run(*args, **kwargs):
        raise AssertionError("data was prepared for a model that does not exist")

    monkeypatch.setattr(ebft.data.chunks, "prepare_data", must_not_run)
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ConfigError, match="no-such-checkpoint"):
        run(str(missing), build_config())
    assert cli.main(["eval", str(missing)]) == 2
    assert "no-such-checkpoint" in capsys.readouterr().err


def test_a_missing_comet_checkpoint_is_a_config_error_before_any_work(tmp_path, tiny_model_dir):
    from ebft.evaluation.checkpoint_eval import EvalPlan

    config = build_config({"model": {"policy": str(tiny_model_dir)}, "eval": {"comet_checkpoint": "gone/model.ckpt"}})
    with pytest.raises(ConfigError, match="gone/model.ckpt"):
        EvalPlan(str(tiny_model_dir), config, None)
    (tmp_path / "model.ckpt").write_bytes(b"")
    config = build_config(
        {"model": {"policy": str(tiny_model_dir)}, "eval": {"comet_checkpoint": str(tmp_path / "model.ckpt")}}
    )
    assert EvalPlan(str(tiny_model_dir), config, None).model_path == str(tiny_model_dir)


def test_a_run_folder_means_its_newest_complete_checkpoint(tmp_path, tiny_model_dir):
    import shutil

    checkpoints = tmp_path / "run" / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):
        folder = checkpoints / f"step_{step:08d}"
        shutil.copytree(tiny_model_dir, folder)
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"step": step, "weight_version": step}))
    newest = checkpoints / "step_00000020"
    assert resolve_evaluated_model(str(tmp_path / "run")) == str(newest)
    assert resolve_evaluated_model(str(checkpoints)) == str(newest)
    assert resolve_evaluated_model(str(checkpoints / "step_00000010")) == str(checkpoints / "step_00000010")
    assert default_metrics_path(str(newest)) == checkpoints / "step_00000020.eval.json"


def test_eval_command_reads_overrides_after_the_config(monkeypatch, tmp_path):
    import sys
    import types

    calls = []
    fake = types.ModuleType("ebft.evaluation.checkpoint_eval")
    fake.run = lambda *args, **kwargs: calls.append((args, kwargs))
    monkeypatch.setitem(sys.modules, "ebft.evaluation.checkpoint_eval", fake)
    config_file = tmp_path / "eval.yaml"
    config_file.write_text("eval:\n  num_docs: 3\n")
    config = str(config_file)
    assert cli.main(["eval", "runs/x", "--config", config, "eval.humaneval_problems=2", "--output", "m.json"]) == 0
    assert cli.main(["eval", "runs/x", "eval.humaneval_problems=2", "--config", config, "--output", "m.json"]) == 0
    assert cli.main(["eval", "--output", "m.json", "--config", config, "runs/x", "eval.humaneval_problems=2"]) == 0
    assert len(calls) == 3
    for (model, parsed), kwargs in calls:
        assert model == "runs/x" and kwargs == {"output": "m.json", "against": None}
        assert parsed.eval.num_docs == 3 and parsed.eval.humaneval_problems == 2


@pytest.mark.slow
def test_ebft_eval_end_to_end_on_smollm2(tmp_path):
    from ebft.model_sources import smollm2_path

    translations = tmp_path / "translation.jsonl"
    translations.write_text(
        json.dumps({"source": "Bonjour le monde.", "reference": "Hello world."})
        + "\n"
        + json.dumps({"source": "Le chat dort.", "reference": "The cat is sleeping."})
        + "\n"
    )
    config_file = tmp_path / "eval.yaml"
    config_file.write_text(
        "data:\n  sources: [{path: python_stdlib}]\n  chunk_length: 32\n  heldout_fraction: 0.3\n  max_examples: 30\n"
        "sampling: {context_length: 8, stride: 8, block_length: 8, num_samples: 2}\n"
        "rollout: {kv_cache_gib: 0.25}\n"
        "eval: {num_docs: 3, num_samples: 3, humaneval_problems: 2, max_new_tokens: 32, "
        f"translation_file: {translations}}}\n"
    )
    output = tmp_path / "metrics.json"
    model = str(smollm2_path())
    assert cli.main(["eval", model, "--config", str(config_file), "--output", str(output)]) == 0

    record = json.loads(output.read_text())
    metrics = record["metrics"]
    assert record["model"] == model and record["feature_model"] == model
    for name in (
        "eval/full_ce_loss",
        "eval/full_perplexity",
        "eval/cfm",
        "eval/cfm_plugin",
        "eval/reward_pass1_gt",
        "eval/reward_passk_gt",
        "eval/humaneval/pass@1",
        "eval/translation/bleu",
    ):
        assert math.isfinite(metrics[name]), name
    # A pretrained model predicts Python far better than uniform over its 49,152 tokens (CE 10.8).
    assert 0.0 < metrics["eval/full_ce_loss"] < 6.0
    assert metrics["eval/full_perplexity"] == pytest.approx(math.exp(metrics["eval/full_ce_loss"]))
    assert metrics["eval/reward_pass1_gt"] <= metrics["eval/reward_passk_gt"] <= 2.0
    assert len(record["per_chunk"]["eval/cfm"]) == len(record["chunk_ids"]) == len(record["groups"]) == 3
    assert metrics["eval/heldout/num_chunks"] == 3 and metrics["eval/humaneval/num_problems"] == 2
    assert sum(v for k, v in metrics.items() if k.startswith("eval/humaneval/outcome/")) == 2
    assert 0.0 <= metrics["eval/humaneval/pass@1"] <= 1.0 and 0.0 <= metrics["eval/translation/bleu"] <= 100.0

    # The same model again, paired with the first evaluation: the same chunks and sampling seeds give the same
    # values chunk by chunk, so every difference and its interval are zero.
    again = tmp_path / "again.json"
    args = ["eval", model, "--config", str(config_file), "eval.humaneval_problems=0", "eval.translation_file=null"]
    assert cli.main([*args, "--output", str(again), "--against", str(output)]) == 0
    differences = json.loads(again.read_text())["against"]["differences"]
    assert set(differences) == {"eval/full_ce_loss", "eval/cfm", "eval/cfm_plugin", "eval/reward_pass1_gt"}
    for name, difference in differences.items():
        assert max(abs(difference[key]) for key in ("mean", "low", "high")) < 1e-6, (name, difference)


MEASURED = {"chunks": "0123abcd", "eval.seed": 0, "eval.num_samples": 16, "sampling": [8, 8, 8, 0.6]}


def _metrics_file(path, per_chunk_cfm, chunk_ids, groups, feature_model="base-model", measured=MEASURED):
    """A metrics JSON as `ebft eval` writes it, with only the held-out CFM per chunk."""
    record = {
        "model": "m",
        "feature_model": feature_model,
        "metrics": {"eval/cfm": sum(per_chunk_cfm) / len(per_chunk_cfm)},
        "chunk_ids": chunk_ids,
        "groups": groups,
        "per_chunk": {"eval/cfm": per_chunk_cfm},
        "measured": measured,
    }
    path.write_text(json.dumps(record))
    return str(path)


def test_two_earlier_evaluations_are_paired_chunk_by_chunk(tmp_path, capsys):
    rng = random.Random(0)
    before = [rng.uniform(0.3, 0.5) for _ in range(12)]
    after = [value - 0.05 + rng.uniform(-0.01, 0.01) for value in before]  # every chunk improves by about 0.05
    ids, groups = list(range(12)), [i // 3 for i in range(12)]
    a = _metrics_file(tmp_path / "a.eval.json", after, ids, groups)
    b = _metrics_file(tmp_path / "b.eval.json", before, ids, groups)

    assert cli.main(["eval", a, "--against", b]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "eval/cfm" in line)
    mean = sum(x - y for x, y in zip(after, before)) / 12
    assert f"{mean:+.4f}" in row and row.rstrip(" │|").endswith("*")  # the interval excludes zero

    # Different chunks, another feature network, no baseline or not a metrics file: clear errors, nothing paired.
    other_chunks = _metrics_file(tmp_path / "c.eval.json", before, [i + 100 for i in ids], groups)
    other_features = _metrics_file(tmp_path / "d.eval.json", before, ids, groups, feature_model="other-model")
    # The same chunk positions over other tokens (e.g. another data.chunk_length), or sampled another way.
    other_tokens = _metrics_file(tmp_path / "e.eval.json", before, ids, groups, measured={**MEASURED, "chunks": "f"})
    fewer_samples = _metrics_file(
        tmp_path / "f.eval.json", before, ids, groups, measured={**MEASURED, "eval.num_samples": 4}
    )
    (tmp_path / "not_metrics.json").write_text("{}")
    for baseline, message in [
        (other_chunks, "different held-out chunks"),
        (other_tokens, "different held-out chunks"),
        (fewer_samples, "measured the held-out chunks differently (eval.num_samples 16 vs 4)"),
        (other_features, "different feature spaces"),
        (str(tmp_path / "not_metrics.json"), "is not an evaluation"),
    ]:
        assert cli.main(["eval", a, "--against", baseline]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["eval", a]) == 2
    assert "--against" in capsys.readouterr().err
