"""Backbones: shapes, gradients, pinned numerics against naive loops, SE/ME equivalences, batched == per-set loop."""

import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from recscale.models import backbones as bb
from recscale.models.layers import (
    CIN,
    CrossNetwork,
    FieldWeightedPairs,
    SelfAttentionLayers,
    SetBatchNorm,
    SetLinear,
    Tower,
    bi_interaction,
    fm_pairwise,
    inner_products,
)
from recscale.models.module import CTRModel

ALL = [bb.DNN, bb.IPNN, bb.NFwFM, bb.XDeepFM, bb.DCNv2, bb.FinalMLP, bb.AutoInt, bb.FM, bb.DeepFM, bb.NFM,
       bb.LinearDeepFM, bb.CrossNet, bb.CrossNetParallel]
SHAREABLE = [bb.NFwFM, bb.XDeepFM, bb.DCNv2, bb.AutoInt, bb.CrossNet, bb.CrossNetParallel]
DIMS = [5, 7, 3, 11]


def small(cls, sets, dim=4, **kw):
    extra = {}
    if "hidden" in cls.__init__.__code__.co_varnames:
        extra["hidden"] = 8 if cls is bb.LinearDeepFM else [8, 6]
    return cls(len(DIMS), dim, sets, **extra, **kw)


@pytest.mark.parametrize("cls", ALL + [bb.FFM])
@pytest.mark.parametrize("sets", [1, 3])
def test_shapes_finite_and_every_parameter_gets_a_gradient(cls, sets):
    torch.manual_seed(0)
    dim = 6 if cls is bb.FFM else 4  # FFM: dim divisible by F - 1 = 3
    model = CTRModel(lambda f, d, m: small(cls, m, d), field_dims=DIMS, base_dim=dim,
                     mode="ME" if sets > 1 else "SE", scale=sets, embedding_init_std=0.1)
    assert model.num_sets == sets and model.embed_dim == dim
    ids = torch.stack([torch.randint(0, n, (16,)) for n in DIMS], 1).int()
    y = torch.randint(0, 2, (16,)).float()
    logits = model(ids)
    assert logits.shape == (16,)
    loss = model.loss(logits, y)
    assert torch.isfinite(loss)
    loss.backward()
    model.on_before_optimizer_step(None)  # what Lightning runs before the step: the sparse table gradient -> dense
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    dead = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0 and "wxy" not in n]
    assert not dead, dead  # FinalMLP's W_xy starts at zero but still gets a gradient (checked above)


# ---------------------------------------------------------------- pinned numerics: naive loops on tiny inputs
def test_inner_products_hand_checked():
    e = torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [0.0, -1.0]]]])  # (1, 1, 3, 2)
    # <e1,e2> = 3 + 8 = 11, <e1,e3> = -2, <e2,e3> = -4
    assert inner_products(e).tolist() == [[[11.0, -2.0, -4.0]]]
    assert fm_pairwise(e).tolist() == [[5.0]]
    assert bi_interaction(e).tolist() == [[[3.0, 2.0]]]  # e1*e2 + e1*e3 + e2*e3 = [3,8] + [0,-2] + [0,-4]


def test_inner_products_gradient_against_loop():
    """The pair gather's hand-written backward: gradcheck, and the gradient of a weighted sum of the products equals
    the closed form dL/de_i = sum_{j != i} w_ij e_j computed by a loop."""
    torch.manual_seed(4)
    e = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(inner_products, (e,))
    w = torch.randn(6, dtype=torch.float64)
    (g,) = torch.autograd.grad((inner_products(e) * w).sum(), e)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    want = torch.zeros_like(e)
    for k, (i, j) in enumerate(pairs):
        want[:, :, i] += w[k] * e[:, :, j].detach()
        want[:, :, j] += w[k] * e[:, :, i].detach()
    torch.testing.assert_close(g, want)


@pytest.mark.parametrize("pairs", ["all", "upper"])
def test_fwfm_against_loop(pairs):
    """NFwFM pooling: ``sum over (i, j) of r_ij e_i * e_j``, every ordered pair incl. i = j with a full F x F weight
    matrix (``all``, the reference fwfm.py) or i < j only (``upper``)."""
    torch.manual_seed(1)
    pool = FieldWeightedPairs(2, 4, pairs)
    nn.init.normal_(pool.r)
    e = torch.randn(2, 3, 4, 5)
    got = pool(e)
    r = pool.r.detach()
    for m, b in itertools.product(range(2), range(3)):
        want, k = torch.zeros(5), 0
        for i in range(4):
            for j in range(4):
                if pairs == "all":
                    want += r[m, i, j] * e[m, b, i] * e[m, b, j]
                elif j > i:
                    want += r[m, k] * e[m, b, i] * e[m, b, j]
                    k += 1
        torch.testing.assert_close(got[m, b], want)


