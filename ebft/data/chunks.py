"""Training data: tokenize the sources' examples, pack them into fixed T-token chunks, stream them.

Packing follows the authors' code: each example is tokenized without special tokens (question and
answer separately, then concatenated, no chat template), an EOS follows every example, and the token
stream is cut into chunks of T = data.chunk_length tokens; the trailing partial chunk is dropped.
Sources, the held-out split and the bad-row report live in `ebft.data.sources`.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from ebft.config import DataConfig, SourceConfig
from ebft.data.sources import (  # noqa: F401  (re-exported: the data API in one place)
    DataError,
    DataReport,
    Example,
    is_heldout,
    python_stdlib_files,
    read_source,
)
from ebft.messages import ChunkBatch

logger = logging.getLogger(__name__)

TOKENIZE_BATCH = 256


@dataclass
class PackedChunks:
    """Fixed-length chunks of a packed token stream, with per-token annotations."""

    tokens: np.ndarray
    """[N, T] int32 token ids."""
    doc_ids: np.ndarray
    """[N, T] int32 index of the example each token belongs to (an example's trailing EOS included)."""

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def chunk_length(self) -> int:
        return self.tokens.shape[1]

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.tokens).tobytes()).hexdigest()[:16]


def pack_documents(documents: Sequence[Sequence[int]], eos_token_id: int, chunk_length: int) -> PackedChunks:
    """Concatenate `doc + [EOS]` for every document and cut into chunks of `chunk_length` (tail dropped)."""
    lengths = np.fromiter((len(doc) + 1 for doc in documents), dtype=np.int64, count=len(documents))
    total = int(lengths.sum())
    stream = np.empty(total, dtype=np.int32)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for doc, start, end in zip(documents, starts, ends):
        stream[start : end - 1] = doc
    stream[ends - 1] = eos_token_id
    doc_ids = np.repeat(np.arange(len(documents), dtype=np.int32), lengths)
    usable = total // chunk_length * chunk_length
    shape = (total // chunk_length, chunk_length)
    return PackedChunks(stream[:usable].reshape(shape), doc_ids[:usable].reshape(shape))


def tokenize_examples(
    examples: Sequence[Example], tokenizer, *, progress: bool = False, description: str = "tokenizing"
) -> list[list[int]]:
    """Batch-tokenize (no special tokens): per example its text's ids, followed by its answer's if it has one
    (question and answer tokenized separately, as the authors do)."""
    documents: list[list[int]] = []

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]

    batches = range(0, len(examples), TOKENIZE_BATCH)
    for offset in _progress(batches, progress and len(examples) > TOKENIZE_BATCH, description):
        batch = examples[offset : offset + TOKENIZE_BATCH]
        texts = encode([e.text for e in batch])
        answered = [i for i, e in enumerate(batch) if e.answer is not None]
        answers = dict(zip(answered, encode([batch[i].answer for i in answered]))) if answered else {}
        documents.extend(list(ids) + list(answers.get(i, ())) for i, ids in enumerate(texts))
    return documents


def _progress(items: Sequence, enabled: bool, description: str) -> Iterable:
    if not enabled:
        return items
    from rich.console import Console
    from rich.progress import track

    return track(items, description=description, console=Console(file=sys.stderr), transient=True)


# ----------------------------------------------------------------------------- streaming


class ChunkStream:
    """Chunks in a seeded order, reshuffled every epoch, resumable from a small state.

    A chunk's id is its position in the stream, `epoch * num_chunks + position`; `chunk_index(id)`
    maps it back to the packed chunk it stands for.
    """

    def __init__(self, chunks: PackedChunks, *, seed: int = 0, shuffle: bool = True):
        if len(chunks) == 0:
            raise DataError("the training data holds no chunk; add data or lower data.chunk_length")
        self.chunks = chunks
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self.batches_served = 0
        self._orders: dict[int, np.ndarray] = {}

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def order(self, epoch: int) -> np.ndarray:
        """The chunk order of one epoch (identity without shuffling)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            n = self.num_chunks
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = rng.permutation(n) if self.shuffle else np.arange(n)
        return self._orders[epoch]

    def chunk_index(self, chunk_id: int) -> int:
        epoch, position = divmod(chunk_id, self.num_chunks)
        return int(self.order(epoch)[position])

    def next_ids(self, count: int) -> list[int]:
        ids = []
        for _ in range(count):
            ids.append(self.epoch * self.num_chunks + self.position)
            self.position += 1
            if self.position == self.num_chunks:
                self.epoch, self.position = self.epoch + 1, 0
        return ids

    def next_batch(self, num_docs: int, step: int | None = None) -> ChunkBatch:
        """The next `num_docs` chunks; `step` defaults to the number of batches served before."""
        ids = self.next_ids(num_docs)
        step = self.batches_served if step is None else step
        self.batches_served += 1
        return ChunkBatch(chunk_ids=ids, tokens=self.tokens(ids), step=step)

    def _indices(self, chunk_ids: Sequence[int]) -> np.ndarray:
        return np.array([self.chunk_index(i) for i in chunk_ids], dtype=np.int64)

    def tokens(self, chunk_ids: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(self.chunks.tokens[self._indices(chunk_ids)].astype(np.int64))

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
            "batches_served": self.batches_served,
            "num_chunks": self.num_chunks,
            "fingerprint": self.chunks.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the saved stream stopped; refuses a stream over different data."""
        if state["num_chunks"] != self.num_chunks or state["fingerprint"] != self.chunks.fingerprint:
            raise DataError(
                f"the data changed since this state was saved ({state['num_chunks']} chunks, fingerprint "
                f"{state['fingerprint']}; now {self.num_chunks} chunks, {self.chunks.fingerprint}); resume with "
                f"the same data sources, tokenizer and data.chunk_length, or start a new run"
            )
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.batches_served = int(state["batches_served"])
        self._orders.clear()


