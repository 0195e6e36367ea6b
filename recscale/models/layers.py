"""Building blocks batched over embedding sets.

Every tensor that flows through an interaction carries a leading set axis ``M`` (``M = 1`` is single-embedding):
field embeddings are ``e: (M, B, F, D)``. Per-set weights are stacked on the same leading axis, so one ``matmul`` serves
all sets; a weight created with ``sets=1`` is shared by all sets through broadcasting (the ICML 2024 Fig. 10c ablation).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn


class SetLinear(nn.Module):
    """Independent ``Linear(in_dim, out_dim)`` per set: ``y[m] = x[m] @ W[m] + b[m]``.

    Each set's weights are initialised exactly like ``nn.Linear`` (Kaiming-uniform, fan-in bound).
    """

    def __init__(self, sets: int, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(sets, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(sets, 1, out_dim)) if bias else None
        bound = 1 / math.sqrt(in_dim) if in_dim > 0 else 0
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:  # (M, ..., in) -> (M, ..., out)
        shape = x.shape
        x3 = x.reshape(shape[0], -1, shape[-1])
        # bias folded into the product (one pass less over the output, as nn.Linear's addmm)
        if self.bias is None or self.weight.shape[0] != x3.shape[0]:  # a shared (1-set) layer broadcasts over sets
            y = torch.matmul(x3, self.weight)
            y = y if self.bias is None else y + self.bias
        else:
            y = torch.baddbmm(self.bias, x3, self.weight)
        return y.reshape(*shape[:-1], y.shape[-1])


class SetBatchNorm(nn.Module):
    """BatchNorm1d with separate statistics and affine parameters per set (one BN over ``M * C`` channels).

    Built with ``sets=1`` and applied to M sets (a block shared by all sets, ICML 2024 Fig. 10c): exactly what the
    reference ``MultiESingleIDCNv2`` does by calling its one shared BatchNorm1d once per set. In training each set is
    normalised with its own batch statistics, and the shared running statistics receive the M updates in set order,
    ``r <- (1 - mu) r + mu s_m`` for m = 1..M, in closed form
    ``r_M = (1 - mu)^M r_0 + sum_m mu (1 - mu)^(M - m) s_m``; in eval every set uses the shared running statistics.
    """

    def __init__(self, sets: int, channels: int):
        super().__init__()
        self.sets, self.channels = sets, channels
        self.bn = nn.BatchNorm1d(sets * channels)

    def forward(self, x: Tensor) -> Tensor:  # (M, B, C)
        M, B, C = x.shape
        if self.sets == 1 and M > 1:
            return self._shared(x)
        y = self.bn(x.transpose(0, 1).reshape(B, M * C))
        return y.reshape(B, M, C).transpose(0, 1)

    def _shared(self, x: Tensor) -> Tensor:
        bn, (M, B, C) = self.bn, x.shape
        if not (self.training or bn.running_mean is None):
            return bn(x.reshape(M * B, C)).reshape(M, B, C)
        mean = x.mean(1, keepdim=True)  # (M, 1, C): each set's batch statistics
        var = x.var(1, unbiased=False, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + bn.eps)
        if bn.affine:
            y = y * bn.weight + bn.bias
        if self.training and bn.track_running_stats:
            with torch.no_grad():
                unbiased = var * (B / max(B - 1, 1))
                if bn.momentum is None:  # cumulative average: a different mu per update, applied in set order
                    for m in range(M):
                        bn.num_batches_tracked.add_(1)
                        mu = 1.0 / float(bn.num_batches_tracked)
                        bn.running_mean.mul_(1 - mu).add_(mu * mean[m, 0])
                        bn.running_var.mul_(1 - mu).add_(mu * unbiased[m, 0])
                else:
                    bn.num_batches_tracked.add_(M)
                    mu = bn.momentum
                    w = mu * (1 - mu) ** torch.arange(M - 1, -1, -1, dtype=x.dtype, device=x.device)  # (M,)
                    bn.running_mean.mul_((1 - mu) ** M).add_((w[:, None] * mean[:, 0]).sum(0))
                    bn.running_var.mul_((1 - mu) ** M).add_((w[:, None] * unbiased[:, 0]).sum(0))
        return y


class SetMLPBlock(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Dropout, per set (the reference recipe's hidden layer).

    ``batch_norm=False`` drops the BatchNorm (FuxiCTR's ``batch_norm: False``, the SIGIR 2026 recipe)."""

    def __init__(self, sets: int, in_dim: int, out_dim: int, dropout: float = 0.2, batch_norm: bool = True):
        super().__init__()
        self.linear = SetLinear(sets, in_dim, out_dim)
        self.bn = SetBatchNorm(sets, out_dim) if batch_norm else nn.Identity()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (M, B, in) -> (M, B, out)
        return self.drop(torch.relu(self.bn(self.linear(x))))


