"""`recscale prepare` / `encode` / `synth` end to end on the bundled genuine samples, against a naive reference."""

import gzip
import json
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import AVAZU_SAMPLE, AVAZU_TAIL, CRITEO_SAMPLE, ROOT, run_cli

from recscale.data.formats import PrepareError
from recscale.data.prepare import Options, _split_labels, prepare


# ---------------------------------------------------------------- naive reference (plain Python, line by line)
def naive_tokens(path: Path, dataset: str, protocol: str) -> tuple[list[list[str]], list[int]]:
    rows, labels = [], []
    with open(path) as f:
        for i, line in enumerate(f):
            parts = line.rstrip("\n").split("\t" if dataset == "criteo" else ",")
            if dataset == "criteo":
                toks = []
                for v in parts[1:14]:
                    if v == "":
                        toks.append("")
                    else:
                        x = int(v)
                        toks.append(str(int(math.log(x) ** 2)) if x > 2 else str(x - 2))
                rows.append(toks + parts[14:])
                labels.append(int(parts[0]))
            else:
                if i == 0:
                    continue
                hour = parts[2]
                if protocol == "bars":
                    wd = date(2000 + int(hour[:2]), int(hour[2:4]), int(hour[4:6])).isoweekday()
                    feats = [hour[6:8], str(wd), "1" if wd >= 6 else "0"]
                else:
                    feats = [hour]
                rows.append(feats + parts[3:])
                labels.append(int(parts[1]))
    return rows, labels


def naive_vocab(rows, min_count, counted=None):
    vocabs = []
    for j in range(len(rows[0])):
        c = Counter(r[j] for i, r in enumerate(rows) if counted is None or counted[i])
        kept = sorted((t for t, n in c.items() if n >= min_count), key=lambda t: (-c[t], t))
        vocabs.append({t: i + 1 for i, t in enumerate(kept)})
    return vocabs


def read_split(d: Path, split: str) -> pl.DataFrame:
    spec = json.loads((d / "spec.json").read_text())
    return pl.concat([pl.read_parquet(d / f["path"]) for f in spec["splits"][split]["files"]])


