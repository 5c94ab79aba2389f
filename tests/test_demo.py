"""`ebft demo` sizes the quickstart for the CPU it runs on and says how long it should take."""

from __future__ import annotations

from pathlib import Path

import pytest

import ebft.demo
from ebft.config import load_config

QUICKSTART = str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_the_demo_trains_shorter_where_the_cpu_has_no_native_bf16(monkeypatch, native_bf16):
    monkeypatch.setattr(ebft.demo, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr("ebft.config.cpu_has_native_bf16", lambda: native_bf16)
    config, expectation = ebft.demo.demo_config(QUICKSTART, ["training.output_dir=runs/x"])
    quickstart = load_config(QUICKSTART)
    assert config.model.dtype == ("bfloat16" if native_bf16 else "float32")
    assert config.training.output_dir == "runs/x"
    if native_bf16:
        assert config.data.chunk_length == quickstart.data.chunk_length == 128
        assert config.training.steps == quickstart.training.steps
        assert expectation.endswith(ebft.demo.EXPECTED["bf16"])
    else:
        # Fewer tokens per chunk, fewer steps and fewer held-out samples; still evaluated at its end.
        assert config.num_blocks < quickstart.num_blocks
        assert config.training.steps < quickstart.training.steps
        assert config.eval.num_samples < quickstart.eval.num_samples
        assert config.training.steps % config.eval.every == 0
        assert "float32" in expectation and expectation.endswith(ebft.demo.EXPECTED["float32"])


def test_the_users_overrides_win_over_the_machines_settings(monkeypatch):
    monkeypatch.setattr(ebft.demo, "cpu_has_native_bf16", lambda: False)
    config, _ = ebft.demo.demo_config(QUICKSTART, ["training.steps=3"])
    assert config.training.steps == 3 and config.data.chunk_length == 64
