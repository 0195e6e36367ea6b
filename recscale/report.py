"""`recscale report`: the papers' tables from MLflow runs, next to the published numbers.

Reads the FINISHED runs of an experiment for one dataset (optionally narrowed with ``--filter TAG=VALUE``) and writes,
under ``--output`` (and as artifacts of a summary run in the experiment ``EXPERIMENT-reports``):

* ``icml24_table1.{md,csv}``: ICML 2024 Table 1, test AUC per model x mode x scale, ours next to the published value
  and the difference, with the mean IA of the same (best) checkpoint; ``scalability.png`` (Fig. 8a, error bars and
  the published curve), ``ia_per_field.png`` (Fig. 8b: per-field IA, SE vs ME at the largest scale with both, DCNv2
  first) and ``diversity.png`` (Fig. 10a: embedding-set diversity of the ME runs).
* ``sigir26_table1.{md,csv}``: SIGIR 2026 Table 1, AUC and RankMe per model, flagged where the run's recipe is not
  SIGIR's.
* ``icml24_table2.{md,csv}``: ICML 2024 Table 2, mean IA vs embedding size x data fraction, raw IA (the paper's
  definition) and row-normalised IA (the reference analysis code) in separate columns.
* ``roblock.{md,csv}``, ``roblock_auc_vs_depth.png``, ``roblock_ia_vs_depth.png``: plain vs RoBlock stacks per
  backbone x depth x width.
* ``cells.csv``: every cell the tables drew from; ``report.md``: all tables.

What a number means:

* A *cell* is one configuration: the runs that share the tag ``cell_hash`` (the resolved config without the seed;
  for runs without the tag, a hash of their logged params without ``seed_everything``), the input data
  (``data_checksum``) and the ``recipe``. Runs are averaged only within a cell, so runs on other data or with
  another recipe are never averaged together. ``n`` is the number of distinct seeds (a re-run of a seed replaces the
  earlier run). Mean ± sample std (n − 1) for n ≥ 2; a single run shows its value without ±.
* When a table slot has several cells, the one matching the table's recipe and grid (then the most seeds, then the
  newest) is shown and the others are listed under "Other configurations", never mixed in.
* Diagnostics (IA, RankMe, diversity, per-layer IA) are those of the checkpoint whose test AUC is reported (the best
  one, ICML/SIGIR reference analyses load it too): the ``diag_best/*`` metrics and ``diagnostics/best/values.json``;
  for runs without them, the ``diag/*`` history at the step in the tag ``best_step``; otherwise the value is missing
  (never the last epoch's ``diag/*``, which is ``patience`` epochs past the best).

Cells without runs are shown as "—", never as zero. Published numbers: recscale/reference/ (sources in the files'
headers).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

ICML_NAMES = {"DNN": "DNN", "IPNN": "IPNN", "NFwFM": "NFwFM", "XDeepFM": "xDeepFM", "DCNv2": "DCNv2",
              "FinalMLP": "FinalMLP"}
SIGIR_NAMES = {"FM": "FM", "DeepFM": "FM+p-DNN", "NFM": "FM+s-DNN", "CrossNet": "CrossNet",
               "CrossNetParallel": "CrossNet+p-DNN", "DCNv2": "CrossNet+s-DNN"}
SCALES = [1, 2, 3, 4, 10]
TABLE2_COLUMNS = [f"d{d}" for d in (5, 10, 15, 20, 25, 30, 35, 40)] + ["d40_me"]
ROBLOCK_BACKBONES = ["DCNv2", "XDeepFM", "DHEN"]  # issue 11's grid; others appear when runs have them
ROBLOCK_DEPTHS = [1, 2, 4, 8]
ROBLOCK_WIDTHS = ["M=1", "M=4"]
# diagnostics the report reads (keys after "diag/" / "diag_best/"); per-field values come from values.json
HEADLINE = re.compile(r"^(ia/mean|ia_set/mean|rankme/embeddings|rankme/gradients|rankme/sample_rows|diversity/mean|"
                      r"diversity_se_split/mean|sub_ia/correlation_factor|layer\d+/(ia_mean|rankme))$")
DASH = "—"


class ReportError(Exception):
    """A user-facing problem with the report's input: one line naming what was looked at and what to do."""


def published(name: str) -> list[dict]:
    text = resources.files("recscale").joinpath(f"reference/{name}").read_text()
    return list(csv.DictReader(io.StringIO("\n".join(ln for ln in text.splitlines() if not ln.startswith("#")))))


# ---------------------------------------------------------------------------------------------------------- runs


