"""Merge the parts written by bench/gpu_check.sh into one JSON and print a Markdown section for BENCHMARKS.md, with
issue 13's targets beside the measured values.

    python bench/gpu_report.py OUTDIR      # reads OUTDIR/{env,pytest,train,e2e,diag}.json, writes OUTDIR/gpu_check.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FUXICTR_V100 = 90_000  # FuxiCTR's DCNv2 on Criteo, one V100 (BARS logs), samples/s
TARGETS = {
    "e2e_2048": 1_000_000,  # DCNv2 SE 1x, bf16 + device cache, batch 2048, samples/s
    "e2e_best": 10 * FUXICTR_V100,
    "me10_ratio": 2.0,  # set-batched / per-set loop at ME 10x, every Table-1 model
    "diag_seconds": 1.0,  # full diagnostics pass, DCNv2 ME 10x, 50,000 x 3,900 RankMe float64
}


def _load(d: Path, name: str):
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def report(d: Path) -> tuple[dict, str]:
    env, tests, train, e2e, diag = (_load(d, n) for n in ("env", "pytest", "train", "e2e", "diag"))
    out = {"env": env, "pytest": tests, "train_bench": train, "e2e": e2e, "diagnostics": diag, "targets": TARGETS}
    lines = []
    if env:
        lines += [f"### GPU ({env.get('date', '?')}, {env.get('device', '?')})", "",
                  f"torch {env.get('torch')}, CUDA {env.get('cuda')}, Lightning {env.get('lightning')}, Python "
                  f"{env.get('python')}{' — SMOKE RUN (tiny sizes, not a measurement)' if env.get('smoke') else ''}.",
                  "Command: `bash bench/gpu_check.sh` (one run; figures below are from that run).", ""]
    if tests is not None:
        lines += [f"`pytest -m gpu`: {tests.get('summary', '?')} (exit code {tests.get('returncode')}).", ""]

    verdict: dict[str, bool | None] = {}
    if train:
        lines += [f"Set-batched vs the per-set loop (`bench/train_bench.py --device {train[0]['device']}`, batch "
                  f"{train[0]['batch_size']:,}, samples/s):", "",
                  "| model | cell | recscale | per-set loop | ratio | target (ME 10x) |", "|---|---|---:|---:|---:|---|"]
        me = []
        for r in train:
            ratio = r["recscale"] / r["baseline"] if r.get("baseline") else None
            tgt = ""
            if r["mode"] == "ME" and r["scale"] == 10 and ratio is not None:
                me.append(ratio)
                tgt = f"≥ {TARGETS['me10_ratio']:.0f}x: {_mark(ratio >= TARGETS['me10_ratio'])}"
            lines.append(f"| {r['model']} | {r['mode']} {r['scale']}x | {r['recscale']:,.0f} | "
                         f"{r.get('baseline', float('nan')):,.0f} | {ratio:.2f} | {tgt} |" if ratio is not None else
                         f"| {r['model']} | {r['mode']} {r['scale']}x | {r['recscale']:,.0f} | | | |")
        verdict["me10_ratio"] = all(x >= TARGETS["me10_ratio"] for x in me) if me else None
        out["me10_min_ratio"] = min(me) if me else None
        lines.append("")
    if e2e:
        lines += ["End to end, one training epoch of a 5M-row synthetic Criteo (prepare excluded; DCNv2; "
                  "`bench/e2e_bench.py epoch`; steady = after the warm-up batches, to the last full batch; whole "
                  "epoch = with loader start-up and compilation):", "",
                  "| configuration | batch | samples/s (steady) | samples/s (whole epoch) | steps | fit wall s | "
                  "peak GPU GiB |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in e2e:
            lines.append(f"| {r['loader']} {r['precision']}{' + compile' if r['compile'] else ''} | "
                         f"{r['batch_size']:,} | {r['samples_per_s']:,.0f} | {r.get('epoch_samples_per_s', 0):,.0f} | "
                         f"{r['steps']:,} | {r['fit_wall_s']:.1f} | "
                         f"{r.get('peak_gpu_mem_gib', float('nan')):.2f} |")
        cached = [r for r in e2e if r["loader"] == "cache" and r["precision"] == "bf16" and r["mode"] == "SE"
                  and r["scale"] == 1]
        at2048 = max((r["samples_per_s"] for r in cached if r["batch_size"] == 2048), default=None)
        best = max(e2e, key=lambda r: r["samples_per_s"])
        out["e2e_2048_bf16_cache"] = at2048
        out["e2e_best"] = {"name": best["name"], "samples_per_s": best["samples_per_s"]}
        verdict["e2e_2048"] = None if at2048 is None else at2048 >= TARGETS["e2e_2048"]
        verdict["e2e_best"] = best["samples_per_s"] >= TARGETS["e2e_best"]
        lines += ["", f"- DCNv2 SE 1x, bf16 + device cache, batch 2048: "
                      f"{'n/a' if at2048 is None else f'{at2048:,.0f}'} samples/s; target ≥ 1,000,000: "
                      f"{_mark(verdict['e2e_2048'])}.",
                  f"- Best configuration: {best['name']} at {best['samples_per_s']:,.0f} samples/s "
                  f"= {best['samples_per_s'] / FUXICTR_V100:.1f}x FuxiCTR's V100 figure (90k); target ≥ 10x: "
                  f"{_mark(verdict['e2e_best'])}.", ""]
    if diag:
        r = diag[0]
        verdict["diag_seconds"] = r["seconds"] <= TARGETS["diag_seconds"]
        lines += [f"Diagnostics pass (DCNv2 ME {r.get('scale', 10)}x, {r['table_rows']:,} table rows, RankMe "
                  f"{r['sample_rows']:,} x {r['width']:,} float64, `bench/e2e_bench.py diag`): {r['seconds']:.3f} s (first call "
                  f"{r['first_call_seconds']:.3f} s); target ≤ 1 s: {_mark(verdict['diag_seconds'])}.", ""]
    out["verdict"] = verdict
    return out, "\n".join(lines)


def main():
    d = Path(sys.argv[1])
    out, md = report(d)
    (d / "gpu_check.json").write_text(json.dumps(out, indent=1))
    (d / "gpu_check.md").write_text(md + "\n")
    print(md)
    print(f"(JSON: {d / 'gpu_check.json'}; Markdown: {d / 'gpu_check.md'})")


if __name__ == "__main__":
    main()
