"""The rollout engine: one vLLM engine that samples every block of every chunk, and takes new weights.

`RolloutWorker` is a plain class (tests and evaluation use it directly); `ebft.actors.pool` wraps it
in a Ray actor. A Ray actor runs one method at a time, so a weight update submitted while `generate`
runs waits for it: a chunk batch is always sampled, start to finish, by one weight version.

Generation follows EBFT's strided block-parallel sampling (docs/method.md section 2): for each chunk,
the NB nested prefixes doc[:C + k*s] are ordinary prompts with n samples of exactly G tokens (no EOS
stop); prefix caching lets all prefixes of a chunk share their KV. Each block's sampling seed is a
hash of (run seed, step, chunk id, block), so a resumed run samples the same tokens.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from pathlib import Path

import torch

from ebft.actors.adapter_merge import AdapterBase
from ebft.actors.adapter_serving import ServedAdapter, lora_request
from ebft.actors.engine_process import bind_engine_to_actor, wait_for_free_gpu_memory
from ebft.actors.weight_receiver import WORKER_EXTENSION, load_update_into_engine, receive_weight_broadcast
from ebft.config import BROADCAST_TRANSPORTS, NCCL
from ebft.cpu_threads import all_cores
from ebft.layout import BlockPlan
from ebft.messages import ChunkBatch, CompletionBatch, PromptBatch, RolloutBatch, WeightUpdate

GIB = 1 << 30
ENGINE_MEMORY_WAIT_S = 120.0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def block_seed(run_seed: int, step: int, chunk_id: int, block: int) -> int:
    """Sampling seed of one block's request; vLLM seeds its n samples with seed + 0 .. seed + n - 1.

    A hash rather than arithmetic, so neighbouring (step, chunk, block) triples never share seeds.
    """
    digest = hashlib.blake2b(f"{run_seed}/{step}/{chunk_id}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # headroom for seed + sample index


def has_tokenizer(model_path: str) -> bool:
    path = Path(model_path)
    if not path.is_dir():
        return True  # a hub id: its repository carries the tokenizer
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def tensor_parallel_size(resources) -> int:
    """`resources.rollout.gpus_per_actor: k > 1` is tensor parallelism k inside one engine; a share of a GPU is 1."""
    return int(resources.gpus_per_actor) if resources.whole_gpus else 1


def runs_eager(config) -> bool:
    """Whether the run's engines skip torch.compile: `rollout.enforce_eager`, or where it is unset, on CPU."""
    eager = config.rollout.enforce_eager
    return not config.resources.rollout.on_gpu if eager is None else eager


@contextlib.contextmanager
def _without_env(name: str):
    """vLLM's CPU platform lets the legacy VLLM_CPU_KVCACHE_SPACE override kv_cache_memory_bytes;
    the config's bound must win, so hide the variable while the engine is built."""
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


