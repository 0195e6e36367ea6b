"""DHEN: Deep and Hierarchical Ensemble Network (Zhang et al., 2022, arXiv 2203.11014), set-batched.

One DHEN layer (paper Sec. 3, "hierarchical ensemble"): an ensemble of heterogeneous interaction modules reads the
layer input, their outputs are combined, and a shortcut and a normalisation close the layer:

    X^{(l+1)} = Norm( Combine( M_1(X^{(l)}), ..., M_k(X^{(l)}) ) + ShortCut(X^{(l)}) )

with ``ShortCut = identity`` (our layers keep the (F, D) shape, so the paper's ``W X`` projection for mismatched sizes
is never needed) and ``Norm`` a LayerNorm over each field's D entries. The modules (each maps the (B, F, D) field
embeddings of one set to (B, F, D)):

* ``cross``    DCN module: ``vec(Y) = x_0 * (vec(X) W + b)``, the DCNv2 cross term (its ``+ x_l`` is the shortcut);
  ``x_0`` is the backbone's input embeddings (``cross_x0="embeddings"``) or the layer input (``"layer"``).
* ``attention`` self-attention over fields (the paper's Transformer-encoder module without its FFN):
  ``Y = concat_h softmax(Q_h K_h^T / sqrt(d)) V_h W_O``.
* ``linear``   ``vec(Y) = vec(X) W + b`` (the paper's linear module, a full linear map of the flattened fields).
* ``dot``      the paper's dot-product module: the pairwise inner products ``<x_i, x_j>`` (i < j), linearly
  compressed to (F, D): ``vec(Y) = [<x_i, x_j>]_{i<j} W + b``.

``Combine`` is ``concat`` (the modules' outputs concatenated and projected back to F*D by a linear layer: the paper
concatenates; the projection that keeps the layer stackable is our reading) or ``sum``. The paper's convolution
module is not included (it is not one of the modules the RoBlock comparison names). Exact module internals (how the
dot products are compressed, the attention's widths) are our reading; the paper gives the layer equation and the
module list.

ME form (ICML 2024 App. C.2 topology): every module weight has a leading set axis (``SetLinear``), so all sets run in
one batched matmul; the head is the project's ``Tower``. ``e: (M, B, F, D)`` -> logits ``(B,)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from recscale.models.layers import SetLinear, Tower, flatten, inner_products

MODULES = ("cross", "attention", "linear", "dot")


class SetLayerNorm(nn.Module):
    """LayerNorm over the last axis with a per-set affine: ``y = (x - mu) / sqrt(var + eps) * g[m] + b[m]``."""

    def __init__(self, sets: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(sets, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(sets, 1, 1, dim))

    def forward(self, x: Tensor) -> Tensor:  # (M, B, F, D)
        return torch.addcmul(self.bias, Fn.layer_norm(x, x.shape[-1:], eps=self.eps), self.weight)


class FieldAttention(nn.Module):
    """Multi-head scaled dot-product self-attention over the F fields of each set.  (M, B, F, D) -> (M, B, F, D)."""

    def __init__(self, sets: int, dim: int, heads: int = 2, att_dim: int | None = None):
        super().__init__()
        self.heads, self.att_dim = heads, att_dim or dim
        self.qkv = SetLinear(sets, dim, 3 * heads * self.att_dim, bias=False)
        self.out = SetLinear(sets, heads * self.att_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        M, B, F, _ = x.shape
        q, k, v = self.qkv(x).view(M, B, F, 3, self.heads, self.att_dim).unbind(3)
        q, k, v = (t.transpose(2, 3) for t in (q, k, v))  # (M, B, H, F, d)
        a = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.att_dim), -1)
        return self.out(torch.matmul(a, v).transpose(2, 3).reshape(M, B, F, -1))


class DHENLayer(nn.Module):
    """One DHEN layer (see the module docstring): ``X' = Norm(Combine(M_1(X), ..., M_k(X)) + X)``.

    ``forward(x, x0)``: ``x`` the layer input, ``x0`` the backbone's input embeddings (used by the cross module with
    ``cross_x0="embeddings"``); both (M, B, F, D) -> (M, B, F, D). ``shortcut=False`` drops the ``+ X`` (used when an
    outer residual, e.g. RoBlock's, takes its place); ``norm=False`` drops the LayerNorm.
    """

    def __init__(self, sets: int, num_fields: int, dim: int, modules: Sequence[str] = MODULES,
                 combine: str = "concat", heads: int = 2, att_dim: int | None = None, cross_x0: str = "embeddings",
                 shortcut: bool = True, norm: bool = True):
        super().__init__()
        from recscale.models.backbones import ConfigError

        bad = [m for m in modules if m not in MODULES]
        if bad or not modules:
            raise ConfigError(f"DHEN modules must be a non-empty list from {list(MODULES)}, got {list(modules)}")
        if combine not in ("concat", "sum"):
            raise ConfigError(f"DHEN combine must be 'concat' or 'sum', got {combine!r}")
        if cross_x0 not in ("embeddings", "layer"):
            raise ConfigError(f"DHEN cross_x0 must be 'embeddings' or 'layer', got {cross_x0!r}")
        F, D = num_fields, dim
        self.names, self.combine, self.cross_x0, self.shortcut = list(modules), combine, cross_x0, shortcut
        self.mods = nn.ModuleDict()
        for name in self.names:
            if name in ("cross", "linear"):
                self.mods[name] = SetLinear(sets, F * D, F * D)
            elif name == "attention":
                self.mods[name] = FieldAttention(sets, D, heads, att_dim)
            else:  # dot
                self.mods[name] = SetLinear(sets, F * (F - 1) // 2, F * D)
        self.project = SetLinear(sets, len(self.names) * F * D, F * D) if combine == "concat" else None
        self.norm = SetLayerNorm(sets, D) if norm else None

    def module_outputs(self, x: Tensor, x0: Tensor) -> list[Tensor]:  # each (M, B, F*D)
        out = []
        for name in self.names:
            mod = self.mods[name]
            if name == "cross":
                out.append(flatten(x0 if self.cross_x0 == "embeddings" else x) * mod(flatten(x)))
            elif name == "linear":
                out.append(mod(flatten(x)))
            elif name == "attention":
                out.append(flatten(mod(x)))
            else:
                out.append(mod(inner_products(x)))
        return out

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        outs = self.module_outputs(x, x0)
        y = self.project(torch.cat(outs, -1)) if self.project is not None else torch.stack(outs).sum(0)
        y = y.view(x.shape)
        if self.shortcut:
            y = y + x
        return self.norm(y) if self.norm is not None else y


class DHEN(nn.Module):
    """DHEN backbone: ``layers`` stacked DHEN layers on the field embeddings, then the Tower on the flattened output:
    ``logit = Tower(vec(X^{(L)}))`` with ``X^{(0)} = e``. See the module docstring for the layer equation.

    Args: ``layers`` depth L (1, 2, 4, 8 in the RoBlock grid); ``modules`` the ensemble; ``combine``, ``heads``,
    ``att_dim``, ``cross_x0``, ``norm`` as in ``DHENLayer``; ``shared_interaction`` one set of layer weights for all
    sets (the ICML Fig. 10c ablation).
    """

    def __init__(self, num_fields: int, dim: int, num_sets: int, layers: int = 2, modules: list[str] = list(MODULES),
                 combine: str = "concat", heads: int = 2, att_dim: int | None = None, cross_x0: str = "embeddings",
                 norm: bool = True, hidden: list[int] = [400, 400], dropout: float = 0.2,
                 shared_interaction: bool = False):
        super().__init__()
        sets = 1 if shared_interaction else num_sets
        self.layers = nn.ModuleList(DHENLayer(sets, num_fields, dim, modules, combine, heads, att_dim, cross_x0,
                                              norm=norm) for _ in range(layers))
        self.tower = Tower(num_sets, num_fields * dim, hidden, dropout)

    def layer_outputs(self, e: Tensor) -> list[Tensor]:  # L x (M, B, F, D)
        x, outs = e, []
        for layer in self.layers:
            x = layer(x, e)
            outs.append(x)
        return outs

    def forward(self, e: Tensor) -> Tensor:
        outs = self.layer_outputs(e)
        return self.tower(flatten(outs[-1] if outs else e))
