"""The grid runner against a real `mlflow server` on loopback, re-runs that skip finished cells, the report, and a
tracking server that is down at start or dies mid-run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from mlflow.tracking import MlflowClient

from recscale.grid import Cell, cell_hash, icml24_cells, run_grid

FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--data.batch_size=512", "--data.num_workers=0",
        "--trainer.enable_progress_bar=false", "--diagnostics.figures=false", "--diagnostics.sample_rows=300"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, port: int) -> subprocess.Popen:
    (tmp / "art").mkdir(exist_ok=True)
    p = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                          f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "art"),
                          "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    import urllib.request

    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return p
        except OSError:
            time.sleep(0.3)
    stop_server(p)
    raise RuntimeError("mlflow server did not start")


def stop_server(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    p = start_server(tmp, port)
    yield f"http://127.0.0.1:{port}"
    stop_server(p)


@pytest.fixture
def sample_data_config(criteo_dir, tmp_path, monkeypatch):
    """A configs/data-style file pointing at the prepared sample (the grid takes data configs by name)."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "sample.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"data_dir": str(criteo_dir)}}))
    return cfg


def tiny_grid(data_cfg: Path) -> list[Cell]:
    cells = icml24_cells("criteo_sample", ["dnn", "dcnv2"], ["SE", "ME"], [2], [0])
    for c in cells:
        c.configs[-1] = str(data_cfg)
    return cells