class RolloutWorker:
    """One vLLM engine serving rollouts (`generate`), weight updates, and plain completions."""

    def __init__(
        self,
        config,
        model_path: str,
        *,
        enforce_eager: bool | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 1024,
        max_num_batched_tokens: int = 16384,
        log_file: str | None = None,
    ) -> None:
        """Builds the engine (seconds to a minute). Tuning knobs, defaults fit EBFT rollouts:

        - `enforce_eager`: skip torch.compile (None: `rollout.enforce_eager`, which is eager on CPU).
        - `max_model_len`: T + G by default; raise it when `complete` serves longer prompts.
        - `max_num_seqs`: sequences per decode step; one chunk brings NB x n of them (124 at T = 256),
          so vLLM's default of 256 would split 8 chunks into four rounds.
        - `max_num_batched_tokens`: tokens per engine step (the uncached prompt tails are prefilled
          in as few steps as possible).
        - `log_file`: as a Ray actor of a run, the engine's output goes there (ebft.actor_output).
        """
        from ebft.actor_output import send_output_to
        from ebft.actor_resources import show_only_assigned_gpus
        from ebft.model_sources import resolve_model_path

        send_output_to(log_file)
        show_only_assigned_gpus(config.resources.rollout)
        self.config = config
        self.plan = BlockPlan.from_config(config)
        self.model_path = resolve_model_path(str(model_path))
        self._version = 0
        self._learner: int | None = None  # the incarnation of the learner group that pushed the weights held
        self._transfer_open = False  # a broadcast transport's group is open in the engine
        # With model.lora a push holds adapters, which the engine merges (adapter_base) or serves (served_adapter).
        self.adapter_base = AdapterBase.from_config(config)
        self._lora_request = None  # the served adapter's request; none before the first push
        max_model_len = max_model_len or config.data.chunk_length + self.plan.block_length
        self.llm = self._build_engine(
            enforce_eager=runs_eager(config) if enforce_eager is None else enforce_eager,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(max_num_batched_tokens, max_model_len),
        )
        self.llm.llm_engine.set_weight_version(str(self._version))
        bind_engine_to_actor(self.llm)

    @functools.cached_property
    def served_adapter(self) -> ServedAdapter | None:
        return ServedAdapter.from_config(self.config)

    @property
    def on_gpu(self) -> bool:
        return self.config.resources.rollout.on_gpu

    def _build_engine(self, **engine_options):
        from vllm import LLM

        options = dict(
            engine_options,
            dtype=self.config.model.dtype,
            seed=self.config.training.seed,
            enable_prefix_caching=True,
            # With chunked prefill, a seeded request whose prompt is split across steps makes vLLM
            # rewind its sampling generator, which a CPU generator cannot do (RuntimeError); whole
            # prompts per step also keep seeded sampling independent of how requests are batched.
            enable_chunked_prefill=False,
            # Log-probs of the sampled tokens after temperature (and top-p): the behavior policy.
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            skip_tokenizer_init=not has_tokenizer(self.model_path),
            trust_remote_code=self.config.model.trust_remote_code,
        )
        if self.served_adapter is not None:
            options.update(self.served_adapter.engine_options())
        transport = self.config.weight_transport
        if transport in BROADCAST_TRANSPORTS:
            from vllm.config import WeightTransferConfig

            from ebft.actors.transfer_engines import register_transfer_engines

            register_transfer_engines()
            backend = "ebft_nccl" if transport == NCCL else transport
            options["weight_transfer_config"] = WeightTransferConfig(backend=backend)
        if self.on_gpu:
            options["gpu_memory_utilization"] = self.config.rollout.gpu_memory_utilization
            wait_for_free_gpu_memory(options["gpu_memory_utilization"], ENGINE_MEMORY_WAIT_S)
            tensor_parallel = tensor_parallel_size(self.config.resources.rollout)
            if tensor_parallel > 1:
                # Its workers are processes of this actor, on the GPUs of the actor's bundle (CUDA_VISIBLE_DEVICES).
                options.update(tensor_parallel_size=tensor_parallel, distributed_executor_backend="mp")
            return LLM(self.model_path, **options)
        # Unbounded, a CPU engine reserves ~10 GB of KV cache even for a tiny model.
        options["kv_cache_memory_bytes"] = int(self.config.rollout.kv_cache_gib * GIB)
        # Prefixes are shared in whole KV blocks; the CPU default of 128 tokens would share nothing
        # below position 128. 32 is the smallest block the CPU attention kernel takes.
        options["block_size"] = 32
        with _without_env("VLLM_CPU_KVCACHE_SPACE"):
            return LLM(self.model_path, **options)

    # ------------------------------------------------------------------ rollouts

    def _block_params(self, seed: int, num_samples: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = self.config.sampling
        return SamplingParams(
            n=num_samples,
            temperature=s.temperature,
            top_p=s.top_p,
            # Exactly G tokens: no stop at EOS. Not min_tokens=G: it would mask EOS out of the sampling
            # distribution (the policy can emit EOS mid-block, as the packed data contain EOS
            # separators) and shift the behavior log-probs away from logits / temperature.
            max_tokens=s.block_length,
            ignore_eos=True,
            logprobs=0,  # the sampled token's own log-prob
            seed=seed,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def generate(self, chunks: ChunkBatch, num_samples: int | None = None, *, alone: bool = False) -> RolloutBatch:
        """n samples (sampling.num_samples unless given) of exactly G tokens at every block of every chunk,
        all from the current weights. `alone`: nothing else works on this node now (a held-out
        evaluation), so the engine runs on all its cores for this call."""
        from vllm.inputs import TokensPrompt

        plan, n = self.plan, num_samples or self.config.sampling.num_samples
        docs = torch.as_tensor(chunks.tokens)
        if docs.ndim != 2 or docs.shape[1] != plan.chunk_length:
            raise ValueError(f"chunk tokens must be [docs, T={plan.chunk_length}], got {tuple(docs.shape)}")
        if len(chunks.chunk_ids) != docs.shape[0]:
            raise ValueError(f"{len(chunks.chunk_ids)} chunk ids for {docs.shape[0]} chunks")
        started = time.perf_counter()
        prompts, params = [], []
        for chunk_id, doc in zip(chunks.chunk_ids, docs.tolist()):
            for block, prompt in enumerate(plan.prompts(doc)):
                prompts.append(TokensPrompt(prompt_token_ids=prompt))
                seed = block_seed(self.config.training.seed, chunks.step, chunk_id, block)
                params.append(self._block_params(seed, n))
        with all_cores(alone and not self.on_gpu):
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora_request)

        num_docs, NB, G = docs.shape[0], plan.num_blocks, plan.block_length
        tokens = torch.empty(num_docs, n, NB, G, dtype=torch.int64)
        logprobs = torch.empty(num_docs, n, NB, G, dtype=torch.float32)
        versions: set[str] = set()
        for index, output in enumerate(outputs):
            doc, block = divmod(index, NB)
            if sorted(sample.index for sample in output.outputs) != list(range(n)):
                indices = [sample.index for sample in output.outputs]
                raise RuntimeError(f"vLLM returned samples {indices} for a block, expected each of 0..{n - 1} once")
            for sample in output.outputs:
                ids = list(sample.token_ids)
                if len(ids) != G:
                    raise RuntimeError(f"vLLM returned {len(ids)} tokens for a block, expected exactly G={G}")
                if not sample.weight_versions:
                    raise RuntimeError("vLLM labelled a sample with no weight version: which weights sampled it?")
                tokens[doc, sample.index, block] = torch.tensor(ids)
                logprobs[doc, sample.index, block] = torch.tensor(
                    [position[token].logprob for position, token in zip(sample.logprobs, ids)]
                )
                versions.update(span.version for span in sample.weight_versions or ())
        # vLLM labels every sampled token with the engine's weight version: the record of what was used.
        if versions - {str(self._version)}:
            raise RuntimeError(f"one chunk batch was sampled by weight versions {sorted(versions)}")
        return RolloutBatch(
            chunks=chunks,
            tokens=tokens,
            behavior_logprobs=logprobs,
            weight_version=self._version,
            elapsed_s=time.perf_counter() - started,
        )

    def complete_prompts(self, batch: PromptBatch) -> CompletionBatch:
        """training.method = rlvr: rlvr.completions_per_prompt completions of every question, each until EOS or
        rlvr.max_new_tokens, at sampling.temperature and top_p, all from the current weights; seeded by
        (run seed, step, question id), so a resumed run samples the same ones."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if self.llm.llm_engine.tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer: the verifiers read the completions' text")
        s, n = self.config.sampling, self.config.rlvr.completions_per_prompt
        started = time.perf_counter()
        params = [
            SamplingParams(
                n=n,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=self.config.rlvr.max_new_tokens,
                logprobs=0,
                seed=block_seed(self.config.training.seed, batch.step, task_id, 0),
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            for task_id in batch.task_ids
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(prompt)) for prompt in batch.prompts]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora_request)
        tokens, logprobs, texts = [], [], []
        for output in outputs:
            samples = sorted(output.outputs, key=lambda sample: sample.index)
            if [sample.index for sample in samples] != list(range(n)) or not all(s.token_ids for s in samples):
                raise RuntimeError(f"vLLM returned {len(samples)} completions of a question, expected {n} non-empty")
            tokens.append([list(sample.token_ids) for sample in samples])
            logprobs.append([[position[t].logprob for position, t in zip(x.logprobs, x.token_ids)] for x in samples])
            texts.append([sample.text for sample in samples])
        return CompletionBatch(batch, tokens, logprobs, texts, self._version, time.perf_counter() - started)

    # ------------------------------------------------------------------ weights

    def weight_version(self) -> int:
        return self._version

    def check_forward(self, version: int, learner: int) -> None:
        """Versions never go back, except to a learner group started after the one that pushed the weights held (a
        restart from a checkpoint). The same version again is allowed: after a rollout actor restarts, every actor
        gets the current weights."""
        if self._learner is not None and (learner, version) < (self._learner, self._version):
            raise ValueError(
                f"weight update to version {version} (learner {learner}) goes back from {self._version} "
                f"(learner {self._learner})"
            )

    def update_weights(self, update: WeightUpdate, learner: int = 0) -> int:
        """Object-store transport: load the pushed weights into the running engine; returns the new version.
        `learner`: the pushing learner group's incarnation (check_forward)."""
        self.check_forward(update.version, learner)
        load_update_into_engine(self.llm, update, self.adapter_base, self.served_adapter)
        self._pushed(update.version, learner)
        return self._version

    def _pushed(self, version: int, learner: int) -> None:
        self._version, self._learner = version, learner
        if self.served_adapter is not None:
            self._lora_request = lora_request(version)

    def weight_transfer_world_size(self) -> int:
        """Ranks this engine occupies in the weight-transfer group (its TP x PP size)."""
        return self.llm.get_world_size(include_dp=False)

    def init_weight_transfer(self, init_info: dict) -> None:
        """Broadcast transports: join a learner's transfer group (blocks until its rank 0 joins, within its bound).
        A group from an earlier connection (a learner that restarted, a pool member replaced) is shut down first."""
        self.close_weight_transfer()
        if self.served_adapter is not None:
            init_info = {**init_info, "serves_adapters": True}
        self.llm.init_weight_transfer_engine({"init_info": init_info})
        self._transfer_open = True

    def close_weight_transfer(self) -> None:
        if self._transfer_open:
            self._transfer_open = False
            self.llm.shutdown_weight_transfer_engine()

    def receive_weight_broadcast(self, update_info: dict, version: int, learner: int = 0) -> int:
        """Broadcast transports: receive one broadcast from the learner; returns the new version. An engine worker
        whose round fails (the learner died, or another receiver did and the sender declared the round failed)
        ends its process, and this actor with it (engine_process), so the round is never half loaded."""
        self.check_forward(version, learner)
        receive_weight_broadcast(self.llm, update_info, version, self.adapter_base, self.served_adapter)
        self._pushed(version, learner)
        return self._version

    # ------------------------------------------------------------------ evaluation

    def complete(
        self,
        prompts: list[str] | list[list[int]],
        *,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        stop: list[str] | None = None,
        seed: int | None = None,
        alone: bool = False,
    ) -> list[list[str]] | list[list[list[int]]]:
        """n completions per prompt: texts for text prompts, token ids for token-id prompts.

        Text prompts and `stop` strings need the model folder's tokenizer. `alone`: as in `generate`.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        as_text = bool(prompts) and isinstance(prompts[0], str)
        if (as_text or stop) and self.llm.llm_engine.tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer: pass token-id prompts and no stop strings")
        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            stop=stop,
            seed=seed,
            detokenize=as_text or bool(stop),
        )
        inputs = prompts if as_text else [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        with all_cores(alone and not self.on_gpu):
            outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self._lora_request)
        ordered = [sorted(output.outputs, key=lambda sample: sample.index) for output in outputs]
        if as_text:
            return [[sample.text for sample in samples] for samples in ordered]
        return [[list(sample.token_ids) for sample in samples] for samples in ordered]

    def shutdown(self) -> None:
        """Release the engine (and its KV cache) now rather than at garbage collection."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.ebft_closing = True  # not a crash: the engine watchdog lets it go
            llm.llm_engine.engine_core.shutdown()
        del llm
