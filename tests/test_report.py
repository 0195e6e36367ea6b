"""`recscale report` on MLflow runs built directly with MlflowClient (C3/C5 tags, metrics and artifacts) in a temporary
SQLite store: best-step diagnostics, grouping by cell, n, no averaging across data or recipe, filters, the SIGIR recipe
flag, raw vs row-normalised IA, the RoBlock section, and the no-runs error."""

import csv
import itertools
import json

import pytest
from mlflow.tracking import MlflowClient

from recscale.report import ReportError, build_report, main, params_cell_hash
from recscale.tracking import ensure_experiment

_names = itertools.count()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds); each test uses its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('report') / 'mlflow.db'}"


@pytest.fixture
def exp(store, request):
    return request.node.name.replace("[", "-").replace("]", "")


def add_run(store, experiment, *, model="DCNv2", mode="SE", scale=1, seed=0, dataset="criteo", cell="c1",
            data="d" * 64, recipe="icml24", protocol="icml24", grid="icml24", auc=0.8, metrics=None, params=None,
            tags=None, artifacts=None, status="FINISHED"):
    """A run as `recscale fit` leaves it: the C5 tags, test/auc, diag/* histories (key -> [(step, value)]) or single
    values, params and text artifacts. ``cell=None`` leaves the cell_hash tag out (older runs)."""
    client = MlflowClient(store)
    exp_id = ensure_experiment(store, experiment)
    t = {"model": model, "mode": mode, "scale": str(scale), "seed": str(seed), "dataset": dataset,
         "data_checksum": data, "recipe": recipe, "protocol": protocol, "grid": grid, **(tags or {})}
    if cell is not None:
        t["cell_hash"] = cell
    i = next(_names)  # start times in creation order (a re-run of a seed is newer)
    run = client.create_run(exp_id, run_name=f"run{i}", tags=t, start_time=1_700_000_000_000 + 1000 * i)
    rid = run.info.run_id
    p = {"model.mode": mode, "model.scale": str(scale), "seed_everything": str(seed), **(params or {})}
    for k, v in p.items():
        client.log_param(rid, k, v)
    if auc is not None:
        client.log_metric(rid, "test/auc", auc, step=9)
    for k, v in (metrics or {}).items():
        for step, val in (v if isinstance(v, list) else [(0, v)]):
            client.log_metric(rid, k, val, step=step)
    for path, text in (artifacts or {}).items():
        client.log_text(rid, text, path)
    client.set_terminated(rid, status)
    return rid


def report(store, exp, tmp_path, figures=False, **kw):
    res = build_report(store, exp, kw.pop("dataset", "criteo"), str(tmp_path / "out"), summary_run=False,
                       figures=figures, **kw)
    return res, tmp_path / "out"


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def t1(out, model="DCNv2", mode="SE", scale="1"):
    return next(r for r in rows(out / "icml24_table1.csv")
                if (r["model"], r["mode"], r["scale"]) == (model, mode, scale))


def test_diagnostics_are_those_of_the_best_checkpoint(store, exp, tmp_path):
    # diag_best/* logged (C3): the best-step value, although the latest diag/* differs
    add_run(store, exp, scale=2, mode="SE", cell="a", metrics={
        "diag/ia/mean": [(4, 5.0), (8, 9.0)], "diag_best/ia/mean": 5.0}, tags={"best_step": "4"})
    # older run: no diag_best/*, the history at the best_step tag
    add_run(store, exp, scale=2, mode="ME", cell="b", metrics={"diag/ia/mean": [(4, 6.0), (8, 9.5)]},
            tags={"best_step": "4"})
    # nothing to tell the best step: missing, never the latest value
    add_run(store, exp, scale=3, mode="ME", cell="c", metrics={"diag/ia/mean": [(4, 6.0), (8, 9.9)]})
    _, out = report(store, exp, tmp_path)
    assert float(t1(out, mode="SE", scale="2")["ia_mean_best"]) == 5.0
    assert float(t1(out, mode="ME", scale="2")["ia_mean_best"]) == 6.0
    assert t1(out, mode="ME", scale="3")["ia_mean_best"] == ""
    md = (out / "report.md").read_text()
    assert "9.00" not in md and "9.50" not in md and "9.90" not in md
    assert "1 run(s) without best-step diagnostics" in md
    sources = {r["cell_hash"]: r["diagnostics_from"] for r in rows(out / "cells.csv")}
    assert sources == {"a": "diag_best", "b": "history@4", "c": "none"}


