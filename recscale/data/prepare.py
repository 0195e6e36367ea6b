"""`recscale prepare`: raw Kaggle file -> vocabulary -> globally shuffled Parquet shards + spec.json.

Passes over the input, each streaming fixed-size byte blocks (memory never grows with the file):

0. scan: count lines and take the SHA-256 of the input; draw the exact 8/1/1 split of the data lines (1 byte per line).
1. count: parse, validate and tokenise every line; count tokens per field (whole file for ``icml24``, train split only for
   ``bars``); bad lines go to ``rejected.tsv``.
2. encode: map tokens to ids; valid/test rows go straight to their shards in file order; train rows go to one of K
   spill buckets (Arrow IPC) chosen at random.
3. shuffle: each bucket is read whole, permuted and appended to the train shards. A uniformly random bucket per row plus a
   uniform permutation inside each bucket is a uniform global shuffle, with one bucket in memory at a time.

Everything is built in a hidden sibling directory that is renamed into place at the very end, so an interrupted run never
leaves a directory that looks complete. Same input and options -> byte-identical shards, vocab and spec.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recscale import __version__
from recscale.data.formats import (
    MIN_COUNT,
    TRAIN_VOCAB_PROTOCOLS,
    PrepareError,
    RawFormat,
    check_dataset_protocol,
    field_names,
    output_schema,
    split_ratio,
    token_exprs,
)
from recscale.data.spec import load_spec

SPLITS = ("train", "valid", "test")
SPEC_VERSION = 1
BLOCK_BYTES = 32 << 20
CSV_BLOCK_BYTES = 4 << 20  # the CSV reader's block; a longer line is parsed with one block of the whole buffer
MAX_REJECT_FRACTION = 0.05  # default of --max-reject-fraction
BOM = b"\xef\xbb\xbf"


@dataclass
class Options:
    dataset: str
    protocol: str = "icml24"
    min_count: int | None = None  # None: the protocol's default
    split: tuple[int, int, int] | None = None  # train/valid/test proportions; None: the protocol's (8/1/1, criteo_x1 7/2/1)
    seed: int = 0
    shard_rows: int = 1 << 20
    row_group_rows: int = 1 << 16
    bucket_rows: int = 1 << 20
    compression: str = "zstd"
    strict: bool = False
    progress: bool = True
    max_reject_fraction: float = MAX_REJECT_FRACTION  # more rejected lines than this fraction: an error


    def resolved_split(self) -> tuple[int, int, int]:
        return split_ratio(self.protocol) if self.split is None else tuple(self.split)

    def resolved_min_count(self) -> int:
        return MIN_COUNT[(self.dataset, self.protocol)] if self.min_count is None else self.min_count


# ----------------------------------------------------------------------------------------------------------- reading
def _open(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a corrupt or truncated gzip stream into one line naming the file."""
    try:
        yield
    except EOFError as e:
        raise PrepareError(f"input file {path} is a truncated gzip file (the compressed stream ends early): download "
                           f"it again (`gzip -t {path}` checks a file)") from e
    except (gzip.BadGzipFile, zlib.error) as e:
        raise PrepareError(f"input file {path} starts like gzip but is not a valid gzip file ({e}): download it again, "
                           "or pass the uncompressed file") from e


def iter_blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[bytes]:
    """Blocks of whole lines (each ends with a newline); CRLF is normalised to LF, a UTF-8 BOM at the start dropped."""
    rest = b""
    first = True
    with _reading(path), _open(path) as f:
        while True:
            buf = f.read(block_bytes)
            if not buf:
                break
            if first and buf.startswith(BOM):
                buf = buf[len(BOM):]
            first = False
            buf = rest + buf
            cut = buf.rfind(b"\n")
            if cut < 0:
                rest = buf
                continue
            rest = buf[cut + 1 :]
            yield _crlf(buf[: cut + 1])
    if rest:
        yield _crlf(rest + b"\n")


def _crlf(b: bytes) -> bytes:
    return b.replace(b"\r\n", b"\n") if b"\r" in b else b