def mlp_block(in_dim: int, out_dim: int, dropout: float = 0.2, batch_norm: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim) if batch_norm else nn.Identity(),
                         nn.ReLU(), nn.Dropout(dropout))


class Tower(nn.Module):
    """The multi-embedding head of ICML 2024 Sec. 5.1 / App. C.2 (reference code topology).

    ``h = mean_m  Drop(ReLU(BN(Linear_m(z_m))))`` is the per-set non-linear projection averaged over sets, followed by
    shared layers ``hidden[1:]`` and ``Linear(hidden[-1], 1)``. With ``M = 1`` it is the plain MLP
    ``in -> hidden -> 1`` of a single-embedding model. Built with ``sets=1`` and fed M sets, the first projection is
    shared by all sets (the Fig. 10c ablation, reference ``MultiESingleIDCNv2``).
    """

    def __init__(self, sets: int, in_dim: int, hidden: list[int], dropout: float = 0.2, output: bool = True,
                 batch_norm: bool = True):
        super().__init__()
        self.project = SetMLPBlock(sets, in_dim, hidden[0], dropout, batch_norm)
        self.shared = nn.Sequential(*[mlp_block(a, b, dropout, batch_norm) for a, b in zip(hidden, hidden[1:])])
        self.out = nn.Linear(hidden[-1], 1) if output else None
        self.out_dim = 1 if output else hidden[-1]

    def forward(self, z: Tensor) -> Tensor:  # (M, B, in) -> (B,) logits, or (B, hidden[-1]) without output layer
        h = self.shared(self.project(z).mean(0))
        return self.out(h).squeeze(-1) if self.out is not None else h


# --------------------------------------------------------------------------------------------- interactions
def flatten(e: Tensor) -> Tensor:  # (M, B, F, D) -> (M, B, F*D)
    return e.flatten(2)


def pair_indices(num_fields: int, device=None) -> tuple[Tensor, Tensor]:
    """Row and column indices of the F(F-1)/2 field pairs i < j, in row-major order."""
    return torch.triu_indices(num_fields, num_fields, offset=1, device=device).unbind(0)


def _under_amp(fn: type[torch.autograd.Function], device_type: str) -> type[torch.autograd.Function]:
    """``fn`` with its forward and backward wrapped by ``torch.amp.custom_fwd`` / ``custom_bwd`` for ``device_type``.

    Mixed precision (``--trainer.precision bf16-mixed`` / ``16-mixed``): the forward runs under the caller's autocast
    state, so its ops get autocast's dtypes (products in bf16/fp16, element-wise updates promoted to float32, exactly
    what autograd's graph of the same layer gets), and the backward runs under the same autocast state (autograd
    otherwise runs it with autocast off, on another thread on GPUs). Both decorators take a fixed device type, hence
    one subclass per device type (built at import by ``_per_device``)."""
    return type(f"{fn.__name__}_{device_type}", (fn,), {
        "forward": staticmethod(torch.amp.custom_fwd(fn.forward, device_type=device_type)),
        "backward": staticmethod(torch.amp.custom_bwd(fn.backward, device_type=device_type)),
    })


def _per_device(fn: type[torch.autograd.Function]) -> dict[str, type[torch.autograd.Function]]:
    """The autocast-aware variants of ``fn`` for the device types recscale trains on; other devices use ``fn`` as is
    (correct, but its backward then runs without autocast)."""
    return {d: _under_amp(fn, d) for d in ("cpu", "cuda")}


