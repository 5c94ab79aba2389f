"""`ebft demo` (what `make demo` runs): the quickstart, sized for what this machine computes fast, with how long it
should take said before anything starts.

configs/quickstart.yaml is sized for a 2-core CPU that computes bf16 natively (AVX512-BF16, AMX, Arm BF16). A CPU
without it trains in float32 (`model.dtype: auto`), several times slower per token: there the demo trains 64-token
chunks (7 blocks: less than half the tokens of a 128-token chunk's 15) for fewer steps and samples fewer held-out
rollouts. Either way it trains through all three pools and ends with the before/after table, the plot and the
checkpoint. The durations are measured (docs/results.md "Demo timings").
"""

from __future__ import annotations

from ebft.config import Config, cpu_has_native_bf16, load_config
from ebft.cpu_threads import node_cores

FLOAT32_CPU_SETTINGS = [
    "data.chunk_length=64",
    "training.steps=6",
    "eval.every=6",
    "eval.num_samples=4",
    "eval.humaneval_problems=10",
]
# What `make demo` took once the environment and model existed (docs/results.md "Demo timings").
EXPECTED = {
    "bf16": "about 2 min (124-128 s on 2 AVX512-BF16 cores of an AMD EPYC; about twice that on a slower one)",
    "float32": "2 to 7 min (100 s on an AVX-512 EPYC held to its AVX2 kernels; 5-7 min estimated for an older "
    "2-core AVX2 EPYC)",
}


def demo_config(path: str, overrides: list[str]) -> tuple[Config, str]:
    """The quickstart with this machine's settings (the user's overrides win), and its expected duration."""
    bf16 = cpu_has_native_bf16()
    config = load_config(path, [*([] if bf16 else FLOAT32_CPU_SETTINGS), *overrides])
    kind = "computes bf16 natively" if bf16 else "has no native bf16, so the demo trains in float32 and shorter"
    expectation = f"this CPU {kind}: expect {EXPECTED['bf16' if bf16 else 'float32']}"
    if node_cores() < 2:
        expectation += "; with 1 core, about twice that"
    return config, expectation


def run_demo(path: str, overrides: list[str]) -> None:
    from rich.console import Console

    from ebft.cluster.report import print_summary
    from ebft.cluster.train import run
    from ebft.model_sources import prepare_smollm2

    config, expectation = demo_config(path, overrides)
    prepare_smollm2(progress=True)
    console = Console(stderr=True)
    steps, every = config.training.steps, config.eval.every
    evaluated = sorted({*([0] if config.eval.at_start else []), *range(every, steps, every), steps}) if every else []
    console.print(
        f"[bold]ebft demo[/bold]: {config.training.method.upper()} on {config.model.policy} for {steps} steps, "
        f"held-out evaluations at steps {', '.join(map(str, evaluated)) or 'none'}; {expectation}"
    )
    print_summary(run(config))
