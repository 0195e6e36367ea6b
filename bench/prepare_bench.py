"""prepare throughput vs polars only parsing the same file, and peak RSS at two file sizes.

    python bench/prepare_bench.py [--rows 5000000] [--small-rows 1000000]
    python bench/prepare_bench.py --full-size 45840617     # prepare alone on a Criteo-size file: time and peak RSS

Each measurement runs in its own process (peak RSS is per process). Timings exclude interpreter start-up: the child
prints its own elapsed seconds. Target (issue 2): prepare >= 0.5x the parse rate; peak RSS < 4 GB and flat in file size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from _common import OUT, run_measured, synthetic

PARSE = """
import sys, time, polars as pl
t = time.perf_counter()
df = pl.read_csv(sys.argv[1], separator="\\t", has_header=False, infer_schema=False, quote_char=None)
print(time.perf_counter() - t, df.height)
"""
# The floor: parse as above, then write one int32 column per field plus the label as Parquet shards with prepare's
# settings (1M-row files, 64K-row groups, zstd). A byte length stands in for the id: no validation, no vocabulary, no
# split, no shuffle. Whatever prepare adds to parsing cannot cost less than this write.
FLOOR = """
import sys, time, polars as pl, pyarrow.parquet as pq, pathlib, shutil
out = pathlib.Path(sys.argv[2]); shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
t = time.perf_counter()
df = pl.read_csv(sys.argv[1], separator="\t", has_header=False, infer_schema=False, quote_char=None)
ids = df.select(pl.col(df.columns[0]).cast(pl.Int8).alias("label"),
                *[pl.col(c).str.len_bytes().cast(pl.Int32) for c in df.columns[1:]])
for k, s in enumerate(range(0, ids.height, 1 << 20)):
    pq.write_table(ids[s:s + (1 << 20)].to_arrow(), out / f"part-{k:05d}.parquet", row_group_size=1 << 16,
                   compression="zstd")
print(time.perf_counter() - t, df.height)
"""
PREPARE = """
import sys, json
from recscale.data.prepare import Options, prepare
s = prepare(sys.argv[1], sys.argv[2], Options(dataset="criteo", progress=False), overwrite=True)
print(s["seconds"], sum(s["rows"].values()))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--small-rows", type=int, default=1_000_000)
    ap.add_argument("--full-size", type=int, default=0, metavar="ROWS",
                    help="only prepare a synthetic file of ROWS rows (no parse baseline: a whole-file polars read of "
                         "11 GB does not fit in this machine's memory); prints rows/s and peak RSS")
    a = ap.parse_args()
    if a.full_size:
        raw = synthetic("criteo", a.full_size)
        dst = OUT / f"prepared_{a.full_size}"
        _, rss, out = run_measured([sys.executable, "-c", PREPARE, str(raw), str(dst)])
        t = float(out.split()[0])
        print(f"{a.full_size:>10,} rows ({os.path.getsize(raw) / 2**30:,.2f} GiB): prepare {a.full_size / t:,.0f} rows/s "
              f"({t:,.0f} s), peak RSS {rss:,.0f} MiB")
        return
    results = {}
    for rows in (a.small_rows, a.rows):
        raw = synthetic("criteo", rows)
        _, rss_parse, out = run_measured([sys.executable, "-c", PARSE, str(raw)])
        t_parse = float(out.split()[0])
        _, _, out = run_measured([sys.executable, "-c", FLOOR, str(raw), str(OUT / f"floor_{rows}")])
        t_floor = float(out.split()[0])
        _, rss_prep, out = run_measured([sys.executable, "-c", PREPARE, str(raw), str(OUT / f"prepared_{rows}")])
        t_prep = float(out.split()[0])
        results[rows] = dict(bytes=os.path.getsize(raw), parse_s=t_parse, parse_rows_s=rows / t_parse,
                             floor_s=t_floor, floor_ratio=t_parse / t_floor,
                             parse_peak_rss_mib=rss_parse, prepare_s=t_prep, prepare_rows_s=rows / t_prep,
                             prepare_peak_rss_mib=rss_prep, ratio=t_parse / t_prep)
        r = results[rows]
        print(f"{rows:>10,} rows ({r['bytes'] / 2**20:,.0f} MiB): polars parse {r['parse_rows_s']:>10,.0f} rows/s "
              f"(peak {rss_parse:,.0f} MiB) | prepare {r['prepare_rows_s']:>10,.0f} rows/s (peak {rss_prep:,.0f} MiB)"
              f" | ratio prepare/parse {r['ratio']:.2f} | parse + Parquet write only: ratio {r['floor_ratio']:.2f}")
    small, big = results[a.small_rows], results[a.rows]
    print(f"peak RSS of prepare: {small['prepare_peak_rss_mib']:,.0f} MiB at {a.small_rows:,} rows, "
          f"{big['prepare_peak_rss_mib']:,.0f} MiB at {a.rows:,} rows "
          f"(x{big['prepare_peak_rss_mib'] / small['prepare_peak_rss_mib']:.2f} for x{a.rows / a.small_rows:.0f} rows)")
    (OUT / "prepare_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
