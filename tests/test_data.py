"""Data pipeline: sources, packing against a plain-Python reference, split, shuffling, exact resume."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import smollm2_tokenizer

from ebft.config import DataConfig, SourceConfig
from ebft.data.chunks import (
    ChunkStream,
    DataError,
    is_heldout,
    pack_documents,
    prepare_data,
    python_stdlib_files,
)


@pytest.fixture(scope="session")
def tokenizer():
    return smollm2_tokenizer()


def reference_pack(documents, eos, chunk_length):
    """Independent packing: doc + EOS, one token at a time."""
    stream, doc_ids = [], []
    for index, doc in enumerate(documents):
        for token in doc:
            stream.append(token)
            doc_ids.append(index)
        stream.append(eos)
        doc_ids.append(index)
    count = len(stream) // chunk_length
    cut = lambda values: [values[k * chunk_length : (k + 1) * chunk_length] for k in range(count)]  # noqa: E731
    return cut(stream), cut(doc_ids)


def reference_qa_documents(rows, tokenizer):
    """question tokens + answer tokens, tokenized separately without special tokens, as in the authors' code."""
    documents = []
    for row in rows:
        question = tokenizer(row["q"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["a"], add_special_tokens=False)["input_ids"]
        documents.append(question + answer)
    return documents


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


QA_ROWS = [
    {"q": "Write a function that adds two numbers.\n", "a": "def add(a, b):\n    return a + b\n"},
    {"q": "Reverse a string.", "a": "def rev(s):\n    return s[::-1]"},
    {"q": "What is 2 + 2? ", "a": "4"},
    {"q": "Print hello.\n", "a": "print('hello')  # greeting ü\n"},
] * 3


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("chunk_length", [1, 5, 7, 16])
def test_pack_documents_matches_reference(chunk_length):
    rng = np.random.default_rng(chunk_length)
    documents = [rng.integers(3, 1000, size=rng.integers(0, 20)).tolist() for _ in range(30)]
    packed = pack_documents(documents, 2, chunk_length)
    tokens, doc_ids = reference_pack(documents, 2, chunk_length)
    assert packed.tokens.tolist() == tokens
    assert packed.doc_ids.tolist() == doc_ids


def test_pack_documents_exact_multiple_keeps_every_token():
    packed = pack_documents([[5, 6], [7]], eos_token_id=0, chunk_length=5)
    assert packed.tokens.tolist() == [[5, 6, 0, 7, 0]]


def test_question_answer_packing(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    config = DataConfig(
        sources=[SourceConfig(path=str(source), question_key="q", answer_key="a")],
        chunk_length=16,
        heldout_fraction=0.0,
    )
    data = prepare_data(config, tokenizer, progress=False)
    documents = reference_qa_documents(QA_ROWS, tokenizer)
    tokens, doc_ids = reference_pack(documents, tokenizer.eos_token_id, 16)
    assert data.train.tokens.tolist() == tokens
    assert data.train.doc_ids.tolist() == doc_ids
    flat_tokens, flat_docs = data.train.tokens.reshape(-1), data.train.doc_ids.reshape(-1)
    assert tokenizer.decode(flat_tokens[flat_docs == 0][:-1]) == QA_ROWS[0]["q"] + QA_ROWS[0]["a"]  # then EOS


def test_sources_concatenate_in_order_with_text_files(tmp_path, tokenizer):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    texts = {"b.txt": "second file\n", "a.md": "# first file\n", "sub/c.py": "print('third')\n", "sub/.hidden.txt": "x"}
    for name, text in texts.items():
        (folder / name).write_text(text)
    rows = [{"text": "from jsonl one"}, {"text": "from jsonl two"}]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = DataConfig(
        sources=[SourceConfig(path=str(folder)), SourceConfig(path=str(jsonl))], chunk_length=4, heldout_fraction=0.0
    )
    data = prepare_data(config, tokenizer, progress=False)
    in_order = [
        texts["a.md"],
        texts["b.txt"],
        texts["sub/c.py"],
        *(row["text"] for row in rows),
    ]  # sorted walk, hidden skipped
    documents = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in in_order]
    assert data.train.tokens.tolist() == reference_pack(documents, tokenizer.eos_token_id, 4)[0]
    assert data.report.usable == {str(folder): 3, str(jsonl): 2}


def test_parquet_and_hf_sources_read_the_same_rows(tmp_path, tokenizer, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    rows = [{"text": f"row number {i}: " + "word " * i, "other": i} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    (tmp_path / "hf_dir").mkdir()
    write_jsonl(tmp_path / "hf_dir" / "train.jsonl", rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    expected = reference_pack(
        [tokenizer(row["text"], add_special_tokens=False)["input_ids"] for row in rows], tokenizer.eos_token_id, 8
    )[0]
    for path in (str(tmp_path / "rows.parquet"), f"hf:{tmp_path / 'hf_dir'}", f"hf:{tmp_path / 'saved'}"):
        config = DataConfig(sources=[SourceConfig(path=path)], chunk_length=8, heldout_fraction=0.0)
        assert prepare_data(config, tokenizer, progress=False).train.tokens.tolist() == expected, path


def test_max_examples_caps_each_source(tmp_path, tokenizer):
    rows = [{"text": f"example {i}"} for i in range(10)]
    config = DataConfig(
        sources=[SourceConfig(path=str(write_jsonl(tmp_path / "r.jsonl", rows)))],
        chunk_length=2,
        heldout_fraction=0.0,
        max_examples=4,
    )
    data = prepare_data(config, tokenizer, progress=False)
    documents = [tokenizer(row["text"], add_special_tokens=False)["input_ids"] for row in rows[:4]]
    assert data.train.tokens.tolist() == reference_pack(documents, tokenizer.eos_token_id, 2)[0]


# ----------------------------------------------------------------------------- bad rows


def test_bad_rows_are_counted_by_reason_and_logged(tmp_path, tokenizer, caplog):
    lines = [
        json.dumps({"text": "a good row with enough words"}).encode(),
        json.dumps({"txt": "wrong key"}).encode(),
        json.dumps({"text": "   "}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": None}).encode(),
        b'{"text": "truncated',
        b'{"text": "bad byte \xff here"}',
        b"",
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"text": "another good row"}).encode(),
    ]
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "empty.txt").write_text("")
    (folder / "table.csv").write_text("a,b\n")
    (folder / "broken.parquet").write_bytes(b"not a parquet file")
    (folder / "dangling.txt").symlink_to(folder / "missing-target.txt")
    config = DataConfig(sources=[SourceConfig(path=str(folder))], chunk_length=4, heldout_fraction=0.0)
    with caplog.at_level(logging.INFO, logger="ebft.data"):
        data = prepare_data(config, tokenizer, progress=False)
    assert dict(data.report.rejected[str(folder)]) == {
        "missing_key": 2,  # wrong key, null value
        "empty_text": 2,  # blank text, empty file
        "not_text": 1,
        "invalid_json": 1,
        "undecodable": 2,  # bad byte in a row, latin-1 text file
        "not_an_object": 1,
        "unsupported_file": 1,
        "unreadable_file": 2,  # corrupt parquet, dangling link
    }
    assert data.report.usable[str(folder)] == 2
    assert any(str(folder) in r.message and "undecodable=2" in r.message for r in caplog.records)


def test_a_file_that_fails_halfway_is_not_half_used(tmp_path, tokenizer, monkeypatch):
    from ebft.data import sources

    def rows_then_a_read_error(path, key_prefix):
        yield f"{key_prefix}:0", {"text": "a good first row"}, None
        raise OSError("the disk went away")

    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "a row from another file"}])
    write_jsonl(tmp_path / "failing.jsonl", [{"text": "never read"}])
    real_rows = sources._jsonl_rows
    monkeypatch.setattr(
        sources,
        "_jsonl_rows",
        lambda path, key: (rows_then_a_read_error if "failing" in str(path) else real_rows)(path, key),
    )
    config = DataConfig(sources=[SourceConfig(path=str(tmp_path))], chunk_length=4, heldout_fraction=0.0)
    data = prepare_data(config, tokenizer, progress=False)
    assert dict(data.report.rejected[str(tmp_path)]) == {"unreadable_file": 1}
    assert data.report.usable[str(tmp_path)] == 1, f"only {good.name}'s row"


