"""NCCL transport (GPUs): vLLM's native weight transfer, driven from the learner's rank 0 to N rollout engines.

vLLM's own trainer-side engine gives every receiver rank_offset 1, which is right for one engine
(however many GPUs it spans) but collides for several independent engines; here each engine gets its
own block of ranks after the sender's rank 0. The receivers take part through
ebft/actors/weight_receiver.py `receive_weight_broadcast`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ebft.learner.weight_sender import WeightSender, ray_get


def nccl_update_info(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> dict[str, list]:
    """vLLM's `NCCLWeightTransferUpdateInfo` as a plain dict: what the receivers allocate before a broadcast."""
    return {
        "names": [name for name, _ in named_tensors],
        "dtype_names": [str(tensor.dtype).removeprefix("torch.") for _, tensor in named_tensors],
        "shapes": [list(tensor.shape) for _, tensor in named_tensors],
    }


class NcclWeightSender(WeightSender):
    """`open_group(master_address, master_port, world_size)` and the group's `broadcast` are injectable so
    the bookkeeping can be tested without GPUs."""

    def __init__(
        self,
        receivers: Sequence[Any],
        *,
        master_address: str,
        master_port: int,
        packed: bool = True,
        wait: Callable[[list], list] = ray_get,
        open_group: Callable[[str, int, int], Any] | None = None,
    ) -> None:
        super().__init__(receivers)
        self.wait = wait
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

    def _send(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int) -> list:
        if self.group is None:
            raise RuntimeError("call connect() before send(): the NCCL group is not open")
        named = list(weights.items() if isinstance(weights, Mapping) else weights)
        info = nccl_update_info(named)
        # Receivers must be inside update_weights while rank 0 broadcasts (both rendezvous in NCCL).
        acknowledgments = [receiver.receive_weight_broadcast.remote(info, version) for receiver in self.receivers]
        self._broadcast(named)
        return acknowledgments

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
