"""MLflow tracking for recscale runs: where runs go by default (a SQLite store, no server), a logger that keeps
training going when a tracking server disappears, the resolved-config hash that identifies an experiment, and the
callback that records a run (config, tags, parameter counts, data spec) before training starts."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from recscale.checkpointing import RUN_FILE, atomic_write
from recscale.data.datamodule import CTRDataModule
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
            from recscale.slurm import job_tags

            tags.update(job_tags())  # SLURM job/array ids when the run (or its resumption) runs in a SLURM job
            for k, v in tags.items():
                client.set_tag(run, k, v)
            client.log_text(run, text, "config.yaml")
            if isinstance(dm, CTRDataModule):
                client.log_text(run, json.dumps(dm.spec, indent=2), "data/spec.json")
            ckpt = trainer.checkpoint_callback
            if ckpt is not None and ckpt.dirpath:
                Path(ckpt.dirpath).mkdir(parents=True, exist_ok=True)
                atomic_write(Path(ckpt.dirpath) / RUN_FILE, json.dumps(
                    {"run_id": run, "experiment_id": logger.experiment_id, "tracking_uri": logger._tracking_uri}))
        if counts and trainer.is_global_zero:
            print(f"recscale: {counts['embedding']:,} embedding + {counts['dense']:,} dense parameters "
                  f"({pl_module.num_sets} set(s) of size {pl_module.embed_dim})", file=sys.stderr)