def test_cells_n_and_no_averaging_across_data_or_recipe(store, exp, tmp_path):
    for seed, auc in enumerate([0.80, 0.81, 0.82]):
        add_run(store, exp, scale=2, seed=seed, auc=auc, cell="three")
    add_run(store, exp, scale=2, seed=0, auc=0.79, cell="three")  # a newer re-run of seed 0 replaces it
    add_run(store, exp, scale=3, seed=0, auc=0.81234, cell="one")
    # same config on other data, and with another recipe: separate cells, never averaged in
    add_run(store, exp, scale=4, seed=0, auc=0.70, cell="four", data="e" * 64)
    add_run(store, exp, scale=4, seed=1, auc=0.80, cell="four")
    add_run(store, exp, scale=4, seed=2, auc=0.66, cell="four", recipe="sigir26")
    _, out = report(store, exp, tmp_path)
    r2 = t1(out, scale="2")
    assert r2["n"] == "3"  # distinct seeds; the re-run of seed 0 (0.79, newer) replaced 0.80
    assert float(r2["auc_mean"]) == pytest.approx((0.79 + 0.81 + 0.82) / 3)
    assert float(r2["auc_std"]) > 0
    r3 = t1(out, scale="3")
    assert r3["n"] == "1" and r3["auc_std"] == ""
    r4 = t1(out, scale="4")
    assert r4["n"] == "1" and float(r4["auc_mean"]) in (0.70, 0.80) and r4["other_cells"] == "2"
    assert r4["recipe"] == "icml24"  # the table's own recipe is preferred over sigir26
    md = (out / "report.md").read_text()
    line3 = next(ln for ln in md.splitlines() if ln.startswith("| DCNv2 | SE | 3x |"))
    cols = [c.strip() for c in line3.split("|")]  # '', model, mode, scale, n, ours, paper, ...
    assert cols[4] == "1" and cols[5].strip("*") == "0.81234"  # n = 1: the value, no "± 0.00000"
    cols = [c.strip() for c in next(ln for ln in md.splitlines() if ln.startswith("| DCNv2 | SE | 2x |")).split("|")]
    assert cols[4] == "3" and " ± " in cols[5]
    assert "Other configurations" in md and "sigir26" in md
    cells = rows(out / "cells.csv")
    assert len(cells) == 5 and sorted(c["n"] for c in cells) == ["1", "1", "1", "1", "3"]
    assert not any(float(c["auc_mean"]) == pytest.approx((0.70 + 0.80 + 0.66) / 3) for c in cells)  # 0.72


def test_cell_hash_from_params_when_the_tag_is_absent(store, exp, tmp_path):
    for seed in (0, 1):
        add_run(store, exp, scale=2, seed=seed, cell=None, params={"model.lr": "0.001"}, auc=0.8 + seed / 100)
    add_run(store, exp, scale=2, seed=2, cell=None, params={"model.lr": "0.01"}, auc=0.5)
    _, out = report(store, exp, tmp_path)
    cells = sorted(rows(out / "cells.csv"), key=lambda c: c["n"])
    assert [c["n"] for c in cells] == ["1", "2"] and all(c["cell_hash"].startswith("p-") for c in cells)
    assert float(t1(out, scale="2")["auc_mean"]) == pytest.approx(0.805)
    assert params_cell_hash({"a": "1", "seed_everything": "0"}) == params_cell_hash({"a": "1", "seed_everything": "7"})


