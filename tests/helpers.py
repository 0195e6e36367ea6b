"""Test-only callbacks, importable by subprocesses with PYTHONPATH=tests."""

import json
import os
import signal
from pathlib import Path

import torch
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


class Faults(Callback):
    """At the start of training batch "EPOCH:BATCH": SIGKILLs its own process ($RECSCALE_KILL_AT) or sets the model's
    parameters to NaN ($RECSCALE_NAN_AT); unset: never. Records the first batch a (resumed) fit trains, and the
    optimizer's learning rate then, in $RECSCALE_TEST_OUT/start.json."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not getattr(self, "_recorded", False):
            self._recorded = True
            out = Path(os.environ["RECSCALE_TEST_OUT"])
            out.mkdir(parents=True, exist_ok=True)
            (out / "start.json").write_text(json.dumps({"epoch": trainer.current_epoch, "batch": batch_idx,
                                                        "global_step": trainer.global_step,
                                                        "lr": trainer.optimizers[0].param_groups[0]["lr"]}))
        here = (trainer.current_epoch, batch_idx)
        at = os.environ.get("RECSCALE_KILL_AT")
        if at and here == tuple(int(v) for v in at.split(":")):
            os.kill(os.getpid(), signal.SIGKILL)
        at = os.environ.get("RECSCALE_NAN_AT")
        if at and here == tuple(int(v) for v in at.split(":")):
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


class SignalAt(Callback):
    """Sends signal `name` (e.g. SIGTERM) to its own process at a deterministic point: after optimizer step `step`, or,
    with `val_batch` >= 0, after that validation batch of the validation that follows optimizer step `step`. A resumed
    fit (``--ckpt_path``) revisits that point: the validation signal fires in the first fit only."""

    def __init__(self, step: int = 3, name: str = "SIGTERM", val_batch: int = -1):
        self.step, self.name, self.val_batch = step, name, val_batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.val_batch < 0:
            os.kill(os.getpid(), getattr(signal, self.name))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if (trainer.global_step, batch_idx) == (self.step, self.val_batch) and not trainer.sanity_checking \
                and trainer.ckpt_path is None:
            os.kill(os.getpid(), getattr(signal, self.name))
