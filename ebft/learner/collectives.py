"""Step metrics reduced over the learner ranks (every rank calls each of these together)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class RankReduce:
    def __init__(self, world_size: int, device: torch.device):
        self.world_size, self.device = world_size, device

    def _all_reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world_size == 1:
            return values
        values = values.to(self.device)
        dist.all_reduce(values, op=op)
        return values.cpu()

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        names = list(metrics)
        totals = self._all_reduce(torch.tensor([metrics[n] for n in names], dtype=torch.float64)) / self.world_size
        return dict(zip(names, totals.tolist()))

    def std(self, values: torch.Tensor) -> float:
        """Sample standard deviation of all ranks' values together."""
        v = values.double().flatten()
        count, total, squares = self._all_reduce(
            torch.stack([v.new_tensor(v.numel()), v.sum(), v.square().sum()])
        ).tolist()
        mean = total / count
        return math.sqrt(max(squares / count - mean * mean, 0.0) * count / max(count - 1, 1))

    def max(self, value: float) -> float:
        return float(self._all_reduce(torch.tensor([value], dtype=torch.float64), op=dist.ReduceOp.MAX))

    def sum(self, value: float) -> float:
        return float(self._all_reduce(torch.tensor([value], dtype=torch.float64)))