def test_filter_selects_runs_by_tag(store, exp, tmp_path, capsys):
    add_run(store, exp, model="DCNv2", mode="ME", scale=2, cell="x")
    add_run(store, exp, model="DCNv2", mode="SE", scale=2, cell="y")
    add_run(store, exp, model="DNN", mode="ME", scale=2, cell="z")
    res, out = report(store, exp, tmp_path, filters={"model": "DCNv2", "mode": "ME"})
    assert res["runs"] == 1 and [c["cell_hash"] for c in rows(out / "cells.csv")] == ["x"]
    rc = main(["--tracking-uri", store, "--experiment", exp, "--output", str(tmp_path / "o2"), "--no-summary-run",
               "--no-figures", "--filter", "model"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--filter 'model'" in err[0] and "TAG=VALUE" in err[0]


def test_no_runs_exits_nonzero_with_one_line(store, tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(["--tracking-uri", store, "--experiment", "nothing-here", "--output", str(out), "--no-summary-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert store in err[0] and "nothing-here" in err[0] and "make grid DATASET=criteo" in err[0]
    assert not out.exists()  # nothing half-written
    with pytest.raises(ReportError, match="dataset=avazu, model=DNN"):
        build_report(store, "nothing-here", "avazu", str(out), summary_run=False, filters={"model": "DNN"})


def test_sigir_table_flags_runs_of_another_recipe(store, exp, tmp_path):
    add_run(store, exp, model="DeepFM", grid="sigir", recipe="icml24", cell="s1", auc=0.8100,
            metrics={"diag_best/rankme/embeddings": 150.0, "diag_best/rankme/sample_rows": 1000.0})
    add_run(store, exp, model="FM", grid="sigir", recipe="icml24", cell="s2", auc=0.8000)
    add_run(store, exp, model="CrossNetParallel", grid="sigir", recipe="sigir26+override", cell="s4", auc=0.81)
    add_run(store, exp, model="FM", grid="sigir", recipe="sigir26", protocol="criteo_x1", cell="s3", auc=0.8020,
            metrics={"diag_best/rankme/embeddings": 70.0})
    _, out = report(store, exp, tmp_path)
    sig = {r["model"]: r for r in rows(out / "sigir26_table1.csv")}
    assert sig["FM"]["recipe"] == "sigir26" and sig["FM"]["like_for_like"] == "True"  # sigir26 preferred
    assert float(sig["FM"]["diff_auc"]) == pytest.approx(0.8020 - 0.8025)
    assert sig["FM+p-DNN"]["like_for_like"] == "False" and float(sig["FM+p-DNN"]["rankme_mean"]) == 150.0
    md = (out / "sigir26_table1.md").read_text()
    deepfm = next(ln for ln in md.splitlines() if ln.startswith("| FM+p-DNN |"))
    assert "⚠ recipe icml24, not sigir26" in deepfm and "1,000 rows" in deepfm
    fm = next(ln for ln in md.splitlines() if ln.startswith("| FM |"))
    assert "⚠" not in fm and "sigir26 / criteo_x1" in fm and "+1 other cell(s)" in fm
    assert next(ln for ln in md.splitlines() if ln.startswith("| CrossNet |")).count("—") >= 5  # no runs
    assert sig["CrossNet+p-DNN"]["like_for_like"] == "False"  # another optimizer replaced the recipe


def test_table2_keeps_raw_and_row_normalised_ia_apart(store, exp, tmp_path):
    for norm, ia in (("False", 4.0), ("True", 4.5)):
        for seed in (0, 1):
            add_run(store, exp, grid="data-fraction", cell=f"t2-{norm}", seed=seed,
                    params={"model.base_dim": "10", "data.train_fraction": "0.1", "diagnostics.normalize_rows": norm},
                    metrics={"diag_best/ia/mean": ia + seed / 10})
    _, out = report(store, exp, tmp_path)
    r = next(r for r in rows(out / "icml24_table2.csv") if (r["data_fraction"], r["column"]) == ("0.1", "d10"))
    assert r["n_raw"] == "2" and float(r["ia_raw"]) == pytest.approx(4.05)
    assert r["n_row_normalised"] == "2" and float(r["ia_row_normalised"]) == pytest.approx(4.55)
    assert float(r["published"]) == 4.28
    assert "row-normalised" in (out / "report.md").read_text()


def test_roblock_section(store, exp, tmp_path):
    # as `make grid-roblock` tags them: one class (RoBlockNet) for plain and RoBlock, variant/backbone/depth/width/beta
    grid = {"grid": "roblock", "backbone": "dcnv2", "depth": "2", "width": "1"}
    for seed, (plain, rob) in enumerate([(0.800, 0.803), (0.802, 0.807)]):
        add_run(store, exp, model="RoBlockNet", grid="roblock", cell="plain2", seed=seed, auc=plain,
                tags={**grid, "variant": "plain", "beta": ""},
                metrics={"diag_best/layer1/ia_mean": 5.0, "diag_best/layer2/ia_mean": 4.0})
        add_run(store, exp, model="RoBlockNet", grid="roblock", cell="rob2", seed=seed, auc=rob,
                tags={**grid, "variant": "roblock", "beta": "0.1"},
                metrics={"diag_best/layer1/ia_mean": 5.0, "diag_best/layer2/ia_mean": 5.5})
    # no grid tags: everything from the params (RoBlockNet with every component off is the plain stack)
    pre = "model.backbone.init_args."
    add_run(store, exp, model="RoBlockNet", grid="", mode="ME", scale=4, cell="hand-rob", auc=0.79, params={
        "model.backbone.class_path": "recscale.models.RoBlockNet", pre + "interaction": "cin", pre + "blocks": "8",
        pre + "beta": "0.5", pre + "rebalance": "rank1", pre + "decoupler": "linear", pre + "router": "dynamic"})
    add_run(store, exp, model="RoBlockNet", grid="", mode="ME", scale=4, cell="hand-plain", auc=0.78, params={
        "model.backbone.class_path": "recscale.models.RoBlockNet", pre + "interaction": "cin", pre + "blocks": "8",
        pre + "beta": "0.0", pre + "rebalance": "none", pre + "decoupler": "none", pre + "router": "none"})
    # a plain DCNv2 of the grid at its class default depth (4 cross layers)
    add_run(store, exp, model="DCNv2", mode="ME", scale=4, grid="roblock", cell="plain4",
            params={"model.backbone.class_path": "recscale.models.DCNv2"}, auc=0.81)
    # ablations: their own table, Δ against the all-on cell, never in the main one
    abl = {"grid": "roblock-ablation", "backbone": "dcnv2", "depth": "4", "width": "4"}
    add_run(store, exp, model="RoBlockNet", grid="roblock-ablation", cell="all-on", auc=0.812,
            tags={**abl, "ablation": "rebalance1-decoupler1-router1"})
    add_run(store, exp, model="RoBlockNet", grid="roblock-ablation", cell="no-router", auc=0.810,
            tags={**abl, "ablation": "rebalance1-decoupler1-router0"})
    _, out = report(store, exp, tmp_path, figures=True)
    got = {(r["backbone"], r["depth"], r["width"], r["variant"]): r for r in rows(out / "roblock.csv")}
    p, r = got[("DCNv2", "2", "M=1", "plain")], got[("DCNv2", "2", "M=1", "RoBlock β=0.1")]
    assert p["n"] == "2" and float(p["auc_mean"]) == pytest.approx(0.801)
    assert float(r["diff_vs_plain"]) == pytest.approx(0.805 - 0.801)
    assert float(r["ia_last_layer"]) == 5.5 and float(p["ia_last_layer"]) == 4.0
    assert float(got[("xDeepFM", "8", "M=4", "RoBlock β=0.5")]["diff_vs_plain"]) == pytest.approx(0.01)
    assert got[("DCNv2", "4", "M=4", "plain")]["auc_mean"] == "0.81"
    assert got[("DCNv2", "4", "M=4", "RoBlock β=0.1")]["auc_mean"] == ""  # the ablation cell stays out
    assert got[("DHEN", "8", "M=1", "plain")]["auc_mean"] == ""  # missing cell
    assert float(got[("DCNv2", "4", "M=4", "ablation rebalance1-decoupler1-router0")]["diff_vs_all_on"]) \
        == pytest.approx(-0.002)
    md = (out / "roblock.md").read_text()
    assert "| xDeepFM | 1 | M=1 | plain | 0 | — | — | — |" in md and "component ablations" in md
    assert (out / "roblock_auc_vs_depth.png").stat().st_size > 10_000
    assert (out / "roblock_ia_vs_depth.png").stat().st_size > 10_000


def test_figures_fig8a_and_fig8b_from_values_json(store, exp, tmp_path):
    spec = json.dumps({"fields": [{"name": "C1", "cardinality": 1000}, {"name": "C2", "cardinality": 3}]})
    for mode, base in (("SE", 2.0), ("ME", 6.0)):
        for seed in (0, 1):
            add_run(store, exp, mode=mode, scale=10, seed=seed, cell=f"f-{mode}", auc=0.81 + seed / 1000,
                    metrics={"diag_best/ia/mean": base, "diag/ia/mean": [(8, 99.0)],
                             ("diag_best/diversity/mean" if mode == "ME" else "diag_best/diversity_se_split/mean"):
                             0.6 if mode == "ME" else 0.2},
                    artifacts={"diagnostics/best/values.json": json.dumps(
                        {"step": 4, "metrics": {"ia/C1": base + seed, "ia/C2": 1.5, "ia/mean": base}}),
                        "data/spec.json": spec})
    add_run(store, exp, mode="SE", scale=1, cell="f-1x", auc=0.812)
    res, out = report(store, exp, tmp_path, figures=True)
    for name in ("scalability.png", "ia_per_field.png", "diversity.png"):
        assert (out / name).stat().st_size > 10_000
    assert "per-field IA, SE vs ME, DCNv2 10x" in (out / "report.md").read_text()
    from recscale.report import group_cells, load_runs
    from recscale.report_plots import per_field_values

    client = MlflowClient(store)
    me = next(r for r in load_runs(client, exp, "criteo") if r.mode == "ME" and r.seed == "1")
    assert per_field_values(client, me, tmp_path / "dl")["ia/C1"] == 7.0
    assert len(group_cells(load_runs(client, exp, "criteo"))) == 3
