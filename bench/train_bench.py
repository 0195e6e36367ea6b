"""Training throughput: recscale's set-batched models vs the same math done the straightforward way.

    python bench/train_bench.py [--models DNN,IPNN,NFwFM,XDeepFM,DCNv2,FinalMLP] [--steps 8] [--device cpu|cuda]
    python bench/train_bench.py --profile DCNv2 --mode ME --scale 10      # where one step's time goes
    python bench/train_bench.py --device cuda --cells SE1,ME10 --json out.json   # on a GPU (bench/gpu_check.sh)

Embedding tables have the Criteo icml24 sizes (39 fields, 1,086,810 rows). For every model at 1x, SE 10x and ME 10x:

* recscale: one (sum|V|, M*D) table, per-set weights stacked on a set axis, torch's fused Adam.
* baseline ("straightforward"): one nn.Embedding per set, one single-set backbone per set run in a Python loop, the
  shared head, torch's default Adam (for-loop implementation), dense embedding gradients. Its weights are copied from
  the recscale model, so both compute the same function.

Both train on the same random batches (batch 2048) with dropout off (the two draw dropout masks in a different order;
everything else is the recipe), so their losses must agree step by step to float tolerance; the script checks it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from recscale.data.synth import criteo_reference_dims
from recscale.models import backbones as bb
from recscale.models.layers import FieldWeightedPairs, SetBatchNorm, SetLinear, flatten
from recscale.models.module import CTRModel

BASE = {"NFwFM": 50}


def slice_into(single: nn.Module, batched: nn.Module, m: int, M: int) -> None:
    """Copy set m of every set-batched parameter of `batched` into the single-set module `single` (same structure)."""
    with torch.no_grad():
        for (name, a), (_, b) in zip(single.named_modules(), batched.named_modules()):
            if isinstance(a, SetLinear):
                src = lambda p: p[m : m + 1] if p.shape[0] == M else p  # noqa: E731
                a.weight.copy_(src(b.weight))
                if a.bias is not None:
                    a.bias.copy_(src(b.bias))
            elif isinstance(a, SetBatchNorm):
                C = a.bn.num_features
                for k in ("weight", "bias", "running_mean", "running_var"):
                    getattr(a.bn, k).copy_(getattr(b.bn, k)[m * C : (m + 1) * C])
            elif isinstance(a, FieldWeightedPairs):
                a.r.copy_(b.r[m : m + 1] if b.r.shape[0] == M else b.r)


class Looped(nn.Module):
    """The straightforward ME model: a Python loop over sets, each with its own table and backbone."""

    def __init__(self, ref: CTRModel, cls, kwargs):
        super().__init__()
        M, D, dims = ref.num_sets, ref.embed_dim, ref.embedding.field_dims
        self.M, self.cls = M, cls
        if cls is bb.IPNN:  # the single-set copies must make the batched model's choice, not the SE default
            kwargs = {**kwargs, "with_embeddings": ref.backbone.with_embeddings}
        self.register_buffer("offsets", ref.embedding.offsets.clone())
        self.tables = nn.ModuleList(nn.Embedding(sum(dims), D) for _ in range(M))
        self.sets = nn.ModuleList(cls(len(dims), D, 1, **kwargs) for _ in range(M))
        for s in self.sets:  # textbook CIN (materialised (H x F, D) outer products) and cross layers (autograd)
            if hasattr(s, "cin"):
                s.cin.naive = True
            if hasattr(s, "cross"):
                s.cross.naive = True
        with torch.no_grad():
            for m in range(M):
                self.tables[m].weight.copy_(ref.embedding.weight[:, m * D : (m + 1) * D])
                slice_into(self.sets[m], ref.backbone, m, M)
        self.head = copy.deepcopy(ref.backbone)  # shared (non set-batched) parts are read from here
        if cls not in (bb.XDeepFM, bb.FinalMLP):
            for s in self.sets:  # the per-set backbone stops after its projection: Tower returns project(z)
                s.tower.shared, s.tower.out = nn.Identity(), None

    def forward(self, ids):
        es = [t(ids + self.offsets)[None] for t in self.tables]  # M x (1, B, F, D)
        h = self.head
        if self.cls is bb.XDeepFM:
            cin = torch.stack([s.cin(e)[0] for s, e in zip(self.sets, es)]).mean(0)
            hid = torch.stack([s.tower.project(flatten(e))[0] for s, e in zip(self.sets, es)]).mean(0)
            return h.cin_out(cin).squeeze(-1) + h.tower.out(h.tower.shared(hid)).squeeze(-1)
        if self.cls is bb.FinalMLP:
            xs, ys = zip(*[(s.streams[0](flatten(e))[0], s.streams[1](flatten(e))[0]) for s, e in zip(self.sets, es)])
            x, y = torch.stack(xs).mean(0), torch.stack(ys).mean(0)
            return (h.wx(x) + h.wy(y)).squeeze(-1) + ((x @ h.wxy) * y).sum(-1)
        # Tower topology (DNN, IPNN, NFwFM, DCNv2): each set's backbone ends at its projection (see __init__)
        hid = torch.stack([s(e) for s, e in zip(self.sets, es)]).mean(0)
        return h.tower.out(h.tower.shared(hid)).squeeze(-1)


def make(cls, mode, scale, dims, seed=0):
    torch.manual_seed(seed)
    kw = {"dropout": 0.0}
    model = CTRModel(lambda f, d, m: cls(f, d, m, **kw), field_dims=dims, base_dim=BASE.get(cls.__name__, 10),
                     mode=mode, scale=scale, fused_adam=True)
    return model, kw


def batches(dims, n, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.stack([torch.randint(0, d, (B,), generator=g) for d in dims], 1).int()
        w = torch.randn(len(dims), generator=g)
        y = (torch.sigmoid((ids.float().log1p() * w).sum(1) / 10) > torch.rand(B, generator=g)).float()
        out.append((ids, y))
    return out


def train(model, opt, data, device, loss_fn):
    model.train()
    losses, times = [], []
    for ids, y in data:
        ids, y = ids.to(device), y.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(ids), y)
        loss.backward()
        if hasattr(model, "embedding") and hasattr(model.embedding, "densify_grad"):
            model.embedding.densify_grad()  # what CTRModel.on_before_optimizer_step does under Lightning
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return losses, times


def bench_one(cls, mode, scale, dims, steps, B, device, compare=True, baseline_fused=False, rounds=1):
    """Time recscale, free it, then rebuild the same initial weights (same seed) for the baseline: one contender in
    memory at a time (NFwFM SE 10x alone holds 2.2 GB of embeddings, x4 with gradient and Adam states).

    With ``rounds > 1`` the two contenders alternate (A B A B ...) and each rate is the median over rounds: on this
    noisy machine a contender's speed also depends on what ran before it in the process."""
    data = batches(dims, steps + 2, B)
    res = {"recscale": [], "baseline": []}
    for _ in range(rounds):
        model, _kw = make(cls, mode, scale, dims)
        model.to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6, fused=True)
        la, ta = train(model, opt, data, device, model.loss)
        res["recscale"].append(B / (sum(ta[2:]) / steps))
        del model, opt
        gc.collect()
        if compare:
            ref, kw = make(cls, mode, scale, dims)
            looped = Looped(ref, cls, kw)
            del ref
            gc.collect()
            looped.to(device)
            # torch's default Adam implementation (or, to isolate the optimizer's rounding, the same fused kernel)
            opt_b = torch.optim.Adam(looped.parameters(), lr=1e-3, weight_decay=1e-6, fused=baseline_fused or None)
            lb, tb = train(looped, opt_b, data, device, nn.functional.binary_cross_entropy_with_logits)
            res["baseline"].append(B / (sum(tb[2:]) / steps))
            res["max_loss_diff"] = max(res.get("max_loss_diff", 0.0), max(abs(a - b) for a, b in zip(la, lb)))
            del looped, opt_b
            gc.collect()
    return {k: (statistics.median(v) if isinstance(v, list) else v) for k, v in res.items() if v != []}


