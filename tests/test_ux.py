"""A user's day with recscale (issue 12): the front door, run names and tags, the MLflow UI's view, honest throughput,
the toy in seconds, configs from the user's checkout, make targets that do not reinstall, and disk use."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from mlflow.tracking import MlflowClient

from recscale.cli import COMMANDS

CONFIGS = ROOT / "configs"


def py(code: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


# ------------------------------------------------------------------------------------------------ the front door
def test_help_lists_every_command_without_importing_torch_lightning_or_mlflow():
    p = py("import sys\nfrom recscale.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
           "    print('rc', e.code)\nprint('heavy', sorted({m.split('.')[0] for m in sys.modules} & "
           "{'torch', 'lightning', 'mlflow', 'polars', 'jsonargparse'}))")
    assert p.returncode == 0, p.stderr
    assert "rc 0" in p.stdout and "heavy []" in p.stdout
    listed = {line.split()[0] for line in p.stdout.splitlines() if line.startswith("    ") and line[4] != " "}
    want = {"prepare", "encode", "synth", "inspect", "fit", "validate", "test", "predict", "toy", "analyze", "grid",
            "report"}
    assert want <= listed == set(COMMANDS)


def test_bare_command_version_and_unknown_command():
    bare = subprocess.run([sys.executable, "-m", "recscale"], capture_output=True, text=True, cwd=ROOT)
    assert bare.returncode == 0 and "analyze" in bare.stdout and "report" in bare.stdout
    v = subprocess.run([sys.executable, "-m", "recscale", "--version"], capture_output=True, text=True, cwd=ROOT)
    import recscale

    assert v.returncode == 0 and v.stdout.startswith(f"recscale {recscale.__version__} (torch ")
    bad = subprocess.run([sys.executable, "-m", "recscale", "fitt"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "did you mean fit?" in bad.stderr


@pytest.mark.parametrize("args,needles", [
    (["--model.mode", "me"], ["--model.mode me", "SE, ME"]),
    (["--optimizer", "Foo"], ["--optimizer Foo", "SGD", "AdamW", "Adam, model.lr"]),
    (["--model.scale", "two"], ["--model.scale two", "expected int"]),
])
def test_option_errors_are_one_line(args, needles, criteo_dir, capsys):
    from recscale.train import cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["fit", f"--config={CONFIGS / 'dnn.yaml'}", f"--data.data_dir={criteo_dir}", *args])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recscale")]
    assert len(err) == 1, err
    assert "usage:" not in err[0]
    for n in needles:
        assert n in err[0], err[0]


def test_one_line_error_keeps_what_it_does_not_know():
    from recscale.train import one_line_error

    assert one_line_error("unrecognized arguments: --model.nope=1") == (
        "recscale fit: error: unrecognized arguments: --model.nope=1 (recscale fit --help lists the options)")


# ------------------------------------------------------------------------------------------------ runs in MLflow
def tiny_fit(data_dir, *extra):
    from recscale.train import cli_main

    return cli_main(["fit", f"--config={CONFIGS / 'dnn.yaml'}", f"--data.data_dir={data_dir}", "--data.batch_size=512",
                     "--data.num_workers=0", "--trainer.max_epochs=2", "--trainer.limit_train_batches=2",
                     "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
                     "--trainer.enable_model_summary=false", "--diagnostics.sample_rows=200",
                     "--diagnostics.figures=false", *extra])


def test_a_run_is_named_tagged_printed_and_stored_once(criteo_dir, store, tmp_path, capsys):
    cli = tiny_fit(criteo_dir, "--seed_everything=4", "--trainer.logger.init_args.system_metrics_seconds=0.2")
    err = capsys.readouterr().err
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("recscale")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the classic runs view, not GenAI
    (run,) = client.search_runs([exp.experiment_id])
    run_id, t = run.info.run_id, run.data.tags
    assert run.info.run_name == "criteo-dnn-se1x-seed4"
    # the run's name, id, store and how to browse it: at the start and at the end
    assert err.count(f"MLflow run criteo-dnn-se1x-seed4 (id {run_id}) in {store}") == 2
    assert err.count(f"mlflow ui --backend-store-uri {store}") == 2
    assert "recscale analyze --run criteo-dnn-se1x-seed4" in err
    # C5 tags
    spec = cli.datamodule.spec
    assert t["data_checksum"] == spec["input"]["sha256"] and t["protocol"] == "icml24"
    (ds,) = client.get_run(run_id).inputs.dataset_inputs  # the runs table's Dataset column
    assert ds.dataset.name == "criteo-icml24" and ds.dataset.digest == spec["input"]["sha256"][:16]
    assert t["recipe"] == "icml24" and "recipe_override" not in t
    assert len(t["cell_hash"]) == 16 and t["cell_hash"] != t["config_hash"]
    assert len(t["git_commit"]) == 40 and t["git_dirty"] in ("true", "false")
    assert {t["model"], t["mode"], t["scale"], t["dataset"], t["seed"]} == {"DNN", "SE", "1", "criteo", "4"}
    # MLflow system metrics (psutil is a dependency)
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    # the best checkpoint lives once, in the run, without optimizer state; last.ckpt stays local for resuming
    ckdir = Path(cli.trainer.checkpoint_callback.dirpath)
    assert (ckdir / "last.ckpt").is_file() and not list(ckdir.glob("best-*.ckpt"))
    arts = [a.path for a in client.list_artifacts(run_id)]
    best = [a for a in arts if a.startswith("best-epoch")]
    assert len(best) == 1 and not any(a.startswith("last") for a in arts)
    local = client.download_artifacts(run_id, f"{best[0]}/{best[0]}.ckpt", str(tmp_path))
    state = torch.load(local, map_location="cpu", weights_only=True)
    assert "state_dict" in state and "optimizer_states" not in state
    full = torch.load(ckdir / "last.ckpt", map_location="cpu", weights_only=True)
    assert "optimizer_states" in full


def test_cell_hash_ignores_the_seed_and_only_the_seed():
    from recscale.tracking import cell_hash, config_hash

    cfg = {"seed_everything": 0, "model": {"scale": 2}, "data": {"batch_size": 512}}
    other_seed = {**cfg, "seed_everything": 1}
    assert cell_hash(cfg) == cell_hash(other_seed) and config_hash(cfg) != config_hash(other_seed)
    assert cell_hash(cfg) != cell_hash({**cfg, "model": {"scale": 3}})


def test_optimizer_override_is_recorded(criteo_dir, store, capsys):
    tiny_fit(criteo_dir, "--optimizer=SGD", "--optimizer.lr=0.05", "--trainer.max_epochs=1",
             "--trainer.logger.init_args.log_system_metrics=false")
    err = capsys.readouterr().err
    assert "replaces the model's Adam recipe" in err
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("recscale").experiment_id])
    assert run.data.tags["recipe"] == "icml24+override"
    assert run.data.tags["recipe_override"].startswith("optimizer=SGD(") and "lr=0.05" in run.data.tags["recipe_override"]


def test_runs_resolve_by_id_or_unique_name(tmp_path):
    from recscale.tracking import ensure_experiment, resolve_run

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = ensure_experiment(uri, "e")
    a = client.create_run(exp, run_name="criteo-dnn-se1x-seed0").info.run_id
    b1 = client.create_run(exp, run_name="twice").info.run_id
    client.create_run(exp, run_name="twice")
    assert resolve_run(client, a) == a == resolve_run(client, "criteo-dnn-se1x-seed0")
    assert resolve_run(client, b1) == b1
    with pytest.raises(LookupError, match="2 runs are named 'twice'.*pass the run id"):
        resolve_run(client, "twice")
    with pytest.raises(LookupError, match="no run has the id or name 'nope'"):
        resolve_run(client, "nope")


def test_existing_experiments_get_the_training_view(tmp_path):
    from recscale.tracking import ensure_experiment

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("old")  # made before recscale set the kind
    assert "mlflow.experimentKind" not in client.get_experiment(exp).tags
    assert ensure_experiment(uri, "old") == exp
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"


def test_unique_run_names(tmp_path):
    from recscale.tracking import default_run_name, ensure_experiment, unique_run_name

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    exp = ensure_experiment(uri, "e")
    name = default_run_name("criteo", "DCNv2", "ME", 10, 0)
    assert name == "criteo-dcnv2-me10x-seed0"
    assert default_run_name("avazu", "DNN", "SE", 2, 1, "test") == "avazu-dnn-se2x-seed1-test"
    client = MlflowClient(uri)
    for expected in (name, f"{name}-2", f"{name}-3"):
        got = unique_run_name(uri, exp, name)
        assert got == expected
        client.create_run(exp, run_name=got)
    client.create_run(exp, run_name="criteo-dcnv2-me10x-seed00")  # a prefix match is not a clash
    assert unique_run_name(uri, exp, "criteo-dcnv2-me10x-seed0") == f"{name}-4"


# ------------------------------------------------------------------------------------------------ throughput
class _Trainer:
    pass


class _Module:
    def __init__(self):
        self.logged = {}

    def log(self, key, value, **kw):
        self.logged[key] = value


def test_samples_per_s_counts_training_time_only():
    from recscale.train import SamplesPerSecond

    now = [0.0]
    cb, tr, m = SamplesPerSecond(clock=lambda: now[0]), _Trainer(), _Module()
    batch = (None, torch.zeros(100))
    cb.on_train_epoch_start(tr, m)
    for i in range(4):  # 4 batches of 100 rows, 1 s each
        cb.on_train_batch_start(tr, m, batch, i)
        now[0] += 1.0
        cb.on_train_batch_end(tr, m, None, batch, i)
        if i == 1:  # a mid-epoch validation + diagnostics pass of 50 s
            cb.on_validation_start(tr, m)
            now[0] += 50.0
    cb.on_validation_start(tr, m)  # the end-of-epoch validation, before on_train_epoch_end
    now[0] += 30.0
    cb.on_train_epoch_end(tr, m)
    assert m.logged["train/samples_per_s"] == pytest.approx(400 / 4.0)  # not 400 / 84


def test_samples_per_s_in_a_real_fit_leaves_out_validation():
    """Lightning calls the hooks: a training batch 'takes' 1 s and each validation 100 s on a fake clock."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from recscale.train import SamplesPerSecond

    now = [0.0]

    class Clockwork(L.Callback):
        def on_train_batch_end(self, *args):
            now[0] += 1.0

        def on_validation_end(self, *args):
            now[0] += 100.0

    class Model(BoringModel):
        def train_dataloader(self):
            from lightning.pytorch.demos.boring_classes import RandomDataset

            return torch.utils.data.DataLoader(RandomDataset(32, 64), batch_size=4)

        def training_step(self, batch, batch_idx):
            self.rows = len(batch[1])  # what SamplesPerSecond counts per batch
            return super().training_step(batch, batch_idx)

    model = Model()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1, val_check_interval=2,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Clockwork(), SamplesPerSecond(clock=lambda: now[0])])
    trainer.fit(model)
    assert now[0] == 4 + 2 * 100  # two validations happened, inside the epoch and at its end
    assert trainer.callback_metrics["train/samples_per_s"].item() == pytest.approx(model.rows / 1.0)


