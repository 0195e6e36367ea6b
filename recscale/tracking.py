"""MLflow tracking for recscale runs: where runs go by default (a SQLite store, no server), a logger that keeps
training going when a tracking server disappears, the resolved-config hash that identifies an experiment, and the
callback that records a run (config, tags, parameter counts, data spec) before training starts."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Literal

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
# MLflow 3 opens an experiment on the GenAI pages unless this tag says it holds model training runs (the values are
# the UI's ExperimentKind enum: "custom_model_development" is the classic runs table / model metrics view)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PARENT_RUN_ENV = "RECSCALE_PARENT_RUN_ID"  # set by `recscale grid`: each cell's run becomes a child of the grid's run


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
        if EXPERIMENT_KIND_TAG not in exp.tags:  # experiments made before recscale set the kind
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # another process created it between the two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def default_run_name(dataset: str, model: str, mode: str, scale, seed, stage: str = "fit") -> str:
    """The grid's cell pattern, e.g. ``criteo-dcnv2-me10x-seed0`` (``-test`` etc. appended for other stages)."""
    name = f"{dataset}-{model}-{mode}{scale}x-seed{seed}".lower()
    return name if stage == "fit" else f"{name}-{stage}"


def unique_run_name(tracking_uri: str, experiment_id: str, name: str) -> str:
    """`name` if no run of the experiment has it, else the first free ``name-2``, ``name-3``, ..."""
    from mlflow.tracking import MlflowClient

    quoted = name.replace("'", "\\'")
    runs = MlflowClient(tracking_uri).search_runs([experiment_id], filter_string=f"attributes.run_name LIKE '{quoted}%'",
                                                  max_results=50000)
    taken = {r.info.run_name for r in runs}
    k = 1
    while (candidate := name if k == 1 else f"{name}-{k}") in taken:
        k += 1
    return candidate


def resolve_run(client, ref: str) -> str:
    """The id of the run `ref` names: a run id, or a run name that exactly one run in the store carries."""
    try:
        return client.get_run(ref).info.run_id
    except Exception:  # not an id (mlflow raises its own exception types); try it as a name
        pass
    quoted = ref.replace("'", "\\'")
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string=f"attributes.run_name = '{quoted}'", max_results=50) if exps else []
    if len(runs) == 1:
        return runs[0].info.run_id
    if not runs:
        raise LookupError(f"no run has the id or name {ref!r}")
    raise LookupError(f"{len(runs)} runs are named {ref!r} (ids {', '.join(r.info.run_id for r in runs[:5])}): "
                      "pass the run id")


