"""Collapse diagnostics: closed-form cases, the Gram path against SVD, and the MLflow logging of a real fit."""

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import ROOT

from recscale.diagnostics import metrics as mt
from recscale.diagnostics.compute import Options, compute_report
from recscale.models import backbones as bb
from recscale.models.module import CTRModel


def orthonormal(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    return q


def test_orthonormal_columns():
    q = orthonormal(200, 7)
    assert mt.information_abundance(q) == pytest.approx(7.0, rel=1e-9)
    assert mt.rankme(q) == pytest.approx(7.0, rel=1e-5)  # p_k = 1/7 (+1e-7)
    torch.testing.assert_close(mt.normalized_spectrum(q), torch.ones(7, dtype=torch.float64))


def test_rank_one():
    x = torch.outer(torch.arange(1.0, 51.0), torch.tensor([1.0, -2.0, 0.5, 3.0]))
    assert mt.information_abundance(x) == pytest.approx(1.0, abs=1e-6)
    assert mt.rankme(x) == pytest.approx(1.0, abs=1e-4)


def test_diagonal_known_spectrum():
    x = torch.zeros(10, 3)
    x[0, 0], x[1, 1], x[2, 2] = 3.0, 2.0, 1.0
    torch.testing.assert_close(mt.singular_values(x), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    assert mt.information_abundance(x) == pytest.approx(2.0)  # (3+2+1)/3
    p = np.array([3, 2, 1]) / 6 + 1e-7
    assert mt.rankme(x) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)  # 2.749
    assert mt.rankme(x) == pytest.approx(2.7495, abs=1e-4)


@pytest.mark.parametrize("shape", [(5000, 16), (300, 64), (40, 90)])
def test_gram_path_matches_svd(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.logspace(0, -3, shape[1], dtype=torch.float64)
    want = torch.linalg.svdvals(x)
    got = mt.singular_values(x)[: len(want)]
    big = want > want[0] * 1e-6  # below that the Gram path is limited by float64 (sigma^2)
    torch.testing.assert_close(got[big], want[big], rtol=1e-6, atol=0)


@pytest.mark.parametrize("d", [511, 700, 1029])
def test_blocked_gram_equals_full_product(d):
    """``xtx`` builds X^T X from triangular column blocks (uneven last block included): equal to X.T @ X, symmetric."""
    x = torch.randn(300, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    g = mt.xtx(x)
    torch.testing.assert_close(g, x.T @ x, rtol=1e-12, atol=1e-10)
    assert torch.equal(g, g.T)


def test_row_normalisation_and_centring_options():
    x = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    # raw: sigma = [3, sqrt(5)]; rows normalised: [[1,0],[0,1],[0,1]] -> sigma = [sqrt(2), 1]
    assert mt.information_abundance(x) == pytest.approx((3 + math.sqrt(5)) / 3)
    assert mt.information_abundance(x, normalize_rows=True) == pytest.approx((math.sqrt(2) + 1) / math.sqrt(2))
    c = x - x.mean(0)
    torch.testing.assert_close(mt.singular_values(x, center=True), torch.linalg.svdvals(c.double()))


def test_principal_angles():
    a = orthonormal(50, 4, seed=2)
    torch.testing.assert_close(mt.principal_cosines(a, a @ torch.randn(4, 4, dtype=torch.float64)),
                               torch.ones(4, dtype=torch.float64))
    full = orthonormal(50, 8, seed=3)
    assert mt.principal_cosines(full[:, :4], full[:, 4:]).max() < 1e-10
    assert mt.set_diversity([full[:, :4], full[:, 4:]]) == pytest.approx(1.0)
    theta = 0.3
    e1 = torch.zeros(10, 1, dtype=torch.float64)
    e1[0] = 1
    v = torch.zeros(10, 1, dtype=torch.float64)
    v[0], v[1] = math.cos(theta), math.sin(theta)
    assert float(mt.principal_cosines(e1, 5 * v)[0]) == pytest.approx(math.cos(theta))
    # the Gram-only route agrees
    A = torch.randn(300, 5, dtype=torch.float64)
    B = torch.randn(300, 5, dtype=torch.float64) + 0.5 * A
    torch.testing.assert_close(mt.principal_cosines_from_gram(A.T @ A, B.T @ B, A.T @ B), mt.principal_cosines(A, B))


def test_batched_diversity_equals_the_per_pair_form():
    """``diversity_from_grams`` (two batched calls for every field and set pair) against ``principal_cosines_from_gram``
    pair by pair, including sets of lower rank (fewer rows than columns, a repeated column, a set inside another's
    span): the number of principal angles is min(rank_a, rank_b) in both. float64; only rounding differs (1e-10)."""
    torch.manual_seed(5)
    S, d = 4, 5
    tables = [torch.randn(200, S * d, dtype=torch.float64),
              torch.randn(3, S * d, dtype=torch.float64)]  # rank 3 < d in every set
    t = torch.randn(100, S * d, dtype=torch.float64)
    t[:, d + 1] = t[:, d]  # set 1 has rank d - 1
    t[:, 2 * d:3 * d] = t[:, :d] @ torch.randn(d, d, dtype=torch.float64)  # set 2 spans set 0's space
    tables.append(t)
    grams = torch.stack([x.T @ x for x in tables])

    def per_pair(g):
        blk = lambda a, b: g[a * d:(a + 1) * d, b * d:(b + 1) * d]  # noqa: E731
        return 1 - sum(float(mt.principal_cosines_from_gram(blk(a, a), blk(b, b), blk(a, b)).mean())
                       for a in range(S) for b in range(a + 1, S)) / (S * (S - 1) / 2)

    got = mt.diversity_from_grams(grams, S, d)
    torch.testing.assert_close(got, torch.tensor([per_pair(g) for g in grams], dtype=torch.float64),
                               rtol=1e-10, atol=1e-10)
    assert 0.0 < float(got[2]) < float(got[0])  # a set inside another's span makes the field less diverse
    assert mt.diversity_from_grams(torch.zeros(1, 2 * d, 2 * d), 2, d).isnan().all()  # rank 0: no angles, NaN


def test_sub_embedding_ia_matches_direct_blocks():
    torch.manual_seed(4)
    F_, D = 4, 3
    tables = [torch.randn(n, D, dtype=torch.float64) for n in (50, 7, 200, 13)]
    blocks = torch.randn(F_, F_, D, D, dtype=torch.float64)
    blocks[1, 2] = torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))  # rank-1 projection: IA = 1
    got = mt.sub_embedding_ia([t.T @ t for t in tables], blocks)
    for i in range(F_):
        for j in range(F_):
            s = torch.linalg.svdvals(tables[i] @ blocks[i, j])
            assert float(got[i, j]) == pytest.approx(float(s.sum() / s.max()), rel=1e-8)
    assert float(got[1, 2]) == pytest.approx(1.0)


def test_sub_embedding_ia_uses_the_model_blocks():
    """E_i^{->j} = E_i W_1[i, j] is what field i contributes to field j's slot of the first cross layer."""
    torch.manual_seed(5)
    F_, D = 3, 2
    model = bb.DCNv2(F_, D, 1, cross_layers=1, hidden=[4])
    lin = model.cross.layers[0]
    e = torch.randn(1, 1, F_, D)
    x = e.flatten(2)
    contrib = x[0, 0, 0 * D:1 * D] @ model.blocks()[0, 0, 2]  # field 0 -> slot of field 2
    full = (x @ lin.weight)[0, 0, 2 * D:3 * D]
    others = sum(x[0, 0, k * D:(k + 1) * D] @ model.blocks()[0, k, 2] for k in (1, 2))
    torch.testing.assert_close(full, contrib + others)


def test_ffm_sub_ia_and_correlation():
    torch.manual_seed(6)
    F_, k = 3, 2
    tables = [torch.randn(30, (F_ - 1) * k, dtype=torch.float64) for _ in range(F_)]
    A = mt.ffm_sub_embedding_ia(tables)
    assert torch.isnan(A.diagonal()).all()
    assert float(A[0, 2]) == pytest.approx(mt.information_abundance(tables[0][:, 2:4]))  # j=2 sits in slot 1
    assert float(A[2, 0]) == pytest.approx(mt.information_abundance(tables[2][:, 0:2]))
    ia = torch.tensor([1.0, 2.0, 3.0])
    perfect = ia[None, :].repeat(3, 1) * 2 + 1
    assert mt.correlation_factor(perfect, ia) == pytest.approx(1.0)


def test_covariance_spectrum_matches_numpy():
    z = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    ev = np.sort(np.linalg.eigvalsh(np.cov(z.numpy().T)))[::-1]
    np.testing.assert_allclose(mt.covariance_spectrum(z).numpy(), ev / ev[0], rtol=1e-9)


def _tiny_model(mode="ME", scale=2):
    torch.manual_seed(0)
    return CTRModel(lambda f, d, m: bb.DCNv2(f, d, m, cross_layers=1, hidden=[8, 8]), field_dims=[6, 9, 4, 12],
                    base_dim=3, mode=mode, scale=scale, embedding_init_std=0.5)


def test_report_matches_direct_computations():
    model = _tiny_model()
    ids = torch.stack([torch.randint(0, n, (300,)) for n in [6, 9, 4, 12]], 1).int()
    y = torch.randint(0, 2, (300,)).float()
    rep = compute_report(model, (ids, y), Options(figures=False, chunk_rows=128, gradient_mode="eval"), ["a", "b", "c", "d"])
    emb = model.embedding
    for f, n in enumerate("abcd"):
        assert rep.metrics[f"ia/{n}"] == pytest.approx(mt.information_abundance(emb.table(f)), rel=1e-7)
        for m in range(2):
            assert rep.metrics[f"ia_set{m}/{n}"] == pytest.approx(mt.information_abundance(emb.table(f, m)), rel=1e-7)
    div = np.mean([1 - mt.set_similarity(emb.table(f, 0), emb.table(f, 1)) for f in range(4)])
    assert rep.metrics["diversity/mean"] == pytest.approx(div, rel=1e-8)
    # RankMe of Z, and of dL/dZ against plain autograd in eval mode
    model.eval()
    z = emb(ids)  # (M, B, F, D)
    Z = z.permute(1, 2, 0, 3).reshape(300, -1)
    assert rep.metrics["rankme/embeddings"] == pytest.approx(float(_rankme_svd(Z)), rel=1e-6)
    e = z.detach().requires_grad_(True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model.backbone(e), y)
    (g,) = torch.autograd.grad(loss, e)
    G = g.permute(1, 2, 0, 3).reshape(300, -1)
    assert rep.metrics["rankme/gradients"] == pytest.approx(float(_rankme_svd(G)), rel=1e-6)
    assert all(p.grad is None for p in model.parameters()), "diagnostics must not touch parameter gradients"
    assert "sub_ia/correlation_factor" in rep.metrics and len(rep.tables["sub_embedding_ia"]) == 16


def _rankme_svd(x):
    s = torch.linalg.svdvals(x.double())
    p = s / s.sum() + 1e-7
    return torch.exp(-(p * p.log()).sum())


def test_report_restores_training_mode():
    model = _tiny_model()
    model.train()
    ids = torch.stack([torch.randint(0, n, (64,)) for n in [6, 9, 4, 12]], 1).int()
    compute_report(model, (ids, torch.ones(64)), Options(figures=False))
    assert model.training


@pytest.mark.parametrize("seed", [0, 1])
def test_toy_reproduces_the_papers_qualitative_result(seed):
    from recscale.diagnostics.toy import run_toy

    small = run_toy(3, dim=10, iterations=1000, every=500, seed=seed)
    large = run_toy(100, dim=10, iterations=1000, every=500, seed=seed)
    assert small[0][1] == pytest.approx(large[0][1])  # the same E1 at the start
    assert small[-1][1] < large[-1][1] - 0.5  # interacting with a low-IA field collapses E1 (measured gap ~1.0)
    assert small[-1][1] < small[0][1] - 1.0


def test_toy_command_writes_figure_and_values(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from recscale.diagnostics.toy import toy_command

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    s = toy_command(str(tmp_path / "toy"), iterations=200, mlflow_log=True)
    assert (tmp_path / "toy" / "toy_ia.png").stat().st_size > 5000
    rows = (tmp_path / "toy" / "toy_ia.csv").read_text().splitlines()
    assert rows[0] == "iteration,ia_e1_d3_3,ia_e1_d3_100" and len(rows) == 2 + 200 // 50
    run = MlflowClient(uri).get_run(s["mlflow_run_id"])
    assert run.data.metrics["ia_e1_small"] == pytest.approx(s["final_ia_small"])


class ForceCollapse(L.Callback):
    """Test helper: before epoch 1's validation, every embedding row becomes a multiple of one vector (rank 1)."""

    def on_validation_start(self, trainer, pl_module):
        if trainer.current_epoch == 1 and not trainer.sanity_checking:
            with torch.no_grad():
                w = pl_module.embedding.weight
                w.copy_(w[:, :1] * torch.linspace(0.5, 1.5, w.shape[1]))


def test_fit_logs_headline_diagnostics_best_step_alarm_and_analyze(criteo_dir, tmp_path, monkeypatch, capsys):
    """A DCNv2 ME 10x fit on the sample: well under 100 metric keys (C4), per-field values in values.csv, the best
    checkpoint's pass as diag_best/* + best_step + values.json (C3), per-layer metrics and ia_vs_depth.png (issue 11),
    a forced collapse raises the alarm and stops training, and `analyze` logs into the run."""
    from mlflow.tracking import MlflowClient

    from recscale.diagnostics.analyze import analyze
    from recscale.train import cli_main

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", f"--config={ROOT / 'configs/model/dcnv2.yaml'}", f"--config={ROOT / 'configs/scale/me10x.yaml'}",
              f"--data.data_dir={criteo_dir}", "--data.batch_size=2048", "--data.num_workers=0",
              "--trainer.max_epochs=4", "--trainer.enable_progress_bar=false", "--diagnostics.sample_rows=400",
              "--diagnostics.alarm_drop=0.5", "--diagnostics.alarm_stop=true",
              '--trainer.callbacks=[{"class_path": "test_diagnostics.ForceCollapse"}]'])
    err = capsys.readouterr().err
    assert "diagnostics at step" in err and "gradients (400 rows)" in err and "collapse alarm" in err
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("recscale").experiment_id])[0]
    rid, m = run.info.run_id, run.data.metrics
    assert len(m) < 60, sorted(m)  # measured 47; was 444 before the C4 reduction (ux finding #7)
    for key in ["diag/ia/mean", "diag/ia_set/mean", "diag/diversity/mean", "diag/sub_ia/correlation_factor",
                "diag/rankme/embeddings", "diag/rankme/gradients", "diag/seconds", "diag/layer1/ia_mean",
                "diag/layer4/rankme", "diag/alarm"]:
        assert key in m, key
    assert "diag/ia/C1" not in m and "diag/ia_set3/C1" not in m and "diag/layer5/rankme" not in m
    assert m["diag/rankme/sample_rows"] == 400
    hist = client.get_metric_history(rid, "diag/ia/mean")
    assert len(hist) == 2, "the alarm at the second pass stops training (max_epochs 4)"
    assert "rankme/embeddings fell" in run.data.tags["collapse_alarm"]
    # C3: the best checkpoint's pass
    best = int(run.data.tags["best_step"])
    assert best in {h.step for h in hist}
    assert m["diag_best/ia/mean"] == pytest.approx(next(h.value for h in hist if h.step == best))
    assert "diag_best/layer4/rankme" in m and "diag_best/rankme/gradients" in m
    vals = json.loads(Path(client.download_artifacts(rid, "diagnostics/best/values.json", str(tmp_path))).read_text())
    assert vals["step"] == best and vals["metrics"]["ia/mean"] == pytest.approx(m["diag_best/ia/mean"])
    assert {"ia/C1", "ia_set9/C1", "diversity/C1", "layer4/set9/rankme"} <= set(vals["metrics"])
    steps = [a.path for a in client.list_artifacts(rid, "diagnostics") if "step" in a.path]
    assert len(steps) == 2
    files = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(rid, steps[-1])}
    assert {"ia_heatmap.png", "spectra.png", "spectra.csv", "ia.csv", "covariance_spectrum.png", "values.csv",
            "sub_embedding_ia.png", "sub_embedding_ia.csv", "interaction_patterns.png", "diversity.csv",
            "ia_vs_depth.png"} <= files
    s = analyze(run_id=rid, tracking_uri=uri, sample_rows=300)
    assert s["rankme/embeddings"] > 1
    assert any("analyze-step" in a.path for a in client.list_artifacts(rid, "diagnostics"))


