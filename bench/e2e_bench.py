"""End-to-end training throughput: one epoch of `recscale fit`'s training loop, from the prepared shards to the
optimizer step, in several configurations; and the time of one full diagnostics pass.

    python bench/e2e_bench.py epoch --rows 5000000 [--device cuda] [--configs stream-fp32:2048,cache-bf16:2048,...]
    python bench/e2e_bench.py diag --device cuda [--sample-rows 50000]

`epoch`: a synthetic Criteo file (`recscale synth`, cached under bench/out/) is prepared once with the icml24 protocol
(both outside the timing); then, per configuration, a Lightning Trainer with the CLI's defaults (deterministic, the
SamplesPerSecond callback, fused Adam, sparse table gradient) fits DCNv2 (SE 1x unless --mode/--scale say otherwise)
for one epoch, without validation (world size 1). A configuration is ``LOADER-PRECISION[-compile]:BATCH``: LOADER
``stream`` (the shard stream, ``--num-workers`` loader processes) or ``cache`` (``--data.device_cache``: the split resident on the
device), PRECISION ``fp32`` / ``bf16`` (``bf16-mixed``) / ``fp16`` (``16-mixed`` with a gradient scaler), ``-compile``
(``--model.compile``). Reported: steady-state samples/s (from the end of batch ``--warmup`` to the end of the last full
batch, the GPU synchronised at both marks: no worker start-up, no compilation), samples/s over the whole training
epoch (``train/samples_per_s``, all of that included), and the wall time of the whole ``fit`` call (which adds the
device-cache load and the model transfer). `diag`: DCNv2 ME 10x on Criteo-size tables (1,086,810 rows), the full
``compute_report`` (IA, spectra, diversity, sub-embedding IA, RankMe of embeddings and gradients on the sample, no
figures) on ``--device``, timed twice (the first includes one-time solver set-up).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import OUT, synthetic  # noqa: E402

from recscale.models import backbones as bb  # noqa: E402
from recscale.models.module import CTRModel  # noqa: E402

PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def prepared(rows: int) -> Path:
    """bench/out/criteo_ROWS_prepared (icml24), made once from the cached synthetic file."""
    out = OUT / f"criteo_{rows}_prepared"
    if not (out / "spec.json").exists():
        raw = synthetic("criteo", rows)
        subprocess.run([sys.executable, "-m", "recscale", "prepare", "criteo", "--input", str(raw), "--output",
                        str(out), "--overwrite", "--no-progress"], check=True, cwd=ROOT)
    return out


def parse_config(text: str) -> dict:
    name, _, batch = text.partition(":")
    parts = name.split("-")
    if parts[0] not in ("stream", "cache") or parts[1] not in PRECISION or not set(parts[2:]) <= {"compile"}:
        raise SystemExit(f"bad configuration {text!r}: LOADER-PRECISION[-compile]:BATCH, LOADER stream|cache, "
                         f"PRECISION {'|'.join(PRECISION)}")
    return {"name": text, "loader": parts[0], "precision": parts[1], "compile": "compile" in parts[2:],
            "batch_size": int(batch or 2048)}


def run_epoch(data_dir: Path, cfg: dict, device: str, mode: str, scale: int, num_workers: int,
              warmup: int = 20) -> dict:
    import lightning as L

    from recscale.data.datamodule import CTRDataModule
    from recscale.train import SamplesPerSecond

    torch.manual_seed(0)
    rows_per_epoch = json.loads((data_dir / "spec.json").read_text())["splits"]["train"]["rows"]
    dm = CTRDataModule(str(data_dir), batch_size=cfg["batch_size"], num_workers=num_workers,
                       device_cache=cfg["loader"] == "cache")
    model = CTRModel(lambda f, d, m: bb.DCNv2(f, d, m), field_dims=dm.field_dims, mode=mode, scale=scale,
                     compile=cfg["compile"])
    rate = SamplesPerSecond()
    got = {}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    class Steady(L.Callback):
        """Samples/s between the end of batch ``warmup`` and the end of the last full batch (GPU synchronised at
        both marks only): no worker start-up, no compilation (incl. the recompile of a final partial batch)."""

        def on_train_epoch_start(self, trainer, pl_module):
            self.full = rows_per_epoch // cfg["batch_size"]
            self.warm = min(warmup, max(self.full - 2, 0))
            self.t0 = self.n0 = None
            self.n = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.n += len(batch[1])
            if batch_idx == self.warm or batch_idx == self.full - 1:
                sync()
                now = time.perf_counter()
                if batch_idx == self.warm and self.t0 is None:
                    self.t0, self.n0 = now, self.n
                elif self.t0 is not None and batch_idx > self.warm:
                    got["samples_per_s"] = (self.n - self.n0) / max(now - self.t0, 1e-9)
                    got["steady_batches"] = batch_idx - self.warm

        def on_train_epoch_end(self, trainer, pl_module):  # the whole epoch, as SamplesPerSecond logs it (its own
            # on_train_epoch_end, earlier in the callback list, has stopped its clock)
            got["epoch_samples_per_s"] = rate.n / max(rate.seconds, 1e-9)
            got["rows"] = rate.n
            got.setdefault("samples_per_s", got["epoch_samples_per_s"])

    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        precision=PRECISION[cfg["precision"]], max_epochs=1, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, callbacks=[rate, Steady()],
                        default_root_dir=str(OUT / "e2e_runs"))
    t = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    res = {**cfg, "device": device, "mode": mode, "scale": scale, "steps": trainer.global_step,
           "fit_wall_s": wall, **got}
    if device == "cuda":
        res["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    del trainer, model, dm
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def cmd_epoch(a) -> list[dict]:
    data = prepared(a.rows)
    spec = json.loads((data / "spec.json").read_text())
    print(f"{data}: {spec['splits']['train']['rows']:,} training rows; DCNv2 {a.mode} {a.scale}x on {a.device}",
          flush=True)
    out = []
    for text in a.configs.split(","):
        r = run_epoch(data, parse_config(text), a.device, a.mode, a.scale, a.num_workers, a.warmup)
        print(f"{r['name']:<28} {r['samples_per_s']:>12,.0f} samples/s steady, {r['epoch_samples_per_s']:>12,.0f} "
              f"over the epoch ({r['steps']} steps, fit {r['fit_wall_s']:.1f} s)", flush=True)
        out.append(r)
        if a.json:  # after every configuration: a run cut short by a timeout keeps what it measured
            Path(a.json).write_text(json.dumps(out, indent=1))
    return out


def cmd_diag(a) -> list[dict]:
    from recscale.data.synth import criteo_reference_dims
    from recscale.diagnostics.compute import Options, compute_report

    torch.manual_seed(0)
    dims = criteo_reference_dims() if not a.small_tables else [min(d, 2000) for d in criteo_reference_dims()]
    model = CTRModel(lambda f, d, m: bb.DCNv2(f, d, m), field_dims=dims, mode="ME", scale=a.scale).to(a.device)
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randint(0, n, (a.sample_rows,), generator=g) for n in dims], 1).int()
    y = torch.randint(0, 2, (a.sample_rows,), generator=g).float()
    times = []
    for _ in range(2):
        if a.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        rep = compute_report(model, (ids, y), Options(figures=False))
        if a.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    width = len(dims) * model.num_sets * model.embed_dim
    print(f"diagnostics pass, DCNv2 ME {a.scale}x, {sum(dims):,} table rows, RankMe {a.sample_rows:,} x {width:,} float64, "
          f"on {a.device}: {times[1]:.3f} s (first call {times[0]:.3f} s); rankme/embeddings "
          f"{rep.metrics['rankme/embeddings']:.1f}", flush=True)
    parts = {k.split("/", 1)[1]: v for k, v in rep.metrics.items() if k.startswith("seconds/")}
    print("  by part (second call, host clock around each part): "
          + ", ".join(f"{k} {v:.3f} s" for k, v in parts.items()), flush=True)
    return [{"device": a.device, "scale": a.scale, "sample_rows": a.sample_rows, "width": width, "table_rows": sum(dims),
             "seconds": times[1], "first_call_seconds": times[0], "parts_seconds": parts}]


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    ep = sub.add_parser("epoch")
    ep.add_argument("--rows", type=int, default=5_000_000, help="synthetic Criteo rows before the 8/1/1 split")
    ep.add_argument("--configs", default="stream-fp32:2048,stream-bf16:2048,cache-bf16:2048,cache-bf16-compile:2048")
    ep.add_argument("--mode", default="SE")
    ep.add_argument("--scale", type=int, default=1)
    ep.add_argument("--num-workers", type=int, default=2, help="loader processes of the streaming configurations")
    ep.add_argument("--warmup", type=int, default=20, help="batches before the steady-state timing starts")
    dg = sub.add_parser("diag")
    dg.add_argument("--sample-rows", type=int, default=50_000)
    dg.add_argument("--small-tables", action="store_true", help="cap every table at 2,000 rows (smoke runs)")
    dg.add_argument("--scale", type=int, default=10, help="ME scale (10: the issue's 3,900-column RankMe)")
    for p in (ep, dg):
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = ap.parse_args()
    rows = cmd_epoch(a) if a.cmd == "epoch" else cmd_diag(a)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
