"""Time clipad.ot.sinkhorn at TokenCLIP's size and print a table.

One batch of B images, N visual tokens each (37 x 37 = 1369 at ViT-L/14, 518 px), K textual
subspaces; cost = 1 - cos between random unit tokens and subspace embeddings. In ``--dim`` 16
the cosines spread over most of [-1, 1] (costs in [0, 2], the slow case); random 768-d features
(``--dim 768``) give a narrow cost range and converge in a handful of iterations. Rows run exactly
``--iters`` iterations (tol=0, or a tol never met to time the convergence test) so that they
compare per iteration; one row shows the default stopping rule (tol=1e-6). Everything is seeded.

    python benchmarks/bench_ot.py                         # CPU, B=32 N=1369 K=8 eps=0.05
    python benchmarks/bench_ot.py --device cuda
    python benchmarks/bench_ot.py --batch 8 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

import torch
import torch.nn.functional as F

from clipad.methods.tokenclip import ot
from clipad.eval.speed import measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1369)
    ap.add_argument("--subspaces", type=int, default=8)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--epsilon", type=float, default=0.05)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(args.seed)
    tokens = F.normalize(torch.randn(args.batch, args.tokens, args.dim, generator=g), dim=-1)
    text = F.normalize(torch.randn(args.batch, args.subspaces, args.dim, generator=g), dim=-1)
    cost32 = (1 - tokens @ text.transpose(1, 2)).to(args.device)
    cost64 = cost32.double()
    eps, n = args.epsilon, args.iters

    def unrolled_backward() -> None:
        c = cost32.clone().requires_grad_(True)
        res = ot.sinkhorn(c, epsilon=eps, max_iter=n, tol=0.0, grad="unrolled")
        res.plan.sum().backward()

    plan = ot.sinkhorn(cost32, epsilon=eps, max_iter=n, tol=0.0).plan
    stop = ot.sinkhorn(cost32, epsilon=eps, max_iter=100 * n, tol=1e-6).n_iter
    never = 1e-30  # a tolerance no float32 plan meets: the test runs, the loop never stops
    rows: list[tuple[str, Callable[[], object], int]] = [
        ("log domain, float32, no convergence test (tol=0)", lambda: ot.sinkhorn(cost32, epsilon=eps, max_iter=n, tol=0.0), n),
        ("log domain, float32, test every iteration", lambda: ot.sinkhorn(cost32, epsilon=eps, max_iter=n, tol=never), n),
        ("log domain, float32, test every 10 (check_every=10)", lambda: ot.sinkhorn(cost32, epsilon=eps, max_iter=n, tol=never, check_every=10), n),
        (f"log domain, float32, tol=1e-6 (stops at {stop})", lambda: ot.sinkhorn(cost32, epsilon=eps, max_iter=100 * n, tol=1e-6), stop),
        ("log domain, float64, tol=0", lambda: ot.sinkhorn(cost64, epsilon=eps, max_iter=n, tol=0.0), n),
        ("standard domain, float32, tol=0", lambda: ot.sinkhorn(cost32, epsilon=eps, max_iter=n, tol=0.0, log_domain=False), n),
        ("log domain, float32, tol=0, grad=unrolled fwd + bwd", unrolled_backward, n),
        ("topk_mask(plan, k=2)", lambda: ot.topk_mask(plan, 2), 0),
        ("softmax_assignment(cost, temperature=eps)", lambda: ot.softmax_assignment(cost32, temperature=eps), 0),
    ]

    for _, fn, _ in rows:  # warm-up: kernels, allocator
        fn()
    threads = torch.get_num_threads() if args.device == "cpu" else None
    print(
        f"device={args.device} threads={threads} B={args.batch} N={args.tokens} K={args.subspaces} eps={eps} "
        f"dim={args.dim} cost in [{cost32.min().item():.2f}, {cost32.max().item():.2f}] iters={n} repeats={args.repeats} "
        f"torch={torch.__version__}"
    )
    print(f"final marginal error (float32, {n} iters): {ot.sinkhorn(cost32, epsilon=eps, max_iter=n, tol=0.0).marginal_error.max().item():.2e}")
    print(f"load average before timing: {os.getloadavg()[0]:.1f}")
    print(f"| {'what':<52} | {'median ms':>9} | {'CPU ms':>8} | {'ms / iter':>9} |")
    print(f"|{'-' * 54}|{'-' * 11}|{'-' * 10}|{'-' * 11}|")
    for name, fn, iters in rows:
        sec, cpu = measure(fn, args.device, args.repeats)
        per = f"{1e3 * sec / iters:>9.3f}" if iters else f"{'':>9}"
        print(f"| {name:<52} | {1e3 * sec:>9.1f} | {1e3 * cpu:>8.1f} | {per} |", flush=True)


if __name__ == "__main__":
    main()
