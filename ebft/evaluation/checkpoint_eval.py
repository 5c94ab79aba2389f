"""`ebft eval MODEL_OR_CHECKPOINT`: every evaluation of one model, in this process, without Ray.

1. a vLLM engine on the evaluated model samples the held-out rollouts (the training geometry), the
   HumanEval completions and the translations; it is shut down before anything else is loaded;
2. a plain transformers forward of the evaluated model gives the teacher-forced cross-entropy;
3. the frozen feature network (the BASE model: model.feature_model, else model.policy) embeds the
   rollouts and the ground truth for the feature-matching loss and the alignment rewards.
One large model is resident at a time. Metrics are printed as a table and written as JSON.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ebft.actor_resources import actor_device
from ebft.config import Config, ConfigError
from ebft.evaluation.heldout import Evaluation, HeldoutEvaluator, check_same_chunks, paired_differences
from ebft.evaluation.humaneval import CompleteFn, code_eval, humaneval_problems
from ebft.evaluation.stats import Difference
from ebft.evaluation.translation import TranslationExample, load_translation_jsonl, score_translations
from ebft.learner.loss import chunks_document_ce
from ebft.messages import ChunkBatch, RolloutBatch

logger = logging.getLogger(__name__)

METRICS_SUFFIX = ".eval.json"
# Tokens per teacher-forced forward: bounds the [tokens, vocab] float32 logits (4096 x 152k ~ 2.5 GB).
CE_TOKENS_PER_FORWARD = 4096
TRANSLATION_STOP = ("\n",)


# ----------------------------------------------------------------------------- what to evaluate


def resolve_evaluated_model(model_or_checkpoint: str) -> str:
    """A model folder, checkpoint, `smollm2`, hub id, or a run folder (-> its newest complete checkpoint)."""
    from ebft.learner.checkpoint import latest_checkpoint
    from ebft.model_sources import check_reachable, resolve_model_path

    path = Path(model_or_checkpoint).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        for root in (path / "checkpoints", path):
            latest = latest_checkpoint(root)
            if latest is not None:
                return str(latest)
    resolved = resolve_model_path(model_or_checkpoint)
    check_reachable(resolved)
    return resolved


def default_metrics_path(model_path: str) -> Path:
    """Next to a local model folder (`step_00000030` -> `step_00000030.eval.json`); else in the working directory."""
    path = Path(model_path)
    if path.is_dir():
        return path.parent / f"{path.resolve().name}{METRICS_SUFFIX}"
    return Path.cwd() / f"{model_path.replace('/', '--')}{METRICS_SUFFIX}"


def _has_tokenizer(model_path: str) -> bool:
    from ebft.actors.rollout import has_tokenizer

    return has_tokenizer(model_path)


class EvalPlan:
    """Everything `run` needs, checked before any model is loaded."""

    def __init__(self, model_or_checkpoint: str, config: Config, output: str | None):
        from ebft.evaluation.code import humaneval_path
        from ebft.model_sources import resolve_model_path

        settings = config.eval
        self.model_path = resolve_evaluated_model(model_or_checkpoint)
        self.feature_model_path = resolve_model_path(config.model.feature_model or config.model.policy)
        if config.data.heldout_fraction <= 0:
            raise ConfigError("data.heldout_fraction=0 leaves no held-out data to evaluate on; set it > 0 (e.g. 0.05)")
        self.translation: list[TranslationExample] = []
        if settings.translation_file is not None:
            if not Path(settings.translation_file).is_file():
                raise ConfigError(f"eval.translation_file {settings.translation_file} does not exist")
            try:
                self.translation = load_translation_jsonl(settings.translation_file)
            except (ValueError, UnicodeDecodeError) as error:
                raise ConfigError(f"eval.translation_file: {error}") from None
        if settings.comet_checkpoint is not None and not Path(settings.comet_checkpoint).is_file():
            raise ConfigError(
                f"eval.comet_checkpoint {settings.comet_checkpoint} does not exist; point it at a downloaded COMET "
                "model.ckpt, or set eval.comet_checkpoint=null for BLEU only"
            )
        if settings.humaneval_problems > 0:
            humaneval_path()  # the package is there
        self.needs_text = settings.humaneval_problems > 0 or bool(self.translation)
        if self.needs_text and not _has_tokenizer(self.model_path):
            raise ConfigError(
                f"{self.model_path} has no tokenizer files, which HumanEval and translation prompts need; "
                "copy the base model's tokenizer into it, or set eval.humaneval_problems=0 and "
                "eval.translation_file=null"
            )
        self.tokenizer_source = (
            self.model_path if _has_tokenizer(self.model_path) else resolve_model_path(config.model.policy)
        )
        self.output = Path(output) if output else default_metrics_path(self.model_path)


# ----------------------------------------------------------------------------- cross-entropy


def load_causal_lm(model_path: str, config: Config, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=getattr(torch, config.model.dtype), trust_remote_code=config.model.trust_remote_code
    )
    return model.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- translation


def translation_prompt(template: str, source: str) -> str:
    return template.replace("{source}", source)


def run_translation_eval(
    complete: CompleteFn, examples: Sequence[TranslationExample], config: Config
) -> dict[str, float]:
    """Corpus BLEU of one completion per source (stopped at the end of the line) against the references."""
    if not examples:
        return {}
    outputs = complete(
        [translation_prompt(config.eval.translation_prompt, example.source) for example in examples],
        n=1,
        temperature=config.eval.temperature,
        top_p=1.0,
        max_tokens=config.eval.max_new_tokens,
        stop=list(TRANSLATION_STOP),
    )
    hypotheses = [samples[0].strip() for samples in outputs]
    report = score_translations(examples, hypotheses, config.eval.comet_checkpoint)
    metrics = {"eval/translation/bleu": float(report["bleu"]), "eval/translation/num_examples": float(len(examples))}
    if "comet" in report:
        metrics["eval/translation/comet"] = float(report["comet"])
    return metrics


# ----------------------------------------------------------------------------- progress and report


class Stages:
    """One progress line per stage of the evaluation (spinner, counts where known, elapsed time)."""

    def __init__(self, console, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
        )

    def __enter__(self) -> Stages:
        self.progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.progress.stop()

    @contextlib.contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator[Callable[[], None]]:
        task = self.progress.add_task(description, total=total)
        yield lambda: self.progress.advance(task)
        self.progress.update(task, total=total or 1, completed=total or 1)


def _format(name: str, value: float) -> str:
    if "/outcome/" in name or name.endswith(("num_problems", "num_examples", "num_chunks")):
        return f"{value:.0f}"
    return f"{value:.4f}"


def print_metrics(metrics: dict[str, float], title: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, _format(name, value))
    (console or Console()).print(table)


def write_metrics(
    path: Path, evaluation: Evaluation, plan: EvalPlan, config: Config, elapsed_s: float, against: dict | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": plan.model_path,
        "feature_model": plan.feature_model_path,
        "elapsed_s": round(elapsed_s, 2),
        "metrics": evaluation.metrics,
        "chunk_ids": evaluation.chunk_ids,
        "groups": evaluation.groups,
        "per_chunk": evaluation.per_chunk,
        "measured": evaluation.measured,
        "per_problem": evaluation.per_problem,
        "config": config.model_dump(mode="json"),
    }
    if against is not None:
        record["against"] = against
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, path)


# ----------------------------------------------------------------------------- two evaluations, paired


def read_metrics(path: str | Path) -> tuple[Evaluation, str | None]:
    """An `ebft eval` metrics JSON, or a run's evals/step_*.json: its held-out evaluation and the feature model
    it was measured with (None where the file does not say: a run's evaluation uses its own config's)."""
    try:
        record = json.loads(Path(path).read_text())
        return Evaluation.from_record(record), record.get("feature_model")
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{path} is not an evaluation: give a metrics file written by `ebft eval` (*{METRICS_SUFFIX}) "
            "or a run's evals/step_*.json"
        ) from None


def load_baseline(path: str | Path, this: Evaluation | HeldoutEvaluator, feature_model: str | None) -> Evaluation:
    """The evaluation in `path`, checked to pair with `this` (an evaluation, or the one about to run) measured
    with `feature_model`."""
    baseline, baseline_feature_model = read_metrics(path)
    try:
        check_same_chunks(this, baseline)
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None
    known = feature_model is not None and baseline_feature_model is not None
    if known and Path(feature_model).resolve() != Path(baseline_feature_model).resolve():
        raise ConfigError(
            f"{path} was measured with the feature network {baseline_feature_model}, this evaluation with "
            f"{feature_model}: feature-matching losses in different feature spaces cannot be compared"
        )
    return baseline


def print_differences(
    evaluation: Evaluation, baseline: Evaluation, baseline_path: str | Path, console=None
) -> dict[str, Difference]:
    """evaluation - baseline per held-out metric, with 95% intervals (ebft.evaluation.stats), as a table."""
    from rich.console import Console
    from rich.table import Table

    differences = paired_differences(evaluation, baseline)
    table = Table(
        title=f"against {baseline_path}: paired over {len(evaluation.chunk_ids)} held-out chunks, "
        "95% bootstrap interval over source files (* excludes zero)",
        title_justify="left",
    )
    for column in ("metric", "this", "against", "difference [95% interval]"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, difference in differences.items():
        mark = "*" if difference.significant else ""
        table.add_row(name, f"{evaluation.metrics[name]:.4f}", f"{baseline.metrics[name]:.4f}", f"{difference}{mark}")
    (console or Console()).print(table)
    return differences


def compare_metrics_files(after_path: str | Path, baseline_path: str | Path) -> dict[str, Difference]:
    """`ebft eval A.eval.json --against B.eval.json`: pair two earlier evaluations without evaluating again."""
    evaluation, feature_model = read_metrics(after_path)
    return print_differences(evaluation, load_baseline(baseline_path, evaluation, feature_model), baseline_path)


def _as_record(differences: dict[str, Difference], baseline_path: str | Path) -> dict:
    return {
        "path": str(baseline_path),
        "differences": {name: {"mean": d.mean, "low": d.low, "high": d.high} for name, d in differences.items()},
    }


# ----------------------------------------------------------------------------- the whole evaluation


def _load_heldout(plan: EvalPlan, config: Config) -> tuple[ChunkBatch, list[int]]:
    from transformers import AutoTokenizer

    from ebft.data.chunks import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(plan.tokenizer_source, trust_remote_code=config.model.trust_remote_code)
    data = prepare_data(config.data, tokenizer, progress=False)
    return data.heldout_batch(config.eval.num_docs, seed=config.eval.seed)


def _longest_prompt_tokens(plan: EvalPlan, config: Config, problems) -> int:
    if not plan.needs_text:
        return 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plan.model_path, trust_remote_code=config.model.trust_remote_code)
    prompts = [p.prompt for p in problems]
    prompts += [translation_prompt(config.eval.translation_prompt, e.source) for e in plan.translation]
    return max(len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"])


def _sample_with_engine(plan: EvalPlan, config: Config, evaluator: HeldoutEvaluator, problems, stages: Stages):
    """Held-out rollouts, HumanEval and translation metrics from one vLLM engine, shut down on return."""
    from ebft.actors.rollout import RolloutWorker

    # Torch work follows in this process; vLLM's default CPU thread pinning would bind all of it to one core.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    needed_length = max(
        config.data.chunk_length + config.sampling.block_length,
        _longest_prompt_tokens(plan, config, problems) + config.eval.max_new_tokens,
    )
    with stages.stage("starting vLLM on the evaluated model"):
        # A LoRA run's checkpoint folder holds merged weights: the engine serves them as a plain model.
        plain = config.model_copy(update={"model": config.model.model_copy(update={"lora": None})})
        worker = RolloutWorker(plain, plan.model_path, max_model_len=needed_length)
    metrics: dict[str, float] = {}
    per_problem: dict[str, list[float]] = {}
    try:
        chunks, n = evaluator.chunks, config.eval.num_samples
        with stages.stage(
            f"held-out rollouts ({len(chunks.chunk_ids)} chunks x {config.num_blocks} blocks x {n} samples)"
        ):
            rollouts = worker.generate(chunks, n, alone=True)
        if problems:
            samples = config.eval.num_completions
            with stages.stage(f"HumanEval: {len(problems)} problems x {samples} samples, sandboxed"):
                code = code_eval(worker.complete, problems, config)
                metrics.update(code.metrics)
                per_problem = code.per_problem
        if plan.translation:
            with stages.stage(f"translation: {len(plan.translation)} sources"):
                metrics.update(run_translation_eval(worker.complete, plan.translation, config))
    finally:
        worker.shutdown()
        del worker
        gc.collect()
        if config.resources.rollout.on_gpu:
            torch.cuda.empty_cache()
    return rollouts, metrics, per_problem


def run(
    model_or_checkpoint: str,
    config: Config,
    *,
    output: str | None = None,
    against: str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Evaluate a model or checkpoint: held-out CE / perplexity, feature-matching loss, alignment reward
    pass@1/pass@k, HumanEval pass@k (eval.humaneval_problems > 0), BLEU (eval.translation_file).

    Prints a table, writes the metrics JSON (to `output`, default next to the checkpoint) and returns them.
    `against`: an earlier `ebft eval` metrics JSON on the same held-out chunks; the held-out differences
    from it are printed with their intervals and saved in the metrics JSON."""
    from rich.console import Console

    from ebft.features.extractor import FeatureExtractor

    started = time.perf_counter()
    plan = EvalPlan(model_or_checkpoint, config, output)
    device = actor_device(config.resources.features)
    console = Console(stderr=True)
    problems = humaneval_problems(config.eval.humaneval_problems) if config.eval.humaneval_problems else []

    with Stages(console, enabled=progress) as stages:
        with stages.stage("held-out chunks"):
            evaluator = HeldoutEvaluator(config, *_load_heldout(plan, config))
        # A baseline that cannot be paired fails now, not after the evaluation.
        baseline = None if against is None else load_baseline(against, evaluator, plan.feature_model_path)
        rollouts, generation_metrics, per_problem = _sample_with_engine(plan, config, evaluator, problems, stages)

        def cached_rollouts(chunks: ChunkBatch, num_samples: int) -> RolloutBatch:
            if chunks is not evaluator.chunks or num_samples != config.eval.num_samples:
                raise RuntimeError("the held-out evaluator asked for rollouts of chunks that were not sampled")
            return rollouts

        num_docs = len(evaluator.chunks.chunk_ids)
        docs_per_forward = max(1, CE_TOKENS_PER_FORWARD // config.data.chunk_length)

        def cross_entropy(tokens: torch.Tensor) -> torch.Tensor:
            with stages.stage("held-out cross-entropy", total=-(-num_docs // docs_per_forward)) as advance:
                model = load_causal_lm(plan.model_path, config, device)
                return chunks_document_ce(model, tokens, docs_per_forward, device, on_batch=advance)

        def embed(batch: RolloutBatch):
            with stages.stage("features of rollouts and ground truth (base model)"):
                return FeatureExtractor(plan.feature_model_path, config, device=device).extract(batch)

        evaluation = evaluator.run(cached_rollouts, embed, cross_entropy)
        metrics = evaluation.metrics
        metrics["eval/heldout/num_chunks"] = float(num_docs)
        metrics.update(generation_metrics)
        evaluation.per_problem.update(per_problem)

    elapsed = time.perf_counter() - started
    out = Console()
    out.print(f"model: {plan.model_path}\nfeature model: {plan.feature_model_path}", soft_wrap=True, highlight=False)
    print_metrics(metrics, title=f"ebft eval ({elapsed:.0f} s)", console=out)
    differences = None if baseline is None else print_differences(evaluation, baseline, against, console=out)
    against_record = None if differences is None else _as_record(differences, against)
    write_metrics(plan.output, evaluation, plan, config, elapsed, against_record)
    out.print(f"metrics written to {plan.output}", soft_wrap=True, highlight=False)
    return metrics
