#!/usr/bin/env bash
# Builds benchmarks/.wheels/ (gitignored): what benchmarks/gpu.py needs on a lent GPU machine beyond the torch and
# transformers it has. That machine has no network and no DeepSpeed, vLLM or Ray, and its Python version is not
# known in advance, so: DeepSpeed 0.19.8 built here without its JIT ops (pure Python), the pure-Python dependencies
# of DeepSpeed, ebft.config, ZeRO-3's loading and PEFT once, and the binary ones for CPython 3.10-3.14 on x86_64 Linux (manylinux).
# Carry the folder to the device run (it stays well under the 64 MiB a run carries); the install line is in
# gpu.py's docstring. Usage, from anywhere: benchmarks/gpu_wheels.sh  (PYTHON=... to use another interpreter's pip)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=benchmarks/.wheels
rm -rf "$OUT"
mkdir -p "$OUT"
pip() { "$PYTHON" -m pip "$@"; }

# DeepSpeed from its source release, no op compiled (they would be JIT-built on first use; the checks use none).
# Without build isolation its setup.py imports this environment's torch instead of downloading one.
DS_BUILD_OPS=0 pip wheel --quiet --no-deps --no-build-isolation --no-cache-dir --wheel-dir "$OUT" deepspeed==0.19.8

# Pure Python: one wheel serves every version. Pinned to what this repository's environment runs. accelerate:
# transformers' HfDeepSpeedConfig (the learner's ZeRO-3 loading) requires it.
pip download --quiet --no-deps --only-binary=:all: --dest "$OUT" \
    hjson==3.1.0 py-cpuinfo==9.0.0 einops==0.8.2 accelerate==1.16.0 peft==0.21.2 \
    pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0

# Binary: one wheel per CPython version (psutil's abi3 wheel and ninja's py3 wheel serve them all).
for version in 3.10 3.11 3.12 3.13 3.14; do
    for package in pydantic-core==2.50.5 pyyaml==6.0.4 msgpack==1.2.4 psutil==7.2.2 ninja==1.13.2; do
        pip download --quiet --no-deps --only-binary=:all: --dest "$OUT" \
            --implementation cp --python-version "$version" \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
            "$package" || echo "no $package wheel for CPython $version" >&2
    done
done

ls -1 "$OUT"
du -sh "$OUT"
