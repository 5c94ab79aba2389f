"""Training data: read the configured sources, tokenize, pack into fixed T-token chunks, stream them.

Packing follows the authors' code: each example is tokenized without special tokens (question and
answer separately, then concatenated, no chat template), an EOS follows every example, and the token
stream is cut into chunks of T = data.chunk_length tokens; the trailing partial chunk is dropped.
The train/held-out split is per example (for the Python stdlib: per file) by a hash of the example's
stable key, so it does not depend on the machine, the seed or the order of sources.

Rows that cannot be used are counted per source and reason in a `DataReport`; nothing is dropped
without being counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import sysconfig
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ebft.config import ConfigError, DataConfig, SourceConfig
from ebft.messages import ChunkBatch

logger = logging.getLogger(__name__)

STDLIB_SOURCE = "python_stdlib"
HF_PREFIX = "hf:"
SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "text", ".py": "text", ".md": "text"}
SKIPPED_DIRS = {"__pycache__", "site-packages", "dist-packages"}
# Left out of the stdlib corpus: test suites hold deliberately broken or odd files and test data.
STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}
TOKENIZE_BATCH = 256


class DataError(ConfigError):
    """The configured data cannot produce training chunks (worded with the source and what to fix)."""


# ----------------------------------------------------------------------------- bookkeeping


@dataclass
class DataReport:
    """What each source contributed and what was rejected, by reason."""

    usable: Counter = field(default_factory=Counter)
    heldout: Counter = field(default_factory=Counter)
    rejected: defaultdict = field(default_factory=lambda: defaultdict(Counter))
    train_tokens: int = 0
    heldout_tokens: int = 0
    train_chunks: int = 0
    heldout_chunks: int = 0
    chunk_length: int = 0

    def reject(self, source: str, reason: str, count: int = 1) -> None:
        self.rejected[source][reason] += count

    def rejected_text(self, source: str) -> str:
        counts = self.rejected.get(source) or {}
        return ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items())) or "none"

    def summary(self) -> str:
        sources = "; ".join(
            f"{name}: {self.usable[name]} examples ({self.heldout[name]} held out), rejected: {self.rejected_text(name)}"
            for name in dict.fromkeys([*self.usable, *self.rejected])
        )
        return (
            f"data: {sources}. {self.train_tokens} train tokens -> {self.train_chunks} chunks, "
            f"{self.heldout_tokens} held-out tokens -> {self.heldout_chunks} chunks of {self.chunk_length} tokens"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "usable": dict(self.usable),
            "heldout": dict(self.heldout),
            "rejected": {name: dict(counts) for name, counts in self.rejected.items()},
            "train_chunks": self.train_chunks,
            "heldout_chunks": self.heldout_chunks,
        }


@dataclass
class Example:
    key: str
    """Stable identity inside its source (relative path, plus `:row` for tabular files); decides the split."""
    text: str
    """The whole text, or the question when `answer` is set."""
    answer: str | None = None


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic split: the key's SHA-256 read as a number in [0, 1)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# ----------------------------------------------------------------------------- reading sources


def _text_value(value: Any) -> tuple[str | None, str | None]:
    """(text, None) or (None, rejection reason) for one field of a row."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, "undecodable"
    if not isinstance(value, str):
        return None, "not_text"
    if not value.strip():
        return None, "empty_text"
    return value, None


def _row_to_example(key: str, row: Any, source: SourceConfig) -> tuple[Example | None, str | None]:
    if not isinstance(row, dict):
        return None, "not_an_object"
    fields = [source.question_key, source.answer_key] if source.question_key else [source.text_key]
    values = []
    for name in fields:
        if name not in row or row[name] is None:
            return None, "missing_key"
        value, reason = _text_value(row[name])
        if reason:
            return None, reason
        values.append(value)
    return Example(key, *values), None


def _jsonl_rows(path: Path, key_prefix: str) -> Iterator[tuple[str, Any, str | None]]:
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue  # blank lines (e.g. a final newline) are not rows
            key = f"{key_prefix}:{line_number}"
            try:
                yield key, json.loads(raw.decode("utf-8")), None
            except UnicodeDecodeError:
                yield key, None, "undecodable"
            except json.JSONDecodeError:
                yield key, None, "invalid_json"


