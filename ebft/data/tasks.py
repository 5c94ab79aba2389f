"""Questions with what checks their answers (training.method = rlvr), streamed as chunks are.

The questions are the same rows the chunks of EBFT and SFT are made from (question_key, with tests_key or
references_key), split into train and held-out by the same hash, so the three methods train on the same
examples and are evaluated on the same held-out ones. A question is tokenized alone, without special tokens, as
in a chunk; one longer than rlvr.max_prompt_tokens is left out and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from ebft.data.chunks import ChunkStream, DataError, tokenize_examples
from ebft.data.sources import DataReport, Example
from ebft.messages import PromptBatch, VerifiableTask

logger = logging.getLogger(__name__)


@dataclass
class PromptSet:
    tasks: list[VerifiableTask]
    prompts: list[list[int]]

    def __len__(self) -> int:
        return len(self.tasks)

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the questions, their checks and their tokens: a resumed stream must see the same ones."""
        digest = hashlib.sha256()
        for task, prompt in zip(self.tasks, self.prompts):
            digest.update(json.dumps([task.question, task.tests, task.entry_point, task.references, prompt]).encode())
        return digest.hexdigest()[:16]


def prompt_set(examples: Sequence[Example], tokenizer, max_prompt_tokens: int, report: DataReport) -> PromptSet:
    """The examples' questions tokenized, those over max_prompt_tokens left out (counted in `report`)."""
    questions = [Example(e.key, e.text) for e in examples]  # the question alone: no answer appended
    tasks, prompts = [], []
    for example, ids in zip(examples, tokenize_examples(questions, tokenizer)):
        if len(ids) > max_prompt_tokens:
            report.reject("rlvr questions", "prompt_too_long")
            continue
        tasks.append(VerifiableTask(example.text, example.tests, example.entry_point, example.references))
        prompts.append(list(ids))
    return PromptSet(tasks, prompts)


class PromptStream(ChunkStream):
    """Questions in a seeded order, reshuffled every epoch, resumable: a ChunkStream over a PromptSet."""

    def __init__(self, questions: PromptSet, *, seed: int = 0, shuffle: bool = True):
        if len(questions) == 0:
            raise DataError(
                "training.method=rlvr found no training question with tests or references; check "
                "data.sources[].question_key and tests_key / references_key, or rlvr.max_prompt_tokens"
            )
        super().__init__(questions, seed=seed, shuffle=shuffle)

    def next_batch(self, num_docs: int, step: int | None = None) -> PromptBatch:
        ids = self.next_ids(num_docs)
        step = self.batches_served if step is None else step
        self.batches_served += 1
        indices = self._indices(ids).tolist()
        questions: PromptSet = self.chunks
        return PromptBatch(ids, [questions.prompts[i] for i in indices], [questions.tasks[i] for i in indices], step)


def prompt_stream(data, tokenizer, config) -> PromptStream:
    """The training questions of prepared data (ebft.data.chunks.PreparedData) as a stream."""
    questions = prompt_set(data.verifiable.get("train", []), tokenizer, config.rlvr.max_prompt_tokens, data.report)
    logger.info(
        "rlvr: %d training questions (%s rejected)", len(questions), data.report.rejected_text("rlvr questions")
    )
    return PromptStream(questions, seed=config.training.seed, shuffle=config.data.shuffle)
