"""Streaming DataModule: exactly-once delivery across simulated (rank x worker), shuffling, and data-dir errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_prepared
from hypothesis import given, settings
from hypothesis import strategies as st

from recscale.data.datamodule import CTRDataModule, ShardStream, batches_in, plan
from recscale.data.spec import DataDirError


def _rows(slices, unit_rows):
    starts = np.concatenate(([0], np.cumsum(unit_rows)[:-1]))
    return np.concatenate([np.arange(starts[u] + a, starts[u] + b) for u, a, b in slices] or [np.zeros(0, int)])


@settings(max_examples=300, deadline=None)
@given(
    unit_rows=st.lists(st.integers(1, 50), min_size=1, max_size=12),
    world=st.integers(1, 4),
    workers=st.integers(0, 3),
    batch=st.integers(1, 16),
    epoch=st.integers(0, 3),
    train=st.booleans(),
)
def test_plan_exactly_once(unit_rows, world, workers, batch, epoch, train):
    nw = max(workers, 1)  # 0 workers = the main process is the one worker
    total = sum(unit_rows)
    got, per_rank_batches = [], []
    for r in range(world):
        rank_rows = []
        for w in range(nw):
            s = plan(unit_rows, rank=r, world=world, worker=w, num_workers=nw, batch_size=batch, train=train,
                     seed=5, epoch=epoch)
            rows = _rows(s, unit_rows)
            if w < nw - 1:
                assert len(rows) % batch == 0  # only the last worker may hold a partial batch
            rank_rows.append(rows)
        per_rank_batches.append(sum(-(-len(x) // batch) for x in rank_rows))
        assert per_rank_batches[-1] == batches_in(unit_rows, world=world, rank=r, num_workers=nw, batch_size=batch,
                                                  train=train)
        got += rank_rows
    allrows = np.concatenate(got)
    assert len(np.unique(allrows)) == len(allrows), "a row was delivered twice"
    if train:
        assert len(allrows) == total - total % world  # the remainder (< world rows) sits this epoch out
        assert len(set(per_rank_batches)) == 1, "ranks must make the same number of steps"
    else:
        assert np.array_equal(allrows, np.arange(total)), "valid/test: every row once, in file order"


def _collect(ds: ShardStream, world: int, nw: int):
    out = {}
    for r in range(world):
        for w in range(nw):
            batches = list(ds.iter_numpy(r, world, w, nw))
            out[(r, w)] = batches
    return out


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 3), (2, 2), (3, 1), (4, 3)])
@pytest.mark.parametrize("train", [True, False])
def test_stream_delivers_real_rows_exactly_once(tmp_path, world, workers, train):
    d = make_prepared(tmp_path / "d", [1000, 777, 1500, 3], row_group=128)
    dm = CTRDataModule(str(d), batch_size=64, num_workers=workers, shuffle_buffer=300)
    units = dm.units("train")
    assert len(units) == 8 + 7 + 12 + 1
    ds = ShardStream(units, dm.fields, 64, train, seed=1, shuffle_buffer=300)
    nw = max(workers, 1)
    batches = _collect(ds, world, nw)
    ids = np.concatenate([x[:, 0] for bl in batches.values() for x, _ in bl])
    assert len(np.unique(ids)) == len(ids)
    total = 3280
    assert len(ids) == (total - total % world if train else total)
    for bl in batches.values():
        for x, y in bl:
            assert x.dtype == np.int32 and y.dtype == np.float32 and len(x) <= 64
            assert np.array_equal(y, (x[:, 0] % 2).astype(np.float32))  # labels travel with their rows
            assert np.array_equal(x[:, 1], (x[:, 0] * 8) % 5)
    counts = {r: sum(len(batches[(r, w)]) for w in range(nw)) for r in range(world)}
    if train:
        assert len(set(counts.values())) == 1
        assert counts[0] == batches_in(ds.unit_rows, world=world, rank=0, num_workers=nw, batch_size=64, train=True)
    else:
        assert np.array_equal(ids, np.arange(total))


def test_shuffle_differs_between_epochs_and_is_reproducible(tmp_path):
    d = make_prepared(tmp_path / "d", [700, 700, 700], row_group=100)
    dm = CTRDataModule(str(d), batch_size=50, shuffle_buffer=250, seed=3)

    def order(epoch, seed=3):
        ds = ShardStream(dm.units("train"), dm.fields, 50, True, seed=seed, shuffle_buffer=250)
        ds.set_epoch(epoch)
        return np.concatenate([x[:, 0] for x, _ in ds.iter_numpy(0, 1, 0, 1)])

    e0, e1 = order(0), order(1)
    assert sorted(e0) == sorted(e1) == list(range(2100))
    assert not np.array_equal(e0, e1)
    assert np.array_equal(e0, order(0))
    assert not np.array_equal(e0, order(0, seed=4))
    # the buffer mixes rows across row groups: a batch is not a contiguous run
    assert np.any(np.abs(np.diff(e0[:50])) > 1)


def test_epoch_reaches_worker_processes(tmp_path):
    d = make_prepared(tmp_path / "d", [400, 400], row_group=100)
    dm = CTRDataModule(str(d), batch_size=40, num_workers=2, shuffle_buffer=100)
    epoch = {"e": 0}
    from recscale.data.datamodule import EpochLoader

    ds = ShardStream(dm.units("train"), dm.fields, 40, True, shuffle_buffer=100, num_workers=2)
    loader = EpochLoader(ds, lambda: epoch["e"], num_workers=2)
    a = torch.cat([x[:, 0] for x, _ in loader])
    assert len(loader) == 20 and len(a) == 800
    epoch["e"] = 1
    b = torch.cat([x[:, 0] for x, _ in loader])
    assert sorted(a.tolist()) == sorted(b.tolist()) and not torch.equal(a, b)


def test_train_fraction_takes_a_prefix(tmp_path):
    d = make_prepared(tmp_path / "d", [500, 500], row_group=100)
    dm = CTRDataModule(str(d), batch_size=64, train_fraction=0.3)
    assert sum(u[2] for u in dm.units("train")) == 300
    ds = ShardStream(dm.units("train"), dm.fields, 64, True)
    ids = np.concatenate([x[:, 0] for x, _ in ds.iter_numpy(0, 1, 0, 1)])
    assert sorted(ids) == list(range(300))


def test_spec_is_exposed(criteo_dir):
    dm = CTRDataModule(str(criteo_dir), batch_size=512, num_workers=0)
    assert len(dm.fields) == 39 and dm.fields[0] == "I1" and dm.fields[-1] == "C26"
    assert dm.field_dims == [f["cardinality"] for f in json.loads((criteo_dir / "spec.json").read_text())["fields"]]
    n = 0
    for x, y in dm.train_dataloader():
        assert x.shape[1] == 39 and (x < torch.tensor(dm.field_dims)).all() and (x >= 0).all()
        n += len(y)
    assert n == 8000


# ---------------------------------------------------------------- errors name the path and the fix
def test_missing_dir(tmp_path):
    with pytest.raises(DataDirError, match=r"does not exist: prepare it with `recscale prepare"):
        CTRDataModule(str(tmp_path / "nope"))


def test_half_written_dir(tmp_path, criteo_dir):
    d = tmp_path / "half"
    shutil.copytree(criteo_dir, d)
    (d / "spec.json").unlink()
    with pytest.raises(DataDirError, match="no spec.json"):
        CTRDataModule(str(d))


def test_missing_shard(tmp_path, criteo_dir):
    d = tmp_path / "d"
    shutil.copytree(criteo_dir, d)
    (d / "train" / "part-00001.parquet").unlink()
    dm = CTRDataModule(str(d))
    with pytest.raises(DataDirError, match=r"part-00001.parquet listed in spec.json is missing"):
        dm.setup("fit")


def test_corrupted_shard(tmp_path, criteo_dir):
    d = tmp_path / "d"
    shutil.copytree(criteo_dir, d)
    p = d / "valid" / "part-00000.parquet"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(DataDirError, match=r"valid/part-00000.parquet is corrupted .*--overwrite"):
        CTRDataModule(str(d)).setup("validate")


def test_schema_mismatch(tmp_path, criteo_dir, avazu_dir):
    d = tmp_path / "d"
    shutil.copytree(criteo_dir, d)
    shutil.copy(avazu_dir / "test" / "part-00000.parquet", d / "test" / "part-00000.parquet")
    with pytest.raises(DataDirError, match=r"test/part-00000.parquet has schema .* does not match spec.json"):
        CTRDataModule(str(d)).setup("test")


def test_bad_options(criteo_dir):
    with pytest.raises(ValueError, match="--data.batch_size"):
        CTRDataModule(str(criteo_dir), batch_size=0)
    with pytest.raises(ValueError, match="data.train_fraction"):
        CTRDataModule(str(criteo_dir), train_fraction=0)