# ------------------------------------------------------------------ gradient RankMe in train mode (issue 10 item 2)
def _sample(n, dims=(6, 9, 4, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, d, (n,), generator=g) for d in dims], 1).int()
    return ids, torch.randint(0, 2, (n,), generator=g).float()


def test_gradient_rankme_train_mode_is_the_papers_and_leaves_training_state_alone():
    """Default = train mode (dropout with a fixed seed, BN batch statistics): equal to a plain autograd pass in train
    mode with that seed, different from eval mode on a model with dropout + BN, the same twice, and neither the RNG
    streams nor BN's running statistics move (so a resumed fit stays exact)."""
    model = _tiny_model()  # DCNv2 tower: per-set Linear + BN + ReLU + Dropout(0.2)
    ids, y = _sample(200)
    bn = {k: b.clone() for k, b in model.named_buffers() if "running" in k or "num_batches" in k}
    assert bn, "the test model must have BatchNorm"
    rng = torch.get_rng_state()
    opts = Options(figures=False, rankme=False, layers=False)
    a = compute_report(model, (ids, y), opts).metrics["rankme/gradients"]
    b = compute_report(model, (ids, y), opts).metrics["rankme/gradients"]
    ev = compute_report(model, (ids, y), Options(figures=False, rankme=False, layers=False,
                                                 gradient_mode="eval")).metrics["rankme/gradients"]
    assert torch.equal(torch.get_rng_state(), rng)  # RNG state is integers: exact
    for k, v in dict(model.named_buffers()).items():
        if k in bn:
            assert torch.equal(v, bn[k]), k  # restored by copy: exact
    assert a == pytest.approx(b, rel=1e-12)  # same seed, same masks, same sums (same process, same kernels)
    assert abs(a - ev) > 1e-3 * ev  # dropout + batch statistics change the gradient (measured: ~10 % here)
    # the definition: one backward over the whole sample in train mode, dropout seeded with gradient_seed = 0
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model.train()
        e = model.embedding(ids).detach().requires_grad_(True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model.backbone(e), y)
        (g,) = torch.autograd.grad(loss, e)
    model.load_state_dict(model.state_dict() | bn)
    assert a == pytest.approx(float(_rankme_svd(g.permute(1, 2, 0, 3).reshape(200, -1))), rel=1e-6)