@pytest.mark.parametrize(
    "dataset,protocol,src,nfields,min_count",
    [("criteo", "icml24", CRITEO_SAMPLE, 39, 10), ("criteo", "bars", CRITEO_SAMPLE, 39, 10),
     ("avazu", "icml24", AVAZU_SAMPLE, 22, 4), ("avazu", "bars", AVAZU_SAMPLE, 24, 2)],
)
def test_prepare_matches_naive_reference(tmp_path, dataset, protocol, src, nfields, min_count):
    out = tmp_path / "out"
    summary = prepare(src, out, Options(dataset=dataset, protocol=protocol, progress=False, shard_rows=3000,
                                        row_group_rows=500))
    spec = json.loads((out / "spec.json").read_text())
    rows, labels = naive_tokens(src, dataset, protocol)
    n = len(rows)
    split = _split_labels(n, 0)
    assert n == (10_000 if dataset == "criteo" else 8_999)
    expect = {"train": (8 * n) // 10, "valid": n // 10}
    expect["test"] = n - expect["train"] - expect["valid"]
    assert summary["rows"] == expect and summary["rejected"] == 0
    assert {s: spec["splits"][s]["rows"] for s in expect} == expect
    assert spec["dataset"] == dataset and spec["protocol"] == protocol
    assert spec["options"]["min_count"] == min_count and len(spec["fields"]) == nfields
    assert spec["input"]["name"] == src.name and len(spec["input"]["sha256"]) == 64
    vocabs = naive_vocab(rows, min_count, counted=(split == 0) if protocol == "bars" else None)
    assert [f["cardinality"] for f in spec["fields"]] == [len(v) + 1 for v in vocabs]
    # valid and test keep file order: compare every row with the naive encoding
    for k, name in ((1, "valid"), (2, "test")):
        got = read_split(out, name)
        want_idx = np.flatnonzero(split == k)
        want = np.array([[vocabs[j].get(rows[i][j], 0) for j in range(nfields)] for i in want_idx])
        assert np.array_equal(got.drop("label").to_numpy(), want)
        assert np.array_equal(got["label"].to_numpy(), np.array(labels)[want_idx])
        assert spec["splits"][name]["positive_rate"] == pytest.approx(np.mean(np.array(labels)[want_idx]), abs=1e-6)
    # train is a permutation of the train rows
    got = read_split(out, "train").to_numpy()
    tr = np.flatnonzero(split == 0)
    want = np.array([[vocabs[j].get(rows[i][j], 0) for j in range(nfields)] + [labels[i]] for i in tr])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
    assert not np.array_equal(got, want), "train rows were not shuffled"
    # shards: 3000 rows each, row groups of 500
    files = spec["splits"]["train"]["files"]
    assert [f["rows"] for f in files] == [3000] * (expect["train"] // 3000) + (
        [expect["train"] % 3000] if expect["train"] % 3000 else [])
    assert pq.ParquetFile(out / files[0]["path"]).metadata.num_row_groups == 6
    # vocab files map token -> id
    voc = pl.read_parquet(out / "vocab" / f"{spec['fields'][-1]['name']}.parquet")
    assert dict(zip(voc["token"][1:], voc["id"][1:])) == vocabs[-1] and voc["id"][0] == 0


def test_criteo_numeric_bucketing_pinned(tmp_path):
    """icml24: empty -> own token; v > 2 -> int(ln(v)^2); else v - 2 (hand-checked values)."""
    from recscale.data.formats import criteo_numeric_token

    df = pl.DataFrame({"I": ["", "-2", "-1", "0", "1", "2", "3", "7", "8", "100", "1000000"]})
    got = df.select(criteo_numeric_token("I"))["I"].to_list()
    # ln(3)^2=1.207, ln(7)^2=3.787, ln(8)^2=4.324, ln(100)^2=21.21, ln(1e6)^2=190.87
    assert got == ["", "-4", "-3", "-2", "-1", "0", "1", "3", "4", "21", "190"]


def test_deterministic_bytes(tmp_path):
    for d in ("a", "b"):
        prepare(CRITEO_SAMPLE, tmp_path / d, Options(dataset="criteo", progress=False, shard_rows=2500))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 40
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_gzip_input_gives_same_shards(tmp_path):
    gz = tmp_path / "sample.train.gz"
    gz.write_bytes(gzip.compress(CRITEO_SAMPLE.read_bytes()))
    prepare(CRITEO_SAMPLE, tmp_path / "plain", Options(dataset="criteo", progress=False))
    prepare(gz, tmp_path / "gz", Options(dataset="criteo", progress=False))
    for split in ("train", "valid", "test"):
        assert read_split(tmp_path / "plain", split).equals(read_split(tmp_path / "gz", split))


def test_seed_changes_split(tmp_path):
    prepare(CRITEO_SAMPLE, tmp_path / "s0", Options(dataset="criteo", progress=False))
    prepare(CRITEO_SAMPLE, tmp_path / "s1", Options(dataset="criteo", progress=False, seed=1))
    assert not read_split(tmp_path / "s0", "valid").equals(read_split(tmp_path / "s1", "valid"))


# ---------------------------------------------------------------- bad input
def _bad_criteo(tmp_path) -> Path:
    lines = CRITEO_SAMPLE.read_text().splitlines(keepends=True)[:60]
    lines[4] = "0\t1\t2\n"  # line 5: wrong field count
    lines[9] = "0\tabc" + lines[9][lines[9].index("\t", 2):]  # line 10: I1 is not an integer
    lines[19] = "2" + lines[19][1:]  # line 20: label 2
    lines[29] = "\n"  # line 30: blank
    p = tmp_path / "bad.txt"
    p.write_text("".join(lines))
    return p


def test_bad_lines_are_rejected_with_line_and_reason(tmp_path):
    src = _bad_criteo(tmp_path)
    s = prepare(src, tmp_path / "out", Options(dataset="criteo", progress=False, min_count=1, max_reject_fraction=0.1))
    assert s["rejected"] == 4
    assert sum(s["rows"].values()) == 56
    rej = (tmp_path / "out" / "rejected.tsv").read_text().splitlines()
    assert rej[0] == "line\treason"
    assert rej[1:] == [
        "5\texpected 40 fields, got 3",
        "10\tfield I1 value 'abc' is not an integer",
        "20\tlabel '2' is not 0 or 1",
        "30\texpected 40 fields, got 1",
    ]


def test_strict_stops_at_first_bad_line(tmp_path):
    src = _bad_criteo(tmp_path)
    p = run_cli("prepare", "criteo", "--input", str(src), "--output", str(tmp_path / "out"), "--strict",
                "--no-progress", check=False)
    assert p.returncode == 2
    assert f"{src}:5: expected 40 fields, got 3" in p.stderr
    assert not (tmp_path / "out").exists()
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".out.partial")]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["prepare", "criteo", "--input", "{tmp}/missing.txt"], "does not exist"),
        (["prepare", "criteo", "--input", "{tmp}/empty.txt"], "is empty"),
        (["prepare", "movielens", "--input", "{sample}"], "unknown dataset 'movielens'"),
        (["prepare", "criteo", "--input", "{sample}", "--protocol", "xyz"], "unknown protocol 'xyz' (--protocol)"),
        (["prepare", "criteo", "--input", "{sample}", "--output", "{tmp}/exists"], "already exists: pass --overwrite"),
        (["prepare", "criteo", "--input", "{sample}", "--shard-rows", "0"], "--shard-rows must be positive"),
    ],
)
def test_bad_invocations_give_one_clear_line(tmp_path, args, needle):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("user data")
    args = [a.format(tmp=tmp_path, sample=CRITEO_SAMPLE) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    p = run_cli(*args, check=False)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert (tmp_path / "exists" / "keep.txt").read_text() == "user data"


def test_all_lines_bad(tmp_path):
    src = tmp_path / "junk.txt"
    src.write_text("hello\nworld\n")
    with pytest.raises(PrepareError, match="every line was rejected"):
        prepare(src, tmp_path / "out", Options(dataset="criteo", progress=False))
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_atomically(tmp_path):
    out = tmp_path / "out"
    prepare(CRITEO_SAMPLE, out, Options(dataset="criteo", progress=False))
    before = (out / "spec.json").read_text()
    prepare(CRITEO_SAMPLE, out, Options(dataset="criteo", progress=False, seed=3), overwrite=True)
    assert json.loads((out / "spec.json").read_text())["options"]["seed"] == 3 and before != (out / "spec.json").read_text()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, sig):
    raw = tmp_path / "big.txt"
    run_cli("synth", "criteo", "--rows", "400000", "--output", str(raw))
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "recscale", "prepare", "criteo", "--input", str(raw), "--output",
                          str(out), "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not any(x.name.startswith(".out.partial") and (x / "_spill").exists()
                                             for x in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.3)
    assert p.poll() is None, "prepare finished before it could be interrupted"
    p.send_signal(sig)
    p.wait(timeout=60)
    assert p.returncode != 0
    assert not out.exists()
    leftovers = [x for x in tmp_path.iterdir() if x.name.startswith(".out.")]
    assert all(not (x / "spec.json").exists() for x in leftovers)
    if sig == signal.SIGINT:
        assert leftovers == [], "Ctrl-C must clean up its temporary directory"
    # a fresh prepare into the same place then works
    prepare(raw, out, Options(dataset="criteo", progress=False))
    assert (out / "spec.json").exists()


