"""`recscale grid`: the papers' grids as cells of `recscale fit`, run N at a time, skipping finished cells.

A cell is a list of config files plus overrides. Before launching, the runner resolves each cell's config exactly as
`recscale fit` would and hashes it (the same hash `fit` stores as the run tag ``config_hash``); a cell whose hash already
has a FINISHED run in the MLflow experiment is skipped, so re-running a grid re-runs only failed, killed or new cells.

Configs come from ``--configs-dir``, else ``./configs`` of the directory the grid runs in (your checkout, with your
edits), else the copy installed with the package (``<prefix>/share/recscale/configs`` from a wheel); the directory
used is printed. A grid invocation is one MLflow parent run (``grid-NAME-DATASET-TIME``) with its cells as child runs.

GPU placement: with ``--gpus 0,1,2,3`` the k-th concurrent slot runs its cells with ``CUDA_VISIBLE_DEVICES`` set to
the k-th id (one GPU per cell, ``-j`` = number of GPUs). For DDP per cell instead, pass ``--gpus`` groups such as
``0,1;2,3`` and ``--trainer.strategy ddp --trainer.devices 2`` as extra overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def configs_dir(explicit: str | None = None, cwd: Path | None = None) -> Path:
    """The configs/ the grid uses: `explicit`, else ``CWD/configs``, else the installed copy (a wheel's
    ``<prefix>/share/recscale/configs``, or the source checkout's for an editable install)."""
    if explicit:
        return Path(explicit).resolve()
    for cand in ((cwd or Path.cwd()) / "configs", Path(sys.prefix) / "share" / "recscale" / "configs", ROOT / "configs"):
        if (cand / "model").is_dir():
            return cand.resolve()
    return ((cwd or Path.cwd()) / "configs").resolve()  # missing: main() names the files it cannot find


CONFIGS = configs_dir()  # resolved where the process starts; the builders below take `configs=` to override
ICML_MODELS = ["dnn", "ipnn", "nfwfm", "xdeepfm", "dcnv2", "finalmlp"]
SIGIR_MODELS = ["fm", "fm_pdnn", "fm_sdnn", "crossnet", "crossnet_pdnn", "crossnet_sdnn"]
SCALES = [1, 2, 3, 4, 10]
FRACTIONS = [0.01, 0.03, 0.1, 0.3, 1.0]
TABLE2_DIMS = [5, 10, 15, 20, 25, 30, 35, 40]


@dataclass
class Cell:
    name: str
    configs: list[str]
    overrides: list[str] = field(default_factory=list)
    tags: dict = field(default_factory=dict)

    def argv(self, extra: list[str]) -> list[str]:
        return ["fit", *[f"--config={c}" for c in self.configs], *self.overrides, *extra]


def icml24_cells(dataset, models, modes, scales, seeds, configs: Path | None = None) -> list[Cell]:
    root = configs or CONFIGS
    cells = []
    for m in models:
        for scale in scales:
            for mode in (["SE"] if scale == 1 else modes):  # 1x is shared by SE and ME
                for seed in seeds:
                    cells.append(Cell(f"{dataset}-{m}-{mode.lower()}{scale}x-seed{seed}",
                                      [str(root / "model" / f"{m}.yaml"),
                                       str(root / "scale" / f"{mode.lower()}{scale}x.yaml"),
                                       str(root / "data" / f"{dataset}.yaml")],
                                      [f"--seed_everything={seed}"], {"grid": "icml24"}))
    return cells


# SIGIR 2026 recipe (Sec. 2.3: "the optimal configurations recommended by FuxiCTR"): data protocol per dataset and the
# per-model DNN settings of the FuxiCTR / BARS Criteo_x1 and Avazu_x4 configurations; the shared keys (batch size,
# embedding L2 and init, patience) are in configs/recipe/sigir26_<dataset>.yaml.
SIGIR26_DATA = {"criteo": "criteo_x1", "avazu": "avazu_x4"}
SIGIR26_BACKBONE: dict[tuple[str, str], dict] = {
    # Criteo_x1: FM family without dropout or BN; DCNv2 (stacked 400 x 3, parallel 500 x 3) dropout 0.1, no BN
    ("criteo", "fm_pdnn"): {"hidden": [400, 400, 400], "dropout": 0.0, "batch_norm": False},
    ("criteo", "fm_sdnn"): {"hidden": [400, 400, 400], "dropout": 0.0, "batch_norm": False},
    ("criteo", "crossnet_pdnn"): {"hidden": [500, 500, 500], "dropout": 0.1, "batch_norm": False},
    ("criteo", "crossnet_sdnn"): {"hidden": [400, 400, 400], "dropout": 0.1, "batch_norm": False},
    # Avazu_x4: p-DNN 4 x 2000, s-DNN 3 x 400 (SIGIR Sec. 2.3); no dropout, no BN
    ("avazu", "fm_pdnn"): {"hidden": [2000, 2000, 2000, 2000], "dropout": 0.0, "batch_norm": False},
    ("avazu", "fm_sdnn"): {"hidden": [400, 400, 400], "dropout": 0.0, "batch_norm": False},
    ("avazu", "crossnet_pdnn"): {"hidden": [2000, 2000, 2000, 2000], "dropout": 0.0, "batch_norm": False},
    ("avazu", "crossnet_sdnn"): {"hidden": [400, 400, 400], "dropout": 0.0, "batch_norm": False},
}


def sigir26_backbone_overrides(dataset: str, model: str) -> list[str]:
    """``--model.backbone.init_args.*`` overrides of the SIGIR 2026 recipe for one model on one dataset."""
    kind = "avazu" if dataset.startswith("avazu") else "criteo"
    return [f"--model.backbone.init_args.{k}={json.dumps(v, separators=(',', ':'))}"
            for k, v in SIGIR26_BACKBONE.get((kind, model), {}).items()]


def sigir_cells(dataset, models, seeds, configs: Path | None = None) -> list[Cell]:
    """SIGIR 2026 Table 1 with its recipe: model config, configs/recipe/sigir26_<criteo|avazu>.yaml, then the data
    config (criteo -> criteo_x1, avazu -> avazu_x4; any other name, e.g. criteo_sample, is taken as is)."""
    root = configs or CONFIGS
    kind = "avazu" if dataset.startswith("avazu") else "criteo"
    data = SIGIR26_DATA.get(dataset, dataset)
    return [Cell(f"{dataset}-{m}-seed{seed}", [str(root / "model" / f"{m}.yaml"),
                                               str(root / "recipe" / f"sigir26_{kind}.yaml"),
                                               str(root / "data" / f"{data}.yaml")],
                 [f"--seed_everything={seed}", *sigir26_backbone_overrides(dataset, m)],
                 {"grid": "sigir", "recipe": "sigir26"})
            for m in models for seed in seeds]


def data_fraction_cells(dataset, fractions, dims, seeds, configs: Path | None = None) -> list[Cell]:
    """ICML 2024 Table 2: SE DCNv2 at embedding sizes 5..40 and ME (4 x 10) at 40, on 1-100 % of the training data."""
    root = configs or CONFIGS
    cells = []
    for frac in fractions:
        for seed in seeds:
            for d in dims:
                cells.append(Cell(f"{dataset}-frac{frac:g}-dcnv2-se-d{d}-seed{seed}",
                                  [str(root / "model" / "dcnv2.yaml"), str(root / "data" / f"{dataset}.yaml")],
                                  [f"--model.base_dim={d}", "--model.mode=SE", "--model.scale=1",
                                   f"--data.train_fraction={frac}", f"--seed_everything={seed}"],
                                  {"grid": "data-fraction"}))
            cells.append(Cell(f"{dataset}-frac{frac:g}-dcnv2-me-d40-seed{seed}",
                              [str(root / "model" / "dcnv2.yaml"), str(root / "data" / f"{dataset}.yaml")],
                              ["--model.base_dim=10", "--model.mode=ME", "--model.scale=4",
                               f"--data.train_fraction={frac}", f"--seed_everything={seed}"],
                              {"grid": "data-fraction"}))
    return cells


ROBLOCK_BACKBONES = ["dcnv2", "xdeepfm", "dhen"]
ROBLOCK_DEPTHS = [1, 2, 4, 8]
ROBLOCK_WIDTHS = [1, 4]
ROBLOCK_BETAS = [0.0, 0.1, 0.5, 1.0]  # the beta grid the RoBlock reviews report [stated]
ROBLOCK_KS = [1, 2, 4, 8]
ROBLOCK_ROUTERS = ("dynamic", "factorized", "within_field", "static", "attention", "topk")  # FieldRouter.VARIANTS


def _width_config(width: int, root: Path) -> str:
    """Width = number of embedding sets (ME scale); width 1 is the 1x model (SE = ME)."""
    return str(root / "scale" / ("se1x.yaml" if width == 1 else f"me{width}x.yaml"))


def _width_name(width: int) -> str:
    return "se1x" if width == 1 else f"me{width}x"


def roblock_cells(dataset, backbones, depths, widths, betas, seeds, configs: Path | None = None,
                  router: str | None = None) -> list[Cell]:
    """RoBlock E1/E2 grid (ROBLOCK.md Sec. 2.8): backbone x {plain, RoBlock per beta} x depth x width x seed.

    Plain cells are ``configs/model/roblock_<b>_plain.yaml``: the same RoBlockNet with every component off, which is
    exactly DCNv2 / xDeepFM (cin_layers = [F] * L) / DHEN (tests/test_roblock.py), so plain and RoBlock cells share
    one parametrisation of depth (``blocks``) and width (embedding sets, ``model.scale`` in ME mode). Cell tags:
    grid, backbone, variant (plain / roblock), depth, width, beta, and router when ``router`` overrides the configs'
    router variant in the RoBlock cells (their names then end in ``-<router>``)."""
    root = configs or CONFIGS
    cells = []
    for b in backbones:
        for depth in depths:
            for width in widths:
                variants = [("plain", None)] + [("roblock", beta) for beta in betas]
                for variant, beta in variants:
                    cfg = f"roblock_{b}_plain.yaml" if variant == "plain" else f"roblock_{b}.yaml"
                    label = "plain" if beta is None else f"beta{beta:g}"
                    over = [f"--model.backbone.init_args.blocks={depth}"]
                    tags = {"grid": "roblock", "backbone": b, "variant": variant, "depth": str(depth),
                            "width": str(width), "beta": "" if beta is None else f"{beta:g}"}
                    if beta is not None:
                        over.append(f"--model.backbone.init_args.beta={beta:g}")
                        if router:
                            over.append(f"--model.backbone.init_args.router={router}")
                            label, tags["router"] = f"{label}-{router}", router
                    for seed in seeds:
                        cells.append(Cell(f"{dataset}-roblock-{b}-{label}-L{depth}-{_width_name(width)}-seed{seed}",
                                          [str(root / "model" / cfg), _width_config(width, root),
                                           str(root / "data" / f"{dataset}.yaml")],
                                          over + [f"--seed_everything={seed}"], tags))
    return cells


def roblock_ablation_cells(dataset, seeds, backbone: str = "dcnv2", depth: int = 4, width: int = 4,
                           beta: float = 0.1, ks=tuple(ROBLOCK_KS), configs: Path | None = None,
                           router: str | None = None, variants: bool = True) -> list[Cell]:
    """RoBlock E4 ablations at one operating point (default Criteo, DCNv2, L = 4, M = 4, beta = 0.1): the 2^3 grid of
    rebalancing / decoupler / router on-off (the learnable residual stays; "all off" is the stack with residual),
    then K in ``ks`` with every component on (K = 4, the default, is the all-on cell and is not repeated). "Router on"
    is the config's router variant, or ``router`` (then part of the cell names and tags). With ``variants``, the
    variant comparisons ROBLOCK.md Sec. 2.7 asks for, one component swapped at a time from the all-on cell: every
    other router, the other rebalancings (centred rank-1, IterNorm, ContraNorm) and HSIC kernels (Gaussian, random
    Fourier features, decorrelation); tag ``ablation`` = ``router-<v>``, ``rebalance-<v>``, ``kernel-<v>``."""
    root = configs or CONFIGS
    base = [str(root / "model" / f"roblock_{backbone}.yaml"), _width_config(width, root),
            str(root / "data" / f"{dataset}.yaml")]
    common = [f"--model.backbone.init_args.blocks={depth}", f"--model.backbone.init_args.beta={beta:g}"]
    point = f"{dataset}-roblock-ablation-{backbone}-L{depth}-{_width_name(width)}"
    extra_tags = {}
    if router:
        common.append(f"--model.backbone.init_args.router={router}")
        point, extra_tags = f"{point}-{router}", {"router": router}
    cells = []
    for reb in (True, False):
        for dec in (True, False):
            for rou in (True, False):
                over = [f"--model.backbone.init_args.rebalance={'rank1' if reb else 'none'}",
                        f"--model.backbone.init_args.decoupler={'linear' if dec else 'none'}"]
                if not rou:
                    over.append("--model.backbone.init_args.router=none")
                name = f"rebalance{int(reb)}-decoupler{int(dec)}-router{int(rou)}"
                tags = {"grid": "roblock-ablation", "backbone": backbone, "ablation": name, "components": "4",
                        **extra_tags}
                cells += [Cell(f"{point}-{name}-seed{s}", base, common + over + [f"--seed_everything={s}"], tags)
                          for s in seeds]
    for k in ks:
        if k == 4:
            continue
        tags = {"grid": "roblock-ablation", "backbone": backbone, "ablation": f"K{k}", "components": str(k),
                **extra_tags}
        cells += [Cell(f"{point}-K{k}-seed{s}", base,
                       common + [f"--model.backbone.init_args.components={k}", f"--seed_everything={s}"], tags)
                  for s in seeds]
    if not variants:
        return cells
    at_router = router or "dynamic"  # the RoBlock configs' router
    swaps = ([("router", v) for v in ROBLOCK_ROUTERS if v != at_router]
             + [("rebalance", v) for v in ("center", "iternorm", "contranorm")]
             + [("hsic_kernel", v) for v in ("gaussian", "rff", "decorrelation")])
    for key, v in swaps:
        name = f"{'kernel' if key == 'hsic_kernel' else key}-{v}"
        tags = {"grid": "roblock-ablation", "backbone": backbone, "ablation": name, "components": "4", **extra_tags}
        cells += [Cell(f"{point}-{name}-seed{s}", base,
                       common + [f"--model.backbone.init_args.{key}={v}", f"--seed_everything={s}"], tags)
                  for s in seeds]
    return cells


def cell_hash(cell: Cell, extra: list[str]) -> str:
    """The `config_hash` tag `recscale fit` would give this cell (resolved config, parsed without instantiating)."""
    from recscale.tracking import config_hash, resolved_config
    from recscale.train import parse_fit_config

    parser, cfg = parse_fit_config(cell.argv(extra))
    return config_hash(resolved_config(parser, cfg)[1])


def finished_hashes(tracking_uri: str, experiment: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return set()
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50000)
    return {r.data.tags.get("config_hash") for r in runs}


def run_grid(cells: list[Cell], extra: list[str], jobs: int = 1, dry_run: bool = False, gpus: list[str] | None = None,
             tracking_uri: str | None = None, experiment: str = "recscale", log_dir: str = "outputs/grid") -> dict:
    from recscale.tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    done = finished_hashes(uri, experiment)
    todo, skipped = [], []
    for c in cells:
        (skipped if cell_hash(c, extra) in done else todo).append(c)
    print(f"grid: {len(cells)} cells, {len(skipped)} already FINISHED in {uri}, {len(todo)} to run"
          + (" (dry run)" if dry_run else "") + f", {max(1, jobs)} at a time", flush=True)
    for c in skipped:
        print(f"  skip  {c.name}")
    if dry_run:
        for c in todo:
            print(f"  run   {c.name}: recscale {' '.join(c.argv(extra))}")
        return {"total": len(cells), "skipped": len(skipped), "ran": 0, "failed": []}
    from recscale.tracking import PARENT_RUN_ENV, ensure_experiment

    exp_id = ensure_experiment(uri, experiment)  # once, before cells start in parallel
    parent = start_parent_run(uri, exp_id, cells, len(todo), len(skipped))
    logs = Path(log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    slots = list(range(max(1, jobs)))
    free = list(slots)
    failed: list[str] = []

    def launch(c: Cell) -> int:
        slot = free.pop(0)
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, PARENT_RUN_ENV: parent}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        t = time.perf_counter()
        try:
            with open(logs / f"{c.name}.log", "w") as log:
                rc = subprocess.call([sys.executable, "-m", "recscale", *c.argv(extra),
                                      f"--trainer.logger.init_args.experiment_name={experiment}",
                                      f"--trainer.logger.init_args.run_name={c.name}",
                                      f"--trainer.logger.init_args.tags={json.dumps(c.tags)}"],
                                     stdout=log, stderr=subprocess.STDOUT, env=env)
        finally:
            free.append(slot)
        print(f"  {'done ' if rc == 0 else 'FAIL '} {c.name} ({time.perf_counter() - t:.0f} s, log {logs / c.name}.log)",
              flush=True)
        if rc != 0:
            failed.append(c.name)
        return rc

    try:
        with ThreadPoolExecutor(max_workers=len(slots)) as pool:
            list(pool.map(launch, todo))
    finally:
        end_parent_run(uri, parent, failed)
    return {"total": len(cells), "skipped": len(skipped), "ran": len(todo), "failed": failed, "parent_run_id": parent}


def start_parent_run(uri: str, experiment_id: str, cells: list[Cell], todo: int, skipped: int) -> str:
    """The grid invocation's MLflow run; cells become its children (tag ``mlflow.parentRunId``, set by `fit` from
    the environment variable tracking.PARENT_RUN_ENV), so the runs table folds a grid into one row."""
    from mlflow.tracking import MlflowClient

    grid = cells[0].tags.get("grid", "grid") if cells else "grid"
    dataset = cells[0].name.split("-", 1)[0] if cells else "data"
    name = f"grid-{grid}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = MlflowClient(uri).create_run(experiment_id, run_name=name, tags={
        "grid": grid, "recscale.kind": "grid", "cells": str(len(cells)), "cells_to_run": str(todo),
        "cells_skipped": str(skipped)})
    print(f"grid: parent run {name} (id {run.info.run_id})", flush=True)
    return run.info.run_id


