"""Mixed precision (bf16 autocast on the CPU) for every backbone, the fused layers under autocast against autograd's
graph, a bf16-mixed fit, and `--model.compile` against eager."""

import shutil

import pytest
import torch
from test_models import ALL, DIMS, small

from recscale.models import backbones as bb
from recscale.models.layers import CrossNetwork, inner_products
from recscale.models.module import CTRModel


def _model(cls, sets, backbone_kw=None, **kw):
    torch.manual_seed(0)
    dim = 6 if cls is bb.FFM else 4  # FFM: dim divisible by F - 1 = 3
    return CTRModel(lambda f, d, m: small(cls, m, d, **(backbone_kw or {})), field_dims=DIMS, base_dim=dim,
                    mode="ME" if sets > 1 else "SE", scale=sets, embedding_init_std=0.1, **kw)


def _batch(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, d, (n,), generator=g) for d in DIMS], 1).int()
    return ids, torch.randint(0, 2, (n,), generator=g).float()


def _step(model, ids, y, amp: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same dropout masks in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(ids)
        loss = model.loss(logits, y)
    loss.backward()
    model.on_before_optimizer_step(None)
    return logits, loss, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("cls", ALL + [bb.FFM], ids=lambda c: c.__name__)
@pytest.mark.parametrize("sets", [1, 3])
def test_every_backbone_trains_under_bf16_autocast(cls, sets):
    """`--trainer.precision bf16-mixed` in miniature: forward, loss and backward under bf16 autocast. Logits and loss
    are float32 (the metrics are float32 computations), every parameter gets a finite float32 gradient, and the loss
    is the float32 model's to bf16 accuracy: 8 significant bits (2^-9 unit roundoff) through a few layers of
    products accumulated in float32; 2^-5 relative bounds that with room (observed below 2^-8)."""
    model = _model(cls, sets)
    model.train()
    ids, y = _batch()
    l32, loss32, _ = _step(model, ids, y, amp=False)
    l16, loss16, grads = _step(model, ids, y, amp=True)
    assert l16.dtype == torch.float32 and loss16.dtype == torch.float32
    assert torch.isfinite(l16).all() and torch.isfinite(loss16)
    bad = [n for n, g in grads.items() if g is None or g.dtype != torch.float32 or not torch.isfinite(g).all()]
    assert not bad, bad
    assert abs(loss16.item() - loss32.item()) <= 2.0**-5 * abs(loss32.item())


def _fused_vs_graph(fn_fused, fn_graph, inputs):
    """Values and input gradients of two implementations of one layer under bf16 autocast (a fixed random upstream
    gradient, so that every output entry matters)."""
    out = []
    for fn in (fn_fused, fn_graph):
        xs = [t.detach().clone().requires_grad_(True) for t in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(*xs)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad((y.float() * w).sum(), xs)
        out.append((y, grads))
    return out


def test_fused_cross_under_autocast_matches_autograd_graph_per_tensor():
    """Gradcheck-style: the fused cross layers' hand-written backward under autocast against autograd's graph of the
    textbook layer under the same autocast, for the input and every weight and bias (3 sets, 3 layers, a real batch).
    Tolerance 2^-6 of each tensor's largest entry: the two round different bf16 intermediates (see
    tests/test_models.py::test_cross_network_under_autocast)."""
    torch.manual_seed(11)
    net = CrossNetwork(3, 12, layers=3)
    params = list(net.parameters())
    x0 = torch.randn(3, 64, 12)

    def run(naive):
        def f(x, *ps):
            with torch.no_grad():
                for p, v in zip(params, ps):
                    p.copy_(v)
            net.naive = naive
            # the parameters themselves must be the differentiated leaves: functional call over the given tensors
            return torch.func.functional_call(net, dict(zip([n for n, _ in net.named_parameters()], ps)), (x,))
        return f

    (y1, g1), (y2, g2) = _fused_vs_graph(run(False), run(True), [x0, *params])
    assert y1.dtype == y2.dtype == torch.float32
    for a, b in zip((y1, *g1), (y2, *g2), strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.0, atol=2.0**-6 * float(b.abs().max()))


def test_upper_pairs_under_autocast_matches_autograd_indexing():
    """IPNN's pair gather (hand-written scatter backward) under autocast: the products come out of autocast's bf16
    matmul, and value and gradient equal autograd's own indexing of the same products exactly (a gather and a
    scatter of the same bf16 numbers, no arithmetic)."""
    torch.manual_seed(5)
    e = torch.randn(2, 8, 5, 4)
    i, j = torch.triu_indices(5, 5, offset=1)

    def graph(x):
        return torch.matmul(x, x.transpose(-1, -2))[..., i, j]

    (y1, g1), (y2, g2) = _fused_vs_graph(inner_products, graph, [e])
    assert y1.dtype == torch.bfloat16  # autocast's product dtype passes through
    assert torch.equal(y1, y2) and torch.equal(g1[0], g2[0])


def test_bf16_mixed_fit_keeps_metrics_and_diagnostics_in_full_precision(criteo_dir, tmp_path):
    """A short Lightning fit with precision="bf16-mixed" on the bundled sample (DCNv2 ME 2x: fused cross layers, the
    sparse table gradient, fused Adam): it trains, validation AUC/logloss are float32, and the diagnostics pass that
    runs at validation end gives finite float64-derived values."""
    import lightning as L

    from recscale.data.datamodule import CTRDataModule
    from recscale.diagnostics.callback import CollapseDiagnostics

    dm = CTRDataModule(str(criteo_dir), batch_size=512, num_workers=0)
    model = CTRModel(lambda f, d, m: bb.DCNv2(f, d, m, hidden=[16, 8]), field_dims=dm.field_dims, mode="ME", scale=2)
    diag = CollapseDiagnostics(sample_rows=300, figures=False)
    seen = {}

    class Probe(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.update({k: pl_module.metrics[f"val_{k}"].compute() for k in ("auc", "logloss")})

    trainer = L.Trainer(precision="bf16-mixed", max_epochs=1, limit_train_batches=4, limit_val_batches=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[diag, Probe()], default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in seen.values()), seen
    assert diag.seconds  # the diagnostics pass ran inside the bf16 fit, at validation end
    from recscale.data.datamodule import sample_split
    from recscale.diagnostics.compute import Options, compute_report

    x, y = sample_split(dm.units("valid"), dm.fields, 300)
    r = compute_report(model, (torch.from_numpy(x), torch.from_numpy(y)), Options(figures=False), dm.fields)
    assert r.metrics and all(isinstance(v, float) and v == v for v in r.metrics.values()), r.metrics
    for p in model.parameters():
        assert p.dtype == torch.float32  # mixed precision: the weights stay float32


# ---------------------------------------------------------------- --model.compile
def _have_compiler() -> str | None:
    for cxx in ("g++", "c++", "clang++"):
        if shutil.which(cxx):
            return cxx
    return None


def test_compile_option_keeps_names_and_weights():
    """`--model.compile true` compiles the backbone in place (``nn.Module.compile``): the same parameter names, so
    checkpoints load either way, and the same initial weights for a seed. (Numerics: the slow test below.)"""
    eager, compiled = _model(bb.DNN, 2), _model(bb.DNN, 2, compile=True)
    assert compiled.hparams.compile and not eager.hparams.compile
    assert getattr(compiled.backbone, "_compiled_call_impl", None) is not None
    assert getattr(eager.backbone, "_compiled_call_impl", None) is None
    a, b = eager.state_dict(), compiled.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # inductor compiles forward and backward: 25-55 s per backbone on 2 loaded cores
@pytest.mark.skipif(_have_compiler() is None, reason="torch.compile on the CPU needs a C++ compiler (g++/clang++)")
@pytest.mark.parametrize("cls", [bb.DCNv2, bb.IPNN], ids=lambda c: c.__name__)
def test_compiled_backbone_equals_eager(cls):
    """`--model.compile true`: logits, loss and every gradient of the compiled backbone equal eager's to float32
    rounding. Inductor fuses element-wise ops and may reorder sums, so the comparison is float32-tolerance, relative
    to each tensor's scale: 1e-4 of the largest entry (float32 eps 1.2e-7 times a few hundred accumulated terms).
    Dropout off: inductor draws its masks from its own generator, so they differ from eager's."""
    eager = _model(cls, 2, {"dropout": 0.0})
    compiled = _model(cls, 2, {"dropout": 0.0}, compile=True)
    compiled.load_state_dict(eager.state_dict())  # same parameter names: compile does not rename them
    assert compiled.hparams.compile and not eager.hparams.compile
    ids, y = _batch(64)
    results = []
    for m in (eager, compiled):
        m.train()
        results.append(_step(m, ids, y, amp=False))
    (l1, loss1, g1), (l2, loss2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=0.0, atol=1e-4 * float(l1.abs().max()) + 1e-7)
    torch.testing.assert_close(loss2, loss1, rtol=1e-5, atol=0.0)
    assert g1.keys() == g2.keys()
    # a gradient that is zero in exact arithmetic (the bias of a linear layer followed by batch norm) is rounding
    # noise on both sides: a sum over the batch that cancels, amplified by batch norm's 1/std (observed 6e-5 of the
    # model's largest gradient entry for IPNN); the floor is 1e-3 of that largest entry
    floor = 1e-3 * max(float(g.to_dense().abs().max()) for g in g1.values())
    for n in g1:
        torch.testing.assert_close(g2[n].to_dense(), g1[n].to_dense(), rtol=0.0,
                                   atol=1e-4 * float(g1[n].to_dense().abs().max()) + floor, msg=n)
