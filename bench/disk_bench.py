"""Disk used by a 10-cell grid: checkpoints stored the old way (Lightning's ``log_model=True``: the best and the last
checkpoint uploaded to MLflow with optimizer state, both kept locally too) against the default now (the best
checkpoint uploaded once, weights only; only ``last.ckpt`` kept locally).

    python bench/disk_bench.py [--epochs 2] [--out outputs/disk_bench]

Both grids run the same 10 cells (DNN and DCNv2, SE 1x and SE/ME 2x, 3x, seed 0; the cells of ``recscale grid
icml24``) on the bundled Criteo sample, each grid in its own directory with its own SQLite store, one after the
other. The cells run in this process (``recscale fit`` as the grid runs it, without a process start per cell: the
files written are the same); the figures are bytes on disk under ``mlruns/`` (store + artifacts) and
``checkpoints/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OLD = ["--trainer.logger.init_args.log_model=true", "--trainer.logger.init_args.log_model_weights_only=false",
       "--keep_local_best=true"]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default="outputs/disk_bench")
    a = ap.parse_args()
    from recscale.data.prepare import Options, prepare
    from recscale.grid import icml24_cells
    from recscale.train import cli_main

    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    data = out / "criteo_sample"
    prepare(ROOT / "data" / "criteo" / "sample.train", data, Options(dataset="criteo", progress=False))
    data_cfg = out / "criteo_sample.yaml"
    data_cfg.write_text(f"data:\n  data_dir: {data}\n  batch_size: 512\n  num_workers: 0\n")
    cells = icml24_cells("criteo_sample", ["dnn", "dcnv2"], ["SE", "ME"], [1, 2, 3], [0], configs=ROOT / "configs")
    for c in cells:
        c.configs[-1] = str(data_cfg)
    assert len(cells) == 10
    fast = [f"--trainer.max_epochs={a.epochs}", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--diagnostics.figures=false", "--diagnostics.sample_rows=200", "--diagnostics.gradient_rankme=false",
            "--early_stopping.patience=100", "--trainer.logger.init_args.log_system_metrics=false"]
    rows = {}
    for label, extra in (("before (log_model=true: best+last with optimizer state, in MLflow and local)", OLD),
                         ("after (default: best once in MLflow, weights only; last.ckpt local)", [])):
        work = out / ("before" if extra else "after")
        (work / "mlruns").mkdir(parents=True)
        cwd = os.getcwd()
        os.chdir(work)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
        try:
            t = time.perf_counter()
            for c in cells:
                cli_main([*c.argv(fast + extra), "--trainer.logger.init_args.experiment_name=disk",
                          f"--trainer.logger.init_args.run_name={c.name}"])
            seconds = time.perf_counter() - t
        finally:
            os.chdir(cwd)
        rows[label] = (du(work / "mlruns"), du(work / "checkpoints"), seconds)
    print(f"\n10-cell grid on the bundled Criteo sample, {a.epochs} epochs x 3 steps per cell, seconds on a shared "
          "machine (compare bytes, not times)\n")
    print("| storage | mlruns/ | checkpoints/ | total | grid wall time |")
    print("|---|---|---|---|---|")
    for label, (m, c, s) in rows.items():
        print(f"| {label} | {mib(m)} | {mib(c)} | {mib(m + c)} | {s:.0f} s |")
    (mb, cb, _), (ma, ca, _) = rows.values()
    print(f"\nratio after / before (total bytes): {(ma + ca) / (mb + cb):.3f}")


if __name__ == "__main__":
    main()