def scan(path: Path) -> tuple[int, str, int]:
    """(number of lines, sha256 of the file's bytes, size in bytes) in one streaming pass."""
    h, size, lines, last = hashlib.sha256(), 0, 0, b"\n"
    with _reading(path), open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        if compressed:
            for blk in iter(lambda: raw.read(BLOCK_BYTES), b""):
                h.update(blk)
                size += len(blk)
            with gzip.open(path, "rb") as f:
                for blk in iter(lambda: f.read(BLOCK_BYTES), b""):
                    lines += blk.count(b"\n")
                    last = blk[-1:]
        else:
            for blk in iter(lambda: raw.read(BLOCK_BYTES), b""):
                h.update(blk)
                size += len(blk)
                lines += blk.count(b"\n")
                last = blk[-1:]
    if last != b"\n":
        lines += 1
    return lines, h.hexdigest(), size


def read_header(path: Path, fmt: RawFormat) -> tuple[bool, RawFormat]:
    """Whether the file has a header line, and the format with the columns in the file's order.

    Formats with a header (Avazu) must have one; its columns are matched by name, so a reordered file is read right.
    A missing, unknown or repeated column is an error naming it. Formats without one (Criteo) are read by position."""
    if not fmt.header:
        return False, fmt
    with _reading(path), _open(path) as f:
        first = f.readline()
    first = first.removeprefix(BOM).rstrip(b"\r\n").decode("utf-8", "replace")
    names = first.split(fmt.delimiter)
    if names == list(fmt.columns):
        return True, fmt
    known = set(fmt.columns)
    if not known & set(names):
        raise PrepareError(
            f"input file {path} has no header line: a {fmt.name} file starts with the header "
            f"`{fmt.delimiter.join(fmt.columns[:4])}{fmt.delimiter}...` ({fmt.ncols} columns, matched by name); "
            f"add it (e.g. `(head -1 train.csv; cat {path}) > with_header.csv`), or check that this is a {fmt.name} "
            f"file (line 1 is {first[:60]!r})")
    missing = [c for c in fmt.columns if c not in names]
    unknown = [n for n in names if n not in known]
    repeated = sorted({n for n in names if names.count(n) > 1})
    for what, cols in (("lacks the column(s)", missing), ("has unknown column(s)", unknown),
                       ("repeats the column(s)", repeated)):
        if cols:
            raise PrepareError(f"input file {path}: the header (line 1) {what} {', '.join(cols)}; a {fmt.name} "
                               f"file has the columns {fmt.delimiter.join(fmt.columns)} (in any order)")
    return True, dataclasses.replace(fmt, columns=tuple(names))


def check_format(path: Path, fmt: RawFormat, header: bool, what: str = "") -> None:
    """Refuse a file whose first data line is a line of another dataset's format (and not of this one)."""
    from recscale.data.formats import FORMATS

    with _reading(path), _open(path) as f:
        line = f.readline()
        if header:
            line = f.readline()
    line = line.removeprefix(BOM).rstrip(b"\r\n")
    if line.count(fmt.delimiter.encode()) + 1 == fmt.ncols:
        return
    for other in FORMATS.values():
        if other.name != fmt.name and line.count(other.delimiter.encode()) + 1 == other.ncols:
            raise PrepareError(
                f"input file {path} looks like {other.name} data (line {1 + int(header)} has {other.ncols} "
                f"{other.delimiter!r}-separated fields), not {fmt.name} ({fmt.ncols} {fmt.delimiter!r}-separated "
                f"fields){what}")


@dataclass
class Block:
    raw: pl.DataFrame  # string columns of the good lines, in file order
    lines: np.ndarray  # 1-based file line number of each good line
    rejects: list[tuple[int, str]] = field(default_factory=list)
    nlines: int = 0  # lines in the block, good and bad


def _read_csv(buf: bytes, fmt: RawFormat, on_invalid=None) -> pa.Table:
    def read(block_size: int) -> pa.Table:
        return pacsv.read_csv(
            pa.py_buffer(buf),
            read_options=pacsv.ReadOptions(column_names=list(fmt.columns), block_size=block_size),
            parse_options=pacsv.ParseOptions(delimiter=fmt.delimiter, quote_char=False, newlines_in_values=False,
                                             invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in fmt.columns}),
        )

    try:
        return read(CSV_BLOCK_BYTES)
    except pa.ArrowInvalid as e:  # a line longer than the reader's block ("straddling object"): one block
        if "straddl" not in str(e):
            raise
        return read(len(buf) + 1)


