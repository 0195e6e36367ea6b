"""Figures of `recscale report` (see recscale/report.py for what the cells and numbers are).

* ``scalability.png``: ICML 2024 Fig. 8a, test AUC vs scale, SE vs ME per model, mean ± std over seeds (error bars for
  n ≥ 2) with the published curve (dashed) beside ours; on a second y axis when the two do not share a range (e.g. a
  sample dataset), so neither curve is flattened.
* ``ia_per_field.png``: ICML 2024 Fig. 8b, per-field IA of SE vs ME at one scale (DCNv2 at 10x in the paper; here
  DCNv2 if present, at the largest scale with both SE and ME runs), fields by cardinality, from the best checkpoint's
  ``diagnostics/best/values.json``.
* ``diversity.png``: ICML 2024 Fig. 10a, mean embedding-set diversity (1 − mean principal cosine over set pairs and
  fields) per scale k: ME runs' k sets, and SE runs' embedding split into k sets (``diversity_se_split/mean``).
* ``roblock_auc_vs_depth.png`` / ``roblock_ia_vs_depth.png``: issue 11, test AUC vs depth L and the per-layer mean IA
  (``layer{l}/ia_mean`` at the best checkpoint) of the deepest stack, plain vs RoBlock.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path

from recscale.report import ICML_NAMES, SCALES, Cell, Run, Stat

FIG_DPI = 100  # about 1,100-1,200 px wide: MLflow's artifact viewer shows it without scaling text below 8 pt


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errorbar(ax, xs, stats: list[Stat], fmt: str, label: str, color=None):
    yerr = [0.0 if s.std is None else s.std for s in stats]
    return ax.errorbar(xs, [s.mean for s in stats], yerr=yerr, fmt=fmt, capsize=3, label=label, color=color,
                       markersize=5, linewidth=1.5)


def fig8a(t1: dict, out: Path) -> Path | None:
    shown, pub = t1["shown"], t1["published"]
    models = list(ICML_NAMES.values())
    if not any(c is not None and c.auc for c in shown.values()):
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(12, 7))
    colors = {"SE": "tab:blue", "ME": "tab:orange"}
    for ax, model in zip(axes.flat, models):
        ours, paper = {}, {}
        for mode in ("SE", "ME"):
            keys = [(k, (model, "SE" if k == 1 else mode, k)) for k in SCALES]
            ours[mode] = [(k, shown[key].auc) for k, key in keys if shown.get(key) and shown[key].auc]
            paper[mode] = [(k, pub[key]) for k, key in keys if key in pub]
        ys = [s.mean for v in ours.values() for _, s in v]
        ps = [s.mean for v in paper.values() for _, s in v]
        pax = ax
        if ys and ps and (max(ys) < min(ps) - 0.005 or min(ys) > max(ps) + 0.005):
            pax = ax.twinx()  # disjoint ranges (other data): the paper on its own axis, so neither curve is flat
            pax.set_ylabel("paper test AUC (dashed)", fontsize=9, color="dimgray")
            pax.tick_params(labelsize=8, colors="dimgray")
        for mode in ("SE", "ME"):
            if ours[mode]:
                ks, st = zip(*ours[mode])
                _errorbar(ax, ks, list(st), "o-" if mode == "SE" else "s-", f"{mode} (ours)", colors[mode])
            if paper[mode]:
                ks, st = zip(*paper[mode])
                _errorbar(pax, ks, list(st), "x--", f"{mode} (paper)", colors[mode])
        ax.set_title(model if ys else f"{model} (no runs: paper only)", fontsize=11)
        ax.set_xscale("log")
        ax.set_xticks(SCALES, [f"{k}x" for k in SCALES])
        ax.minorticks_off()
        ax.tick_params(labelsize=8)
        ax.set_xlabel("model scale", fontsize=9)
        ax.set_ylabel("test AUC", fontsize=9)
        both = [ax] + ([pax] if pax is not ax else [])
        handles = [h for a in both for h in a.get_legend_handles_labels()[0]]
        labels = [lb for a in both for lb in a.get_legend_handles_labels()[1]]
        if handles:  # on the top-most axis, so the twin axis' curves do not cross it
            pax.legend(handles, labels, fontsize=7, loc="best", framealpha=0.9)
    fig.suptitle("Test AUC vs model scale, SE vs ME: ours (mean ± std over seeds) and the paper (ICML 2024 Fig. 8a)",
                 fontsize=12)
    fig.tight_layout()
    p = out / "scalability.png"
    fig.savefig(p, dpi=FIG_DPI)
    plt.close(fig)
    return p


def _artifact(client, run: Run, path: str, into: Path) -> Path | None:
    try:
        return Path(client.download_artifacts(run.run_id, path, str(into)))
    except Exception:  # missing artifact (older run) or unreachable store: the figure marks the run as missing
        return None


def per_field_values(client, run: Run, into: Path) -> dict[str, float] | None:
    """Per-field values of the best checkpoint: ``diagnostics/best/values.json`` (C3); for older runs the step's
    ``values.csv`` or ``ia.csv`` at the ``best_step`` tag; None if neither exists."""
    p = _artifact(client, run, "diagnostics/best/values.json", into / run.run_id)
    if p:
        return {k: float(v) for k, v in json.loads(p.read_text())["metrics"].items()}
    if run.best_step is None:
        return None
    step = f"diagnostics/step{run.best_step:08d}"
    p = _artifact(client, run, f"{step}/values.csv", into / run.run_id)
    if p:
        with open(p) as f:
            return {r["key"]: float(r["value"]) for r in csv.DictReader(f)}
    p = _artifact(client, run, f"{step}/ia.csv", into / run.run_id)
    if p:
        with open(p) as f:
            return {f"ia/{r['field']}": float(r["ia_concat"]) for r in csv.DictReader(f)}
    return None


def cardinalities(client, run: Run, into: Path) -> dict[str, int]:
    p = _artifact(client, run, "data/spec.json", into / f"{run.run_id}-spec")
    if not p:
        return {}
    return {f["name"]: int(f["cardinality"]) for f in json.loads(p.read_text()).get("fields", [])}


def fig8b(client, t1: dict, out: Path) -> tuple[Path, str] | None:
    shown = t1["shown"]
    pairs = [(m, k) for m in ICML_NAMES.values() for k in SCALES if k > 1
             and shown.get((m, "SE", k)) and shown.get((m, "ME", k))]
    if not pairs:
        return None
    model, k = max(pairs, key=lambda p: (p[0] == "DCNv2", p[1]))
    with tempfile.TemporaryDirectory() as tmp:
        vals = {mode: [v for r in shown[(model, mode, k)].runs if (v := per_field_values(client, r, Path(tmp)))]
                for mode in ("SE", "ME")}
        if not (vals["SE"] and vals["ME"]):
            return None
        card = cardinalities(client, shown[(model, "SE", k)].first, Path(tmp))
    fields = [key[3:] for key in vals["SE"][0] if key.startswith("ia/") and key != "ia/mean"]
    fields.sort(key=lambda f: (card.get(f, math.inf), f))
    stats = {mode: [Stat.of([v.get(f"ia/{f}") for v in vals[mode]]) for f in fields] for mode in ("SE", "ME")}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.4
    for i, (mode, color) in enumerate((("SE", "tab:blue"), ("ME", "tab:orange"))):
        xs = [j + (i - 0.5) * width for j in range(len(fields))]
        st = stats[mode]
        ax.bar(xs, [s.mean if s else 0 for s in st], width, color=color,
               yerr=[s.std if s and s.std is not None else 0 for s in st], capsize=2,
               label=f"{mode} {k}x (n={len(vals[mode])})")
    ax.set_xticks(range(len(fields)), [f if f not in card else f"{f}\n{card[f]:,}" for f in fields] if len(fields) <= 12
                  else fields, rotation=0 if len(fields) <= 12 else 90, fontsize=8)
    ax.set_xlabel("field (sorted by cardinality, ascending)", fontsize=9)
    ax.set_ylabel("information abundance", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=9)
    ax.set_title(f"Per-field IA of {model} at {k}x, SE vs ME (all sets of a field concatenated), best checkpoint "
                 "(ICML 2024 Fig. 8b)", fontsize=11)
    fig.tight_layout()
    p = out / "ia_per_field.png"
    fig.savefig(p, dpi=FIG_DPI)
    plt.close(fig)
    return p, f"{model} {k}x"


def fig10a(cells: list[Cell], out: Path) -> Path | None:
    pts: dict[tuple[str, str], list[tuple[int, Stat]]] = {}
    for c in cells:
        r = c.first
        # ME: diversity of its sets; SE at k x: its embedding split into k sets of the base size (as the paper does)
        s = c.diag("diversity/mean" if r.mode == "ME" else "diversity_se_split/mean")
        if s and r.model in ICML_NAMES and r.grid in ("", "icml24") and r.scale > 1:
            pts.setdefault((ICML_NAMES[r.model], r.mode), []).append((r.scale, s))
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    keys = sorted(pts)
    width = min(0.35, 0.8 / len(keys))
    scales = sorted({k for v in pts.values() for k, _ in v})
    for i, key in enumerate(keys):
        by = dict(pts[key])
        xs = [j + (i - (len(keys) - 1) / 2) * width for j, k in enumerate(scales) if k in by]
        st = [by[k] for k in scales if k in by]
        ax.bar(xs, [s.mean for s in st], width, yerr=[s.std or 0 for s in st], capsize=3, label=f"{key[0]} {key[1]}")
    ax.set_xticks(range(len(scales)), [f"{k}x" for k in scales], fontsize=9)
    ax.set_xlabel("model scale k (ME: k embedding sets; SE: its embedding split into k sets)", fontsize=9)
    ax.set_ylabel("diversity = 1 − mean principal cosine", fontsize=9)
    ax.set_ylim(0, 1)
    ax.set_xlim(-0.6, len(scales) - 0.4)
    ax.legend(fontsize=8)
    se = any(k[1] == "SE" for k in keys)
    ax.set_title("Embedding-set diversity, best checkpoint (ICML 2024 Fig. 10a)"
                 + ("" if se else "\nno SE run logs diversity_se_split (older runs): ME only"), fontsize=11)
    fig.tight_layout()
    p = out / "diversity.png"
    fig.savefig(p, dpi=FIG_DPI)
    plt.close(fig)
    return p


def roblock_figures(rb: dict, out: Path) -> list[Path]:
    shown = rb["shown"]
    bbs = [b for b in rb["backbones"] if any(c is not None and c.auc for k, c in shown.items() if k[0] == b)]
    if not bbs:
        return []
    from recscale.report import DISPLAY

    plt = _plt()
    paths = []
    lines = [(v, w) for v in rb["variants"] for w in rb["widths"]]
    # colour = variant (plain, each β), marker and line = width: the same meaning in every panel and both figures
    color = {v: f"C{i}" for i, v in enumerate(rb["variants"])}
    fmts = ["o-", "s--", "^:", "d-."]
    style = {w: fmts[i % len(fmts)] for i, w in enumerate(rb["widths"])}
    size = (max(7.0, 4.5 * len(bbs) + 1), 4.5)
    fig, axes = plt.subplots(1, len(bbs), figsize=size, squeeze=False)
    for ax, bb in zip(axes[0], bbs):
        for v, w in lines:
            pts = [(d, shown[(bb, d, w, v)].auc) for d in rb["depths"]
                   if shown.get((bb, d, w, v)) and shown[(bb, d, w, v)].auc]
            if pts:
                ds, st = zip(*pts)
                _errorbar(ax, ds, list(st), style[w], f"{v}, {w}", color[v])
        ax.set_xscale("log", base=2)
        ax.set_xticks(rb["depths"], [str(d) for d in rb["depths"]])
        ax.minorticks_off()
        ax.set_xlabel("depth L (stacked layers / blocks)", fontsize=9)
        ax.set_ylabel("test AUC", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.set_title(DISPLAY.get(bb, bb), fontsize=11)
        ax.legend(fontsize=7)
    fig.suptitle("Test AUC vs depth, plain vs RoBlock (mean ± std over seeds)", fontsize=12)
    fig.tight_layout()
    paths.append(out / "roblock_auc_vs_depth.png")
    fig.savefig(paths[-1], dpi=FIG_DPI)
    plt.close(fig)

    curves = {}
    for bb in bbs:
        for v, w in lines:
            deep = [(d, shown[(bb, d, w, v)]) for d in rb["depths"] if shown.get((bb, d, w, v))]
            deep = [(d, c) for d, c in deep if c.diag("layer1/ia_mean")]
            if deep:
                d, c = deep[-1]
                pts = [(ly, c.diag(f"layer{ly}/ia_mean")) for ly in range(1, d + 1) if c.diag(f"layer{ly}/ia_mean")]
                curves[(bb, v, w)] = (d, pts)
    if curves:
        fig, axes = plt.subplots(1, len(bbs), figsize=size, squeeze=False)
        for ax, bb in zip(axes[0], bbs):
            for (b, v, w), (d, pts) in curves.items():
                if b == bb:
                    ls, st = zip(*pts)
                    _errorbar(ax, ls, list(st), style[w], f"{v}, {w} (L={d})", color[v])
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel("layer l", fontsize=9)
            ax.set_ylabel("mean per-field IA of layer l's output", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.set_title(DISPLAY.get(bb, bb), fontsize=11)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no per-layer diagnostics", transform=ax.transAxes, ha="center", color="gray")
        fig.suptitle("IA vs depth (best checkpoint): each layer's output, deepest stack per variant", fontsize=11)
        fig.tight_layout()
        paths.append(out / "roblock_ia_vs_depth.png")
        fig.savefig(paths[-1], dpi=FIG_DPI)
        plt.close(fig)
    return paths


def draw_all(client, out: Path, t1: dict, cells: list[Cell], rb: dict) -> list[str]:
    """Every figure that has data; returns one line per file for the report."""
    notes = []
    if p := fig8a(t1, out):
        notes.append(f"`{p.name}`: test AUC vs scale, SE vs ME, ours with error bars and the paper dashed (Fig. 8a)")
    if r := fig8b(client, t1, out):
        notes.append(f"`{r[0].name}`: per-field IA, SE vs ME, {r[1]}, best checkpoint (Fig. 8b)")
    if p := fig10a(cells, out):
        notes.append(f"`{p.name}`: embedding-set diversity per scale (Fig. 10a)")
    for p in roblock_figures(rb, out):
        notes.append(f"`{p.name}`: RoBlock section")
    return notes
