"""Helpers shared by the benchmark scripts: subprocess timing with peak RSS, cached synthetic inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def run_measured(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of a child process."""
    t = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed")
    return time.perf_counter() - t, ru.ru_maxrss / 1024, out


def synthetic(dataset: str, rows: int, seed: int = 0) -> Path:
    path = OUT / f"{dataset}_{rows}.txt"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "recscale", "synth", dataset, "--rows", str(rows), "--output", str(path),
                        "--seed", str(seed)], check=True, cwd=ROOT)
    return path
