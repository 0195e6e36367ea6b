"""Building blocks batched over embedding sets.

Every tensor that flows through an interaction carries a leading set axis ``M`` (``M = 1`` is single-embedding):
field embeddings are ``e: (M, B, F, D)``. Per-set weights are stacked on the same leading axis, so one ``matmul`` serves
all sets; a weight created with ``sets=1`` is shared by all sets through broadcasting (the ICML 2024 Fig. 10c ablation).
"""

from __future__ import annotations

import math

import torch
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
    """BatchNorm1d with separate statistics and affine parameters per set (one BN over ``M * C`` channels)."""

    def __init__(self, sets: int, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(sets * channels)

    def forward(self, x: Tensor) -> Tensor:  # (M, B, C)
        M, B, C = x.shape
        y = self.bn(x.transpose(0, 1).reshape(B, M * C))
        return y.reshape(B, M, C).transpose(0, 1)


class SetMLPBlock(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Dropout, per set (the reference recipe's hidden layer)."""

    def __init__(self, sets: int, in_dim: int, out_dim: int, dropout: float = 0.2):
        super().__init__()
        self.linear = SetLinear(sets, in_dim, out_dim)
        self.bn = SetBatchNorm(sets, out_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (M, B, in) -> (M, B, out)
        return self.drop(torch.relu(self.bn(self.linear(x))))


def mlp_block(in_dim: int, out_dim: int, dropout: float = 0.2) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim), nn.ReLU(), nn.Dropout(dropout))


class Tower(nn.Module):
    """The multi-embedding head of ICML 2024 Sec. 5.1 / App. C.2 (reference code topology).

    ``h = mean_m  Drop(ReLU(BN(Linear_m(z_m))))`` is the per-set non-linear projection averaged over sets, followed by
    shared layers ``hidden[1:]`` and ``Linear(hidden[-1], 1)``. With ``M = 1`` it is the plain MLP
    ``in -> hidden -> 1`` of a single-embedding model.
    """

    def __init__(self, sets: int, in_dim: int, hidden: list[int], dropout: float = 0.2, output: bool = True):
        super().__init__()
        self.project = SetMLPBlock(sets, in_dim, hidden[0], dropout)
        self.shared = nn.Sequential(*[mlp_block(a, b, dropout) for a, b in zip(hidden, hidden[1:])])
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


class _UpperPairs(torch.autograd.Function):
    """``(..., F, F) -> (..., F(F-1)/2)``: the entries above the diagonal, row-major. The gradient is written back with
    a plain (non-accumulating) index_put, since every position occurs once; autograd's version of ``g[..., i, j]``
    accumulates, which is a serial loop on the CPU (12 % of an IPNN ME 10x step)."""

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


def inner_products(e: Tensor) -> Tensor:
    """IPNN product layer: ``p_ij = <e_i, e_j>`` for all i < j.  (M, B, F, D) -> (M, B, F(F-1)/2)."""
    return _UpperPairs.apply(torch.matmul(e, e.transpose(-1, -2)))


def fm_pairwise(e: Tensor) -> Tensor:
    """FM second-order term ``sum_{i<j} <e_i, e_j> = 1/2 (||sum_i e_i||^2 - sum_i ||e_i||^2)``.  (M, B, F, D) -> (M, B)."""
    s = e.sum(2)
    return 0.5 * (s.pow(2).sum(-1) - e.pow(2).sum((2, 3)))


def bi_interaction(e: Tensor) -> Tensor:
    """NFM bi-interaction pooling ``sum_{i<j} e_i * e_j`` (element-wise).  (M, B, F, D) -> (M, B, D)."""
    s = e.sum(2)
    return 0.5 * (s.pow(2) - e.pow(2).sum(2))


class FieldWeightedPairs(nn.Module):
    """FwFM pooling used by NFwFM: ``h = sum_{i<j} r_ij (e_i * e_j)`` with a learnable weight per field pair.

    Computed as ``1/2 sum_i e_i * (R e)_i`` with ``R`` symmetric and zero on the diagonal.  (M, B, F, D) -> (M, B, D).
    """

    def __init__(self, sets: int, num_fields: int):
        super().__init__()
        self.num_fields = num_fields
        self.r = nn.Parameter(torch.ones(sets, num_fields * (num_fields - 1) // 2))

    def matrix(self) -> Tensor:  # (S, F, F)
        F = self.num_fields
        i, j = pair_indices(F, self.r.device)
        R = self.r.new_zeros(self.r.shape[0], F, F)
        R[:, i, j] = self.r
        return R + R.transpose(1, 2)

    def forward(self, e: Tensor) -> Tensor:
        Re = torch.matmul(self.matrix().unsqueeze(1), e)  # (M, B, F, D)
        return 0.5 * (e * Re).sum(2)


class _FusedCross(torch.autograd.Function):
    """``x_{l+1} = x_0 * (x_l W_l + b_l) + x_l`` for all layers, with a hand-written backward.

    Forward: one ``baddbmm`` and one ``addcmul`` per layer. Backward, per layer from the top, with ``g = dL/dx_{l+1}``:
    ``g_h = g * x_0``; ``dL/dx_0 += g * h_l``; ``dL/dW_l = x_l^T g_h``; ``dL/db_l = sum_b g_h``;
    ``dL/dx_l = g + g_h W_l^T`` (one ``baddbmm``). Autograd's version of the same graph makes two more passes over the
    (M, B, F*D) activations per layer in each direction (separate bias add, mul + add, residual-gradient add).
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
        for l in reversed(range(L)):
            W, x, h = wb[2 * l], saved[2 * l], saved[2 * l + 1]
            gh = g * x0
            gx0 = g * h if gx0 is None else gx0.addcmul_(g, h)
            grads[2 * l] = torch.bmm(x.transpose(1, 2), gh)
            grads[2 * l + 1] = gh.sum(1, keepdim=True)
            g = torch.baddbmm(g, gh, W.transpose(1, 2))
        return (gx0 + g if gx0 is not None else g), *grads


class CrossNetwork(nn.Module):
    """DCNv2 cross layers (full rank): ``x_{l+1} = x_0 * (x_l W_l + b_l) + x_l`` on ``x_0 = concat(e_1..e_F)``.

    Row-vector convention: block ``W_l[j, i]`` (D x D) carries field j into the slot of field i, i.e. the paper's
    ``W_{j->i}`` is ``W_l[j, i]^T`` and the sub-embedding ``E_i^{->j} = E_i W_{i->j}^T`` is ``E_i @ W_1[i, j]``
    (ICML 2024 Evidence II; App. E).  (M, B, F*D) -> (M, B, F*D).

    The default path fuses each layer's ops and its backward (``_FusedCross``); ``naive=True`` is the textbook
    ``x0 * lin(x) + x`` through autograd (the benchmark baseline; the tests check that both agree).
    """

    def __init__(self, sets: int, dim: int, layers: int = 4, naive: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(SetLinear(sets, dim, dim) for _ in range(layers))
        self.naive = naive

    def layer_outputs(self, x0: Tensor) -> list[Tensor]:
        """``[x_1, ..., x_L]``, each (M, B, F*D): the textbook path of ``forward`` (the fused path computes the same
        formula in one Function and keeps only ``x_L``)."""
        x, out = x0, []
        for lin in self.layers:
            x = x0 * lin(x) + x
            out.append(x)
        return out

    def forward(self, x0: Tensor) -> Tensor:
        # the fused Function keeps one dtype throughout: under autocast (mixed precision) autograd's graph is used
        if (self.naive or x0.dim() != 3 or self.layers[0].weight.shape[0] != x0.shape[0]
                or torch.is_autocast_enabled(x0.device.type)):
            return self.layer_outputs(x0)[-1]
        wb = [t for lin in self.layers for t in (lin.weight, lin.bias)]
        return _FusedCross.apply(x0, *wb)


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


class SelfAttentionLayers(nn.Module):
    """AutoInt interacting layers: multi-head self-attention over fields with a residual projection and ReLU.

    ``a_h = softmax(Q_h K_h^T / 1) V_h`` per head (AutoInt uses unscaled dot products), ``e' = ReLU(concat_h a_h + e W_res)``.
    (M, B, F, D) -> (M, B, F, heads * att_dim).
    """

    def __init__(self, sets: int, dim: int, layers: int = 3, heads: int = 2, att_dim: int = 32, scaled: bool = False):
        super().__init__()
        self.heads, self.att_dim, self.scaled = heads, att_dim, scaled
        d_in = [dim] + [heads * att_dim] * (layers - 1)
        self.qkv = nn.ModuleList(SetLinear(sets, d, 3 * heads * att_dim, bias=False) for d in d_in)
        self.res = nn.ModuleList(SetLinear(sets, d, heads * att_dim, bias=False) for d in d_in)

    def forward(self, e: Tensor) -> Tensor:
        M, B, F, _ = e.shape
        x = e
        for qkv, res in zip(self.qkv, self.res):
            q, k, v = qkv(x.reshape(M, B * F, -1)).reshape(M, B, F, 3, self.heads, self.att_dim).unbind(3)
            q, k, v = (t.transpose(2, 3) for t in (q, k, v))  # (M, B, H, F, d)
            s = torch.matmul(q, k.transpose(-1, -2))
            if self.scaled:
                s = s / math.sqrt(self.att_dim)
            a = torch.matmul(torch.softmax(s, -1), v).transpose(2, 3).reshape(M, B, F, -1)
            x = torch.relu(a + res(x.reshape(M, B * F, -1)).reshape(M, B, F, -1))
        return x
