"""The SIGIR 2026 recipe (issue 10 item 3): the Criteo_x1 protocol, configs/recipe/, and `recscale grid sigir`."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import CRITEO_SAMPLE, ROOT, run_cli
from torch import nn

from recscale.data.formats import PrepareError
from recscale.data.prepare import Options, prepare
from recscale.grid import main as grid_main
from recscale.grid import sigir_cells
from recscale.models.layers import SetBatchNorm
from recscale.train import cli_main, parse_fit_config

RECIPES = sorted((ROOT / "configs" / "recipe").glob("*.yaml"))


@pytest.fixture(scope="module")
def criteo_x1_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "criteo_x1"
    prepare(CRITEO_SAMPLE, out, Options(dataset="criteo", protocol="criteo_x1", progress=False))
    return out


def _ids(d, split):
    spec = json.loads((d / "spec.json").read_text())
    t = pq.read_table([d / f["path"] for f in spec["splits"][split]["files"]][0])
    return np.stack([t.column(f["name"]).to_numpy() for f in spec["fields"]], 1)


def test_criteo_x1_protocol(criteo_x1_dir):
    """Criteo_x1: an exact 7/2/1 split; vocabulary fitted on the train split with min count 1, so train rows never hit
    OOV while valid/test rows with tokens unseen in train do."""
    spec = json.loads((criteo_x1_dir / "spec.json").read_text())
    n = sum(spec["splits"][s]["rows"] for s in ("train", "valid", "test"))
    assert [spec["splits"][s]["rows"] for s in ("train", "valid", "test")] == [7 * n // 10, 2 * n // 10,
                                                                               n - 7 * n // 10 - 2 * n // 10]
    assert spec["protocol"] == "criteo_x1" and spec["options"]["min_count"] == 1
    assert spec["options"]["split"] == pytest.approx([0.7, 0.2, 0.1])
    assert (_ids(criteo_x1_dir, "train") > 0).all()
    assert (_ids(criteo_x1_dir, "valid") == 0).any()


def test_criteo_x1_is_criteo_only_and_split_ratio_is_checked(tmp_path):
    from conftest import AVAZU_SAMPLE

    with pytest.raises(PrepareError, match="protocol 'criteo_x1' .* not defined for avazu"):
        prepare(AVAZU_SAMPLE, tmp_path / "a", Options(dataset="avazu", protocol="criteo_x1", progress=False))
    p = run_cli("prepare", "criteo", "--input", str(CRITEO_SAMPLE), "--output", str(tmp_path / "b"),
                "--split-ratio", "7,2", check=False)
    assert p.returncode != 0 and "--split-ratio must be three integers" in p.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("cfg", RECIPES, ids=lambda p: p.stem)
def test_recipe_configs_label_the_recipe(cfg):
    assert yaml.safe_load(cfg.read_text())["model"]["recipe"] == "sigir26"


def test_sigir_grid_dry_run_lists_the_recipe(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    for dataset, recipe, data in (("criteo", "sigir26_criteo.yaml", "criteo_x1.yaml"),
                                  ("avazu", "sigir26_avazu.yaml", "avazu_x4.yaml")):
        assert grid_main(["sigir", "--dataset", dataset, "--seeds", "0", "--models", "fm,crossnet_pdnn", "--dry-run",
                          "--tracking-uri", uri]) == 0
        runs = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("run ")]
        assert len(runs) == 2 and all(f"configs/recipe/{recipe}" in ln and f"configs/data/{data}" in ln for ln in runs)


@pytest.mark.parametrize("dataset,batch,dim,hidden", [("criteo", 4096, 10, [400, 400, 400]),
                                                      ("avazu", 10000, 16, [2000, 2000, 2000, 2000])])
def test_sigir_cell_resolves_to_the_recipe(dataset, batch, dim, hidden):
    (cell,) = [c for c in sigir_cells(dataset, ["fm_pdnn"], [0])]
    _, cfg = parse_fit_config(cell.argv([]))
    assert cfg.data.batch_size == batch and cfg.model.base_dim == dim and cfg.model.recipe == "sigir26"
    assert cfg.model.embedding_init == "normal" and cfg.model.embedding_l2 > 0 and cfg.model.weight_decay == 0
    assert cfg.early_stopping.patience == 2
    args = cfg.model.backbone.init_args
    assert args.dropout == 0 and args.batch_norm is False and args.hidden == hidden
    assert cell.tags["recipe"] == "sigir26"


def test_fit_with_the_recipe_on_the_sample(criteo_x1_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    (cell,) = sigir_cells("criteo", ["fm_sdnn"], [0])
    cli = cli_main([*cell.argv([]), f"--data.data_dir={criteo_x1_dir}", "--data.num_workers=0",
                    "--trainer.fast_dev_run=1", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false"])
    assert cli.trainer.state.finished
    model = cli.model
    assert model.hparams.recipe == "sigir26" and cli.datamodule.hparams.batch_size == 4096
    assert not [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, SetBatchNorm))]
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert model.hparams.embedding_l2 == 1e-5