def _encoding_rejects(a: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> dict[int, str]:
    """Lines (by index in the block) holding a lone carriage return or bytes that are not UTF-8, with the reason.

    Only called for a block that is not plain ASCII or holds a CR; Python runs only for the lines with such bytes."""
    out: dict[int, str] = {}
    for i in np.unique(np.searchsorted(ends, np.flatnonzero(a == 13))):
        at = int(np.flatnonzero(a[starts[i]:ends[i]] == 13)[0]) + 1
        out[int(i)] = f"carriage return (CR) inside the line at byte {at}"
    for i in np.unique(np.searchsorted(ends, np.flatnonzero(a >= 128))):
        if int(i) in out:
            continue
        try:
            a[starts[i]:ends[i]].tobytes().decode("utf-8")
        except UnicodeDecodeError as e:
            out[int(i)] = f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start + 1})"
    return out


def parse_block(buf: bytes, fmt: RawFormat, first_line: int, skip_first: bool = False) -> Block:
    """Split, validate and parse one block of whole lines; vectorised, with Python only for the (rare) bad lines.

    Fast path: the CSV reader parses a plain-ASCII block without carriage returns, and a block where it meets no line of
    the wrong width is taken as is. Otherwise the field count of every line is computed with numpy, lines with a lone CR
    (the reader would split them) or bytes that are not UTF-8 are found, the bad lines are reported with their numbers
    and cut out, and the rest is parsed again.
    """
    nlines = buf.count(b"\n")
    lineno = np.arange(first_line, first_line + nlines, dtype=np.int64)
    invalid: list = []
    table = None
    plain = buf.isascii() and b"\r" not in buf
    if plain and not skip_first:
        table = _read_csv(buf, fmt, lambda row: invalid.append(row) or "skip")
    rejects: list[tuple[int, str]] = []
    if table is None or invalid or table.num_rows != nlines:
        a = np.frombuffer(buf, dtype=np.uint8)
        ends = np.flatnonzero(a == 10)
        starts = np.concatenate(([0], ends[:-1] + 1))
        delims = np.flatnonzero(a == ord(fmt.delimiter))
        nfields = np.searchsorted(delims, ends) - np.searchsorted(delims, starts) + 1
        good = nfields == fmt.ncols
        reasons = {int(i): f"expected {fmt.ncols} fields, got {int(nfields[i])}" for i in np.flatnonzero(~good)}
        if not plain:
            enc = _encoding_rejects(a, starts, ends)
            reasons.update(enc)
            good[list(enc)] = False
        if skip_first:
            good[0] = False
            reasons.pop(0, None)
        rejects = [(int(lineno[i]), why) for i, why in sorted(reasons.items())]
        lineno = lineno[good]
        if len(lineno) == 0:
            return Block(pl.DataFrame(schema={c: pl.String for c in fmt.columns}), lineno, rejects, nlines)
        table = _read_csv(a[np.repeat(good, ends - starts + 1)].tobytes(), fmt)
    raw = pl.from_arrow(table)
    if not isinstance(raw, pl.DataFrame) or raw.height != len(lineno):
        raise pa.ArrowInvalid(f"the CSV reader returned {len(raw)} rows for {len(lineno)} lines")
    checks = [(~pl.col(fmt.label).is_in(["0", "1"])).alias("label")]
    checks += [((pl.col(c) != "") & pl.col(c).str.to_integer(strict=False).is_null()).alias(c) for c in fmt.numeric]
    bad = raw.select(checks)
    bad_any = bad.select(pl.any_horizontal(pl.all())).to_series().to_numpy()
    if bad_any.any():
        for i in np.flatnonzero(bad_any):
            row = bad.row(int(i), named=True)
            if row["label"]:
                reason = f"label {raw[int(i), fmt.label]!r} is not 0 or 1"
            else:
                col = next(c for c in fmt.numeric if row[c])
                reason = f"field {col} value {raw[int(i), col]!r} is not an integer"
            rejects.append((int(lineno[i]), reason))
        raw = raw.filter(~pl.Series(bad_any))
        lineno = lineno[~bad_any]
    rejects.sort()
    return Block(raw, lineno, rejects, nlines)


def iter_parsed(path: Path, fmt: RawFormat, header: bool) -> Iterator[Block]:
    line = 1
    for i, buf in enumerate(iter_blocks(path)):
        try:
            block = parse_block(buf, fmt, line, skip_first=header and i == 0)
        except pa.ArrowException as e:  # not expected (bad lines are cut out first); never a bare traceback
            last = line + buf.count(b"\n") - 1
            raise PrepareError(f"input file {path}: lines {line}-{last} cannot be parsed "
                               f"({e}); run with --strict to find the first bad line") from e
        yield block
        line += block.nlines


