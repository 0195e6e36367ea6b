import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
CRITEO_SAMPLE = ROOT / "data" / "criteo" / "sample.train"
AVAZU_SAMPLE = ROOT / "data" / "avazu" / "train"
AVAZU_TAIL = ROOT / "data" / "avazu" / "test"

os.environ.setdefault("POLARS_MAX_THREADS", "2")


def run_cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run `python -m recscale ARGS` in a subprocess (real exit codes and stderr)."""
    p = subprocess.run([sys.executable, "-m", "recscale", *args], capture_output=True, text=True, cwd=kw.pop("cwd", ROOT),
                       **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"recscale {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def criteo_dir(tmp_path_factory) -> Path:
    """The bundled Criteo sample prepared under icml24 (shared by the tests; read-only)."""
    from recscale.data.prepare import Options, prepare

    out = tmp_path_factory.mktemp("prep") / "criteo"
    prepare(CRITEO_SAMPLE, out, Options(dataset="criteo", progress=False, shard_rows=3000, row_group_rows=1000))
    return out


@pytest.fixture(scope="session")
def avazu_dir(tmp_path_factory) -> Path:
    from recscale.data.prepare import Options, prepare

    out = tmp_path_factory.mktemp("prep") / "avazu"
    prepare(AVAZU_SAMPLE, out, Options(dataset="avazu", progress=False))
    return out


def make_prepared(path: Path, rows_per_shard: list[int], row_group: int, nfields: int = 3) -> Path:
    """A prepared directory whose field f0 holds the global row index (to check exactly-once delivery)."""
    from recscale.data.formats import output_schema

    fields = [f"f{i}" for i in range(nfields)]
    schema = output_schema(fields)
    path.mkdir(parents=True)
    (path / "train").mkdir()
    files, start = [], 0
    for s, n in enumerate(rows_per_shard):
        idx = np.arange(start, start + n, dtype=np.int32)
        cols = [pa.array(idx)] + [pa.array((idx * (i + 7)) % 5) for i in range(1, nfields)]
        t = pa.Table.from_arrays(cols + [pa.array((idx % 2).astype(np.int8))], schema=schema)
        pq.write_table(t, path / "train" / f"part-{s:05d}.parquet", row_group_size=row_group)
        files.append({"path": f"train/part-{s:05d}.parquet", "rows": n})
        start += n
    split = {"rows": start, "positive_rate": 0.5, "files": files}
    spec = {"spec_version": 1, "dataset": "synthetic", "protocol": "none",
            "fields": [{"name": f, "cardinality": max(start, 5)} for f in fields], "label": "label",
            "splits": {"train": split, "valid": split, "test": split}}
    (path / "spec.json").write_text(json.dumps(spec))
    return path