def browse_hint(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """How to look at a run: the `mlflow ui` command for a local store, the run's page for a server."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri}   then http://127.0.0.1:5000/{page}"


def run_banner(tracking_uri: str, experiment_id: str, run_id: str, run_name: str | None) -> str:
    return (f"recscale: MLflow run {run_name or run_id} (id {run_id}) in {tracking_uri}\n"
            f"recscale:   browse: {browse_hint(tracking_uri, experiment_id, run_id)}\n"
            f"recscale:   analyze: recscale analyze --run {run_name or run_id}")


def git_state(*dirs: Path) -> dict[str, str]:
    """``git_commit`` and ``git_dirty`` of the first of `dirs` inside a git checkout (the code that ran: the package's
    own checkout first, then the working directory); {} when none is."""
    for d in dirs:
        try:
            commit = subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10)
            if commit.returncode != 0:
                continue
            status = subprocess.run(["git", "-C", str(d), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return {}
        return {"git_commit": commit.stdout.strip(), "git_dirty": str(bool(status.stdout.strip())).lower()}
    return {}


def data_checksum(spec: dict) -> str:
    """The identity of a prepared directory's data: the SHA-256 of its raw input (spec.json ``input.sha256``), else
    of spec.json itself (directories written by ``encode`` or by hand)."""
    sha = (spec.get("input") or {}).get("sha256")
    return sha or "spec:" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class TrackingUnavailable(ConfigError):
    """The MLflow tracking server cannot be reached when a run starts."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` tracking URI (None for other stores)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def open_sqlite_store(uri: str) -> None:
    """Check that a SQLite store can be written and create its schema, safely under concurrency.

    An unwritable path fails at once with its name (MLflow would retry for minutes and never name it). Schema creation
    is serialised by an exclusive ``flock`` on ``PATH.lock``: several fits started together on a new store otherwise
    race in MLflow's table creation and migrations (``table ... already exists``) and lose a run. MLflow caches the
    store per process, so later clients in this process reuse it."""
    db = sqlite_path(uri)
    if db is None:
        return
    fix = "choose a writable place with MLFLOW_TRACKING_URI=sqlite:////ABSOLUTE/PATH.db (or unset it for ./mlruns)"
    parent = db.parent
    if parent.exists() and not parent.is_dir():
        raise TrackingUnavailable(f"cannot create the MLflow store {db}: {parent} is a file, not a directory: {fix}")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrackingUnavailable(f"cannot create the directory {parent} of the MLflow store {db} ({e.strerror}): "
                                  f"{fix}") from e
    if db.is_dir():
        raise TrackingUnavailable(f"the MLflow store {db} is a directory, not a SQLite file: {fix}")
    if not os.access(parent, os.W_OK | os.X_OK) or (db.exists() and not os.access(db, os.R_OK | os.W_OK)):
        what = f"{db} is not writable" if db.exists() and os.access(parent, os.W_OK) else f"{parent} is not writable"
        raise TrackingUnavailable(f"cannot write the MLflow store {db}: {what}: {fix}")
    import fcntl

    from mlflow.tracking import MlflowClient

    with open(parent / f"{db.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)  # creates or upgrades the schema
        except Exception as e:
            raise TrackingUnavailable(f"cannot open the MLflow store {db} ({e.__class__.__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''}): {fix}") from e
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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

    Checkpoints in MLflow (``log_model``): ``"best"`` (default) uploads the best checkpoint once, when training ends,
    as artifact ``best-epochN/best-epochN.ckpt``, without the optimizer state unless ``log_model_weights_only`` is
    false (a third of the size with Adam; it loads with ``CTRModel.load_from_checkpoint`` and ``recscale analyze``);
    ``True`` / ``"all"`` are Lightning's (every kept checkpoint, with optimizer state); ``False`` uploads nothing.

    System metrics (CPU, memory, disk, network, GPU via pynvml) go to the run's System metrics tab every
    ``system_metrics_seconds`` when psutil is installed (``log_system_metrics``).
    """

    def __init__(self, experiment_name: str = "recscale", run_name: str | None = None,
                 tracking_uri: str | None = None, log_model: bool | Literal["all", "best"] = "best",
                 tags: dict[str, str] | None = None, run_id: str | None = None, retry_seconds: float = 15.0,
                 log_model_weights_only: bool = True, log_system_metrics: bool = True,
                 system_metrics_seconds: float = 10.0):
        uri = tracking_uri or default_tracking_uri()
        open_sqlite_store(uri)  # before MLFlowLogger creates its client: fast error, no schema race
        if uri.startswith(("http://", "https://")):
            for var, val in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
                             ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")):
                os.environ.setdefault(var, val)
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri,
                         log_model=True if log_model == "best" else log_model,
                         artifact_location=default_artifact_location(uri), tags=tags, run_id=run_id)
        self.log_best_only = log_model == "best"
        self.log_model_weights_only = log_model_weights_only
        self.logged_best: str | None = None  # local path of the best checkpoint once it is in MLflow
        self.log_system_metrics = log_system_metrics
        self.system_metrics_seconds = system_metrics_seconds
        self._monitor = None
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

    def start_system_metrics(self) -> bool:
        """Start MLflow's system metrics thread for this run (once); False when psutil is missing or it is off."""
        if self._monitor is not None or not self.log_system_metrics:
            return self._monitor is not None
        try:
            import psutil  # noqa: F401  (MLflow's CPU/memory monitors need it)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:
            return False
        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.system_metrics_seconds,
                                             resume_logging=True, tracking_uri=self._tracking_uri)
        self._monitor.start()
        return True

    def _scan_and_log_checkpoints(self, checkpoint_callback) -> None:
        if not self.log_best_only:
            return super()._scan_and_log_checkpoints(checkpoint_callback)
        best = checkpoint_callback.best_model_path
        if not best or best == self.logged_best or not Path(best).is_file():
            return
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(best)
            if self.log_model_weights_only:
                state = torch.load(best, map_location="cpu", weights_only=False)
                for key in ("optimizer_states", "lr_schedulers"):
                    state.pop(key, None)
                path = Path(tmp) / Path(best).name
                torch.save(state, path)
            self.experiment.log_artifact(self._run_id, str(path), Path(best).stem)
        self.logged_best = best

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
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


NOT_IDENTITY = ("config", "ckpt_path", "keep_local_best")  # keys that do not change what a run computes


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


def cell_hash(cfg: dict) -> str:
    """The hash of the resolved config without ``seed_everything``: runs that differ only by seed share it."""
    return config_hash({k: v for k, v in cfg.items() if k != "seed_everything"})


def recipe_override(cfg: dict) -> str | None:
    """What replaces the model's own optimizer (LightningCLI's ``--optimizer`` / ``--lr_scheduler``), else None."""
    parts = []
    for key in ("optimizer", "lr_scheduler"):
        v = cfg.get(key)
        if isinstance(v, dict) and v.get("class_path"):
            args = ", ".join(f"{k}={a}" for k, a in sorted((v.get("init_args") or {}).items()))
            parts.append(f"{key}={v['class_path'].rsplit('.', 1)[-1]}({args})")
    return "; ".join(parts) or None


def run_tags(cfg: dict, hp, spec: dict | None) -> dict[str, str]:
    """The tags every run carries (CONTRACTS C5): what it is (model, mode, scale, dataset, seed), what computed it
    (config_hash; cell_hash = the same without the seed; recipe; protocol and data_checksum of the data; git_commit and
    git_dirty of the code) and what replaced the recipe's optimizer, if anything (recipe_override)."""
    import recscale

    backbone = cfg.get("model", {}).get("backbone", {})
    name = backbone.get("class_path", "?").rsplit(".", 1)[-1] if isinstance(backbone, dict) else "?"
    recipe = str(hp.get("recipe", "icml24"))
    override = recipe_override(cfg)
    tags = {"model": name, "mode": str(hp.get("mode", "?")), "scale": str(hp.get("scale", "?")),
            "dataset": (spec or {}).get("dataset", "?"), "seed": str(cfg.get("seed_everything")),
            "config_hash": config_hash(cfg), "cell_hash": cell_hash(cfg),
            "recipe": recipe if override is None else f"{recipe}+override",
            "recscale_version": recscale.__version__}
    if override:
        tags["recipe_override"] = override
    if spec:
        tags["protocol"] = str(spec.get("protocol", "?"))
        tags["data_checksum"] = data_checksum(spec)
    git = git_state(Path(recscale.__file__).resolve().parents[1], Path.cwd())
    tags.update(git)
    if "git_commit" in git:
        tags["mlflow.source.git.commit"] = git["git_commit"]
    if os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    return tags


def log_dataset(client, run_id: str, spec: dict, data_dir: str) -> None:
    """The prepared data as the run's MLflow dataset input (the runs table's Dataset column): name DATASET-PROTOCOL,
    digest = the first 16 hex digits of `data_checksum`, source = the data directory, profile = rows per split."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    rows = {k: v.get("rows") for k, v in (spec.get("splits") or {}).items()}
    ds = Dataset(name=f"{spec.get('dataset', 'data')}-{spec.get('protocol', '?')}",
                 digest=data_checksum(spec).removeprefix("spec:")[:16], source_type="local", source=data_dir,
                 profile=json.dumps({"rows": rows}))
    inputs = [DatasetInput(ds, tags=[InputTag("mlflow.data.context", "training")])]
    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except Exception as e:  # parallel cells logging the same new dataset race on its UNIQUE row in the store: the
            if attempt == 2:  # loser's retry finds the row and only links it. The dataset column is a convenience:
                print(f"recscale: warning: could not record the dataset input of run {run_id} "  # never fail a run
                      f"({e.__class__.__name__}); the data checksum is in the tag data_checksum", file=sys.stderr)
            time.sleep(0.2 * (attempt + 1))


class TrackRun(SaveConfigCallback):
    """Records a run in MLflow before training starts: the resolved config (artifact ``config.yaml`` and flattened
    params), its hash, the tags of `run_tags`, parameter counts and the data spec; prints the run's name, id, store
    and how to browse it; starts the system metrics thread; and leaves the run id beside the checkpoints
    (``mlflow_run.json``) so that a resumed fit continues the same run."""

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
            tags = run_tags(cfg, hp, dm.spec if isinstance(dm, CTRDataModule) else None)
            from recscale.slurm import job_tags

            tags.update(job_tags())  # SLURM job/array ids when the run (or its resumption) runs in a SLURM job
            for k, v in tags.items():
                client.set_tag(run, k, v)
            if "recipe_override" in tags:
                print(f"recscale: note: {tags['recipe_override']} replaces the model's Adam recipe (model.lr and "
                      "model.weight_decay are not used); the run is tagged recipe_override", file=sys.stderr)
            if isinstance(logger, RecscaleLogger):
                logger.start_system_metrics()
            if trainer.is_global_zero:
                print(run_banner(logger._tracking_uri, logger.experiment_id, run, client.get_run(run).info.run_name),
                      file=sys.stderr)
            client.log_text(run, text, "config.yaml")
            if isinstance(dm, CTRDataModule):
                client.log_text(run, json.dumps(dm.spec, indent=2), "data/spec.json")
                log_dataset(client, run, dm.spec, str(dm.data_dir))
            ckpt = trainer.checkpoint_callback
            if ckpt is not None and ckpt.dirpath:
                Path(ckpt.dirpath).mkdir(parents=True, exist_ok=True)
                if not any(Path(ckpt.dirpath).iterdir()):  # a fresh directory: ModelCheckpoint would otherwise
                    warnings.filterwarnings(  # call it "not empty" because of the file written here
                        "ignore", message=re.escape(f"Checkpoint directory {ckpt.dirpath} exists and is not empty"))
                atomic_write(Path(ckpt.dirpath) / RUN_FILE, json.dumps(
                    {"run_id": run, "experiment_id": logger.experiment_id, "tracking_uri": logger._tracking_uri}))
        if counts and trainer.is_global_zero:
            print(f"recscale: {counts['embedding']:,} embedding + {counts['dense']:,} dense parameters "
                  f"({pl_module.num_sets} set(s) of size {pl_module.embed_dim})", file=sys.stderr)
