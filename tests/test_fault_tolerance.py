"""DDP on CPU processes (gloo), resume after SIGKILL, non-finite loss, and kills during checkpoint saves."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from mlflow.tracking import MlflowClient

from recscale.checkpointing import AtomicCheckpointIO, CheckpointWriteError


def recscale(args, tmp, store, extra_env=None, **kw):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
           "RECSCALE_TEST_OUT": str(tmp / "steps"), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "recscale", *args], cwd=tmp, env=env, capture_output=True,
                          text=True, **kw)


def base_args(data):
    return ["fit", f"--config={ROOT / 'configs/dnn.yaml'}", f"--data.data_dir={data}", "--data.batch_size=256",
            "--data.num_workers=0", "--trainer.enable_progress_bar=false", "--diagnostics.figures=false",
            "--diagnostics.sample_rows=500"]


def runs(store):
    c = MlflowClient(store)
    exp = c.get_experiment_by_name("recscale")
    return c, (c.search_runs([exp.experiment_id]) if exp else [])


def test_ddp_two_cpu_processes(criteo_dir, tmp_path):
    store = f"sqlite:///{tmp_path / 'm.db'}"
    p = recscale(base_args(criteo_dir) + ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
                                          "--trainer.max_epochs=2", "--trainer.callbacks+=helpers.StepRecorder",
                                          "--keep_local_best=true"],
                 tmp_path, store, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((tmp_path / "steps" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == ranks[0]["batches"] == ranks[1]["batches"]
    assert ranks[0]["rows"] + ranks[1]["rows"] == 2 * 8000  # 2 epochs, every training row once per epoch
    assert ranks[0]["batches"] == 2 * -(-4000 // 256)
    client, rs = runs(store)
    assert len(rs) == 1, "one job makes exactly one MLflow run"
    run = rs[0]
    hist = client.get_metric_history(run.info.run_id, "val/auc")
    assert len(hist) == 2
    # validation AUC over the whole split across ranks == a single-process evaluation of the saved best checkpoint
    best = max(hist, key=lambda h: h.value)
    ckpt = next((tmp_path / "checkpoints").rglob("best-*.ckpt"))
    v = recscale(["validate", f"--config={ROOT / 'configs/dnn.yaml'}", f"--data.data_dir={criteo_dir}",
                  "--data.num_workers=0", f"--ckpt_path={ckpt}", "--trainer.logger=false"], tmp_path, store,
                 timeout=200)
    assert v.returncode == 0, v.stderr[-2000:]
    single = float(v.stdout.split("val/auc")[1].split()[0])
    assert single == pytest.approx(best.value, abs=1e-6)
    assert "test/auc" in run.data.metrics


def _final_test_auc(store):
    _, rs = runs(store)
    assert len(rs) == 1
    return rs[0]


def test_resume_after_sigkill_matches_uninterrupted_run(criteo_dir, tmp_path):
    """Killed in epoch 2 after two epochs that did not improve the monitored value, a fit resumed with
    ``--ckpt_path last`` redoes only the killed epoch's batches and ends exactly like an uninterrupted run.

    ``--checkpoint.monitor=epoch --checkpoint.mode=min`` makes epoch 0 the best and every later epoch non-improving,
    deterministically (val/auc may or may not improve on a given CPU)."""
    steps_per_epoch = 8  # a prefix of each epoch's shuffled batches keeps the test small
    args = base_args(criteo_dir) + ["--trainer.max_epochs=4", "--data.batch_size=128", "--seed_everything=7",
                                    f"--trainer.limit_train_batches={steps_per_epoch}",
                                    "--diagnostics.gradient_rankme=false",
                                    "--checkpoint.monitor=epoch", "--checkpoint.mode=min",
                                    "--trainer.callbacks+=helpers.Faults"]
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir(), kill_dir.mkdir()
    ref_store, kill_store = f"sqlite:///{ref_dir / 'm.db'}", f"sqlite:///{kill_dir / 'm.db'}"
    p = recscale(args, ref_dir, ref_store, timeout=400)
    assert p.returncode == 0, p.stderr[-2000:]
    ref = _final_test_auc(ref_store)

    k = recscale(args, kill_dir, kill_store, {"RECSCALE_KILL_AT": "2:3"}, timeout=400)  # SIGKILLs itself
    assert k.returncode == -signal.SIGKILL, k.stderr[-2000:]
    last = next((kill_dir / "checkpoints").rglob("last.ckpt"))
    assert torch.load(last, weights_only=False)["epoch"] == 1, "last.ckpt must hold the latest completed epoch"
    r = recscale(args + ["--ckpt_path=last"], kill_dir, kill_store, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming MLflow run" in r.stderr
    start = json.loads((kill_dir / "steps" / "start.json").read_text())
    # work redone: only the 3 batches of epoch 2 that ran before the kill
    assert (start["epoch"], start["batch"], start["global_step"]) == (2, 0, 2 * steps_per_epoch)
    resumed = _final_test_auc(kill_store)  # still exactly one run
    assert resumed.info.run_id == json.loads(next((kill_dir / "checkpoints").rglob("mlflow_run.json")).read_text())["run_id"]
    assert resumed.data.metrics["test/auc"] == pytest.approx(ref.data.metrics["test/auc"], abs=1e-6)
    assert resumed.data.metrics["test/logloss"] == pytest.approx(ref.data.metrics["test/logloss"], abs=1e-6)
    c = MlflowClient(kill_store)
    steps_resumed = sorted({h.step for h in c.get_metric_history(resumed.info.run_id, "val/auc")})
    steps_ref = sorted({h.step for h in MlflowClient(ref_store).get_metric_history(ref.info.run_id, "val/auc")})
    assert steps_resumed == steps_ref  # metrics continue at the right steps


def test_last_checkpoint_holds_the_latest_epoch_without_improvement(tmp_path):
    """Lightning's ModelCheckpoint refreshes last.ckpt only with a top-k save; EpochCheckpoint after every epoch."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from recscale.checkpointing import EpochCheckpoint

    class Worse(BoringModel):  # the monitored value gets worse every epoch: only epoch 0 is ever the best
        def validation_step(self, batch, batch_idx):
            self.log("v", float(self.current_epoch))
            return super().validation_step(batch, batch_idx)

    ck = EpochCheckpoint(dirpath=tmp_path, monitor="v", mode="min", save_top_k=1, save_last=True)
    t = L.Trainer(max_epochs=3, callbacks=[ck], limit_train_batches=2, limit_val_batches=1, logger=False,
                  enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    t.fit(Worse())
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == 2
    assert torch.load(ck.best_model_path, weights_only=False)["epoch"] == 0
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == sorted(["last.ckpt", Path(ck.best_model_path).name])


def test_non_finite_loss_stops_with_the_step(criteo_dir, tmp_path):
    store = f"sqlite:///{tmp_path / 'm.db'}"
    p = recscale(base_args(criteo_dir) + ["--trainer.max_epochs=3", "--model.lr=1e30"], tmp_path, store, timeout=300)
    assert p.returncode == 3, p.stderr[-2000:]
    msg = p.stderr.strip().splitlines()[-1]
    assert "non-finite training loss" in msg and "global step" in msg
    assert "no epoch had finished" in msg and "start again" in msg and "--ckpt_path" not in msg


def test_device_side_nonfinite_record_reports_the_first_bad_step(monkeypatch):
    """The accelerator path of the non-finite check (CTRModel._record_nonfinite / _check_nonfinite, device-agnostic
    tensor code, run here on CPU tensors): finite losses leave nothing, the first non-finite step and its loss are
    kept however many follow, and the check raises the same message as the per-step check on the CPU."""
    from recscale.models import backbones as bb
    from recscale.models.module import CTRModel

    m = CTRModel(lambda f, d, s: bb.DNN(f, d, s, hidden=[4]), field_dims=[3, 4])
    step = {"n": 0}
    monkeypatch.setattr(CTRModel, "global_step", property(lambda self: step["n"]))  # no trainer attached
    for n, v in enumerate([0.7, 0.6, float("inf"), float("nan"), 0.5]):
        step["n"] = 10 + n
        m._record_nonfinite(torch.tensor(v))
        if n == 1:
            m._check_nonfinite()  # all finite so far: no error
    with pytest.raises(FloatingPointError, match=r"non-finite training loss inf at global step 12$"):
        m._check_nonfinite()
    m._check_nonfinite()  # reported once


def test_sigterm_after_a_deferred_nonfinite_step_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """SIGTERM on an accelerator, within the steps before the deferred non-finite check is read: GracefulStop reads it
    first and does not overwrite last.ckpt with weights a NaN step reached (it says so); without a recorded NaN it
    saves as before."""
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from recscale.models import backbones as bb
    from recscale.models.module import CTRModel
    from recscale.signals import GracefulStop

    model = CTRModel(lambda f, d, s: bb.DNN(f, d, s, hidden=[4]), field_dims=[3, 4])
    monkeypatch.setattr(CTRModel, "global_step", property(lambda self: 7))
    saved = []
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), validating=False, checkpoint_callback=None,
                              default_root_dir=str(tmp_path), save_checkpoint=saved.append, is_global_zero=True,
                              global_step=7, current_epoch=0)
    stop = GracefulStop()
    stop.signum = signal.SIGTERM
    model._record_nonfinite(torch.tensor(float("nan")))
    stop.on_exception(trainer, model, SIGTERMException())
    assert saved == [] and "last.ckpt not refreshed: non-finite training loss nan at global step 7" in capsys.readouterr().err
    stop.on_exception(trainer, model, SIGTERMException())  # nothing recorded any more: saves
    assert saved == [tmp_path / "checkpoints" / "last.ckpt"]


