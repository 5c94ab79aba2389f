"""Questions with tests or references (training.method = rlvr): read from the same rows and split as the chunks."""

from __future__ import annotations

import json

import pytest
from helpers import smollm2_tokenizer

from ebft.config import DataConfig, build_config
from ebft.data.chunks import prepare_data
from ebft.data.sources import is_heldout
from ebft.data.tasks import PromptStream, prompt_set, prompt_stream

ROWS = [
    {"q": "Write f returning 1.", "a": "def f(): return 1", "tests": ["assert f() == 1", "assert f() != 2"]},
    {"q": "Write g returning 2.", "a": "def g(): return 2", "tests": "['assert g() == 2']"},  # OpenCodeInstruct's form
    {"q": "Write h.", "a": "def h(): pass", "tests": "assert h() is None"},
    {"q": "No tests here.", "a": "x = 1"},
    {"q": "Empty tests.", "a": "x = 2", "tests": []},
] + [
    {"q": f"Write k{i} returning {i}.", "a": f"def k{i}(): return {i}", "tests": [f"assert k{i}() == {i}"]}
    for i in range(20)
]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def prepared(tmp_path, tokenizer, **source):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    source = {"path": str(path), "question_key": "q", "answer_key": "a", "tests_key": "tests", **source}
    config = DataConfig(sources=[source], chunk_length=16, heldout_fraction=0.3)
    return prepare_data(config, tokenizer, progress=False)


def test_questions_keep_their_tests_and_the_chunks_split(tmp_path, tokenizer):
    data = prepared(tmp_path, tokenizer)
    assert data.report.rejected[str(tmp_path / "questions.jsonl")] == {
        "tests_missing": 1,
        "tests_empty": 1,
    }
    keys = {example.text: example for split in data.verifiable.values() for example in split}
    assert keys["Write f returning 1."].tests == ("assert f() == 1", "assert f() != 2")
    assert keys["Write g returning 2."].tests == ("assert g() == 2",)  # the list literal is a list of tests
    assert keys["Write h."].tests == ("assert h() is None",)
    for split, examples in data.verifiable.items():  # the same hash split as the chunks
        assert all(is_heldout(e.key, 0.3) == (split == "heldout") for e in examples)
    assert len(data.verifiable["train"]) + len(data.verifiable["heldout"]) == len(ROWS) - 2


def test_long_questions_are_left_out_and_counted(tmp_path, tokenizer):
    data = prepared(tmp_path, tokenizer)
    train = data.verifiable["train"]
    lengths = [len(tokenizer(e.text, add_special_tokens=False)["input_ids"]) for e in train]
    limit = max(lengths) - 1
    questions = prompt_set(train, tokenizer, limit, data.report)
    assert 0 < len(questions) == sum(length <= limit for length in lengths) < len(train)
    assert data.report.rejected["rlvr questions"]["prompt_too_long"] == len(train) - len(questions)
    for task, prompt in zip(questions.tasks, questions.prompts):
        assert prompt == tokenizer(task.question, add_special_tokens=False)["input_ids"]  # the question alone


def test_the_question_stream_resumes_where_it_stopped(tmp_path, tokenizer):
    data = prepared(tmp_path, tokenizer)
    source = {"path": "questions.jsonl", "question_key": "q", "answer_key": "a", "tests_key": "tests"}
    config = build_config({"training": {"method": "rlvr", "seed": 3}, "data": {"sources": [source]}})
    stream = prompt_stream(data, tokenizer, config)
    stream.next_batch(3)
    state = stream.state_dict()
    expected = [stream.next_batch(4) for _ in range(5)]  # past an epoch's end
    resumed = prompt_stream(data, tokenizer, config)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch(4)
        assert got.task_ids == want.task_ids and got.prompts == want.prompts and got.tasks == want.tasks
    ids = [i for batch in [*expected] for i in batch.task_ids]
    assert len(set(ids)) == len(ids)  # ids are positions in the stream: never reused


def test_no_question_with_checks_is_refused(tmp_path, tokenizer):
    data = prepared(tmp_path, tokenizer)
    with pytest.raises(ValueError, match="no training question with tests or references"):
        PromptStream(prompt_set([], tokenizer, 10, data.report))