# ---------------------------------------------------------------- encode and synth
def test_encode_later_data_with_same_ids(tmp_path, avazu_dir):
    tail = tmp_path / "tail.csv"  # the bundled tail has no header line; an Avazu file must have one
    tail.write_text(AVAZU_SAMPLE.read_text().splitlines(keepends=True)[0] + AVAZU_TAIL.read_text())
    s = run_cli("encode", "--data", str(avazu_dir), "--input", str(tail), "--output", str(tmp_path / "enc"),
                "--no-progress")
    meta = json.loads((tmp_path / "enc" / "spec.json").read_text())
    assert meta["splits"]["test"]["rows"] == 1000 and meta["rejected_rows"] == 0, s.stdout
    got = pl.read_parquet(tmp_path / "enc" / "test" / "part-00000.parquet")
    voc = pl.read_parquet(avazu_dir / "vocab" / "site_id.parquet")
    mapping = dict(zip(voc["token"][1:], voc["id"][1:]))
    raw = [ln.split(",") for ln in AVAZU_TAIL.read_text().splitlines()]
    assert got["site_id"].to_list() == [mapping.get(r[5], 0) for r in raw]
    assert got["label"].to_list() == [int(r[1]) for r in raw]


@pytest.mark.parametrize("dataset,nfields", [("criteo", 39), ("avazu", 22)])
def test_synth_prepares_cleanly(tmp_path, dataset, nfields):
    raw = tmp_path / "raw"
    run_cli("synth", dataset, "--rows", "20000", "--output", str(raw), "--seed", "1")
    s = prepare(raw, tmp_path / "out", Options(dataset=dataset, progress=False))
    assert s["rejected"] == 0 and sum(s["rows"].values()) == 20000 and len(s["vocabulary"]) == nfields
    spec = json.loads((tmp_path / "out" / "spec.json").read_text())
    rate = spec["splits"]["train"]["positive_rate"]
    assert 0.1 < rate < 0.4, rate
    if dataset == "criteo":
        df = pl.read_csv(raw, separator="\t", has_header=False, infer_schema=False, quote_char=None)
        assert df.height == 20000 and df.width == 40
        assert df["column_1"].is_null().mean() > 0.3  # I1 is missing about 45% of the time, as in the real data
        assert df["column_14"].str.len_chars().max() == 8  # C1: 8-char hex
    big = [c for c in s["vocabulary"].values()]
    assert max(big) > 10 * min(big)  # cardinalities vary widely, as in the real data


