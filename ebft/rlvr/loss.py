"""The RLVR loss on packed rows: one prompt and its n completions in one forward (docs/method.md, RLVR).

A row is [prompt (P tokens), completion 0 (L_0 tokens), ..., completion n-1], padded to the batch's
longest row. Completion j's token t has position id P + t and attends to the whole prompt and to its
own tokens 0..t; prompt tokens attend causally; padding attends only to itself. One forward over it
equals n causal forwards of prompt + completion_j, with the prompt computed once. Targets are laid
out completion after completion: target m = (j, t) is predicted by the logits of the prompt's last
token (t = 0) or of completion j's token t - 1.

    loss = -mean_{i, j} [ token-mean over completion (i, j) of w * A_ij * log pi(token) ] + kl_coef * KL

with the importance weight w = min(pi / pi_behavior, ratio_truncation), detached, for stale
completions and 1 otherwise, as in EBFT's loss (ebft/learner/loss.py), and KL the k3 estimator
per token, token-mean per completion, then mean over completions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ebft.learner.loss import LossTerms, importance_weights, k3_kl, token_logprobs


@dataclass(frozen=True)
class PackedGroups:
    tokens: torch.Tensor  # [B, S] long
    position_ids: torch.Tensor  # [B, S] long
    allowed: torch.Tensor  # [B, S, S] bool: query may attend to key
    predictors: torch.Tensor  # [B, M] packed index whose logits predict target m
    targets: torch.Tensor  # [B, M] token id of target m
    completion: torch.Tensor  # [B, M] completion j of target m, -1 for padding
    completions_per_prompt: int  # n

    def attention_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[B, 1, S, S] additive float mask (a boolean 4-D mask is silently wrong with eager attention)."""
        mask = torch.zeros(self.allowed.shape, dtype=dtype)
        return mask.masked_fill_(~self.allowed, torch.finfo(dtype).min)[:, None]

    def per_target(self, values: Sequence[Sequence[Sequence[float] | torch.Tensor]]) -> torch.Tensor:
        """values[i][j][t] (e.g. the behaviour log-probs of completion j's token t) -> [B, M] float32
        in the targets' layout, 0 at padding."""
        out = torch.zeros(self.targets.shape, dtype=torch.float32)
        for row, per_completion in enumerate(values):
            flat = [torch.as_tensor(v, dtype=torch.float32).flatten() for v in per_completion]
            joined = torch.cat(flat)
            if joined.numel() != int((self.completion[row] >= 0).sum()):
                raise ValueError(f"prompt {row}: {joined.numel()} values for its completions' tokens")
            out[row, : joined.numel()] = joined
        return out


