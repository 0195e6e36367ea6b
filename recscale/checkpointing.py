"""Checkpoints that survive kills: atomic writes, the random state inside every checkpoint, and the file that ties a
checkpoint directory to its MLflow run."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

RUN_FILE = "mlflow_run.json"


def atomic_write(path: Path, text: str) -> None:
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
