"""Batched reward kernel vs the authors' per-group style, at the paper's coding geometry.

16 documents x 127 blocks x 4 samples x D = 4608 (3 layers of a 1536-wide model), float32.
(a) compute_rewards: one Gram product + batched n x n eigendecompositions;
(b) per group: SVD of the n x D rollout matrix, then per-sample Python loops (authors' style);
(c) the floor: one batched Gram product over the same features (reading the inputs once).
The features reach (a) and (b) in the layout training gives compute_rewards. Every side is timed the same way:
`--warmup` untimed calls, then the median of `--repeats` timed ones (their range is printed).
"""

import argparse
import statistics

import torch
from _timing import emit, wall_times

from ebft.config import RewardConfig
from ebft.rewards import compute_rewards


def per_group_rewards(X, y, a=1.0, d=1.0, tol=1e-5):
    docs, blocks, n, _ = X.shape
    out = torch.zeros(docs, blocks, n)
    for b in range(docs):
        for k in range(blocks):
            U, S, _ = torch.linalg.svd(X[b, k], full_matrices=False)
            keep = S > tol * S.max()
            W = U[:, keep] @ torch.diag(1 / S[keep]) @ U[:, keep].T
            Xw, Yw = W @ X[b, k], W @ y[b, k].expand(n, -1)
            align = [2 * torch.nn.functional.cosine_similarity(Xw[j], Yw[j], dim=0) for j in range(n)]
            div = [2 / (n - 1) * sum(Xw[j] @ Xw[i] for i in range(n) if i != j) for j in range(n)]
            total_div = sum(div)
            for j in range(n):
                baseline = a * sum(align[i] for i in range(n) if i != j) / (n - 1)
                baseline = baseline - d * (total_div - 2 * div[j]) / (n - 2)
                out[b, k, j] = a * align[j] - d * div[j] - baseline
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=127)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--dim", type=int, default=4608)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each side first")
    args = parser.parse_args()
    torch.manual_seed(0)
    # Laid out as training hands them over: feature workers return [docs, NB, n, D] (contiguous), which the learner
    # passes to compute_rewards as it is (ebft/learner/batches.py).
    X = torch.nn.functional.normalize(torch.randn(args.docs, args.blocks, args.samples, args.dim), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(args.docs, args.blocks, args.dim), dim=-1)

    config = RewardConfig(diversity_coef=1.0, whitening="sample")
    flat = X.flatten(0, 1)  # the floor reads the features once, in the layout it wants
    sides = {
        "loop": lambda: per_group_rewards(X, y),
        "kernel": lambda: compute_rewards(X, y, config),
        "gram": lambda: torch.bmm(flat, flat.transpose(1, 2)),
    }
    times = {name: wall_times(fn, args.repeats, args.warmup) for name, fn in sides.items()}
    loop, kernel, gram = (statistics.median(times[name]) for name in sides)
    reference = per_group_rewards(X, y)

    def spread(name: str) -> str:
        return f"{min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f}"

    fast = compute_rewards(X, y, config).advantages
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    groups = args.docs * args.blocks
    print(f"groups={groups} n={args.samples} D={args.dim} float32, torch threads={torch.get_num_threads()}")
    print(f"median of {args.repeats} after {args.warmup} warm-up call(s) each; range in brackets")
    print(f"per-group SVD + loops : {loop * 1e3:9.1f} ms [{spread('loop')}]")
    print(
        f"batched kernel        : {kernel * 1e3:9.1f} ms [{spread('kernel')}]   ({loop / kernel:.0f}x faster; "
        "outputs agree to 1e-4)"
    )
    print(
        f"Gram floor (one bmm)  : {gram * 1e3:9.1f} ms [{spread('gram')}]   (kernel = {kernel / gram:.2f}x the floor)"
    )
    emit(
        {
            "benchmark": "rewards",
            "ratio": round(loop / kernel, 1),
            "floor_ratio": round(kernel / gram, 2),
            "loop_ms": round(loop * 1e3, 1),
            "kernel_ms": round(kernel * 1e3, 2),
            "gram_ms": round(gram * 1e3, 2),
            "groups": groups,
            "n": args.samples,
            "dim": args.dim,
            "statistic": f"median of {args.repeats} after {args.warmup} warm-up",
        }
    )


if __name__ == "__main__":
    main()
