"""The diagnostics figures of README's gallery (docs/gallery/diag-*.png).

    recscale prepare criteo --input data/criteo/sample.train --output DATA
    MLFLOW_TRACKING_URI=sqlite:///m.db recscale fit --config configs/dcnv2.yaml --config configs/data/criteo_sample.yaml \\
        --data.data_dir DATA --model.backbone.init_args.cross_layers 8 --trainer.max_epochs 4
    MLFLOW_TRACKING_URI=sqlite:///m.db python bench/diagnostics_gallery.py --run RUN_ID --data DATA

Copies `ia_vs_depth.png` and `covariance_spectrum.png` of the run's best-checkpoint pass (tag `best_step`), and draws
the ME-only figures (per-set IA heatmap, sub-embedding IA of set 0) for a DCNv2 ME 10x at initialisation on the same
data's validation split.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "docs" / "gallery"


def main() -> None:
    from mlflow.tracking import MlflowClient

    from recscale.data.datamodule import CTRDataModule, sample_split
    from recscale.diagnostics.compute import Options, compute_report
    from recscale.models import backbones as bb
    from recscale.models.module import CTRModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    client = MlflowClient()
    step = int(client.get_run(a.run).data.tags["best_step"])
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("ia_vs_depth", "covariance_spectrum"):
            p = client.download_artifacts(a.run, f"diagnostics/step{step:08d}/{name}.png", tmp)
            shutil.copy(p, OUT / f"diag-{name.replace('_', '-')}-dcnv2-depth8.png")
    dm = CTRDataModule(a.data, num_workers=0)
    x, y = sample_split(dm.units("valid"), dm.fields, 1000)
    torch.manual_seed(0)
    model = CTRModel(lambda f, d, m: bb.DCNv2(f, d, m), field_dims=dm.field_dims, mode="ME", scale=10,
                     embedding_init_std=0.01)
    rep = compute_report(model, (torch.from_numpy(x), torch.from_numpy(y)), Options(title="DCNv2 ME 10x at init"),
                         dm.fields)
    for name in ("ia_heatmap", "sub_embedding_ia"):
        rep.figures[name].savefig(OUT / f"diag-{name.replace('_', '-')}-dcnv2-me10x.png", dpi=80)
    print(f"wrote {sorted(p.name for p in OUT.glob('diag-*.png'))}")


if __name__ == "__main__":
    main()
