"""`recscale fit` end to end: every config runs on the bundled sample; a real MLflow run is written and read back."""

from pathlib import Path

import mlflow
import pytest
from conftest import ROOT, run_cli
from mlflow.tracking import MlflowClient

from recscale.train import cli_main

CONFIGS = ROOT / "configs"
TOP = sorted(CONFIGS.glob("*.yaml"))
MODELS = sorted((CONFIGS / "model").glob("*.yaml"))
SCALES = sorted((CONFIGS / "scale").glob("*.yaml"))
DATA = sorted((CONFIGS / "data").glob("*.yaml"))


def fit(*args: str, data_dir: Path, extra=()):
    return cli_main(["fit", *args, f"--data.data_dir={data_dir}", "--data.batch_size=512", "--data.num_workers=0",
                     "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra])


def test_config_inventory():
    names = {p.stem for p in TOP}
    assert {"dnn", "ipnn", "nfwfm", "xdeepfm", "dcnv2", "finalmlp", "dcnv2_me10x", "dcnv2_se10x"} <= names
    assert {p.stem for p in SCALES} == {f"{m}{k}x" for m in ("se", "me") for k in (1, 2, 3, 4, 10)}
    assert len(MODELS) >= 17


@pytest.mark.parametrize("cfg", TOP, ids=lambda p: p.stem)
def test_top_level_configs_run(cfg, criteo_dir, store):
    cli = fit(f"--config={cfg}", "--trainer.fast_dev_run=2", data_dir=criteo_dir)
    assert cli.trainer.state.finished and cli.trainer.global_step == 2


@pytest.mark.parametrize("cfg", MODELS, ids=lambda p: p.stem)
def test_model_configs_run_in_me_form(cfg, criteo_dir, store):
    cli = fit(f"--config={cfg}", f"--config={CONFIGS / 'scale' / 'me2x.yaml'}", "--trainer.fast_dev_run=2",
              data_dir=criteo_dir)
    assert cli.model.num_sets == 2 and cli.trainer.global_step == 2


@pytest.mark.parametrize("cfg", SCALES, ids=lambda p: p.stem)
def test_scale_configs_run(cfg, criteo_dir, store):
    cli = fit(f"--config={CONFIGS / 'model' / 'dnn.yaml'}", f"--config={cfg}", "--trainer.fast_dev_run=1",
              data_dir=criteo_dir)
    k = int(cfg.stem[2:-1])
    assert (cli.model.num_sets, cli.model.embed_dim) == ((k, 10) if cfg.stem.startswith("me") else (1, 10 * k))


@pytest.mark.parametrize("cfg", DATA, ids=lambda p: p.stem)
def test_data_configs_parse(cfg):
    p = run_cli("fit", f"--config={CONFIGS / 'dnn.yaml'}", f"--config={cfg}", "--print_config")
    assert "data_dir:" in p.stdout and "class_path: recscale.models.DNN" in p.stdout


def test_fit_writes_a_complete_mlflow_run(criteo_dir, store, tmp_path):
    cli = fit(f"--config={CONFIGS / 'dcnv2.yaml'}", "--trainer.max_epochs=2", "--seed_everything=3",
              data_dir=criteo_dir)
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("recscale")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    p, t, m = run.data.params, run.data.tags, run.data.metrics
    assert p["model.backbone.class_path"] == "recscale.models.DCNv2"
    assert p["model.lr"] == "0.001" and p["data.batch_size"] == "512" and p["seed_everything"] == "3"
    assert int(p["params.embedding"]) == sum(cli.datamodule.field_dims) * 10
    assert int(p["params.dense"]) > 0
    assert {t["model"], t["mode"], t["scale"], t["dataset"], t["seed"]} == {"DCNv2", "SE", "1", "criteo", "3"}
    assert len(t["config_hash"]) == 16
    assert 0.5 < m["test/auc"] < 1.0 and m["test/logloss"] > 0
    history = client.get_metric_history(run.info.run_id, "val/auc")
    assert len(history) == 2
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data"} <= arts
    assert "class_path: recscale.models.DCNv2" in mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    best_dir = [a for a in arts if a.startswith("best-epoch")]
    assert len(best_dir) == 1, arts
    files = {a.path for a in client.list_artifacts(run.info.run_id, best_dir[0])}
    assert f"{best_dir[0]}/{best_dir[0]}.ckpt" in files, "the best checkpoint is logged"
    # the test metrics are those of the best checkpoint
    best = max(history, key=lambda h: h.value)
    assert cli.trainer.checkpoint_callback.best_model_score.item() == pytest.approx(best.value)


def test_same_seed_same_numbers(criteo_dir, store):
    a = fit(f"--config={CONFIGS / 'dnn.yaml'}", "--trainer.max_epochs=1", data_dir=criteo_dir)
    b = fit(f"--config={CONFIGS / 'dnn.yaml'}", "--trainer.max_epochs=1", data_dir=criteo_dir)
    ma, mb = a.trainer.callback_metrics, b.trainer.callback_metrics
    assert ma["test/auc"].item() == mb["test/auc"].item()
    assert ma["test/logloss"].item() == mb["test/logloss"].item()
    c = fit(f"--config={CONFIGS / 'dnn.yaml'}", "--trainer.max_epochs=1", "--seed_everything=1", data_dir=criteo_dir)
    assert c.trainer.callback_metrics["test/auc"].item() != ma["test/auc"].item()


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--model.nope=1"], ["nope"]),
        (["--model.scale=two"], ["model.scale", "two"]),
        (["--model.scale=0"], ["model.scale must be a positive integer"]),
        (["--data.data_dir=/nonexistent/dir"], ["/nonexistent/dir does not exist", "recscale prepare"]),
        (["--config=configs/model/ffm.yaml", "--model.base_dim=10"], ["divisible by num_fields - 1 = 38"]),
    ],
)
def test_config_errors_are_clear_and_early(args, needles, criteo_dir, tmp_path):
    base = ["fit", "--config=configs/dnn.yaml", f"--data.data_dir={criteo_dir}"]
    p = run_cli(*base, *args, check=False, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db",
                                                "PATH": "/usr/bin:/bin"})
    assert p.returncode != 0
    for n in needles:
        assert n in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert "Epoch 0" not in p.stderr + p.stdout  # nothing trained