# ----------------------------------------------------------------------------- putting it together


@dataclass
class PreparedData:
    train: PackedChunks
    heldout: PackedChunks
    report: DataReport
    verifiable: dict[str, list[Example]] = field(default_factory=dict)
    """{"train": [...], "heldout": [...]}: the examples with tests or references (training.method = rlvr)."""

    def stream(self, *, seed: int = 0, shuffle: bool = True) -> ChunkStream:
        return ChunkStream(self.train, seed=seed, shuffle=shuffle)

    def heldout_batch(
        self, max_chunks: int | None = None, *, seed: int = 0, step: int = 0
    ) -> tuple[ChunkBatch, list[int]]:
        """`max_chunks` held-out chunks (all: None) chosen by `seed`, spread over as many examples (source
        files) as possible: one chunk of each example in a seeded order, then a second of each, and so on.

        Returns the chunks (ids are positions in the held-out set, ascending) and the example each
        chunk starts in: the unit a paired bootstrap resamples (ebft.evaluation.stats)."""
        if len(self.heldout) == 0:
            raise DataError(
                "no held-out chunk: raise data.heldout_fraction or add data (held-out examples are "
                f"packed separately into chunks of {self.train.chunk_length} tokens)"
            )
        examples = self.heldout.doc_ids[:, 0]
        count = len(self.heldout) if max_chunks is None else min(max_chunks, len(self.heldout))
        chosen = sorted(spread_over_groups(examples, count, seed))
        tokens = torch.from_numpy(self.heldout.tokens[chosen].astype(np.int64))
        return ChunkBatch(chunk_ids=chosen, tokens=tokens, step=step), [int(examples[i]) for i in chosen]


def spread_over_groups(groups: np.ndarray, count: int, seed: int) -> list[int]:
    """Indices of `count` items, taken round-robin over the groups (groups and members in seeded orders)."""
    rng = np.random.default_rng(seed)
    members: dict[int, list[int]] = {}
    for index in rng.permutation(len(groups)).tolist():
        members.setdefault(int(groups[index]), []).append(index)
    queues = [members[g] for g in rng.permutation(sorted(members)).tolist()]
    chosen: list[int] = []
    while len(chosen) < count:
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    return chosen


def _source_labels(sources: Sequence[SourceConfig]) -> list[str]:
    seen: Counter = Counter()
    labels = []
    for source in sources:
        seen[source.path] += 1
        labels.append(source.path if seen[source.path] == 1 else f"{source.path} (#{seen[source.path]})")
    return labels


def prepare_data(config: DataConfig, tokenizer, *, progress: bool = True) -> PreparedData:
    """Read every source, split by example key, tokenize and pack train and held-out chunks."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, which separates packed examples; use a tokenizer with one")
    report = DataReport(chunk_length=config.chunk_length)
    train: list[Example] = []
    heldout: list[Example] = []
    for source, label in zip(config.sources, _source_labels(config.sources)):
        used = 0
        for example in read_source(source, label, report):
            if is_heldout(example.key, config.heldout_fraction):
                heldout.append(example)
                report.heldout[label] += 1
            else:
                train.append(example)
            used += 1
            if config.max_examples is not None and used >= config.max_examples:
                break
        report.usable[label] = used
        if used == 0:
            raise DataError(
                f"data source {label!r} yielded no usable example (rejected: {report.rejected_text(label)}); "
                f"check its path, format and text_key / question_key / answer_key"
            )

    packed = {}
    for split, examples in (("train", train), ("held-out", heldout)):
        documents = tokenize_examples(examples, tokenizer, progress=progress, description=f"tokenizing {split}")
        packed[split] = pack_documents(documents, tokenizer.eos_token_id, config.chunk_length)
        tokens = sum(len(d) + 1 for d in documents)
        if split == "train":
            report.train_tokens, report.train_chunks = tokens, len(packed[split])
        else:
            report.heldout_tokens, report.heldout_chunks = tokens, len(packed[split])
    logger.info(report.summary())
    if report.train_chunks == 0:
        raise DataError(
            f"the training split holds {report.train_tokens} tokens, less than one chunk of "
            f"data.chunk_length={config.chunk_length}; add data, lower data.chunk_length or data.heldout_fraction"
        )
    if config.heldout_fraction > 0 and report.heldout_chunks == 0:
        logger.warning(
            "data: the held-out split (%d tokens) fills no chunk; evaluation has no data", report.heldout_tokens
        )
    verifiable = {
        split: [example for example in examples if example.tests or example.references]
        for split, examples in (("train", train), ("heldout", heldout))
    }
    return PreparedData(packed["train"], packed["held-out"], report, verifiable)
