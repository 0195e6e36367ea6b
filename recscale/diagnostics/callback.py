"""CollapseDiagnostics: the diagnostics pass at every validation end (and optionally every N training steps), logged
as metrics and as step-named artifacts through the trainer's loggers; at the end of fit, the values of the best
checkpoint's pass as ``diag_best/*`` (contract C3)."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger

from recscale.diagnostics.compute import Options, Report, compute_report, headline


def write_report(report: Report, directory: Path) -> list[Path]:
    """PNG figures, CSV tables and ``values.csv`` (every value of the pass: key,value) into `directory`."""
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, fig in report.figures.items():
        p = directory / f"{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out.append(p)
    tables = dict(report.tables)
    tables["values"] = [{"key": k, "value": v} for k, v in report.metrics.items()]
    for name, rows in tables.items():
        if not rows:
            continue
        p = directory / f"{name}.csv"
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        out.append(p)
    return out


def _upload(lg: MLFlowLogger, local: str, artifact_dir: str) -> None:
    try:
        lg.experiment.log_artifacts(lg.run_id, local, artifact_dir)
    except Exception as e:  # tracking server gone: keep the files locally, keep training
        keep = Path("outputs") / "unsent-artifacts" / str(lg.run_id) / artifact_dir
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local, keep, dirs_exist_ok=True)
        print(f"recscale: warning: could not upload {artifact_dir} ({e.__class__.__name__}); kept in {keep}",
              file=sys.stderr)


def log_report(loggers, report: Report, step: int, artifact_dir: str) -> None:
    """Headline metrics (``compute.headline``) to every logger at `step`; figures, tables and every value
    (``values.csv``) as MLflow artifacts under `artifact_dir`."""
    for lg in loggers:
        lg.log_metrics({f"diag/{k}": v for k, v in headline(report.metrics).items()}, step=step)
        if isinstance(lg, MLFlowLogger):
            with tempfile.TemporaryDirectory() as tmp:
                write_report(report, Path(tmp))
                _upload(lg, tmp, artifact_dir)
    import matplotlib.pyplot as plt

    for fig in report.figures.values():  # close figures when no MLflow logger wrote them
        plt.close(fig)


def log_best(loggers, values: dict[str, float], step: int) -> None:
    """Contract C3: the pass at the best checkpoint's `step` as ``diag_best/<key>`` metrics (the headline keys), the
    tag ``best_step`` and the artifact ``diagnostics/best/values.json`` = {"step", "metrics": every value}."""
    for lg in loggers:
        lg.log_metrics({f"diag_best/{k}": v for k, v in headline(values).items()}, step=step)
        if isinstance(lg, MLFlowLogger):
            try:
                lg.experiment.set_tag(lg.run_id, "best_step", str(step))
            except Exception as e:  # noqa: BLE001 - tracking server gone: the metrics are buffered by the logger
                print(f"recscale: warning: could not set tag best_step ({e.__class__.__name__})", file=sys.stderr)
            with tempfile.TemporaryDirectory() as tmp:
                # NaN (e.g. an undefined correlation factor) is written as the JSON extension NaN, which Python reads
                (Path(tmp) / "values.json").write_text(json.dumps({"step": step, "metrics": values}, indent=1))
                _upload(lg, tmp, "diagnostics/best")


def checkpoint_step(path: str | Path) -> int | None:
    """The ``global_step`` stored in a Lightning checkpoint, read lazily (memory-mapped: the weights are not loaded)."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 - unreadable or missing: the caller says so
        return None
    return int(state["global_step"]) if "global_step" in state else None


