"""`--data.device_cache true` on the CPU (the split held in RAM): exactly-once delivery over simulated DDP ranks, the
same batch counts as the stream, (seed, epoch) order, a short fit, and the clear error when the split does not fit."""

import pytest
import torch
from conftest import make_prepared
from hypothesis import given, settings
from hypothesis import strategies as st

from recscale.data import datamodule as dmod
from recscale.data.datamodule import CTRDataModule, DeviceBatches, DeviceCacheError, DeviceSplit, batches_in, share


def _fake_split(total: int, rank: int, world: int) -> DeviceSplit:
    """A rank's share whose column 0 holds the global row index and whose label is its parity."""
    lo, hi = share(total, rank, world)
    idx = torch.arange(lo, hi, dtype=torch.int32)
    return DeviceSplit(torch.stack([idx, idx * 3 % 7], 1), (idx % 2).float(), total, rank, world)


@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 400), world=st.integers(1, 4), batch=st.integers(1, 16), epoch=st.integers(0, 3),
       seed=st.integers(0, 3), train=st.booleans())
def test_device_batches_exactly_once(total, world, batch, epoch, seed, train):
    """Over ranks: no row twice; train delivers all rows but the `total % world` left over, with the same number of
    batches on every rank (the stream's count, `batches_in`); valid/test deliver every row once in file order."""
    got, counts = [], []
    for r in range(world):
        db = DeviceBatches(_fake_split(total, r, world), batch, train, seed, lambda: epoch)
        bs = list(db)
        assert len(bs) == len(db)
        assert all(len(y) <= batch for _, y in bs) and all(len(y) == batch for _, y in bs[:-1])
        for x, y in bs:
            assert torch.equal(y, (x[:, 0] % 2).float()) and torch.equal(x[:, 1], x[:, 0] * 3 % 7)  # rows intact
        got += [x[:, 0] for x, _ in bs]
        counts.append(len(bs))
        # the stream (one rank, any worker count) makes the same number of batches from the same split
        assert len(bs) == batches_in([total], world=world, rank=r, num_workers=1, batch_size=batch, train=train)
    rows = torch.cat(got) if got else torch.zeros(0, dtype=torch.int32)
    assert len(torch.unique(rows)) == len(rows), "a row was delivered twice"
    if train:
        assert len(rows) == total - total % world
        assert len(set(counts)) == 1, "ranks must make the same number of steps"
    else:
        assert torch.equal(rows, torch.arange(total, dtype=torch.int32)), "valid/test: every row once, in file order"


def test_epoch_order_depends_on_seed_and_epoch():
    split = _fake_split(1000, 0, 1)

    def order(epoch, seed=3):
        return torch.cat([x[:, 0] for x, _ in DeviceBatches(split, 64, True, seed, lambda: epoch)])

    e0, e1 = order(0), order(1)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(1000))
    assert not torch.equal(e0, e1)
    assert torch.equal(e0, order(0))  # reproducible
    assert not torch.equal(e0, order(0, seed=4))
    # ranks draw different permutations of their shares
    a = DeviceBatches(_fake_split(1000, 0, 2), 64, True, 3).order(0)
    b = DeviceBatches(_fake_split(1000, 1, 2), 64, True, 3).order(0)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("train", [True, False])
def test_rank_loads_only_its_share_of_real_shards(tmp_path, world, train):
    d = make_prepared(tmp_path / "d", [1000, 777, 1500, 3], row_group=128)
    dm = CTRDataModule(str(d), batch_size=64, num_workers=0, device_cache=True)
    units, total, got, counts = dm.units("train"), 3280, [], []
    for r in range(world):
        split = DeviceSplit.load(units, dm.fields, r, world, torch.device("cpu"))
        lo, hi = share(total, r, world)
        assert len(split) == hi - lo and split.x.dtype == torch.int32 and split.y.dtype == torch.float32
        assert torch.equal(split.x[:, 0], torch.arange(lo, hi, dtype=torch.int32))  # exactly its share, file order
        bs = list(DeviceBatches(split, 64, train, seed=1))
        for x, y in bs:
            assert torch.equal(y, (x[:, 0] % 2).float()) and torch.equal(x[:, 1], (x[:, 0] * 8) % 5)
        got.append(torch.cat([x[:, 0] for x, _ in bs]))
        counts.append(len(bs))
    ids = torch.cat(got)
    assert len(torch.unique(ids)) == len(ids) == (total - total % world if train else total)
    if train:
        assert len(set(counts)) == 1
    else:
        assert torch.equal(ids, torch.arange(total, dtype=torch.int32))


