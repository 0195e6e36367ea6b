"""`recscale analyze`: recompute every diagnostic for a finished run's best checkpoint on its validation data, and log
the results into that run: headline metrics ``diag/...`` at the checkpoint's step, artifacts under
``diagnostics/analyze-stepN``, and, as the best checkpoint's diagnostics (contract C3), ``diag_best/*``, the tag
``best_step`` and ``diagnostics/best/values.json`` (replacing what the fit logged, e.g. with another sample size).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import yaml

from recscale.data.formats import PrepareError


def _best_checkpoint(client, run_id: str, into: Path) -> Path:
    arts = [a.path for a in client.list_artifacts(run_id)]
    best = sorted(a for a in arts if a.startswith("best"))
    if not best:
        raise PrepareError(f"run {run_id} has no best checkpoint artifact (artifacts: {', '.join(arts) or 'none'}); "
                           "pass --ckpt PATH instead")
    local = client.download_artifacts(run_id, best[-1], str(into))
    ckpts = sorted(Path(local).glob("*.ckpt"))
    if not ckpts:
        raise PrepareError(f"run {run_id}: artifact {best[-1]} holds no .ckpt file")
    return ckpts[0]


def analyze(run_id: str | None = None, ckpt: str | None = None, data_dir: str | None = None,
            tracking_uri: str | None = None, sample_rows: int = 50_000, normalize_rows: bool = False,
            output: str | None = None, gradient_mode: str = "train") -> dict:
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    from recscale.data.datamodule import CTRDataModule, sample_split
    from recscale.diagnostics.callback import log_best, log_report, write_report
    from recscale.diagnostics.compute import Options, compute_report
    from recscale.models.module import CTRModel
    from recscale.tracking import default_tracking_uri

    if not run_id and not ckpt:
        raise PrepareError("pass --run RUN_ID or --ckpt PATH")
    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp:
        if run_id:
            from recscale.tracking import resolve_run

            try:
                run_id = resolve_run(client, run_id)  # a run id or a unique run name
            except LookupError as e:
                raise PrepareError(f"{e} in {uri}: check --run and MLFLOW_TRACKING_URI") from e
        path = Path(ckpt) if ckpt else _best_checkpoint(client, run_id, Path(tmp))
        if not path.is_file():
            raise PrepareError(f"checkpoint {path} does not exist (--ckpt)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        step = int(state.get("global_step", 0))
        if data_dir is None:
            data_dir = (state.get("datamodule_hyper_parameters") or {}).get("data_dir")
        if data_dir is None and run_id:
            cfg_path = client.download_artifacts(run_id, "config.yaml", tmp)
            data_dir = yaml.safe_load(Path(cfg_path).read_text())["data"]["data_dir"]
        if data_dir is None:
            raise PrepareError("cannot tell the run's data directory: pass --data DIR")
        model = CTRModel.load_from_checkpoint(path, map_location="cpu")
        dm = CTRDataModule(data_dir, num_workers=0)
        if dm.field_dims != list(model.hparams.field_dims):
            raise PrepareError(f"{data_dir} does not match the checkpoint's vocabulary sizes: pass the run's --data")
        x, y = sample_split(dm.units("valid"), dm.fields, sample_rows)
        report = compute_report(model, (torch.from_numpy(x), torch.from_numpy(y)),
                                Options(normalize_rows=normalize_rows, gradient_mode=gradient_mode,
                                        title=f"step {step}"), dm.fields)
        if output:
            write_report(report, Path(output))
        if run_id:
            logger = MLFlowLogger(tracking_uri=uri, run_id=run_id)
            log_report([logger], report, step, f"diagnostics/analyze-step{step:08d}")
            if not ckpt:  # the run's own best checkpoint
                log_best([logger], report.metrics, step)
    keys = ["ia/mean", "ia_set/mean", "diversity/mean", "diversity_se_split/mean", "sub_ia/correlation_factor",
            "rankme/embeddings", "rankme/gradients"]
    return {"checkpoint": str(path if ckpt else "best checkpoint of the run"), "step": step,
            **{k: round(report.metrics[k], 4) for k in keys if k in report.metrics}}
