"""Backbones: field embeddings ``e: (M, B, F, D)`` -> logits ``(B,)``.

Every backbone is built as ``Backbone(num_fields, dim, num_sets, **hyperparameters)``: the LightningModule calls it with
sizes it knows from the data spec and the scale, and YAML configs name it by ``class_path`` with only the
hyperparameters (the callable-class pattern of LightningCLI). ``num_sets = 1`` is the single-embedding (SE) model;
``num_sets = M > 1`` is its multi-embedding (ME) form with the topology of ICML 2024 Sec. 5.1 / App. C.2: per-set
interaction, per-set non-linear projection, mean over sets, shared head. ``shared_interaction=True`` (where a
backbone has interaction weights) uses one interaction for all sets (the Fig. 10c ablation); where the non-linear
projection follows the interaction (DCNv2, NFwFM, CrossNet) it is shared too, as in the reference
``MultiESingleIDCNv2`` (the cross network and the first MLP layer form one shared block).

``batch_norm`` / ``dropout`` of the DNN parts: the ICML 2024 recipe (BN + dropout 0.2) by default; the SIGIR 2026
recipe (FuxiCTR) sets them per model (configs/recipe/, recscale.grid.SIGIR26_BACKBONE).

ICML 2024 Table 1: DNN, IPNN, NFwFM, xDeepFM, DCNv2, FinalMLP. SIGIR 2026 Table 1: FM, DeepFM (FM + p-DNN),
NFM (FM + s-DNN), CrossNet, CrossNetParallel (CrossNet + p-DNN); CrossNet + s-DNN is DCNv2; LinearDeepFM is the
linear p-DNN ablation (SIGIR Sec. 3.2, Eq. 2). Appendices: AutoInt (ICML App. D), FFM (Evidence I), regularised
DCNv2 (Evidence III: ``DCNv2(orth_reg=...)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from typing import Literal

from torch.nn.utils import parametrize

from recscale.models.layers import (
    CIN,
    CrossNetwork,
    FieldWeightedPairs,
    SelfAttentionLayers,
    SetBatchNorm,
    SetLinear,
    SetMLPBlock,
    Tower,
    bi_interaction,
    flatten,
    fm_pairwise,
    inner_products,
    pair_indices,
)

HIDDEN = [400, 400]


class ConfigError(ValueError):
    """A model option that cannot work with the data or scale; raised before training starts."""


def _as_fields(xs: list[Tensor], num_fields: int) -> list[Tensor]:
    """Cross-layer outputs (M, B, F*D) as field embeddings (M, B, F, D) (contract C1 of ``layer_outputs``)."""
    return [x.unflatten(-1, (num_fields, -1)) for x in xs]


class DNN(nn.Module):
    """``logit = Tower(concat(e_1, ..., e_F))`` (ICML 2024 Table 1; the interaction is the concatenation)."""

    def __init__(self, num_fields: int, dim: int, num_sets: int, hidden: list[int] = HIDDEN, dropout: float = 0.2):
        super().__init__()
        self.tower = Tower(num_sets, num_fields * dim, hidden, dropout)

    def forward(self, e: Tensor) -> Tensor:
        return self.tower(flatten(e))


class IPNN(nn.Module):
    """Inner-product network: ``logit = Tower([concat(e), (<e_i, e_j>)_{i<j}])`` (Qu et al. 2016).

    ``with_embeddings``: feed the flattened embeddings beside the F(F-1)/2 inner products. ``None`` follows the ICML 2024
    reference code: with them for SE (M = 1), inner products only for ME (M > 1).
    """

    def __init__(self, num_fields: int, dim: int, num_sets: int, hidden: list[int] = HIDDEN, dropout: float = 0.2,
                 with_embeddings: bool | None = None):
        super().__init__()
        self.with_embeddings = (num_sets == 1) if with_embeddings is None else with_embeddings
        pairs = num_fields * (num_fields - 1) // 2
        self.tower = Tower(num_sets, pairs + (num_fields * dim if self.with_embeddings else 0), hidden, dropout)

    def forward(self, e: Tensor) -> Tensor:
        p = inner_products(e)  # (M, B, P)
        return self.tower(torch.cat([flatten(e), p], -1) if self.with_embeddings else p)


class NFwFM(nn.Module):
    """NFM with FwFM pooling: ``h = sum_{i,j} r_ij (e_i * e_j)``, then BatchNorm + Dropout, then the Tower (ICML 2024).

    ``pairs``: ``"all"`` (default: the reference ``fwfm.py``, every (i, j) including i = j, ``r ~ N(0, 1)``) or
    ``"upper"`` (FwFM's i < j, ``r = 1`` at init); see ``FieldWeightedPairs``.
    """

    def __init__(self, num_fields: int, dim: int, num_sets: int, hidden: list[int] = HIDDEN, dropout: float = 0.2,
                 shared_interaction: bool = False, pairs: Literal["all", "upper"] = "all"):
        super().__init__()
        sets = 1 if shared_interaction else num_sets
        self.pool = FieldWeightedPairs(sets, num_fields, pairs)
        self.bn = SetBatchNorm(sets, dim)
        self.drop = nn.Dropout(dropout)
        self.tower = Tower(sets, dim, hidden, dropout)

    def forward(self, e: Tensor) -> Tensor:
        return self.tower(self.drop(self.bn(self.pool(e))))


class _BlockScale(nn.Module):
    """Parametrisation ``W -> N (.) W`` with one learnable scale per (D x D) field block, ``N`` initialised to 1
    (the ICML 2024 reference ``wrdcnv2.py``: its ``N`` multiplies the cross weight in the forward pass)."""

    def __init__(self, sets: int, num_fields: int, dim: int):
        super().__init__()
        self.num_fields, self.dim = num_fields, dim
        self.scale = nn.Parameter(torch.ones(sets, num_fields, num_fields))

    def forward(self, W: Tensor) -> Tensor:  # (S, F*D, F*D) -> same
        S, F, D = W.shape[0], self.num_fields, self.dim
        return (W.reshape(S, F, D, F, D) * self.scale[:, :, None, :, None]).reshape(W.shape)


class DCNv2(nn.Module):
    """Stacked DCNv2 (= CrossNet + s-DNN of SIGIR 2026): ``logit = Tower(CrossNet_L(concat(e)))``, L full-rank layers.

    ``orth_reg > 0``: the ICML 2024 Evidence III regulariser
    ``orth_reg * sum_l sum_{i,j} || W^l_{i->j}^T W^l_{i->j} - lambda_ij I ||_F^2`` (summed over sets), where
      - ``orth_layers="all"`` (default, the reference ``rdcnv2.py`` / ``wrdcnv2.py``) regularises every cross layer,
        ``"first"`` only layer 1 (the layer the paper analyses);
      - ``orth_lambda="scale"`` (default, the reference ``wrdcnv2.py``, registered as ``restricted-weighted-dcn``):
        ``lambda`` is realised as a learnable per-block scale ``N_ij`` (init 1) of the cross weight in the forward pass,
        ``W_eff = N_ij W_ij``, while the penalty pulls the unscaled ``W_ij`` to an orthogonal matrix
        (``|| W^T W - I ||^2``), so that ``W_eff^T W_eff = N_ij^2 I``; ``"penalty"``: the paper's formula read
        literally, a learnable ``lambda_ij`` (init 1) inside the penalty and an unscaled forward pass.
    The reference multiplies the penalty by 1e-5 (``wrdcnv2.py``; ``configs/model/dcnv2_reg.yaml``).

    ``cross_init``: ``"xavier_uniform"`` (default, the ICML reference; bias 0) or ``"linear"``; see ``CrossNetwork``.
    """

    def __init__(self, num_fields: int, dim: int, num_sets: int, cross_layers: int = 4, hidden: list[int] = HIDDEN,
                 dropout: float = 0.2, shared_interaction: bool = False, orth_reg: float = 0.0,
                 orth_layers: Literal["all", "first"] = "all", orth_lambda: Literal["scale", "penalty"] = "scale",
                 cross_init: Literal["xavier_uniform", "linear"] = "xavier_uniform", batch_norm: bool = True):
        super().__init__()
        if orth_layers not in ("all", "first") or orth_lambda not in ("scale", "penalty"):
            raise ConfigError(f"DCNv2: orth_layers must be 'all' or 'first' (got {orth_layers!r}) and orth_lambda "
                              f"'scale' or 'penalty' (got {orth_lambda!r})")
        self.num_fields, self.dim, self.orth_reg = num_fields, dim, orth_reg
        self.orth_layers, self.orth_lambda = orth_layers, orth_lambda
        sets = 1 if shared_interaction else num_sets
        self.cross = CrossNetwork(sets, num_fields * dim, cross_layers, init=cross_init)
        self.tower = Tower(sets, num_fields * dim, hidden, dropout, batch_norm=batch_norm)
        n_reg = cross_layers if orth_layers == "all" else 1
        self.lam = None
        if orth_reg > 0 and orth_lambda == "penalty":
            self.lam = nn.Parameter(torch.ones(n_reg, sets, num_fields, num_fields))
        elif orth_reg > 0:
            for lin in self.cross.layers[:n_reg]:
                parametrize.register_parametrization(lin, "weight", _BlockScale(sets, num_fields, dim))

    def blocks(self, layer: int = 0) -> Tensor:
        """``B[s, i, j] = W_l[i, j]`` (D x D) of the weight the forward pass uses (with the block scale, if any):
        ``E_i^{->j} = E_i @ B[s, i, j]`` and ``W_{i->j} = B[s, i, j]^T``."""
        return self._split(self.cross.layers[layer].weight)  # (S, F, F, D, D)

    def _split(self, W: Tensor) -> Tensor:  # (S, F*D, F*D) -> (S, F, F, D, D)
        F, D = self.num_fields, self.dim
        return W.reshape(-1, F, D, F, D).permute(0, 1, 3, 2, 4)

    def regularization(self) -> Tensor:
        bias = self.cross.layers[0].bias
        if self.orth_reg <= 0:
            return bias.new_zeros(())
        n_reg = len(self.cross.layers) if self.orth_layers == "all" else 1
        eye = torch.eye(self.dim, device=bias.device, dtype=bias.dtype)
        total = bias.new_zeros(())
        for l, lin in enumerate(self.cross.layers[:n_reg]):
            raw = lin.weight if self.lam is not None else lin.parametrizations.weight.original
            B = self._split(raw)
            gram = torch.matmul(B, B.transpose(-1, -2))  # W_{i->j}^T W_{i->j} = B B^T (same norm either way round)
            target = eye if self.lam is None else self.lam[l][..., None, None] * eye
            total = total + (gram - target).pow(2).sum()
        return self.orth_reg * total

    def layer_outputs(self, e: Tensor) -> list[Tensor]:
        """Cross-layer outputs ``x_1..x_L`` as field embeddings (M, B, F, D); ``x_L`` is what the tower reads."""
        return _as_fields(self.cross.layer_outputs(flatten(e)), self.num_fields)

    def forward(self, e: Tensor) -> Tensor:
        return self.tower(self.cross(flatten(e)))


class XDeepFM(nn.Module):
    """xDeepFM: ``logit = Linear(CIN(e)) + Tower(concat(e))``; ME averages the CIN vectors across sets, and the DNN tower
    averages its per-set first layer as in DNN (ICML 2024 App. C.2)."""

    def __init__(self, num_fields: int, dim: int, num_sets: int, cin_layers: list[int] = [16, 16],
                 hidden: list[int] = HIDDEN, dropout: float = 0.2, shared_interaction: bool = False):
        super().__init__()
        self.cin = CIN(1 if shared_interaction else num_sets, num_fields, cin_layers)
        self.cin_out = nn.Linear(sum(cin_layers), 1)
        self.tower = Tower(num_sets, num_fields * dim, hidden, dropout)

    def layer_outputs(self, e: Tensor) -> list[Tensor]:
        """CIN feature maps ``X^1..X^L``, each (M, B, H_l, D) (the forward pass sum-pools them over D)."""
        return self.cin.layer_outputs(e)

    def forward(self, e: Tensor) -> Tensor:
        return self.cin_out(self.cin(e).mean(0)).squeeze(-1) + self.tower(flatten(e))


class FinalMLP(nn.Module):
    """FinalMLP (Mao et al. 2023) as in the ICML 2024 reference: two MLP streams over concat(e), bilinear fusion
    ``logit = w_x . x + w_y . y + x^T W_xy y + b`` with ``W_xy`` initialised to zero. ME: each set has both full
    streams; the stream outputs are averaged across sets; one shared fusion."""

    def __init__(self, num_fields: int, dim: int, num_sets: int, hidden: list[int] = HIDDEN, dropout: float = 0.2):
        super().__init__()
        dims = [num_fields * dim, *hidden]
        self.streams = nn.ModuleList(
            nn.Sequential(*[SetMLPBlock(num_sets, a, b, dropout) for a, b in zip(dims, dims[1:])]) for _ in range(2)
        )
        self.wx, self.wy = nn.Linear(hidden[-1], 1), nn.Linear(hidden[-1], 1, bias=False)
        self.wxy = nn.Parameter(torch.zeros(hidden[-1], hidden[-1]))

    def forward(self, e: Tensor) -> Tensor:
        z = flatten(e)
        x, y = (s(z).mean(0) for s in self.streams)  # (B, H) each
        return (self.wx(x) + self.wy(y)).squeeze(-1) + ((x @ self.wxy) * y).sum(-1)


class AutoInt(nn.Module):
    """AutoInt as in the ICML 2024 reference (App. D; ``afi.py`` ``AutoInt`` / ``MultiAutoInt``, "AutoInt w/o linear"):

    ``logit = w . flatten(mean_m ReLU(Att_m(e_m))) + b  +  Tower(concat(e))``, where ``Att`` is ``SelfAttentionLayers``
    (attention embedding D -> ``att_dim``, ``attention_layers`` x [scaled multi-head self-attention, residual,
    LayerNorm]) and the Tower is the DNN of the other backbones (per-set first layer, mean over sets, shared rest);
    ``hidden=[]`` drops the DNN. The attention outputs are averaged over sets before one shared output layer.
    The paper gives no hyperparameters for AutoInt; the defaults (3 layers, 2 heads, 32 dims) are ours.
    """

    def __init__(self, num_fields: int, dim: int, num_sets: int, attention_layers: int = 3, heads: int = 2,
                 att_dim: int = 32, hidden: list[int] = HIDDEN, dropout: float = 0.2, attention_dropout: float = 0.0,
                 shared_interaction: bool = False):
        super().__init__()
        self.att = SelfAttentionLayers(1 if shared_interaction else num_sets, dim, attention_layers, heads, att_dim,
                                       attention_dropout)
        self.att_out = nn.Linear(num_fields * att_dim, 1)
        self.tower = Tower(num_sets, num_fields * dim, hidden, dropout) if hidden else None

    def layer_outputs(self, e: Tensor) -> list[Tensor]:
        """Each attention layer's output ``LN(x_l + MHA(x_l))``: L x (M, B, F, att_dim) (C1)."""
        return self.att.layer_outputs(e)

    def forward(self, e: Tensor) -> Tensor:
        h = self.att(e).mean(0).flatten(1)  # (B, F*A)
        logit = self.att_out(h).squeeze(-1)
        return logit + self.tower(flatten(e)) if self.tower is not None else logit


# ------------------------------------------------------------------------------------------------ SIGIR 2026 family
class FM(nn.Module):
    """Factorization machine, second-order part: ``logit = b + sum_{i<j} <e_i, e_j>`` (SIGIR 2026 Sec. 4, Phi_FM).

    No first-order term, as in the paper's formula. ME: the per-set FM terms are averaged (a linear interaction, so ME
    equals SE up to a permutation: ICML 2024 App. E).
    """

    def __init__(self, num_fields: int, dim: int, num_sets: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, e: Tensor) -> Tensor:
        return fm_pairwise(e).mean(0) + self.bias


class DeepFM(FM):
    """FM + parallel DNN (SIGIR 2026 Eq. 3): ``logit = Phi_FM + Tower(concat(e))``."""

    def __init__(self, num_fields: int, dim: int, num_sets: int, hidden: list[int] = HIDDEN, dropout: float = 0.2,
                 batch_norm: bool = True):
        super().__init__(num_fields, dim, num_sets)
        self.tower = Tower(num_sets, num_fields * dim, hidden, dropout, batch_norm=batch_norm)

    def forward(self, e: Tensor) -> Tensor:
        return super().forward(e) + self.tower(flatten(e))


class LinearDeepFM(FM):
    """FM + linear parallel DNN (SIGIR 2026 Sec. 3.2, Eq. 2): ``logit = Phi_FM + w_out W_in concat(e)``, no activation,
    no normalisation. ME: per-set ``W_in``, averaged, shared ``w_out``."""

    def __init__(self, num_fields: int, dim: int, num_sets: int, hidden: int = 400):
        super().__init__(num_fields, dim, num_sets)
        self.w_in = SetLinear(num_sets, num_fields * dim, hidden)
        self.w_out = nn.Linear(hidden, 1)

    def forward(self, e: Tensor) -> Tensor:
        return super().forward(e) + self.w_out(self.w_in(flatten(e)).mean(0)).squeeze(-1)


class NFM(nn.Module):
    """FM + stacked DNN (NFM, He & Chua 2017): bi-interaction pooling ``sum_{i<j} e_i * e_j``, BatchNorm + Dropout,
    then the Tower. ``batch_norm=False`` drops every BatchNorm (the pooling's and the Tower's)."""

    def __init__(self, num_fields: int, dim: int, num_sets: int, hidden: list[int] = HIDDEN, dropout: float = 0.2,
                 batch_norm: bool = True):
        super().__init__()
        self.bn = SetBatchNorm(num_sets, dim) if batch_norm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.tower = Tower(num_sets, dim, hidden, dropout, batch_norm=batch_norm)

    def forward(self, e: Tensor) -> Tensor:
        return self.tower(self.drop(self.bn(bi_interaction(e))))


class CrossNet(nn.Module):
    """Pure CrossNet (SIGIR 2026 Table 1): ``logit = w . CrossNet_L(concat(e)) + b``; ME averages the per-set logits."""

    def __init__(self, num_fields: int, dim: int, num_sets: int, cross_layers: int = 4,
                 shared_interaction: bool = False, cross_init: Literal["xavier_uniform", "linear"] = "xavier_uniform"):
        super().__init__()
        sets = 1 if shared_interaction else num_sets
        self.cross = CrossNetwork(sets, num_fields * dim, cross_layers, init=cross_init)
        self.out = SetLinear(sets, num_fields * dim, 1)
        self.num_fields = num_fields

    def layer_outputs(self, e: Tensor) -> list[Tensor]:
        """Cross-layer outputs ``x_1..x_L`` as field embeddings (M, B, F, D); ``x_L`` is what the output layer reads."""
        return _as_fields(self.cross.layer_outputs(flatten(e)), self.num_fields)

    def forward(self, e: Tensor) -> Tensor:
        return self.out(self.cross(flatten(e))).mean(0).squeeze(-1)


class CrossNetParallel(nn.Module):
    """CrossNet + parallel DNN (parallel DCNv2): ``logit = w . [mean_m CrossNet_m(x0_m), DNN(x0)] + b``, where the DNN is
    the Tower without its output layer."""

    def __init__(self, num_fields: int, dim: int, num_sets: int, cross_layers: int = 4, hidden: list[int] = HIDDEN,
                 dropout: float = 0.2, shared_interaction: bool = False,
                 cross_init: Literal["xavier_uniform", "linear"] = "xavier_uniform", batch_norm: bool = True):
        super().__init__()
        self.cross = CrossNetwork(1 if shared_interaction else num_sets, num_fields * dim, cross_layers, init=cross_init)
        self.dnn = Tower(num_sets, num_fields * dim, hidden, dropout, output=False, batch_norm=batch_norm)
        self.out = nn.Linear(num_fields * dim + hidden[-1], 1)
        self.num_fields = num_fields

    def layer_outputs(self, e: Tensor) -> list[Tensor]:
        """Cross-layer outputs ``x_1..x_L`` as field embeddings (M, B, F, D); ``x_L`` is the cross half of the output."""
        return _as_fields(self.cross.layer_outputs(flatten(e)), self.num_fields)

    def forward(self, e: Tensor) -> Tensor:
        x0 = flatten(e)
        return self.out(torch.cat([self.cross(x0).mean(0), self.dnn(x0)], -1)).squeeze(-1)


class FFM(nn.Module):
    """Field-aware FM (ICML 2024 Evidence I): the embedding of field i is split into F-1 sub-embeddings
    ``E_i = [E_i^{->j}]_{j != i}`` of size ``k = D / (F-1)``;
    ``logit = b + sum_i w_{x_i} + sum_{i<j} <e_i^{->j}, e_j^{->i}>``. Needs ``dim`` divisible by ``F - 1``.
    ME averages the per-set pair terms.

    ``first_order=True`` (default, the reference ``FieldAwareFactorizationMachineModel``: ``FeaturesLinear`` + FFM)
    asks CTRModel for the first-order term ``sum_i w_{x_i}`` (a per-id scalar table, N(0, 1) init as
    ``nn.Embedding``, kept apart from the embedding tables so that the sub-embedding diagnostics see only the
    sub-embeddings). The reference uses sub-embeddings of size k = 8 (``configs/model/ffm.yaml``: base_dim 304 = 38 x 8
    on Criteo's 39 fields; 168 = 21 x 8 for Avazu's 22).
    """

    def __init__(self, num_fields: int, dim: int, num_sets: int, first_order: bool = True):
        super().__init__()
        self.first_order = first_order
        if num_fields < 2 or dim % (num_fields - 1):
            raise ConfigError(f"FFM needs model.base_dim (x scale for SE) divisible by num_fields - 1 = "
                              f"{num_fields - 1}, got embedding size {dim}: set model.base_dim to a multiple of it")
        self.num_fields = num_fields
        self.bias = nn.Parameter(torch.zeros(()))
        i, j = pair_indices(num_fields)
        self.register_buffer("i", i, persistent=False)
        self.register_buffer("j", j, persistent=False)
        # slot of field j inside field i's sub-embeddings (j skips i)
        self.register_buffer("slot_ij", j - (j > i).long(), persistent=False)
        self.register_buffer("slot_ji", i - (i > j).long(), persistent=False)

    def sub_embeddings(self, e: Tensor) -> Tensor:  # (M, B, F, D) -> (M, B, F, F-1, k)
        return e.reshape(*e.shape[:3], self.num_fields - 1, -1)

    def forward(self, e: Tensor) -> Tensor:
        s = self.sub_embeddings(e)
        a = s[:, :, self.i, self.slot_ij]  # (M, B, P, k): e_i^{->j}
        b = s[:, :, self.j, self.slot_ji]  # e_j^{->i}
        return (a * b).sum((-1, -2)).mean(0) + self.bias
