"""Checkpoints that survive kills: atomic writes, the random state inside every checkpoint, and the file that ties a
checkpoint directory to its MLflow run."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

RUN_FILE = "mlflow_run.json"


def _plain(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def config_changes(checkpoint: dict, model_hparams: dict, data_hparams: dict) -> dict[str, tuple[str, str]]:
    """``{"model.lr": (old, new), ...}``: the model and data hyperparameters that differ between a checkpoint and the
    current run (values as JSON text)."""
    out = {}
    for prefix, old, new in (("model", checkpoint.get("hyper_parameters") or {}, model_hparams),
                             ("data", checkpoint.get("datamodule_hyper_parameters") or {}, data_hparams)):
        for k in sorted(set(old) | set(new)):
            a, b = _plain(old.get(k)), _plain(new.get(k))
            if a != b:
                out[f"{prefix}.{k}"] = (a, b)
    return out


class ConfiguredOptimizer(Callback):
    """After a checkpoint of another config is restored, its optimizer state (moments, step counts) is kept but the
    hyperparameters (lr, weight decay, ...) are those of the current config, not the checkpoint's."""

    def on_train_start(self, trainer, pl_module) -> None:
        fresh = pl_module.configure_optimizers()  # any of Lightning's return forms -> the optimizers, in order
        if isinstance(fresh, tuple) and len(fresh) == 2 and isinstance(fresh[0], list):
            fresh = fresh[0]
        fresh = list(fresh) if isinstance(fresh, (list, tuple)) else [fresh]
        fresh = [f["optimizer"] if isinstance(f, dict) else f for f in fresh]
        for opt, new in zip(trainer.optimizers, fresh):
            for group, new_group in zip(opt.param_groups, new.param_groups):
                group.update({k: v for k, v in new_group.items() if k != "params"})


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only, ...); the message names the file and the fix."""


def _write_failure(path: Path, e: BaseException) -> CheckpointWriteError:
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    # torch's zip writer reports a full disk as RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    full = getattr(e, "errno", None) == errno.ENOSPC or (isinstance(e, RuntimeError) and free < 64 << 20)
    why = "the disk is full" if full else f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    old = f"the previous {path.name} is unchanged" if path.exists() else "no earlier checkpoint of that name exists"
    room = f" ({free / 2**20:.0f} MiB free)" if free >= 0 else ""
    return CheckpointWriteError(
        f"could not save checkpoint {path}: {why}{room}; {old}. Free space on the disk of {path.parent} or set "
        "--trainer.default_root_dir to another disk, then resume with --ckpt_path last")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file in the same directory, flushed to disk and renamed over the old
    one: a kill while saving, or a full disk, leaves the previous checkpoint intact. A failed write raises
    CheckpointWriteError naming the file, the free space and the fix."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:
            raise _write_failure(path, e) from e
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


class EpochCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` holds the latest completed epoch.

    Lightning 2.6 writes ``last`` only together with a top-k save, i.e. when the monitored metric improves, so after a
    kill ``--ckpt_path last`` restarted from the last improvement, several epochs back. Here ``last`` is also written
    after every epoch that did not improve (the best checkpoints are kept exactly as before)."""

    def _refresh_last(self, trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        # only the validation that ends an epoch (with val_check_interval < 1 others run mid-epoch)
        if not self._should_save_on_train_epoch_end(trainer) and trainer.fit_loop.epoch_loop._is_training_done:
            self._refresh_last(trainer)
