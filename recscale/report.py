"""`recscale report`: the papers' tables from MLflow runs, next to the published numbers.

Reads the FINISHED runs of an experiment for one dataset and writes, under ``--output`` (and as artifacts of a summary
run in the experiment ``EXPERIMENT-reports``):

* ICML 2024 Table 1: test AUC mean ± std over seeds per model x mode x scale (best of each row in bold), the published
  value and the difference, as ``icml24_table1.md`` / ``.csv``; the scalability figure (AUC vs scale, SE vs ME per
  model, Fig. 8a) and the IA comparison (mean field IA vs scale, Fig. 8b).
* SIGIR 2026 Table 1: AUC and RankMe per model, with the published values (``sigir26_table1.*``).
* ICML 2024 Table 2: mean IA vs embedding size x training-data fraction (``icml24_table2.*``).

Cells without runs are shown as missing ("—" / empty), never as zero. Published numbers: recscale/reference/ (sources in
the files' headers).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections import defaultdict
from importlib import resources
from pathlib import Path

ICML_NAMES = {"DNN": "DNN", "IPNN": "IPNN", "NFwFM": "NFwFM", "XDeepFM": "xDeepFM", "DCNv2": "DCNv2",
              "FinalMLP": "FinalMLP"}
SIGIR_NAMES = {"FM": "FM", "DeepFM": "FM+p-DNN", "NFM": "FM+s-DNN", "CrossNet": "CrossNet",
               "CrossNetParallel": "CrossNet+p-DNN", "DCNv2": "CrossNet+s-DNN"}
SCALES = [1, 2, 3, 4, 10]


def published(name: str) -> list[dict]:
    text = resources.files("recscale").joinpath(f"reference/{name}").read_text()
    return list(csv.DictReader(io.StringIO("\n".join(ln for ln in text.splitlines() if not ln.startswith("#")))))


def _stats(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def load_runs(tracking_uri: str, experiment: str, dataset: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.status = 'FINISHED' and "
                              f"tags.dataset = '{dataset}'", max_results=50000)
    out = []
    for r in runs:
        t, m, p = r.data.tags, r.data.metrics, r.data.params
        out.append({"model": t.get("model"), "mode": t.get("mode"), "scale": int(t.get("scale", 0) or 0),
                    "seed": t.get("seed"), "grid": t.get("grid", ""), "auc": m.get("test/auc"),
                    "ia": m.get("diag/ia/mean"), "rankme": m.get("diag/rankme/embeddings"),
                    "fraction": float(p.get("data.train_fraction", 1.0)), "base_dim": int(p.get("model.base_dim", 10)),
                    "run_id": r.info.run_id})
    return out


def _fmt(s):
    return "—" if s is None else f"{s[0]:.5f} ± {s[1]:.5f}"


def icml_table1(runs: list[dict], dataset: str):
    pub = {(r["model"], r["mode"], int(r["scale"])): (float(r["auc_mean"]), float(r["auc_std"]))
           for r in published("icml24_table1_test_auc.csv") if r["dataset"] == dataset}
    groups = defaultdict(list)
    for r in runs:
        if r["model"] in ICML_NAMES and r["auc"] is not None and r["grid"] in ("", "icml24") and r["fraction"] == 1.0:
            groups[(ICML_NAMES[r["model"]], r["mode"], r["scale"])].append(r)
    rows, md = [], []
    md.append("| model | mode | " + " | ".join(f"{k}x" for k in SCALES) + " |")
    md.append("|---|---|" + "---|" * len(SCALES))
    for model in ICML_NAMES.values():
        for mode in ("SE", "ME"):
            cells = {}
            for k in SCALES:
                g = groups.get((model, "SE" if k == 1 else mode, k), [])  # 1x is shared by SE and ME
                st = _stats([r["auc"] for r in g])
                pb = pub.get((model, "SE" if k == 1 else mode, k))
                ia = _stats([r["ia"] for r in g if r["ia"] is not None])
                cells[k] = (st, pb)
                rows.append({"dataset": dataset, "model": model, "mode": mode, "scale": k, "runs": len(g),
                             "auc_mean": st[0] if st else "", "auc_std": st[1] if st else "",
                             "published_mean": pb[0] if pb else "", "published_std": pb[1] if pb else "",
                             "diff": (st[0] - pb[0]) if st and pb else "", "ia_mean": ia[0] if ia else ""})
            present = [k for k in SCALES if cells[k][0]]
            best = max(present, key=lambda k: cells[k][0][0]) if present else None
            txt = []
            for k in SCALES:
                st, pb = cells[k]
                s = _fmt(st)
                if k == best:
                    s = f"**{s}**"
                if pb:
                    s += f" (paper {pb[0]:.5f}" + (f", Δ {st[0] - pb[0]:+.5f})" if st else ")")
                txt.append(s)
            md.append(f"| {model} | {mode} | " + " | ".join(txt) + " |")
    return rows, "\n".join(md)


def sigir_table1(runs, dataset):
    pub = {r["model"]: (float(r["auc"]), float(r["rankme"])) for r in published("sigir26_table1_auc_rankme.csv")
           if r["dataset"] == dataset}
    groups = defaultdict(list)
    for r in runs:
        if r["model"] in SIGIR_NAMES and r["grid"] == "sigir":
            groups[SIGIR_NAMES[r["model"]]].append(r)
    rows, md = [], ["| model | AUC | RankMe | paper AUC | paper RankMe | Δ AUC |", "|---|---|---|---|---|---|"]
    for model in SIGIR_NAMES.values():
        g = groups.get(model, [])
        auc = _stats([r["auc"] for r in g if r["auc"] is not None])
        rk = _stats([r["rankme"] for r in g if r["rankme"] is not None])
        pb = pub.get(model)
        rows.append({"dataset": dataset, "model": model, "runs": len(g), "auc_mean": auc[0] if auc else "",
                     "rankme_mean": rk[0] if rk else "", "published_auc": pb[0] if pb else "",
                     "published_rankme": pb[1] if pb else "", "diff_auc": (auc[0] - pb[0]) if auc and pb else ""})
        md.append(f"| {model} | {_fmt(auc)} | {'—' if not rk else f'{rk[0]:.2f}'} | "
                  f"{pb[0] if pb else '—'} | {pb[1] if pb else '—'} | "
                  f"{f'{auc[0] - pb[0]:+.4f}' if auc and pb else '—'} |")
    return rows, "\n".join(md)


def icml_table2(runs):
    pub = {float(r["data_fraction"]): r for r in published("icml24_table2_ia_vs_data.csv")}
    cols = [f"d{d}" for d in (5, 10, 15, 20, 25, 30, 35, 40)] + ["d40_me"]
    groups = defaultdict(list)
    for r in runs:
        if r["grid"] == "data-fraction" and r["ia"] is not None:
            key = "d40_me" if r["mode"] == "ME" else f"d{r['base_dim']}"
            groups[(r["fraction"], key)].append(r["ia"])
    rows, md = [], ["| data | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for frac in sorted(pub):
        cells = []
        for c in cols:
            st = _stats(groups.get((frac, c), []))
            p = pub[frac].get(f"ia_{c}")
            rows.append({"data_fraction": frac, "column": c, "ia_mean": st[0] if st else "", "published": p})
            cells.append(("—" if not st else f"{st[0]:.2f}") + f" ({p})")
        md.append(f"| {frac:g} | " + " | ".join(cells) + " |")
    return rows, "\n".join(md)


def _write_csv(path: Path, rows: list[dict]) -> None:
    if rows:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def figures(t1_rows, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric, fname, label in (("auc_mean", "scalability.png", "test AUC"), ("ia_mean", "ia_vs_scale.png", "mean IA")):
        fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
        for ax, model in zip(axes.flat, ICML_NAMES.values()):
            for mode, style in (("SE", "o-"), ("ME", "s-")):
                pts = [(r["scale"], r[metric]) for r in t1_rows
                       if r["model"] == model and r["mode"] == mode and r[metric] != ""]
                if pts:
                    ax.plot(*zip(*pts), style, label=mode)
            ax.set_title(model, fontsize=9)
            ax.set_xscale("log")
            ax.set_xticks(SCALES, [f"{k}x" for k in SCALES])
            ax.set_ylabel(label, fontsize=8)
            ax.legend(fontsize=7)
        fig.suptitle(f"{label} vs model scale, SE vs ME (ICML 2024 Fig. 8)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        paths.append(out / fname)
    return paths


def build_report(tracking_uri: str, experiment: str, dataset: str, output: str, summary_run: bool = True) -> dict:
    runs = load_runs(tracking_uri, experiment, dataset)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    t1, md1 = icml_table1(runs, dataset)
    s1, mds = sigir_table1(runs, dataset)
    t2, md2 = icml_table2(runs)
    _write_csv(out / "icml24_table1.csv", t1)
    _write_csv(out / "sigir26_table1.csv", s1)
    _write_csv(out / "icml24_table2.csv", t2)
    text = (f"# recscale report: {dataset}, experiment {experiment}\n\n{len(runs)} finished runs. Each cell: ours (mean ± "
            "std over seeds) and the paper's value with the difference; — marks cells without runs.\n\n"
            f"## ICML 2024 Table 1 (test AUC)\n\n{md1}\n\n## SIGIR 2026 Table 1\n\n{mds}\n\n"
            f"## ICML 2024 Table 2 (mean IA; paper in parentheses)\n\n{md2}\n")
    (out / "report.md").write_text(text)
    figures(t1, out)
    res = {"runs": len(runs), "output": str(out), "files": sorted(p.name for p in out.iterdir())}
    if summary_run:
        import mlflow

        from recscale.diagnostics.toy import _ensure_experiment

        mlflow.set_tracking_uri(tracking_uri)
        _ensure_experiment(mlflow, f"{experiment}-reports")
        with mlflow.start_run(run_name=f"report-{dataset}") as r:
            mlflow.set_tags({"dataset": dataset, "source_experiment": experiment, "runs": str(len(runs))})
            mlflow.log_artifacts(str(out))
            res["summary_run_id"] = r.info.run_id
    return res


def main(argv: list[str] | None = None) -> int:
    from recscale.tracking import default_tracking_uri

    ap = argparse.ArgumentParser(prog="recscale report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="recscale")
    ap.add_argument("--dataset", default="criteo")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--output", default="outputs/report")
    ap.add_argument("--no-summary-run", action="store_true")
    a = ap.parse_args(argv)
    res = build_report(a.tracking_uri or default_tracking_uri(), a.experiment, a.dataset, a.output,
                       not a.no_summary_run)
    print(f"report of {res['runs']} runs -> {res['output']}/report.md ({', '.join(res['files'])})")
    if res["runs"] == 0:
        print(f"recscale report: warning: no FINISHED runs with tag dataset={a.dataset} in experiment "
              f"{a.experiment}: every cell is missing", file=sys.stderr)
    return 0
