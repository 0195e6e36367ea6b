"""CollapseDiagnostics: the diagnostics pass at every validation end (and optionally every N training steps), logged
as metrics and as step-named artifacts through the trainer's loggers."""

from __future__ import annotations

import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger

from recscale.diagnostics.compute import Options, Report, compute_report


def write_report(report: Report, directory: Path) -> list[Path]:
    """PNG figures and CSV tables of a report into `directory`."""
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, fig in report.figures.items():
        p = directory / f"{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out.append(p)
    for name, rows in report.tables.items():
        if not rows:
            continue
        p = directory / f"{name}.csv"
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        out.append(p)
    return out


def log_report(loggers, report: Report, step: int, artifact_dir: str) -> None:
    """Metrics to every logger at `step`; figures and tables as MLflow artifacts under `artifact_dir`."""
    for lg in loggers:
        lg.log_metrics({f"diag/{k}": v for k, v in report.metrics.items()}, step=step)
        if isinstance(lg, MLFlowLogger) and (report.figures or report.tables):
            with tempfile.TemporaryDirectory() as tmp:
                write_report(report, Path(tmp))
                try:
                    lg.experiment.log_artifacts(lg.run_id, tmp, artifact_dir)
                except Exception as e:  # tracking server gone: keep the files locally, keep training
                    keep = Path("outputs") / "unsent-artifacts" / str(lg.run_id) / artifact_dir
                    keep.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copytree(tmp, keep, dirs_exist_ok=True)
                    print(f"recscale: warning: could not upload {artifact_dir} ({e.__class__.__name__}); "
                          f"kept in {keep}", file=sys.stderr)
    for fig in report.figures.values():  # close figures when no MLflow logger wrote them
        import matplotlib.pyplot as plt

        plt.close(fig)


class CollapseDiagnostics(Callback):
    """Embedding-collapse diagnostics (ICML 2024 IA, spectra, sub-embedding IA, set diversity, interaction patterns;
    SIGIR 2026 RankMe of embeddings and gradients), computed on rank zero in eval mode.

    Args:
        every_n_train_steps: also run every N optimizer steps (0: only at validation ends).
        sample_rows: validation rows in the fixed RankMe sample (SIGIR: 50,000; all rows if fewer).
        sample_seed: seed of that sample.
        normalize_rows: IA on row-normalised tables (ICML reference code) instead of the raw tables (paper, default).
        rankme, gradient_rankme, figures: switch parts off.
    """

    def __init__(self, every_n_train_steps: int = 0, sample_rows: int = 50_000, sample_seed: int = 0,
                 normalize_rows: bool = False, rankme: bool = True, gradient_rankme: bool = True,
                 figures: bool = True):
        super().__init__()
        self.every = every_n_train_steps
        self.sample_rows, self.sample_seed = sample_rows, sample_seed
        self.opts = Options(normalize_rows=normalize_rows, rankme=rankme, gradient_rankme=gradient_rankme,
                            figures=figures)
        self.sample = None
        self.last_step = -1
        self.seconds: list[float] = []

    def _ensure_sample(self, trainer) -> None:
        if self.sample is not None or not (self.opts.rankme or self.opts.gradient_rankme):
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "units"):
            return
        from recscale.data.datamodule import sample_split

        x, y = sample_split(dm.units("valid"), dm.fields, self.sample_rows, self.sample_seed)
        self.sample = (torch.from_numpy(x), torch.from_numpy(y))

    def run(self, trainer: L.Trainer, pl_module) -> Report | None:
        if not trainer.is_global_zero or trainer.global_step == self.last_step:
            return None
        self.last_step = trainer.global_step
        t = time.perf_counter()
        self._ensure_sample(trainer)
        dm = trainer.datamodule
        names = getattr(dm, "fields", None)
        report = compute_report(pl_module, self.sample, self.opts, names)
        self.seconds.append(time.perf_counter() - t)
        report.metrics["seconds"] = self.seconds[-1]
        log_report(trainer.loggers, report, trainer.global_step, f"diagnostics/step{trainer.global_step:08d}")
        return report

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every and trainer.global_step % self.every == 0:
            self.run(trainer, pl_module)