def test_source_without_usable_rows_names_source_and_reasons(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "bad.jsonl", [{"title": "x"}, {"title": "y"}, {"text": ""}])
    config = DataConfig(sources=[SourceConfig(path=str(source))], chunk_length=4)
    with pytest.raises(DataError, match=r"bad\.jsonl.*empty_text=1, missing_key=2"):
        prepare_data(config, tokenizer, progress=False)


def test_missing_path_and_half_qa_keys_are_config_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(DataConfig(sources=[SourceConfig(path=str(tmp_path / "nope.jsonl"))]), tokenizer, progress=False)
    source = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    with pytest.raises(DataError, match="both question_key and answer_key"):
        prepare_data(DataConfig(sources=[SourceConfig(path=str(source), question_key="q")]), tokenizer, progress=False)


def test_too_little_data_for_one_chunk_says_so(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "short"}])
    with pytest.raises(DataError, match="less than one chunk of data.chunk_length=1024"):
        prepare_data(
            DataConfig(sources=[SourceConfig(path=str(source))], heldout_fraction=0.0), tokenizer, progress=False
        )


# ----------------------------------------------------------------------------- held-out split


def test_heldout_split_is_by_document_and_disjoint(tmp_path, tokenizer):
    folder = tmp_path / "docs"
    folder.mkdir()
    markers = {f"doc{i:02d}.txt": f"marker{i:02d}" for i in range(40)}
    for name, marker in markers.items():
        (folder / name).write_text(f"{marker} " * 6)
    config = DataConfig(sources=[SourceConfig(path=str(folder))], chunk_length=4, heldout_fraction=0.3)
    data = prepare_data(config, tokenizer, progress=False)
    expected_heldout = {m for name, m in markers.items() if is_heldout(name, 0.3)}
    assert 0 < len(expected_heldout) < len(markers)
    heldout_text = tokenizer.decode(data.heldout.tokens.reshape(-1))
    train_text = tokenizer.decode(data.train.tokens.reshape(-1))
    for marker in markers.values():
        assert (marker in heldout_text) == (marker in expected_heldout), marker
        assert (marker in train_text) == (marker not in expected_heldout), marker
    assert data.report.heldout[str(folder)] == len(expected_heldout)


