"""Real runs behind the README's report gallery: a tiny ICML 2024 grid on the bundled Criteo sample (DCNv2, SE and ME
at 1x, 2x and 4x, seeds 0 and 1, 2 epochs of 10 steps each), then `recscale report` on it; the report's figures are
copied to docs/gallery/ (``report-*.png``). Runs made before the fit logged ``diag_best/*`` (contract C3) get the tag
``best_step`` from their best checkpoint, so the report reads their diagnostics at that step (its fallback path).

The runs are far too short to say anything about collapse or scaling; they show what the figures look like on real
runs (ours with error bars, the paper's numbers beside them, the best checkpoint's diagnostics).

    python bench/report_gallery.py [--jobs 2] [--keep]      # about 5-10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "outputs" / "gallery"
GALLERY = ROOT / "docs" / "gallery"
FAST = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=10", "--data.batch_size=256",
        "--data.num_workers=0", "--trainer.enable_progress_bar=false", "--diagnostics.figures=false",
        "--diagnostics.sample_rows=500"]
FIGURES = {"scalability.png": "report-fig8a-scalability.png", "ia_per_field.png": "report-fig8b-ia-per-field.png",
           "diversity.png": "report-fig10a-diversity.png"}


def backfill_best_step(uri: str, roots: list[Path]) -> int:
    """Runs made before contract C3 lack the tag ``best_step``: set it from the run's best checkpoint (its saved
    ``global_step``, the step the diagnostics pass of that checkpoint was logged at), found through the
    ``mlflow_run.json`` beside it. Runs that have the tag are left alone. Returns the number of runs tagged."""
    import torch
    from mlflow.tracking import MlflowClient

    client, n = MlflowClient(uri), 0
    for root in roots:
        for run_file in root.glob("checkpoints/*/mlflow_run.json"):
            info = json.loads(run_file.read_text())
            if info.get("tracking_uri") != uri:
                continue
            best = sorted(run_file.parent.glob("best-*.ckpt"))
            run = client.get_run(info["run_id"])
            if not best or "best_step" in run.data.tags:
                continue
            step = torch.load(best[-1], map_location="cpu", weights_only=False)["global_step"]
            client.set_tag(info["run_id"], "best_step", str(step))
            n += 1
    return n


def main() -> int:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from recscale.data.prepare import Options, prepare
    from recscale.grid import icml24_cells, run_grid
    from recscale.report import build_report

    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="reuse the runs of an earlier invocation")
    a = ap.parse_args()
    if WORK.exists() and not a.keep:
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK / "criteo_sample"
    if not data.exists():
        prepare(ROOT / "data" / "criteo" / "sample.train", data, Options(dataset="criteo", progress=False))
    cfg = WORK / "criteo_sample.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"data_dir": str(data)}}))
    cells = icml24_cells("criteo_sample", ["dcnv2"], ["SE", "ME"], [1, 2, 4], [0, 1])
    for c in cells:
        c.configs[-1] = str(cfg)
    uri = f"sqlite:///{WORK / 'mlflow.db'}"
    os.chdir(WORK)  # the fits' checkpoints/ go under outputs/gallery/
    t = time.perf_counter()
    res = run_grid(cells, FAST, jobs=a.jobs, tracking_uri=uri, experiment="gallery", log_dir=str(WORK / "logs"))
    print(f"grid: {res['ran']} ran, {res['skipped']} skipped, failed {res['failed']} "
          f"in {time.perf_counter() - t:.0f} s")
    print(f"best_step backfilled from the best checkpoints of {backfill_best_step(uri, [WORK, ROOT])} run(s)")
    rep = build_report(uri, "gallery", "criteo", str(WORK / "report"), summary_run=False)
    print(f"report: {rep['runs']} runs in {rep['cells']} cells: {', '.join(rep['files'])}")
    GALLERY.mkdir(parents=True, exist_ok=True)
    for src, dst in FIGURES.items():
        if (WORK / "report" / src).exists():
            shutil.copyfile(WORK / "report" / src, GALLERY / dst)
            print(f"  {GALLERY / dst} ({(GALLERY / dst).stat().st_size // 1024} KiB)")
        else:
            print(f"  {src}: not drawn (no data for it in these runs)")
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
