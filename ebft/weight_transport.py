"""Moving new policy weights from the learner into the rollout engines, behind one interface.

Two transports, chosen by `rollout.weight_transport` (`auto`: NCCL when the pools have GPUs):

- object store (CPU, or any cluster without a shared GPU fabric): the learner serializes its state
  dict to safetensors bytes (`state_dict_to_update` -> `WeightUpdate`); the controller hands that
  message (or its Ray ObjectRef) to every rollout actor, which loads it inside its vLLM worker through
  `WeightReceiverExtension` (the worker's own reload path, then the CPU tied-embedding fix).
- NCCL (GPUs): vLLM's native weight transfer. `NcclWeightSender` lives in the learner process, opens
  rank 0 of a group with every rollout engine and broadcasts tensors; each rollout actor receives them
  with `receive_weight_broadcast` (pause, start, update, finish with the version, resume).

Both are versioned: an engine's version changes only when a complete update has been applied, and
versions only move forward. This module imports neither the rollout actors nor the learner; both
sides import it.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ebft.messages import WeightUpdate

OBJECT_STORE = "object_store"
NCCL = "nccl"

# The dotted path vLLM imports inside each engine worker (LLM(worker_extension_cls=...)).
WORKER_EXTENSION = f"{__name__}.WeightReceiverExtension"


def choose_transport(config) -> str:
    """Resolve `rollout.weight_transport`; `auto` is NCCL only when both learner and rollout pools have GPUs."""
    choice = config.rollout.weight_transport
    if choice != "auto":
        return choice
    resources = config.resources
    on_gpus = resources.rollout.gpus_per_actor > 0 and resources.learner.gpus_per_actor > 0
    return NCCL if on_gpus else OBJECT_STORE


# ----------------------------------------------------------------------------- object-store transport


def state_dict_to_update(state_dict: Mapping[str, torch.Tensor], version: int) -> WeightUpdate:
    """Serialize HF-named weights into a `WeightUpdate` (safetensors bytes, dtypes kept).

    Tensors that share storage (tied input/output embeddings) are sent once, under the first name:
    safetensors refuses aliases, and vLLM's tied models load the embedding and ignore `lm_head`.
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        alias_key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if alias_key in seen:
            continue
        seen.add(alias_key)
        tensors[name] = tensor.to("cpu").contiguous()
    return WeightUpdate(version=version, safetensors=save(tensors))


class WeightReceiverExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); runs inside the engine's worker.

    `collective_rpc` msgpack-encodes its arguments when the engine runs in another process, so the
    weights travel as safetensors bytes, never as tensors.
    """

    def ebft_load_safetensors(self, blob: bytes) -> int:
        """Load HF-named weights into the running model in place; returns how many tensors were loaded."""
        from safetensors.torch import load

        weights = load(blob if isinstance(blob, bytes) else bytes(blob))
        # A second model.load_weights() breaks on CPU (linear weights are repacked after loading);
        # the worker's reload path re-runs that post-load processing.
        tied = bool(getattr(self.model_runner.model_config.hf_text_config, "tie_word_embeddings", False))
        with _quiet_expected_reload_warnings(tied):
            self.reload_weights(weights_iterator=iter(weights.items()))
        self._refresh_tied_lm_head()
        return len(weights)

    def _refresh_tied_lm_head(self) -> None:
        from vllm.platforms import current_platform

        hf_config = self.model_runner.model_config.hf_text_config
        if not (current_platform.is_cpu() and getattr(hf_config, "tie_word_embeddings", False)):
            return
        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        if lm_head is None:
            return
        # On CPU the LM head keeps a packed copy of the (tied) embedding made at load time; a reload
        # of the embedding leaves it stale until it is packed again.
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)


class _ExpectedReloadWarnings(logging.Filter):
    """vLLM's reload warns "<layer>: Failed to load weights" for layers a checkpoint has no tensors
    for: the rotary embedding (its cache is computed, not loaded) and, in a tied model, the LM head
    (refreshed from the embedding by `_refresh_tied_lm_head`). Those are expected; others still show."""

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


def load_update_into_engine(llm, update: WeightUpdate) -> None:
    """Receiver side of the object-store transport, on the actor: paused, loaded, cache cleared, resumed."""
    with paused_engine(llm):
        llm.collective_rpc("ebft_load_safetensors", args=(update.safetensors,))
        llm.llm_engine.set_weight_version(str(update.version))
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


# ----------------------------------------------------------------------------- NCCL transport (GPUs)


def nccl_update_info(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> dict[str, list]:
    """vLLM's `NCCLWeightTransferUpdateInfo` as a plain dict: what the receivers allocate before a broadcast."""
    return {
        "names": [name for name, _ in named_tensors],
        "dtype_names": [str(tensor.dtype).removeprefix("torch.") for _, tensor in named_tensors],
        "shapes": [list(tensor.shape) for _, tensor in named_tensors],
    }


def receive_weight_broadcast(llm, update_info: dict[str, list], version: int) -> None:
    """Receiver side of the NCCL transport, on the actor; blocks until the sender's broadcast completes."""
    with paused_engine(llm):
        llm.start_weight_update()
        llm.update_weights({"update_info": update_info})
        llm.finish_weight_update(weight_version=str(version))
        clear_prefix_cache(llm)


