"""The grid on SLURM (recscale.slurm) and signals in `fit` (recscale.signals).

The SLURM tests run against a real one-node cluster (`make slurm-up`, which .ci/run starts): they submit through
`recscale grid --launcher slurm` and wait for SLURM. Without a cluster they skip, saying why; the option parsing, the
dry run, the status from MLflow and the signal handling of `fit` run everywhere.
"""

import csv
import json
import os
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

from recscale.slurm import SlurmError, SlurmOptions, parse_sbatch, parse_time

FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--data.batch_size=512", "--data.num_workers=0",
        "--trainer.enable_progress_bar=false", "--diagnostics.figures=false", "--diagnostics.sample_rows=300"]
CPU_CELL = ["--launcher", "slurm", "--slurm-gpus-per-cell", "0", "--slurm-cpus-per-cell", "1", "--slurm-time", "30"]


def slurm_down_reason() -> str | None:
    """None when a SLURM cluster answers and has a usable node, else why not."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "no SLURM client commands (sbatch, scontrol) on PATH: start the test cluster with `make slurm-up` (root)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        nodes = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "slurmctld does not answer within 20 s"
    if "UP" not in ping.stdout:
        said = (ping.stdout + ping.stderr).strip().splitlines()
        return f"slurmctld is not up ({said[0] if said else 'no answer'}): `make slurm-up` (root)"
    if not {"idle", "mix", "alloc", "comp"} & set(nodes.stdout.split()):
        return f"no usable SLURM node (sinfo states: {nodes.stdout.split()}): see `make slurm-up`"
    return None


SLURM_DOWN = slurm_down_reason()
needs_slurm = pytest.mark.skipif(SLURM_DOWN is not None, reason=str(SLURM_DOWN))


def grid(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the jobs run this checkout's recscale (sbatch exports the env)
    return subprocess.run([sys.executable, "-m", "recscale", "grid", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, **kw)


@pytest.fixture
def sample_cwd(criteo_dir, tmp_path):
    """A working directory where configs/data/criteo_sample.yaml's data_dir (prepared/criteo_sample) is the sample."""
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "criteo_sample").symlink_to(criteo_dir)
    return tmp_path


# ------------------------------------------------------------------------------------------------- options, dry run
def test_slurm_time_formats():
    assert parse_time("90") == 90
    assert parse_time("1:30") == 2  # 1 min 30 s, rounded up
    assert parse_time("24:00:00") == 24 * 60
    assert parse_time("2-00") == 2 * 24 * 60
    assert parse_time("1-02:03") == 26 * 60 + 3
    assert parse_time("0-00:00:30") == 1
    for bad in ("", "1h", "0", "-1", "1:2:3:4"):
        with pytest.raises(SlurmError, match="--slurm-time"):
            parse_time(bad)


def test_sbatch_pass_through_and_parameters():
    assert parse_sbatch(["qos=high", "--account=proj", "exclusive", "mail_type=END"]) == {
        "qos": "high", "account": "proj", "exclusive": True, "mail-type": "END"}
    with pytest.raises(SlurmError, match="qos high"):
        parse_sbatch(["qos high"])
    p = SlurmOptions(partition="gpu", time="2:00:00", gpus_per_cell=4, cpus_per_cell=32, mem="200G",
                     array_parallelism=10, sbatch={"qos": "high"}).sbatch_parameters("recscale-icml24")
    assert p["time"] == 120 and p["gpus_per_node"] == 4 and p["ntasks_per_node"] == 4 and p["cpus_per_task"] == 8
    assert p["additional_parameters"] == {"signal": "USR1@120", "requeue": True, "mem": "200G", "qos": "high"}
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in p["setup"]
    assert SlurmOptions(gpus_per_cell=4).fit_overrides() == [
        "--trainer.devices=4", "--trainer.strategy=ddp", "--trainer.num_nodes=1"]
    assert SlurmOptions(gpus_per_cell=1).fit_overrides() == []
    cpu = SlurmOptions(gpus_per_cell=0, cpus_per_cell=2).sbatch_parameters("x")
    assert "gpus_per_node" not in cpu and "ntasks_per_node" not in cpu


