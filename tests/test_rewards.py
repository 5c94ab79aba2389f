"""compute_rewards against a float64, plain-loop, SVD-based reading of docs/method.md section 4."""

import itertools

import numpy as np
import pytest
import torch

from ebft.config import RewardConfig
from ebft.rewards import compute_rewards


def reference_group(X, y, whitening, a, d, tol=1e-5):
    """One group, literally as written: SVD whitening, per-sample loops, float64."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = X.shape[0]
    if whitening == "sample":
        U, S, _ = np.linalg.svd(X, full_matrices=False)
        keep = S > tol * S.max()
        W = U[:, keep] @ np.diag(1 / S[keep]) @ U[:, keep].T
        Xw, Yw = W @ X, W @ np.stack([y] * n)
    elif whitening == "feature":
        _, S, Vt = np.linalg.svd(X, full_matrices=False)
        keep = S > tol * S.max()
        # (Sigma^+)^{1/2} with Sigma = X^T X / n, whose eigenvalues are S^2 / n.
        M = Vt[keep].T @ np.diag(np.sqrt(n) / S[keep]) @ Vt[keep]
        Xw, Yw = X @ M.T, np.stack([M @ y] * n)
    else:
        Xw, Yw = X, np.stack([y] * n)
    align, div = np.zeros(n), np.zeros(n)
    for j in range(n):
        denom = np.linalg.norm(Xw[j]) * np.linalg.norm(Yw[j])
        align[j] = 2 * (Xw[j] @ Yw[j]) / denom if denom > 0 else 0.0
        div[j] = 2 / (n - 1) * sum(Xw[j] @ Xw[k] for k in range(n) if k != j)
    rewards = a * align - d * div
    adv = np.zeros(n)
    for j in range(n):
        others = [k for k in range(n) if k != j]
        baseline = a * np.mean([align[k] for k in others])
        if n > 2:
            baseline -= d * (div.sum() - 2 * div[j]) / (n - 2)
        adv[j] = rewards[j] - baseline
    return align, div, rewards, adv


@pytest.mark.parametrize("whitening", ["none", "sample", "feature"])
@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_batched_kernel_matches_float64_loops(whitening, n):
    gen = torch.Generator().manual_seed(n)
    X = torch.randn(3, 5, n, 32, generator=gen)
    y = torch.randn(3, 5, 32, generator=gen)
    a, d = 1.0, 0.5
    out = compute_rewards(X, y, RewardConfig(alignment_coef=a, diversity_coef=d, whitening=whitening))
    for idx in itertools.product(range(3), range(5)):
        ref = reference_group(X[idx].numpy(), y[idx].numpy(), whitening, a, d)
        for got, want in zip((out.alignment, out.diversity, out.rewards, out.advantages), ref):
            np.testing.assert_allclose(got[idx].numpy(), want, atol=2e-4, rtol=1e-4)


def test_whitened_distinct_rollouts_have_no_diversity():
    X = torch.randn(7, 4, 64)
    y = torch.randn(7, 64)
    for whitening in ("sample", "feature"):
        out = compute_rewards(X, y, RewardConfig(whitening=whitening))
        torch.testing.assert_close(out.diversity, torch.zeros(7, 4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("whitening, expected", [("sample", 1 / 3), ("feature", 4 / 3)])
def test_duplicate_pair_at_n4_gives_the_published_diversity(whitening, expected):
    base = torch.randn(3, 48)
    X = torch.stack([base[0], base[0], base[1], base[2]])
    out = compute_rewards(X, torch.randn(48), RewardConfig(whitening=whitening))
    torch.testing.assert_close(out.diversity, torch.tensor([expected, expected, 0.0, 0.0]), atol=1e-4, rtol=0)
    ref = reference_group(X.numpy(), torch.zeros(48).numpy() + 1, whitening, 1.0, 1.0)
    np.testing.assert_allclose(
        compute_rewards(X, torch.ones(48), RewardConfig(whitening=whitening)).diversity.numpy(), ref[1], atol=1e-4
    )


def test_baseline_of_a_sample_ignores_that_sample():
    X = torch.randn(5, 64)
    y = torch.randn(64)
    first = compute_rewards(X, y, RewardConfig(whitening="none", diversity_coef=1.0))
    for j in range(5):
        moved = X.clone()
        moved[j] = torch.randn(64)
        second = compute_rewards(moved, y, RewardConfig(whitening="none", diversity_coef=1.0))
        baseline_before = first.rewards[j] - first.advantages[j]
        baseline_after = second.rewards[j] - second.advantages[j]
        torch.testing.assert_close(baseline_after, baseline_before, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(second.rewards[j], first.rewards[j])


@pytest.mark.parametrize("whitening", ["none", "sample", "feature"])
def test_degenerate_groups_are_finite(whitening):
    v = torch.randn(16)
    identical = v.expand(4, 16)
    zeros = torch.zeros(4, 16)
    X = torch.stack([identical, zeros, torch.cat([zeros[:2], identical[:2]])])
    y = torch.stack([v, torch.zeros(16), v])
    out = compute_rewards(X, y, RewardConfig(whitening=whitening))
    for t in (out.alignment, out.diversity, out.rewards, out.advantages):
        assert torch.isfinite(t).all()
    # Identical rollouts: every sample gets the same reward, so no sample is preferred.
    torch.testing.assert_close(out.advantages[0], torch.zeros(4), atol=1e-5, rtol=0)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="disagree"):
        compute_rewards(torch.randn(2, 4, 8), torch.randn(3, 8), RewardConfig())
    with pytest.raises(ValueError, match="n >= 2"):
        compute_rewards(torch.randn(2, 1, 8), torch.randn(2, 8), RewardConfig())


@pytest.mark.parametrize("diversity_coef, unbiased", [(1.0, True), (0.0, False)])
def test_reinforce_with_diversity_coef_1_is_unbiased_for_the_cfm_gradient(diversity_coef, unbiased):
    """Categorical policy over K outcomes with unit features: the exact gradient of
    L_CFM = |E phi(yhat) - phi_y|^2 w.r.t. the logits against the mean REINFORCE estimate."""
    torch.manual_seed(0)
    K, D, n, groups = 5, 6, 4, 400_000
    logits = torch.randn(K, dtype=torch.float64, requires_grad=True)
    phi = torch.nn.functional.normalize(torch.randn(K, D, dtype=torch.float64), dim=-1)
    phi_y = torch.nn.functional.normalize(torch.randn(D, dtype=torch.float64), dim=-1)
    probs = logits.softmax(-1)
    loss = (probs @ phi - phi_y).square().sum()
    (exact_grad,) = torch.autograd.grad(loss, logits)

    p = probs.detach()
    samples = torch.multinomial(p.expand(groups, K), n, replacement=True)  # [groups, n]
    out = compute_rewards(
        phi[samples].float(),
        phi_y.float().expand(groups, D),
        RewardConfig(diversity_coef=diversity_coef, whitening="none"),
    )
    score = torch.nn.functional.one_hot(samples, K).double() - p  # d log p(y) / d logits
    per_group = (out.advantages.double().unsqueeze(-1) * score).mean(1)  # [groups, K]
    estimate, stderr = -per_group.mean(0), per_group.std(0) / groups**0.5  # descent direction -> loss gradient
    z = ((estimate - exact_grad) / stderr).abs()
    assert (z < 5).all() if unbiased else (z > 5).any(), (estimate, exact_grad, z)