class WeightSender(ABC):
    """Learner side: push weights of one version to every rollout actor and wait until all apply it."""

    def __init__(self, receivers: Sequence[Any], wait: Callable[[list], list] | None = None) -> None:
        self.receivers = list(receivers)
        self._wait = wait
        self.version: int | None = None

    def wait(self, futures: list) -> list:
        if self._wait is not None:
            return self._wait(futures)
        import ray

        return ray.get(futures)

    def _check_version(self, version: int) -> None:
        if self.version is not None and version <= self.version:
            raise ValueError(f"weight version {version} does not move forward from {self.version}")

    def _check_applied(self, reported: list[int], version: int) -> int:
        if any(v != version for v in reported):
            raise RuntimeError(f"rollout actors report versions {reported} after sending version {version}")
        self.version = version
        return version

    def connect(self) -> None:
        """One-time handshake with the receivers (nothing for the object store)."""

    @abstractmethod
    def send(self, weights: Mapping[str, torch.Tensor], version: int) -> int:
        """Deliver `weights` as `version` to every receiver; returns the version all of them now report."""

    def close(self) -> None:
        pass


class ObjectStoreWeightSender(WeightSender):
    """safetensors bytes put once in the Ray object store; every actor loads the same object."""

    def send(self, weights: Mapping[str, torch.Tensor], version: int) -> int:
        import ray

        self._check_version(version)
        reference = ray.put(state_dict_to_update(weights, version))
        reported = self.wait([receiver.update_weights.remote(reference) for receiver in self.receivers])
        return self._check_applied(reported, version)


class NcclWeightSender(WeightSender):
    """vLLM's native NCCL weight transfer, driven from the learner's rank 0 to N rollout engines.

    vLLM's own trainer-side engine gives every receiver rank_offset 1, which is right for one engine
    (however many GPUs it spans) but collides for several independent engines; here each engine gets
    its own block of ranks after the sender's rank 0.

    `open_group(master_address, master_port, world_size)` and the group's `broadcast` are injectable so
    the bookkeeping can be tested without GPUs.
    """

    def __init__(
        self,
        receivers: Sequence[Any],
        *,
        master_address: str,
        master_port: int,
        packed: bool = True,
        wait: Callable[[list], list] | None = None,
        open_group: Callable[[str, int, int], Any] | None = None,
    ) -> None:
        super().__init__(receivers, wait)
        self.master_address = master_address
        self.master_port = master_port
        self.packed = packed
        self._open_group = open_group or _open_vllm_trainer_group
        self.group = None
        self.rank_offsets: list[int] = []
        self.world_size = 0

    def connect(self) -> None:
        sizes = self.wait([receiver.weight_transfer_world_size.remote() for receiver in self.receivers])
        self.rank_offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        self.world_size = 1 + sum(sizes)
        infos = [
            {
                "master_address": self.master_address,
                "master_port": self.master_port,
                "rank_offset": offset,
                "world_size": self.world_size,
                "packed": self.packed,
            }
            for offset in self.rank_offsets
        ]
        # The receivers block in the rendezvous until rank 0 joins: start them first.
        futures = [receiver.init_weight_transfer.remote(info) for receiver, info in zip(self.receivers, infos)]
        self.group = self._open_group(self.master_address, self.master_port, self.world_size)
        self.wait(futures)

    def send(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        if self.group is None:
            raise RuntimeError("call connect() before send(): the NCCL group is not open")
        self._check_version(version)
        named = list(weights.items() if isinstance(weights, Mapping) else weights)
        info = nccl_update_info(named)
        # Receivers must be inside update_weights while rank 0 broadcasts (both rendezvous in NCCL).
        futures = [receiver.receive_weight_broadcast.remote(info, version) for receiver in self.receivers]
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            reported = pool.submit(self.wait, futures)
            self._broadcast(named)
            return self._check_applied(reported.result(), version)
        finally:
            # If the broadcast failed, the receivers stay blocked in NCCL: joining would hang.
            pool.shutdown(wait=False)

    def _broadcast(self, named: list[tuple[str, torch.Tensor]]) -> None:
        if self.packed:
            from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

            packed_nccl_broadcast_producer(
                iterator=iter(named), group=self.group, src=0, post_iter_func=lambda item: item[1]
            )
        else:
            stream = torch.cuda.current_stream() if torch.cuda.is_available() else None
            for _, tensor in named:
                self.group.broadcast(tensor.contiguous(), src=0, stream=stream)
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        if self.group is not None and hasattr(self.group, "destroy"):
            self.group.destroy()
        self.group = None


def _open_vllm_trainer_group(master_address: str, master_port: int, world_size: int):
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    return trainer_init(
        {"master_address": master_address, "master_port": master_port, "world_size": world_size}, rank=0
    )


def make_weight_sender(config, receivers: Sequence[Any], **nccl_options) -> WeightSender:
    """The sender for this run's transport; NCCL needs `master_address=` and `master_port=`."""
    if choose_transport(config) == NCCL:
        return NcclWeightSender(receivers, **nccl_options)
    return ObjectStoreWeightSender(receivers)
