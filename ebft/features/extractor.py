"""The frozen feature network: rollout batch in, pooled features out (usable with or without Ray).

Per micro-batch of documents:
1. one causal forward over the documents [docs, T] gives every block's ground-truth feature (window
   doc[C + k*s : C + k*s + G]) and the documents' key/value cache;
2. one row per (document, sample) holding only the generated part of the packed layout (NB*G tokens,
   step-major, see `ebft.layout`), rows batched per forward, attends to that cache as the packed layout
   allows (`features.attention`: block-sparse, ebft/packed_attention.py, or the dense packed mask).
That is the packed forward [doc] + [generated] with the document part computed once per document
instead of n times: document tokens attend only to document tokens, so their states are the same in all
n packed sequences and in the ground-truth forward.

Only the decoder layers up to the deepest feature layer are loaded and run.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
from transformers import AutoConfig, AutoModel, DynamicCache
from transformers.utils import logging as hf_logging

from ebft import packed_attention
from ebft.actor_resources import actor_device
from ebft.config import Config
from ebft.features.pooling import feature_layer_indices, pool_blocks, token_features
from ebft.layout import BlockPlan
from ebft.messages import FeatureBatch, RolloutBatch


@contextlib.contextmanager
def _quiet_transformers():
    """Loading a truncated model reports the skipped layers' weights as UNEXPECTED; that is intended."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def load_truncated_model(
    model_path: str | os.PathLike,
    depth: int,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
):
    """The base model (no LM head) with only its first `depth` decoder layers, frozen, in eval mode."""
    model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    model_config.num_hidden_layers = depth
    if isinstance(getattr(model_config, "layer_types", None), list):
        model_config.layer_types = model_config.layer_types[:depth]
    with _quiet_transformers():
        model, info = AutoModel.from_pretrained(
            model_path,
            config=model_config,
            dtype=dtype,
            # The packed layout needs the plan's block attention or an arbitrary 4-D mask: not flash attention.
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    if info.get("missing_keys"):
        raise ValueError(
            f"feature model {model_path}: weights missing from the checkpoint: {sorted(info['missing_keys'])[:8]}"
        )
    if not isinstance(getattr(model, "layers", None), torch.nn.ModuleList) or len(model.layers) != depth:
        raise ValueError(
            f"feature model {model_path} ({type(model).__name__}) does not expose its decoder layers as `.layers`; "
            "use a decoder-only causal LM such as Llama, Qwen2 or Mistral"
        )
    return model.eval().requires_grad_(False)


class FeatureExtractor:
    """Pooled features phi of rollouts and ground truth, from a frozen feature network."""

    def __init__(self, model_path: str | os.PathLike, config: Config, device: str | torch.device | None = None):
        self.plan = BlockPlan.from_config(config)
        self.pooling = config.features.pooling
        self.token_budget = config.features.token_budget
        self.device = torch.device(device) if device is not None else actor_device(config.resources.features)
        self.dtype: torch.dtype = getattr(torch, config.model.dtype)

        full_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.model.trust_remote_code)
        self.num_hidden_layers: int = full_config.num_hidden_layers
        self.layers = feature_layer_indices(self.num_hidden_layers, config.features.layer_fractions)
        # Layer 0 (embeddings) is captured as the input of the first decoder layer, so keep at least one.
        depth = max(1, max(self.layers))
        blocks = config.features.attention == "blocks"
        self.model = load_truncated_model(
            model_path,
            depth,
            self.dtype,
            config.model.trust_remote_code,
            attn_implementation=packed_attention.register() if blocks else "sdpa",
        ).to(self.device)
        self.feature_dim: int = len(self.layers) * self.model.config.hidden_size

        self._captured: dict[int, torch.Tensor] = {}
        self._install_capture_hooks()

        T = self.plan.chunk_length
        self._generated_mask = (
            None if blocks else self.plan.attention_mask(self.dtype)[:, :, T:, :].to(self.device)
        )  # [1, 1, NB*G, S]
        self._generated_positions = self.plan.position_ids[T:].to(self.device)  # [NB*G]
        self._generated_block_indices = self.plan.generated_indices[0] - T  # [NB, G] into the generated part
        self._window_indices = self.plan.window_indices  # [NB, G] into the document

    def _install_capture_hooks(self) -> None:
        def keep_input(module, args, kwargs):
            self._captured[0] = args[0] if args else kwargs["hidden_states"]

        def keep_output(layer_index):
            def hook(module, args, output):
                self._captured[layer_index] = output[0] if isinstance(output, tuple) else output

            return hook

        for layer in sorted(set(self.layers)):
            if layer == 0:
                self.model.layers[0].register_forward_pre_hook(keep_input, with_kwargs=True)
            else:
                self.model.layers[layer - 1].register_forward_hook(keep_output(layer))

    def _row_attention(self, rows: int) -> dict:
        """How `rows` rows of one sample's generated tokens attend to the cached document and to themselves."""
        if self._generated_mask is None:
            return {"block_plan": self.plan}
        return {"attention_mask": self._generated_mask.expand(rows, -1, -1, -1)}

    def _pooled(self, indices: torch.Tensor) -> torch.Tensor:
        """Features of the last forward pooled at `indices` [NB, G]; the captured states are released."""
        states, self._captured = self._captured, {}
        return pool_blocks(token_features(states, self.layers), indices, self.pooling).float().cpu()

    @torch.inference_mode()
    def extract(self, batch: RolloutBatch) -> FeatureBatch:
        started = time.perf_counter()
        docs, rollouts = batch.chunks.tokens, batch.tokens
        plan = self.plan
        NB, G, T = plan.num_blocks, plan.block_length, plan.chunk_length
        if docs.dim() != 2 or docs.shape[1] != T:
            raise ValueError(f"chunk tokens must be [docs, T={T}] (got {tuple(docs.shape)})")
        if rollouts.dim() != 4 or rollouts.shape[0] != docs.shape[0] or rollouts.shape[2:] != (NB, G):
            raise ValueError(
                f"rollout tokens must be [docs={docs.shape[0]}, n, NB={NB}, G={G}] (got {tuple(rollouts.shape)})"
            )
        num_docs, n = rollouts.shape[:2]
        rollout_features = torch.empty(num_docs, NB, n, self.feature_dim)  # the reward kernel's layout
        gt_features = torch.empty(num_docs, NB, self.feature_dim)

        generated = plan.pack(docs[:, None].expand(-1, n, -1), rollouts.unsqueeze(2))[
            ..., T:
        ]  # [docs, n, NB*G] step-major
        docs_per_forward = max(1, self.token_budget // T)
        rows_per_forward = max(1, self.token_budget // (NB * G))
        for start in range(0, num_docs, docs_per_forward):
            group = slice(start, min(num_docs, start + docs_per_forward))
            output = self.model(input_ids=docs[group].to(self.device), use_cache=True)
            gt_features[group] = self._pooled(self._window_indices)
            document_cache = [(layer.keys, layer.values) for layer in output.past_key_values.layers]

            rows = generated[group].flatten(0, 1)  # [group docs * n, NB*G]; row r is (doc r // n, sample r % n)
            row_features = torch.empty(rows.shape[0], NB, self.feature_dim)
            for row_start in range(0, rows.shape[0], rows_per_forward):
                row_slice = slice(row_start, min(rows.shape[0], row_start + rows_per_forward))
                row_docs = torch.arange(row_slice.start, row_slice.stop, device=self.device) // n
                cache = DynamicCache(
                    ddp_cache_data=[(keys[row_docs], values[row_docs]) for keys, values in document_cache]
                )
                count = row_slice.stop - row_slice.start
                self.model(
                    input_ids=rows[row_slice].to(self.device),
                    position_ids=self._generated_positions.expand(count, -1),
                    **self._row_attention(count),
                    past_key_values=cache,
                    use_cache=True,
                )
                row_features[row_slice] = self._pooled(self._generated_block_indices)
            rollout_features[group] = row_features.view(-1, n, NB, self.feature_dim).transpose(1, 2)

        return FeatureBatch(
            chunk_ids=list(batch.chunks.chunk_ids),
            rollout_features=rollout_features,
            gt_features=gt_features,
            elapsed_s=time.perf_counter() - started,
        )