def test_grid_cells_and_dry_run(tmp_path):
    cells = icml24_cells("criteo", ["dnn", "dcnv2"], ["SE", "ME"], [1, 2, 10], [0, 1])
    # 1x is shared by SE and ME: 2 models x (1 + 2 modes x 2 scales) x 2 seeds
    assert len(cells) == 2 * (1 + 4) * 2
    assert len({c.name for c in cells}) == len(cells)
    p = subprocess.run([sys.executable, "-m", "recscale", "grid", "icml24", "--models", "dnn", "--scales", "1,10",
                        "--seeds", "0", "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path / 'dry.db'}"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "3 to run (dry run)" in p.stdout and "criteo-dnn-me10x-seed0" in p.stdout


def test_make_grid_dry_run_passes_the_axes(tmp_path):
    p = subprocess.run(["make", "-s", "-j", "3", "grid", "DRY_RUN=1", "MODELS=dcnv2", "SCALES=1,10", "SEEDS=1",
                        "MODES=ME", f"VENV={Path(sys.executable).parent.parent}"],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'dry.db'}"})
    assert p.returncode == 0, p.stderr
    assert "2 to run (dry run)" in p.stdout
    assert "criteo-dcnv2-se1x-seed1" in p.stdout and "criteo-dcnv2-me10x-seed1" in p.stdout
    assert "3 at a time" in p.stdout  # make -j 3 reaches the runner


def test_config_hash_is_stable_and_matches_the_run_tag(sample_data_config, tmp_path):
    cell = tiny_grid(sample_data_config)[0]
    assert cell_hash(cell, FAST) == cell_hash(cell, FAST)
    assert cell_hash(cell, FAST) != cell_hash(cell, FAST + ["--model.lr=0.01"])
    assert cell_hash(cell, FAST) == cell_hash(cell, FAST + ["--ckpt_path=last"])  # resuming is the same experiment


def test_tiny_grid_against_a_real_server(server, sample_data_config, tmp_path):
    cells = tiny_grid(sample_data_config)
    assert len(cells) == 4
    res = run_grid(cells, FAST, jobs=2, tracking_uri=server, experiment="tiny", log_dir=str(tmp_path / "logs"))
    assert res["failed"] == [] and res["ran"] == 4, [p.read_text()[-1500:] for p in (tmp_path / "logs").iterdir()]
    client = MlflowClient(server)
    every = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    runs = [r for r in every if r.data.tags.get("recscale.kind") != "grid"]
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    # one parent run for the invocation, the cells its children
    parent = client.get_run(res["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("grid-icml24-criteo_sample-")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {res["parent_run_id"]}
    assert {r.info.run_name for r in runs} == {c.name for c in cells}
    assert {r.data.tags["config_hash"] for r in runs} == {cell_hash(c, FAST) for c in cells}
    assert all("test/auc" in r.data.metrics and "diag/ia/mean" in r.data.metrics for r in runs)
    assert {r.data.tags["grid"] for r in runs} == {"icml24"}
    # a second invocation runs nothing
    again = run_grid(cells, FAST, jobs=2, tracking_uri=server, experiment="tiny", log_dir=str(tmp_path / "logs"))
    assert again["ran"] == 0 and again["skipped"] == 4
    # the report built from the server's runs
    from recscale.report import build_report

    rep = build_report(server, "tiny", "criteo", str(tmp_path / "report"))
    rows = {(r["model"], r["mode"], r["scale"]): r for r in
            __import__("csv").DictReader(open(tmp_path / "report" / "icml24_table1.csv"))}
    assert rows[("DNN", "SE", "2")]["n"] == "1" and rows[("DCNv2", "ME", "2")]["n"] == "1"
    assert float(rows[("DCNv2", "ME", "2")]["published_mean"]) == 0.81348
    assert rows[("DNN", "SE", "4")]["auc_mean"] == ""  # missing, never zero
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| DCNv2 | ME | 2x | 1 |" in md and "—" in md and "0.81348 ± 0.00005" in md
    assert (tmp_path / "report" / "scalability.png").exists()
    arts = {a.path for a in client.list_artifacts(rep["summary_run_id"])}
    assert "report.md" in arts and "icml24_table1.csv" in arts


def test_a_failed_cell_is_rerun(sample_data_config, tmp_path):
    store = f"sqlite:///{tmp_path / 'm.db'}"
    cell = tiny_grid(sample_data_config)[0]
    bad = run_grid([cell], FAST + ["--model.lr=1e30"], tracking_uri=store, experiment="f", log_dir=str(tmp_path / "l"))
    assert bad["failed"] == [cell.name]
    client = MlflowClient(store)
    parent = client.get_run(bad["parent_run_id"])
    assert parent.info.status == "FAILED" and parent.data.tags["failed_cells"] == cell.name
    (child,) = [r for r in client.search_runs([parent.info.experiment_id]) if r.info.run_id != parent.info.run_id]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    again = run_grid([cell], FAST + ["--model.lr=1e30"], tracking_uri=store, experiment="f", log_dir=str(tmp_path / "l"),
                     dry_run=True)
    assert again["skipped"] == 0  # FAILED runs do not count as done


def test_server_down_at_start_fails_fast(criteo_dir, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "recscale", "fit", f"--config={ROOT / 'configs/dnn.yaml'}",
                        f"--data.data_dir={criteo_dir}", *FAST], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=120)
    assert p.returncode == 2
    assert time.time() - t < 30
    last = p.stderr.strip().splitlines()[-1]
    assert uri in last and "unreachable" in last and "make mlflow" in last
    assert not (tmp_path / "checkpoints").exists()


def test_server_killed_mid_run_does_not_stop_training(criteo_dir, tmp_path):
    port = free_port()
    (tmp_path / "srv").mkdir()
    srv = start_server(tmp_path / "srv", port)
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "recscale", "fit", f"--config={ROOT / 'configs/dnn.yaml'}",
                             f"--data.data_dir={criteo_dir}", "--trainer.max_epochs=3", "--data.batch_size=256",
                             "--data.num_workers=0", "--trainer.enable_progress_bar=false",
                             "--diagnostics.sample_rows=300", "--trainer.logger.init_args.retry_seconds=1"],
                            cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "checkpoints").rglob("last.ckpt")):
        time.sleep(0.1)
    stop_server(srv)  # the server dies after the first epoch
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "unreachable" in err and "metrics are buffered" in err
    unsent = list((tmp_path / "checkpoints").rglob("unsent-metrics-*.jsonl"))
    assert unsent, err[-2000:]
    records = [json.loads(line) for line in unsent[0].read_text().splitlines()]
    assert any("val/auc" in r["metrics"] for r in records) and any("test/auc" in r["metrics"] for r in records)
    assert list((tmp_path / "checkpoints").rglob("best-*.ckpt"))  # training finished with its checkpoints


def test_docker_compose_file_structure():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    svc = compose["services"]
    assert set(svc) == {"postgres", "mlflow"}
    cmd = svc["mlflow"]["command"]
    assert cmd[:2] == ["mlflow", "server"]
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith("postgresql://mlflow:")
    assert cmd[cmd.index("--artifacts-destination") + 1] == "/artifacts"
    assert "artifacts:/artifacts" in svc["mlflow"]["volumes"] and "pgdata" in compose["volumes"]
    assert svc["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    dockerfile = (ROOT / "docker" / svc["mlflow"]["build"]["dockerfile"]).read_text()
    import mlflow

    assert f"MLFLOW_VERSION={mlflow.__version__}" in dockerfile and "psycopg2" in dockerfile