def test_nfwfm_default_is_the_reference_pooling():
    """ICML reference fwfm.py: F x F weights per set (self-terms included), r ~ N(0, 1); 'upper' keeps F(F-1)/2 ones."""
    torch.manual_seed(0)
    F_ = 39
    model = bb.NFwFM(F_, 4, 3, hidden=[8])
    assert model.pool.r.shape == (3, F_, F_)
    # 4563 N(0, 1) draws: the sample std is within 0.1 of 1 with overwhelming probability (its sd is about 0.01)
    assert abs(float(model.pool.r.detach().std()) - 1.0) < 0.1 and abs(float(model.pool.r.detach().mean())) < 0.1
    upper = bb.NFwFM(F_, 4, 3, hidden=[8], pairs="upper")
    assert upper.pool.r.shape == (3, F_ * (F_ - 1) // 2) and bool((upper.pool.r == 1).all())


def test_cross_network_against_loop():
    torch.manual_seed(2)
    net = CrossNetwork(2, 6, layers=3)
    x0 = torch.randn(2, 4, 6)
    got = net(x0)
    for m, b in itertools.product(range(2), range(4)):
        x = x0[m, b]
        for lin in net.layers:
            W, c = lin.weight[m], lin.bias[m, 0]
            x = torch.stack([x0[m, b, i] * (sum(x[j] * W[j, i] for j in range(6)) + c[i]) + x[i] for i in range(6)])
        torch.testing.assert_close(got[m, b], x)


def test_fused_cross_matches_autograd_graph_and_gradcheck():
    """The hand-written backward of the fused cross layers: numerical gradcheck (float64) on every input, and equal to
    autograd through the textbook ``x0 * lin(x) + x`` graph (``naive=True``) on values and gradients."""
    from recscale.models.layers import _FusedCross

    torch.manual_seed(5)
    net = CrossNetwork(3, 5, layers=3).double()
    x0 = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    wb = [t.detach().clone().requires_grad_(True) for lin in net.layers for t in (lin.weight, lin.bias)]
    assert torch.autograd.gradcheck(lambda x, *p: _FusedCross.apply(x, *p), (x0, *wb))
    g = torch.randn(3, 4, 5, dtype=torch.float64)
    fused = net(x0)
    grads_fused = torch.autograd.grad(fused, [x0, *net.parameters()], g)
    net.naive = True
    plain = net(x0)
    grads_plain = torch.autograd.grad(plain, [x0, *net.parameters()], g)
    torch.testing.assert_close(fused, plain)
    for a, b in zip(grads_fused, grads_plain, strict=True):
        torch.testing.assert_close(a, b)


def test_cross_network_under_autocast():
    """Mixed precision (bf16 autocast, as `--trainer.precision bf16-mixed`): the fused cross layers run under autocast
    (torch.amp.custom_fwd/custom_bwd) and agree with autograd's graph of the textbook layer to bf16 rounding.

    Tolerance: bf16 keeps 8 significant bits (unit roundoff 2^-9). The two paths round different intermediates to bf16
    (the fused backward sums the bias gradient in float32, autograd's graph in bf16; addcmul vs mul + add), a few
    roundings of values no larger than the tensor's largest entry: 2^-6 of that entry bounds them with room (observed
    about 2^-10). A path that ignored autocast would still pass this; the float32 comparison below catches that."""
    torch.manual_seed(7)
    net = CrossNetwork(2, 6, layers=2)
    x0 = torch.randn(2, 4, 6)
    results = []
    for naive, amp in ((False, True), (True, True), (False, False)):
        net.naive = naive
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = net(x)
        if not naive:
            assert "FusedCross" in type(out.grad_fn).__name__  # the fused layer ran, it did not step aside
        grads = torch.autograd.grad(out.float().sum(), [x, *net.parameters()])
        assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
        results.append((out, grads))
    (o1, g1), (o2, g2), (o3, _) = results
    assert torch.isfinite(o1).all()
    for a, b in zip((o1, *g1), (o2, *g2), strict=True):
        torch.testing.assert_close(a, b, rtol=0.0, atol=2.0**-6 * float(b.abs().max()))
    # autocast was honoured: bf16 products differ from the float32 layer far beyond float32 rounding (~1e-7)
    assert float((o1 - o3).abs().max()) > 1e-4


def test_shared_cross_layer_broadcasts_over_sets():
    """A 1-set (shared, Fig. 10c) cross network applied to M sets: every set goes through the same weights."""
    torch.manual_seed(6)
    net = CrossNetwork(1, 6, layers=2)
    x0 = torch.randn(3, 4, 6)
    out = net(x0)
    for m in range(3):
        torch.testing.assert_close(out[m : m + 1], net(x0[m : m + 1]))


def test_cin_against_loop():
    torch.manual_seed(3)
    F_, D = 3, 4
    cin = CIN(2, F_, [2, 3])
    e = torch.randn(2, 2, F_, D)
    got = cin(e)
    for m, b in itertools.product(range(2), range(2)):
        x0, x, pooled = e[m, b], e[m, b], []
        for conv in cin.convs:
            W, c = conv.weight[m], conv.bias[m, 0]  # W: (H*F, H')
            H = x.shape[0]
            out = torch.zeros(W.shape[1], D)
            for h2 in range(W.shape[1]):
                for h in range(H):
                    for f in range(F_):
                        out[h2] += W[h * F_ + f, h2] * x[h] * x0[f]
                out[h2] = torch.relu(out[h2] + c[h2])
            x = out
            pooled.append(out.sum(-1))
        torch.testing.assert_close(got[m, b], torch.cat(pooled), atol=1e-5, rtol=1e-5)


def test_cin_fast_path_equals_outer_product_form():
    torch.manual_seed(11)
    cin = CIN(3, 5, [4, 6])
    e = torch.randn(3, 7, 5, 4, requires_grad=True)
    fast = cin(e)
    cin.naive = True
    slow = cin(e)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    (g1,) = torch.autograd.grad(fast.sum(), e)
    (g2,) = torch.autograd.grad(slow.sum(), e)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


def _reference_autoint_set(att: SelfAttentionLayers, m: int, e: torch.Tensor) -> tuple[torch.Tensor, list]:
    """One set through torch.nn.MultiheadAttention + LayerNorm with that set's weights: the reference afi.py
    ``MultiHeadSelfAttentionInteraction`` (batch second), followed by its ReLU."""
    A, H = att.att_dim, att.heads
    x = e @ att.embed.weight[m] + att.embed.bias[m, 0]  # (B, F, A)
    x = x.transpose(0, 1)  # (F, B, A)
    outs = []
    for qkv, out, norm in zip(att.qkv, att.out, att.norm):
        mha = nn.MultiheadAttention(A, H)
        ln = nn.LayerNorm(A)
        with torch.no_grad():
            mha.in_proj_weight.copy_(qkv.weight[m].T)
            mha.in_proj_bias.copy_(qkv.bias[m, 0])
            mha.out_proj.weight.copy_(out.weight[m].T)
            mha.out_proj.bias.copy_(out.bias[m, 0])
            ln.weight.copy_(norm.weight[m, 0])
            ln.bias.copy_(norm.bias[m, 0])
        x = ln(x + mha(x, x, x)[0])
        outs.append(x.transpose(0, 1))
    return torch.relu(outs[-1]), outs


def test_self_attention_equals_torch_multihead_attention_per_set():
    """ICML App. D / reference afi.py: scaled multi-head attention, residual, LayerNorm, ReLU; every set of the batched
    layer equals torch's MultiheadAttention run with that set's weights, and layer_outputs are the per-layer outputs."""
    torch.manual_seed(4)
    M = 3
    att = SelfAttentionLayers(M, dim=3, layers=2, heads=2, att_dim=4).eval()
    for p_ in att.parameters():  # non-trivial LayerNorm affine and biases
        nn.init.normal_(p_, std=0.5)
    e = torch.randn(M, 5, 4, 3)
    got, layers = att(e), att.layer_outputs(e)
    assert len(layers) == 2 and all(t.shape == (M, 5, 4, 4) for t in layers)
    for m in range(M):
        want, want_layers = _reference_autoint_set(att, m, e[m])
        torch.testing.assert_close(got[m], want, atol=1e-5, rtol=1e-5)
        for a_, b_ in zip(layers, want_layers, strict=True):
            torch.testing.assert_close(a_[m], b_, atol=1e-5, rtol=1e-5)


def test_autoint_logit_layout_against_per_set_loop():
    """MultiAutoInt of the reference: logit = Linear(F*A, 1)(mean_m ReLU(Att_m(e_m))) + DNN tower; each set by itself."""
    torch.manual_seed(12)
    M = 3
    model = bb.AutoInt(len(DIMS), 4, M, attention_layers=2, heads=2, att_dim=4, hidden=[8, 6]).eval()
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.uniform_(-0.5, 0.5), mod.running_var.uniform_(0.5, 2.0)
    e = torch.randn(M, 7, len(DIMS), 4)
    att = torch.stack([_reference_autoint_set(model.att, m, e[m])[0] for m in range(M)]).mean(0)  # (B, F, A)
    want = model.att_out(att.flatten(1)).squeeze(-1) + model.tower(e.flatten(2))
    torch.testing.assert_close(model(e), want, atol=1e-5, rtol=1e-5)
    assert [t.shape for t in model.layer_outputs(e)] == [(M, 7, len(DIMS), 4)] * 2
    fresh = SelfAttentionLayers(2, 3, layers=1, heads=2, att_dim=8)  # nn.MultiheadAttention's init
    assert bool((fresh.qkv[0].bias == 0).all()) and bool((fresh.out[0].bias == 0).all())
    assert float(fresh.qkv[0].weight.abs().max()) <= math.sqrt(6.0 / 32)
    no_dnn = bb.AutoInt(len(DIMS), 4, M, attention_layers=1, heads=1, att_dim=4, hidden=[])
    assert no_dnn.tower is None and no_dnn(e).shape == (7,)


def test_finalmlp_fusion_against_formula():
    torch.manual_seed(5)
    model = bb.FinalMLP(3, 2, 1, hidden=[4, 3]).eval()
    nn.init.normal_(model.wxy)
    e = torch.randn(1, 5, 3, 2)
    x, y = (s(e.flatten(2)).mean(0) for s in model.streams)
    got = model(e)
    for b in range(5):
        want = model.wx.weight[0] @ x[b] + model.wx.bias[0] + model.wy.weight[0] @ y[b] + x[b] @ model.wxy @ y[b]
        torch.testing.assert_close(got[b], want)
    assert torch.count_nonzero(bb.FinalMLP(3, 2, 1).wxy) == 0  # W_xy starts at zero


def test_ffm_against_loop():
    """Reference FieldAwareFactorizationMachineModel: logit = b + sum_i w_{x_i} + sum_{i<j} <e_i^{->j}, e_j^{->i}>."""
    torch.manual_seed(6)
    F_, k = len(DIMS), 2
    model = CTRModel(lambda f, d, m: bb.FFM(f, d, m), field_dims=DIMS, base_dim=(F_ - 1) * k)
    ids = torch.stack([torch.randint(0, n, (3,)) for n in DIMS], 1)
    e = model.embedding(ids)
    got = model(ids)
    offsets = [0, *torch.tensor(DIMS).cumsum(0).tolist()[:-1]]
    for b in range(3):
        sub = {(i, j): e[0, b, i, (j - (j > i)) * k:(j - (j > i) + 1) * k] for i in range(F_) for j in range(F_) if i != j}
        want = sum(float(sub[i, j] @ sub[j, i]) for i in range(F_) for j in range(i + 1, F_))
        want += sum(float(model.first_order[offsets[i] + int(ids[b, i]), 0]) for i in range(F_))
        want += float(model.backbone.bias)
        assert got[b].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert model.parameter_counts()["embedding"] == sum(DIMS) * (F_ - 1) * k + sum(DIMS)
    plain = CTRModel(lambda f, d, m: bb.FFM(f, d, m, first_order=False), field_dims=DIMS, base_dim=(F_ - 1) * k)
    assert plain.first_order is None


def test_ffm_config_uses_reference_sub_embedding_size():
    """configs/model/ffm.yaml: sub-embeddings of size 8 on Criteo's 39 fields (reference ``ffm`` embed_dim=8)."""
    import yaml

    from conftest import ROOT

    cfg = yaml.safe_load((ROOT / "configs" / "model" / "ffm.yaml").read_text())
    assert cfg["model"]["base_dim"] == 38 * 8


def test_ffm_rejects_sizes_that_do_not_fit():
    with pytest.raises(bb.ConfigError, match="divisible by num_fields - 1 = 38"):
        bb.FFM(39, 10, 1)


def test_dcnv2_blocks_and_regularizer():
    """Evidence III as in the reference wrdcnv2.py: every cross layer, sum_ij ||W_ij^T W_ij - I||^2 on the unscaled
    weight, lambda realised as a per-block scale N_ij of the weight the forward pass uses."""
    torch.manual_seed(7)
    F_, D = 3, 2
    model = bb.DCNv2(F_, D, 1, cross_layers=2, hidden=[4], orth_reg=1.0)
    raws = [lin.parametrizations.weight.original[0] for lin in model.cross.layers]
    want = 0.0
    for W in raws:
        blk = lambda i, j: W[i * D:(i + 1) * D, j * D:(j + 1) * D]  # noqa: E731
        want = want + sum((blk(i, j) @ blk(i, j).T - torch.eye(D)).pow(2).sum() for i in range(F_) for j in range(F_))
    torch.testing.assert_close(model.regularization(), want)
    # the forward pass uses N (.) W: a block scale of 2 doubles that block of W_1 (blocks() sees the used weight)
    with torch.no_grad():
        model.cross.layers[0].parametrizations.weight[0].scale[0, 1, 2] = 2.0
    B = model.blocks()[0]
    W1 = raws[0]
    for i, j in itertools.product(range(F_), range(F_)):
        torch.testing.assert_close(B[i, j], W1[i * D:(i + 1) * D, j * D:(j + 1) * D] * (2.0 if (i, j) == (1, 2) else 1.0))
    torch.testing.assert_close(model.regularization(), want)  # the scale is outside the penalty
    # an orthogonal W with the identity target contributes D per zero off-diagonal block and 0 per diagonal block
    with torch.no_grad():
        for W in raws:
            W.copy_(torch.eye(F_ * D))
    assert model.regularization().item() == pytest.approx(2 * (F_ * F_ - F_) * D)
    first = bb.DCNv2(F_, D, 1, cross_layers=2, hidden=[4], orth_reg=1.0, orth_layers="first")
    assert not parametrize.is_parametrized(first.cross.layers[1])  # layer 2 is neither scaled nor regularised
    with torch.no_grad():
        first.cross.layers[0].parametrizations.weight.original.copy_(torch.eye(F_ * D))
    assert first.regularization().item() == pytest.approx((F_ * F_ - F_) * D)


def test_dcnv2_regularizer_penalty_form():
    """orth_lambda='penalty': the paper's formula read literally, learnable lambda_ij inside the penalty."""
    torch.manual_seed(7)
    F_, D = 3, 2
    model = bb.DCNv2(F_, D, 1, cross_layers=2, hidden=[4], orth_reg=0.5, orth_lambda="penalty")
    with torch.no_grad():
        model.lam.uniform_(0.5, 2.0)
    want = 0.0
    for l, lin in enumerate(model.cross.layers):
        B = model.blocks(l)[0]
        lam = model.lam.detach()[l, 0]
        want = want + sum(((B[i, j] @ B[i, j].T) - lam[i, j] * torch.eye(D)).pow(2).sum()
                          for i in range(F_) for j in range(F_))
    torch.testing.assert_close(model.regularization(), 0.5 * want)


def test_cross_layers_use_the_reference_xavier_init():
    """ICML reference CrossNetworkV2: W xavier_uniform (bound sqrt(6 / 2n)), b = 0; 'linear' keeps nn.Linear's."""
    torch.manual_seed(0)
    n = 200
    net = CrossNetwork(2, n, layers=2)
    bound = math.sqrt(3.0 / n)
    for lin in net.layers:
        assert bool((lin.bias == 0).all()) and float(lin.weight.abs().max()) <= bound
        # 80,000 uniform draws: the sample std is within 2 % of bound / sqrt(3)
        assert float(lin.weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)
    old = CrossNetwork(2, n, layers=1, init="linear")
    assert float(old.layers[0].bias.abs().max()) > 0


def test_embedding_init_default_is_icml_xavier_and_normal_is_an_option():
    torch.manual_seed(0)
    dims = [3000, 2000]
    m = CTRModel(bb.DNN, field_dims=dims, base_dim=10, mode="ME", scale=2)
    bound = math.sqrt(6.0 / (sum(dims) + 10))  # xavier over each set's (sum|V|, D) table
    w = m.embedding.weight
    assert float(w.abs().max()) <= bound
    assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)  # 100,000 draws
    f = CTRModel(bb.DNN, field_dims=dims, base_dim=10, mode="ME", scale=2, embedding_init="normal")
    assert float(f.embedding.weight.std()) == pytest.approx(1e-4, rel=0.02)
    with pytest.raises(bb.ConfigError, match="model.embedding_init"):
        CTRModel(bb.DNN, field_dims=dims, embedding_init="uniform")


