"""Test-only callbacks, importable by subprocesses with PYTHONPATH=tests."""

import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StepRecorder(Callback):
    """Writes, per rank, the optimizer steps and training rows it saw to $RECSCALE_TEST_OUT/rank{r}.json."""

    def on_train_start(self, trainer, pl_module):
        self.rows, self.batches = 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows += len(batch[1])
        self.batches += 1

    def on_train_end(self, trainer, pl_module):
        out = Path(os.environ["RECSCALE_TEST_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"global_step": trainer.global_step, "batches": self.batches, "rows": self.rows,
             "world": trainer.world_size}))


class SignalAt(Callback):
    """Sends signal `name` (e.g. SIGTERM) to its own process after optimizer step `step` (deterministic stop point)."""

    def __init__(self, step: int = 3, name: str = "SIGTERM"):
        self.step, self.name = step, name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            import signal

            os.kill(os.getpid(), getattr(signal, self.name))
