"""DDP on CPU processes (gloo), resume after SIGKILL, non-finite loss, and kills during checkpoint saves."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from mlflow.tracking import MlflowClient

from recscale.checkpointing import AtomicCheckpointIO


def recscale(args, tmp, store, extra_env=None, **kw):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT / "tests"),
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
    args = base_args(criteo_dir) + ["--trainer.max_epochs=4", "--data.batch_size=128", "--seed_everything=7"]
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir(), kill_dir.mkdir()
    ref_store, kill_store = f"sqlite:///{ref_dir / 'm.db'}", f"sqlite:///{kill_dir / 'm.db'}"
    p = recscale(args, ref_dir, ref_store, timeout=400)
    assert p.returncode == 0, p.stderr[-2000:]
    ref = _final_test_auc(ref_store)

    env = {**os.environ, "MLFLOW_TRACKING_URI": kill_store}
    proc = subprocess.Popen([sys.executable, "-m", "recscale", *args], cwd=kill_dir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((kill_dir / "checkpoints").rglob("last.ckpt")):
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.1, 0.8))  # somewhere in a later epoch
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = recscale(args + ["--ckpt_path=last"], kill_dir, kill_store, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming MLflow run" in r.stderr
    resumed = _final_test_auc(kill_store)  # still exactly one run
    assert resumed.info.run_id == json.loads(next((kill_dir / "checkpoints").rglob("mlflow_run.json")).read_text())["run_id"]
    assert resumed.data.metrics["test/auc"] == pytest.approx(ref.data.metrics["test/auc"], abs=1e-6)
    assert resumed.data.metrics["test/logloss"] == pytest.approx(ref.data.metrics["test/logloss"], abs=1e-6)
    c = MlflowClient(kill_store)
    steps_resumed = sorted({h.step for h in c.get_metric_history(resumed.info.run_id, "val/auc")})
    steps_ref = sorted({h.step for h in MlflowClient(ref_store).get_metric_history(ref.info.run_id, "val/auc")})
    assert steps_resumed == steps_ref  # metrics continue at the right steps


def test_non_finite_loss_stops_with_the_step(criteo_dir, tmp_path):
    store = f"sqlite:///{tmp_path / 'm.db'}"
    p = recscale(base_args(criteo_dir) + ["--trainer.max_epochs=3", "--model.lr=1e30"], tmp_path, store, timeout=300)
    assert p.returncode == 3, p.stderr[-2000:]
    msg = p.stderr.strip().splitlines()[-1]
    assert "non-finite training loss" in msg and "global step" in msg and "--ckpt_path last" in msg


def test_kill_during_checkpoint_save_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.ckpt"
    script = f"""
import torch, sys
from recscale.checkpointing import AtomicCheckpointIO
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


def test_atomic_save_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "x.ckpt"
    io.save_checkpoint({"v": 1}, path)

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        io.save_checkpoint({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]