# ------------------------------------------------------------------------------ numerical edges (issue 10 item 5)
def test_rankme_of_a_sample_narrower_than_wide_sums_over_n_values():
    """N = 2 rows, K = 4 columns: singular values (3, 2), not (3, 2, 0, 0): p = (0.6, 0.4) + 1e-7."""
    from recscale.diagnostics.compute import Moments

    z = torch.tensor([[3.0, 0, 0, 0], [0, 2.0, 0, 0]], dtype=torch.float64)
    acc = Moments(2)
    acc.add(z[:1])
    acc.add(z[1:])
    torch.testing.assert_close(acc.sigma(), torch.tensor([3.0, 2.0], dtype=torch.float64))
    p = np.array([0.6, 0.4]) + 1e-7
    assert mt.rankme(sigma=acc.sigma()) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert mt.rankme(z) == pytest.approx(mt.rankme(sigma=acc.sigma()), rel=1e-12)
    # the report on a model: N = 10 rows < K = F*M*D = 24 columns agrees with the SVD's min(N, K) values
    model = _tiny_model()
    ids, y = _sample(10)
    rep = compute_report(model, (ids, y), Options(figures=False, gradient_rankme=False, layers=False))
    Z = model.embedding(ids).permute(1, 2, 0, 3).reshape(10, -1).detach()
    assert rep.metrics["rankme/embeddings"] == pytest.approx(float(_rankme_svd(Z)), rel=1e-6)


