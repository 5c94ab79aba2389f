"""training.ema: an exponential moving average of the policy's trainable weights, kept on the learner ranks.

After every optimizer step, average = decay * average + (1 - decay) * weights, in float32, starting from the
initial weights. It lives where the weights do: under ZeRO-3 each rank averages the partition of every parameter it
holds (`ds_tensor`), so it is sharded like the weights; otherwise rank 0, the rank that exports, averages the whole
parameters. With model.lora only the adapters train, so only they are averaged (the base is frozen).

The average never generates: the rollout engines and the held-out evaluations run the live policy, as in the
authors' OpenRLHF code. It is what a checkpoint saves under `ema/` (docs/method.md section 5).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PolicyAverage:
    def __init__(self, module: torch.nn.Module, decay: float, *, zero3: bool, rank: int):
        self.decay, self.zero3 = decay, zero3
        holds = zero3 or rank == 0
        self._params = [(n, p) for n, p in module.named_parameters() if p.requires_grad] if holds else []
        self.average = {name: self._local(p).detach().float().clone() for name, p in self._params}

    def _local(self, param: torch.Tensor) -> torch.Tensor:
        """What this rank holds of a parameter: its ZeRO-3 partition, or the parameter itself."""
        return param.ds_tensor if self.zero3 else param.data

    @torch.no_grad()
    def update(self) -> None:
        """Fold the weights of the step just taken into the average (call after each optimizer step)."""
        for name, param in self._params:
            self.average[name].mul_(self.decay).add_(self._local(param).float(), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's part of the average (empty on a rank that holds none), for a checkpoint."""
        return dict(self.average)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.average):
            missing, unexpected = sorted(set(self.average) - set(state)), sorted(set(state) - set(self.average))
            raise ValueError(
                f"the saved moving average does not fit this policy: missing {missing}, extra {unexpected}"
            )
        for name, tensor in state.items():
            if tensor.shape != self.average[name].shape:
                raise ValueError(
                    f"the saved moving average of {name} has shape {tuple(tensor.shape)}, not "
                    f"{tuple(self.average[name].shape)}"
                )
            self.average[name].copy_(tensor)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in place of the live weights while the block runs, so that anything that reads the policy
        (the state-dict export, with its ZeRO-3 gathers and LoRA merges) reads the average; the live weights are put
        back bit for bit afterwards. Collective under ZeRO-3 only as far as the block is."""
        with torch.no_grad():
            live = {name: self._local(p).clone() for name, p in self._params}
            for name, param in self._params:
                self._local(param).copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self._params:
                    self._local(param).copy_(live[name])