def test_python_stdlib_listing_and_split_are_stable_across_processes():
    files = python_stdlib_files()
    keys = [key for key, _ in files]
    assert len(keys) > 300 and len(set(keys)) == len(keys)
    assert [key for key, _ in python_stdlib_files()] == keys  # a fixed order
    assert all(not os.path.isabs(k) and "site-packages" not in k and "/test/" not in f"/{k}" for k in keys)
    assert "json/decoder.py" in keys and "os.py" in keys
    heldout = {k for k in keys if is_heldout(k, 0.1)}
    assert 0.05 < len(heldout) / len(keys) < 0.15
    # A fresh interpreter with a different hash seed computes the same split (no use of Python's hash()).
    script = (
        "from ebft.data.chunks import python_stdlib_files, is_heldout; "
        "print(sorted(k for k, _ in python_stdlib_files() if is_heldout(k, 0.1)))"
    )
    output = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    ).stdout
    assert eval(output) == sorted(heldout)


def test_python_stdlib_source_produces_disjoint_train_and_heldout(tokenizer):
    config = DataConfig(chunk_length=64, heldout_fraction=0.3, max_examples=12)
    data = prepare_data(config, tokenizer, progress=False)
    first = [key for key, _ in python_stdlib_files()[:12]]
    assert data.report.usable["python_stdlib"] == 12
    assert data.report.heldout["python_stdlib"] == sum(is_heldout(k, 0.3) for k in first)
    assert len(data.train) > 0


# ----------------------------------------------------------------------------- streaming


@pytest.fixture
def packed():
    documents = [[100 + i] * (3 + i % 4) for i in range(40)]
    return pack_documents(documents, eos_token_id=0, chunk_length=5)