# ------------------------------------------------------------------------------------------------ the toy
def test_toy_gradient_is_autograds():
    from recscale.diagnostics.toy import toy_gradient

    g = torch.Generator().manual_seed(0)
    d1, d2, k = 7, 5, 4
    E1 = torch.randn(d1, k, generator=g, dtype=torch.float64).requires_grad_(True)
    s = torch.randn(d1, d2, k, generator=g, dtype=torch.float64)
    fixed = torch.randn(d1, d2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (d1, d2), generator=g).double()
    h = (E1[:, None, :] * s).sum(-1) + fixed
    (auto,) = torch.autograd.grad(torch.nn.functional.binary_cross_entropy_with_logits(h, y), E1)
    # float64, same terms in a different summation order: agreement to a few ulps of the gradient's magnitude
    assert torch.allclose(toy_gradient(E1.detach(), s, fixed, y), auto, rtol=1e-12, atol=1e-15)


def test_toy_prints_progress_and_reproduces_fig4(tmp_path, capsys):
    from recscale.diagnostics.toy import toy_command

    s = toy_command(str(tmp_path), iterations=2000, mlflow_log=False)
    err = capsys.readouterr().err
    assert "|X3| = 3: iteration 1,000/2,000" in err and "|X3| = 100: iteration 2,000/2,000" in err
    assert s["final_ia_small"] < s["final_ia_large"]  # ICML 2024 Fig. 4: the low-IA field collapses E1
    assert (tmp_path / "toy_ia.png").is_file()


