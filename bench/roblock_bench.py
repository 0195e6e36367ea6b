"""RoBlock training cost: DCNv2 L = 4 plain vs with RoBlock, and where a block's time goes.

    python bench/roblock_bench.py [--cells SE1,ME4] [--steps 4] [--rounds 3] [--batch-size 2048] [--split-reps 5]

Embedding tables have the Criteo icml24 sizes (39 fields, 1,086,810 rows), batch 2048, the recipe's Adam (fused),
dropout as configured. Contenders, alternated round by round (A B C A B C ...; each figure the median over rounds):

* plain:   ``DCNv2(cross_layers=4)`` (the project's fused cross network), the baseline of the ratio;
* roblock: ``RoBlockNet(interaction="cross", blocks=4, components=4)`` with normalised linear HSIC, beta = 0.1
  (configs/model/roblock_dcnv2.yaml);
* roblock-fact: the same with the ``factorized`` router (dynamic within-field gates times a learned cross-field
  mixing; trains on the fused block path);
* roblock-fact-bf (``--layout-ab``): roblock-fact with RoBlockNet's batch-last stack switched off;
* roblock-fact-torch, roblock-within-torch (``--native-ab``): those two with the native decode-mix kernel off
  (``native_kernel: false``; recscale/models/decode_mix.py), the A/B of the kernel;
* roblock-within: the same with the ``within_field`` router (candidates of the output field only: N = M K instead
  of M F K gates per field and head), to show what the cross-field mixing costs;
* roblock-gauss (``--gaussian``): the same with the Gaussian-kernel HSIC (flattened components, 1024-row subsample),
  reported, not targeted (the component split always reports the Gaussian HSIC's own cost).

Then a per-component split of one block (forward + backward, median of ``--split-reps``) on (M, 2048, 39, 10)
activations: interaction (cross layer) / rebalancing (R1UN) / decoupler + HSIC / dense router, each through its own
module (the path the dense ``dynamic`` router trains on), then the fused tail (``RoBlock.fused_tail``: rebalancing,
decoupler, HSIC and router in one pass, the path of the field-local routers) for the ``factorized`` and
``within_field`` routers, and the Gaussian HSIC and its random-Fourier-feature approximation.
Target (issue 11): roblock step time <= 1.5 x plain.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from recscale.data.synth import criteo_reference_dims
from recscale.models.backbones import DCNv2
from recscale.models.module import CTRModel
from recscale.models.roblock import RoBlock, RoBlockNet

ROBLOCK = dict(interaction="cross", blocks=4, components=4, beta=0.1, hsic_kernel="linear")


def batch_first(f, d, m):
    """The factorized RoBlock stack with the batch-last layout switched off (every block transposes in and out)."""
    net = RoBlockNet(f, d, m, **{**ROBLOCK, "router": "factorized"})
    net.batch_last = False
    return net


def contenders(gaussian: bool, layout_ab: bool = False, native_ab: bool = False) -> dict:
    c = {"plain": lambda f, d, m: DCNv2(f, d, m, cross_layers=4),
         "roblock": lambda f, d, m: RoBlockNet(f, d, m, **ROBLOCK)}
    c["roblock-fact"] = lambda f, d, m: RoBlockNet(f, d, m, **{**ROBLOCK, "router": "factorized"})
    c["roblock-within"] = lambda f, d, m: RoBlockNet(f, d, m, **{**ROBLOCK, "router": "within_field"})
    if layout_ab:
        c["roblock-fact-bf"] = batch_first
    if native_ab:
        c["roblock-fact-torch"] = lambda f, d, m: RoBlockNet(f, d, m, **{**ROBLOCK, "router": "factorized",
                                                                         "native_kernel": False})
        c["roblock-within-torch"] = lambda f, d, m: RoBlockNet(f, d, m, **{**ROBLOCK, "router": "within_field",
                                                                           "native_kernel": False})
    if gaussian:
        c["roblock-gauss"] = lambda f, d, m: RoBlockNet(f, d, m, **{**ROBLOCK, "hsic_kernel": "gaussian"})
    return c


def batches(dims, n, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.stack([torch.randint(0, d, (B,), generator=g) for d in dims], 1)
        out.append((ids, (torch.rand(B, generator=g) < 0.25).float()))
    return out


def step_times(build, mode, scale, dims, data) -> list[float]:
    torch.manual_seed(0)
    model = CTRModel(build, field_dims=dims, mode=mode, scale=scale)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6, fused=True)
    times = []
    for ids, y in data:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model.loss(model(ids), y)
        loss.backward()
        model.embedding.densify_grad()
        opt.step()
        times.append(time.perf_counter() - t)
    del model, opt
    gc.collect()
    return times[2:]  # 2 warm-up steps


def timed(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def component_split(M: int, B: int, F: int, D: int, reps: int, gaussian: bool) -> dict[str, float]:
    """Seconds per block (forward + backward) of each component on random activations of the block's shapes."""
    torch.manual_seed(0)
    blk = RoBlock(M, M, F, D, interaction="cross", components=4)
    blk.train()
    x = torch.randn(M, B, F, D, requires_grad=True)
    x0 = torch.randn(M, B, F, D)
    z = blk.interaction(x, x0).detach().requires_grad_()
    y = blk.rebalance(z).detach().requires_grad_()
    c = blk.decoupler(y).detach().requires_grad_()

    def inter():
        blk.interaction(x, x0).sum().backward()

    def reb():
        blk.rebalance(z).sum().backward()

    def dec():
        cc = blk.decoupler(y)
        (cc.sum() + 0.1 * blk.hsic(cc)).backward()

    def rou():
        blk.router(y, c).sum().backward()

    out = {"interaction": timed(inter, reps), "rebalancing": timed(reb, reps), "decoupler+hsic": timed(dec, reps),
           "router": timed(rou, reps)}
    for variant in ("factorized", "within_field"):  # the fused path: rebalancing + decoupler + HSIC + router at once
        torch.manual_seed(0)
        fb = RoBlock(M, M, F, D, interaction="cross", components=4, router=variant)
        fb.train()

        def tail():
            e, h = fb.fused_tail(z, True, True)
            (e.sum() + 0.1 * h).backward()

        out[f"fused tail, {variant} router (alone)"] = timed(tail, reps)
    if gaussian:
        blk.hsic_kernel = "gaussian"
        out["gaussian hsic (alone)"] = timed(lambda: blk.hsic(c).backward(), reps)
        rff = RoBlock(M, M, F, D, interaction="cross", components=4, hsic_kernel="rff")
        out["rff hsic, 256 features (alone)"] = timed(lambda: rff.hsic(c).backward(), reps)
        blk.hsic_kernel = "linear"
        out["linear hsic (alone)"] = timed(lambda: blk.hsic(c).backward(), reps)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default="SE1,ME4")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per contender and round (after 2 warm-up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--split-reps", type=int, default=5)
    ap.add_argument("--gaussian", action="store_true", help="also time RoBlock with the Gaussian-kernel HSIC")
    ap.add_argument("--layout-ab", action="store_true",
                    help="also time the factorized stack batch-first (roblock-fact-bf), the A/B of the batch-last stack")
    ap.add_argument("--native-ab", action="store_true",
                    help="also time the factorized and within-field stacks with the native decode-mix kernel off "
                         "(roblock-fact-torch, roblock-within-torch: torch operations that write the components)")
    ap.add_argument("--only", default="", help="comma-separated contenders to run (plain is always run)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1: on a loaded machine two OpenMP threads wait at barriers for each other "
                         "and small ops slow down >10x, which penalises many-op models; 0 keeps torch's default)")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dims = criteo_reference_dims()
    B = a.batch_size
    print(f"cpu, {torch.get_num_threads()} threads, Criteo tables ({sum(dims):,} rows), batch {B}, {a.steps} timed "
          f"steps after 2 warm-up, median over {a.rounds} alternating round(s) of each contender's median step")
    data = batches(dims, a.steps + 2, B)
    for cell in a.cells.split(","):
        mode, scale = cell[:2], int(cell[2:])
        res: dict[str, list[float]] = {}
        for _ in range(a.rounds):
            for name, build in contenders(a.gaussian, a.layout_ab, a.native_ab).items():
                if a.only and name != "plain" and name not in a.only.split(","):
                    continue
                res.setdefault(name, []).append(statistics.median(step_times(build, mode, scale, dims, data)))
        base = statistics.median(res["plain"])
        for name, ts in res.items():
            t = statistics.median(ts)
            print(f"{mode} {scale}x  {name:<14} step {t * 1e3:8.1f} ms  {B / t:9,.0f} samples/s  "
                  f"x{t / base:5.2f} of plain   (rounds: {', '.join(f'{v * 1e3:.0f}' for v in ts)} ms)", flush=True)
        split = component_split(scale if mode == "ME" else 1, B, len(dims), 10 if mode == "ME" else 10 * scale,
                                a.split_reps, True)
        tot = sum(v for k, v in split.items() if "alone" not in k)
        print(f"{mode} {scale}x  one block, forward + backward, median of {a.split_reps}: " + ", ".join(
            f"{k} {v * 1e3:.1f} ms" + ("" if "alone" in k else f" ({v / tot:.0%})") for k, v in split.items()),
            flush=True)


if __name__ == "__main__":
    main()
