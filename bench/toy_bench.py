"""`recscale toy` speed: the closed-form gradient on one thread (now) against autograd on torch's default thread pool
(before), per iteration, and the whole command (2 x 5,000 iterations, figure and CSV).

    python bench/toy_bench.py [--iterations 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recscale.diagnostics.toy import toy_command, toy_gradient  # noqa: E402


def setup(d3: int = 3, dim: int = 10, d1: int = 100, d2: int = 100):
    g = torch.Generator().manual_seed(0)
    x1 = torch.arange(d1).repeat_interleave(d2)
    x2 = torch.arange(d2).repeat(d1)
    x3 = torch.randint(0, d3, (d1 * d2,), generator=g)
    y = torch.randint(0, 2, (d1 * d2,), generator=g).double()
    E1 = torch.randn(d1, dim, generator=g, dtype=torch.float64)
    E2 = torch.randn(d2, dim, generator=g, dtype=torch.float64)
    E3 = torch.randn(d3, dim, generator=g, dtype=torch.float64)
    return x1, x2, x3, y, E1, E2[x2], E3[x3]


def before(iterations: int) -> float:
    """The previous loop: gather E1 rows, autograd, torch's default threads."""
    x1, _, _, y, E1, e2, e3 = setup()
    E1.requires_grad_(True)
    fixed = (e2 * e3).sum(1)
    t = time.perf_counter()
    for _ in range(iterations):
        h = (E1[x1] * (e2 + e3)).sum(1) + fixed
        (grad,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(h, y), E1)
        with torch.no_grad():
            E1 -= grad
    return (time.perf_counter() - t) / iterations


def after(iterations: int) -> float:
    _, _, _, y, E1, e2, e3 = setup()
    d1, d2, k = 100, 100, E1.shape[1]
    s, fixed, y2 = (e2 + e3).view(d1, d2, k), (e2 * e3).sum(1).view(d1, d2), y.view(d1, d2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = time.perf_counter()
        for _ in range(iterations):
            E1 -= toy_gradient(E1, s, fixed, y2)
        return (time.perf_counter() - t) / iterations
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=300)
    a = ap.parse_args()
    b, n = before(a.iterations), after(a.iterations)
    print(f"per iteration, {a.iterations} iterations, torch threads {torch.get_num_threads()}:")
    print(f"  before (autograd, default threads): {b * 1e3:.2f} ms")
    print(f"  after  (closed form, one thread):   {n * 1e3:.2f} ms")
    print(f"  ratio before / after: {b / n:.1f}x")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        s = toy_command(tmp, mlflow_log=False, progress=False)
        print(f"recscale toy (2 x 5,000 iterations, CSV + figure, no MLflow): {time.perf_counter() - t:.1f} s; "
              f"final IA(E1) |X3|=3: {s['final_ia_small']:.3f}, |X3|=100: {s['final_ia_large']:.3f}")


if __name__ == "__main__":
    main()
