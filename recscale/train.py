"""`recscale fit|validate|test|predict`: a LightningCLI with MLflow tracking and the ICML 2024 training recipe.

Recipe (ICML 2024 App. C.2): Adam lr 1e-3, weight decay 1e-6, batch 2048, early stopping on validation AUC with
patience 3, the best checkpoint kept, and the test AUC of that checkpoint computed at the end of ``fit``.

Tracking: every run logs to MLflow. The store is ``--trainer.logger.init_args.tracking_uri``, else
``MLFLOW_TRACKING_URI``, else a SQLite store
``mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (no server needed; ``mlflow ui --backend-store-uri
sqlite:///mlruns/mlflow.db`` shows the runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from recscale.data.datamodule import CTRDataModule
from recscale.data.formats import PrepareError
from recscale.diagnostics.callback import CollapseDiagnostics
from recscale.models.backbones import ConfigError
from recscale.models.module import CTRModel

DEFAULT_STORE = "mlruns"


def default_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    Path(DEFAULT_STORE).mkdir(exist_ok=True)
    return f"sqlite:///{Path(DEFAULT_STORE).resolve() / 'mlflow.db'}"


def default_artifact_location(uri: str) -> str | None:
    """New experiments in a SQLite store keep their artifacts in ``artifacts/`` beside the database file; a server
    decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment `name`, creating it if needed; safe when several processes race to create it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri))
    except Exception:  # another process created it between the two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class TrackingUnavailable(ConfigError):
    """The MLflow tracking server cannot be reached when a run starts."""


def check_server(uri: str, timeout: float = 5.0) -> None:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
    except (urllib.error.URLError, OSError) as e:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({getattr(e, 'reason', e)}): start it with `make mlflow` "
            "(or check the address), or unset MLFLOW_TRACKING_URI to log to the local store mlruns/") from e


class RecscaleLogger(MLFlowLogger):
    """MLFlowLogger with a local SQLite store by default (MLflow >= 3.13 rejects ``file:`` stores), a fast check of a
    server at start, and no training lost to a tracking server that goes away.

    Server down mid-run: metrics are buffered in memory and retried every ``retry_seconds`` (each attempt bounded by
    short HTTP timeouts); when the server is back the buffer is sent in order. If it is still down when training
    ends, the unsent metrics are written to ``unsent-metrics-RUN_ID.jsonl`` beside the checkpoints and the path is
    printed. Checkpoints are always written locally first.
    """

    def __init__(self, experiment_name: str = "recscale", run_name: str | None = None,
                 tracking_uri: str | None = None, log_model: bool = True, tags: dict[str, str] | None = None,
                 run_id: str | None = None, retry_seconds: float = 15.0):
        uri = tracking_uri or default_tracking_uri()
        if uri.startswith(("http://", "https://")):
            for var, val in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
                             ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")):
                os.environ.setdefault(var, val)
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri, log_model=log_model,
                         artifact_location=default_artifact_location(uri), tags=tags, run_id=run_id)
        self.retry_seconds = retry_seconds
        self._pending: list[tuple[dict, int | None]] = []
        self._retry_at = 0.0
        self._down = False
        self.unsent_path: Path | None = None

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        try:
            super().log_hyperparams(params)
        except Exception as e:  # keep training; the resolved config is also in checkpoints and config.yaml
            print(f"recscale: warning: could not log hyperparameters to {self._tracking_uri} "
                  f"({e.__class__.__name__}); they are in the checkpoints' hyper_parameters", file=sys.stderr)

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        self._pending.append((dict(metrics), step))
        self.flush()

    def flush(self) -> bool:
        if time.monotonic() < self._retry_at:
            return False
        while self._pending:
            m, s = self._pending[0]
            try:
                MLFlowLogger.log_metrics(self, m, s)
            except Exception as e:  # any transport error: keep training, keep the metrics
                self._retry_at = time.monotonic() + self.retry_seconds
                if not self._down:
                    print(f"recscale: warning: MLflow server {self._tracking_uri} unreachable ({e.__class__.__name__}); "
                          f"training goes on, metrics are buffered and retried every {self.retry_seconds:.0f} s",
                          file=sys.stderr)
                self._down = True
                return False
            self._pending.pop(0)
        if self._down:
            print("recscale: MLflow server reachable again; buffered metrics sent", file=sys.stderr)
            self._down = False
        return True

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self._retry_at = 0.0
        if not self.flush():
            ckpt = self._checkpoint_callback
            where = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else Path(".")
            where.mkdir(parents=True, exist_ok=True)
            self.unsent_path = where / f"unsent-metrics-{self._run_id}.jsonl"
            with open(self.unsent_path, "w") as f:
                for m, s in self._pending:
                    f.write(json.dumps({"step": s, "metrics": m}) + "\n")
            print(f"recscale: error: MLflow server {self._tracking_uri} still unreachable at the end of training: "
                  f"{sum(len(m) for m, _ in self._pending)} metric values were written to {self.unsent_path} "
                  f"(checkpoints are in {where})", file=sys.stderr)
        try:
            super().finalize(status)
        except Exception as e:
            print(f"recscale: warning: could not upload the checkpoints or close run {self._run_id} "
                  f"({e.__class__.__name__}); the checkpoints are on disk", file=sys.stderr)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