def end_parent_run(uri: str, run_id: str, failed: list[str]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if failed:
        client.set_tag(run_id, "failed_cells", ", ".join(failed)[:5000])
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="recscale grid", description=__doc__.split("\n\n")[0])
    ap.add_argument("grid", choices=["icml24", "sigir", "data-fraction", "roblock", "roblock-ablation"])
    ap.add_argument("--dataset", default="criteo", help="a configs/data/NAME.yaml (criteo, avazu, criteo_sample)")
    ap.add_argument("--models", default=None, help="comma list of configs/model names")
    ap.add_argument("--modes", default="SE,ME")
    ap.add_argument("--scales", default=",".join(map(str, SCALES)))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    ap.add_argument("--dims", default=",".join(map(str, TABLE2_DIMS)))
    ap.add_argument("--backbones", default=",".join(ROBLOCK_BACKBONES), help="roblock: dcnv2, xdeepfm, dhen")
    ap.add_argument("--depths", default=",".join(map(str, ROBLOCK_DEPTHS)), help="roblock: blocks L")
    ap.add_argument("--widths", default=",".join(map(str, ROBLOCK_WIDTHS)), help="roblock: embedding sets M")
    ap.add_argument("--betas", default=",".join(f"{b:g}" for b in ROBLOCK_BETAS), help="roblock: HSIC weights")
    ap.add_argument("--ks", default=",".join(map(str, ROBLOCK_KS)), help="roblock-ablation: components K")
    ap.add_argument("--at", default="dcnv2,4,4,0.1",
                    help="roblock-ablation operating point: backbone,depth,width,beta")
    ap.add_argument("--router", default=None, choices=ROBLOCK_ROUTERS,
                    help="roblock grids: the RoBlock cells' router variant (default: the configs' own)")
    ap.add_argument("--no-variants", action="store_true",
                    help="roblock-ablation: only the on/off and K cells, not the router/rebalancing/kernel swaps")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="cells at once")
    ap.add_argument("--gpus", default=None, help="GPU ids per slot: '0,1,2,3' (one per cell) or '0,1;2,3' groups")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--experiment", default="recscale")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--log-dir", default="outputs/grid")
    ap.add_argument("--configs-dir", default=None,
                    help="config files to use (default: ./configs if present, else the installed copy)")
    ap.add_argument("--launcher", choices=["local", "slurm"], default="local",
                    help="local: -j cells at once on this machine (default); slurm: one SLURM job array (recscale.slurm)")
    ap.add_argument("--status", action="store_true",
                    help="print how many cells are finished/running/queued/failed (MLflow and SLURM) and exit")
    from recscale import slurm

    slurm.add_arguments(ap)
    a, extra = ap.parse_known_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    configs = configs_dir(a.configs_dir)
    print(f"grid: configs from {configs}", flush=True)
    if a.grid == "icml24":
        models = a.models.split(",") if a.models else ICML_MODELS
        cells = icml24_cells(a.dataset, models, [m.upper() for m in a.modes.split(",") if m],
                             [int(s) for s in a.scales.split(",") if s], seeds, configs)
    elif a.grid == "sigir":
        cells = sigir_cells(a.dataset, a.models.split(",") if a.models else SIGIR_MODELS, seeds, configs)
    elif a.grid == "roblock":
        cells = roblock_cells(a.dataset, [b for b in a.backbones.split(",") if b],
                              [int(d) for d in a.depths.split(",") if d], [int(w) for w in a.widths.split(",") if w],
                              [float(b) for b in a.betas.split(",") if b], seeds, configs, a.router)
    elif a.grid == "roblock-ablation":
        try:
            backbone, depth, width, beta = a.at.split(",")
            at = dict(backbone=backbone, depth=int(depth), width=int(width), beta=float(beta))
        except ValueError:
            print(f"recscale grid: error: --at {a.at!r}: expected backbone,depth,width,beta such as dcnv2,4,4,0.1",
                  file=sys.stderr)
            return 2
        cells = roblock_ablation_cells(a.dataset, seeds, ks=[int(k) for k in a.ks.split(",") if k],
                                       configs=configs, router=a.router, variants=not a.no_variants, **at)
    else:
        cells = data_fraction_cells(a.dataset, [float(f) for f in a.fractions.split(",")],
                                    [int(d) for d in a.dims.split(",")], seeds, configs)
    missing = sorted({c for cell in cells for c in cell.configs if not Path(c).exists()})
    if missing:
        print(f"recscale grid: error: config file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    if a.status or a.launcher == "slurm":
        return _slurm_or_status(a, cells, extra)
    gpus = [g for g in a.gpus.split(";")] if a.gpus and ";" in a.gpus else (a.gpus.split(",") if a.gpus else None)
    res = run_grid(cells, extra, a.jobs, a.dry_run, gpus, a.tracking_uri, a.experiment, a.log_dir)
    if res["failed"]:
        print(f"grid: {len(res['failed'])} cell(s) failed: {', '.join(res['failed'])}", file=sys.stderr)
        return 1
    return 0


def _slurm_or_status(a: argparse.Namespace, cells: list[Cell], extra: list[str]) -> int:
    from recscale import slurm
    from recscale.tracking import default_tracking_uri

    uri = a.tracking_uri or default_tracking_uri()
    try:
        opts = slurm.options_from_args(a)
        if a.status:
            extra = [*extra, *(opts.fit_overrides() if a.launcher == "slurm" else [])]
            slurm.status(cells, extra, uri, a.experiment, a.log_dir)
            return 0
        res = slurm.submit_grid(cells, extra, opts, uri, a.experiment, a.log_dir, a.dry_run, a.wait)
    except slurm.SlurmError as e:
        print(f"recscale grid: error: {e}", file=sys.stderr)
        return 2
    if res["failed"]:
        print(f"grid: {len(res['failed'])} cell(s) did not finish: {', '.join(res['failed'])}", file=sys.stderr)
        return 1
    return 0