# ------------------------------------------------------------------------------------------------ grid and make
def test_grid_reads_configs_from_the_invoking_directory(tmp_path, monkeypatch, capsys):
    import shutil

    from recscale.grid import configs_dir, main

    shutil.copytree(CONFIGS, tmp_path / "configs")
    assert configs_dir(cwd=tmp_path) == (tmp_path / "configs").resolve()
    assert (configs_dir(cwd=tmp_path / "nowhere") / "model" / "dnn.yaml").is_file()  # installed copy as fallback
    assert configs_dir("elsewhere", cwd=tmp_path) == Path("elsewhere").resolve()
    monkeypatch.chdir(tmp_path)
    rc = main(["icml24", "--models", "dnn", "--scales", "1", "--seeds", "0", "--dry-run",
               "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"grid: configs from {(tmp_path / 'configs').resolve()}" in out
    assert f"--config={(tmp_path / 'configs' / 'model' / 'dnn.yaml').resolve()}" in out


def test_wheels_ship_every_config_directory():
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = {Path(g).parent for globs in data_files.values() for g in globs if g.endswith("*.yaml")}
    dirs = {p.parent.relative_to(ROOT) for p in CONFIGS.rglob("*.yaml")}
    assert dirs <= shipped, f"add {sorted(map(str, dirs - shipped))} to [tool.setuptools.data-files]"
    for dest, globs in data_files.items():
        for g in globs:
            assert dest == "share/recscale/" + str(Path(g).parent)  # the layout configs_dir() looks for


def test_read_only_make_targets_do_not_install(tmp_path):
    venv = Path(sys.executable).parent.parent
    for target in ("report", "mlflow", "grid"):
        p = subprocess.run(["make", "-n", target, f"VENV={venv}", "DRY_RUN=1"], capture_output=True, text=True,
                           cwd=ROOT)
        assert p.returncode == 0, p.stderr
        assert "pip install" not in p.stdout and "-m venv" not in p.stdout, p.stdout
    # no recscale anywhere: the target installs first
    p = subprocess.run(["make", "-n", "report", f"VENV={tmp_path / 'v'}"], capture_output=True, text=True, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin"})
    assert "pip install" in p.stdout


def _fake_venv(tmp_path: Path, cuda: str) -> Path:
    """A venv whose python reports a torch build (`cuda`, '' for CPU) and records pip calls in pip.log."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py_ = venv / "bin" / "python"
    py_.write_text(f'#!/bin/bash\nif [ "$1" = "-c" ]; then echo "{cuda}"; exit 0; fi\n'
                   f'echo "$@" >> {tmp_path / "pip.log"}\n')
    py_.chmod(0o755)
    return venv


@pytest.mark.parametrize("cuda,spec,replaced", [("12.4", None, False), ("12.4", "torch==2.13.0", True),
                                                ("", None, True)])
def test_install_keeps_a_cuda_torch_unless_asked(tmp_path, cuda, spec, replaced):
    venv = _fake_venv(tmp_path, cuda)
    p = subprocess.run(["make", "install", f"VENV={venv}", *([f"TORCH_SPEC={spec}"] if spec else [])],
                       capture_output=True, text=True, cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if k != "TORCH_SPEC"})
    assert p.returncode == 0, p.stderr
    log = (tmp_path / "pip.log").read_text()
    assert ("install -q torch==2.13.0" in log) == replaced, log
    assert "-e .[test]" in log  # recscale itself is installed either way
    if not replaced:
        assert "keeping the CUDA 12.4 build of torch" in p.stderr and "TORCH_SPEC" in p.stderr