class _UpperPairs(torch.autograd.Function):
    """``(..., F, F) -> (..., F(F-1)/2)``: the entries above the diagonal, row-major. The gradient is written back with
    a plain (non-accumulating) index_put, since every position occurs once; autograd's version of ``g[..., i, j]``
    accumulates, which is a serial loop on the CPU (12 % of an IPNN ME 10x step).

    Under autocast both directions keep the dtype they are given (a gather and a scatter, no arithmetic): the
    products arrive in bf16/fp16 from autocast's ``matmul`` and their gradient leaves in the same dtype."""

    @staticmethod
    def forward(ctx, g: Tensor) -> Tensor:
        F = g.shape[-1]
        i, j = pair_indices(F, g.device)
        flat = i * F + j
        ctx.save_for_backward(flat)
        ctx.shape = g.shape
        return g.flatten(-2)[..., flat]

    @staticmethod
    def backward(ctx, gp: Tensor) -> Tensor:
        (flat,) = ctx.saved_tensors
        out = gp.new_zeros(*ctx.shape[:-2], ctx.shape[-2] * ctx.shape[-1])
        out[..., flat] = gp
        return out.view(ctx.shape)


_UPPER_PAIRS = _per_device(_UpperPairs)


def inner_products(e: Tensor) -> Tensor:
    """IPNN product layer: ``p_ij = <e_i, e_j>`` for all i < j.  (M, B, F, D) -> (M, B, F(F-1)/2)."""
    return _UPPER_PAIRS.get(e.device.type, _UpperPairs).apply(torch.matmul(e, e.transpose(-1, -2)))


def fm_pairwise(e: Tensor) -> Tensor:
    """FM second-order term ``sum_{i<j} <e_i, e_j> = 1/2 (||sum_i e_i||^2 - sum_i ||e_i||^2)``.  (M, B, F, D) -> (M, B)."""
    s = e.sum(2)
    return 0.5 * (s.pow(2).sum(-1) - e.pow(2).sum((2, 3)))


def bi_interaction(e: Tensor) -> Tensor:
    """NFM bi-interaction pooling ``sum_{i<j} e_i * e_j`` (element-wise).  (M, B, F, D) -> (M, B, D)."""
    s = e.sum(2)
    return 0.5 * (s.pow(2) - e.pow(2).sum(2))