# ----------------------------------------------------------------------------------------------------------- vocab
def build_vocab(counts: pl.DataFrame, min_count: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Ids by count descending, then token; id 0 is the field's OOV row (tokens seen fewer than min_count times).

    Returns the vocabulary (token, count, id; OOV row first) and the kept rows in id order with any extra columns of
    `counts` (e.g. provisional ids), so callers never sort twice."""
    kept = counts.filter(pl.col("count") >= min_count).sort(["count", "token"], descending=[True, False])
    oov = counts.filter(pl.col("count") < min_count)["count"].sum()
    kept = kept.with_columns(pl.int_range(1, kept.height + 1, dtype=pl.Int32).alias("id"))
    head = pl.DataFrame({"token": [None], "count": [oov]}, schema={"token": pl.String, "count": pl.Int64})
    head = head.with_columns(pl.lit(0, dtype=pl.Int32).alias("id"))
    return pl.concat([head, kept.select("token", pl.col("count").cast(pl.Int64), "id")]), kept


def encode_tokens(tokens: pl.DataFrame, vocabs: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Token strings -> int32 ids (unknown tokens -> 0, the OOV id)."""
    cols = []
    for name, voc in vocabs.items():
        ids = voc.filter(pl.col("id") > 0)
        cols.append(
            tokens[name].replace_strict(ids["token"], ids["id"], default=0, return_dtype=pl.Int32).alias(name)
        )
    return pl.DataFrame(cols)


# ----------------------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Appends tables and writes `part-NNNNN.parquet` files of exactly `shard_rows` rows (the last one shorter)."""

    def __init__(self, directory: Path, schema: pa.Schema, opts: Options):
        self.dir, self.schema, self.opts = directory, schema, opts
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.files: list[dict] = []
        self.rows = 0
        self.positives = 0

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.opts.shard_rows:
            self._flush(self.opts.shard_rows)

    def _flush(self, n: int) -> None:
        t = pa.concat_tables(self.pending)
        head, rest = t.slice(0, n), t.slice(n)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        name = f"part-{len(self.files):05d}.parquet"
        pq.write_table(head, self.dir / name, row_group_size=self.opts.row_group_rows, compression=self.opts.compression)
        self.files.append({"path": f"{self.dir.name}/{name}", "rows": head.num_rows})
        self.rows += head.num_rows
        self.positives += int(pc.sum(head.column("label")).as_py() or 0)

    def close(self) -> dict:
        if self.pending_rows:
            self._flush(self.pending_rows)
        return {
            "rows": self.rows,
            "positive_rate": round(self.positives / self.rows, 6) if self.rows else None,
            "files": self.files,
        }


def _to_arrow(ids: pl.DataFrame, label: pl.Series, schema: pa.Schema) -> pa.Table:
    df = ids.with_columns(label.cast(pl.Int8).alias("label"))
    return df.to_arrow().cast(schema)


# ----------------------------------------------------------------------------------------------------------- driver
class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=" rows", unit_scale=True, disable=not enabled, file=sys.stderr)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _split_labels(n: int, seed: int, ratio: tuple[int, int, int] = (8, 1, 1)) -> np.ndarray:
    """Exact random split of n data lines in the proportions ``ratio`` (0 train, 1 valid, 2 test), seeded:
    ``floor(r_train n / sum r)`` train and ``floor(r_valid n / sum r)`` valid lines, the rest test."""
    total = sum(ratio)
    n_train, n_valid = (ratio[0] * n) // total, (ratio[1] * n) // total
    labels = np.repeat(np.array([0, 1, 2], np.uint8), [n_train, n_valid, n - n_train - n_valid])
    np.random.default_rng(seed).shuffle(labels)
    return labels


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Build a directory in a hidden sibling and move it into place only when the block succeeds; an existing `out`
    is replaced only then. On any failure (Ctrl-C included) the partial directory is removed; after kill -9 it stays
    hidden and incomplete (no spec.json), never at `out`. The result gets the permissions of a directory made with
    ``mkdir`` (it follows the umask, not ``mkdtemp``'s 0700)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_dataset_dir(path: Path) -> bool:
    """A directory recscale wrote (prepare or encode: it has spec.json), or an empty one."""
    return path.is_dir() and not path.is_symlink() and ((path / "spec.json").is_file() or not any(path.iterdir()))


def check_output(out: Path, overwrite: bool, keep: dict[str, Path]) -> None:
    """Refuse an --output that exists (without --overwrite), and with --overwrite anything but a recscale dataset:
    never one of the files or directories in `keep` (the input, the vocabulary) or a directory that contains one."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise PrepareError(f"output {out} already exists: pass --overwrite to replace it, or choose --output")
    target = out.resolve()
    for what, path in keep.items():
        p = path.resolve()
        if target == p or target in p.parents:
            rel = "is" if target == p else "contains"
            raise PrepareError(f"--output {out} {rel} the {what} {path}: --overwrite never replaces it; choose "
                               "another --output")
    if not is_dataset_dir(out):
        kind = "a file" if not out.is_dir() else "a directory without spec.json"
        raise PrepareError(f"--output {out} is {kind}, not a recscale dataset: --overwrite only replaces directories "
                           "that prepare or encode wrote; choose another --output (or remove it yourself)")


@contextmanager
def _writing(out: Path) -> Iterator[None]:
    """One line for a write that fails because of the output's disk (full, read-only, no permission)."""
    try:
        yield
    except OSError as e:
        if isinstance(e, PrepareError):
            raise
        where = e.filename or out
        if e.errno == errno.ENOSPC:
            raise PrepareError(f"no space left on the disk of {out.parent} while writing {where}: free some space or "
                               f"choose an --output on another disk (nothing was left at {out})") from e
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise PrepareError(f"cannot write {where} ({e.strerror}): choose an --output in a writable directory "
                               f"(nothing was left at {out})") from e
        raise


def _too_many_rejects(src: Path, rejected: int, n_data: int, first: list[tuple[int, str]], limit: float,
                      what: str = "") -> PrepareError | None:
    """The error for a file where every line, or more than the --max-reject-fraction, was rejected (else None)."""
    if rejected == 0 or (rejected < n_data and rejected <= limit * n_data):
        return None
    reasons = "; ".join(f"line {ln}: {why}" for ln, why in first[:3])
    head = ("every line was rejected" if rejected >= n_data else
            f"{rejected:,} of {n_data:,} lines ({rejected / n_data:.1%}) were rejected, more than "
            f"--max-reject-fraction {limit:g}")
    return PrepareError(f"input file {src}: {head}; first reasons: {reasons}{what}. Check that the file is "
                        "the raw dataset named on the command line"
                        + (" (or raise --max-reject-fraction)" if rejected < n_data else ""))


def prepare(input_path: str | Path, output: str | Path, opts: Options, overwrite: bool = False) -> dict:
    """Prepare one raw file; returns the summary dict (also printed by the CLI)."""
    t0 = time.perf_counter()
    fmt = check_dataset_protocol(opts.dataset, opts.protocol)
    src, out = Path(input_path), Path(output)
    if src.is_dir():
        raise PrepareError(f"input {src} is a directory (--input): pass the path of the raw Kaggle file")
    if not src.is_file():
        raise PrepareError(f"input file {src} does not exist (--input): pass the path of the raw Kaggle file")
    if src.stat().st_size == 0:
        raise PrepareError(f"input file {src} is empty: pass the raw Kaggle file (did a download fail?)")
    check_output(out, overwrite, {"input file": src})
    for name, v in [("--shard-rows", opts.shard_rows), ("--row-group-rows", opts.row_group_rows)]:
        if v <= 0:
            raise PrepareError(f"{name} must be positive, got {v}")
    if not 0.0 <= opts.max_reject_fraction <= 1.0:
        raise PrepareError(f"--max-reject-fraction must be in [0, 1], got {opts.max_reject_fraction}")
    with _writing(out), atomic_directory(out) as tmp:
        summary = _prepare_into(src, tmp, fmt, opts)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["output"] = str(out)
    return summary


def _prepare_into(src: Path, tmp: Path, fmt: RawFormat, opts: Options) -> dict:
    fields = field_names(opts.dataset, opts.protocol)
    min_count = opts.resolved_min_count()
    if min_count < 1:
        raise PrepareError(f"--min-count must be at least 1, got {min_count}")
    header, fmt = read_header(src, fmt)
    check_format(src, fmt, header, f" (`recscale prepare {fmt.name}`)")

    # pass 0: scan
    n_lines, sha, size = scan(src)
    n_data = n_lines - int(header)
    if n_data <= 0:
        raise PrepareError(f"input file {src} has no data lines")
    ratio = opts.resolved_split()
    if len(ratio) != 3 or min(ratio) < 0 or ratio[0] <= 0:
        raise PrepareError(f"--split-ratio must be three non-negative integers with a positive train part, got {ratio}")
    split = _split_labels(n_data, opts.seed, ratio)
    n_train_lines = int((split == 0).sum())
    n_buckets = max(1, math.ceil(n_train_lines / opts.bucket_rows))

    # pass 1: parse once; provisional ids from a growing per-field dictionary (polars Categories, in Rust), token counts
    # by bincount, rows spilled as provisional ids: valid/test in file order, train to a random bucket.
    # polars keeps a Categories mapping alive only while a Categorical dtype object that names it is alive (the
    # Categories handle alone is not enough), so `dtypes` is held until the vocabulary has been read back.
    run = uuid.uuid4().hex
    cats = [pl.Categories(f"recscale-{run}-{f}") for f in fields]
    dtypes = [pl.Categorical(c) for c in cats]
    pid_exprs = [e.cast(dt).to_physical().alias(f) for e, dt, f in
                 zip(token_exprs(opts.dataset, opts.protocol), dtypes, fields)]
    counts = [np.zeros(0, np.int64) for _ in fields]
    spill = tmp / "_spill"
    spill.mkdir()
    spill_schema = pa.schema([pa.field(f, pa.uint32(), False) for f in fields] + [pa.field("label", pa.int8(), False)])
    names = ["valid", "test"] + [f"train-{k:04d}" for k in range(n_buckets)]
    sinks = {n: pa.ipc.new_stream(spill / f"{n}.arrow", spill_schema) for n in names}
    bucket_rng = np.random.default_rng([opts.seed, 1])
    rejected = 0
    first_rejects: list[tuple[int, str]] = []
    prog = _Progress(n_data, "read  ", opts.progress)
    with open(tmp / "rejected.tsv", "w") as rej:
        rej.write("line\treason\n")
        for block in iter_parsed(src, fmt, header):
            if block.rejects:
                if opts.strict:
                    line, reason = block.rejects[0]
                    raise PrepareError(f"{src}:{line}: {reason} (--strict stops at the first bad line)")
                rejected += len(block.rejects)
                first_rejects += block.rejects[: 3 - len(first_rejects)]
                rej.writelines(f"{ln}\t{why}\n" for ln, why in block.rejects)
            pids = block.raw.select(pid_exprs).with_columns(block.raw[fmt.label].cast(pl.Int8).alias("label"))
            s = split[block.lines - 1 - int(header)]
            counted = np.flatnonzero(s == 0) if opts.protocol in TRAIN_VOCAB_PROTOCOLS else None
            for j, f in enumerate(fields):
                ids = pids[f].to_numpy()
                c = np.bincount(ids if counted is None else ids[counted])
                if len(c) > len(counts[j]):
                    c[: len(counts[j])] += counts[j]
                    counts[j] = c
                else:
                    counts[j][: len(c)] += c
            table = pids.to_arrow().cast(spill_schema)
            for k, name in ((1, "valid"), (2, "test")):
                sel = np.flatnonzero(s == k)
                if len(sel):
                    sinks[name].write_table(table.take(sel))
            train_idx = np.flatnonzero(s == 0)
            b = bucket_rng.integers(0, n_buckets, size=len(train_idx))
            for k in range(n_buckets):
                sel = train_idx[b == k]
                if len(sel):
                    sinks[f"train-{k:04d}"].write_table(table.take(sel))
            prog.update(block.raw.height + len(block.rejects))
    prog.close()
    for w in sinks.values():
        w.close()
    err = _too_many_rejects(src, rejected, n_data, first_rejects, opts.max_reject_fraction)
    if err is not None:
        raise err

    # vocabulary: ids by count descending then token, OOV = 0; lut maps provisional id -> final id
    vocab_dir = tmp / "vocab"
    vocab_dir.mkdir()
    luts, cards = [], {}
    for j, f in enumerate(fields):
        tokens = cats[j].to_series()
        cnt = np.zeros(len(tokens), np.int64)
        cnt[: len(counts[j])] = counts[j][: len(tokens)]
        df = pl.DataFrame({"token": tokens.cast(pl.String), "count": cnt, "pid": np.arange(len(tokens), dtype=np.uint32)})
        voc, kept = build_vocab(df, min_count)
        lut = np.zeros(max(len(tokens), 1), np.int32)
        lut[kept["pid"].to_numpy()] = np.arange(1, kept.height + 1, dtype=np.int32)
        luts.append(lut)
        cards[f] = voc.height
        voc.write_parquet(vocab_dir / f"{f}.parquet", compression="zstd", statistics=False)
    del counts, dtypes

    # pass 2: remap spilled rows to final ids; train buckets are permuted and appended to the train shards
    schema = output_schema(fields)
    writers = {s_: ShardWriter(tmp / s_, schema, opts) for s_ in SPLITS}
    prog = _Progress(n_data - rejected, "write ", opts.progress)
    for name in names:
        path = spill / f"{name}.arrow"
        with pa.ipc.open_stream(path) as r:
            if name.startswith("train"):  # one bucket in memory, permuted while remapped column by column
                t = r.read_all()
                perm = np.random.default_rng([opts.seed, 2, int(name[6:])]).permutation(t.num_rows)
                cols = [pa.array(luts[j][np.take(t.column(j).to_numpy(), perm)]) for j in range(len(fields))]
                cols.append(pa.array(np.take(t.column(len(fields)).to_numpy(), perm)))
                del t
                writers["train"].write(pa.Table.from_arrays(cols, schema=schema))
                prog.update(len(perm))
            else:  # valid/test: streamed batch by batch, file order kept
                for batch in r:
                    cols = [pa.array(luts[j][batch.column(j).to_numpy()]) for j in range(len(fields))]
                    writers[name].write(pa.Table.from_arrays(cols + [batch.column(len(fields))], schema=schema))
                    prog.update(batch.num_rows)
        path.unlink()
    prog.close()
    spill.rmdir()
    splits = {s_: writers[s_].close() for s_ in SPLITS}

    spec = {
        "spec_version": SPEC_VERSION,
        "dataset": opts.dataset,
        "protocol": opts.protocol,
        "options": {
            "min_count": min_count,
            "seed": opts.seed,
            "split": [r / sum(ratio) for r in ratio],
            "shard_rows": opts.shard_rows,
            "row_group_rows": opts.row_group_rows,
            "compression": opts.compression,
            "oov_id": 0,
        },
        "fields": [{"name": f, "cardinality": cards[f]} for f in fields],
        "label": "label",
        "splits": splits,
        "rejected_rows": rejected,
        "input": {"name": src.name, "bytes": size, "sha256": sha, "lines": n_lines, "header": header},
        "recscale_version": __version__,
    }
    (tmp / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    empty = [s_ for s_ in SPLITS if splits[s_]["rows"] == 0]
    warning = {"warning": f"the {' and '.join(empty)} split(s) are empty ({n_data - rejected} good lines, split 8/1/1):"
                          " `recscale fit` needs train and valid rows; prepare a larger input"} if empty else {}
    return {
        **warning,
        "dataset": opts.dataset,
        "protocol": opts.protocol,
        "rows": {s_: splits[s_]["rows"] for s_ in SPLITS},
        "rejected": rejected,
        "vocabulary": cards,
        "total_vocabulary": int(sum(cards.values())),
    }


def load_vocabs(data_dir: Path, fields: list[str]) -> dict[str, pl.DataFrame]:
    return {f: pl.read_parquet(data_dir / "vocab" / f"{f}.parquet") for f in fields}


ENCODE_SPLITS = ("test", "8/1/1")
UNKNOWN_WARNING = 0.5  # encode warns when more than this fraction of all values is unknown to the vocabulary


def encode_file(input_path: str | Path, data_dir: str | Path, output: str | Path, overwrite: bool = False,
                progress: bool = True, split: str = "test",
                max_reject_fraction: float = MAX_REJECT_FRACTION) -> dict:
    """Encode another raw file (e.g. another day) with the ids of an existing prepared directory.

    The output is a dataset of its own (``spec.json`` naming the vocabulary's directory and spec checksum, shards with
    the same schema, ``rejected.tsv``): ``split="test"`` puts every row, in file order, in its test split (for
    ``recscale test``/``inspect --split test``); ``split="8/1/1"`` draws the seeded 8/1/1 split of ``prepare`` (rows
    in file order within each split; the DataModule shuffles row groups and a buffer while training). The summary has
    the fraction of values per field that the vocabulary does not know (``unknown_rate``: id 0, which also holds the
    vocabulary's own rare tokens); ``warning`` is set when most values are unknown.
    """
    data_dir = Path(data_dir)
    spec = load_spec(data_dir)
    vocab_dir = Path(spec.get("encoded_with", {}).get("data_dir", data_dir))  # an encoded dir names its vocabulary
    opts = Options(dataset=spec["dataset"], protocol=spec["protocol"], progress=progress,
                   shard_rows=spec["options"]["shard_rows"], row_group_rows=spec["options"]["row_group_rows"],
                   compression=spec["options"]["compression"], seed=spec["options"].get("seed", 0))
    fmt = check_dataset_protocol(opts.dataset, opts.protocol)
    src, out = Path(input_path), Path(output)
    if split not in ENCODE_SPLITS:
        raise PrepareError(f"unknown --split {split!r}: choose one of {', '.join(ENCODE_SPLITS)}")
    if not src.is_file() or src.stat().st_size == 0:
        raise PrepareError(f"input file {src} does not exist or is empty (--input)")
    check_output(out, overwrite, {"input file": src, "vocabulary directory (--data)": vocab_dir,
                                  "data directory (--data)": data_dir})
    what = f" (the vocabulary of {data_dir} is {opts.dataset}/{opts.protocol})"
    try:
        header, fmt = read_header(src, fmt)
        check_format(src, fmt, header, what)
    except PrepareError as e:
        raise PrepareError(f"{e}{what if what not in str(e) else ''}") from e
    fields = [f["name"] for f in spec["fields"]]
    vocabs = load_vocabs(vocab_dir, fields)
    exprs = token_exprs(opts.dataset, opts.protocol)
    schema = output_schema(fields)
    n_lines, sha, size = scan(src)
    n_data = n_lines - int(header)
    names = ("test",) if split == "test" else SPLITS
    labels = np.full(n_data, 2, np.uint8) if split == "test" else _split_labels(n_data, opts.seed)
    with _writing(out), atomic_directory(out) as tmp:
        writers = {n: ShardWriter(tmp / n, schema, opts) for n in names}
        rejected, first, unknown = 0, [], np.zeros(len(fields), np.int64)
        with open(tmp / "rejected.tsv", "w") as rej:
            rej.write("line\treason\n")
            for block in iter_parsed(src, fmt, header):
                rejected += len(block.rejects)
                first += block.rejects[: 3 - len(first)]
                rej.writelines(f"{ln}\t{why}\n" for ln, why in block.rejects)
                ids = encode_tokens(block.raw.select(exprs), vocabs)
                unknown += ids.select((pl.all() == 0).sum()).to_numpy().reshape(-1).astype(np.int64)
                table = _to_arrow(ids, block.raw[fmt.label], schema)
                s_ = labels[block.lines - 1 - int(header)]
                for k, n in enumerate(SPLITS):
                    if n in writers:
                        writers[n].write(table.take(np.flatnonzero(s_ == k)) if len(names) > 1 else table)
        err = _too_many_rejects(src, rejected, n_data, first, max_reject_fraction, what)
        if err is not None:
            raise err
        splits = {n: w.close() for n, w in writers.items()}
        rows = sum(v["rows"] for v in splits.values())
        rate = {f: round(float(u) / max(rows, 1), 6) for f, u in zip(fields, unknown)}
        out_spec = {
            **{k: v for k, v in spec.items() if k not in ("splits", "rejected_rows", "input", "unknown_rate")},
            "options": {**spec["options"], "split": split, "seed": opts.seed},
            "splits": splits,
            "rejected_rows": rejected,
            "input": {"name": src.name, "bytes": size, "sha256": sha, "lines": n_lines, "header": header},
            "encoded_with": {"data_dir": str(vocab_dir.resolve()),
                             "spec_sha256": hashlib.sha256((vocab_dir / "spec.json").read_bytes()).hexdigest()},
            "unknown_rate": rate,
            "recscale_version": __version__,
        }
        (tmp / "spec.json").write_text(json.dumps(out_spec, indent=2) + "\n")
    summary = {"rows": {n: v["rows"] for n, v in splits.items()}, "rejected": rejected, "output": str(out),
               "unknown_rate": rate}
    overall = float(unknown.sum()) / max(rows * len(fields), 1)
    if overall > UNKNOWN_WARNING:
        worst = sorted(rate.items(), key=lambda kv: -kv[1])[:5]
        summary["warning"] = (
            f"{overall:.1%} of the values of {src} are unknown to the vocabulary of {vocab_dir} (per field: "
            + ", ".join(f"{f} {r:.1%}" for f, r in worst) + ", ...; all in spec.json's unknown_rate): is the input "
            "from the same source as the data that vocabulary was prepared from?")
    return summary
