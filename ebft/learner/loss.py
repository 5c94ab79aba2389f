"""The EBFT loss: REINFORCE on every block's G sampled tokens + cross-entropy on the ground truth.

    loss = rl_coef * L_PG + ce_coef * L_CE + kl_coef * KL
    L_PG = - mean_seq [ token-mean over the NB*G generated tokens of w * A_block * log pi(token) ]

log pi uses logits / temperature (the sampling distribution). w is the importance weight of a
stale rollout, min(pi / pi_behavior, ratio_truncation), detached; it is exactly 1 for rollouts
sampled with the current weights, so a fully synchronous run is plain on-policy REINFORCE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ebft.layout import BlockPlan

# Positions per slice of the float32 log-softmax: [B, 256, V] at a time, never [B, S, V].
LOGPROB_SLICE = 256


def _slices(positions: torch.Tensor):
    for start in range(0, positions.numel(), LOGPROB_SLICE):
        yield slice(start, start + LOGPROB_SLICE), positions[start : start + LOGPROB_SLICE]


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits[:, positions] / temperature)[targets], slice by slice in both passes.

    Only the logits and the per-position log-normaliser are kept for backward; the gradient of every
    slice, (onehot(target) - softmax) / temperature, is built in place in one float32 slice buffer and
    added into one logits-sized buffer.
    """

    @staticmethod
    def forward(ctx, logits, positions, targets, temperature):
        out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        log_normalizer = torch.empty_like(out)
        for part, where in _slices(positions):
            scaled = _scaled_slice(logits, where, temperature)
            log_normalizer[:, part] = torch.logsumexp(scaled, dim=-1)
            out[:, part] = scaled.gather(-1, targets[:, part, None]).squeeze(-1) - log_normalizer[:, part]
        ctx.save_for_backward(logits, positions, targets, log_normalizer)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, positions, targets, log_normalizer = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        for part, where in _slices(positions):
            weight = grad_out[:, part, None].float() / ctx.temperature  # [B, slice, 1]
            grad = _scaled_slice(logits, where, ctx.temperature).sub_(log_normalizer[:, part, None]).exp_()
            grad.mul_(-weight).scatter_add_(-1, targets[:, part, None], weight)
            grad_logits.index_add_(1, where, grad.to(logits.dtype))
        return grad_logits, None, None, None


def _scaled_slice(logits: torch.Tensor, where: torch.Tensor, temperature: float) -> torch.Tensor:
    """A new float32 tensor logits[:, where] / temperature."""
    scaled = logits[:, where].float()
    return scaled if temperature == 1.0 else scaled.div_(temperature)


def token_logprobs(
    logits: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits[:, positions] / temperature)[targets] in float32: [B, S, V] -> [B, P].

    Computed LOGPROB_SLICE positions at a time, and recomputed that way in the backward pass: only
    the model's own logits stay alive, not a float32 copy and a float32 log-softmax of them (at
    Qwen2.5 scale, T = 1024, ~2 GB per sequence).
    """
    return _TokenLogprobs.apply(logits, positions.to(logits.device), targets.to(logits.device), temperature)


def generated_logprobs(
    logits: torch.Tensor, packed_tokens: torch.Tensor, plan: BlockPlan, temperature: float
) -> torch.Tensor:
    """logits [B, S, V] of a packed forward, tokens [B, S] -> log pi(token) [B, samples, NB, G]
    at logits / temperature."""
    targets = packed_tokens[:, plan.generated_indices.flatten().to(packed_tokens.device)]
    logp = token_logprobs(logits, plan.predictor_indices.flatten(), targets, temperature)
    return logp.unflatten(1, plan.generated_indices.shape)


def document_ce(logits: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL [B] of doc tokens 1..T-1 from the doc part of the logits [B, >=T, V]."""
    T = docs.shape[-1]
    return -token_logprobs(logits, torch.arange(T - 1), docs[:, 1:]).mean(-1)


@torch.no_grad()
def chunks_document_ce(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    docs_per_forward: int,
    device: torch.device,
    on_batch: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Teacher-forced `document_ce` [docs] (float32, on the CPU) of whole chunks [docs, T], a few per forward:
    the held-out CE, in training and in `ebft eval`."""
    losses = []
    for start in range(0, tokens.shape[0], docs_per_forward):
        batch = torch.as_tensor(tokens[start : start + docs_per_forward]).long().to(device)
        losses.append(document_ce(model(input_ids=batch, use_cache=False).logits, batch).float().cpu())
        if on_batch is not None:
            on_batch()
    return torch.cat(losses)


@dataclass
class LossTerms:
    loss: torch.Tensor
    policy_loss: torch.Tensor
    ce_loss: torch.Tensor
    kl: torch.Tensor
    importance_weight_mean: torch.Tensor
    importance_weight_max: torch.Tensor
    truncated_fraction: torch.Tensor


def importance_weights(
    logprobs: torch.Tensor, behavior_logprobs: torch.Tensor | None, is_stale: torch.Tensor | None, truncation: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights of the policy gradient (docs/method.md section 6): min(pi / pi_behavior, truncation) where
    `is_stale` (broadcast against logprobs) marks tokens sampled by older weights, 1 elsewhere; and whether each
    token's ratio was truncated."""
    weight = torch.ones_like(logprobs)
    truncated = torch.zeros_like(logprobs, dtype=torch.bool)
    if behavior_logprobs is not None and is_stale is not None and bool(is_stale.any()):
        ratio = (logprobs.detach() - behavior_logprobs.to(logprobs)).exp()
        weight = torch.where(is_stale, ratio.clamp(max=truncation), weight)
        truncated = is_stale & (ratio > truncation)
    return weight, truncated


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1."""
    delta = ref_logprobs.to(logprobs) - logprobs
    return delta.exp() - delta - 1


def ebft_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ce_per_doc: torch.Tensor,
    *,
    rl_coef: float,
    ce_coef: float,
    kl_coef: float = 0.0,
    behavior_logprobs: torch.Tensor | None = None,
    stale: torch.Tensor | None = None,
    ratio_truncation: float = 2.0,
    ref_logprobs: torch.Tensor | None = None,
) -> LossTerms:
    """The EBFT loss of a micro-batch of B sequences (one (document, sample) each).

    logprobs [B, NB, G] (with grad), advantages [B, NB], ce_per_doc [B]; behavior_logprobs [B, NB, G]
    and stale [B] bool mark rollouts sampled by older weights; ref_logprobs [B, NB, G] for the KL.
    """
    is_stale = None if stale is None else stale.view(-1, 1, 1).to(logprobs.device)
    weight, truncated = importance_weights(logprobs, behavior_logprobs, is_stale, ratio_truncation)
    per_token = weight * advantages.unsqueeze(-1).to(logprobs) * logprobs
    policy_loss = -per_token.flatten(1).mean(-1).mean()
    ce_loss = ce_per_doc.mean()
    kl = logprobs.new_zeros(())
    if kl_coef and ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs).flatten(1).mean(-1).mean()
    loss = rl_coef * policy_loss + ce_coef * ce_loss + kl_coef * kl
    return LossTerms(
        loss=loss,
        policy_loss=policy_loss.detach(),
        ce_loss=ce_loss.detach(),
        kl=kl.detach(),
        importance_weight_mean=weight.mean(),
        importance_weight_max=weight.max(),
        truncated_fraction=truncated.float().mean(),
    )