def test_nan_advice_as_printed_continues_from_the_last_good_epoch(criteo_dir, tmp_path):
    """The NaN stop after a finished epoch names a checkpoint; following the advice literally (lower --model.lr, then
    --ckpt_path as printed) continues from that epoch with the new lr, in a new run that records where it came from."""
    steps = 5
    args = base_args(criteo_dir) + ["--trainer.max_epochs=2", f"--trainer.limit_train_batches={steps}",
                                    "--data.batch_size=512", "--trainer.callbacks+=helpers.Faults",
                                    "--diagnostics.gradient_rankme=false"]
    store = f"sqlite:///{tmp_path / 'm.db'}"
    p = recscale(args + ["--model.lr=0.001"], tmp_path, store, {"RECSCALE_NAN_AT": "1:2"}, timeout=300)
    assert p.returncode == 3, p.stderr[-2000:]
    msg = p.stderr.strip().splitlines()[-1]
    assert "lower --model.lr" in msg, msg
    ckpt = re.search(r"--ckpt_path (\S+?\.ckpt)", msg).group(1)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 0
    first_run = json.loads((Path(ckpt).parent / "mlflow_run.json").read_text())["run_id"]

    r = recscale(args + ["--model.lr=0.0005", f"--ckpt_path={ckpt}"], tmp_path, store, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"continuing from checkpoint {ckpt} (epoch 0" in r.stderr and "model.lr: 0.001 -> 0.0005" in r.stderr, \
        (msg, r.stderr[-6000:])
    start = json.loads((tmp_path / "steps" / "start.json").read_text())
    assert (start["epoch"], start["global_step"]) == (1, steps)  # nothing of epoch 0 redone
    assert start["lr"] == 0.0005  # the new lr is in effect, not the checkpoint's
    client, rs = runs(store)
    new = [x for x in rs if x.info.run_id != first_run]
    assert len(rs) == 2 and len(new) == 1 and new[0].info.status == "FINISHED"
    tags = new[0].data.tags
    assert tags["resumed_from_run"] == first_run and tags["resumed_from_checkpoint"] == str(Path(ckpt).resolve())
    assert "model.lr: 0.001 -> 0.0005" in tags["config_changes"]
    assert len(client.get_metric_history(new[0].info.run_id, "val/auc")) == 1  # only epoch 1 ran in the new run


def test_kill_during_checkpoint_save_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.ckpt"
    script = f"""
import torch, sys
from recscale.checkpointing import AtomicCheckpointIO, CheckpointWriteError
io = AtomicCheckpointIO()
io.save_checkpoint({{"version": 1, "w": torch.ones(3)}}, {str(path)!r})
print("saved", flush=True)
io.save_checkpoint({{"version": 2, "w": torch.ones(400_000_000)}}, {str(path)!r})
print("second", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "saved"
    time.sleep(1.0)  # inside the 1.6 GB write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = torch.load(path, weights_only=False)
    assert ck["version"] == 1 and torch.equal(ck["w"], torch.ones(3))


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 750592")])
def test_atomic_save_failure_leaves_no_partial_file(tmp_path, monkeypatch, error):
    """A full disk while saving (torch reports it as OSError or as its zip writer's RuntimeError): one message naming
    the file, the free space and the fix; the previous checkpoint stays usable and no partial file is left."""
    io = AtomicCheckpointIO()
    path = tmp_path / "x.ckpt"
    io.save_checkpoint({"v": 1}, path)

    def boom(obj, f):
        f.write(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", boom)
    if isinstance(error, RuntimeError):  # torch's variant says nothing about space: the free space decides
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 1 << 20))
    with pytest.raises(CheckpointWriteError) as e:
        io.save_checkpoint({"v": 2}, path)
    monkeypatch.undo()
    msg = str(e.value)
    assert f"could not save checkpoint {path}: the disk is full" in msg and "the previous x.ckpt is unchanged" in msg
    assert "--trainer.default_root_dir" in msg and "--ckpt_path last" in msg and "\n" not in msg
    assert torch.load(path, weights_only=False) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]