class CollapseDiagnostics(Callback):
    """Embedding-collapse diagnostics (ICML 2024 IA, spectra, sub-embedding IA, set diversity, interaction patterns;
    SIGIR 2026 RankMe of embeddings and gradients; per-layer IA and RankMe of stacked backbones), on rank zero.

    Embeddings and layer outputs are taken in eval mode. The gradient RankMe is taken in train mode by default (SIGIR
    Sec. 4.2 and its reference code: dropout active with masks from ``gradient_seed``, BatchNorm on batch statistics),
    without disturbing the training RNG stream or BatchNorm's running statistics (``gradient_mode="eval"`` for the
    inference-mode network).

    Cost: every pass prints one line per part with its seconds and logs ``diag/seconds``; per-part seconds are in
    ``values.csv``. The sample is ``min(sample_rows, validation rows)`` rows; the eigensolvers work on
    ``min(N, K)``-square matrices, so a small validation split (the bundled samples: 1,000 rows) costs little.

    Collapse alarms (beyond the papers; off by default): ``alarm_drop`` = f > 0 warns when ``ia/mean`` or
    ``rankme/embeddings`` falls by more than the fraction f between two passes; ``alarm_field_ia`` = x > 0 warns when a
    field's IA is below x. An alarm prints one line, sets the MLflow tag ``collapse_alarm`` and logs the metric
    ``diag/alarm`` = 1 at the step (the event); ``alarm_stop`` also stops training (the checkpoint of that validation is
    still written, so the run can be inspected or resumed).

    Args:
        every_n_train_steps: also run every N optimizer steps (0: only at validation ends).
        sample_rows: validation rows in the fixed RankMe sample (SIGIR: 50,000; all rows if fewer).
        sample_seed: seed of that sample.
        normalize_rows: IA on row-normalised tables (ICML reference code) instead of the raw tables (paper, default).
        rankme, gradient_rankme, figures, layers: switch parts off.
        gradient_mode: "train" (paper, default) or "eval".
        gradient_seed: seed of the dropout masks of the gradient pass.
        gradient_batch_rows: rows per backward in train mode (BatchNorm batch statistics); 0 = the whole sample as one
            batch (the SIGIR reference code); the default 8,192 bounds the memory of the backward.
        layer_rows: rows of the sample used for the per-layer diagnostics.
        progress: print a line per part.
    """

    def __init__(self, every_n_train_steps: int = 0, sample_rows: int = 50_000, sample_seed: int = 0,
                 normalize_rows: bool = False, rankme: bool = True, gradient_rankme: bool = True,
                 figures: bool = True, layers: bool = True, gradient_mode: Literal["train", "eval"] = "train",
                 gradient_seed: int = 0, gradient_batch_rows: int = 8192, layer_rows: int = 4096,
                 progress: bool = True, alarm_drop: float = 0.0, alarm_field_ia: float = 0.0,
                 alarm_stop: bool = False):
        super().__init__()
        if gradient_mode not in ("train", "eval"):
            raise ValueError(f"--diagnostics.gradient_mode must be train or eval, got {gradient_mode!r}")
        if not 0.0 <= alarm_drop < 1.0:
            raise ValueError(f"--diagnostics.alarm_drop is a fraction in [0, 1) (0 = off), got {alarm_drop}")
        self.every = every_n_train_steps
        self.sample_rows, self.sample_seed = sample_rows, sample_seed
        self.opts = Options(normalize_rows=normalize_rows, rankme=rankme, gradient_rankme=gradient_rankme,
                            figures=figures, layers=layers, gradient_mode=gradient_mode, gradient_seed=gradient_seed,
                            gradient_batch_rows=gradient_batch_rows, layer_rows=layer_rows)
        self.progress = progress
        self.alarm_drop, self.alarm_field_ia, self.alarm_stop = alarm_drop, alarm_field_ia, alarm_stop
        self.sample = None
        self.last_step = -1
        self.seconds: list[float] = []
        self.history: dict[int, dict[str, float]] = {}  # global step -> every value of that pass
        self.alarms: list[str] = []

    # --------------------------------------------------------------------------------------------- state (resume)
    def state_dict(self) -> dict:
        return {"history": {int(k): dict(v) for k, v in self.history.items()}, "alarms": list(self.alarms)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {int(k): dict(v) for k, v in state_dict.get("history", {}).items()}
        self.alarms = list(state_dict.get("alarms", []))

    # ------------------------------------------------------------------------------------------------------ pass
    def _ensure_sample(self, trainer) -> None:
        if self.sample is not None or not (self.opts.rankme or self.opts.gradient_rankme or self.opts.layers):
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
        step = self.last_step = trainer.global_step
        t = time.perf_counter()
        self._ensure_sample(trainer)
        dm = trainer.datamodule
        names = getattr(dm, "fields", None)
        rows = 0 if self.sample is None else len(self.sample[1])
        self.opts.title = f"step {step}"
        self.opts.progress = self._print_part(step, rows) if self.progress else None
        report = compute_report(pl_module, self.sample, self.opts, names)
        self.seconds.append(time.perf_counter() - t)
        report.metrics["seconds"] = self.seconds[-1]
        if self.progress:
            print(f"recscale: diagnostics at step {step}: {self.seconds[-1]:.1f} s in all", file=sys.stderr)
        prev = self.history[max(self.history)] if self.history else None
        self.history[step] = dict(report.metrics)
        log_report(trainer.loggers, report, step, f"diagnostics/step{step:08d}")
        self._alarm(trainer, step, prev, report.metrics, names or [])
        return report

    @staticmethod
    def _print_part(step: int, rows: int):
        def show(part: str, seconds: float) -> None:
            extra = f" ({rows:,} rows)" if part in ("rankme", "gradients", "layers") else ""
            print(f"recscale: diagnostics at step {step}: {part}{extra} {seconds:.1f} s", file=sys.stderr)
        return show

    # ---------------------------------------------------------------------------------------------------- alarms
    def check_alarms(self, prev: dict[str, float] | None, cur: dict[str, float], fields: list[str]) -> list[str]:
        """The alarm messages for a pass `cur` after the pass `prev` (None for the first)."""
        out = []
        if self.alarm_drop > 0 and prev is not None:
            for key in ("ia/mean", "rankme/embeddings"):
                a, b = prev.get(key), cur.get(key)
                if a and b is not None and a > 0 and b < (1.0 - self.alarm_drop) * a:
                    out.append(f"{key} fell {100 * (1 - b / a):.0f}% ({a:.4g} -> {b:.4g}; "
                               f"alarm_drop {self.alarm_drop:g})")
        if self.alarm_field_ia > 0:
            low = [f for f in fields if cur.get(f"ia/{f}", math.inf) < self.alarm_field_ia]
            if low:
                out.append(f"IA below {self.alarm_field_ia:g} in {len(low)} field(s): {', '.join(low[:8])}"
                           + (" ..." if len(low) > 8 else ""))
        return out

    def _alarm(self, trainer, step: int, prev, cur, fields: list[str]) -> None:
        msgs = self.check_alarms(prev, cur, fields)
        if not msgs:
            return
        text = f"step {step}: " + "; ".join(msgs)
        self.alarms.append(text)
        stop = " Stopping (--diagnostics.alarm_stop); this step's checkpoint is kept." if self.alarm_stop else ""
        print(f"recscale: warning: collapse alarm at {text}.{stop}", file=sys.stderr)
        for lg in trainer.loggers:
            lg.log_metrics({"diag/alarm": 1.0}, step=step)
            if isinstance(lg, MLFlowLogger):
                try:
                    lg.experiment.set_tag(lg.run_id, "collapse_alarm", " | ".join(self.alarms)[-4900:])
                except Exception as e:  # noqa: BLE001
                    print(f"recscale: warning: could not set tag collapse_alarm ({e.__class__.__name__})",
                          file=sys.stderr)
        if self.alarm_stop:
            trainer.should_stop = True

    # ----------------------------------------------------------------------------------------------------- hooks
    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every and trainer.global_step % self.every == 0:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        """Contract C3: log the pass of the best checkpoint (``ModelCheckpoint.best_model_path``'s step)."""
        if not trainer.is_global_zero or not self.history:
            return
        ck = trainer.checkpoint_callback
        path = getattr(ck, "best_model_path", "") if ck is not None else ""
        step = checkpoint_step(path) if path else None
        if step is None:
            print("recscale: warning: no best checkpoint to pair diagnostics with; diag_best/* not logged",
                  file=sys.stderr)
            return
        if step not in self.history:
            print(f"recscale: warning: no diagnostics pass at the best checkpoint's step {step} "
                  f"(passes at {sorted(self.history)}); diag_best/* not logged", file=sys.stderr)
            return
        log_best(trainer.loggers, self.history[step], step)