def _num(s) -> float | None:
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclass
class Run:
    """One FINISHED MLflow run, with the diagnostics of its best checkpoint (``diag``, keys as after ``diag/``)."""

    run_id: str
    name: str
    start: int
    tags: dict[str, str]
    params: dict[str, str]
    auc: float | None
    diag: dict[str, float]
    diag_source: str  # "diag_best", "history@STEP" or "none"
    best_step: int | None

    def tag(self, key: str, default: str = "") -> str:
        v = self.tags.get(key)
        return default if v in (None, "", "None") else v

    @property
    def model(self) -> str:
        return self.tag("model", "?")

    @property
    def mode(self) -> str:
        return self.tag("mode", self.params.get("model.mode", "?"))

    @property
    def scale(self) -> int:
        v = _num(self.tag("scale", self.params.get("model.scale", "0")))
        return int(v) if v is not None else 0

    @property
    def seed(self) -> str:
        return self.tag("seed", self.params.get("seed_everything", "?"))

    @property
    def grid(self) -> str:
        return self.tag("grid")

    @property
    def recipe(self) -> str:
        return self.tag("recipe", "icml24")  # C5: runs without the tag ran the ICML recipe

    @property
    def protocol(self) -> str:
        return self.tag("protocol", "?")

    @property
    def data_checksum(self) -> str:
        return self.tag("data_checksum", "?")

    @property
    def normalize_rows(self) -> bool:
        return self.params.get("diagnostics.normalize_rows", "False").strip().lower() == "true"

    @property
    def fraction(self) -> float:
        v = _num(self.params.get("data.train_fraction", "1.0"))
        return 1.0 if v is None else v

    @property
    def base_dim(self) -> int:
        v = _num(self.params.get("model.base_dim", "10"))
        return 10 if v is None else int(v)

    @property
    def cell(self) -> str:
        """The tag ``cell_hash`` (C5), else a hash of the logged params without the seed (``p-`` prefix: the two
        hash different texts, so a run with the tag never shares a cell with one without)."""
        h = self.tag("cell_hash")
        return h or params_cell_hash(self.params)