NOT_IDENTITY = ("config", "ckpt_path")  # config keys that do not change what a run computes


def resolved_config(parser, config) -> tuple[str, dict]:
    """The resolved config as YAML text, and as a dict without the keys that do not define the experiment
    (``ckpt_path``, the tracking destination under ``trainer.logger``)."""
    text = parser.dump(config, skip_none=False)
    cfg = yaml.safe_load(text)
    for k in NOT_IDENTITY:
        cfg.pop(k, None)
    if isinstance(cfg.get("trainer"), dict):
        cfg["trainer"].pop("logger", None)
    return text, cfg


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrackRun(SaveConfigCallback):
    """Records a run in MLflow before training starts: the resolved config (artifact ``config.yaml`` and flattened
    params), its hash, tags (model, mode, scale, dataset, seed, config_hash), parameter counts and the data spec; and
    leaves the run id beside the checkpoints (``mlflow_run.json``) so that a resumed fit continues the same run."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        text, cfg = resolved_config(self.parser, self.config)
        dm = trainer.datamodule
        counts = pl_module.parameter_counts() if isinstance(pl_module, CTRModel) else {}
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
                    "seed": str(cfg.get("seed_everything")), "config_hash": config_hash(cfg)}
            for k, v in tags.items():
                client.set_tag(run, k, v)
            client.log_text(run, text, "config.yaml")
            if isinstance(dm, CTRDataModule):
                client.log_text(run, json.dumps(dm.spec, indent=2), "data/spec.json")
            ckpt = trainer.checkpoint_callback
            if ckpt is not None and ckpt.dirpath:
                Path(ckpt.dirpath).mkdir(parents=True, exist_ok=True)
                _atomic_write(Path(ckpt.dirpath) / RUN_FILE, json.dumps(
                    {"run_id": run, "experiment_id": logger.experiment_id, "tracking_uri": logger._tracking_uri}))
        if counts and trainer.is_global_zero:
            print(f"recscale: {counts['embedding']:,} embedding + {counts['dense']:,} dense parameters "
                  f"({pl_module.num_sets} set(s) of size {pl_module.embed_dim})", file=sys.stderr)


RUN_FILE = "mlflow_run.json"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file in the same directory, flushed to disk and renamed over the old
    one: a kill while saving leaves the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class RandomState(Callback):
    """Saves the Python, numpy and torch random states in every checkpoint and restores them on resume, so that a
    resumed CPU run draws the same dropout masks as an uninterrupted one."""

    def state_dict(self):  # plain types only: checkpoints must load with torch.load(weights_only=True)
        name, keys, pos, has_gauss, cached = np.random.get_state()
        return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
                "torch": torch.get_rng_state()}

    def load_state_dict(self, state):
        random.setstate(state["python"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])


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


class TrainingStopped(RuntimeError):
    """Training stopped for a reason the user must act on; the message says what happened and what to do."""


class RecscaleCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.field_dims", "model.field_dims", apply_on="instantiate")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(CollapseDiagnostics, "diagnostics")
        parser.add_lightning_class_args(RandomState, "random_state")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after fit, compute test AUC/logloss with the best checkpoint")
        parser.set_defaults({
            "early_stopping.monitor": "val/auc", "early_stopping.mode": "max", "early_stopping.patience": 3,
            "checkpoint.monitor": "val/auc", "checkpoint.mode": "max", "checkpoint.save_top_k": 1,
            "checkpoint.save_last": True, "checkpoint.filename": "best-epoch{epoch}", "checkpoint.auto_insert_metric_name": False,
        })

    def before_fit(self):
        """Fix the checkpoint directory from the resolved config (``checkpoints/CONFIG_HASH``), so that
        ``--ckpt_path last`` finds it before anything runs, and resume the MLflow run recorded there."""
        _, cfg = resolved_config(self._parser(self.subcommand), self.config[self.subcommand])
        root = Path(self.trainer.default_root_dir) / "checkpoints" / config_hash(cfg)
        for cb in self.trainer.checkpoint_callbacks:
            if cb.dirpath is None:
                cb.dirpath = str(root)
        ckpt = self.config[self.subcommand].get("ckpt_path")
        run_file = root / RUN_FILE
        if ckpt and run_file.exists() and (ckpt == "last" or Path(ckpt).resolve().parent == root.resolve()):
            run_id = json.loads(run_file.read_text())["run_id"]
            for lg in self.trainer.loggers:
                if isinstance(lg, MLFlowLogger) and lg._run_id is None:
                    lg._run_id = run_id
                    print(f"recscale: resuming MLflow run {run_id} from {ckpt}", file=sys.stderr)

    def instantiate_trainer(self, **kwargs):
        """Atomic checkpoint writes unless the config brings its own CheckpointIO (added here rather than as a
        config default, so that the resolved config stays serialisable and its hash stable)."""
        plugins = (self._get(self.config_init, "trainer", default={}) or {}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        trainer = super().instantiate_trainer(**kwargs)
        for lg in trainer.loggers:  # a tracking server must answer before anything runs (here, not in the logger's
            uri = getattr(lg, "_tracking_uri", "") or ""  # __init__: jsonargparse would swallow the error there)
            if isinstance(lg, MLFlowLogger) and uri.startswith(("http://", "https://")):
                check_server(uri)
            if isinstance(lg, MLFlowLogger) and lg._run_id is None and trainer.is_global_zero:
                ensure_experiment(uri, lg._experiment_name)  # parallel grid cells race to create it otherwise
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except FloatingPointError as e:
            ck = self.trainer.checkpoint_callback
            last = (ck.last_model_path or ck.best_model_path) if ck is not None else ""
            raise TrainingStopped(
                f"{e}. Training stopped; the last good checkpoint is {last or 'none (no epoch had finished)'}. "
                "Fix the cause (e.g. a lower --model.lr) and resume with --ckpt_path last.") from e
        except torch.cuda.OutOfMemoryError as e:
            hp, dm = self.model.hparams, self.datamodule
            counts = self.model.parameter_counts()
            raise TrainingStopped(
                f"out of GPU memory with data.batch_size={dm.hparams.batch_size}, model.mode={hp.mode}, "
                f"model.scale={hp.scale} ({counts['embedding']:,} embedding + {counts['dense']:,} dense parameters): "
                "lower --data.batch_size or the scale, or spread the run over more GPUs (--trainer.strategy ddp)") from e

    def after_fit(self):
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        ckpt = self.trainer.checkpoint_callback
        path = "best" if ckpt is not None and ckpt.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=path)


def _cli_kwargs() -> dict:
    trainer_defaults = {
        "logger": lazy_instance(RecscaleLogger),
        "callbacks": [lazy_instance(SamplesPerSecond)],
        "max_epochs": 100,
        "deterministic": True,
    }
    return dict(trainer_defaults=trainer_defaults, seed_everything_default=0, save_config_callback=TrackRun,
                save_config_kwargs={"overwrite": True, "save_to_log_dir": False}, parser_kwargs={"default_env": False})


class _ParseOnly(RecscaleCLI):
    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse_fit_config(argv: list[str]):
    """Parse ``recscale fit`` arguments exactly as `fit` does, without instantiating anything: (parser, config)."""
    cli = _ParseOnly(CTRModel, CTRDataModule, args=argv, **_cli_kwargs())
    return cli._parser("fit"), cli.config["fit"]


def cli_main(argv: list[str] | None = None) -> RecscaleCLI | None:
    # our IterableDataset splits work per worker itself (recscale.data.datamodule), so its __len__ is exact
    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    try:
        return RecscaleCLI(CTRModel, CTRDataModule, args=argv, **_cli_kwargs())
    except (PrepareError, ConfigError) as e:
        print(f"recscale: error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        print(f"recscale: error: {e}", file=sys.stderr)
        sys.exit(3)
