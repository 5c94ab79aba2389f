"""The learner's weights streamed one module at a time (iter_state_dict): the HF state dict, exactly, without
more than one module's parameters gathered or copied at once under ZeRO-3."""

from __future__ import annotations

import weakref

import pytest
import torch
from learner_reference import make_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM

from ebft.learner.engine import LearnerRank
from ebft.learner.state_dict import gather_state_dict, iter_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zero3_learner(tiny_tied_model_dir):
    learner = LearnerRank(make_config(learner={"zero_stage": 3}), tiny_tied_model_dir)
    yield learner
    learner.close()


def hf_state_dict(model_dir) -> dict[str, torch.Tensor]:
    """The folder's weights as transformers loads them, the tied lm_head dropped as in HF checkpoints."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def assert_stream_equals(stream, expected: dict[str, torch.Tensor]) -> None:
    names = []
    for name, tensor in stream:
        names.append(name)
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    assert names == list(expected)


def streamed(learner):
    """The learner's weight stream, its announced metadata checked against what it then yields."""
    stream = learner.stream_weights("cpu")
    pairs = list(stream.tensors)
    assert stream.metadata == [(name, list(t.shape), t.dtype) for name, t in pairs]
    return pairs


def test_zero3_stream_is_the_hf_state_dict(zero3_learner, tiny_tied_model_dir):
    assert_stream_equals(streamed(zero3_learner), hf_state_dict(tiny_tied_model_dir))
    assert_stream_equals(zero3_learner.full_state_dict().items(), hf_state_dict(tiny_tied_model_dir))


class FreshTensors(TorchDispatchMode):
    """Weak references to the tensors ops allocate (storage shared with no input) while the mode is on."""

    def __init__(self):
        super().__init__()
        self.made: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.made.append(weakref.ref(t))
        return out

    def alive_elements(self, but: torch.Tensor) -> int:
        alive = {t.untyped_storage().data_ptr(): t for ref in self.made if (t := ref()) is not None and t is not but}
        return sum(t.untyped_storage().nbytes() // t.element_size() for t in alive.values())


def peak_held_copies(make_stream) -> tuple[int, int]:
    """(most elements the stream's allocations hold besides the tensor just yielded, elements yielded), for a
    consumer that drops each tensor at once."""
    peak = total = 0
    with FreshTensors() as tracker:
        for _, tensor in make_stream():
            peak = max(peak, tracker.alive_elements(but=tensor))
            total += tensor.numel()
            del tensor
    return peak, total


def test_zero3_stream_gathers_and_copies_one_module_at_a_time(zero3_learner, monkeypatch):
    import deepspeed

    module = zero3_learner.engine.module
    groups = {frozenset(id(p) for p in sub.parameters(recurse=False)) for sub in module.modules()}
    largest_module = max(sum(p.ds_numel for p in sub.parameters(recurse=False)) for sub in module.modules())
    gathered: list[tuple[frozenset, int]] = []
    gathered_parameters = deepspeed.zero.GatheredParameters

    def recording(params, *args, **kwargs):
        gathered.append((frozenset(id(p) for p in params), sum(p.ds_numel for p in params)))
        return gathered_parameters(params, *args, **kwargs)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", recording)
    peak, total = peak_held_copies(lambda: zero3_learner.stream_weights("cpu").tensors)
    # Each gather is one module's own parameters (an MLP projection, the embedding), never the whole model.
    assert all(ids in groups for ids, _ in gathered)
    assert max(size for _, size in gathered) == largest_module < total // 4
    # Copies die with the consumer's reference: the stream never holds more than one module's (a dict of all:
    # `iter(gather_state_dict(...).items())` holds the whole model minus one tensor).
    assert peak <= largest_module

    per_rank_0 = len(gathered)
    assert list(iter_state_dict(module, zero3=True, rank=1, device="cpu")) == []  # gathers, yields nothing
    assert len(gathered) == 2 * per_rank_0


def test_zero2_stream_is_the_hf_state_dict(tiny_model_dir):
    learner = LearnerRank(make_config(learner={"zero_stage": 2}), tiny_model_dir)
    try:
        expected = hf_state_dict(tiny_model_dir)
        assert "lm_head.weight" in expected
        assert_stream_equals(streamed(learner), expected)
        assert_stream_equals(learner.full_state_dict().items(), expected)
        assert gather_state_dict(learner.engine.module, zero3=False, rank=1, device="cpu") is None
    finally:
        learner.close()