def _parquet_rows(path: Path, key_prefix: str, columns: list[str]) -> Iterator[tuple[str, Any, str | None]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    present = [name for name in columns if name in parquet.schema_arrow.names]
    row_number = 0
    for batch in parquet.iter_batches(columns=present, batch_size=4096):
        for row in batch.to_pylist():
            yield f"{key_prefix}:{row_number}", row, None
            row_number += 1


def _file_examples(path: Path, key: str, file_format: str, source: SourceConfig, label: str, report: DataReport):
    """Examples of one file; rejected rows are counted in `report`. Unreadable files count once."""
    try:
        if file_format == "text":
            if source.question_key:
                report.reject(label, "missing_key")  # a plain text file has no question/answer fields
                return
            text, reason = _text_value(path.read_bytes())
            if reason:
                report.reject(label, reason)
            else:
                yield Example(key, text)
            return
        if file_format == "jsonl":
            rows = _jsonl_rows(path, key)
        else:
            columns = [source.question_key, source.answer_key] if source.question_key else [source.text_key]
            rows = _parquet_rows(path, key, columns)
        for row_key, row, reason in rows:
            example, reason = (None, reason) if reason else _row_to_example(row_key, row, source)
            if reason:
                report.reject(label, reason)
            else:
                yield example
    except OSError as error:
        logger.warning("%s: cannot read %s (%s)", label, path, error)
        report.reject(label, "unreadable_file")
    except Exception as error:  # a corrupt parquet file raises pyarrow's own errors
        logger.warning("%s: cannot read %s (%s: %s)", label, path, type(error).__name__, error)
        report.reject(label, "unreadable_file")


def _walk_files(root: Path, skipped_dirs: set[str], suffixes: Iterable[str] | None = None) -> list[Path]:
    """Files under root in a fixed (sorted) order, not descending into skipped or hidden folders."""
    found = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skipped_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and (suffixes is None or Path(name).suffix in suffixes):
                found.append(Path(folder) / name)
    return found


def python_stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_stdlib_files(include_tests: bool = False) -> list[tuple[str, Path]]:
    """(relative posix path, file) of the interpreter's own stdlib .py files, sorted, no site-packages."""
    root = python_stdlib_dir()
    skipped = SKIPPED_DIRS | (set() if include_tests else STDLIB_TEST_DIRS)
    return [(path.relative_to(root).as_posix(), path) for path in _walk_files(root, skipped, {".py"})]


def _local_path(source: SourceConfig) -> Path:
    path = Path(source.path).expanduser()
    if not path.exists():
        raise DataError(f"data source {source.path!r} does not exist; check data.sources[].path")
    return path


def _hf_examples(source: SourceConfig, label: str, report: DataReport) -> Iterator[Example]:
    import datasets

    name = source.path[len(HF_PREFIX):] if source.path.startswith(HF_PREFIX) else source.path
    try:
        local = Path(name).expanduser()
        saved_markers = ("dataset_info.json", "dataset_dict.json", "state.json")  # written by save_to_disk
        saved = local.is_dir() and any((local / marker).exists() for marker in saved_markers)
        dataset = datasets.load_from_disk(str(local)) if saved else datasets.load_dataset(name, split=source.split)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[source.split]
    except Exception as error:
        raise DataError(
            f"data source {source.path!r}: could not load the HF dataset (split {source.split!r}): "
            f"{type(error).__name__}: {error}. Without hub access, use a local dataset folder (hf:/path/to/dir) "
            f"or a .jsonl/.parquet file"
        ) from None
    for index, row in enumerate(dataset):
        example, reason = _row_to_example(f"{index}", row, source)
        if reason:
            report.reject(label, reason)
        else:
            yield example


def source_format(source: SourceConfig) -> str:
    """The reader for a source: explicit `format`, else from `path` (alias, `hf:` prefix, folder, suffix)."""
    if source.format != "auto":
        return source.format
    if source.path == STDLIB_SOURCE:
        return "python_stdlib"
    if source.path.startswith(HF_PREFIX):
        return "hf"
    path = _local_path(source)
    if path.is_dir():
        return "directory"
    if path.suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[path.suffix]
    raise DataError(
        f"data source {source.path!r}: cannot tell the format from the suffix {path.suffix!r}; set "
        f"format to one of jsonl, parquet, text (known suffixes: {', '.join(SUFFIX_FORMATS)})"
    )


def read_source(source: SourceConfig, label: str, report: DataReport) -> Iterator[Example]:
    """All examples of one source, in a deterministic order; rejections go to `report`."""
    if bool(source.question_key) != bool(source.answer_key):
        raise DataError(f"data source {source.path!r}: set both question_key and answer_key, or neither")
    kind = source_format(source)
    if kind == "hf":
        yield from _hf_examples(source, label, report)
        return
    if kind == "python_stdlib":
        files = [(key, path, "text") for key, path in python_stdlib_files()]
    else:
        root = _local_path(source)
        if root.is_dir():
            files = []
            for path in _walk_files(root, SKIPPED_DIRS):
                file_format = kind if kind != "directory" else SUFFIX_FORMATS.get(path.suffix)
                if file_format is None:
                    report.reject(label, "unsupported_file")
                else:
                    files.append((path.relative_to(root).as_posix(), path, file_format))
        else:
            files = [(root.name, root, kind)]
    for key, path, file_format in files:
        yield from _file_examples(path, key, file_format, source, label, report)


# ----------------------------------------------------------------------------- tokenizing and packing


@dataclass
class PackedChunks:
    """Fixed-length chunks of a packed token stream, with per-token annotations."""

    tokens: np.ndarray
    """[N, T] int32 token ids."""
    doc_ids: np.ndarray
    """[N, T] int32 index of the example each token belongs to (an example's trailing EOS included)."""
    answer_mask: np.ndarray
    """[N, T] bool: the token is part of an answer (question+answer sources; EOS excluded)."""

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def chunk_length(self) -> int:
        return self.tokens.shape[1]

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.tokens).tobytes()).hexdigest()[:16]