class FieldWeightedPairs(nn.Module):
    """Field-weighted pooling used by NFwFM: ``h = sum_{(i, j) in P} r_ij (e_i * e_j)``.  (M, B, F, D) -> (M, B, D).

    ``pairs="all"`` (default, the ICML 2024 reference code ``fwfm.py``): P is every ordered pair including the self-terms
    i = j, with a full ``F x F`` weight matrix ``r ~ N(0, 1)`` (F^2 weights per set). ``pairs="upper"``: the FwFM formula
    of Pan et al. (2018), i < j only, ``r`` initialised to 1 (F(F-1)/2 weights; recscale's model before the audit).
    The ICML paper names NFwFM without a formula, so the default follows its reference code.
    Computed as ``sum_i e_i * (R e)_i`` with ``R`` the weight matrix (full, or strictly upper triangular).
    """

    def __init__(self, sets: int, num_fields: int, pairs: Literal["all", "upper"] = "all"):
        super().__init__()
        if pairs not in ("all", "upper"):
            raise ValueError(f"pairs must be 'all' or 'upper', got {pairs!r}")
        self.num_fields, self.pairs = num_fields, pairs
        if pairs == "all":
            self.r = nn.Parameter(torch.randn(sets, num_fields, num_fields))
        else:
            self.r = nn.Parameter(torch.ones(sets, num_fields * (num_fields - 1) // 2))

    def matrix(self) -> Tensor:  # (S, F, F): h = sum_{i,j} R[i, j] e_i * e_j
        if self.pairs == "all":
            return self.r
        F = self.num_fields
        i, j = pair_indices(F, self.r.device)
        R = self.r.new_zeros(self.r.shape[0], F, F)
        R[:, i, j] = self.r
        return R

    def forward(self, e: Tensor) -> Tensor:
        Re = torch.matmul(self.matrix().unsqueeze(1), e)  # (M, B, F, D)
        return (e * Re).sum(2)


class _FusedCross(torch.autograd.Function):
    """``x_{l+1} = x_0 * (x_l W_l + b_l) + x_l`` for all layers, with a hand-written backward.

    Forward: one ``baddbmm`` and one ``addcmul`` per layer. Backward, per layer from the top, with ``g = dL/dx_{l+1}``:
    ``g_h = g * x_0``; ``dL/dx_0 += g * h_l``; ``dL/dW_l = x_l^T g_h``; ``dL/db_l = sum_b g_h``;
    ``dL/dx_l = g + g_h W_l^T`` (one ``baddbmm``). Autograd's version of the same graph makes two more passes over the
    (M, B, F*D) activations per layer in each direction (separate bias add, mul + add, residual-gradient add).

    Under autocast (through its ``_per_device`` variants, see ``_under_amp``) the ops take autocast's dtypes as in
    autograd's graph of the layer: ``h`` = ``baddbmm`` in bf16/fp16, the residual stream ``x`` in float32 (``addcmul``
    promotes);
    in the backward, ``g_h W^T`` and ``x^T g_h`` are bf16/fp16 products, and the residual gradient ``g`` stays
    float32 (``g + g_h W^T`` in two ops, since ``baddbmm`` would round the sum to bf16). The parameters' gradients
    are cast back to float32 by autograd. Values and gradients match the autograd graph's to bf16 rounding, not
    bitwise (the bias gradient is summed in float32 here, in bf16 there).
    """

    @staticmethod
    def forward(ctx, x0: Tensor, *wb: Tensor) -> Tensor:
        x, saved = x0, []
        for W, b in zip(wb[0::2], wb[1::2]):
            h = torch.baddbmm(b, x, W)
            saved += [x, h]
            x = torch.addcmul(x, x0, h)
        ctx.save_for_backward(x0, *wb, *saved)
        ctx.layers = len(wb) // 2
        return x

    @staticmethod
    def backward(ctx, g: Tensor):
        x0, *rest = ctx.saved_tensors
        L = ctx.layers
        wb, saved = rest[: 2 * L], rest[2 * L :]
        grads: list[Tensor | None] = [None] * (2 * L)
        gx0 = None
        amp = torch.is_autocast_enabled(g.device.type)
        for l in reversed(range(L)):
            W, x, h = wb[2 * l], saved[2 * l], saved[2 * l + 1]
            gh = g * x0
            gx0 = g * h if gx0 is None else gx0.addcmul_(g, h)
            grads[2 * l] = torch.bmm(x.transpose(1, 2), gh)
            grads[2 * l + 1] = gh.sum(1, keepdim=True)
            if amp:
                g = g + torch.bmm(gh, W.transpose(1, 2))  # (M, B, FD) float32 + bf16 product
            else:
                g = torch.baddbmm(g, gh, W.transpose(1, 2))
        return (gx0 + g if gx0 is not None else g), *grads


_FUSED_CROSS = _per_device(_FusedCross)


class CrossNetwork(nn.Module):
    """DCNv2 cross layers (full rank): ``x_{l+1} = x_0 * (x_l W_l + b_l) + x_l`` on ``x_0 = concat(e_1..e_F)``.

    Row-vector convention: block ``W_l[j, i]`` (D x D) carries field j into the slot of field i, i.e. the paper's
    ``W_{j->i}`` is ``W_l[j, i]^T`` and the sub-embedding ``E_i^{->j} = E_i W_{i->j}^T`` is ``E_i @ W_1[i, j]``
    (ICML 2024 Evidence II; App. E).  (M, B, F*D) -> (M, B, F*D).

    Initialisation (``init``): ``"xavier_uniform"`` (default, the ICML 2024 reference ``CrossNetworkV2``): each set's
    ``W_l`` is U(+-sqrt(6 / (2 F D))) and ``b_l = 0``; ``"linear"``: ``nn.Linear``'s U(+-1/sqrt(F D)) for ``W_l`` and
    ``b_l`` (recscale's model before the audit).

    The default path fuses each layer's ops and its backward (``_FusedCross``); ``naive=True`` is the textbook
    ``x0 * lin(x) + x`` through autograd (the benchmark baseline; the tests check that both agree).
    """

    def __init__(self, sets: int, dim: int, layers: int = 4, naive: bool = False,
                 init: Literal["xavier_uniform", "linear"] = "xavier_uniform"):
        super().__init__()
        self.layers = nn.ModuleList(SetLinear(sets, dim, dim) for _ in range(layers))
        self.naive = naive
        if init == "xavier_uniform":
            for lin in self.layers:
                bound = math.sqrt(6.0 / (2 * dim))  # fan_in = fan_out = dim
                nn.init.uniform_(lin.weight, -bound, bound)
                nn.init.zeros_(lin.bias)
        elif init != "linear":
            raise ValueError(f"cross init must be 'xavier_uniform' or 'linear', got {init!r}")

    def layer_outputs(self, x0: Tensor) -> list[Tensor]:
        """``[x_1, ..., x_L]``, each (M, B, F*D): the textbook path of ``forward`` (the fused path computes the same
        formula in one Function and keeps only ``x_L``)."""
        x, out = x0, []
        for lin in self.layers:
            x = x0 * lin(x) + x
            out.append(x)
        return out

    def forward(self, x0: Tensor) -> Tensor:
        if self.naive or x0.dim() != 3 or self.layers[0].weight.shape[0] != x0.shape[0]:
            return self.layer_outputs(x0)[-1]
        wb = [t for lin in self.layers for t in (lin.weight, lin.bias)]
        return _FUSED_CROSS.get(x0.device.type, _FusedCross).apply(x0, *wb)


class CIN(nn.Module):
    """xDeepFM Compressed Interaction Network with 1x1 convolutions and ReLU.

    ``X^k_{h,*} = ReLU( sum_{h', f} W^k_{h, h', f} (X^{k-1}_{h',*} * X^0_{f,*}) + b^k_h )``; each layer's output is
    sum-pooled over the embedding dimension and the layers are concatenated.  (M, B, F, D) -> (M, B, sum(layers)).

    Computed as ``sum_h' X^{k-1}_{h'} * (sum_f W_{h, h', f} X^0_f)``: the base embeddings are projected first, so the
    (H x F, D) outer products are never materialised (same multiply-adds, 2.4x less memory at H = F = 39, H' = 16;
    see BENCHMARKS.md for the speed). ``naive=True`` keeps the textbook outer-product form (the benchmark baseline).
    """

    def __init__(self, sets: int, num_fields: int, layers: list[int] | tuple[int, ...] = (16, 16), naive: bool = False):
        super().__init__()
        dims = [num_fields, *layers]
        self.num_fields, self.naive = num_fields, naive
        # weight row h * F + f multiplies X^{k-1}_h * X^0_f
        self.convs = nn.ModuleList(SetLinear(sets, dims[k] * num_fields, dims[k + 1]) for k in range(len(layers)))

    def layer_outputs(self, e: Tensor) -> list[Tensor]:
        """The feature maps ``X^1, ..., X^L`` of the CIN layers, each (M, B, H_k, D) (``forward`` sum-pools them)."""
        return list(self._forward_outer(e) if self.naive else self._maps(e))

    def forward(self, e: Tensor) -> Tensor:
        return torch.cat([x.sum(-1) for x in self.layer_outputs(e)], -1)

    def _maps(self, e: Tensor):
        M, B, F, D = e.shape
        e0 = e.transpose(2, 3).reshape(M, B * D, F)  # (M, B*D, F)
        x = e
        for conv in self.convs:
            S, HF, K = conv.weight.shape
            H = HF // F
            W = conv.weight.view(S, H, F, K).transpose(1, 2).reshape(S, F, H * K)
            A = torch.matmul(e0, W).view(M, B, D, H, K)  # sum_f X^0_f W[h, f, k]
            out = (x.transpose(2, 3).unsqueeze(-1) * A).sum(-2) + conv.bias.view(S, 1, 1, K)  # (M, B, D, K)
            x = torch.relu(out).transpose(2, 3)  # (M, B, K, D)
            yield x

    def _forward_outer(self, e: Tensor):
        M, B, F, D = e.shape
        x = e
        for conv in self.convs:
            z = (x.unsqueeze(3) * e.unsqueeze(2)).reshape(M, B, -1, D)  # (M, B, H*F, D) outer products
            x = torch.relu(conv(z.transpose(2, 3)).transpose(2, 3))  # 1x1 conv over the H*F channels -> (M, B, H', D)
            yield x


class SetLayerNorm(nn.Module):
    """LayerNorm over the last axis with per-set affine parameters (``sets=1``: shared).  (M, ..., C) -> same."""

    def __init__(self, sets: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(sets, 1, channels))
        self.bias = nn.Parameter(torch.zeros(sets, 1, channels))

    def forward(self, x: Tensor) -> Tensor:
        M, C = x.shape[0], x.shape[-1]
        y = nnf.layer_norm(x.reshape(M, -1, C), (C,), eps=self.eps)
        return (y * self.weight + self.bias).reshape(x.shape)


class SelfAttentionLayers(nn.Module):
    """AutoInt interacting layers as in the ICML 2024 reference (App. D, ``afi.py`` ``MultiHeadSelfAttentionInteraction``).

    ``x_0 = e W_a + b_a`` (D -> A); per layer, multi-head scaled dot-product attention over the F fields as
    ``torch.nn.MultiheadAttention`` (``H`` heads of size ``A / H``, in-projection with bias, output projection with bias),
    a residual connection and LayerNorm: ``x_{l+1} = LN(x_l + MHA(x_l))``, with
    ``MHA(x) = concat_h softmax(Q_h K_h^T / sqrt(A/H)) V_h  W_o + b_o``. ``attention_dropout`` drops attention weights
    in training. Initialised as ``torch.nn.MultiheadAttention`` (in-projection Xavier-uniform, projection biases 0).
    ``forward`` returns ``ReLU(x_L)``; ``layer_outputs`` returns ``x_1 .. x_L`` (the same code path).
    (M, B, F, D) -> (M, B, F, A).
    """

    def __init__(self, sets: int, dim: int, layers: int = 3, heads: int = 2, att_dim: int = 32,
                 attention_dropout: float = 0.0):
        super().__init__()
        if att_dim % heads:
            raise ValueError(f"att_dim {att_dim} must be divisible by heads {heads}")
        self.heads, self.att_dim, self.attention_dropout = heads, att_dim, attention_dropout
        self.embed = SetLinear(sets, dim, att_dim)
        self.qkv = nn.ModuleList(SetLinear(sets, att_dim, 3 * att_dim) for _ in range(layers))
        self.out = nn.ModuleList(SetLinear(sets, att_dim, att_dim) for _ in range(layers))
        self.norm = nn.ModuleList(SetLayerNorm(sets, att_dim) for _ in range(layers))
        for qkv, out in zip(self.qkv, self.out):  # torch.nn.MultiheadAttention's initialisation
            bound = math.sqrt(6.0 / (att_dim + 3 * att_dim))  # xavier_uniform over the (3A, A) in-projection
            nn.init.uniform_(qkv.weight, -bound, bound)
            nn.init.zeros_(qkv.bias)
            nn.init.zeros_(out.bias)

    def layer_outputs(self, e: Tensor) -> list[Tensor]:  # (M, B, F, D) -> L x (M, B, F, A)
        M, B, Fn, _ = e.shape
        H, d = self.heads, self.att_dim // self.heads
        x = self.embed(e)
        outs = []
        for qkv, out, norm in zip(self.qkv, self.out, self.norm):
            q, k, v = qkv(x).reshape(M, B, Fn, 3, H, d).permute(3, 0, 1, 4, 2, 5).unbind(0)  # (M, B, H, F, d) each
            w = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d), -1)  # (M, B, H, F, F)
            if self.attention_dropout > 0:
                w = nnf.dropout(w, self.attention_dropout, self.training)
            a = torch.matmul(w, v).transpose(2, 3).reshape(M, B, Fn, self.att_dim)
            x = norm(x + out(a))
            outs.append(x)
        return outs

    def forward(self, e: Tensor) -> Tensor:
        return torch.relu(self.layer_outputs(e)[-1])
