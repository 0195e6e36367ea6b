"""`recscale toy`: the toy experiment of ICML 2024 Sec. 4.1 / App. G (Fig. 4).

N = 3 fields with |X1| = |X2| = 100; every (x1, x2) pair appears once, with x3 ~ U[X3] and y ~ U{0, 1} (10,000 rows).
FM interaction ``h = <e1, e2> + <e1, e3> + <e2, e3>``, BCE on h; all tables N(0, 1); E2 and E3 fixed; E1 trained with
full-batch SGD, learning rate 1, 5,000 iterations. |X3| = 3 (small, low-IA E3) versus |X3| = 100 (large): interacting
with the low-IA field collapses E1 (lower IA(E1)). The paper does not state the embedding size K; it needs
|X3|=3 < K << 100, and K = 10 is the default here.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from recscale.diagnostics.metrics import information_abundance


def run_toy(d3: int, dim: int = 10, iterations: int = 5000, lr: float = 1.0, seed: int = 0, every: int = 50,
            d1: int = 100, d2: int = 100) -> list[tuple[int, float]]:
    """IA(E1) every `every` iterations (and at 0 and the end)."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.arange(d1).repeat_interleave(d2)
    x2 = torch.arange(d2).repeat(d1)
    x3 = torch.randint(0, d3, (d1 * d2,), generator=g)
    y = torch.randint(0, 2, (d1 * d2,), generator=g).float()
    E1 = torch.randn(d1, dim, generator=g, dtype=torch.float64).requires_grad_(True)
    E2 = torch.randn(d2, dim, generator=g, dtype=torch.float64)
    E3 = torch.randn(d3, dim, generator=g, dtype=torch.float64)
    e2, e3 = E2[x2], E3[x3]
    fixed = (e2 * e3).sum(1)
    curve = [(0, information_abundance(E1))]
    for it in range(1, iterations + 1):
        e1 = E1[x1]
        h = (e1 * (e2 + e3)).sum(1) + fixed
        loss = F.binary_cross_entropy_with_logits(h, y.double())
        (grad,) = torch.autograd.grad(loss, E1)
        with torch.no_grad():
            E1 -= lr * grad
        if it % every == 0 or it == iterations:
            curve.append((it, information_abundance(E1)))
    return curve


def toy_command(output: str = "outputs/toy", dim: int = 10, iterations: int = 5000, seed: int = 0,
                small: int = 3, large: int = 100, mlflow_log: bool = True) -> dict:
    t = time.perf_counter()
    curves = {"small": run_toy(small, dim, iterations, seed=seed), "large": run_toy(large, dim, iterations, seed=seed)}
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