def test_dry_run_lists_the_array_without_slurm(tmp_path):
    p = grid(["icml24", "--models", "dnn", "--scales", "1,10", "--seeds", "0", "--dry-run", "--launcher", "slurm",
              "--slurm-partition", "gpu", "--slurm-time", "1-00:00:00", "--slurm-mem", "64G",
              "--slurm-sbatch", "qos=high", "--tracking-uri", f"sqlite:///{tmp_path / 'dry.db'}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "3 to submit as one SLURM job array (dry run)" in p.stdout
    assert "submit criteo-dnn-me10x-seed0" in p.stdout
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --partition=gpu", "#SBATCH --time=1440", "#SBATCH --mem=64G",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --qos=high"):
        assert line in p.stdout, line
    assert not (tmp_path / "outputs").exists()  # nothing submitted, nothing written


def test_bad_slurm_option_is_one_clear_line(tmp_path):
    p = grid(["icml24", "--models", "dnn", "--scales", "1", "--seeds", "0", "--dry-run", "--launcher", "slurm",
              "--slurm-time", "1h", "--tracking-uri", f"sqlite:///{tmp_path / 'dry.db'}"], tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("recscale grid: error: --slurm-time '1h'")


def test_status_from_mlflow_without_slurm(tmp_path):
    """Counts come from the runs' config_hash tags: FINISHED -> finished, only FAILED -> failed, none -> not
    submitted."""
    from recscale.grid import icml24_cells
    from recscale.slurm import resolve, status

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cells = icml24_cells("criteo", ["dnn"], ["SE", "ME"], [2], [0])  # 2 cells
    client = MlflowClient(uri)
    exp = client.create_experiment("st")
    for cell, final in zip(cells, ("FINISHED", "FAILED")):
        run = client.create_run(exp, tags={"config_hash": resolve(cell, FAST)[0]})
        client.set_terminated(run.info.run_id, final)
    extra_cell = icml24_cells("criteo", ["dcnv2"], ["SE"], [1], [0])
    st = status(cells + extra_cell, FAST, uri, "st", str(tmp_path / "logs"))
    assert st["counts"] == {"finished": 1, "running": 0, "queued": 0, "failed": 1, "not submitted": 1}
    assert st["cells"][cells[1].name]["mlflow"] == ["FAILED"]


# ------------------------------------------------------------------------------------------------ signals in `fit`
def fit(data: Path, cwd: Path, store: str, extra: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    args = ["fit", f"--config={ROOT / 'configs/dnn.yaml'}", f"--data.data_dir={data}", "--data.batch_size=256",
            "--data.num_workers=0", "--trainer.enable_progress_bar=false", "--diagnostics.figures=false",
            "--diagnostics.sample_rows=300", *extra]
    return subprocess.run([sys.executable, "-m", "recscale", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


def only_run(store: str):
    c = MlflowClient(store)
    runs = c.search_runs([c.get_experiment_by_name("recscale").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return c, runs[0]


def test_sigterm_saves_last_ckpt_and_exits_nonzero(criteo_dir, tmp_path):
    """SIGTERM mid-epoch (what SLURM, timeout, docker stop send): last.ckpt at that step, exit 143, run not FINISHED.
    Before recscale.signals, Lightning's SIGTERMException exited 0 and left no checkpoint of the interrupted epoch."""
    store = f"sqlite:///{tmp_path / 'm.db'}"
    p = fit(criteo_dir, tmp_path, store, ["--trainer.max_epochs=2", "--trainer.limit_train_batches=8",
                                          "--trainer.callbacks+=helpers.SignalAt",
                                          "--trainer.callbacks.init_args.step=3",
                                          "--trainer.callbacks.init_args.name=SIGTERM"])
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
    last = list((tmp_path / "checkpoints").rglob("last.ckpt"))
    assert len(last) == 1
    ck = torch.load(last[0], weights_only=False, map_location="cpu")
    assert ck["global_step"] == 3 and ck["epoch"] == 0  # the step the signal arrived at, inside the first epoch
    msg = [ln for ln in p.stderr.splitlines() if ln.startswith("recscale: received SIGTERM")]
    assert msg and str(last[0]) in msg[0] and "--ckpt_path last" in msg[0]
    _, run = only_run(store)
    assert run.info.status == "FAILED" and "test/auc" not in run.data.metrics


@pytest.mark.slow
def test_sigusr1_stops_and_the_resumed_fit_continues_the_same_run(criteo_dir, tmp_path):
    """SIGUSR1 (SLURM's warning signal) -> exit 138 with last.ckpt; `--ckpt_path last` resumes mid-epoch into the
    same MLflow run, which ends FINISHED with one val/auc per epoch."""
    store = f"sqlite:///{tmp_path / 'm.db'}"
    args = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=6", "--trainer.callbacks+=helpers.SignalAt",
            "--trainer.callbacks.init_args.step=8", "--trainer.callbacks.init_args.name=SIGUSR1"]
    p = fit(criteo_dir, tmp_path, store, args)
    assert p.returncode == 128 + signal.SIGUSR1, p.stderr[-3000:]
    assert "received SIGUSR1 at global step 8 (epoch 1)" in p.stderr
    r = fit(criteo_dir, tmp_path, store, args + ["--ckpt_path=last"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming MLflow run" in r.stderr
    client, run = only_run(store)
    assert run.info.status == "FINISHED" and "test/auc" in run.data.metrics
    assert len({m.step for m in client.get_metric_history(run.info.run_id, "val/auc")}) == 2


@pytest.fixture(scope="module")
def uninterrupted_val_auc(criteo_dir, tmp_path_factory) -> dict[int, float]:
    """val/auc by step of the same 2-epoch fit, never stopped."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    store = f"sqlite:///{cwd / 'm.db'}"
    p = fit(criteo_dir, cwd, store, ["--trainer.max_epochs=2", "--trainer.limit_train_batches=6"])
    assert p.returncode == 0, p.stderr[-3000:]
    client, run = only_run(store)
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/auc")}


@pytest.mark.slow
@pytest.mark.parametrize("step,val_batch", [(3, -1), (6, -1), (6, 0)],
                         ids=["mid-epoch", "after-the-epochs-last-batch", "mid-validation"])
def test_a_stop_anywhere_in_the_epoch_resumes_and_validates_every_epoch(criteo_dir, tmp_path, step, val_batch,
                                                                        uninterrupted_val_auc):
    """SIGTERM mid-epoch, after the epoch's last training batch, or between validation batches (6 batches an epoch):
    the resumed fit finishes the run with one val/auc per epoch. A stop inside validation used to leave a checkpoint
    whose epoch Lightning counts as trained but not validated: the resumed fit skipped validation and EarlyStopping
    then failed on the missing val/auc (CI, the SLURM preemption test). A stop after the epoch's training resumes with
    the same weights, so its first val/auc is the uninterrupted run's: the whole validation set, each batch once."""
    store = f"sqlite:///{tmp_path / 'm.db'}"
    args = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=6", "--trainer.callbacks+=helpers.SignalAt",
            f"--trainer.callbacks.init_args.step={step}", f"--trainer.callbacks.init_args.val_batch={val_batch}"]
    p = fit(criteo_dir, tmp_path, store, args)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
    r = fit(criteo_dir, tmp_path, store, args + ["--ckpt_path=last"])
    assert r.returncode == 0, r.stderr[-3000:]
    client, run = only_run(store)
    assert run.info.status == "FINISHED" and "test/auc" in run.data.metrics
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/auc")}
    assert sorted(val) == sorted(uninterrupted_val_auc) == [5, 11]
    if step == 6:  # same process setup, same weights and rows: only summation order could differ, far below 1e-6
        assert val[5] == pytest.approx(uninterrupted_val_auc[5], abs=1e-6)


# ----------------------------------------------------------------------------------------------- a real SLURM cluster
def wait_until(pred, timeout: float, what: str, poll: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_state(job_id: str) -> tuple[str, str]:
    p = subprocess.run(["squeue", "-h", "-r", "-j", job_id.split("_")[0], "-o", "%i|%T|%r"], capture_output=True,
                       text=True)
    for line in p.stdout.split():
        jid, state, reason = line.split("|")
        if jid == job_id:
            return state, reason
    return "", ""


@needs_slurm
@pytest.mark.slurm
@pytest.mark.slow
def test_grid_on_slurm(sample_cwd):
    """2 models x SE/ME as one job array: one FINISHED run per cell with the SLURM ids as tags; a second submission
    submits nothing; --status counts them; the report reads them."""
    store = f"sqlite:///{sample_cwd / 'm.db'}"
    axes = ["icml24", "--dataset", "criteo_sample", "--models", "dnn,dcnv2", "--scales", "2", "--seeds", "0",
            "--experiment", "slurm", "--tracking-uri", store, *CPU_CELL]
    p = grid(axes + ["--wait", *FAST], sample_cwd, timeout=1200)
    logs = sample_cwd / "outputs" / "grid"
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:] + "".join(
        f.read_text()[-1500:] for f in logs.glob("*.log"))
    assert "4 to submit as one SLURM job array" in p.stdout and "4 finished, 0 not" in p.stdout
    manifest = [json.loads(line) for line in (logs / "slurm" / "submissions.jsonl").read_text().splitlines()]
    array = {m["job_id"].split("_")[0] for m in manifest}
    assert len(manifest) == 4 and len(array) == 1  # one job array
    client = MlflowClient(store)
    every = client.search_runs([client.get_experiment_by_name("slurm").experiment_id])
    parents = [r for r in every if r.data.tags.get("recscale.kind") == "grid"]
    runs = [r for r in every if r.data.tags.get("recscale.kind") != "grid"]
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert len(parents) == 1 and parents[0].data.tags["slurm_array_job_id"] == next(iter(array))  # the grid's parent run
    assert all(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in runs)
    assert {r.data.tags["config_hash"] for r in runs} == {m["config_hash"] for m in manifest}
    by_hash = {m["config_hash"]: m for m in manifest}
    for r in runs:
        m = by_hash[r.data.tags["config_hash"]]
        assert f"{r.data.tags['slurm_array_job_id']}_{r.data.tags['slurm_array_task_id']}" == m["job_id"]
        assert r.data.tags["slurm_job_id"].isdigit() and r.data.tags["slurm_restart_count"] == "0"
        assert r.info.run_name == m["cell"] and (logs / f"{m['cell']}.log").exists()
        assert "test/auc" in r.data.metrics
    again = grid(axes + FAST, sample_cwd, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "4 already FINISHED" in again.stdout and "0 to submit" in again.stdout and "submitted" not in again.stdout
    st = grid(axes + ["--status", *FAST], sample_cwd, timeout=600)
    assert "4 cells: 4 finished, 0 running, 0 queued, 0 failed, 0 not submitted" in st.stdout, st.stdout + st.stderr
    rep = subprocess.run([sys.executable, "-m", "recscale", "report", "--tracking-uri", store, "--experiment", "slurm",
                          "--dataset", "criteo", "--output", str(sample_cwd / "report")], cwd=sample_cwd,
                         capture_output=True, text=True, timeout=600)
    assert rep.returncode == 0, rep.stderr[-2000:]
    rows = {(r["model"], r["mode"], r["scale"]): r for r in csv.DictReader(open(sample_cwd / "report" /
                                                                                "icml24_table1.csv"))}
    assert all(rows[(m, mode, "2")]["n"] == "1" for m in ("DNN", "DCNv2") for mode in ("SE", "ME"))


@needs_slurm
@pytest.mark.slurm
@pytest.mark.slow
def test_cell_signalled_by_slurm_is_requeued_and_finishes_in_the_same_run(sample_cwd):
    """`scancel --signal=USR1` mid-run: the fit saves last.ckpt, submitit requeues the task, the requeued task resumes
    from last.ckpt into the same MLflow run, which ends FINISHED with every epoch."""
    EPOCHS = 15
    store = f"sqlite:///{sample_cwd / 'm.db'}"
    args = ["icml24", "--dataset", "criteo_sample", "--models", "dnn", "--modes", "SE", "--scales", "2", "--seeds",
            "1", "--experiment", "preempt", "--tracking-uri", store, *CPU_CELL,
            *[a for a in FAST if not a.startswith(("--trainer.max_epochs", "--trainer.limit_train_batches"))],
            # long enough that the signal sent after the first epoch lands mid-run on a fast idle machine too
            f"--trainer.max_epochs={EPOCHS}", "--trainer.limit_train_batches=6", "--early_stopping.patience=1000"]
    p = grid(args, sample_cwd, timeout=600)
    assert p.returncode == 0 and "submitted 1 cell(s)" in p.stdout, p.stdout + p.stderr
    logs = sample_cwd / "outputs" / "grid"
    rec = json.loads((logs / "slurm" / "submissions.jsonl").read_text().splitlines()[0])
    job, ckdir, log = rec["job_id"], sample_cwd / "checkpoints" / rec["config_hash"], Path(rec["log"])
    wait_until(lambda: (ckdir / "last.ckpt").exists() or not job_state(job)[0], 600, "the end of the first epoch")
    assert job_state(job)[0] == "RUNNING", log.read_text()[-3000:]
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    # SLURM keeps a requeued job pending for about 2 minutes (BeginTime): the killed attempt's job credential stays
    # revoked that long, and a requeued job forced to start earlier (scontrol update StartTime=now) is killed by slurmd
    # ("Job credential revoked"), so the test waits for SLURM like a real preemption does
    wait_until(lambda: job_state(job) == ("PENDING", "BeginTime") or "restart 1" in log.read_text(), 300,
               "the requeue")
    wait_until(lambda: not job_state(job)[0], 900, "the requeued cell to finish", poll=2)
    text = log.read_text()
    assert "received SIGUSR1" in text and "(restart 1)" in text and "resuming MLflow run" in text, text[-4000:]
    client = MlflowClient(store)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("preempt").experiment_id])
            if r.data.tags.get("recscale.kind") != "grid"]  # the cell's run, not the grid's parent run
    assert len(runs) == 1, "the requeued cell continued its run instead of starting another"
    run = runs[0]
    assert run.info.status == "FINISHED", text[-4000:]
    assert run.info.run_id == json.loads((ckdir / "mlflow_run.json").read_text())["run_id"]
    assert run.data.tags["slurm_restart_count"] == "1" and run.data.tags["slurm_job_id"].isdigit()
    assert len({m.step for m in client.get_metric_history(run.info.run_id, "val/auc")}) == EPOCHS
    st = grid(args + ["--status"], sample_cwd, timeout=600)
    assert "1 cells: 1 finished" in st.stdout, st.stdout + st.stderr
