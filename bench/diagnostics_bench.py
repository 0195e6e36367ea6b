"""Cost of the collapse diagnostics on Criteo-size tables, against straightforward SVDs, and next to training.

    python bench/diagnostics_bench.py [--skip-svd-baseline]

* IA + spectra pass over all 39 fields (1,086,810 rows) for SE 10x (D = 100) and ME 10x (10 sets x 10), random weights:
  recscale (one float64 Gram per field) vs `torch.linalg.svdvals` of every table (per set and concatenated).
* RankMe of 50,000 x 390 and 50,000 x 3,900 matrices: Gram path (float64 as specified, from triangular column blocks;
  the plain float64 `X.T @ X`; float32 products accumulated in float64) vs `torch.linalg.svdvals`.
* `--precision-study`: would a cheaper Gram do? float32 products and an int8 split with exact integer products
  (Ozaki-style, 3 slices of 7 bits per column; `torch._int_mm`) against the float64 Gram, on three 50,000 x 3,900
  matrices: the benchmark's, a collapsed one (rank 50 plus 1e-3 noise) and one with heavy-tailed row norms (like
  per-sample gradients). Prints time and relative RankMe error.
* The whole callback pass (IA, spectra, diversity, DCNv2 sub-embedding IA, RankMe of embeddings and gradients on
  50,000 rows, figures) as a fraction of one training epoch on the same data (DCNv2 ME 10x, 36.7M training rows,
  samples/s measured here).
* `--layers`: the per-layer diagnostics (issue 11: IA and RankMe of every cross layer's output) at DCNv2 depth 8, SE 1x
  and ME 10x, Criteo table sizes, 50,000-row sample: the whole pass with and without them, rounds alternating, and
  the ratio (target: the per-layer part adds <= 10 %).
Targets (issue 4, 2 CPU cores): IA + spectra <= 5 s; each RankMe <= 2 s.
"""

from __future__ import annotations

import argparse
import time

import torch

from recscale.data.synth import criteo_reference_dims
from recscale.diagnostics import metrics as mt
from recscale.diagnostics.compute import Options, compute_report, field_grams
from recscale.models import backbones as bb
from recscale.models.module import CTRModel

TRAIN_ROWS = 36_689_600  # 8/10 of Criteo's 45,840,617 lines


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def ia_spectra(model):
    full, per_set = field_grams(model)
    ia = [mt.information_abundance(sigma=mt.spectrum_from_gram(g)) for g in full]
    ia_sets = [[mt.information_abundance(sigma=mt.spectrum_from_gram(g)) for g in gs] for gs in per_set]
    return ia, ia_sets


def ia_spectra_svd(model):
    emb = model.embedding
    out = []
    for f in range(len(emb.field_dims)):
        out.append(float(torch.linalg.svdvals(emb.table(f).detach().double()).sum()))
        if emb.num_sets > 1:
            for m in range(emb.num_sets):
                torch.linalg.svdvals(emb.table(f, m).detach().double())
    return out


