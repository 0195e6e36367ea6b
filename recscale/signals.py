"""Stopping `recscale fit` on a signal without losing the run: SIGTERM and SIGUSR1 save ``last.ckpt`` and exit non-zero.

SIGTERM is what SLURM (preemption, ``--time`` reached, ``scancel``), ``timeout``, ``docker stop`` and Kubernetes send
before they kill a process; SIGUSR1 is the warning signal the SLURM launcher asks for (``--signal=USR1@SECONDS``) and
the one to send by hand (``scancel --signal=USR1 JOB``). On either, training stops at the end of the current batch
(all DDP ranks at the same batch: Lightning broadcasts its stop flag), the full training state is written to
``last.ckpt`` in the run's checkpoint directory, the MLflow run is closed as FAILED (the run is not finished; the
resumed fit reopens it) and the process exits with 128 + the signal number (143 for SIGTERM, 138 for SIGUSR1), so that
a grid or a scheduler sees an unfinished cell, not a success. ``recscale fit ... --ckpt_path last`` continues from
there into the same MLflow run.

Resuming from a checkpoint taken mid-epoch continues at the same optimizer step; the batches still due in that epoch
are drawn from the start of the epoch's order (the data stream keeps no position), so a resumed run is not bitwise the
uninterrupted one. A checkpoint saved at an epoch end (``last.ckpt`` after validation) resumes exactly. A stop between
validation batches saves the loops as if that validation had not started: the resumed fit validates the epoch again
from its first batch (Lightning would otherwise take an epoch whose batches are all trained for a validated one, and
EarlyStopping would find no ``val/auc``).

Lightning's own handling (``SIGTERM`` sets ``trainer.received_sigterm``; the loops then raise ``SIGTERMException``, a
``SystemExit`` with code 0) is reused for the stopping point; this callback adds SIGUSR1, the checkpoint and the exit
code. Under SLURM, Lightning's ``SLURMEnvironment`` would also requeue the job itself on SIGUSR1 and mark the run
finished; `recscale fit` turns that off (``auto_requeue=False``) because the launcher (submitit) owns requeueing.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class GracefulStop(Callback):
    """On SIGTERM or SIGUSR1 during fit: stop after the current batch, save ``last.ckpt``, exit ``128 + signum``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.saved: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its SIGTERM handler right after this hook and chains the one found here
        self.signum, self.saved = None, None
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGUSR1, self._on_sigusr1)

    def _on_sigterm(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def _on_sigusr1(self, signum, frame) -> None:
        """Recorded, then turned into a SIGTERM to this process, which goes through Lightning's handler (its stop
        flag, the DDP broadcast, the launcher's child processes)."""
        if self.signum is None:
            self.signum = signum
        os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or self.signum is None:
            return
        if trainer.state.fn != "fit":  # stopped in the test after fit: training is over, its checkpoints stay as they are
            return
        try:  # on accelerators the non-finite check is deferred (CTRModel): never save weights a NaN step reached
            getattr(pl_module, "_check_nonfinite", lambda: None)()
        except FloatingPointError as e:
            if trainer.is_global_zero:
                print(f"recscale: received {signal.Signals(self.signum).name}; last.ckpt not refreshed: {e}",
                      file=sys.stderr, flush=True)
            return
        if trainer.validating:  # stopped between validation batches of the fit (the stage is still VALIDATING)
            _validate_again_on_resume(trainer.fit_loop.epoch_loop.val_loop.batch_progress)
        ck = trainer.checkpoint_callback
        where = Path(ck.dirpath) if ck is not None and ck.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        path = where / "last.ckpt"
        trainer.save_checkpoint(path)
        if ck is not None and hasattr(ck, "last_model_path"):
            ck.last_model_path = str(path)
        self.saved = path
        if trainer.is_global_zero:
            print(f"recscale: received {signal.Signals(self.signum).name} at global step {trainer.global_step} "
                  f"(epoch {trainer.current_epoch}): saved {path}; continue with the same command and "
                  "--ckpt_path last", file=sys.stderr, flush=True)

    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + int(self.signum or signal.SIGTERM)


def _validate_again_on_resume(progress) -> None:
    """Rewinds the fit's validation progress to "first batch started, none processed", the state Lightning (>= 2.5,
    ``_EvaluationLoop.update_restart_stage``) reads as *restarted mid-evaluation*: on resume it skips no training and
    runs this validation again; its ``reset_on_restart`` takes the current counters back to 0 completed, so every
    validation batch is seen once and the epoch's metrics cover the whole validation set. The batches of this validation
    that ran before the signal are dropped from ``total`` too (it counts the epoch's validation batches)."""
    done = progress.current.completed
    for tracker, base in ((progress.current, 0), (progress.total, progress.total.completed - done)):
        tracker.ready = tracker.started = base + 1
        tracker.processed = tracker.completed = base