def test_singular_values_below_the_gram_resolution_are_reported_as_zero():
    """A Gram diag(1, 1e-10, 1e-20): sigma = (1, 1e-5, 1e-10); 1e-10 < 1e-7 * sigma_1 is round-off for a float64 Gram
    and reported as 0; rank=2 keeps two values."""
    g = torch.diag(torch.tensor([1.0, 1e-10, 1e-20], dtype=torch.float64))
    torch.testing.assert_close(mt.spectrum_from_gram(g), torch.tensor([1.0, 1e-5, 0.0], dtype=torch.float64))
    assert len(mt.spectrum_from_gram(g, rank=2)) == 2


def test_spectra_csv_lists_no_values_beyond_a_fields_rank():
    model = _tiny_model()  # field cardinalities 6, 9, 4, 12; M*D = 6 columns
    rep = compute_report(model, None, Options(figures=False), ["a", "b", "c", "d"])
    counts = {f: sum(r["field"] == f for r in rep.tables["spectra"]) for f in "abcd"}
    assert counts == {"a": 6, "b": 6, "c": 4, "d": 6}  # min(|V|, M*D)


# ------------------------------------------------------------------------------------ per-layer outputs (C1, issue 11)
def _capture_input(module):
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    return seen


@pytest.mark.parametrize("mode", ["SE", "ME"])
@pytest.mark.parametrize("name", ["DCNv2", "CrossNet", "CrossNetParallel", "XDeepFM"])
def test_layer_outputs_end_where_forward_continues(name, mode):
    """The last layer output is what the forward pass feeds on (fused cross path vs textbook layer loop)."""
    torch.manual_seed(0)
    M = 2 if mode == "ME" else 1
    F, D, B = 4, 3, 16
    kw = {"cin_layers": [5, 4]} if name == "XDeepFM" else {"cross_layers": 3}
    if name != "CrossNet":
        kw["hidden"] = [8]
    net = getattr(bb, name)(F, D, M, **kw).eval()
    e = torch.randn(M, B, F, D)
    outs = net.layer_outputs(e)
    if name == "XDeepFM":
        assert [o.shape for o in outs] == [(M, B, 5, D), (M, B, 4, D)]
        seen = _capture_input(net.cin_out)
        net(e)
        torch.testing.assert_close(seen[0], torch.cat([o.sum(-1) for o in outs], -1).mean(0))
        return
    assert len(outs) == 3 and all(o.shape == (M, B, F, D) for o in outs)
    head = net.tower if name == "DCNv2" else net.out
    seen = _capture_input(head)
    net(e)
    last = outs[-1].flatten(2)  # (M, B, F*D)
    want = last.mean(0) if name == "CrossNetParallel" else last
    got = seen[0][..., : F * D] if name == "CrossNetParallel" else seen[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # fused vs loop: float32 rounding only


def test_per_layer_ia_and_rankme_match_direct_computation():
    """diag layer{l}: mean over fields (and sets) of IA of the sample's (N, D) per-field matrices, and RankMe of the
    flattened (N, F*D) output, l = 1..L, in eval mode."""
    torch.manual_seed(0)
    model = CTRModel(lambda f, d, m: bb.DCNv2(f, d, m, cross_layers=3, hidden=[8]), field_dims=[6, 9, 4, 12],
                     base_dim=3, mode="ME", scale=2, embedding_init_std=0.5)
    ids, y = _sample(120)
    rep = compute_report(model, (ids, y), Options(figures=False, gradient_rankme=False, chunk_rows=50))
    model.eval()
    with torch.no_grad():
        outs = model.backbone.layer_outputs(model.embedding(ids))
    for l, o in enumerate(outs, start=1):
        ia = np.mean([[mt.information_abundance(o[m, :, f]) for f in range(4)] for m in range(2)])
        rm = np.mean([float(_rankme_svd(o[m].flatten(1))) for m in range(2)])
        assert rep.metrics[f"layer{l}/ia_mean"] == pytest.approx(ia, rel=1e-6)
        assert rep.metrics[f"layer{l}/rankme"] == pytest.approx(rm, rel=1e-6)
    assert "layer4/rankme" not in rep.metrics


# ------------------------------------------------------------------------------------------------- keys (C4), SE
def test_headline_keeps_scalars_only_and_se_has_no_nan_diversity():
    from recscale.diagnostics.compute import headline

    ids, y = _sample(50)
    me = compute_report(_tiny_model(), (ids, y), Options(figures=False), list("abcd")).metrics
    keys = set(headline(me))
    assert "ia/a" in me and "ia/a" not in keys and "ia_set1/b" not in keys and "diversity/a" not in keys
    assert {"ia/mean", "rankme/embeddings", "rankme/gradients", "diversity/mean", "layer1/ia_mean",
            "layer1/rankme", "seconds"} <= keys
    assert "layer0/rankme" not in keys and "layer1/set0/rankme" not in keys
    se1 = compute_report(_tiny_model("SE", 1), (ids, y), Options(figures=False)).metrics
    assert not any(k.startswith("diversity") for k in se1)
    se2 = compute_report(_tiny_model("SE", 2), (ids, y), Options(figures=False)).metrics
    assert 0.0 <= se2["diversity_se_split/mean"] <= 1.0 and "diversity/mean" not in se2
    assert all(math.isfinite(v) for k, v in se2.items() if "diversity" in k)


def test_figures_are_drawn_for_every_part(tmp_path):
    from recscale.diagnostics.callback import write_report

    ids, y = _sample(80)
    rep = compute_report(_tiny_model(), (ids, y), Options(title="step 3"), list("abcd"))
    files = {p.name for p in write_report(rep, tmp_path)}
    assert {"ia_heatmap.png", "spectra.png", "covariance_spectrum.png", "sub_embedding_ia.png",
            "interaction_patterns.png", "diversity.png", "ia_vs_depth.png", "values.csv"} <= files
    rows = (tmp_path / "values.csv").read_text().splitlines()
    assert rows[0] == "key,value" and any(r.startswith("ia_set1/b,") for r in rows)


# ------------------------------------------------------------------------------------------------- collapse alarms
def test_alarm_rules():
    from recscale.diagnostics.callback import CollapseDiagnostics

    cb = CollapseDiagnostics(alarm_drop=0.3, alarm_field_ia=1.5)
    prev = {"ia/mean": 10.0, "rankme/embeddings": 100.0, "ia/a": 5.0}
    assert cb.check_alarms(prev, {"ia/mean": 8.0, "rankme/embeddings": 90.0, "ia/a": 4.0}, ["a"]) == []
    msgs = cb.check_alarms(prev, {"ia/mean": 6.0, "rankme/embeddings": 90.0, "ia/a": 1.2}, ["a"])
    assert len(msgs) == 2 and msgs[0].startswith("ia/mean fell 40%") and "a" in msgs[1]
    assert CollapseDiagnostics().check_alarms(prev, {"ia/mean": 0.1, "ia/a": 0.1}, ["a"]) == []  # off by default
    with pytest.raises(ValueError, match="alarm_drop"):
        CollapseDiagnostics(alarm_drop=1.5)
