"""The receiving ends of a broadcast weight push, registered in vLLM's own weight-transfer factory.

They run inside the engine's workers (in its EngineCore process under vLLM's multiprocessing, as GPU engines run)
and take part in vLLM's lifecycle: init_weight_transfer_engine, start_weight_update, update_weights,
finish_weight_update, shutdown_weight_transfer_engine.

- `ebft_nccl` (GPUs): vLLM's NCCL engine as it is, plus the announcement below.
- `gloo` (CPU pools, and the tests that run the GPU protocol on CPU): the same lifecycle and packed wire format
  over a gloo group; weights load through vLLM's layerwise reload as NCCL's do.

Both announce in the group's store that the worker entered a round before they receive anything, so the learner's
rank 0 broadcasts only once every receiver is inside (ebft/weight_broadcast.py). A round whose update info names an
`adapter_base` carries LoRA adapters: they are collected and loaded merged into the base (adapter_merge.py). An engine
that serves adapters (`serves_adapters` at init, rollout.lora_sync: adapter) reloads no weights: it keeps each round's
adapters for the rollout actor to register with vLLM's LoRA layers (adapter_serving.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine, NCCLWeightTransferUpdateInfo

from ebft.actors.adapter_merge import AdapterBase, merged_weights
from ebft.weight_broadcast import TransferGroup, as_transfer_group, open_transfer_group, receive_packed

ENGINES = {"ebft_nccl": "EbftNcclWeightTransferEngine", "gloo": "GlooWeightTransferEngine"}


def register_transfer_engines() -> None:
    """Make the engines known to vLLM's factory (in every process that builds or runs an engine; idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    for name, class_name in ENGINES.items():
        if name not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(name, __name__, class_name)


@dataclass(kw_only=True)
class RoundUpdateInfo(NCCLWeightTransferUpdateInfo):
    round_index: int
    """The sender's count of its pushes on this group: the key each worker announces it entered under."""
    adapter_base: dict | None = None
    """An AdapterBase's fields when the round carries LoRA adapters (set by the receiving rollout actor)."""


class _Loader:
    """Stands in for the model inside vLLM's NCCL receive, which only calls its load_weights."""

    def __init__(self, load: Callable) -> None:
        self.load_weights = load


@dataclass(kw_only=True)
class TimedInitInfo(NCCLWeightTransferInitInfo):
    timeout_s: float = 600.0
    """Bound of every wait of this group (rendezvous, each broadcast)."""
    serves_adapters: bool = False
    """Set by a rollout actor whose engine serves LoRA adapters: rounds bring adapters to keep, not weights."""


def group_rank(parallel_config, rank_offset: int) -> int:
    """This worker's rank in the transfer group: its rank among the engine's workers after the engine's offset
    (as vLLM's `worker_init_process_group` numbers them)."""
    worker = parallel_config.data_parallel_index * parallel_config.world_size + parallel_config.rank
    return worker + rank_offset


class RoundEngine(NCCLWeightTransferEngine):
    """What both engines add to vLLM's NCCL engine: timed groups, announced rounds, LoRA rounds."""

    init_info_cls = TimedInitInfo
    update_info_cls = RoundUpdateInfo
    serves_adapters = False
    received_adapters: dict[str, torch.Tensor] | None = None
    """A served-adapter round's tensors, until the rollout actor registers them."""

    def start_weight_update(self) -> None:
        if not self.serves_adapters:  # a layerwise reload of the weights
            super().start_weight_update()

    def finish_weight_update(self) -> None:
        if not self.serves_adapters:
            super().finish_weight_update()

    def receive_round(self, model, update_info: RoundUpdateInfo, receive: Callable[[Callable], None]) -> None:
        """`receive(load)` hands the round's tensors to `load` in batches: the model's own load_weights, or for a LoRA
        round a collector whose adapters are kept to serve or loaded merged once the round is complete."""
        if not (self.serves_adapters or update_info.adapter_base):
            receive(model.load_weights)
            return
        adapters = {}
        receive(lambda weights: adapters.update((name, tensor.clone()) for name, tensor in weights))  # reused buffers
        if self.serves_adapters:
            self.received_adapters = adapters
        else:
            model.load_weights(merged_weights(adapters, AdapterBase(**update_info.adapter_base)))


class EbftNcclWeightTransferEngine(RoundEngine):
    """vLLM's NCCL engine, announcing each round before it receives."""

    def init_transfer_engine(self, init_info: TimedInitInfo) -> None:
        self.shutdown()  # vLLM's NCCL engine would overwrite a previous communicator without releasing it
        super().init_transfer_engine(init_info)
        self.group = as_transfer_group(self.model_update_group, init_info.timeout_s)
        self.serves_adapters = init_info.serves_adapters

    def update_weights(self, update_info: dict) -> None:
        with restored_on_failure(self):
            super().update_weights(update_info)

    def receive_weights(self, update_info: RoundUpdateInfo) -> None:
        self.group.announce_entered(update_info.round_index)
        model = self.model

        def receive(load: Callable) -> None:
            self.model = _Loader(load)
            try:
                NCCLWeightTransferEngine.receive_weights(self, update_info)
            finally:
                self.model = model

        self.receive_round(model, update_info, receive)


class GlooWeightTransferEngine(RoundEngine):
    """The NCCL engine's layerwise reload (start / finish) with a gloo group and the packed wire format."""

    def init_transfer_engine(self, init_info: TimedInitInfo) -> None:
        self.shutdown()
        self.serves_adapters = init_info.serves_adapters
        self.packed_buffer_size_bytes = init_info.packed_buffer_size_bytes
        rank = group_rank(self.parallel_config, init_info.rank_offset)
        self.group: TransferGroup | None = open_transfer_group(
            "gloo",
            init_info.master_address,
            init_info.master_port,
            rank,
            init_info.world_size,
            self.device,
            init_info.timeout_s,
        )

    def update_weights(self, update_info: dict) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on a CPU-only machine.
        with restored_on_failure(self):
            self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: RoundUpdateInfo) -> None:
        if getattr(self, "group", None) is None:
            raise RuntimeError("the gloo weight transfer is not initialized: call init_weight_transfer_engine first")
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        metadata = [
            (name, shape, getattr(torch, dtype))
            for name, dtype, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes)
        ]
        self.group.announce_entered(update_info.round_index)
        buffer_bytes = self.packed_buffer_size_bytes
        with disable_mtp_completeness_check():
            self.receive_round(
                self.model,
                update_info,
                lambda load: receive_packed(metadata, self.group, buffer_bytes, self.device, load),
            )

    def finish_weight_update(self) -> None:
        super().finish_weight_update()
        refresh_tied_lm_head(self.model, self.model_config)

    def shutdown(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            group.close()
        self.group = None


@contextlib.contextmanager
def restored_on_failure(engine):
    """A transfer that fails part way leaves the model inside vLLM's layerwise reload (layers on the meta device,
    waiting for the rest of their weights), where the next update cannot start. Finish the reload with what arrived
    (untouched layers get their old tensors back) so the engine takes the next push; it is not sampled before that
    push succeeds (the controller pushes again after a failed push)."""
    try:
        yield
    except BaseException:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if not engine.serves_adapters:
            finalize_layerwise_reload(engine.model, engine.model_config)
        raise


def refresh_tied_lm_head(model, model_config) -> None:
    """On CPU the LM head keeps a packed copy of the (tied) embedding made at load time; a reload of the embedding
    leaves it stale until it is packed again."""
    from vllm.platforms import current_platform

    if not (current_platform.is_cpu() and getattr(model_config.hf_text_config, "tie_word_embeddings", False)):
        return
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)
