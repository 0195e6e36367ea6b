"""Reading and checking a prepared data directory (`spec.json` + shards)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recscale.data.formats import PrepareError, output_schema


class DataDirError(PrepareError):
    """A prepared data directory is missing, half-written, or does not match its spec."""


def _fix(path: Path) -> str:
    return (f"prepare it with `recscale prepare criteo --input RAW_FILE --output {path}` "
            f"(or avazu), adding --overwrite to rebuild it")


def load_spec(data_dir: str | Path) -> dict:
    d = Path(data_dir)
    if not d.is_dir():
        raise DataDirError(f"data directory {d} does not exist: {_fix(d)}")
    spec_path = d / "spec.json"
    if not spec_path.is_file():
        raise DataDirError(f"{d} has no spec.json, so it is not a (complete) prepared directory: {_fix(d)}")
    try:
        spec = json.loads(spec_path.read_text())
        _ = [f["name"] for f in spec["fields"]], spec["splits"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataDirError(f"{spec_path} is not a valid recscale spec ({e}): {_fix(d)}") from e
    return spec


def expected_schema(spec: dict) -> pa.Schema:
    return output_schema([f["name"] for f in spec["fields"]])


def shard_units(data_dir: str | Path, spec: dict, split: str) -> list[tuple[str, int, int]]:
    """Check every shard of a split against the spec; return its row groups as (path, row_group, rows), in order."""
    d = Path(data_dir)
    if split not in spec["splits"]:
        raise DataDirError(f"{d / 'spec.json'} has no split {split!r} (it has {', '.join(spec['splits'])})")
    want = expected_schema(spec)
    units = []
    for f in spec["splits"][split]["files"]:
        path = d / f["path"]
        if not path.is_file():
            raise DataDirError(f"shard {path} listed in spec.json is missing: {_fix(d)}")
        try:
            meta = pq.ParquetFile(path).metadata
            schema = meta.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as e:
            raise DataDirError(f"shard {path} is corrupted ({e}): {_fix(d)}") from e
        if not schema.remove_metadata().equals(want, check_metadata=False):
            raise DataDirError(
                f"shard {path} has schema {schema.names[:4]}... ({len(schema)} columns) which does not match spec.json "
                f"({len(want)} columns: fields then label): {_fix(d)}"
            )
        if meta.num_rows != f["rows"]:
            raise DataDirError(f"shard {path} has {meta.num_rows} rows, spec.json says {f['rows']}: {_fix(d)}")
        units += [(str(path), g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    return units