def test_embedding_l2_is_fuxictr_table_regulariser():
    """embedding_l2: + lambda/2 ||E||_F^2 over the whole table (FuxiCTR regularization_loss); its gradient reaches
    rows that the batch did not look up."""
    torch.manual_seed(0)
    kw = dict(field_dims=DIMS, base_dim=3, mode="ME", scale=2)
    plain = CTRModel(lambda f, d, m: bb.FM(f, d, m), **kw)
    torch.manual_seed(0)
    reg = CTRModel(lambda f, d, m: bb.FM(f, d, m), embedding_l2=1e-2, recipe="sigir26", **kw)
    ids = torch.stack([torch.randint(0, 2, (8,)) for _ in DIMS], 1)
    y = torch.ones(8)
    diff = reg.loss(reg(ids), y) - plain.loss(plain(ids), y)
    torch.testing.assert_close(diff, 0.5e-2 * reg.embedding.weight.detach().pow(2).sum())
    reg.loss(reg(ids), y).backward()
    reg.on_before_optimizer_step(None)
    untouched = reg.embedding.offsets[1] + 5  # field 1, id 5: never looked up (ids < 2)
    torch.testing.assert_close(reg.embedding.weight.grad[untouched], 1e-2 * reg.embedding.weight[untouched].detach())
    assert reg.hparams.recipe == "sigir26" and plain.hparams.recipe == "icml24"


