"""`recscale fit|validate|test|predict`: a LightningCLI with MLflow tracking and the ICML 2024 training recipe.

Recipe (ICML 2024 App. C.2): Adam lr 1e-3, weight decay 1e-6, batch 2048, early stopping on validation AUC with
patience 3, the best checkpoint kept, and the test AUC of that checkpoint computed at the end of ``fit``.

Tracking: every run logs to MLflow. The store is ``--trainer.logger.init_args.tracking_uri``, else
``MLFLOW_TRACKING_URI``, else a SQLite store
``mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (no server needed; ``mlflow ui --backend-store-uri
sqlite:///mlruns/mlflow.db`` shows the runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from jsonargparse import lazy_instance
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from recscale.checkpointing import (
    RUN_FILE,
    AtomicCheckpointIO,
    CheckpointWriteError,
    ConfiguredOptimizer,
    EpochCheckpoint,
    RandomState,
    config_changes,
)
from recscale.data.datamodule import CTRDataModule
from recscale.data.formats import PrepareError
from recscale.diagnostics.callback import CollapseDiagnostics
from recscale.models.backbones import ConfigError
from recscale.models.module import CTRModel
from recscale.signals import GracefulStop
from recscale.tracking import (
    RecscaleLogger,
    TrackRun,
    check_server,
    config_hash,
    default_run_name,
    ensure_experiment,
    resolved_config,
    run_banner,
    unique_run_name,
)


class SamplesPerSecond(Callback):
    """Training throughput in the progress bar (``samples_s``) and per epoch in the logger (``train/samples_per_s``).

    Only training time counts: the clock stops when validation starts (validation, the diagnostics pass and checkpoint
    writes happen there) and restarts at the next training batch, so ``train/samples_per_s`` = training rows of the
    epoch / seconds spent in its training batches (data loading included)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock

    def on_train_epoch_start(self, trainer, pl_module):
        now = self.clock()
        self.n, self.seconds, self.t_resume, self.t_last, self.n_last = 0, 0.0, now, now, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.t_resume is None:  # first batch after a validation pause
            self.t_resume = self.t_last = self.clock()
            self.n_last = self.n

    def on_train_start(self, trainer, pl_module):  # a fit resumed mid-epoch starts without on_train_epoch_start
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.n += len(batch[1])
        now = self.clock()
        if now - self.t_last > 1.0 or batch_idx == 0:
            rate = (self.n - self.n_last) / max(now - self.t_last, 1e-9)
            pl_module.log("samples_s", rate, prog_bar=True, logger=False, on_step=True, on_epoch=False)
            self.t_last, self.n_last = now, self.n

    def _pause(self) -> None:
        if getattr(self, "t_resume", None) is not None:
            self.seconds += self.clock() - self.t_resume
            self.t_resume = None

    def on_validation_start(self, trainer, pl_module):
        self._pause()  # a no-op outside a training epoch (sanity check, trainer.validate)

    def on_train_epoch_end(self, trainer, pl_module):
        self._pause()
        pl_module.log("train/samples_per_s", self.n / max(self.seconds, 1e-9), on_epoch=True)


class TrainingStopped(RuntimeError):
    """Training stopped for a reason the user must act on; the message says what happened and what to do."""


class RecscaleCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.field_dims", "model.field_dims", apply_on="instantiate")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.add_lightning_class_args(EpochCheckpoint, "checkpoint")  # last.ckpt after every epoch
        parser.add_lightning_class_args(CollapseDiagnostics, "diagnostics")
        parser.add_lightning_class_args(RandomState, "random_state")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after fit, compute test AUC/logloss with the best checkpoint")
        parser.add_argument("--keep_local_best", type=bool, default=False,
                            help="keep the best checkpoint on disk after fit even when it was uploaded to MLflow "
                                 "(default: only last.ckpt stays local, the best lives in the run)")
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
        if ckpt and ckpt not in ("last", "best", "hpc", "registry") and Path(ckpt).is_file() \
                and Path(ckpt).resolve().parent != root.resolve():
            self._continue_from(Path(ckpt), root)
        run_file = root / RUN_FILE
        if ckpt and run_file.exists() and (ckpt == "last" or Path(ckpt).resolve().parent == root.resolve()):
            run_id = json.loads(run_file.read_text())["run_id"]
            for lg in self.trainer.loggers:
                if isinstance(lg, MLFlowLogger) and lg._run_id is None:
                    lg._run_id = run_id
                    print(f"recscale: resuming MLflow run {run_id} from {ckpt}", file=sys.stderr)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI overwrites the model config with the hyperparameters saved in ``--ckpt_path``, so a fit that
        continues with a lower ``--model.lr`` silently got the old one back. In ``fit`` the command's config wins (the
        differences are printed and recorded by `_continue_from`); validate/test/predict keep Lightning's behaviour."""
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()

    def _continue_from(self, ckpt: Path, root: Path) -> None:
        """Continue training from a checkpoint of another config (e.g. after the NaN stop, with a lower lr): a new
        MLflow run that says which run and checkpoint it continues and what changed (tags ``resumed_from_run``,
        ``resumed_from_checkpoint``, ``config_changes``), with the new config's optimizer settings in effect."""
        state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        changes = config_changes(state, dict(self.model.hparams), dict(self.datamodule.hparams))
        old_run_file = ckpt.parent / RUN_FILE
        old_run = json.loads(old_run_file.read_text())["run_id"] if old_run_file.exists() else "unknown"
        text = "; ".join(f"{k}: {a} -> {b}" for k, a, b in ((k, *v) for k, v in changes.items())) or "none"
        print(f"recscale: continuing from checkpoint {ckpt} (epoch {state.get('epoch')}, global step "
              f"{state.get('global_step')}) of MLflow run {old_run} in a new run (checkpoints in {root}); "
              f"model/data changes: {text}", file=sys.stderr)
        tags = {"resumed_from_run": old_run, "resumed_from_checkpoint": str(ckpt.resolve()),
                "resumed_from_config_hash": ckpt.parent.name, "config_changes": text[:5000]}
        for lg in self.trainer.loggers:
            if isinstance(lg, MLFlowLogger) and lg._run_id is None:
                lg.tags = {**(lg.tags or {}), **tags}
        self.trainer.callbacks.append(ConfiguredOptimizer())

    def instantiate_trainer(self, **kwargs):
        """Atomic checkpoint writes unless the config brings its own CheckpointIO, SIGTERM/SIGUSR1 handling
        (recscale.signals), and, inside a SLURM job, Lightning's SLURM environment without its own requeueing (the
        launcher requeues; see recscale.slurm). Added here rather than as config defaults, so that the resolved
        config stays serialisable and its hash stable."""
        trainer_cfg = self._get(self.config_init, "trainer", default={}) or {}
        plugins = trainer_cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            plugins.append(SLURMEnvironment(auto_requeue=False))
        kwargs["plugins"] = plugins
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if not any(isinstance(c, GracefulStop) for c in callbacks):
            callbacks.append(GracefulStop())
        kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        for lg in trainer.loggers:  # a tracking server must answer before anything runs (here, not in the logger's
            uri = getattr(lg, "_tracking_uri", "") or ""  # __init__: jsonargparse would swallow the error there)
            if isinstance(lg, MLFlowLogger) and uri.startswith(("http://", "https://")):
                check_server(uri)
            if isinstance(lg, MLFlowLogger) and lg._run_id is None and trainer.is_global_zero:
                exp_id = ensure_experiment(uri, lg._experiment_name)  # parallel grid cells race to create it otherwise
                if lg._run_name is None:  # never MLflow's generated name: seed_everything makes those collide
                    lg._run_name = unique_run_name(uri, exp_id, self._default_run_name())
        return trainer

    def _default_run_name(self) -> str:
        hp = self.model.hparams
        spec = self.datamodule.spec if isinstance(self.datamodule, CTRDataModule) else {}
        return default_run_name(spec.get("dataset", "data"), type(self.model.backbone).__name__, hp.get("mode", "?"),
                                hp.get("scale", "?"), self.config[self.subcommand].get("seed_everything"),
                                self.subcommand or "fit")

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException as e:  # a SystemExit with code 0 in Lightning: a stopped run must not look finished
            stop = next((c for c in self.trainer.callbacks if isinstance(c, GracefulStop)), None)
            raise SystemExit(stop.exit_code() if stop is not None else 143) from e
        except FloatingPointError as e:
            ck = self.trainer.checkpoint_callback
            last = (ck.last_model_path or ck.best_model_path) if ck is not None else ""
            if last:
                advice = (f"the last good checkpoint is {Path(last).resolve()}. Fix the cause (e.g. a lower "
                          f"--model.lr) and continue from it with --ckpt_path {Path(last).resolve()} (a changed config "
                          "trains on in a new MLflow run that records the checkpoint, the old run and the changes)")
            else:
                advice = ("no epoch had finished, so there is no checkpoint to resume. Fix the cause (e.g. a lower "
                          "--model.lr) and start again")
            raise TrainingStopped(f"{e}. Training stopped; {advice}.") from e
        except CheckpointWriteError as e:
            raise TrainingStopped(str(e)) from e
        except torch.cuda.OutOfMemoryError as e:
            hp, dm = self.model.hparams, self.datamodule
            counts = self.model.parameter_counts()
            raise TrainingStopped(
                f"out of GPU memory with data.batch_size={dm.hparams.batch_size}, model.mode={hp.mode}, "
                f"model.scale={hp.scale} ({counts['embedding']:,} embedding + {counts['dense']:,} dense parameters): "
                "lower --data.batch_size or the scale, or spread the run over more GPUs (--trainer.strategy ddp)") from e

    def after_fit(self):
        ckpt = self.trainer.checkpoint_callback
        if self.config[self.subcommand].get("test_after_fit", True):
            self._fetch_best_from_mlflow()
            path = "best" if ckpt is not None and ckpt.best_model_path else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=path)
        if not self.trainer.is_global_zero:
            return
        for lg in self.trainer.loggers:
            if isinstance(lg, RecscaleLogger) and lg.logged_best and not self.config[self.subcommand].get(
                    "keep_local_best", False) and lg.logged_best != getattr(ckpt, "last_model_path", None):
                Path(lg.logged_best).unlink(missing_ok=True)  # it is in the MLflow run; last.ckpt stays for resuming
                print(f"recscale: best checkpoint uploaded to the run; {Path(lg.logged_best).name} removed locally "
                      "(--keep_local_best true keeps it)", file=sys.stderr)
            if isinstance(lg, MLFlowLogger) and lg._run_id is not None:
                print(run_banner(lg._tracking_uri, lg.experiment_id, lg.run_id, lg._run_name), file=sys.stderr)

    def _fetch_best_from_mlflow(self) -> None:
        """A resumed run whose best checkpoint (from before the resume) lives only in MLflow: fetch it for the test."""
        ckpt = self.trainer.checkpoint_callback
        if ckpt is None or not ckpt.best_model_path or Path(ckpt.best_model_path).exists():
            return
        best = Path(ckpt.best_model_path)
        for lg in self.trainer.loggers:
            if isinstance(lg, MLFlowLogger) and lg._run_id is not None:
                try:
                    with tempfile.TemporaryDirectory(dir=best.parent) as tmp:
                        local = lg.experiment.download_artifacts(lg.run_id, f"{best.stem}/{best.name}", tmp)
                        Path(local).replace(best)
                    return
                except Exception as e:  # mlflow raises its own exception types
                    print(f"recscale: warning: the best checkpoint {best} is neither on disk nor in run {lg.run_id} "
                          f"({e.__class__.__name__})", file=sys.stderr)


