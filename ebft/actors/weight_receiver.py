"""The rollout side of a weight push: new policy weights go into a running vLLM engine.

Two kinds of transport (the learner side is ebft/learner/weight_sender.py; `Config.weight_transport` picks one):

- object store: the learner puts one `WeightUpdate` (each tensor's bytes) in the Ray object store and
  every rollout actor loads it inside its vLLM worker through `WeightReceiverExtension` (the worker's
  own reload path, then the CPU tied-embedding fix) with `load_update_into_engine`;
- broadcast (NCCL on GPUs, gloo on CPUs): vLLM's native weight-transfer lifecycle with the engines of
  ebft/actors/transfer_engines.py; `receive_weight_broadcast` takes part in the learner's broadcast (pause,
  start, update, finish with the version, resume).

Either way the engine's prefix cache is cleared: cached KV computed with the old weights must not be reused.
With model.lora a push carries only the adapters, which each worker merges into the base (adapter_merge.py) or, with
rollout.lora_sync: adapter, registers with vLLM's LoRA layers (adapter_serving.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

from ebft.actors.adapter_merge import AdapterBase, merged_weights
from ebft.actors.adapter_serving import ServedAdapter, serve_adapters
from ebft.actors.transfer_engines import refresh_tied_lm_head, register_transfer_engines
from ebft.messages import WeightUpdate

# vLLM imports this module in each engine worker before it builds the worker's weight-transfer engine.
register_transfer_engines()

# The dotted path vLLM imports inside each engine worker (LLM(worker_extension_cls=...)).
WORKER_EXTENSION = f"{__name__}.WeightReceiverExtension"


class WeightReceiverExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); runs inside the engine's worker.

    `collective_rpc` hands its arguments over as they are to an engine in this process, and msgpack-encodes
    them for one in another process, so the update travels as its tensors' bytes and dataclasses as their fields.
    """

    def ebft_load_weights(
        self, version: int, raw: dict, layouts: dict, adapter_base: dict | None, served: dict | None
    ) -> None:
        """Load HF-named weights into the running model in place (with `adapter_base`: the pushed LoRA adapters
        merged into the base, one linear at a time; with `served`: the adapters registered as they are)."""
        weights = WeightUpdate(version, raw, layouts).tensors()
        if served is not None:
            serve_adapters(self.model_runner, weights, version, ServedAdapter(**served))
            return
        # The base is memory-mapped (adapter_merge.base_weights): a node's workers share its pages, and each holds
        # only the merged linear being loaded.
        stream = iter(weights.items()) if adapter_base is None else merged_weights(weights, AdapterBase(**adapter_base))
        # A second model.load_weights() breaks on CPU (linear weights are repacked after loading);
        # the worker's reload path re-runs that post-load processing.
        tied = bool(getattr(self.model_runner.model_config.hf_text_config, "tie_word_embeddings", False))
        with _quiet_expected_reload_warnings(tied):
            self.reload_weights(weights_iterator=stream)
        refresh_tied_lm_head(self.model_runner.get_model(), self.model_runner.model_config)

    def ebft_serve_received_adapters(self, version: int, served: dict) -> None:
        """Broadcast transports: register the adapters the last round brought (after finish_weight_update, which
        drops every adapter the engine had)."""
        engine = self.weight_transfer_engine
        adapters, engine.received_adapters = engine.received_adapters, None
        if adapters is None:
            raise RuntimeError(f"the transfer round of version {version} brought no adapters to serve")
        serve_adapters(self.model_runner, adapters, version, ServedAdapter(**served))


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


def load_update_into_engine(
    llm, update: WeightUpdate, adapter_base: AdapterBase | None = None, served: ServedAdapter | None = None
) -> None:
    """Object store: paused, loaded, cache cleared, resumed."""
    from vllm.v1.engine.core_client import InprocClient

    raw = update.raw
    if not isinstance(llm.llm_engine.engine_core, InprocClient):
        # To an engine in its own process (GPU engines), msgpack rebuilds numpy arrays only where the receiving
        # method's types say so, which collective_rpc's do not: send their bytes.
        raw = {name: memoryview(array) for name, array in raw.items()}
    with paused_engine(llm):
        args = (update.version, raw, update.layouts, _fields(adapter_base), _fields(served))
        llm.collective_rpc("ebft_load_weights", args=args)
        llm.llm_engine.set_weight_version(str(update.version))
        clear_prefix_cache(llm)


def receive_weight_broadcast(
    llm,
    update_info: dict[str, list],
    version: int,
    adapter_base: AdapterBase | None = None,
    served: ServedAdapter | None = None,
) -> None:
    """Broadcast transports: blocks until the learner's broadcast completes (or its bound passes)."""
    with paused_engine(llm):
        llm.start_weight_update()
        adapter = {} if adapter_base is None else {"adapter_base": _fields(adapter_base)}
        llm.update_weights({"update_info": {**update_info, **adapter}})
        llm.finish_weight_update(weight_version=str(version))
        if served is not None:
            llm.collective_rpc("ebft_serve_received_adapters", args=(version, _fields(served)))
        clear_prefix_cache(llm)


def _fields(settings) -> dict | None:
    return None if settings is None else dataclasses.asdict(settings)


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
