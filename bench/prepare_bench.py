"""prepare throughput vs polars only parsing the same file, and peak RSS at two file sizes.

    python bench/prepare_bench.py [--rows 5000000] [--small-rows 1000000]

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
    a = ap.parse_args()
    results = {}
    for rows in (a.small_rows, a.rows):
        raw = synthetic("criteo", rows)
        _, rss_parse, out = run_measured([sys.executable, "-c", PARSE, str(raw)])
        t_parse = float(out.split()[0])
        _, rss_prep, out = run_measured([sys.executable, "-c", PREPARE, str(raw), str(OUT / f"prepared_{rows}")])
        t_prep = float(out.split()[0])
        results[rows] = dict(bytes=os.path.getsize(raw), parse_s=t_parse, parse_rows_s=rows / t_parse,
                             parse_peak_rss_mib=rss_parse, prepare_s=t_prep, prepare_rows_s=rows / t_prep,
                             prepare_peak_rss_mib=rss_prep, ratio=t_parse / t_prep)
        r = results[rows]
        print(f"{rows:>10,} rows ({r['bytes'] / 2**20:,.0f} MiB): polars parse {r['parse_rows_s']:>10,.0f} rows/s "
              f"(peak {rss_parse:,.0f} MiB) | prepare {r['prepare_rows_s']:>10,.0f} rows/s (peak {rss_prep:,.0f} MiB)"
              f" | ratio prepare/parse {r['ratio']:.2f}")
    small, big = results[a.small_rows], results[a.rows]
    print(f"peak RSS of prepare: {small['prepare_peak_rss_mib']:,.0f} MiB at {a.small_rows:,} rows, "
          f"{big['prepare_peak_rss_mib']:,.0f} MiB at {a.rows:,} rows "
          f"(x{big['prepare_peak_rss_mib'] / small['prepare_peak_rss_mib']:.2f} for x{a.rows / a.small_rows:.0f} rows)")
    (OUT / "prepare_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