@pytest.mark.parametrize("cls", [bb.DeepFM, bb.NFM, bb.DCNv2, bb.CrossNetParallel])
def test_batch_norm_can_be_switched_off(cls):
    """SIGIR recipe (FuxiCTR batch_norm: False): no BatchNorm anywhere in the model."""
    model = small(cls, 2, batch_norm=False)
    assert not [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, SetBatchNorm))]
    assert [m for m in small(cls, 2).modules() if isinstance(m, nn.BatchNorm1d)]
    assert model(torch.randn(2, 5, len(DIMS), 4)).shape == (5,)


# ---------------------------------------------------------------- SE / ME relations
def test_me_with_one_set_is_se():
    torch.manual_seed(0)
    a = CTRModel(lambda f, d, m: bb.DCNv2(f, d, m, hidden=[8, 8]), field_dims=DIMS, base_dim=4, mode="ME", scale=1)
    torch.manual_seed(0)
    b = CTRModel(lambda f, d, m: bb.DCNv2(f, d, m, hidden=[8, 8]), field_dims=DIMS, base_dim=4, mode="SE", scale=1)
    a.eval(), b.eval()
    ids = torch.stack([torch.randint(0, n, (8,)) for n in DIMS], 1)
    torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=0)
    assert a.parameter_counts() == b.parameter_counts()