def gram_int8(x, k=3):
    """X^T X from k int8 slices per column (power-of-two column scales, remainders times 128), exact int32 products
    ``Q_a^T Q_b`` for a + b < k, summed in float64. Exact but for the split itself."""
    n, d = x.shape
    colmax = x.abs().amax(0)
    scale = torch.exp2(torch.floor(torch.log2(127.0 / colmax.clamp_min(1e-30))))
    qs = [torch.empty(n, d, dtype=torch.int8) for _ in range(k)]
    rows = max(1, (1 << 19) // d)
    for s0 in range(0, n, rows):
        r = x[s0:s0 + rows] * scale
        for a in range(k):
            q = r.round()
            qs[a][s0:s0 + rows] = q
            r = (r - q) * 128.0
    g = torch.zeros(d, d, dtype=torch.float64)
    for a in range(k):
        for b in range(a, k - a):
            p = torch._int_mm(qs[a].T, qs[b]).double() * 128.0 ** -(a + b)
            g += p if a == b else p + p.T
    s = scale.double()
    return g / (s[:, None] * s[None, :])


def precision_study(n):
    g = torch.Generator().manual_seed(2)
    d = 3900
    mats = {
        "benchmark (columns scaled 1..1e-2)": torch.randn(n, d, generator=g) * torch.logspace(0, -2, d),
        "collapsed (rank 50 + 1e-3 noise)": torch.randn(n, 50, generator=g) @ torch.randn(50, d, generator=g)
        + 1e-3 * torch.randn(n, d, generator=g),
        "heavy-tailed row norms (Pareto 1.5)": torch.randn(n, d, generator=g) * torch.logspace(0, -1, d)
        * (torch.rand(n, 1, generator=g) ** (-1 / 1.5)),
    }
    for name, z in mats.items():
        rk = lambda gram: mt.rankme(sigma=mt.spectrum_from_gram(gram))  # noqa: E731
        t64, r64 = timed(lambda: rk(mt.xtx(z.double())))
        t32, r32 = timed(lambda: rk((z.T @ z).double()))
        t8, r8 = timed(lambda: rk(gram_int8(z)))
        print(f"RankMe {n:,} x {d:,}, {name}: float64 {r64:.6g} ({t64:.2f} s) | float32 products rel. error "
              f"{abs(r32 - r64) / r64:.1e} ({t32:.2f} s) | int8 x3 slices rel. error {abs(r8 - r64) / r64:.1e} "
              f"({t8:.2f} s)", flush=True)
        del z


def layers_study(n: int, rounds: int, only: str | None = None) -> None:
    """Pass time with and without the per-layer part, DCNv2 depth 8, alternating rounds, best of `rounds` each."""
    dims = criteo_reference_dims()
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randint(0, d, (n,), generator=g) for d in dims], 1).int()
    y = torch.randint(0, 2, (n,), generator=g).float()
    for mode, scale in [ms for ms in (("SE", 1), ("ME", 10)) if only in (None, ms[0])]:
        torch.manual_seed(0)
        model = CTRModel(lambda f, d, m: bb.DCNv2(f, d, m, cross_layers=8), field_dims=dims, mode=mode, scale=scale)
        best = {True: float("inf"), False: float("inf")}
        parts = {}
        for _ in range(rounds):
            for with_layers in (False, True):
                t, rep = timed(lambda: compute_report(model, (ids, y), Options(layers=with_layers)))
                best[with_layers] = min(best[with_layers], t)
                if with_layers:
                    parts = {k.split("/")[1]: v for k, v in rep.metrics.items() if k.startswith("seconds/")}
        split = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
        share = parts["layers"] / (sum(parts.values()) - parts["layers"])
        print(f"DCNv2 depth 8 {mode} {scale}x, {n:,}-row sample ({Options().layer_rows:,} for layers): pass without "
              f"layers {best[False]:.1f} s | with layers {best[True]:.1f} s | ratio x{best[True] / best[False]:.3f} | "
              f"layers part / rest of the same pass {share:.3f} (parts, s: {split})", flush=True)
        del model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-svd-baseline", action="store_true")
    ap.add_argument("--sample-rows", type=int, default=50_000)
    ap.add_argument("--precision-study", action="store_true", help="only the cheaper-Gram accuracy study")
    ap.add_argument("--layers", action="store_true", help="only the per-layer diagnostics cost at depth 8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", choices=["SE", "ME"], help="--layers: only this mode")
    a = ap.parse_args()
    if a.layers:
        print(f"{torch.get_num_threads()} threads", flush=True)
        layers_study(a.sample_rows, a.rounds, a.only)
        return
    if a.precision_study:
        precision_study(a.sample_rows)
        return
    torch.manual_seed(0)
    dims = criteo_reference_dims()
    print(f"{torch.get_num_threads()} threads; Criteo tables {sum(dims):,} rows x 39 fields")
    for mode in ("SE", "ME"):
        model = CTRModel(lambda f, d, m: bb.DCNv2(f, d, m), field_dims=dims, mode=mode, scale=10,
                         embedding_init="normal", embedding_init_std=1.0)
        t_ours, (ia, _) = timed(lambda: ia_spectra(model), repeat=2)
        line = f"IA + spectra, {mode} 10x: recscale {t_ours:6.2f} s"
        if not a.skip_svd_baseline:
            t_svd, ref = timed(lambda: ia_spectra_svd(model))
            line += f" | svdvals per table {t_svd:6.2f} s | speed-up x{t_svd / t_ours:.1f}"
        print(line, flush=True)
        del model

    g = torch.Generator().manual_seed(1)
    for d in (390, 3900):
        z = torch.randn(a.sample_rows, d, generator=g) * torch.logspace(0, -2, d)
        t64, r64 = timed(lambda: mt.rankme(z), repeat=1)
        tg, gm = timed(lambda: mt.xtx(z.double()))  # the same route in two parts: Gram, then eigensolver
        te, _ = timed(lambda: mt.spectrum_from_gram(gm))
        del gm
        zd = z.double()
        tfull, rfull = timed(lambda: mt.rankme(sigma=mt.spectrum_from_gram(zd.T @ zd)), repeat=1)
        del zd
        t32, r32 = timed(lambda: mt.rankme(sigma=mt.spectrum_from_gram((z.T @ z).double())), repeat=1)
        line = f"RankMe {a.sample_rows:,} x {d:,}: float64 Gram {t64:6.2f} s (Gram {tg:.2f} s + eigensolver " \
               f"{te:.2f} s) | plain float64 X.T @ X {tfull:6.2f} s " \
               f"(x{tfull / t64:.2f}, |diff| {abs(r64 - rfull):.1e}) | float32 product {t32:6.2f} s " \
               f"(|diff| {abs(r64 - r32):.1e})"
        if not a.skip_svd_baseline:
            ts, s = timed(lambda: torch.linalg.svdvals(z))
            p = s.double() / s.double().sum() + 1e-7
            line += f" | svdvals {ts:6.2f} s (|diff| {abs(r64 - float(torch.exp(-(p * p.log()).sum()))):.1e}) " \
                    f"| speed-up x{ts / t64:.1f}"
        print(line, flush=True)

    # the whole callback pass vs one training epoch, DCNv2 ME 10x
    model = CTRModel(lambda f, d, m: bb.DCNv2(f, d, m), field_dims=dims, mode="ME", scale=10)
    ids = torch.stack([torch.randint(0, n, (a.sample_rows,), generator=g) for n in dims], 1).int()
    y = torch.randint(0, 2, (a.sample_rows,), generator=g).float()
    t_pass, rep = timed(lambda: compute_report(model, (ids, y), Options()))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6, fused=True)
    B, steps = 2048, 6
    times = []
    for i in range(steps + 1):
        x = ids[(i * B) % (a.sample_rows - B):][:B]
        t = time.perf_counter()
        opt.zero_grad()
        model.loss(model(x), y[:B]).backward()
        model.embedding.densify_grad()
        opt.step()
        times.append(time.perf_counter() - t)
    rate = B / (sum(times[1:]) / steps)
    epoch = TRAIN_ROWS / rate
    print(f"full diagnostics pass (DCNv2 ME 10x, {a.sample_rows:,}-row sample, figures): {t_pass:.1f} s; training "
          f"{rate:,.0f} samples/s -> one Criteo epoch {epoch / 3600:.1f} h; pass = {t_pass / epoch:.2e} of an epoch")


if __name__ == "__main__":
    main()
