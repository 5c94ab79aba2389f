"""A whole LoRA run that loses its rollout actor and its learner rank and ends as an uninterrupted one."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import TINY_LORA, kill_actor_processes, tiny_run_config
from safetensors.torch import load_file

from ebft.config import build_config
from ebft.learner import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_a_lora_run_survives_a_killed_rollout_actor_and_learner_and_ends_as_an_uninterrupted_one(
    local_ray, tiny_model_with_tokenizer, tmp_path
):
    """A synchronous LoRA run through all three pools over the gloo transport (failing as NCCL fails), its engine
    serving the adapters: the rollout actor is SIGKILLed after step 1 (its replacement starts from the base and
    registers the pushed adapters) and the learner rank after step 3, between pushes (it restarts from the
    checkpoint at step 2 and connects to engines that still hold the dead rank's transfer group). Every chunk is
    trained once, and the final adapter equals an uninterrupted run's. (With lora_sync merged a push after a
    replacement is a full-weight push, whose faults test_weight_protocol.py and test_cluster.py cover; a merged push
    itself is test_lora.py's.)"""
    from ebft.cluster.train import run

    def lora_run(folder, kills=()):
        raw = tiny_run_config(
            tiny_model_with_tokenizer,
            tmp_path / folder,
            model={"lora": TINY_LORA},
            training={"max_staleness": 0, "steps": 4},
            checkpoint={"every": 2},
        )
        raw["rollout"].update(lora_sync="adapter", weight_transport="gloo", weight_sync_timeout_s=60)
        killed: list[int] = []
        killers = [
            threading.Thread(
                target=kill_actor_processes, args=(actor, rows, tmp_path / folder / "metrics.jsonl", killed)
            )
            for actor, rows in kills
        ]
        for killer in killers:
            killer.start()
        summary = run(build_config(raw))
        for killer in killers:
            killer.join(timeout=5)
        assert len(killed) >= len(kills)
        return summary

    straight = lora_run("straight")
    faulty = lora_run("faulty", kills=[("RolloutWorker", 1), ("LearnerRankActor", 3)])
    assert faulty.restarts >= 2 and faulty.steps == straight.steps == 4
    assert faulty.trained_chunk_ids == straight.trained_chunk_ids
    assert len(set(faulty.trained_chunk_ids)) == faulty.trained_chunks == 8
    adapter = load_file(str(faulty.checkpoint / ckpt.ADAPTER_DIR / "adapter_model.safetensors"))
    expected = load_file(str(straight.checkpoint / ckpt.ADAPTER_DIR / "adapter_model.safetensors"))
    assert adapter.keys() == expected.keys() and any(".lora_B." in name for name in adapter)
    for name, value in expected.items():
        torch.testing.assert_close(adapter[name], value, atol=1e-6, rtol=1e-5, msg=name)
