"""The rollout side of a weight push: new policy weights go into a running vLLM engine.

Two kinds of transport (the learner side is ebft/learner/weight_sender.py; `Config.weight_transport` picks one):

- object store: the learner puts one `WeightUpdate` (each tensor's bytes) in the Ray object store and
  every rollout actor loads it inside its vLLM worker through `WeightReceiverExtension` (the worker's
  own reload path, then the CPU tied-embedding fix) with `load_update_into_engine`;
- broadcast (NCCL on GPUs, gloo on CPUs): vLLM's native weight-transfer lifecycle with the engines of
  ebft/actors/transfer_engines.py; `receive_weight_broadcast` takes part in the learner's broadcast (pause,
  start, update, finish with the version, resume).

Either way the engine's prefix cache is cleared: cached KV computed with the old weights must not be reused.
With model.lora a push carries only the adapters, which each worker merges into the base (adapter_merge.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

from ebft.actors.adapter_merge import AdapterBase, merged_weights
from ebft.actors.transfer_engines import refresh_tied_lm_head, register_transfer_engines
from ebft.messages import WeightUpdate

# vLLM imports this module in each engine worker before it builds the worker's weight-transfer engine.
register_transfer_engines()

# The dotted path vLLM imports inside each engine worker (LLM(worker_extension_cls=...)).
WORKER_EXTENSION = f"{__name__}.WeightReceiverExtension"


class WeightReceiverExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); runs inside the engine's worker.

    `collective_rpc` hands its arguments over as they are to an engine in this process, and msgpack-encodes
    them (numpy arrays as buffers) for one in another process, so the update travels as its numpy parts.
    """

    def ebft_load_weights(self, version: int, raw: dict, layouts: dict, adapter_base: AdapterBase | None) -> int:
        """Load HF-named weights into the running model in place (with `adapter_base`: the pushed LoRA adapters
        merged into the base); returns how many tensors were loaded."""
        weights = WeightUpdate(version, raw, layouts).tensors()
        if adapter_base is not None:
            weights = dict(merged_weights(weights, adapter_base))
        # A second model.load_weights() breaks on CPU (linear weights are repacked after loading);
        # the worker's reload path re-runs that post-load processing.
        tied = bool(getattr(self.model_runner.model_config.hf_text_config, "tie_word_embeddings", False))
        with _quiet_expected_reload_warnings(tied):
            self.reload_weights(weights_iterator=iter(weights.items()))
        refresh_tied_lm_head(self.model_runner.get_model(), self.model_runner.model_config)
        return len(weights)


class _ExpectedReloadWarnings(logging.Filter):
    """vLLM's reload warns "<layer>: Failed to load weights" for layers a checkpoint has no tensors
    for: the rotary embedding (its cache is computed, not loaded) and, in a tied model, the LM head
    (refreshed from the embedding by `refresh_tied_lm_head`). Those are expected; others still show."""

    def __init__(self, tied: bool):
        super().__init__()
        self.expected = {"RotaryEmbedding", "ParallelLMHead"} if tied else {"RotaryEmbedding"}

    def filter(self, record: logging.LogRecord) -> bool:
        expected = record.msg == "%s: Failed to load weights" and record.args and record.args[0] in self.expected
        return not expected


@contextlib.contextmanager
def _quiet_expected_reload_warnings(tied: bool):
    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    expected = _ExpectedReloadWarnings(tied)
    reload_log.addFilter(expected)
    try:
        yield
    finally:
        reload_log.removeFilter(expected)


def load_update_into_engine(llm, update: WeightUpdate, adapter_base: AdapterBase | None = None) -> None:
    """Object store: paused, loaded, cache cleared, resumed."""
    with paused_engine(llm):
        llm.collective_rpc("ebft_load_weights", args=(update.version, update.raw, update.layouts, adapter_base))
        llm.llm_engine.set_weight_version(str(update.version))
        clear_prefix_cache(llm)


def receive_weight_broadcast(
    llm, update_info: dict[str, list], version: int, adapter_base: AdapterBase | None = None
) -> None:
    """Broadcast transports: blocks until the learner's broadcast completes (or its bound passes)."""
    with paused_engine(llm):
        llm.start_weight_update()
        adapter = {} if adapter_base is None else {"adapter_base": dataclasses.asdict(adapter_base)}
        llm.update_weights({"update_info": {**update_info, **adapter}})
        llm.finish_weight_update(weight_version=str(version))
        clear_prefix_cache(llm)


def clear_prefix_cache(llm) -> None:
    """Cached KV was computed with the old weights: a hit on it would mix two versions in one sequence."""
    if llm.reset_prefix_cache() is False:  # vLLM refuses while requests hold cached blocks
        raise RuntimeError("vLLM could not reset its prefix cache after a weight update (requests in flight?)")


@contextlib.contextmanager
def paused_engine(llm):
    """Stop scheduling while weights change; requests in flight (none, when callers serialize) are kept.

    `LLM.sleep(level=0)` is the synchronous engine's pause_generation; "keep" is the only mode an
    in-process engine supports.
    """
    llm.sleep(level=0, mode="keep")
    try:
        yield llm
    finally:
        llm.wake_up(tags=["scheduling"])
