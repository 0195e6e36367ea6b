"""Raw formats of the Kaggle files and the tokenisation protocols (DESIGN.md, "Data protocols").

A *format* says how a raw line splits into columns; a *protocol* says which columns become which categorical fields and
how a raw value becomes a token. Both are plain data plus polars expressions: no per-row Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

CRITEO_NUMERIC = [f"I{i}" for i in range(1, 14)]
CRITEO_CATEGORICAL = [f"C{i}" for i in range(1, 27)]
AVAZU_COLUMNS = (
    "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,device_id,"
    "device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21"
).split(",")

PROTOCOLS = ("icml24", "bars", "criteo_x1")
# Protocols whose vocabulary is counted on the train split only (FuxiCTR fits its encoder on the train file).
TRAIN_VOCAB_PROTOCOLS = ("bars", "criteo_x1")
# train/valid/test proportions of the random split; other protocols use 8/1/1 (ICML 2024 App. C.2, BARS x4).
SPLIT_RATIO = {"criteo_x1": (7, 2, 1)}


def split_ratio(protocol: str) -> tuple[int, int, int]:
    """The protocol's default train/valid/test proportions (integers; the split is exact, see prepare._split_labels).

    ``criteo_x1`` is FuxiCTR / BARS Criteo_x1 (used by SIGIR 2026): a 7/2/1 random split following AFN (Cheng et al.
    2020), vocabulary fitted on the train split, min count 1 (``min_categr_count: 1``). Its integer fields I1-I13 are
    ``numeric`` features in FuxiCTR (one learned vector per field scaled by the AFN-normalised value); recscale's shards
    hold categorical ids only, so ``criteo_x1`` keeps the icml24 bucketing of the integer values (our reading; the
    one deviation from Criteo_x1).
    """
    return SPLIT_RATIO.get(protocol, (8, 1, 1))


class PrepareError(Exception):
    """A user-facing error: the message names the file, line or option and says what to do."""


@dataclass(frozen=True)
class RawFormat:
    name: str
    delimiter: str
    columns: tuple[str, ...]
    label: str
    numeric: tuple[str, ...]  # columns that must parse as integers (empty allowed)
    header: bool  # the Kaggle file starts with a header line, whose names give the column order (prepare.read_header)

    @property
    def ncols(self) -> int:
        return len(self.columns)


CRITEO = RawFormat("criteo", "\t", ("label", *CRITEO_NUMERIC, *CRITEO_CATEGORICAL), "label", tuple(CRITEO_NUMERIC), False)
AVAZU = RawFormat("avazu", ",", tuple(AVAZU_COLUMNS), "click", (), True)
FORMATS = {"criteo": CRITEO, "avazu": AVAZU}

# Per-protocol minimum counts (DESIGN.md): tokens seen fewer times share the field's OOV id.
MIN_COUNT = {("criteo", "icml24"): 10, ("avazu", "icml24"): 4, ("criteo", "bars"): 10, ("avazu", "bars"): 2,
             ("criteo", "criteo_x1"): 1}


def criteo_numeric_token(col: str) -> pl.Expr:
    """ICML 2024 reference bucketing of a Criteo integer feature, as a string token.

    empty -> "" (its own token); v > 2 -> int(ln(v)^2); else v - 2 (I2 can be negative: -1 -> -3).
    The two integer ranges cannot collide: int(ln(v)^2) >= 1 for v > 2 and v - 2 <= 0 otherwise.
    """
    v = pl.col(col).str.to_integer(strict=False)
    bucket = pl.when(v > 2).then((v.cast(pl.Float64).log() ** 2).floor().cast(pl.Int64)).otherwise(v - 2)
    return pl.when(pl.col(col) == "").then(pl.lit("")).otherwise(bucket.cast(pl.String)).alias(col)


def field_names(dataset: str, protocol: str) -> list[str]:
    if dataset == "criteo":
        return [*CRITEO_NUMERIC, *CRITEO_CATEGORICAL]
    fields = AVAZU_COLUMNS[2:]  # id dropped, click is the label
    if protocol == "bars":
        return ["hour", "weekday", "weekend", *fields[1:]]
    return list(fields)


def token_exprs(dataset: str, protocol: str) -> list[pl.Expr]:
    """Expressions mapping the raw string columns to one string token column per field, in field order."""
    if dataset == "criteo":
        return [criteo_numeric_token(c) for c in CRITEO_NUMERIC] + [pl.col(c) for c in CRITEO_CATEGORICAL]
    rest = [pl.col(c) for c in AVAZU_COLUMNS[3:]]
    if protocol == "icml24":
        return [pl.col("hour"), *rest]  # raw YYMMDDHH as one categorical
    # bars (FuxiCTR): hour -> hour of day, weekday, weekend
    wd = pl.col("hour").str.slice(0, 6).str.to_date("%y%m%d", strict=False).dt.weekday()  # 1 = Monday .. 7 = Sunday
    return [
        pl.col("hour").str.slice(6, 2).alias("hour"),
        wd.cast(pl.String).fill_null("").alias("weekday"),
        pl.when(wd >= 6).then(pl.lit("1")).otherwise(pl.lit("0")).fill_null("").alias("weekend"),
        *rest,
    ]


def check_dataset_protocol(dataset: str, protocol: str) -> RawFormat:
    if dataset not in FORMATS:
        raise PrepareError(f"unknown dataset {dataset!r}: choose one of {', '.join(FORMATS)}")
    if protocol not in PROTOCOLS:
        raise PrepareError(f"unknown protocol {protocol!r} (--protocol): choose one of {', '.join(PROTOCOLS)}")
    if (dataset, protocol) not in MIN_COUNT:
        valid = [p for d, p in MIN_COUNT if d == dataset]
        raise PrepareError(f"protocol {protocol!r} (--protocol) is not defined for {dataset}: choose one of "
                           f"{', '.join(valid)}")
    return FORMATS[dataset]


def output_schema(fields: list[str]) -> pa.Schema:
    """The schema of every prepared shard: one non-null int32 id column per field, then the int8 label."""
    return pa.schema([pa.field(f, pa.int32(), nullable=False) for f in fields] + [pa.field("label", pa.int8(), False)])