def profile(cls, mode, scale, dims, B, device):
    model, _ = make(cls, mode, scale, dims)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6, fused=True)
    data = batches(dims, 4, B)
    train(model, opt, data[:2], device, model.loss)
    from torch.profiler import ProfilerActivity, profile as tprofile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for ids, y in data[2:]:
            ids, y = ids.to(device), y.to(device)
            with record_function("forward"):
                loss = model.loss(model(ids), y)
            with record_function("backward"):
                opt.zero_grad(set_to_none=True)
                loss.backward()
            with record_function("optimizer.step"):
                model.embedding.densify_grad()
                opt.step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=14))
    tot = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key in ("forward", "backward", "optimizer.step")}
    s = sum(tot.values())
    print("share of the step:", {k: f"{v / s:.0%}" for k, v in tot.items()})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="DNN,IPNN,NFwFM,XDeepFM,DCNv2,FinalMLP")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", default=None, help="profile one model instead (with --mode, --scale)")
    ap.add_argument("--mode", default="ME")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--cells", default="SE1,SE10,ME10", help="cells to run, e.g. ME10")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the contenders this many times; report medians")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file (bench/gpu_check.sh)")
    ap.add_argument("--baseline-fused", action="store_true",
                    help="give the baseline the fused Adam too (checks that the remaining loss difference is rounding)")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    dims = criteo_reference_dims()
    if a.profile:
        profile(getattr(bb, a.profile), a.mode, a.scale, dims, a.batch_size, device)
        return
    print(f"device {device}, {torch.get_num_threads()} threads, Criteo tables ({sum(dims):,} rows), batch "
          f"{a.batch_size}, {a.steps} timed steps after 2 warm-up steps, median of {a.rounds} alternating round(s); "
          "samples/s")
    print(f"{'model':<9} {'cell':<7} {'recscale':>10} {'baseline':>10} {'ratio':>6} {'max |loss diff|':>16}")
    rows = []
    for name in a.models.split(","):
        cls = getattr(bb, "XDeepFM" if name == "xDeepFM" else name)
        for cell in a.cells.split(","):
            mode, scale = cell[:2], int(cell[2:])
            r = bench_one(cls, mode, scale, dims, a.steps, a.batch_size, device, baseline_fused=a.baseline_fused,
                          rounds=a.rounds)
            rows.append({"model": name, "mode": mode, "scale": scale, "device": str(device),
                         "batch_size": a.batch_size, **r})
            if "baseline" in r:
                print(f"{name:<9} {mode} {scale:>2}x {r['recscale']:>10,.0f} {r['baseline']:>10,.0f} "
                      f"{r['recscale'] / r['baseline']:>6.2f} {r['max_loss_diff']:>16.2e}", flush=True)
            else:
                print(f"{name:<9} {mode} {scale:>2}x {r['recscale']:>10,.0f} {'':>10} {'':>6} {'':>16}", flush=True)
            if a.json:  # after every row: a run cut short by a timeout keeps what it measured
                Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