def _cli_kwargs() -> dict:
    trainer_defaults = {
        "logger": lazy_instance(RecscaleLogger),
        "callbacks": [lazy_instance(SamplesPerSecond)],
        "max_epochs": 100,
        "deterministic": True,
    }
    return dict(trainer_defaults=trainer_defaults, seed_everything_default=0, save_config_callback=TrackRun,
                save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
                parser_kwargs={"default_env": False, "exit_on_error": False})


def one_line_error(message: str, subcommand: str = "fit") -> str:
    """A jsonargparse error as one line naming the option, what it accepts and what it got (its default output is the
    full usage, then a multi-line message)."""
    m = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if not m:
        return f"recscale {subcommand}: error: {' '.join(message.split())} (recscale {subcommand} --help lists the options)"
    key, rest = m.group(1), m.group(2)
    got = re.search(r"(?:Got value|Given value): (.*)", rest)
    got_s = got.group(1).strip() if got else "?"
    lit = re.search(r"Literal\[(.*?)\]", rest)
    if lit:
        accepted = ", ".join(v.strip().strip("'\"") for v in lit.group(1).split(","))
        return f"recscale {subcommand}: error: --{key} {got_s}: expected one of {accepted} (case matters)"
    if key in ("optimizer", "lr_scheduler"):
        base = torch.optim.Optimizer if key == "optimizer" else torch.optim.lr_scheduler.LRScheduler
        mod = torch.optim if key == "optimizer" else torch.optim.lr_scheduler
        names = sorted(n for n in dir(mod) if isinstance(getattr(mod, n), type) and issubclass(getattr(mod, n), base)
                       and getattr(mod, n) is not base and not n.startswith("_"))
        return (f"recscale {subcommand}: error: --{key} {got_s}: expected a class of torch.optim"
                f"{'' if key == 'optimizer' else '.lr_scheduler'} ({', '.join(names)}) or a class_path; "
                "the default is the model's recipe (Adam, model.lr, model.weight_decay)")
    typ = re.search(r"Expected a <class '([\w.]+)'>", rest)
    what = f"expected {typ.group(1)}" if typ else " ".join(rest.split())[:300]
    return f"recscale {subcommand}: error: --{key} {got_s}: {what}"