def pack_prompt_groups(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[Sequence[int]]], pad_id: int = 0
) -> PackedGroups:
    """Token ids of B prompts and of each prompt's n completions (each >= 1 token) -> one row per prompt."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"{len(completions)} completion lists for {len(prompts)} prompts")
    n = len(completions[0])
    if any(len(group) != n for group in completions) or n < 1:
        raise ValueError("every prompt needs the same number (>= 1) of completions")
    if any(len(p) < 1 for p in prompts) or any(len(c) < 1 for group in completions for c in group):
        raise ValueError("prompts and completions need at least one token each")
    lengths = [len(p) + sum(len(c) for c in group) for p, group in zip(prompts, completions)]
    S, M = max(lengths), max(length - len(p) for length, p in zip(lengths, prompts))
    B = len(prompts)
    tokens = torch.full((B, S), pad_id, dtype=torch.long)
    positions = torch.zeros(B, S, dtype=torch.long)
    segment = torch.full((B, S), -2, dtype=torch.long)  # -1 prompt, j completion j, -2 padding
    predictors = torch.zeros(B, M, dtype=torch.long)
    targets = torch.zeros(B, M, dtype=torch.long)
    completion = torch.full((B, M), -1, dtype=torch.long)
    for row, (prompt, group) in enumerate(zip(prompts, completions)):
        P = len(prompt)
        tokens[row, :P] = torch.as_tensor(prompt)
        positions[row, :P] = torch.arange(P)
        segment[row, :P] = -1
        start = P
        for j, sample in enumerate(group):
            L, offset = len(sample), start - P
            span = slice(start, start + L)
            tokens[row, span] = torch.as_tensor(sample)
            positions[row, span] = P + torch.arange(L)
            segment[row, span] = j
            targets[row, offset : offset + L] = tokens[row, span]
            predictors[row, offset : offset + L] = torch.arange(start - 1, start + L - 1)
            predictors[row, offset] = P - 1
            completion[row, offset : offset + L] = j
            start += L
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    is_prompt, is_pad = segment == -1, segment == -2
    same_completion = (segment[:, :, None] == segment[:, None, :]) & (segment >= 0)[:, :, None]
    sees_prompt = is_prompt[:, None, :] & ~is_pad[:, :, None]
    pad_self = torch.eye(S, dtype=torch.bool)[None] & is_pad[:, :, None]
    allowed = (causal & (sees_prompt | same_completion)) | pad_self
    return PackedGroups(tokens, positions, allowed, predictors, targets, completion, n)


def completion_logprobs(logits: torch.Tensor, packed: PackedGroups, temperature: float = 1.0) -> torch.Tensor:
    """logits [B, S, V] of a packed forward -> log pi(target) [B, M] at logits / temperature (0 at padding)."""
    rows = []
    for row in range(logits.shape[0]):
        count = int((packed.completion[row] >= 0).sum())
        logp = token_logprobs(
            logits[row : row + 1], packed.predictors[row, :count], packed.targets[row : row + 1, :count], temperature
        )
        rows.append(torch.nn.functional.pad(logp, (0, packed.targets.shape[1] - count)))
    return torch.cat(rows)


def _completion_means(per_token: torch.Tensor, packed: PackedGroups) -> torch.Tensor:
    """[B, M] per-target values -> [B, n] token-mean of each completion."""
    index = packed.completion.clamp(min=0).to(per_token.device)
    real = (packed.completion >= 0).to(per_token)
    sums = per_token.new_zeros(per_token.shape[0], packed.completions_per_prompt).scatter_add(
        1, index, per_token * real
    )
    counts = real.new_zeros(sums.shape).scatter_add(1, index, real)
    return sums / counts


def rlvr_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    packed: PackedGroups,
    *,
    kl_coef: float = 0.0,
    behavior_logprobs: torch.Tensor | None = None,
    stale: torch.Tensor | None = None,
    ratio_truncation: float = 2.0,
    ref_logprobs: torch.Tensor | None = None,
) -> LossTerms:
    """The RLVR loss of B packed prompts: logprobs [B, M] (with grad, from `completion_logprobs`),
    advantages [B, n]; behavior_logprobs [B, M] with stale [B, n] bool mark completions sampled by
    older weights; ref_logprobs [B, M] for the KL. ce_loss is 0 (RLVR has no cross-entropy term)."""
    device = logprobs.device
    index = packed.completion.clamp(min=0).to(device)
    real = (packed.completion >= 0).to(device)
    is_stale = None if stale is None else stale.to(device).gather(1, index) & real
    weight, truncated = importance_weights(logprobs, behavior_logprobs, is_stale, ratio_truncation)
    token_advantages = advantages.to(logprobs).gather(1, index)
    policy_loss = -_completion_means(weight * token_advantages * logprobs, packed).mean()
    kl = logprobs.new_zeros(())
    if kl_coef and ref_logprobs is not None:
        kl = _completion_means(k3_kl(logprobs, ref_logprobs), packed).mean()
    real_weights = weight[real]
    return LossTerms(
        loss=policy_loss + kl_coef * kl,
        policy_loss=policy_loss.detach(),
        ce_loss=logprobs.new_zeros(()),
        kl=kl.detach(),
        importance_weight_mean=real_weights.mean(),
        importance_weight_max=real_weights.max(),
        truncated_fraction=truncated[real].float().mean(),
    )