def test_datamodule_serves_resident_batches(tmp_path):
    d = make_prepared(tmp_path / "d", [500, 300], row_group=100)
    dm = CTRDataModule(str(d), batch_size=64, num_workers=0, device_cache=True, seed=2)
    tl = dm.train_dataloader()
    assert isinstance(tl, DeviceBatches) and len(tl) == 13
    assert sorted(torch.cat([x[:, 0] for x, _ in tl]).tolist()) == list(range(800))
    assert dm.train_dataloader().split is tl.split  # loaded once
    dm.teardown("fit")
    assert not dm._resident


def test_short_fit_with_device_cache_matches_stream_step_count(criteo_dir, tmp_path):
    """A Lightning fit with the resident split makes as many optimizer steps per epoch as the streaming loader, and
    validates every validation row."""
    import lightning as L

    from recscale.models import backbones as bb
    from recscale.models.module import CTRModel

    steps, val_rows = {}, {}
    for cache in (False, True):
        dm = CTRDataModule(str(criteo_dir), batch_size=700, num_workers=0, device_cache=cache)
        model = CTRModel(lambda f, d, m: bb.DNN(f, d, m, hidden=[16]), field_dims=dm.field_dims)
        seen = {"val": 0}

        class Count(L.Callback):
            def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
                seen["val"] += len(batch[1])

        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Count()],
                            default_root_dir=tmp_path)
        trainer.fit(model, datamodule=dm)
        assert torch.isfinite(trainer.callback_metrics["val/auc"])
        steps[cache], val_rows[cache] = trainer.global_step, seen["val"]
    assert steps[True] == steps[False] > 0
    assert val_rows[True] == val_rows[False] == 1000  # the sample's valid split, every row once


def test_clear_error_when_the_split_does_not_fit(tmp_path, monkeypatch, capsys):
    d = make_prepared(tmp_path / "d", [500, 300], row_group=100)
    dm = CTRDataModule(str(d), batch_size=64, num_workers=0, device_cache=True)
    monkeypatch.setattr(dmod, "free_bytes", lambda device: 1000)
    with pytest.raises(DeviceCacheError, match=r"train split's share of rank 0 \(800 rows x 3 fields\) needs 0\.00 GiB "
                                               r"on cpu, but only 0\.00 GiB is free .*--data\.device_cache false"):
        dm.train_dataloader()
    monkeypatch.undo()
    assert dmod.free_bytes(torch.device("cpu")) > 0  # the real probe reads the host's available memory


def test_cli_reports_the_shortfall_in_one_line(criteo_dir, tmp_path, monkeypatch, capsys):
    from recscale.train import cli_main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dmod, "free_bytes", lambda device: 10_000)
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--model.backbone=recscale.models.DNN", f"--data.data_dir={criteo_dir}",
                  "--data.device_cache=true", "--data.num_workers=0", "--trainer.max_epochs=1",
                  "--trainer.enable_progress_bar=false", "--trainer.logger=false"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("recscale: error: data.device_cache:") and "GiB" in err and "--data.device_cache false" in err


@pytest.mark.slow  # two CPU processes, ~1-2 min on the loaded 2-core machine
def test_ddp_ranks_hold_their_share_and_step_together(criteo_dir, tmp_path):
    """A real 2-process DDP fit (CPU, gloo) with the device cache: both ranks make the same number of optimizer steps,
    and together they train on every one of the sample's 8,000 training rows once per epoch."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "RECSCALE_TEST_OUT": str(tmp_path / "steps")}
    p = subprocess.run([sys.executable, "-m", "recscale", "fit", f"--config={ROOT / 'configs/dnn.yaml'}",
                        f"--data.data_dir={criteo_dir}", "--data.batch_size=256", "--data.device_cache=true",
                        "--data.num_workers=0", "--trainer.strategy=ddp", "--trainer.devices=2",
                        "--trainer.accelerator=cpu", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
                        "--trainer.callbacks+=helpers.StepRecorder", "--test_after_fit=false"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((tmp_path / "steps" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == ranks[0]["batches"] == ranks[1]["batches"]
    assert ranks[0]["rows"] + ranks[1]["rows"] == 2 * 8000  # every training row once per epoch
    assert ranks[0]["batches"] == 2 * -(-4000 // 256)