def test_out_of_range_numeric_values_take_the_string_path(tmp_path):
    """Integer fields map to dense codes for buckets in [-1024, 2047]; raw values below -1022 fall back to the string
    dictionary. Both must give the naive reference's vocabulary and ids."""
    lines = CRITEO_SAMPLE.read_text().splitlines(keepends=True)[:400]
    for k, v in ((3, "-5000"), (7, "-5000"), (11, "-3000"), (13, "-1022"), (17, "-1023")):
        parts = lines[k].split("\t")
        parts[2] = v  # I2
        lines[k] = "\t".join(parts)
    src = tmp_path / "odd.txt"
    src.write_text("".join(lines))
    out = tmp_path / "out"
    prepare(src, out, Options(dataset="criteo", progress=False, min_count=1))
    rows, _ = naive_tokens(src, "criteo", "icml24")
    vocabs = naive_vocab(rows, 1)
    spec = json.loads((out / "spec.json").read_text())
    assert [f["cardinality"] for f in spec["fields"]] == [len(v) + 1 for v in vocabs]
    voc = pl.read_parquet(out / "vocab" / "I2.parquet")
    got = dict(zip(voc["token"][1:], voc["id"][1:]))
    assert got == vocabs[1] and {"-5002", "-3002", "-1024", "-1025"} <= set(got)
    split = _split_labels(len(rows), 0)
    for k, name in ((1, "valid"), (2, "test")):
        want = np.array([[vocabs[j].get(rows[i][j], 0) for j in range(39)] for i in np.flatnonzero(split == k)])
        assert np.array_equal(read_split(out, name).drop("label").to_numpy(), want)
    train = read_split(out, "train").drop("label").to_numpy()
    want = np.array([[vocabs[j].get(rows[i][j], 0) for j in range(39)] for i in np.flatnonzero(split == 0)])
    assert sorted(map(tuple, train.tolist())) == sorted(map(tuple, want.tolist()))