def test_linear_interaction_me_reduces_to_se():
    """ICML 2024 App. E: with linear interactions (FM; a linear projection of the concatenation), an ME model with M
    sets of size D equals an SE model of size M*D with rearranged weights, up to the 1/M of the mean."""
    torch.manual_seed(8)
    M, F_, D, H = 3, 4, 2, 5
    me = bb.LinearDeepFM(F_, D, M, hidden=H)
    se = bb.LinearDeepFM(F_, M * D, 1, hidden=H)
    e = torch.randn(M, 6, F_, D)
    e_se = e.permute(1, 2, 0, 3).reshape(1, 6, F_, M * D)  # concatenate the sets of each field
    with torch.no_grad():
        # SE row (field i, set m, d) <- ME set m row (field i, d), divided by M (the mean over sets)
        W = me.w_in.weight.reshape(M, F_, D, H).permute(1, 0, 2, 3).reshape(F_ * M * D, H) / M
        se.w_in.weight.copy_(W[None])
        se.w_in.bias.copy_(me.w_in.bias.mean(0, keepdim=True))
        se.w_out.load_state_dict(me.w_out.state_dict())
        se.bias.copy_(me.bias)
    fm_me = fm_pairwise(e).mean(0)
    fm_se = fm_pairwise(e_se)[0]
    torch.testing.assert_close(fm_se, M * fm_me)  # the same interaction up to the scalar M
    lin_me = me(e) - fm_me - me.bias
    lin_se = se(e_se) - fm_se - se.bias
    torch.testing.assert_close(lin_me, lin_se, atol=1e-5, rtol=1e-5)


