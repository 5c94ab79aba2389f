"""Reading data sources into examples: jsonl, parquet, text files and directories, HF datasets, and
the Python standard library's own sources. The train/held-out split is per example (for the stdlib:
per file) by a hash of the example's stable key, so it does not depend on the machine, the seed or
the order of sources. Rows that cannot be used are counted per source and reason in a `DataReport`;
nothing is dropped without being counted.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import os
import sysconfig
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebft.config import ConfigError, SourceConfig

logger = logging.getLogger(__name__)

STDLIB_SOURCE = "python_stdlib"
HF_PREFIX = "hf:"
SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".py": "text",
    ".md": "text",
}
SKIPPED_DIRS = {"__pycache__", "site-packages", "dist-packages"}
# Left out of the stdlib corpus: test suites hold deliberately broken or odd files and test data.
STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}


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
            f"{name}: {self.usable[name]} examples ({self.heldout[name]} held out), "
            f"rejected: {self.rejected_text(name)}"
            for name in dict.fromkeys([*self.usable, *self.rejected])
        )
        return (
            f"data: {sources}. {self.train_tokens} train tokens -> {self.train_chunks} chunks, "
            f"{self.heldout_tokens} held-out tokens -> {self.heldout_chunks} chunks of {self.chunk_length} tokens"
        )


@dataclass
class Example:
    key: str
    """Stable identity inside its source (relative path, plus `:row` for tabular files); decides the split."""
    text: str
    """The whole text, or the question when `answer` is set."""
    answer: str | None = None
    tests: tuple[str, ...] = ()
    entry_point: str | None = None
    references: tuple[str, ...] = ()


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
    checks = {}
    for name, field_name in (("tests", source.tests_key), ("references", source.references_key)):
        if field_name:
            pieces, reason = _text_list(row.get(field_name))
            if reason:
                return None, f"{name}_{reason}"
            checks[name] = pieces
    if source.entry_point_key:
        entry_point, reason = _text_value(row.get(source.entry_point_key))
        if reason:
            return None, f"entry_point_{reason}"
        checks["entry_point"] = entry_point
    return Example(key, *values, **checks), None


def _text_list(value: Any) -> tuple[tuple[str, ...], str | None]:
    """A field holding one text or a list of them (tests, references) -> (texts, None) or ((), reason). A text that
    is a list literal of texts (OpenCodeInstruct's `unit_tests`: "['assert f(1) == 2', ...]") is that list: run as
    one test, the literal would pass whatever the code does."""
    if value is None:
        return (), "missing"
    if isinstance(value, str) and value.lstrip().startswith("["):
        with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
            parsed = ast.literal_eval(value.strip())
            if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
                value = parsed
    items = [value] if isinstance(value, (str, bytes, bytearray)) else value
    if not isinstance(items, (list, tuple)) or not items:
        return (), "empty" if isinstance(items, (list, tuple)) else "not_text"
    texts = []
    for item in items:
        text, reason = _text_value(item)
        if reason:
            return (), reason
        texts.append(text)
    return tuple(texts), None


def source_columns(source: SourceConfig) -> list[str]:
    """The fields a source's rows are read from."""
    fields = [source.question_key, source.answer_key] if source.question_key else [source.text_key]
    return fields + [name for name in (source.tests_key, source.entry_point_key, source.references_key) if name]


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
    """Examples of one file; rejected rows are counted in `report`. An unreadable file counts once, and none of
    its rows are used (a file that fails halfway is not half used)."""
    try:
        examples, rejected = _read_file(path, key, file_format, source)
    except Exception as error:  # OSError, or pyarrow's own errors for a corrupt parquet file
        logger.warning("%s: cannot read %s (%s: %s)", label, path, type(error).__name__, error)
        report.reject(label, "unreadable_file")
        return
    for reason in rejected:
        report.reject(label, reason)
    yield from examples


def _read_file(path: Path, key: str, file_format: str, source: SourceConfig) -> tuple[list[Example], list[str]]:
    """A whole file's examples and the reasons its other rows were rejected."""
    if file_format == "text":
        if source.question_key:
            return [], ["missing_key"]  # a plain text file has no question/answer fields
        text, reason = _text_value(path.read_bytes())
        return ([], [reason]) if reason else ([Example(key, text)], [])
    if file_format == "jsonl":
        rows = _jsonl_rows(path, key)
    else:
        rows = _parquet_rows(path, key, source_columns(source))
    examples, rejected = [], []
    for row_key, row, reason in rows:
        example, reason = (None, reason) if reason else _row_to_example(row_key, row, source)
        if reason:
            rejected.append(reason)
        else:
            examples.append(example)
    return examples, rejected


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

    name = source.path[len(HF_PREFIX) :] if source.path.startswith(HF_PREFIX) else source.path
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