def pack_documents(
    documents: Sequence[Sequence[int]],
    eos_token_id: int,
    chunk_length: int,
    answer_starts: Sequence[int | None] | None = None,
) -> PackedChunks:
    """Concatenate `doc + [EOS]` for every document and cut into chunks of `chunk_length` (tail dropped).

    `answer_starts[i]` is the index inside document i where its answer begins (None: no answer).
    """
    lengths = np.fromiter((len(doc) + 1 for doc in documents), dtype=np.int64, count=len(documents))
    total = int(lengths.sum())
    stream = np.empty(total, dtype=np.int32)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for doc, start, end in zip(documents, starts, ends):
        stream[start : end - 1] = doc
    stream[ends - 1] = eos_token_id
    doc_ids = np.repeat(np.arange(len(documents), dtype=np.int32), lengths)
    answer = np.zeros(total + 1, dtype=np.int32)
    if answer_starts is not None:
        has_answer = np.array([s is not None for s in answer_starts], dtype=bool)
        begin = starts[has_answer] + np.array([s for s in answer_starts if s is not None], dtype=np.int64)
        np.add.at(answer, begin, 1)
        np.add.at(answer, (ends - 1)[has_answer], -1)  # the answer stops before the EOS
    answer_mask = np.cumsum(answer[:-1]) > 0
    usable = total // chunk_length * chunk_length
    shape = (total // chunk_length, chunk_length)
    return PackedChunks(stream[:usable].reshape(shape), doc_ids[:usable].reshape(shape), answer_mask[:usable].reshape(shape))


def tokenize_examples(
    examples: Sequence[Example], tokenizer, *, progress: bool = False, description: str = "tokenizing"
) -> tuple[list[list[int]], list[int | None]]:
    """Batch-tokenize (no special tokens). Returns per-example ids and the index where the answer starts."""
    documents: list[list[int]] = []
    answer_starts: list[int | None] = []

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]

    batches = range(0, len(examples), TOKENIZE_BATCH)
    for offset in _progress(batches, progress and len(examples) > TOKENIZE_BATCH, description):
        batch = examples[offset : offset + TOKENIZE_BATCH]
        texts = encode([e.text for e in batch])
        answered = [i for i, e in enumerate(batch) if e.answer is not None]
        answers = dict(zip(answered, encode([batch[i].answer for i in answered]))) if answered else {}
        for i, ids in enumerate(texts):
            if i in answers:
                documents.append(list(ids) + list(answers[i]))
                answer_starts.append(len(ids))
            else:
                documents.append(list(ids))
                answer_starts.append(None)
    return documents, answer_starts


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

    def doc_ids(self, chunk_ids: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(self.chunks.doc_ids[self._indices(chunk_ids)].astype(np.int64))

    def answer_mask(self, chunk_ids: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(self.chunks.answer_mask[self._indices(chunk_ids)])

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

    def stream(self, *, seed: int = 0, shuffle: bool = True) -> ChunkStream:
        return ChunkStream(self.train, seed=seed, shuffle=shuffle)

    def heldout_batch(self, max_chunks: int | None = None, step: int = 0) -> ChunkBatch:
        """The first `max_chunks` held-out chunks in fixed order; ids are positions in the held-out set."""
        if len(self.heldout) == 0:
            raise DataError(
                "no held-out chunk: raise data.heldout_fraction or add data (held-out examples are "
                f"packed separately into chunks of {self.train.chunk_length} tokens)"
            )
        count = len(self.heldout) if max_chunks is None else min(max_chunks, len(self.heldout))
        tokens = torch.from_numpy(self.heldout.tokens[:count].astype(np.int64))
        return ChunkBatch(chunk_ids=list(range(count)), tokens=tokens, step=step)


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
        documents, answer_starts = tokenize_examples(
            examples, tokenizer, progress=progress, description=f"tokenizing {split}"
        )
        packed[split] = pack_documents(documents, tokenizer.eos_token_id, config.chunk_length, answer_starts)
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
        logger.warning("data: the held-out split (%d tokens) fills no chunk; evaluation has no data", report.heldout_tokens)
    return PreparedData(packed["train"], packed["held-out"], report)


def prepare_run_data(config, *, progress: bool = True) -> PreparedData:
    """`prepare_data` for a full run `Config`, with the policy's tokenizer (the `smollm2` alias is resolved)."""
    from transformers import AutoTokenizer

    from ebft.models import resolve_model_path

    policy = resolve_model_path(config.model.policy)
    tokenizer = AutoTokenizer.from_pretrained(policy, trust_remote_code=config.model.trust_remote_code)
    return prepare_data(config.data, tokenizer, progress=progress)