def test_nonlinear_projection_breaks_the_equivalence():
    """With the ReLU projection of the ME tower the same rearrangement no longer reproduces ME (App. E, Sec. 5.1)."""
    torch.manual_seed(9)
    M, F_, D = 3, 4, 2
    me = bb.DNN(F_, D, M, hidden=[5], dropout=0.0).eval()
    se = bb.DNN(F_, M * D, 1, hidden=[5], dropout=0.0).eval()
    with torch.no_grad():
        W = me.tower.project.linear.weight.reshape(M, F_, D, 5).permute(1, 0, 2, 3).reshape(1, F_ * M * D, 5) / M
        se.tower.project.linear.weight.copy_(W)
        se.tower.project.linear.bias.copy_(me.tower.project.linear.bias.mean(0, keepdim=True))
        se.tower.out.load_state_dict(me.tower.out.state_dict())
    e = torch.randn(M, 64, F_, D)
    assert (me(e) - se(e.permute(1, 2, 0, 3).reshape(1, 64, F_, M * D))).abs().max() > 1e-3


def _per_set_reference(model: nn.Module, e: torch.Tensor) -> torch.Tensor:
    """Run each set through its own slice of every set-batched weight, one set at a time (the straightforward loop),
    then average the per-set projections and apply the shared head."""

    def slice_set(module, m):
        clone = type(module).__new__(type(module))
        clone.__dict__ = dict(module.__dict__)
        clone._parameters = dict(module._parameters)
        clone._modules = {k: slice_set(v, m) for k, v in module._modules.items()}
        clone._buffers = dict(module._buffers)
        if isinstance(module, SetLinear):
            clone._parameters = {k: v[m:m + 1] if v is not None and v.shape[0] > 1 else v
                                 for k, v in module._parameters.items()}
        if isinstance(module, FieldWeightedPairs) and module.r.shape[0] > 1:
            clone._parameters = {"r": module.r[m:m + 1]}
        if isinstance(module, SetBatchNorm):
            C = module.bn.num_features // M
            bn = nn.BatchNorm1d(C).eval()
            bn.weight, bn.bias = nn.Parameter(module.bn.weight[m * C:(m + 1) * C]), nn.Parameter(module.bn.bias[m * C:(m + 1) * C])
            bn.running_mean, bn.running_var = module.bn.running_mean[m * C:(m + 1) * C], module.bn.running_var[m * C:(m + 1) * C]
            clone._modules = {"bn": bn}
        return clone

    M = e.shape[0]
    tower = model.tower
    feats = []
    for m in range(M):
        one = slice_set(model, m)
        captured = {}
        one.tower = _Capture(captured)
        one(e[m:m + 1])
        feats.append(slice_set(tower.project, m)(captured["z"]))
    h = torch.cat(feats).mean(0)
    return tower.out(tower.shared(h)).squeeze(-1)


