"""Fast SVPN (power iteration) vs exact SVD, forward + backward, on the CPU: prints the speed-up.

    python benchmarks/svpn.py [--batch 256] [--m 64] [--n 48] [--repeats 20]
Target (issue 2): at least 10x faster than full SVD at batch 256, Q 64x48, k=1, one iteration.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.models.second_order import svpn, svpn_svd


def time_fwd_bwd(fn, q: torch.Tensor, repeats: int) -> float:
    """Median seconds of fn(q).sum().backward() over ``repeats`` runs after one warm-up."""
    times = []
    for i in range(repeats + 1):
        x = q.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        fn(x).sum().backward()
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    q = torch.randn(args.batch, args.m, args.n)
    init = torch.randn(args.n, 1)
    fast = time_fwd_bwd(lambda x: svpn(x, 0.5, top_k=1, iters=1, init=init), q, args.repeats)
    exact = time_fwd_bwd(lambda x: svpn_svd(x, 0.5), q, args.repeats)
    print(f"batch {args.batch}, Q {args.m}x{args.n}, fwd+bwd, {torch.get_num_threads()} threads, median of "
          f"{args.repeats}")
    print(f"{'full SVD (torch.linalg.svd)':<32} {exact * 1e3:9.2f} ms")
    print(f"{'fast SVPN (k=1, 1 iteration)':<32} {fast * 1e3:9.2f} ms")
    print(f"speed-up: {exact / fast:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