class _ParseOnly(RecscaleCLI):
    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse_fit_config(argv: list[str]):
    """Parse ``recscale fit`` arguments exactly as `fit` does, without instantiating anything: (parser, config)."""
    with warnings.catch_warnings():  # argv is not sys.argv here, on purpose
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        cli = _ParseOnly(CTRModel, CTRDataModule, args=argv, **_cli_kwargs())
    return cli._parser("fit"), cli.config["fit"]


def _user_error(e: BaseException) -> BaseException | None:
    """A user-facing error (PrepareError, ConfigError) among the causes/contexts of `e`, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (PrepareError, ConfigError)):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _quiet_lightning() -> None:
    """Drop the messages that say nothing about this run: Lightning's product tips, and the optimizer-override
    warning (recscale prints its own note and tags the run when --optimizer replaces the recipe)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "💡 Tip" not in r.getMessage())
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # start/stop chatter of the monitor thread
    warnings.filterwarnings("ignore", message=".*configure_optimizers. will be overridden.*")


def cli_main(argv: list[str] | None = None) -> RecscaleCLI | None:
    # our IterableDataset splits work per worker itself (recscale.data.datamodule), so its __len__ is exact
    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    _quiet_lightning()
    args = sys.argv[1:] if argv is None else argv
    try:
        return RecscaleCLI(CTRModel, CTRDataModule, args=argv, **_cli_kwargs())
    except argparse.ArgumentError as e:
        print(one_line_error(str(e), args[0] if args else "fit"), file=sys.stderr)
        sys.exit(2)
    except (PrepareError, ConfigError) as e:
        print(f"recscale: error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:  # jsonargparse wraps errors raised while instantiating a Union-typed argument (logger)
        inner = _user_error(e)
        if inner is None:
            raise
        print(f"recscale: error: {inner}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        print(f"recscale: error: {e}", file=sys.stderr)
        sys.exit(3)