class _Capture(nn.Module):
    def __init__(self, store):
        super().__init__()
        self.store = store

    def forward(self, z):
        self.store["z"] = z
        return z.new_zeros(z.shape[1])


@pytest.mark.parametrize("cls", [bb.DNN, bb.IPNN, bb.NFwFM, bb.DCNv2, bb.NFM])
def test_batched_sets_equal_the_per_set_loop(cls):
    torch.manual_seed(10)
    M = 3
    model = small(cls, M).eval()
    for mod in model.modules():  # non-trivial BN statistics
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.uniform_(-0.5, 0.5), mod.running_var.uniform_(0.5, 2.0)
    e = torch.randn(M, 7, len(DIMS), 4)
    torch.testing.assert_close(model(e), _per_set_reference(model, e), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", SHAREABLE)
def test_shared_interaction_has_one_set_of_interaction_weights(cls):
    shared, own = small(cls, 4, shared_interaction=True), small(cls, 4)
    n_shared = sum(p.numel() for p in shared.parameters())
    n_own = sum(p.numel() for p in own.parameters())
    assert n_shared < n_own
    out = shared(torch.randn(4, 5, len(DIMS), 4))
    assert out.shape == (5,)


def test_shared_batch_norm_equals_one_module_called_per_set():
    """A BN shared by all sets (Fig. 10c) behaves like the reference's one BatchNorm1d called once per set: per-set
    batch statistics in training, the M running-statistics updates in set order, shared running statistics in eval."""
    torch.manual_seed(13)
    M, B, C = 3, 6, 4
    shared = SetBatchNorm(1, C)
    ref = nn.BatchNorm1d(C)
    with torch.no_grad():
        for bn in (shared.bn, ref):
            bn.weight.copy_(torch.linspace(0.5, 2.0, C))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, C))
    for _ in range(2):  # two training steps
        x = torch.randn(M, B, C) * 3 + 1
        got = shared(x)
        want = torch.stack([ref(x[m]) for m in range(M)])
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(shared.bn.running_mean, ref.running_mean)
    torch.testing.assert_close(shared.bn.running_var, ref.running_var)
    assert int(shared.bn.num_batches_tracked) == int(ref.num_batches_tracked) == 2 * M
    shared.eval(), ref.eval()
    x = torch.randn(M, B, C)
    torch.testing.assert_close(shared(x), torch.stack([ref(x[m]) for m in range(M)]))