def params_cell_hash(params: dict[str, str]) -> str:
    """Hash of a run's params without ``seed_everything`` and the derived parameter counts (``params.*``)."""
    keep = {k: v for k, v in params.items() if k != "seed_everything" and not k.startswith("params.")}
    return "p-" + hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def parse_filters(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k.strip():
            raise ReportError(f"--filter {it!r}: expected TAG=VALUE, e.g. --filter model=DCNv2 --filter mode=ME")
        out[k.strip()] = v.strip()
    return out


def _matches(tags: dict, params: dict, filters: dict[str, str]) -> bool:
    for k, v in filters.items():
        have = params.get(k[len("params."):]) if k.startswith("params.") else tags.get(k)
        if have != v:
            return False
    return True


def best_step_diagnostics(client, run_id: str, metrics: dict[str, float], tags: dict[str, str]
                          ) -> tuple[dict[str, float], str, int | None]:
    """The headline diagnostics of the best checkpoint (C3): ``diag_best/*`` if logged, else the ``diag/*`` history
    at the ``best_step`` tag, else nothing (the latest ``diag/*`` describes a later model and is never used)."""
    step = _num(tags.get("best_step"))
    step = int(step) if step is not None else None
    best = {k[len("diag_best/"):]: v for k, v in metrics.items() if k.startswith("diag_best/")}
    if best:
        return best, "diag_best", step
    if step is None:
        return {}, "none", None
    out = {}
    for key in metrics:
        if key.startswith("diag/") and HEADLINE.match(key[len("diag/"):]):
            at = [m.value for m in client.get_metric_history(run_id, key) if m.step == step]
            if at:
                out[key[len("diag/"):]] = at[-1]
    return out, (f"history@{step}" if out else "none"), step


def load_runs(client, experiment: str, dataset: str, filters: dict[str, str] | None = None) -> list[Run]:
    """FINISHED runs of `experiment` tagged ``dataset`` (and every filter), with their best-step diagnostics."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    found = client.search_runs([exp.experiment_id], filter_string=f"attributes.status = 'FINISHED' and "
                               f"tags.dataset = '{dataset}'", max_results=50000)
    out = []
    for r in found:
        t, m, p = r.data.tags, r.data.metrics, r.data.params
        if not _matches(t, p, filters or {}):
            continue
        diag, source, step = best_step_diagnostics(client, r.info.run_id, m, t)
        out.append(Run(r.info.run_id, t.get("mlflow.runName", r.info.run_id), r.info.start_time or 0, t, p,
                       _num(m.get("test/auc")), diag, source, step))
    return out


# ---------------------------------------------------------------------------------------------------------- cells


@dataclass
class Stat:
    mean: float
    std: float | None  # None for a single value
    n: int

    @staticmethod
    def of(values: list[float]) -> Stat | None:
        v = [x for x in values if x is not None]
        if not v:
            return None
        m = sum(v) / len(v)
        sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
        return Stat(m, sd, len(v))

    def fmt(self, digits: int = 5) -> str:
        return f"{self.mean:.{digits}f}" + ("" if self.std is None else f" ± {self.std:.{digits}f}")


def fmt(s: Stat | None, digits: int = 5) -> str:
    return DASH if s is None else s.fmt(digits)


@dataclass
class Cell:
    """The runs of one configuration: same cell hash, same input data, same recipe; one run per seed (the newest)."""

    key: tuple[str, str, str]
    runs: list[Run] = field(default_factory=list)

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def newest(self) -> int:
        return max(r.start for r in self.runs)

    def stat(self, get: Callable[[Run], float | None]) -> Stat | None:
        return Stat.of([get(r) for r in self.runs])

    def diag(self, key: str) -> Stat | None:
        return self.stat(lambda r: r.diag.get(key))

    @property
    def auc(self) -> Stat | None:
        return self.stat(lambda r: r.auc)

    @property
    def without_best_diag(self) -> int:
        return sum(r.diag_source == "none" for r in self.runs)

    def label(self) -> str:
        r = self.first
        return f"{r.recipe} / {r.protocol}"


def group_cells(runs: list[Run]) -> list[Cell]:
    by_seed: dict[tuple, dict[str, Run]] = defaultdict(dict)
    for r in sorted(runs, key=lambda r: r.start):  # newest last: a re-run of a seed replaces the earlier one
        by_seed[(r.cell, r.data_checksum, r.recipe)][r.seed] = r
    cells = [Cell(k, sorted(v.values(), key=lambda r: r.seed)) for k, v in by_seed.items()]
    return sorted(cells, key=lambda c: (c.first.model, c.first.mode, c.first.scale, c.key))


@dataclass
class Slot:
    """A table position: the cell shown and the other cells that would fit it (listed, never mixed in)."""

    cell: Cell | None
    others: list[Cell]


def choose(cells: list[Cell], prefer: Callable[[Cell], tuple]) -> Slot:
    if not cells:
        return Slot(None, [])
    ranked = sorted(cells, key=lambda c: (prefer(c), c.n, c.newest), reverse=True)
    return Slot(ranked[0], ranked[1:])


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _short(checksum: str) -> str:
    return checksum[:8] if checksum != "?" else "?"


@dataclass
class Section:
    title: str
    markdown: str
    rows: list[dict]
    others: list[tuple[str, Cell]] = field(default_factory=list)  # (slot label, cell not shown)


# ---------------------------------------------------------------------------------------------------------- tables


def icml_table1(cells: list[Cell], dataset: str) -> tuple[Section, dict]:
    """ICML 2024 Table 1 (and App. C.3): test AUC per model x mode x scale; 1x is one cell shared by SE and ME."""
    pub = {(r["model"], r["mode"], int(r["scale"])): Stat(float(r["auc_mean"]), float(r["auc_std"]), 3)
           for r in published("icml24_table1_test_auc.csv") if r["dataset"] == dataset}
    slots_in: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        r = c.first
        if r.model in ICML_NAMES and r.fraction == 1.0 and r.grid in ("", "icml24"):
            slots_in[(ICML_NAMES[r.model], "SE" if r.scale == 1 else r.mode, r.scale)].append(c)
    prefer = lambda c: (c.first.recipe == "icml24", c.first.grid == "icml24")  # noqa: E731
    rows, md_rows, others, shown = [], [], [], {}
    for model in ICML_NAMES.values():
        for mode in ("SE", "ME"):
            scales = [k for k in SCALES if k > 1 or mode == "SE"]
            slots = {k: choose(slots_in.get((model, mode, k), []), prefer) for k in scales}
            present = [k for k in scales if slots[k].cell and slots[k].cell.auc]
            best = max(present, key=lambda k: slots[k].cell.auc.mean) if present else None
            for k in scales:
                sl, pb = slots[k], pub.get((model, mode, k))
                c = sl.cell
                auc = c.auc if c else None
                ia = c.diag("ia/mean") if c else None
                shown[(model, mode, k)] = c
                others += [(f"{model} {mode} {k}x", o) for o in sl.others]
                flag = []
                if c and c.first.recipe != "icml24":
                    flag.append(f"⚠ recipe {c.first.recipe}")
                if c and c.without_best_diag:
                    flag.append(f"{c.without_best_diag} run(s) without best-step diagnostics")
                if c and c.first.normalize_rows:
                    flag.append("IA row-normalised")
                rows.append({"dataset": dataset, "model": model, "mode": "SE=ME" if k == 1 else mode, "scale": k,
                             "n": c.n if c else 0, "auc_mean": auc.mean if auc else "",
                             "auc_std": auc.std if auc and auc.std is not None else "",
                             "published_mean": pb.mean if pb else "", "published_std": pb.std if pb else "",
                             "diff": auc.mean - pb.mean if auc and pb else "", "ia_mean_best": ia.mean if ia else "",
                             "recipe": c.first.recipe if c else "", "protocol": c.first.protocol if c else "",
                             "data_checksum": c.first.data_checksum if c else "", "cell_hash": c.key[0] if c else "",
                             "other_cells": len(sl.others)})
                txt = fmt(auc)
                if k == best:
                    txt = f"**{txt}**"
                md_rows.append([model, "SE=ME" if k == 1 else mode, f"{k}x", str(c.n) if c else "0", txt,
                                fmt(pb), f"{auc.mean - pb.mean:+.5f}" if auc and pb else DASH,
                                fmt(ia, 2), c.label() if c else DASH, _short(c.first.data_checksum) if c else DASH,
                                "; ".join(flag + ([f"+{len(sl.others)} other cell(s)"] if sl.others else []))])
    md = md_table(["model", "mode", "scale", "n", "test AUC (ours)", "paper", "Δ", "mean IA (best ckpt)",
                   "recipe / protocol", "data", "notes"], md_rows)
    return Section("ICML 2024 Table 1: test AUC", md, rows, others), {"shown": shown, "published": pub}


def sigir_table1(cells: list[Cell], dataset: str) -> Section:
    """SIGIR 2026 Table 1: AUC and RankMe of the concatenated field embeddings. The published numbers come from
    FuxiCTR's recipe and protocols (Criteo_x1 / Avazu_x4); a cell with another recipe is flagged, its Δ is not
    like-for-like."""
    pub = {r["model"]: (float(r["auc"]), float(r["rankme"])) for r in published("sigir26_table1_auc_rankme.csv")
           if r["dataset"] == dataset}
    slots_in: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        r = c.first
        if r.model in SIGIR_NAMES and (r.grid == "sigir" or r.recipe.startswith("sigir26")):
            slots_in[SIGIR_NAMES[r.model]].append(c)
    prefer = lambda c: (c.first.recipe == "sigir26", c.first.grid == "sigir")  # noqa: E731
    rows, md_rows, others = [], [], []
    for model in SIGIR_NAMES.values():
        sl = choose(slots_in.get(model, []), prefer)
        c, pb = sl.cell, pub.get(model)
        others += [(model, o) for o in sl.others]
        auc = c.auc if c else None
        rk, rkg = (c.diag("rankme/embeddings"), c.diag("rankme/gradients")) if c else (None, None)
        sample = c.diag("rankme/sample_rows") if c else None
        like = bool(c) and c.first.recipe == "sigir26"  # "sigir26+override" (another optimizer) is not the recipe
        notes = []
        if c and not like:
            notes.append(f"⚠ recipe {c.first.recipe}, not sigir26: Δ not like-for-like")
        if sample and sample.mean < 50_000:
            notes.append(f"RankMe on {sample.mean:,.0f} rows (paper 50,000)")
        if c and c.without_best_diag:
            notes.append(f"{c.without_best_diag} run(s) without best-step diagnostics")
        if sl.others:
            notes.append(f"+{len(sl.others)} other cell(s)")
        rows.append({"dataset": dataset, "model": model, "n": c.n if c else 0, "auc_mean": auc.mean if auc else "",
                     "auc_std": auc.std if auc and auc.std is not None else "",
                     "rankme_mean": rk.mean if rk else "", "rankme_gradients_mean": rkg.mean if rkg else "",
                     "published_auc": pb[0] if pb else "", "published_rankme": pb[1] if pb else "",
                     "diff_auc": auc.mean - pb[0] if auc and pb else "", "like_for_like": like if c else "",
                     "recipe": c.first.recipe if c else "", "protocol": c.first.protocol if c else "",
                     "data_checksum": c.first.data_checksum if c else "", "cell_hash": c.key[0] if c else ""})
        md_rows.append([model, str(c.n) if c else "0", fmt(auc, 4), fmt(rk, 2), fmt(rkg, 2),
                        f"{pb[0]:.4f}" if pb else DASH, f"{pb[1]:.2f}" if pb else DASH,
                        (f"{auc.mean - pb[0]:+.4f}" + ("" if like else " ⚠")) if auc and pb else DASH,
                        c.label() if c else DASH, _short(c.first.data_checksum) if c else DASH, "; ".join(notes)])
    md = md_table(["model", "n", "AUC (ours)", "RankMe (ours)", "gradient RankMe (ours)", "paper AUC",
                   "paper RankMe", "Δ AUC", "recipe / protocol", "data", "notes"], md_rows)
    return Section("SIGIR 2026 Table 1: AUC and RankMe (best checkpoint)", md, rows, others)


def _table2_column(r: Run) -> str | None:
    if r.mode == "ME":
        return "d40_me" if r.base_dim * r.scale == 40 else None
    return f"d{r.base_dim * r.scale}"


def icml_table2(cells: list[Cell]) -> Section:
    """ICML 2024 Table 2: mean IA of SE DCNv2 per embedding size x training-data fraction (+ ME 4 x 10). The paper
    defines IA on the raw embedding matrix (Def. 1); the reference analysis code row-normalises it first, and the
    published table presumably comes from that code. Runs with ``--diagnostics.normalize_rows true`` fill the
    row-normalised column; the two are never mixed."""
    pub = {float(r["data_fraction"]): r for r in published("icml24_table2_ia_vs_data.csv")}
    slots_in: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        r = c.first
        col = _table2_column(r)
        if r.grid == "data-fraction" and col:
            slots_in[(r.fraction, col, r.normalize_rows)].append(c)
    prefer = lambda c: (c.first.recipe == "icml24",)  # noqa: E731
    rows, md_rows, others = [], [], []
    fractions = sorted(set(pub) | {k[0] for k in slots_in})
    for frac in fractions:
        for col in TABLE2_COLUMNS:
            p = _num(pub.get(frac, {}).get(f"ia_{col}"))
            out = {}
            for norm in (False, True):
                sl = choose(slots_in.get((frac, col, norm), []), prefer)
                others += [(f"{frac:g} {col} {'row-normalised' if norm else 'raw'}", o) for o in sl.others]
                out[norm] = (sl.cell, sl.cell.diag("ia/mean") if sl.cell else None)
            rows.append({"data_fraction": frac, "column": col,
                         "n_raw": out[False][0].n if out[False][0] else 0,
                         "ia_raw": out[False][1].mean if out[False][1] else "",
                         "n_row_normalised": out[True][0].n if out[True][0] else 0,
                         "ia_row_normalised": out[True][1].mean if out[True][1] else "",
                         "published": "" if p is None else p})
            md_rows.append([f"{frac:g}", col.replace("_me", " ME"),
                            str(out[False][0].n) if out[False][0] else "0", fmt(out[False][1], 2),
                            str(out[True][0].n) if out[True][0] else "0", fmt(out[True][1], 2),
                            DASH if p is None else f"{p:.2f}"])
    md = md_table(["data", "embedding", "n raw", "IA raw (paper's Def. 1)", "n row-norm.",
                   "IA row-normalised (reference code)", "paper"], md_rows)
    return Section("ICML 2024 Table 2: mean IA (best checkpoint) vs embedding size x data fraction", md, rows, others)


# ---------------------------------------------------------------------------------------------------------- RoBlock

DEPTH_KEYS = ("depth", "num_blocks", "blocks", "num_layers", "n_layers", "layers", "cross_layers", "cin_layers",
              "attention_layers")
BETA_KEYS = ("beta", "hsic_beta", "beta_hsic", "hsic_weight")
INTERACTIONS = {"cross_v2": "DCNv2", "dhen_layer": "DHEN", "cross": "DCNv2", "crossv2": "DCNv2", "dcnv2": "DCNv2",
                "cin": "XDeepFM",
                "xdeepfm": "XDeepFM", "dhen": "DHEN", "mlp": "DNN", "dnn": "DNN", "none": "none"}
DISPLAY = {"XDeepFM": "xDeepFM"}


def is_roblock(r: Run) -> bool:
    """A RoBlock run: the tag ``variant`` (``roblock`` / ``plain``, set by ``make grid-roblock``) when present; else a
    backbone class named RoBlock* with at least one component on (RoBlockNet with rebalance, decoupler and router all
    ``none`` is the plain stack, exactly DCNv2 / xDeepFM / DHEN)."""
    v = r.tag("variant").lower()
    if v:
        return v != "plain"
    cls = r.params.get("model.backbone.class_path", "") or r.model
    if "roblock" not in cls.lower() and "roblock" not in r.model.lower():
        return False
    pre = "model.backbone.init_args."
    parts = [r.params.get(pre + k) for k in ("rebalance", "decoupler", "router")]
    return not all(p == "none" for p in parts)


def _is_stack_run(r: Run) -> bool:
    cls = r.params.get("model.backbone.class_path", "") or r.model
    return r.grid == "roblock" or "roblock" in cls.lower() or "roblock" in r.model.lower() or r.model == "DHEN"


def _depth_value(v: str | None) -> int | None:
    if v in (None, "", "None", "null"):
        return None
    try:
        x = json.loads(v)
    except (TypeError, ValueError):
        return None
    if isinstance(x, list):
        return len(x)
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


@functools.lru_cache(maxsize=None)
def _class_default_depth(class_path: str) -> int | None:
    """The depth a backbone has when the config leaves it at its default (read from the class's signature)."""
    import importlib
    import inspect

    mod, _, name = class_path.rpartition(".")
    if not mod.startswith("recscale"):
        return None
    try:
        params = inspect.signature(getattr(importlib.import_module(mod), name)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    for k in DEPTH_KEYS:
        if k in params and params[k].default is not inspect.Parameter.empty:
            d = _depth_value(json.dumps(params[k].default))
            if d is not None:
                return d
    return None


def roblock_depth(r: Run) -> int | None:
    """Number of stacked layers/blocks: the tag ``depth`` (``make grid-roblock``), else the first of
    ``model.backbone.init_args.{depth, num_blocks, blocks, num_layers, n_layers, layers, cross_layers, cin_layers,
    attention_layers}`` logged (a list counts its entries), else the backbone class's default for that argument, else
    the deepest ``layer{l}`` diagnostic."""
    d = _depth_value(r.tag("depth") or None)
    if d is not None:
        return d
    for k in DEPTH_KEYS:
        d = _depth_value(r.params.get(f"model.backbone.init_args.{k}"))
        if d is not None:
            return d
    d = _class_default_depth(r.params.get("model.backbone.class_path", ""))
    if d is not None:
        return d
    layers = [int(m.group(1)) for k in r.diag if (m := re.match(r"layer(\d+)/", k))]
    return max(layers) if layers else None


def roblock_backbone(r: Run) -> str:
    """The interaction the stack is built on: the tag ``backbone`` (``make grid-roblock``: dcnv2, xdeepfm, dhen), else
    ``model.backbone.init_args.interaction`` (cross, cin, dhen, mlp, none) or a nested backbone class, else the model
    tag without a ``RoBlock`` prefix (a plain DCNv2 / XDeepFM / DHEN run: its model tag)."""
    t = r.tag("backbone")
    if t:
        return INTERACTIONS.get(t.lower(), t)
    pre = "model.backbone.init_args."
    for k, v in sorted(r.params.items()):
        if k.startswith(pre) and k[len(pre):] in ("interaction", "interaction.class_path", "backbone",
                                                   "backbone.class_path", "base", "base.class_path"):
            name = v.rsplit(".", 1)[-1]
            return INTERACTIONS.get(name.lower(), name)
    suffix = re.sub(r"(?i)^roblock(net)?[_-]?", "", r.model)
    return INTERACTIONS.get(suffix.lower(), suffix) if suffix else "?"


def roblock_width(r: Run) -> str:
    """Embedding sets M (ME width, D per set; the tag ``width`` of ``make grid-roblock``); an SE run at k x is an SE
    comparison, labelled so."""
    w = _num(r.tag("width") or None)
    if w is not None:
        return f"M={int(w)}"
    if r.scale <= 1 or r.mode == "ME":
        return f"M={max(r.scale, 1)}"
    return f"SE {r.scale}x"


def roblock_beta(r: Run) -> float | None:
    b = _num(r.tag("beta") or None)
    if b is not None:
        return b
    for k, v in r.params.items():
        if k.startswith("model.") and k.rsplit(".", 1)[-1] in BETA_KEYS:
            return _num(v)
    return None


def roblock_variant(r: Run) -> str:
    if not is_roblock(r):
        return "plain"
    b = roblock_beta(r)
    return "RoBlock" + ("" if b is None else f" β={b:g}")


def roblock_section(cells: list[Cell]) -> tuple[Section, dict]:
    """Issue 11: test AUC per backbone x depth x width, plain stack vs RoBlock (per β), with the difference to the
    plain stack and the mean IA of the last layer's output at the best checkpoint."""
    slots_in: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        r = c.first
        if r.grid == "roblock-ablation" or not _is_stack_run(r):
            continue
        d = roblock_depth(r)
        slots_in[(roblock_backbone(r), d, roblock_width(r), roblock_variant(r))].append(c)
    prefer = lambda c: (c.first.grid == "roblock",)  # noqa: E731
    backbones = ROBLOCK_BACKBONES + sorted({k[0] for k in slots_in} - set(ROBLOCK_BACKBONES))
    depths = sorted(set(ROBLOCK_DEPTHS) | {k[1] for k in slots_in if k[1] is not None})
    widths = ROBLOCK_WIDTHS + sorted({k[2] for k in slots_in} - set(ROBLOCK_WIDTHS))
    variants = ["plain"] + sorted({k[3] for k in slots_in} - {"plain"}, key=lambda v: (len(v), v))
    if variants == ["plain"]:
        variants.append("RoBlock")
    rows, md_rows, others, shown = [], [], [], {}
    for bb in backbones:
        for d in depths:
            for w in widths:
                base = choose(slots_in.get((bb, d, w, "plain"), []), prefer).cell
                for v in variants:
                    sl = choose(slots_in.get((bb, d, w, v), []), prefer)
                    c = sl.cell
                    shown[(bb, d, w, v)] = c
                    others += [(f"{bb} L={d} {w} {v}", o) for o in sl.others]
                    auc = c.auc if c else None
                    ia = c.diag(f"layer{d}/ia_mean") if c else None
                    diff = auc.mean - base.auc.mean if auc and v != "plain" and base and base.auc else None
                    rows.append({"backbone": DISPLAY.get(bb, bb), "depth": d, "width": w, "variant": v,
                                 "n": c.n if c else 0, "auc_mean": auc.mean if auc else "",
                                 "auc_std": auc.std if auc and auc.std is not None else "",
                                 "diff_vs_plain": "" if diff is None else diff, "diff_vs_all_on": "",
                                 "ia_last_layer": ia.mean if ia else "", "cell_hash": c.key[0] if c else ""})
                    md_rows.append([DISPLAY.get(bb, bb), str(d), w, v, str(c.n) if c else "0", fmt(auc),
                                    DASH if diff is None else f"{diff:+.5f}", fmt(ia, 2),
                                    f"+{len(sl.others)} other cell(s)" if sl.others else ""])
    abl = roblock_ablations(cells)
    md = ("Width M = embedding sets (ME, D per set). Δ vs plain: RoBlock minus the plain stack of the same backbone, "
          "depth and width. IA of layer L: mean per-field IA of the last stacked layer's output at the best checkpoint "
          "(`diag_best/layerL/ia_mean`; for RoBlock the block output after the residual, ROBLOCK.md §2.8 E1).\n\n"
          + md_table(["backbone", "depth L", "width", "variant", "n", "test AUC", "Δ vs plain", "IA of layer L",
                      "notes"], md_rows)) + abl[0]
    rows += abl[1]
    return Section("RoBlock: plain vs RoBlock stacks (issue 11)", md, rows, others), \
        {"shown": shown, "backbones": backbones, "depths": depths, "widths": widths, "variants": variants}


ALL_ON = "rebalance1-decoupler1-router1"  # the ablation grid's reference cell (every component on, K = 4)


def roblock_ablations(cells: list[Cell]) -> tuple[str, list[dict]]:
    """The component ablations (``make grid-roblock-ablation``, tag ``ablation``): one row per cell, Δ against the
    all-on cell of the same backbone, depth and width."""
    abl = [c for c in cells if c.first.grid == "roblock-ablation"]
    if not abl:
        return "", []
    key = lambda c: (roblock_backbone(c.first), roblock_depth(c.first), roblock_width(c.first))  # noqa: E731
    ref: dict[tuple, Cell] = {}
    for c in abl:
        if c.first.tag("ablation") == ALL_ON and (key(c) not in ref or c.n > ref[key(c)].n):
            ref[key(c)] = c
    rows, md_rows = [], []
    for c in sorted(abl, key=lambda c: (key(c), c.first.tag("ablation"))):
        bb, d, w = key(c)
        auc, base = c.auc, ref.get(key(c))
        diff = auc.mean - base.auc.mean if auc and base and base.auc and base is not c else None
        label = c.first.tag("ablation", c.key[0])
        ia = c.diag(f"layer{d}/ia_mean")
        rows.append({"backbone": DISPLAY.get(bb, bb), "depth": d, "width": w, "variant": f"ablation {label}",
                     "n": c.n, "auc_mean": auc.mean if auc else "", "auc_std": auc.std if auc and auc.std is not None
                     else "", "diff_vs_plain": "", "diff_vs_all_on": "" if diff is None else diff,
                     "ia_last_layer": ia.mean if ia else "", "cell_hash": c.key[0]})
        md_rows.append([DISPLAY.get(bb, bb), str(d), w, label, str(c.n), fmt(auc),
                        DASH if diff is None else f"{diff:+.5f}", fmt(ia, 2)])
    return ("\n\n### RoBlock component ablations (Δ vs all components on)\n\n"
            + md_table(["backbone", "depth L", "width", "ablation", "n", "test AUC", "Δ vs all on", "IA of layer L"],
                       md_rows)), rows


# ---------------------------------------------------------------------------------------------------------- output


def cells_rows(cells: list[Cell]) -> list[dict]:
    out = []
    for c in cells:
        r, auc = c.first, c.auc
        out.append({"cell_hash": c.key[0], "data_checksum": c.key[1], "recipe": c.key[2], "protocol": r.protocol,
                    "model": r.model, "mode": r.mode, "scale": r.scale, "grid": r.grid, "n": c.n,
                    "seeds": " ".join(x.seed for x in c.runs), "auc_mean": auc.mean if auc else "",
                    "auc_std": auc.std if auc and auc.std is not None else "",
                    "ia_mean_best": (c.diag("ia/mean").mean if c.diag("ia/mean") else ""),
                    "diagnostics_from": " ".join(sorted({x.diag_source for x in c.runs})),
                    "normalize_rows": r.normalize_rows, "runs": " ".join(x.name for x in c.runs)})
    return out


def others_markdown(sections: list[Section]) -> str:
    rows = []
    for s in sections:
        for slot, c in s.others:
            rows.append([s.title.split(":")[0], slot, c.key[0], str(c.n), fmt(c.auc), c.label(),
                         _short(c.key[1]), c.first.grid or DASH, ", ".join(x.name for x in c.runs[:3])])
    if not rows:
        return ""
    return ("## Other configurations (not averaged into the tables above)\n\nSlots that several configurations fit; "
            "the tables show the one matching the table's recipe and grid with the most seeds. Narrow the report "
            "with `--filter TAG=VALUE` to pick another.\n\n"
            + md_table(["table", "slot", "cell", "n", "test AUC", "recipe / protocol", "data", "grid", "runs"], rows)
            + "\n")


def _write_csv(path: Path, rows: list[dict]) -> None:
    if rows:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _looked_where(tracking_uri: str, experiment: str, dataset: str, filters: dict[str, str]) -> str:
    sel = ", ".join([f"dataset={dataset}"] + [f"{k}={v}" for k, v in filters.items()])
    return f"no FINISHED runs with {sel} in experiment {experiment!r} of {tracking_uri}"


def build_report(tracking_uri: str, experiment: str, dataset: str, output: str, summary_run: bool = True,
                 filters: dict[str, str] | None = None, figures: bool = True) -> dict:
    """All tables and figures into `output` (written to a temporary directory first, then moved in)."""
    from mlflow.tracking import MlflowClient

    filters = filters or {}
    client = MlflowClient(tracking_uri)
    runs = load_runs(client, experiment, dataset, filters)
    if not runs:
        exp = client.get_experiment_by_name(experiment)
        hint = "" if exp else f" (no experiment {experiment!r} there: pass --experiment or --tracking-uri)"
        raise ReportError(f"{_looked_where(tracking_uri, experiment, dataset, filters)}{hint}: run `make grid "
                          f"DATASET={dataset}` (or `recscale fit ...`) first, or check --filter / --dataset")
    cells = group_cells(runs)
    t1, t1_data = icml_table1(cells, dataset)
    s1 = sigir_table1(cells, dataset)
    t2 = icml_table2(cells)
    rb, rb_data = roblock_section(cells)
    sections = [t1, s1, t2, rb]
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out.parent))
    try:
        for name, sec in (("icml24_table1", t1), ("sigir26_table1", s1), ("icml24_table2", t2), ("roblock", rb)):
            _write_csv(tmp / f"{name}.csv", sec.rows)
            (tmp / f"{name}.md").write_text(f"## {sec.title}\n\n{sec.markdown}\n")
        _write_csv(tmp / "cells.csv", cells_rows(cells))
        fig_notes = []
        if figures:
            from recscale import report_plots

            fig_notes = report_plots.draw_all(client, tmp, t1_data, cells, rb_data)
        no_diag = sum(r.diag_source == "none" for r in runs)
        filt = "".join(f", {k}={v}" for k, v in filters.items())
        text = (f"# recscale report: {dataset}, experiment {experiment}\n\n"
                f"{len(runs)} finished runs (dataset={dataset}{filt}) in {len(cells)} cells. A cell is one "
                "configuration (tag `cell_hash`: the resolved config without the seed) on one input data "
                "(`data_checksum`) with one recipe; runs are averaged only within a cell. n = seeds; mean ± sample "
                "std for n ≥ 2, the single value for n = 1; — marks slots without runs. Diagnostics are those of the "
                "best checkpoint (the one whose test AUC is shown)"
                + (f"; {no_diag} run(s) have none logged for it (older runs: `recscale analyze --run RUN`)."
                   if no_diag else ".") + " `data` is the first 8 hex digits of the data checksum.\n\n"
                + "".join(f"## {s.title}\n\n{s.markdown}\n\n" for s in sections)
                + ("The published Table 2 presumably comes from the reference analysis code, which row-normalises "
                   "the embeddings; compare with the row-normalised column (`make grid-data-fraction "
                   "EXTRA=\"--diagnostics.normalize_rows true\"`).\n\n")
                + others_markdown(sections)
                + ("\n## Figures\n\n" + "".join(f"- {n}\n" for n in fig_notes) if fig_notes else ""))
        (tmp / "report.md").write_text(text)
        out.mkdir(parents=True, exist_ok=True)
        for p in tmp.iterdir():
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"runs": len(runs), "cells": len(cells), "output": str(out), "files": sorted(p.name for p in out.iterdir())}
    if summary_run:
        from recscale.tracking import ensure_experiment

        exp_id = ensure_experiment(tracking_uri, f"{experiment}-reports")
        run = client.create_run(exp_id, run_name=f"report-{dataset}", tags={
            "dataset": dataset, "source_experiment": experiment, "runs": str(len(runs)),
            "filters": " ".join(f"{k}={v}" for k, v in filters.items())})
        client.log_artifacts(run.info.run_id, str(out))
        client.set_terminated(run.info.run_id)
        res["summary_run_id"] = run.info.run_id
    return res


def main(argv: list[str] | None = None) -> int:
    from recscale.tracking import default_tracking_uri

    ap = argparse.ArgumentParser(prog="recscale report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="recscale")
    ap.add_argument("--dataset", default="criteo")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--output", default="outputs/report")
    ap.add_argument("--filter", action="append", default=[], metavar="TAG=VALUE",
                    help="only runs with this tag value (repeatable; params.KEY=VALUE matches a param)")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--no-summary-run", action="store_true")
    a = ap.parse_args(argv)
    uri = a.tracking_uri or default_tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded values.json
    try:
        res = build_report(uri, a.experiment, a.dataset, a.output, not a.no_summary_run, parse_filters(a.filter),
                           not a.no_figures)
    except ReportError as e:
        print(f"recscale report: error: {e}", file=sys.stderr)
        return 2
    print(f"report of {res['runs']} runs in {res['cells']} cells -> {res['output']}/report.md "
          f"({', '.join(res['files'])})")
    return 0
