"""`recscale toy`: the toy experiment of ICML 2024 Sec. 4.1 / App. G (Fig. 4).

N = 3 fields with |X1| = |X2| = 100; every (x1, x2) pair appears once, with x3 ~ U[X3] and y ~ U{0, 1} (10,000 rows).
FM interaction ``h = <e1, e2> + <e1, e3> + <e2, e3>``, BCE on h; all tables N(0, 1); E2 and E3 fixed; E1 trained with
full-batch SGD, learning rate 1, 5,000 iterations. |X3| = 3 (small, low-IA E3) versus |X3| = 100 (large): interacting
with the low-IA field collapses E1 (lower IA(E1)). The paper does not state the embedding size K; it needs
|X3|=3 < K << 100, and K = 10 is the default here.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import torch

from recscale.diagnostics.metrics import information_abundance


def toy_gradient(E1: torch.Tensor, s: torch.Tensor, fixed: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of the mean BCE with respect to E1 in closed form (what autograd computes, without its graph).

    Rows are all pairs (x1, x2) in x1-major order, so the rows of x1 = i are the block ``i*|X2| .. (i+1)*|X2|-1``:
    ``h_r = <E1[x1_r], s_r> + fixed_r`` with ``s_r = e2_r + e3_r``, ``dL/dh_r = (sigmoid(h_r) - y_r) / n`` and
    ``dL/dE1[i] = sum_{r: x1_r = i} dL/dh_r * s_r``.  E1 (d1, K), s (d1, d2, K), fixed and y (d1, d2).
    """
    h = torch.einsum("ik,ijk->ij", E1, s) + fixed  # (d1, d2)
    g = (torch.sigmoid(h) - y) / y.numel()  # (d1, d2)
    return torch.einsum("ij,ijk->ik", g, s)  # (d1, K)


def run_toy(d3: int, dim: int = 10, iterations: int = 5000, lr: float = 1.0, seed: int = 0, every: int = 50,
            d1: int = 100, d2: int = 100, progress: bool = False) -> list[tuple[int, float]]:
    """IA(E1) every `every` iterations (and at 0 and the end); with `progress`, a line every 1,000 iterations.

    Runs on one thread: the tensors are tiny (100 x 100 x K), and on a busy machine torch's thread pool makes each
    step about 100x slower (53 ms vs 0.4 ms per gradient measured on 2 loaded cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_toy(d3, dim, iterations, lr, seed, every, d1, d2, progress)
    finally:
        torch.set_num_threads(threads)


def _run_toy(d3, dim, iterations, lr, seed, every, d1, d2, progress) -> list[tuple[int, float]]:
    g = torch.Generator().manual_seed(seed)
    x2 = torch.arange(d2).repeat(d1)
    x3 = torch.randint(0, d3, (d1 * d2,), generator=g)
    y = torch.randint(0, 2, (d1 * d2,), generator=g).double().view(d1, d2)
    E1 = torch.randn(d1, dim, generator=g, dtype=torch.float64)
    E2 = torch.randn(d2, dim, generator=g, dtype=torch.float64)
    E3 = torch.randn(d3, dim, generator=g, dtype=torch.float64)
    e2, e3 = E2[x2], E3[x3]
    fixed = (e2 * e3).sum(1).view(d1, d2)
    s = (e2 + e3).view(d1, d2, dim)
    curve = [(0, information_abundance(E1))]
    t = time.perf_counter()
    for it in range(1, iterations + 1):
        E1 -= lr * toy_gradient(E1, s, fixed, y)
        if it % every == 0 or it == iterations:
            curve.append((it, information_abundance(E1)))
        if progress and (it % 1000 == 0 or it == iterations):
            print(f"toy: |X3| = {d3}: iteration {it:,}/{iterations:,}, IA(E1) = {curve[-1][1]:.3f} "
                  f"({time.perf_counter() - t:.1f} s)", file=sys.stderr, flush=True)
    return curve


def toy_command(output: str = "outputs/toy", dim: int = 10, iterations: int = 5000, seed: int = 0,
                small: int = 3, large: int = 100, mlflow_log: bool = True, progress: bool = True) -> dict:
    t = time.perf_counter()
    curves = {"small": run_toy(small, dim, iterations, seed=seed, progress=progress),
              "large": run_toy(large, dim, iterations, seed=seed, progress=progress)}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "toy_ia.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", f"ia_e1_d3_{small}", f"ia_e1_d3_{large}"])
        for (it, a), (_, b) in zip(curves["small"], curves["large"]):
            w.writerow([it, f"{a:.6f}", f"{b:.6f}"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, d3 in (("small", small), ("large", large)):
        ax.plot(*zip(*curves[name]), label=f"|X3| = {d3} ({name})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("IA(E1)")
    ax.set_title("ICML 2024 toy experiment (Fig. 4)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "toy_ia.png", dpi=110)
    plt.close(fig)
    summary = {"final_ia_small": curves["small"][-1][1], "final_ia_large": curves["large"][-1][1],
               "seconds": round(time.perf_counter() - t, 2), "output": str(out)}
    if mlflow_log:
        import mlflow

        from recscale.tracking import default_tracking_uri

        mlflow.set_tracking_uri(default_tracking_uri())
        _ensure_experiment(mlflow, "toy")
        with mlflow.start_run(run_name=f"toy-K{dim}-seed{seed}"):
            mlflow.log_params({"dim": dim, "iterations": iterations, "seed": seed, "d3_small": small, "d3_large": large})
            for name in ("small", "large"):
                for it, ia in curves[name]:
                    mlflow.log_metric(f"ia_e1_{name}", ia, step=it)
            mlflow.log_artifact(str(out / "toy_ia.csv"))
            mlflow.log_artifact(str(out / "toy_ia.png"))
            summary["mlflow_run_id"] = mlflow.active_run().info.run_id
    return summary


def _ensure_experiment(mlflow, name: str) -> None:
    from recscale.tracking import ensure_experiment

    ensure_experiment(mlflow.get_tracking_uri(), name)
    mlflow.set_experiment(name)
