"""`recscale synth`: raw files in the Kaggle formats, with realistic cardinalities, for testing at scale.

Each categorical field draws Zipf(1.1)-distributed ranks over a support a few times larger than the field's vocabulary
after min-count filtering (so the long tail of rare tokens that collapses into OOV exists too); Criteo numeric fields draw
log-scale integers whose ICML-2024 buckets span the reference bucket counts; missing values appear at the rates measured on
the bundled genuine sample; labels follow a planted logistic click model (a random weight per field value), so models
have something to learn. Vectorised numpy/polars, written in chunks: 5M Criteo rows take well under a minute.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl

from recscale.data.formats import (
    AVAZU_COLUMNS,
    CRITEO_CATEGORICAL,
    CRITEO_NUMERIC,
    PrepareError,
)

# Fraction of empty values per Criteo column (I1..I13, C1..C26), measured on data/criteo/sample.train (10,000 rows).
CRITEO_MISSING = [0.448, 0.0, 0.204, 0.198, 0.049, 0.251, 0.049, 0.001, 0.049, 0.448, 0.049, 0.773, 0.198, 0.0, 0.0,
                  0.036, 0.036, 0.0, 0.133, 0.0, 0.0, 0.0, 0.0, 0.0, 0.036, 0.0, 0.0, 0.0, 0.036, 0.0, 0.0, 0.45, 0.45,
                  0.036, 0.818, 0.0, 0.036, 0.45, 0.45]
# Approximate distinct values per Avazu field in the full train.csv (hour is generated over 10 days separately).
AVAZU_CARDINALITY = {"C1": 7, "banner_pos": 7, "site_id": 4737, "site_domain": 7745, "site_category": 26,
                     "app_id": 8552, "app_domain": 559, "app_category": 36, "device_id": 2686408,
                     "device_ip": 6729486, "device_model": 8251, "device_type": 5, "device_conn_type": 4, "C14": 2626,
                     "C15": 8, "C16": 9, "C17": 435, "C18": 4, "C19": 68, "C20": 172, "C21": 60}
AVAZU_HEX = {"site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category", "device_id",
             "device_ip", "device_model"}
CHUNK = 500_000


def criteo_reference_dims() -> list[int]:
    """Per-field vocabulary sizes of the full Criteo file under icml24 (ICML 2024 reference preprocessing)."""
    text = resources.files("recscale").joinpath("reference/criteo_icml24_field_dims.txt").read_text()
    line = next(ln for ln in text.splitlines() if ln and not ln.startswith("#"))
    return [int(x) for x in line.split(",")]


class _Zipf:
    def __init__(self, support: int, rng: np.random.Generator, a: float = 1.1):
        w = 1.0 / np.arange(1, support + 1, dtype=np.float64) ** a
        self.cdf = np.cumsum(w) / w.sum()
        self.weight = rng.normal(0.0, 0.35, support)  # planted click-model weight of each value

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cdf, rng.random(n)), len(self.cdf) - 1)


def _hex8(ranks: np.ndarray, field: int) -> pl.Series:
    v = ((ranks.astype(np.uint64) + 1) * np.uint64(2654435761) + np.uint64(field * 97531)) & np.uint64(0xFFFFFFFF)
    digits = (v[:, None] >> np.arange(28, -1, -4, dtype=np.uint64)) & np.uint64(0xF)
    chars = np.frombuffer(b"0123456789abcdef", np.uint8)[digits.astype(np.intp)]
    return pl.Series(np.ascontiguousarray(chars).view("S8").ravel()).cast(pl.String)


def _with_missing(s: pl.Series, rate: float, rng: np.random.Generator) -> pl.Series:
    if rate <= 0:
        return s
    return pl.select(pl.when(pl.Series(rng.random(len(s)) < rate)).then(None).otherwise(s)).to_series()


def synth(dataset: str, rows: int, output: str | Path, seed: int = 0) -> Path:
    if dataset not in ("criteo", "avazu"):
        raise PrepareError(f"unknown dataset {dataset!r}: choose criteo or avazu")
    if rows <= 0:
        raise PrepareError(f"--rows must be positive, got {rows}")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    rng = np.random.default_rng(seed)
    gen = _criteo_chunk if dataset == "criteo" else _avazu_chunk
    state = _criteo_state(rng) if dataset == "criteo" else _avazu_state(rng)
    try:
        with open(tmp, "wb") as f:
            if dataset == "avazu":
                f.write((",".join(AVAZU_COLUMNS) + "\n").encode())
            for start in range(0, rows, CHUNK):
                df = gen(state, rng, min(CHUNK, rows - start), start)
                df.write_csv(f, separator="\t" if dataset == "criteo" else ",", include_header=False,
                             null_value="", quote_style="never")
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _criteo_state(rng):
    dims = criteo_reference_dims()
    num = [_Zipf(d, rng, a=0.9) for d in dims[:13]]
    cat = [_Zipf(4 * d, rng) for d in dims[13:]]
    return dims, num, cat


def _criteo_chunk(state, rng, n, start):
    dims, num, cat = state
    logit = np.full(n, -1.45)
    cols = {}
    for j, name in enumerate(CRITEO_NUMERIC):
        # bucket b (>= 1) <-> v in [exp(sqrt(b)), exp(sqrt(b+1))): draw a bucket by Zipf rank, then a value in it.
        r = num[j].draw(rng, n)
        logit += num[j].weight[r]
        lo = np.exp(np.sqrt(r.astype(np.float64)))
        v = np.where(r < 3, r - 1, np.floor(lo * (1 + 0.2 * rng.random(n))).astype(np.int64) + 2)
        if name == "I2":
            v = np.where(rng.random(n) < 0.1, -1, v)
        cols[name] = _with_missing(pl.Series(v.astype(np.int64)), CRITEO_MISSING[j], rng)
    for j, name in enumerate(CRITEO_CATEGORICAL):
        r = cat[j].draw(rng, n)
        logit += cat[j].weight[r]
        cols[name] = _with_missing(_hex8(r, j), CRITEO_MISSING[13 + j], rng)
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    return pl.DataFrame({"label": label, **cols})


def _avazu_state(rng):
    return {k: _Zipf(v, rng) for k, v in AVAZU_CARDINALITY.items()}, _Zipf(240, rng, a=0.3)


def _avazu_chunk(state, rng, n, start):
    fields, hours = state
    logit = np.full(n, -1.6)
    h = np.sort(hours.draw(rng, n))  # the real file is time-ordered
    logit += hours.weight[h]
    day, hour = 21 + h // 24, h % 24
    cols = {
        "id": pl.Series(rng.integers(0, 2**63, n, dtype=np.int64)).cast(pl.UInt64) * 2 + pl.Series(rng.integers(0, 2, n)).cast(pl.UInt64),
        "click": None,
        "hour": pl.Series(141000 * 100 + day * 100 + hour).cast(pl.String),
    }
    for j, (name, z) in enumerate(fields.items()):
        r = z.draw(rng, n)
        logit += z.weight[r]
        if name in AVAZU_HEX:
            cols[name] = _hex8(r, 100 + j)
        elif name == "C20":
            cols[name] = pl.Series(np.where(r == 0, -1, 100000 + r)).cast(pl.String)
        else:
            cols[name] = pl.Series(r + (1000 if name in ("C1", "C14", "C17", "C21") else 0)).cast(pl.String)
    cols["click"] = pl.Series((rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8))
    return pl.DataFrame(cols)

