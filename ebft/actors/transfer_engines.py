"""The receiving end of a broadcast weight push, registered in vLLM's own weight-transfer factory.

It runs inside the engine's workers (in its EngineCore process under vLLM's multiprocessing, as GPU engines run)
and takes part in vLLM's lifecycle: init_weight_transfer_engine, start_weight_update, update_weights,
finish_weight_update, shutdown_weight_transfer_engine. One engine, registered under two names that differ only in
the communicator (ebft/weight_broadcast.py): `ebft_nccl` between GPUs, `gloo` between CPU processes, which fails as
NCCL fails, so the CPU tests run the GPU engines' code.

A connect and each round run under a Guard: a worker whose round passes its bound, is declared failed by the
sender or raises, ends its process (so the actor with it), and never loads a round that did not complete. Every
worker announces in the group's store that it entered a round before the learner's rank 0 broadcasts anything. A
round whose update info names an `adapter_base` carries LoRA adapters: they are collected and loaded merged into the
base (adapter_merge.py). An engine that serves adapters (`serves_adapters` at init, rollout.lora_sync: adapter)
reloads no weights: it keeps each round's adapters for the rollout actor to register with vLLM's LoRA layers
(adapter_serving.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine, NCCLWeightTransferUpdateInfo

from ebft.actors.adapter_merge import AdapterBase, merged_weights
from ebft.weight_broadcast import TransferGroup, open_transfer_group, receive_packed

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


@dataclass(kw_only=True)
class TimedInitInfo(NCCLWeightTransferInitInfo):
    timeout_s: float = 600.0
    """Bound of the connect and of each round, after which the worker ends its process."""
    serves_adapters: bool = False
    """Set by a rollout actor whose engine serves LoRA adapters: rounds bring adapters to keep, not weights."""


def group_rank(parallel_config, rank_offset: int) -> int:
    """This worker's rank in the transfer group: its rank among the engine's workers after the engine's offset
    (as vLLM's `worker_init_process_group` numbers them)."""
    worker = parallel_config.data_parallel_index * parallel_config.world_size + parallel_config.rank
    return worker + rank_offset


class RoundEngine(NCCLWeightTransferEngine):
    """vLLM's NCCL engine's lifecycle (a layerwise reload between start and finish) with ebft's guarded group."""

    init_info_cls = TimedInitInfo
    update_info_cls = RoundUpdateInfo
    backend: str
    serves_adapters = False
    group: TransferGroup | None = None
    received_adapters: dict[str, torch.Tensor] | None = None
    """A served-adapter round's tensors, until the rollout actor registers them."""

    def init_transfer_engine(self, init_info: TimedInitInfo) -> None:
        self.shutdown()
        self.serves_adapters = init_info.serves_adapters
        self.packed_buffer_size_bytes = init_info.packed_buffer_size_bytes
        rank = group_rank(self.parallel_config, init_info.rank_offset)
        self.group = open_transfer_group(
            self.backend,
            init_info.master_address,
            init_info.master_port,
            rank,
            init_info.world_size,
            self.device,
            init_info.timeout_s,
        )

    def start_weight_update(self) -> None:
        if not self.serves_adapters:  # a layerwise reload of the weights
            super().start_weight_update()

    def update_weights(self, update_info: dict) -> None:
        # Not the base class's: it ends with torch.accelerator.synchronize(), which raises on a CPU-only machine,
        # and this engine's broadcasts are complete when received.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: RoundUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("the weight transfer is not initialized: call init_weight_transfer_engine first")
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        group, buffer_bytes = self.group, self.packed_buffer_size_bytes
        with group.guard_round(update_info.round_index):  # a round declared failed already ends it at once
            metadata = [
                (name, shape, getattr(torch, dtype))
                for name, dtype, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes)
            ]
            group.announce_entered(update_info.round_index)
            with disable_mtp_completeness_check():
                self.receive_round(
                    self.model,
                    update_info,
                    lambda load: receive_packed(metadata, group, buffer_bytes, self.device, load),
                )

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

    def finish_weight_update(self) -> None:
        if not self.serves_adapters:
            super().finish_weight_update()
            refresh_tied_lm_head(self.model, self.model_config)

    def shutdown(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            group.close()


class EbftNcclWeightTransferEngine(RoundEngine):
    backend = "nccl"


class GlooWeightTransferEngine(RoundEngine):
    backend = "gloo"


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