def test_each_epoch_is_a_seeded_permutation(packed):
    n = len(packed)
    stream = ChunkStream(packed, seed=7)
    ids = stream.next_batch(3 * n).chunk_ids
    assert ids == list(range(3 * n))
    epochs = [[stream.chunk_index(i) for i in ids[e * n : (e + 1) * n]] for e in range(3)]
    assert all(sorted(order) == list(range(n)) for order in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != list(range(n))
    again = ChunkStream(packed, seed=7)
    assert [again.chunk_index(i) for i in ids] == sum(epochs, [])
    other = ChunkStream(packed, seed=8)
    assert [other.chunk_index(i) for i in ids[:n]] != epochs[0]
    unshuffled = ChunkStream(packed, seed=7, shuffle=False)
    assert [unshuffled.chunk_index(i) for i in ids] == list(range(n)) * 3


def test_batch_tokens_are_the_indexed_chunks(packed):
    stream = ChunkStream(packed, seed=1)
    batch = stream.next_batch(6)
    assert batch.tokens.dtype.is_floating_point is False and batch.tokens.shape == (6, 5)
    assert batch.tokens.tolist() == [packed.tokens[stream.chunk_index(i)].tolist() for i in batch.chunk_ids]
    assert [batch.step, stream.next_batch(2).step, stream.next_batch(2, step=9).step] == [0, 1, 9]


@pytest.mark.parametrize("consumed", [0, 5, 23])  # 23 crosses an epoch boundary mid-batch
def test_resume_gives_exactly_the_same_next_chunks(packed, consumed):
    original = ChunkStream(packed, seed=3)
    for _ in range(consumed // 5):
        original.next_batch(5)
    original.next_ids(consumed % 5)
    state = json.loads(json.dumps(original.state_dict()))  # checkpoints store it as plain JSON
    expected = [original.next_batch(4) for _ in range(12)]
    resumed = ChunkStream(packed, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch(4)
        assert got.chunk_ids == want.chunk_ids and got.step == want.step
        assert got.tokens.equal(want.tokens)


def test_resume_refuses_different_data(packed):
    state = ChunkStream(packed, seed=3).state_dict()
    other = pack_documents([[1, 2, 3, 4]] * 40, eos_token_id=0, chunk_length=5)
    with pytest.raises(DataError, match="data changed"):
        ChunkStream(other).load_state_dict(state)


def test_heldout_batch_is_a_seeded_selection_spread_over_source_files(tmp_path, tokenizer):
    # Files of very different lengths: a long file fills many chunks, the short ones one or two each.
    rows = [{"text": "long file " * 200}] + [
        {"text": f"short held-out file number {i} " * (1 + i % 3)} for i in range(80)
    ]
    config = DataConfig(
        sources=[SourceConfig(path=str(write_jsonl(tmp_path / "r.jsonl", rows)))], chunk_length=8, heldout_fraction=0.5
    )
    data = prepare_data(config, tokenizer, progress=False)
    starts = [int(data.heldout.doc_ids[i, 0]) for i in range(len(data.heldout))]
    files = len(set(starts))
    assert len(data.heldout) > files + 10  # some files fill many chunks: the first N chunks would repeat files

    batch, groups = data.heldout_batch(files, seed=3)
    assert batch.chunk_ids == sorted(batch.chunk_ids) and len(batch.chunk_ids) == files
    assert groups == [starts[i] for i in batch.chunk_ids]
    assert len(set(groups)) == files  # one chunk of every file before a second of any
    assert batch.tokens.tolist() == [data.heldout.tokens[i].tolist() for i in batch.chunk_ids]
    again, _ = data.heldout_batch(files, seed=3)
    other, _ = data.heldout_batch(files, seed=4)
    assert again.chunk_ids == batch.chunk_ids and other.chunk_ids != batch.chunk_ids

    more, more_groups = data.heldout_batch(files + 5, seed=3)
    counts = Counter(more_groups)
    assert len(counts) == files and max(counts.values()) == 2 and sum(counts.values()) == files + 5
    everything, _ = data.heldout_batch(seed=0)
    assert everything.chunk_ids == list(range(len(data.heldout)))
    empty = prepare_data(config.model_copy(update={"heldout_fraction": 0.0}), tokenizer, progress=False)
    with pytest.raises(DataError, match="no held-out chunk"):
        empty.heldout_batch()
