"""`recscale fit|validate|test|predict`: a LightningCLI with MLflow tracking and the ICML 2024 training recipe.

Recipe (ICML 2024 App. C.2): Adam lr 1e-3, weight decay 1e-6, batch 2048, early stopping on validation AUC with
patience 3, the best checkpoint kept, and the test AUC of that checkpoint computed at the end of ``fit``.

Tracking: every run logs to MLflow. The store is ``--tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store
``mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (no server needed; ``mlflow ui --backend-store-uri
sqlite:///mlruns/mlflow.db`` shows the runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from recscale.data.datamodule import CTRDataModule
from recscale.data.formats import PrepareError
from recscale.models.backbones import ConfigError
from recscale.models.module import CTRModel

DEFAULT_STORE = "mlruns"


def default_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    Path(DEFAULT_STORE).mkdir(exist_ok=True)
    return f"sqlite:///{Path(DEFAULT_STORE).resolve() / 'mlflow.db'}"


class RecscaleLogger(MLFlowLogger):
    """MLFlowLogger whose default store is the local SQLite store (MLflow >= 3.13 rejects ``file:`` stores).

    A new experiment created in a SQLite store gets its artifacts under ``mlruns/artifacts/``.
    """

    def __init__(self, experiment_name: str = "recscale", run_name: str | None = None,
                 tracking_uri: str | None = None, log_model: bool = True):
        uri = tracking_uri or default_tracking_uri()
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri, log_model=log_model,
                         artifact_location=artifacts)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class TrackRun(SaveConfigCallback):
    """Records a run in MLflow before training starts: the resolved config (artifact ``config.yaml`` and flattened
    params), its hash, tags (model, mode, scale, dataset, seed), parameter counts and the data spec; points the
    checkpoint directory at ``checkpoints/EXPERIMENT_ID/RUN_ID``."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False)
        cfg = yaml.safe_load(config)
        cfg.pop("config", None)
        config_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
        dm = trainer.datamodule
        counts = pl_module.parameter_counts() if isinstance(pl_module, CTRModel) else {}
        for ckpt in trainer.checkpoint_callbacks:
            if ckpt.dirpath is None:
                logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
                sub = f"{logger.experiment_id}/{logger.run_id}" if logger else "local"
                ckpt.dirpath = str(Path(trainer.default_root_dir) / "checkpoints" / sub)
        for logger in trainer.loggers:
            if not isinstance(logger, MLFlowLogger):
                continue
            client, run = logger.experiment, logger.run_id
            params = flatten(cfg)
            params.update({f"params.{k}": str(v) for k, v in counts.items()})
            logger.log_hyperparams({k: v[:6000] for k, v in params.items()})
            hp = getattr(pl_module, "hparams", {})
            backbone = cfg.get("model", {}).get("backbone", {})
            name = backbone.get("class_path", "?").rsplit(".", 1)[-1] if isinstance(backbone, dict) else "?"
            tags = {"model": name, "mode": hp.get("mode", "?"), "scale": str(hp.get("scale", "?")),
                    "dataset": dm.spec.get("dataset", "?") if isinstance(dm, CTRDataModule) else "?",
                    "seed": str(cfg.get("seed_everything")), "config_hash": config_hash, "stage": stage}
            for k, v in tags.items():
                client.set_tag(run, k, v)
            client.log_text(run, config, "config.yaml")
            if isinstance(dm, CTRDataModule):
                client.log_text(run, json.dumps(dm.spec, indent=2), "data/spec.json")
        if counts and trainer.is_global_zero:
            print(f"recscale: {counts['embedding']:,} embedding + {counts['dense']:,} dense parameters "
                  f"({pl_module.num_sets} set(s) of size {pl_module.embed_dim})", file=sys.stderr)


class SamplesPerSecond(Callback):
    """Training throughput in the progress bar (``samples_s``) and per epoch in the logger (``train/samples_per_s``)."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.t0, self.n, self.t_last, self.n_last = time.perf_counter(), 0, time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.n += len(batch[1])
        now = time.perf_counter()
        if now - self.t_last > 1.0 or batch_idx == 0:
            rate = (self.n - self.n_last) / max(now - self.t_last, 1e-9)
            pl_module.log("samples_s", rate, prog_bar=True, logger=False, on_step=True, on_epoch=False)
            self.t_last, self.n_last = now, self.n

    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.log("train/samples_per_s", self.n / max(time.perf_counter() - self.t0, 1e-9), on_epoch=True)


class RecscaleCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.field_dims", "model.field_dims", apply_on="instantiate")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after fit, compute test AUC/logloss with the best checkpoint")
        parser.set_defaults({
            "early_stopping.monitor": "val/auc", "early_stopping.mode": "max", "early_stopping.patience": 3,
            "checkpoint.monitor": "val/auc", "checkpoint.mode": "max", "checkpoint.save_top_k": 1,
            "checkpoint.save_last": True, "checkpoint.filename": "best-epoch{epoch}", "checkpoint.auto_insert_metric_name": False,
        })

    def after_fit(self):
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        ckpt = self.trainer.checkpoint_callback
        path = "best" if ckpt is not None and ckpt.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=path)


def cli_main(argv: list[str] | None = None) -> RecscaleCLI | None:
    # our IterableDataset splits work per worker itself (recscale.data.datamodule), so its __len__ is exact
    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    trainer_defaults = {
        "logger": lazy_instance(RecscaleLogger),
        "callbacks": [lazy_instance(SamplesPerSecond)],
        "max_epochs": 100,
        "deterministic": True,
    }
    try:
        return RecscaleCLI(CTRModel, CTRDataModule, args=argv, trainer_defaults=trainer_defaults,
                           seed_everything_default=0, save_config_callback=TrackRun,
                           save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
                           parser_kwargs={"default_env": False})
    except (PrepareError, ConfigError) as e:
        print(f"recscale: error: {e}", file=sys.stderr)
        sys.exit(2)