@pytest.mark.parametrize("cls", [bb.DCNv2, bb.NFwFM, bb.CrossNet])
def test_shared_interaction_shares_the_first_projection(cls):
    """Fig. 10c as the reference MultiESingleIDCNv2: the cross net AND the first MLP layer are one block shared by all
    sets, so the dense parameter count does not grow with M; each set still goes through it and the mean is taken."""
    counts = {m: sum(p.numel() for p in small(cls, m, shared_interaction=True).parameters()) for m in (2, 5)}
    assert counts[2] == counts[5]
    torch.manual_seed(3)
    model = small(cls, 3, shared_interaction=True).eval()
    e = torch.randn(3, 6, len(DIMS), 4)
    assert torch.isfinite(model(e)).all()


def test_set_linear_matches_nn_linear_init_bound():
    torch.manual_seed(0)
    lin = SetLinear(5, 100, 3)
    assert lin.weight.abs().max() <= 1 / math.sqrt(100) and lin.weight.std() > 0.03


def test_tower_is_plain_mlp_for_one_set():
    torch.manual_seed(0)
    t = Tower(1, 6, [4, 3], dropout=0.0).eval()
    z = torch.randn(1, 5, 6)
    p = t.project
    h = torch.relu(p.bn.bn(z[0] @ p.linear.weight[0] + p.linear.bias[0]))
    torch.testing.assert_close(t(z), t.out(t.shared(h)).squeeze(-1))


def test_scale_and_mode_set_sizes():
    for mode, scale, sets, dim in [("SE", 10, 1, 100), ("ME", 10, 10, 10), ("SE", 1, 1, 10), ("ME", 3, 3, 10)]:
        m = CTRModel(bb.DNN, field_dims=DIMS, mode=mode, scale=scale)
        assert (m.num_sets, m.embed_dim) == (sets, dim)
        assert m.embedding.weight.shape == (sum(DIMS), sets * dim)
        assert m.parameter_counts()["embedding"] == sum(DIMS) * sets * dim


def test_set_embedding_layout():
    m = CTRModel(bb.DNN, field_dims=DIMS, mode="ME", scale=2, base_dim=3, embedding_init_std=1.0)
    ids = torch.tensor([[1, 2, 0, 10]])
    e = m.embedding(ids)  # (2, 1, 4, 3)
    for f, i in enumerate(ids[0].tolist()):
        for s in range(2):
            torch.testing.assert_close(e[s, 0, f], m.embedding.table(f, s)[i])


def test_bad_model_options():
    with pytest.raises(bb.ConfigError, match="model.scale must be a positive integer"):
        CTRModel(bb.DNN, field_dims=DIMS, scale=0)
    with pytest.raises(bb.ConfigError, match="model.field_dims is empty"):
        CTRModel(bb.DNN, field_dims=None)


def test_sparse_embedding_gradient_gives_the_same_updates():
    """The persistent-buffer route feeds Adam the same dense gradient as autograd's dense embedding backward,
    including rows looked up twice in a batch and rows touched in an earlier step only."""
    models = []
    for sparse in (True, False):
        torch.manual_seed(0)
        models.append(CTRModel(lambda f, d, m: bb.DNN(f, d, m, hidden=[8, 8], dropout=0.0), field_dims=DIMS,
                               base_dim=3, mode="ME", scale=2, embedding_init_std=0.1, sparse_embedding_grad=sparse))
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-3, fused=True) for m in models]
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        ids = torch.stack([torch.randint(0, n, (32,), generator=g) for n in DIMS], 1)
        ids[:4] = ids[4:8]  # duplicated rows
        y = torch.randint(0, 2, (32,), generator=g).float()
        grads = []
        for m, o in zip(models, opts):
            o.zero_grad(set_to_none=True)
            m.loss(m(ids), y).backward()
            m.embedding.densify_grad()
            grads.append(m.embedding.weight.grad.clone())
            o.step()
        assert not grads[0].is_sparse
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(models[0].embedding.weight, models[1].embedding.weight, rtol=1e-5, atol=1e-7)
    assert models[0].embedding._grad_buffer is not None and models[1].embedding._grad_buffer is None
