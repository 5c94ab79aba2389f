"""Object-store transport: the weights' bytes, put once in the Ray object store; every
rollout actor loads the same object (ebft/actors/weight_receiver.py `load_update_into_engine`).

A Ray actor runs one call at a time, so an actor busy generating loads the update when that batch is
done: a batch is always sampled by one weight version, and the push itself does not wait for it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ebft.learner.weight_sender import WeightSender, WeightStream, state_dict_to_update


class ObjectStoreWeightSender(WeightSender):
    def _send(self, weights: Mapping[str, torch.Tensor] | WeightStream, version: int) -> list:
        import ray

        state = dict(weights.tensors) if isinstance(weights, WeightStream) else weights
        update = ray.put(state_dict_to_update(state, version))
        return [receiver.update_weights.remote(update, self.learner) for receiver in self.receivers]
