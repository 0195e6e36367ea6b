"""RoBlock (ICLR 2026 submission 23146; abstract in ../shared/papers/roblock-iclr26-abstract.txt), following the
specification in ROBLOCK.md. No public code or numbers exist; every choice is tagged there as [stated] (the abstract or
a review says it) or [ours] ("our reading" below).

One block, order [stated] (Stabilize -> Decorrelate -> Regenerate, then a residual), interaction placement [ours]:

    Z     = I_m(E_m)               set-specific interaction layer        (M, B, F, D)     [ours, Sec. 2.1]
    Y     = R1UN(Z)                spectrum rebalancing                  (M, B, F, D)     [stated: component 1]
    C     = Decouple(Y)            K components per field                (M, B, F, K, D)  [stated: component 2]
            + loss beta * L_HSIC(C)                                                        [stated: HSIC, beta]
    E'    = Route(Y, C)            M' regenerated sets, across fields    (M', B, F, D)    [stated: component 3]
    E_out = E + alpha * E'         residual (E broadcast over M')        (M', B, F, D)    [stated; form ours]

Every component can be switched off (``rebalance="none"``, ``decoupler="none"`` (K = 1, C = Y, no HSIC),
``router="none"`` (E' = mean_k C_k), ``residual="fixed"`` (alpha = 1) or ``"none"`` (E_out = E')). With all off and
M = 1 the stack is the plain backbone: ``interaction="cross"`` + fixed residual is DCNv2's cross network
(``x_{l+1} = x_l + x_0 * (x_l W_l + b_l)``), ``"cin"`` + no residual is xDeepFM with ``cin_layers = [F] * L``,
``"dhen"`` + no residual is DHEN (the tests check all three against the plain backbones).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from recscale.models import decode_mix
from recscale.models.dhen import MODULES, DHENLayer
from recscale.models.hsic import (
    decorrelation_penalty,
    centered_gram_rows_last,
    kernel_hsic_pairs,
    linear_hsic_from_gram,
    linear_hsic_pairs,
    rff_hsic_pairs,
)
from recscale.models.layers import SetLinear, Tower, flatten


def _config_error(msg: str) -> Exception:
    from recscale.models.backbones import ConfigError

    return ConfigError(msg)


# ------------------------------------------------------------------------------------- component 1: rebalancing
class RankOneRebalance(nn.Module):
    """Spectrum rebalancing by rank-1 update normalisation (R1UN), per set and field (ROBLOCK.md Sec. 2.2).

    Our reading. For each (m, f), with ``X = Z_{m,f}`` the B x D batch matrix:

    * power iteration (``n_power`` steps, persistent warm-start buffer, no gradient) on the D x D Gram ``G = X^T X``
      gives the top right singular vector ``v`` and ``sigma_1^2 = v^T G v``;
    * target ``tau = sqrt(max(||X||_F^2 - sigma_1^2, 0) / (D - 1))``, the RMS of the other singular values;
    * rank-1 update ``Y = X P``, ``P = I + (tau / sigma_1 - 1) v v^T``: the top singular value becomes tau, every other
      singular direction is unchanged;
    * energy normalisation ``out = gamma (.) (rho Y)`` with ``rho = ||X||_F / ||Y||_F`` (exactly
      ``||Y||_F^2 = ||X||_F^2 + (s^2 - 1) sigma_1^2`` for any unit v, s = tau / sigma_1) and a learnable gain gamma
      (init 1).

    v, s, rho are stop-gradient: the gradient flows linearly through X (as power-iteration spectral norm does). The
    whole map is one (D x D) matrix ``T = rho P diag(gamma)`` per (m, f), so ``out = X T`` and the eval path is the same
    code with BN-style running statistics (momentum mu): ``v_bar`` (EMA, sign-aligned, renormalised), ``s_bar``,
    ``rho_bar`` (and the mean with ``center``). ``rank > 1`` is the rank-k update
    ``P = I + V (diag(tau / sigma_i) - 1) V^T`` (block power iteration with QR; ``tau`` the RMS of the remaining D - k
    values); ``rank = D`` is ZCA-like whitening. ``center=True`` works on ``X - 1 x_bar^T`` and adds x_bar back.
    """

    def __init__(self, sets: int, fields: int, dim: int, rank: int = 1, n_power: int = 1, momentum: float = 0.1,
                 center: bool = False, eps: float = 1e-12):
        super().__init__()
        if not 1 <= rank <= dim:
            raise _config_error(f"rebalance_rank must be in 1..D = {dim}, got {rank}")
        if n_power < 1 or not 0 < momentum <= 1:
            raise _config_error(f"n_power must be >= 1 and momentum in (0, 1], got {n_power}, {momentum}")
        self.rank, self.n_power, self.momentum, self.center, self.eps = rank, n_power, momentum, center, eps
        self.elementwise = rank == 1 and not center  # rank-1 fast path (tests switch it off to compare)
        self.gain = nn.Parameter(torch.ones(sets, fields, dim))
        v = torch.linalg.qr(torch.randn(sets, fields, dim, rank)).Q
        self.register_buffer("v", v.clone())  # power-iteration warm start
        self.register_buffer("running_v", v.clone())
        self.register_buffer("running_s", torch.ones(sets, fields, rank))
        self.register_buffer("running_rho", torch.ones(sets, fields))
        self.register_buffer("running_mean", torch.zeros(sets, fields, dim))

    def _orthonormal(self, V: Tensor) -> Tensor:  # (..., D, k)
        return Fn.normalize(V, dim=-2) if self.rank == 1 else torch.linalg.qr(V).Q

    @torch.no_grad()
    def batch_statistics(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(V (M,F,D,k), s (M,F,k), rho (M,F), mean (M,F,D)) of a batch x (M, B, F, D); advances the power buffer."""
        if self.elementwise:
            return self._rank1_statistics(x)
        B, D = x.shape[1], x.shape[-1]
        G = torch.einsum("mbfd,mbfe->mfde", x, x)  # (M, F, D, D)
        mean = x.mean(1) if self.center else x.new_zeros(x.shape[0], x.shape[2], D)
        if self.center:
            G = G - B * mean.unsqueeze(-1) * mean.unsqueeze(-2)
        return self.gram_statistics(G, mean)

    @torch.no_grad()
    def gram_statistics(self, G: Tensor, mean: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The statistics from the D x D Gram ``G`` (M, F, D, D) of the matrix the update acts on (``X^T X``, or the
        centred Gram with ``center``); ``mean`` (M, F, D) is passed through. Advances the power buffer."""
        D = G.shape[-1]
        G = G.to(self.v.dtype)  # under autocast the Gram may be bf16: the statistics stay in the buffers' precision
        V = self.v
        for _ in range(self.n_power):
            V = self._orthonormal(torch.matmul(G, V))
        self.v.copy_(V)
        sig2 = (V * torch.matmul(G, V)).sum(-2).clamp_min(0)  # (M, F, k): sigma_i^2 = v_i^T G v_i
        total = G.diagonal(dim1=-2, dim2=-1).sum(-1)  # ||X||_F^2
        rest = D - self.rank
        tau2 = ((total - sig2.sum(-1)).clamp_min(0) / rest) if rest > 0 else total / D
        ok = sig2 > self.eps
        s = torch.where(ok, (tau2.unsqueeze(-1) / sig2.clamp_min(self.eps)).sqrt(), torch.ones_like(sig2))
        y2 = total + ((s.pow(2) - 1) * sig2).sum(-1)
        rho = torch.where(y2 > self.eps, (total / y2.clamp_min(self.eps)).sqrt(), torch.ones_like(y2))
        return V, s, rho, mean

    def statistics(self, G: Tensor | None, mean: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Batch statistics from a Gram in training (running statistics updated), the running ones in eval."""
        if not self.training:
            return self.running_v, self.running_s, self.running_rho, self.running_mean
        stats = self.gram_statistics(G, mean)
        self._update_running(*stats)
        return stats

    def affine(self, V: Tensor, s: Tensor, rho: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        """The whole map as ``out = x T + t0``: T (M, F, D, D) and t0 (M, F, D) (zero unless ``center``:
        ``(x - m) T + m gamma = x T + (m gamma - m T)``)."""
        T = self.matrix(V, s, rho)
        if not self.center:
            return T, T.new_zeros(()).expand(T.shape[:-1])
        return T, mean * self.gain - torch.matmul(mean.unsqueeze(-2), T).squeeze(-2)

    def _rank1_statistics(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The rank-1, uncentred statistics from passes over x itself (no Gram, no per-field matmul): the same
        numbers as ``batch_statistics``' Gram path, ``X v`` and ``X^T (X v)`` as broadcast multiply-reductions."""
        D = x.shape[-1]
        x = x.to(self.v.dtype)
        v = self.v[..., 0].unsqueeze(1)  # (M, 1, F, D)
        for _ in range(self.n_power):
            w = (x * v).sum(-1, keepdim=True)  # X v: (M, B, F, 1)
            v = Fn.normalize((x * w).sum(1, keepdim=True), dim=-1)  # X^T X v, normalised
        self.v.copy_(v[:, 0].unsqueeze(-1))
        sig2 = (x * v).sum(-1).pow(2).sum(1).unsqueeze(-1)  # ||X v||^2: (M, F, 1)
        total = x.pow(2).sum((1, 3))  # ||X||_F^2: (M, F)
        tau2 = (total - sig2[..., 0]).clamp_min(0) / (D - 1) if D > 1 else total
        ok = sig2 > self.eps
        s = torch.where(ok, (tau2.unsqueeze(-1) / sig2.clamp_min(self.eps)).sqrt(), torch.ones_like(sig2))
        y2 = total + ((s.pow(2) - 1) * sig2).sum(-1)
        rho = torch.where(y2 > self.eps, (total / y2.clamp_min(self.eps)).sqrt(), torch.ones_like(y2))
        return v[:, 0].unsqueeze(-1), s, rho, x.new_zeros(x.shape[0], x.shape[2], D)

    @torch.no_grad()
    def _update_running(self, V: Tensor, s: Tensor, rho: Tensor, mean: Tensor) -> None:
        V, s, rho, mean = (t.to(self.running_s.dtype) for t in (V, s, rho, mean))
        mu = self.momentum
        sign = torch.sign((V * self.running_v).sum(-2, keepdim=True))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        self.running_v.copy_(self._orthonormal(torch.lerp(self.running_v, V * sign, mu)))
        self.running_s.lerp_(s, mu)
        self.running_rho.lerp_(rho, mu)
        self.running_mean.lerp_(mean, mu)

    def matrix(self, V: Tensor, s: Tensor, rho: Tensor) -> Tensor:
        """``T = rho (I + V diag(s - 1) V^T) diag(gamma)``: (M, F, D, D)."""
        D = V.shape[-2]
        P = torch.eye(D, dtype=V.dtype, device=V.device) + torch.matmul(V * (s - 1).unsqueeze(-2), V.transpose(-1, -2))
        return (rho[..., None, None] * P) * self.gain.unsqueeze(-2)

    def forward(self, x: Tensor) -> Tensor:  # (M, B, F, D) -> (M, B, F, D)
        if self.training:
            V, s, rho, mean = self.batch_statistics(x)
            self._update_running(V, s, rho, mean)
        else:
            V, s, rho, mean = self.running_v, self.running_s, self.running_rho, self.running_mean
        if self.elementwise:
            # rho gamma (.) (x + (s - 1)(x . v) v^T): the same map as x @ T, as broadcast element-wise ops
            v = V[..., 0].unsqueeze(1)  # (M, 1, F, D)
            coef = ((s[..., 0] - 1).unsqueeze(1).unsqueeze(-1) * (x * v).sum(-1, keepdim=True))  # (M, B, F, 1)
            return torch.addcmul(x, coef, v) * (rho.unsqueeze(-1) * self.gain).unsqueeze(1)
        T = self.matrix(V, s, rho)
        if not self.center:
            return torch.einsum("mbfd,mfde->mbfe", x, T)
        m = mean.unsqueeze(1)  # (M, 1, F, D)
        return torch.einsum("mbfd,mfde->mbfe", x - m, T) + m * self.gain.unsqueeze(1)


class IterNormRebalance(nn.Module):
    """Rebalancing alternative (b) of ROBLOCK.md Sec. 2.2: IterNorm whitening (Huang et al., CVPR 2019,
    arXiv 1904.03441, Alg. 1) per set and field, ``rebalance: iternorm``.

    With ``X_c`` the centred B x D batch matrix of (m, f): ``Sigma = X_c^T X_c / B + eps I``, ``Sigma_N = Sigma /
    tr(Sigma)``, Newton-Schulz ``P_0 = I``, ``P_k = (3 P_{k-1} - P_{k-1}^3 Sigma_N) / 2`` (k = 1..T), whitening matrix
    ``W = P_T / sqrt(tr(Sigma))`` (approximately ``Sigma^{-1/2}``), output ``gamma (.) (X_c W) + beta``. As in the
    paper, the gradient flows through the iterations, and eval uses running estimates of the mean and of W
    (momentum). Cost O(B D^2 + T D^3) per field. T = ``iters`` (paper default 5) sets how far the spectrum is
    flattened: T -> infinity is ZCA whitening (every singular value equal), which the spec's rank-D update spans too.
    (M, B, F, D) -> (M, B, F, D).
    """

    def __init__(self, sets: int, fields: int, dim: int, iters: int = 5, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        if iters < 1 or not 0 < momentum <= 1:
            raise _config_error(f"rebalance_iters must be >= 1 and momentum in (0, 1], got {iters}, {momentum}")
        self.iters, self.momentum, self.eps = iters, momentum, eps
        self.gain = nn.Parameter(torch.ones(sets, fields, dim))
        self.bias = nn.Parameter(torch.zeros(sets, fields, dim))
        self.register_buffer("running_mean", torch.zeros(sets, fields, dim))
        self.register_buffer("running_wm", torch.eye(dim).repeat(sets, fields, 1, 1))

    def whitening(self, xc: Tensor) -> Tensor:  # centred (M, B, F, D) -> W (M, F, D, D)
        B, D = xc.shape[1], xc.shape[-1]
        eye = torch.eye(D, dtype=xc.dtype, device=xc.device)
        sigma = torch.einsum("mbfd,mbfe->mfde", xc, xc) / B + self.eps * eye
        tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
        sn = sigma / tr
        P = eye.expand_as(sigma)
        for _ in range(self.iters):
            P = 1.5 * P - 0.5 * torch.matmul(torch.matmul(torch.matmul(P, P), P), sn)
        return P / tr.sqrt()

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            mean = x.mean(1)
            W = self.whitening(x - mean.unsqueeze(1))
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_wm.lerp_(W.detach().to(self.running_wm.dtype), self.momentum)
        else:
            mean, W = self.running_mean, self.running_wm
        return torch.einsum("mbfd,mfde->mbfe", x - mean.unsqueeze(1), W) * self.gain.unsqueeze(1) + \
            self.bias.unsqueeze(1)


class ContraNormRebalance(nn.Module):
    """Rebalancing alternative (c) of ROBLOCK.md Sec. 2.2: ContraNorm (Guo et al., ICLR 2023, arXiv 2303.06562),
    ``rebalance: contranorm``: one gradient step on the uniformity term of the contrastive loss, then LayerNorm:
    ``X' = LayerNorm(X - s softmax(Xn Xn^T / tau) X)``, ``Xn`` the rows of X L2-normalised, softmax over rows.

    Our reading of what the "tokens" are here: the B rows (samples) of each (set, field) embedding matrix, since the
    collapse RoBlock rebalances is that of the per-field B x D matrices (the paper's GNN form, where the tokens are the
    graph's nodes). So it costs O(B^2 D) per field (several cross layers at D = 10), and, as in the paper, it has no
    running statistics: an example's output depends on the batch it is in, at eval too. LayerNorm over D with a
    learnable gain and bias per (set, field). (M, B, F, D) -> (M, B, F, D).
    """

    def __init__(self, sets: int, fields: int, dim: int, scale: float = 0.1, temperature: float = 1.0,
                 eps: float = 1e-6):
        super().__init__()
        if scale < 0 or temperature <= 0:
            raise _config_error(f"contranorm needs scale >= 0 and temperature > 0, got {scale}, {temperature}")
        self.scale, self.temperature, self.eps = scale, temperature, eps
        self.gain = nn.Parameter(torch.ones(sets, fields, dim))
        self.bias = nn.Parameter(torch.zeros(sets, fields, dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.transpose(1, 2)  # (M, F, B, D)
        xn = Fn.normalize(xf, dim=-1)
        sim = torch.softmax(torch.matmul(xn, xn.transpose(-1, -2)) / self.temperature, -1)  # (M, F, B, B)
        y = (xf - self.scale * torch.matmul(sim, xf)).transpose(1, 2)
        return Fn.layer_norm(y, y.shape[-1:], eps=self.eps) * self.gain.unsqueeze(1) + self.bias.unsqueeze(1)


# ------------------------------------------------------------------------------------- component 2: decoupler
class Decoupler(nn.Module):
    """HSIC-guided embedding decoupler: K components per field (ROBLOCK.md Sec. 2.3; the map is our reading).

    ``linear`` (default): ``C_{m,f,k} = Y_{m,f} W_{m,f,k} + b_{m,f,k}``, one (D x K*D) map per (set, field) (or per set
    with ``shared_fields``); ``act`` applies GELU. Linear keeps the rank-additivity argument (App. A.2 per R1).
    ``orth_split``: ``W_{m,f} = exp(A - A^T)`` in SO(D), ``C_k = Y W P_k W^T`` with P_k selecting the k-th of K
    coordinate blocks (``torch.tensor_split`` sizes), so ``sum_k C_k = Y`` and the components keep Y's spectrum.
    (M, B, F, D) -> (M, B, F, K, D).
    """

    def __init__(self, sets: int, fields: int, dim: int, components: int, variant: str = "linear",
                 shared_fields: bool = False, act: bool = False):
        super().__init__()
        if variant not in ("linear", "orth_split"):
            raise _config_error(f"decoupler must be 'linear', 'orth_split' or 'none', got {variant!r}")
        if variant == "orth_split" and components > dim:
            raise _config_error(f"decoupler=orth_split needs components <= D = {dim}, got {components}")
        self.K, self.variant, self.act = components, variant, act
        Fw = 1 if shared_fields else fields
        if variant == "linear":
            bound = 1 / math.sqrt(dim)  # nn.Linear's init, per (set, field, component)
            self.weight = nn.Parameter(torch.empty(sets, Fw, dim, components * dim).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.empty(sets, 1, Fw, components * dim).uniform_(-bound, bound))
        else:
            self.skew = nn.Parameter(torch.randn(sets, Fw, dim, dim) * 0.01)
            sizes = [len(b) for b in torch.arange(dim).tensor_split(components)]
            mask = torch.zeros(components, dim)
            start = 0
            for k, n in enumerate(sizes):
                mask[k, start : start + n] = 1
                start += n
            self.register_buffer("mask", mask, persistent=False)

    def rotation(self) -> Tensor:  # (M, F, D, D) in SO(D)
        return torch.linalg.matrix_exp(self.skew - self.skew.transpose(-1, -2))

    def affine(self, sets: int, fields: int) -> tuple[Tensor, Tensor] | None:
        """The map as ``vec_k C = y A + a``: A (M, F, D, K*D), a (M, F, K*D) (component-major columns); None with
        ``act`` (not affine). ``orth_split``: ``A_k = W P_k W^T``, a = 0."""
        if self.act:
            return None
        if self.variant == "linear":
            return self.weight.expand(sets, fields, -1, -1), self.bias.squeeze(1).expand(sets, fields, -1)
        W = self.rotation().expand(sets, fields, -1, -1)  # (M, F, D, D)
        D = W.shape[-1]
        A = torch.einsum("mfdj,kj,mfej->mfkde", W, self.mask.to(W.dtype), W)  # (M, F, K, D, D): W P_k W^T
        return A.permute(0, 1, 3, 2, 4).reshape(sets, fields, D, self.K * D), W.new_zeros(()).expand(
            sets, fields, self.K * D)

    def forward(self, y: Tensor) -> Tensor:
        M, B, F, D = y.shape
        if self.variant == "linear":
            c = torch.einsum("mbfd,mfde->mbfe", y, self.weight.expand(M, F, -1, -1)) + self.bias
            c = c.view(M, B, F, self.K, D)
            return Fn.gelu(c) if self.act else c
        W = self.rotation().expand(M, F, D, D)
        r = torch.einsum("mbfd,mfde->mbfe", y, W)  # rotated coordinates
        return torch.einsum("mbfkd,mfed->mbfke", r.unsqueeze(-2) * self.mask, W)


# ------------------------------------------------------------------------------------- component 3: router
class _RouterMix(torch.autograd.Function):
    """Gates and mixing of the cross-field router, fused over chunks of the batch with a hand-written backward.

    ``g = softmax_n(q_f U_f + c_f)`` per (b, f, head), ``out[b, f, h] = sum_n g[b, f, h, n] cand[b, n]``. The (B, F,
    M', N) gate tensor is the router's whole cost (memory-bound: ~10 passes over it per step through autograd); here it
    only ever exists for ``chunk`` samples at a time (cache-resident) and is recomputed in backward instead of saved:
    ``dcand = g^T dout``, ``dg = dout cand^T``, ``dlogits = g * (dg - sum_n g dg)``, ``dU = q^T dlogits``,
    ``dc = sum_b dlogits``, ``dq = dlogits U^T``.
    Shapes: q (B, F, D), U (F, D, H*N), c (F, H*N), cand (B, N, D) -> out (B, F*H, D).
    """

    @staticmethod
    def _gates(q, U, c, H, N):  # (b, F, D) -> (b, F*H, N)
        lg = torch.baddbmm(c.unsqueeze(1), q.transpose(0, 1), U)  # (F, b, H*N)
        return torch.softmax(lg.transpose(0, 1).reshape(q.shape[0], -1, N), -1)

    @staticmethod
    def forward(ctx, q, U, c, cand, heads: int, chunk: int):
        B, F, D = q.shape
        N = cand.shape[1]
        out = cand.new_empty(B, F * heads, D)
        for b0 in range(0, B, chunk):
            sl = slice(b0, b0 + chunk)
            torch.bmm(_RouterMix._gates(q[sl], U, c, heads, N), cand[sl], out=out[sl])
        ctx.save_for_backward(q, U, c, cand)
        ctx.heads, ctx.chunk = heads, chunk
        return out

    @staticmethod
    def backward(ctx, gout):
        q, U, c, cand = ctx.saved_tensors
        H, chunk = ctx.heads, ctx.chunk
        B, F, D = q.shape
        N = cand.shape[1]
        dq, dcand = torch.empty_like(q), torch.empty_like(cand)
        dU, dc = torch.zeros_like(U), torch.zeros_like(c)
        gout = gout.contiguous()
        for b0 in range(0, B, chunk):
            sl = slice(b0, b0 + chunk)
            g = _RouterMix._gates(q[sl], U, c, H, N)  # (b, F*H, N)
            go = gout[sl]  # (b, F*H, D)
            torch.bmm(g.transpose(1, 2), go, out=dcand[sl])
            dg = torch.bmm(go, cand[sl].transpose(1, 2))
            dl = g * (dg - (dg * g).sum(-1, keepdim=True))  # softmax backward
            dl = dl.view(-1, F, H * N).transpose(0, 1)  # (F, b, H*N)
            dU.baddbmm_(q[sl].transpose(0, 1).transpose(1, 2), dl)
            dc += dl.sum(1)
            dq[sl] = torch.bmm(dl, U.transpose(1, 2)).transpose(0, 1)
        return dq, dU, dc, dcand, None, None


def _float32_under_amp(fn: type[torch.autograd.Function]) -> dict[str, type[torch.autograd.Function]]:
    """Per device type, ``fn`` run in float32 under autocast (``custom_fwd(cast_inputs=float32)``: inputs cast,
    autocast off inside, the backward under the same state): the dense router's chunked kernel writes into
    preallocated outputs, which autocast's per-op dtypes would not match."""
    return {d: type(f"{fn.__name__}_{d}", (fn,), {
        "forward": staticmethod(torch.amp.custom_fwd(fn.forward, device_type=d, cast_inputs=torch.float32)),
        "backward": staticmethod(torch.amp.custom_bwd(fn.backward, device_type=d))}) for d in ("cpu", "cuda")}


_ROUTER_MIX = _float32_under_amp(_RouterMix)


class FieldRouter(nn.Module):
    """Field-wise dynamic multi-head router: regenerates M' embedding sets from all components (ROBLOCK.md Sec. 2.4).

    [stated]: field-wise, multi-head, dynamic, mixes across fields. The gating form is our reading. Candidates are all
    components ``c = (m, f', k)`` (N = M F K); for output field f and head m':

    * ``dynamic`` (the specification's form): ``g_{m',f} = softmax_c((ybar_f U_f + c_f)_{m'} / T)``,
      ``ybar_f = mean_m Y_{m,f}``, and ``E'_{m',f} = sum_c g_{m',f,c} C_c``. It builds B F M' (M F K) gates per block,
      quadratic in fields and in sets.
    * ``factorized`` (our reading; an option, the specification keeps ``dynamic`` as the default): the same kind of
      gate over all N candidates, factorised into a dynamic field-wise choice of components and a learned
      cross-field mixing, ``g_{m',f,(m,f',k)} = Omega_{m',f,f'} beta_{m',f',(m,k)}``, with
      ``beta_{m',f'} = softmax_{(m,k)}((ybar_{f'} U_{f'} + c_{f'})_{m'} / T)`` and ``Omega_{m',f} =
      softmax_{f'}(omega_{m',f})``. Both factors are distributions, so ``g_{m',f}`` sums to 1 over the N candidates;
      it is input-dependent (through beta, per sample) and mixes across fields (through Omega), and per head it is
      linear, not quadratic, in F: B F M' (M K) gates and one (F x F) mixing. ``omega`` starts at
      ``log(F - 1) I``, so every output field starts half itself, half the mean of the others. Why it exists: the
      dense form costs several cross layers per block on the CPU (BENCHMARKS.md, "RoBlock") and grows as (M F)^2,
      so width-scaling runs (M = 10: 1.25 G gates per block at batch 2048) would not fit; R4 names "dynamic routing"
      among RoBlock's costly operations. What it gives up: an output field cannot choose its source fields per
      sample (only which components each source field emits).
    * ``within_field``: beta alone (Omega = I: candidates of field f only); ``static``: input-independent logits
      ``c_f`` over all candidates (violates "dynamic"; an ablation).
    * ``attention`` (alternative (c)): per head, AutoInt-like scaled dot-product attention of the output field's query
      over all candidates, ``g_{m',f} = softmax_c((ybar_f W^Q_{m'}) . (C_c W^K_{m'}) / sqrt(D) / T)``, the values being
      the candidates themselves; projections shared over fields, as in AutoInt.
    * ``topk`` (alternative (d)): the ``dynamic`` logits, kept only for their ``topk`` largest entries per output
      field and head (softmax over those), with the Switch Transformer load-balancing loss (Fedus et al. 2021,
      Eq. 4) per (field, head) pool, ``N sum_c f_c P_c`` (f_c: fraction of the top-k choices that went to c, P_c:
      mean full-softmax probability of c), averaged over pools; ``last_aux`` holds it after a training forward and
      RoBlockNet adds ``router_aux_weight`` times it to the loss.

    (M, B, F, D), (M, B, F, K, D) -> (M', B, F, D); ``mix_batchlast`` is the same map on batch-last inputs.
    """

    VARIANTS = ("dynamic", "factorized", "within_field", "static", "attention", "topk")

    def __init__(self, sets: int, heads: int, fields: int, dim: int, components: int, variant: str = "dynamic",
                 temperature: float = 1.0, topk: int = 2):
        super().__init__()
        if variant not in self.VARIANTS:
            raise _config_error(f"router must be one of {', '.join(self.VARIANTS)} or 'none', got {variant!r}")
        if temperature <= 0:
            raise _config_error(f"router_temperature must be > 0, got {temperature}")
        self.heads, self.variant, self.temperature = heads, variant, temperature
        self.fused, self.chunk = True, 16  # fused chunked gates (``_RouterMix``); tests switch it off to compare
        self.local = variant in ("within_field", "factorized")  # gates over the field's own (set, component) pairs
        self.n = sets * components * (1 if self.local else fields)
        bound = 1 / math.sqrt(dim)
        if variant == "topk" and not 1 <= topk <= self.n:
            raise _config_error(f"router_topk must be in 1..{self.n} (the candidates per field), got {topk}")
        self.topk, self.last_aux = topk, None
        if variant == "attention":
            self.Wq = nn.Parameter(torch.empty(heads, dim, dim).uniform_(-bound, bound))
            self.Wk = nn.Parameter(torch.empty(heads, dim, dim).uniform_(-bound, bound))
            return
        self.U = (nn.Parameter(torch.empty(fields, dim, heads * self.n).uniform_(-bound, bound))
                  if variant != "static" else None)
        self.c = nn.Parameter(torch.zeros(fields, heads * self.n))
        if variant == "factorized":
            self.omega = nn.Parameter(torch.eye(fields).expand(heads, -1, -1) * math.log(max(fields - 1, 1)))

    def _params(self) -> tuple[Tensor, Tensor | None]:
        t = 1.0 / self.temperature  # folded into the (small) parameters, not applied to the (B, F, M'N) logits
        return (self.c, self.U) if t == 1.0 else (self.c * t, None if self.U is None else self.U * t)

    def field_mix(self) -> Tensor:  # (M', F, F'): Omega, rows sum to 1
        return torch.softmax(self.omega, -1)

    def local_gates(self, yb: Tensor) -> Tensor:  # ybar field-major (F, B, D) -> (F, B, M', n), rows sum to 1
        c, U = self._params()
        F, B = yb.shape[:2]
        logits = c.unsqueeze(1).expand(F, B, -1) if U is None else torch.baddbmm(c.unsqueeze(1), yb, U)
        return torch.softmax(logits.view(F, B, self.heads, self.n), -1)

    def gates(self, y: Tensor, c: Tensor | None = None) -> Tensor:
        """(M, B, F, D) (and, for ``attention``, the candidates (M, B, F, K, D)) -> (B, F, M', N) over all
        candidates, rows sum to 1."""
        if self.variant == "attention":
            M, B, F, K, D = c.shape
            cand = c.permute(1, 0, 2, 3, 4).reshape(B, M * F * K, D)
            q = torch.einsum("bfd,hde->bhfe", y.mean(0), self.Wq)
            k = torch.einsum("bnd,hde->bhne", cand, self.Wk)
            logits = torch.matmul(q, k.transpose(-1, -2)) / (math.sqrt(D) * self.temperature)  # (B, M', F, N)
            return torch.softmax(logits, -1).transpose(1, 2)
        g = self.local_gates(y.mean(0).transpose(0, 1)).transpose(0, 1)  # (B, F, M', n)
        if self.variant == "topk":
            return self._topk(g)
        if self.variant != "factorized":
            return g
        M, B, F, D = y.shape
        K = self.n // M
        full = torch.einsum("hgf,bfhmk->bghmfk", self.field_mix(), g.view(B, F, self.heads, M, K))
        return full.reshape(B, F, self.heads, M * F * K)  # candidate n = (m F + f') K + k

    def _topk(self, p: Tensor) -> Tensor:
        """Top-k gates from the full softmax p (B, F, M', N): ``softmax`` over the k largest logits equals p
        renormalised over them. Sets ``last_aux`` (the load-balancing loss) in training."""
        top, idx = p.topk(self.topk, -1)
        g = torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        if self.training:
            chosen = torch.zeros_like(p).scatter(-1, idx, 1.0 / self.topk)  # f_c per slot, no gradient
            self.last_aux = self.n * (chosen.mean(0) * p.mean(0)).sum(-1).mean()
        return g

    def forward(self, y: Tensor, c: Tensor) -> Tensor:
        M, B, F, K, D = c.shape
        self.last_aux = None
        if self.fused and self.variant == "dynamic" and self.temperature == 1.0:
            cand = c.permute(1, 0, 2, 3, 4).reshape(B, M * F * K, D)  # candidate n = (m F + f') K + k
            out = _ROUTER_MIX.get(c.device.type, _RouterMix).apply(y.mean(0), self.U, self.c, cand, self.heads,
                                                                    self.chunk)
            return out.view(B, F, self.heads, D).permute(2, 0, 1, 3)
        if self.local:
            g = self.local_gates(y.mean(0).transpose(0, 1))  # (F, B, M', M K)
            cand = c.permute(2, 1, 0, 3, 4).reshape(F, B, M * K, D)  # candidate n = m K + k of field f
            return self._mix_local(g, cand)
        g = self.gates(y, c)
        cand = c.permute(1, 0, 2, 3, 4).reshape(B, M * F * K, D)  # candidate n = (m F + f') K + k
        out = torch.matmul(g.reshape(B, F * self.heads, self.n), cand).view(B, F, self.heads, D)
        return out.permute(2, 0, 1, 3)

    def _mix_local(self, g: Tensor, cand: Tensor) -> Tensor:  # (F, B, M', n), (F, B, n, D) -> (M', B, F, D)
        R = torch.matmul(g, cand)  # (F, B, M', D): per source field, its components mixed per head
        if self.variant == "within_field":
            return R.permute(2, 1, 0, 3)
        return torch.einsum("hgf,fbhd->hbgd", self.field_mix(), R)

    def mix_batchlast(self, yt: Tensor, mix: Callable[[Tensor], Tensor]) -> Tensor:
        """The field-local mixtures on batch-last inputs (RoBlock's fused path): ybar (F, D, B) and ``mix``, which
        maps the gates g (F, H, M K, B) to ``R[f, h] = sum_n g[f, h, n] c[n, f]`` (F, H, D, B) for the candidates
        c (M, F, K, D, B) -> R head-major (H, F, D, B); ``combine_batchlast`` turns it into the regenerated sets
        (``forward``'s map, for the field-local variants)."""
        if not self.local:  # the dense ones go through ``forward`` (batch-first); see RoBlock.fusable
            raise ValueError("mix_batchlast serves the field-local routers (within_field, factorized) only")
        F, D, B = yt.shape
        H, n = self.heads, self.n
        cpar, U = self._params()
        logits = torch.baddbmm(cpar.unsqueeze(-1), U.transpose(1, 2), yt)  # (F, H n, B)
        R = mix(torch.softmax(logits.view(F, H, n, B), 2))  # (F, H, D, B), candidates n = m K + k
        return R.view(H, F, D, B) if H == 1 else R.transpose(0, 1)

    def combine_batchlast(self, R: Tensor, x: Tensor | None = None, alpha: Tensor | None = None) -> Tensor:
        """The field-local mixtures ``R`` (H, F, D, B) -> the regenerated sets (M' = H, F, D, B): as they are for
        ``within_field``, mixed across fields by Omega for ``factorized``. With the block input ``x`` (M, F, D, B),
        the block's output ``x + alpha E'`` (alpha None: 1) instead; for ``factorized`` that is one batched matmul
        ``x + (alpha Omega) R``, so neither E' nor its gradient is written and alpha's gradient comes through the
        small (F x F) product."""
        H, F, D, B = R.shape
        if self.variant == "within_field":
            if x is None:
                return R
            return x + R if alpha is None else _ScaledResidual.apply(x, alpha, R)
        W = self.field_mix() if alpha is None else alpha * self.field_mix()
        if x is None:
            return torch.matmul(W, R.reshape(H, F, D * B)).view(H, F, D, B)
        return torch.baddbmm(x.reshape(x.shape[0], F, D * B), W, R.reshape(H, F, D * B)).view(H, F, D, B)


class _LocalMix(torch.autograd.Function):
    """``R[f, h, :, b] = sum_{m,k} g[f, h, m K + k, b] cand[m, f, k, :, b]`` on batch-last tensors: a per-sample
    (H x n) @ (n x D) product (n = M K) run as element-wise multiply-adds along contiguous rows of B (a batched
    matmul would run B F tiny matrices; per-sample broadcasting would build (F, H, n, D, B) temporaries).
    Backward: ``dg[f, h, n] = sum_d dR[f, h, d] cand[n, f, d]`` (a loop over d), ``dcand[n, f] = sum_h g[f, h, n]
    dR[f, h]`` (a loop over h). g (F, H, n, B), cand (M, F, K, D, B) (any strides) -> (F, H, D, B)."""

    @staticmethod
    def forward(ctx, g: Tensor, cand: Tensor) -> Tensor:
        ctx.save_for_backward(g, cand)
        M, F, K, D, B = cand.shape
        out = None
        for m in range(M):
            for k in range(K):
                gi, ci = g[:, :, m * K + k].unsqueeze(2), cand[m, :, k].unsqueeze(1)  # (F, H, 1, B), (F, 1, D, B)
                out = gi * ci if out is None else out.addcmul_(gi, ci)
        return out

    @staticmethod
    def backward(ctx, dR: Tensor):
        g, cand = ctx.saved_tensors
        M, F, K, D, B = cand.shape
        H = g.shape[1]
        dR = dR.contiguous()
        cn = cand.permute(1, 3, 0, 2, 4)  # (F, D, M, K, B): the candidates of each coordinate d
        dg = dR[:, :, 0].unsqueeze(2) * cn[:, 0].reshape(F, 1, M * K, B)
        for d in range(1, D):
            dg.addcmul_(dR[:, :, d].unsqueeze(2), cn[:, d].reshape(F, 1, M * K, B))
        gm = g.view(F, H, M, K, B).permute(2, 0, 3, 1, 4)  # (M, F, K, H, B)
        dcand = torch.empty((M, F, K, D, B), dtype=torch.promote_types(g.dtype, dR.dtype), device=dR.device)
        torch.mul(gm[..., 0, :].unsqueeze(-2), dR[:, 0].view(1, F, 1, D, B), out=dcand)
        for h in range(1, H):
            dcand.addcmul_(gm[..., h, :].unsqueeze(-2), dR[:, h].view(1, F, 1, D, B))
        return dg.to(g.dtype), dcand.to(cand.dtype)  # autocast: g may be float32 and cand bf16


# ------------------------------------------------------------------------------------- interaction slot
class CINLayer(nn.Module):
    """One xDeepFM CIN layer with H = F maps, so it maps (M, B, F, D) to (M, B, F, D):
    ``X'_h = ReLU(sum_{h', f} W_{h, h', f} (X_{h'} * X0_f) + b_h)`` (weights laid out as ``layers.CIN``: row h' F + f of
    a ``SetLinear(sets, F * F, F)``)."""

    def __init__(self, sets: int, fields: int):
        super().__init__()
        self.conv = SetLinear(sets, fields * fields, fields)

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        M, B, F, D = x0.shape
        S, HF, H = self.conv.weight.shape
        W = self.conv.weight.view(S, HF // F, F, H).transpose(1, 2).reshape(S, F, -1)
        A = torch.matmul(x0.transpose(2, 3).reshape(M, B * D, F), W).view(M, B, D, HF // F, H)
        out = (x.transpose(2, 3).unsqueeze(-1) * A).sum(-2) + self.conv.bias.view(S, 1, 1, H)  # (M, B, D, H)
        return torch.relu(out).transpose(2, 3)


class Interaction(nn.Module):
    """The per-set interaction layer I_m of a block (ROBLOCK.md Sec. 2.1, our reading): ``(x, x0) -> z``, all
    (M, B, F, D). ``cross``: ``vec(z) = vec(x0) * (vec(x) W + b)`` (DCNv2's cross term; its ``+ x`` is the block
    residual); ``cin``: one CIN layer with F maps; ``dhen``: one DHEN layer; ``mlp``: ``vec(z) = ReLU(vec(x) W + b)``;
    ``none``: ``z = x``."""

    def __init__(self, kind: str, sets: int, fields: int, dim: int, dhen_modules: list[str], dhen_shortcut: bool):
        super().__init__()
        if kind not in ("cross", "cin", "dhen", "mlp", "none"):
            raise _config_error(f"interaction must be one of cross, cin, dhen, mlp, none; got {kind!r}")
        self.kind = kind
        if kind in ("cross", "mlp"):
            self.layer = SetLinear(sets, fields * dim, fields * dim)
        elif kind == "cin":
            self.layer = CINLayer(sets, fields)
        elif kind == "dhen":
            self.layer = DHENLayer(sets, fields, dim, dhen_modules, shortcut=dhen_shortcut)
        else:
            self.layer = None

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        if self.kind == "cross":
            return (flatten(x0) * self.layer(flatten(x))).view(x.shape)
        if self.kind == "mlp":
            return torch.relu(self.layer(flatten(x))).view(x.shape)
        if self.kind in ("cin", "dhen"):
            return self.layer(x, x0)
        return x

    def forward_t(self, xt: Tensor, x0t: Tensor) -> Tensor:
        """``forward`` on batch-last activations (M, F, D, B), for ``cross`` and ``none``: the cross term is one GEMM
        per set in this layout too, ``vec(z) = vec(x0) * (W^T vec(x) + b)``."""
        if self.kind == "none":
            return xt
        M, F, D, B = xt.shape
        lin = self.layer
        zt = torch.baddbmm(lin.bias.transpose(1, 2), lin.weight.transpose(1, 2), xt.reshape(M, F * D, B))
        return (zt * x0t.reshape(x0t.shape[0], F * D, B)).view(M, F, D, B)  # x0: one set, or M


# ------------------------------------------------------------------------------------- the block
class _ScaledResidual(torch.autograd.Function):
    """``x + alpha e`` (x broadcast over e's leading heads) in one pass, with a backward that takes ``dalpha`` as a
    dot product instead of writing ``dout * e`` and summing it."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, e: Tensor) -> Tensor:
        ctx.save_for_backward(alpha, e)
        ctx.x_shape = x.shape
        return torch.addcmul(x, alpha, e)

    @staticmethod
    def backward(ctx, g: Tensor):
        alpha, e = ctx.saved_tensors
        dx = dalpha = de = None
        if ctx.needs_input_grad[0]:
            dx = g if g.shape == ctx.x_shape else g.sum_to_size(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dalpha = torch.dot(g.reshape(-1), e.reshape(-1).to(g.dtype)).to(alpha.dtype)
        if ctx.needs_input_grad[2]:
            de = (g * alpha).to(e.dtype)
        return dx, dalpha, de


class RoBlock(nn.Module):
    """One RoBlock (module docstring): ``(x, x0) -> (E_out (M', B, F, D), L_HSIC or None)``.

    ``hsic`` is the block term ``mean over m, f and pairs k < j of nHSIC(C_{m,f,k}, C_{m,f,j})`` (linear kernel, per
    field), or with ``hsic_kernel="gaussian"`` the same over the flattened (B, F*D) components per set (rows subsampled
    to ``hsic_subsample``), or ``"rff"`` the same kernel through ``hsic_features`` random Fourier features (all
    rows), or ``"decorrelation"`` the surrogate; ``hsic_across_sets`` adds the pairs between sets.
    It is computed only when ``want_hsic`` (training). ``native_kernel`` lets the fused tail of the field-local
    routers run the decoupler and the gated mixing as one native CPU kernel that never writes the components
    (recscale/models/decode_mix.py; float32/float64 on the CPU outside autocast, else the torch operations).
    """

    def __init__(self, sets: int, heads: int, fields: int, dim: int, interaction: str = "cross",
                 rebalance: str = "rank1", rebalance_rank: int = 1, n_power: int = 1, momentum: float = 0.1,
                 prenorm: bool = False, rebalance_iters: int = 5, contranorm_scale: float = 0.1,
                 decoupler: str = "linear", components: int = 4,
                 share_decoupler_across_fields: bool = False, decoupler_act: bool = False, router: str = "dynamic",
                 router_temperature: float = 1.0, router_topk: int = 2, residual: str = "learnable",
                 hsic_kernel: str = "linear",
                 hsic_estimator: str = "biased", hsic_normalized: bool = True, hsic_subsample: int = 1024,
                 hsic_features: int = 256, hsic_across_sets: bool = False, dhen_modules: list[str] = list(MODULES),
                 dhen_shortcut: bool = True, native_kernel: bool = True):
        super().__init__()
        if rebalance not in ("rank1", "center", "iternorm", "contranorm", "none"):
            raise _config_error(f"rebalance must be 'rank1', 'center', 'iternorm', 'contranorm' or 'none', "
                                f"got {rebalance!r}")
        if residual not in ("learnable", "fixed", "none"):
            raise _config_error(f"residual must be 'learnable', 'fixed' or 'none', got {residual!r}")
        if hsic_kernel not in ("linear", "gaussian", "rff", "decorrelation"):
            raise _config_error(f"hsic_kernel must be 'linear', 'gaussian', 'rff' or 'decorrelation', "
                                f"got {hsic_kernel!r}")
        if hsic_kernel == "rff" and hsic_features < 1:
            raise _config_error(f"hsic_features must be >= 1, got {hsic_features}")
        if hsic_estimator not in ("biased", "unbiased"):
            raise _config_error(f"hsic_estimator must be 'biased' or 'unbiased', got {hsic_estimator!r}")
        if hsic_estimator == "unbiased" and hsic_kernel != "gaussian":
            raise _config_error("hsic_estimator=unbiased needs hsic_kernel=gaussian (the linear form is the biased "
                                "cross-covariance estimator): set hsic_kernel: gaussian or hsic_estimator: biased")
        if components < 1:
            raise _config_error(f"components (K) must be >= 1, got {components}")
        if heads != sets and sets != 1:
            raise _config_error(f"router heads M' = {heads} must equal the number of input sets M = {sets} "
                                "(or M = 1): the residual broadcasts E over the heads")
        if router == "none" and heads != sets:
            raise _config_error("router=none keeps the M input sets: heads must equal the number of sets")
        self.sets, self.heads, self.residual = sets, heads, residual
        self.hsic_kernel, self.hsic_estimator, self.hsic_normalized = hsic_kernel, hsic_estimator, hsic_normalized
        self.hsic_subsample, self.hsic_across_sets = hsic_subsample, hsic_across_sets
        self.prenorm, self.native = prenorm, native_kernel
        self.interaction = Interaction(interaction, sets, fields, dim, dhen_modules, dhen_shortcut)
        if rebalance in ("rank1", "center"):
            self.rebalance = RankOneRebalance(sets, fields, dim, rebalance_rank, n_power, momentum,
                                              rebalance == "center")
        elif rebalance == "iternorm":
            self.rebalance = IterNormRebalance(sets, fields, dim, rebalance_iters, momentum)
        elif rebalance == "contranorm":
            self.rebalance = ContraNormRebalance(sets, fields, dim, contranorm_scale)
        else:
            self.rebalance = None
        self.decoupler = (Decoupler(sets, fields, dim, components, decoupler, share_decoupler_across_fields,
                                    decoupler_act) if decoupler != "none" else None)
        K = components if self.decoupler is not None else 1
        self.router = (FieldRouter(sets, heads, fields, dim, K, router, router_temperature, router_topk)
                       if router != "none" else None)
        self.alpha = nn.Parameter(torch.ones(())) if residual == "learnable" else None
        if hsic_kernel == "rff":  # fixed random features (a buffer: saved with the model, same on every rank)
            g = torch.Generator().manual_seed(0)
            self.register_buffer("rff_w", torch.randn(fields * dim, hsic_features, generator=g))
            self.register_buffer("rff_u", torch.rand(hsic_features, generator=g) * 2 * math.pi)
        self.fused = True  # ``fused_tail`` where it applies; tests switch it off to compare with the modules' path

    def hsic(self, c: Tensor) -> Tensor:  # (M, B, F, K, D) -> scalar
        M, B, F, K, D = c.shape
        if self.hsic_across_sets:
            c = c.permute(1, 2, 0, 3, 4).reshape(1, B, F, M * K, D)
        if self.hsic_kernel == "linear":
            return linear_hsic_pairs(c.transpose(1, 2), self.hsic_normalized).mean()  # (M, F, B, K, D) batches
        if self.hsic_kernel == "decorrelation":
            return decorrelation_penalty(c.transpose(1, 2)).mean()
        if self.hsic_kernel == "rff":  # flattened components, all rows: O(B F D r)
            flat = c.permute(0, 1, 3, 2, 4).reshape(c.shape[0], B, c.shape[3], F * D)
            return rff_hsic_pairs(flat, self.rff_w.to(c.dtype), self.rff_u.to(c.dtype), self.hsic_normalized).mean()
        n = min(B, self.hsic_subsample)
        flat = c[:, :n].permute(0, 1, 3, 2, 4).reshape(c.shape[0], n, c.shape[3], F * D)  # (M, n, K, F*D)
        return kernel_hsic_pairs(flat, self.hsic_estimator, self.hsic_normalized).mean()

    def fusable(self, want_hsic: bool) -> bool:
        """Whether ``forward`` can take the fused path (``fused_tail``): every component between the interaction and
        the residual is affine in z (or a router on top), and the HSIC is the per-field linear one."""
        return (self.fused and not (self.prenorm and self.rebalance is not None)
                and (self.rebalance is None or isinstance(self.rebalance, RankOneRebalance))
                and (self.decoupler is None or not self.decoupler.act)
                and (self.router is None or self.router.local)  # the dense routers gain nothing from it
                and not (want_hsic and (self.hsic_kernel != "linear" or self.hsic_across_sets)))

    def fused_tail(self, z: Tensor, want_hsic: bool, hsic_grad: bool) -> tuple[Tensor, Tensor | None]:
        """Rebalancing, decoupler, HSIC and router from one pass over z (M, B, F, D) -> (E' (M', B, F, D), HSIC):
        ``fused_tail_t`` on the batch-last copy of z."""
        e, h = self.fused_tail_t(z.permute(0, 2, 3, 1).contiguous(), want_hsic, hsic_grad)
        return e.permute(0, 3, 1, 2), h

    def fused_tail_t(self, xt: Tensor, want_hsic: bool, hsic_grad: bool,
                     residual: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The fused tail on batch-last activations: z (M, F, D, B) -> (E' (M', F, D, B), HSIC); with the block input
        ``residual`` (M, F, D, B), the block's output ``E + alpha E'`` in place of E' (``_residual``; the
        factorized router folds it into its field mixing).

        The same map as the component modules, rearranged (our implementation; the tests compare both paths):
        with ``X = z_{m,f}`` (B x D) per set and field,

        * one centred Gram ``G_c = X_c^T X_c`` (D x D) gives the rebalancing statistics (power iteration on
          ``G = G_c + B xbar xbar^T``, or on ``G_c`` with ``center``), so rebalancing is the affine map
          ``Y = X T + t0`` and is never applied on its own;
        * the decoupler is affine too, ``C = Y A_dec + a_dec = X (T A_dec) + (t0 A_dec + a_dec)``, so C is one
          batched matmul of X (and the router's query Y another, D columns wide); with ``router: none`` only the
          mean over components is needed, ``X mean_k(A_k) + mean_k(a_k)``;
        * linear HSIC needs only the centred Gram of C, ``C_c^T C_c = A^T G_c A`` with ``A = T A_dec``: a
          (KD x KD) product per field instead of a pass over the (B, K D) components.

        Activations are kept batch-last, (M, F, D, B), so that the per-sample gates and mixing of the field-local
        routers are element-wise ops along contiguous rows of B. With the native kernel (recscale/models/decode_mix.py)
        the router's query, gates, components and mixing are one pass per strip of samples, none of them written; at
        D = 10, K = 4 the Gram's gradient joins its backward and, for within-field with at most 2 heads, the residual
        its forward.
        """
        M, F, D, B = xt.shape
        identity = (torch.eye(D, dtype=xt.dtype, device=xt.device).expand(M, F, D, D), xt.new_zeros(()).expand(M, F, D))
        dec = self.decoupler.affine(M, F) if self.decoupler is not None else identity
        K = self.decoupler.K if self.decoupler is not None else 1
        want = want_hsic and K > 1
        grad_gram = want and hsic_grad and torch.is_grad_enabled()
        # the native kernel that also computes the gates (D = 10, K = 4); it takes the Gram's gradient path too
        fast = (self.native and self.router is not None and decode_mix.query_applies(xt, K, self.heads)
                and decode_mix.applies(xt, dec[0], dec[1]))
        Gc = mean = None
        if (self.rebalance is not None and self.rebalance.training) or want:
            with torch.set_grad_enabled(grad_gram and not fast):
                Gc, mean = centered_gram_rows_last(xt)  # (M, F, D, D), (M, F, D, 1)
        if self.rebalance is not None:
            r = self.rebalance
            if r.training:
                mu = mean.detach()
                G = Gc.detach() if r.center else Gc.detach() + B * mu @ mu.transpose(-1, -2)
                stats = r.statistics(G, mu[..., 0] if r.center else torch.zeros_like(mu[..., 0]))
            else:
                stats = r.statistics(None, None)
            T, t0 = r.affine(*stats)
        else:
            T, t0 = identity
        A = torch.matmul(T, dec[0])  # (M, F, D, K D)
        a = torch.matmul(t0.unsqueeze(-2), dec[0]).squeeze(-2) + dec[1]  # (M, F, K D)
        R = out = None
        if fast and decode_mix.applies(xt, A, a, T, t0):  # query, gates and components inside; none written
            cpar, U = self.router._params()
            args = (xt, T.expand(M, F, D, D), t0.expand(M, F, D), U, cpar, A, a)
            # within-field with at most 2 heads: the kernel writes the block's output x + alpha E' directly (E' = R);
            # with more heads the H D extra rows each strip reads make that slower than a separate pass
            # (bench/decode_mix_bench.py)
            res = ((residual, self.alpha) if residual is not None and self.residual != "none"
                   and self.router.variant == "within_field" and self.heads <= 2 else None)
            if grad_gram:  # Gc comes back as the kernel's output: dGc reaches xt through its backward
                R, Gc = decode_mix.decode_mix_query(*args, gram=(Gc, mean), residual=res)
            else:
                R = decode_mix.decode_mix_query(*args, residual=res)
            if res is not None:
                out, R = R, None
        elif fast and grad_gram:  # the kernel does not take these tensors after all: the Gram with its own graph
            Gc, mean = centered_gram_rows_last(xt)
        h = None
        if want:
            with torch.set_grad_enabled(hsic_grad and torch.is_grad_enabled()):
                wide = torch.promote_types(A.dtype, torch.float32)  # bf16 autocast: the HSIC ratios in float32
                A32, G32 = A.to(wide), Gc.to(wide)
                S = A32.transpose(-1, -2) @ (G32 @ A32)  # (M, F, KD, KD)
                h = linear_hsic_from_gram(S, K, B, self.hsic_normalized).mean()
        x2 = xt.view(M * F, D, B)
        if self.router is None:  # E' = mean_k C_k = X mean_k(A_k) + mean_k(a_k)
            Am = A.reshape(M * F, D, K, D).mean(2).transpose(1, 2)
            et = torch.baddbmm(a.reshape(M * F, K, D).mean(1).unsqueeze(-1), Am, x2).view(M, F, D, B)
            return (et if residual is None else self._residual(residual, et)), h
        if out is not None:
            return out, h
        if R is None:
            yt = torch.baddbmm(t0.reshape(M * F, D, 1), T.reshape(M * F, D, D).transpose(1, 2), x2)
            ybar = yt.view(M, F, D, B).mean(0) if M > 1 else yt.view(F, D, B)
            if self.native and decode_mix.applies(xt, A, a):  # the components are never written (decode_mix.py)
                R = self.router.mix_batchlast(ybar, lambda g: decode_mix.decode_mix(xt, A, a, g))
            else:
                ct = torch.baddbmm(a.reshape(M * F, K * D, 1), A.reshape(M * F, D, K * D).transpose(1, 2), x2)
                R = self.router.mix_batchlast(ybar, lambda g: _LocalMix.apply(g, ct.view(M, F, K, D, B)))
        if residual is None or self.residual == "none":
            return self.router.combine_batchlast(R), h
        return self.router.combine_batchlast(R, residual, self.alpha), h

    def forward_t(self, xt: Tensor, x0t: Tensor, want_hsic: bool = False,
                  hsic_grad: bool = True) -> tuple[Tensor, Tensor | None]:
        """``forward`` on batch-last activations (M, F, D, B), for a fusable block with the cross interaction (or
        none), so that a stack of such blocks never transposes its activations (RoBlockNet's batch-last path)."""
        return self.fused_tail_t(self.interaction.forward_t(xt, x0t), want_hsic, hsic_grad, residual=xt)

    def _residual(self, x: Tensor, e_new: Tensor) -> Tensor:  # E_out = E + alpha E' (E broadcast over M')
        if self.residual == "none":
            return e_new
        return x + e_new if self.alpha is None else _ScaledResidual.apply(x, self.alpha, e_new)

    def forward(self, x: Tensor, x0: Tensor, want_hsic: bool = False,
                hsic_grad: bool = True) -> tuple[Tensor, Tensor | None]:
        if self.fusable(want_hsic):
            e_new, h = self.fused_tail(self.interaction(x, x0), want_hsic, hsic_grad)
            return self._residual(x, e_new), h
        if self.prenorm and self.rebalance is not None:
            y = self.interaction(self.rebalance(x), x0)
        else:
            z = self.interaction(x, x0)
            y = self.rebalance(z) if self.rebalance is not None else z
        c = self.decoupler(y) if self.decoupler is not None else y.unsqueeze(-2)  # (M, B, F, K, D)
        h = None
        if want_hsic and c.shape[-2] * (c.shape[0] if self.hsic_across_sets else 1) > 1:
            with torch.set_grad_enabled(hsic_grad and torch.is_grad_enabled()):
                h = self.hsic(c)
        e_new = self.router(y, c) if self.router is not None else c.mean(-2)  # (M', B, F, D)
        return self._residual(x, e_new), h


# ------------------------------------------------------------------------------------- the backbone
class _BatchLast(torch.autograd.Function):
    """The embeddings (M, B, F, D) as a contiguous batch-last (M, F, D, B) tensor. Backward writes the gradient in the
    (B, F, M, D) layout of the embedding lookup's output (returned as its (M, B, F, D) view), one field at a time:
    a (M D, B) -> (B, M D) transpose per field keeps its rows in cache, where one permuted copy of the whole tensor
    reads a new cache line per element."""

    @staticmethod
    def forward(ctx, e: Tensor) -> Tensor:
        return e.permute(0, 2, 3, 1).contiguous()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        M, F, D, B = g.shape
        out = torch.empty((B, F, M, D), dtype=g.dtype, device=g.device)
        for f in range(F):
            out[:, f].view(B, M * D).copy_(g[:, f].reshape(M * D, B).t())
        return out.permute(2, 0, 1, 3)


class _BatchFirst(torch.autograd.Function):
    """The batch-last stack's output (M, F, D, B) as a contiguous (M, B, F, D) tensor (the copy the head's flatten
    would make anyway), whose backward hands the stack a contiguous batch-last gradient: the permuted view of the
    head's gradient would otherwise run down the residual path and make every elementwise pass of the stack's
    backward strided."""

    @staticmethod
    def forward(ctx, xt: Tensor) -> Tensor:
        return xt.permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g.permute(0, 2, 3, 1).contiguous()


class RoBlockNet(nn.Module):
    """A stack of L RoBlocks on the field embeddings, then the project's head (ROBLOCK.md Secs. 2.5, 2.6).

    ``logit = Tower(vec(E^{(L)}))`` (the ME head of ICML 2024 App. C.2: per-set projection, mean over sets, shared
    layers); with ``interaction="cin"`` the xDeepFM head instead:
    ``logit = w . mean_m [sum_D E^{(1)}, ..., sum_D E^{(L)}] + Tower(vec(e))``. The loss gains
    ``beta * sum_l L_HSIC^{(l)}`` (``hsic_reduction="mean"`` averages over blocks) through ``regularization()``;
    ``aux_metrics()`` returns the unweighted term as ``hsic`` (logged as ``train/hsic``). With ``beta = 0`` the term is
    still computed, without gradient, for the log (``log_hsic=False`` skips it).

    Width = the number of embedding sets M (``model.mode: ME``, ``model.scale: M``); ``heads`` M' (None: M' = M)
    regenerates M' sets in every block; with M = 1 and M' > 1, the first block turns one table into M' sets.
    ``x0_source``: the cross/CIN/DHEN ``x0`` of block l is the input embeddings (``input``) or the previous block's
    output (``regenerated``, as SFG does). ``every_k`` (ROBLOCK.md Sec. 2.1, alternative placement): only every
    k-th layer is a RoBlock; the others are the unmodified backbone's layers (interaction only, with the backbone's
    own residual), so ``every_k = k`` inserts a RoBlock after every k - 1 plain layers. Other arguments: see
    ``RoBlock`` and ROBLOCK.md Sec. 2.6.
    """

    def __init__(self, num_fields: int, dim: int, num_sets: int, interaction: Literal["cross", "cin", "dhen", "mlp",
                 "none"] = "cross", blocks: int = 4, heads: int | None = None, components: int = 4,
                 beta: float = 0.1, hsic_reduction: Literal["sum", "mean"] = "sum", log_hsic: bool = True,
                 rebalance: Literal["rank1", "center", "iternorm", "contranorm", "none"] = "rank1",
                 rebalance_rank: int = 1, n_power: int = 1, momentum: float = 0.1, prenorm: bool = False,
                 rebalance_iters: int = 5, contranorm_scale: float = 0.1,
                 decoupler: Literal["linear", "orth_split", "none"] = "linear",
                 share_decoupler_across_fields: bool = False, decoupler_act: bool = False,
                 router: Literal["dynamic", "factorized", "within_field", "static", "attention", "topk",
                                 "none"] = "dynamic",
                 router_temperature: float = 1.0, router_topk: int = 2, router_aux_weight: float = 0.01,
                 residual: Literal["learnable", "fixed", "none"] = "learnable",
                 hsic_kernel: Literal["linear", "gaussian", "rff", "decorrelation"] = "linear",
                 hsic_estimator: Literal["biased", "unbiased"] = "biased", hsic_normalized: bool = True,
                 hsic_subsample: int = 1024, hsic_features: int = 256, hsic_across_sets: bool = False,
                 x0_source: Literal["input", "regenerated"] = "input", dhen_modules: list[str] = list(MODULES),
                 dhen_shortcut: bool = True, every_k: int = 1, hidden: list[int] = [400, 400],
                 dropout: float = 0.2, native_kernel: bool = True):
        super().__init__()
        if blocks < 1:
            raise _config_error(f"blocks (depth L) must be >= 1, got {blocks}")
        if not 1 <= every_k <= blocks:
            raise _config_error(f"every_k must be in 1..blocks = {blocks}, got {every_k}")
        if every_k > 1 and interaction == "none":
            raise _config_error("every_k > 1 interleaves plain interaction layers: it needs an interaction, "
                                "not interaction=none")
        if beta < 0:
            raise _config_error(f"beta must be >= 0, got {beta}")
        if hsic_reduction not in ("sum", "mean"):
            raise _config_error(f"hsic_reduction must be 'sum' or 'mean', got {hsic_reduction!r}")
        if x0_source not in ("input", "regenerated"):
            raise _config_error(f"x0_source must be 'input' or 'regenerated', got {x0_source!r}")
        H = heads or num_sets
        if router_aux_weight < 0:
            raise _config_error(f"router_aux_weight must be >= 0, got {router_aux_weight}")
        self.beta, self.hsic_reduction, self.log_hsic, self.x0_source = beta, hsic_reduction, log_hsic, x0_source
        self.router_aux_weight = router_aux_weight
        self.interaction = interaction
        kw = dict(interaction=interaction, rebalance=rebalance, rebalance_rank=rebalance_rank, n_power=n_power,
                  momentum=momentum, prenorm=prenorm, rebalance_iters=rebalance_iters,
                  contranorm_scale=contranorm_scale, decoupler=decoupler, components=components,
                  share_decoupler_across_fields=share_decoupler_across_fields, decoupler_act=decoupler_act,
                  router=router, router_temperature=router_temperature, router_topk=router_topk,
                  residual=residual, hsic_kernel=hsic_kernel, hsic_estimator=hsic_estimator,
                  hsic_normalized=hsic_normalized, hsic_subsample=hsic_subsample, hsic_features=hsic_features,
                  hsic_across_sets=hsic_across_sets, dhen_modules=dhen_modules, dhen_shortcut=dhen_shortcut,
                  native_kernel=native_kernel)
        # every_k: layer l is a RoBlock when (l + 1) % k == 0, else the backbone's plain layer (ROBLOCK.md Sec. 2.1
        # alternative): every component off, with the backbone's own residual (DCNv2's "+ x_l"; none for CIN, DHEN
        # (its shortcut) and the MLP)
        plain = dict(kw, rebalance="none", decoupler="none", router="none",
                     residual="fixed" if interaction == "cross" else "none", dhen_shortcut=True)
        layers, sets = [], num_sets
        for l in range(blocks):
            if (l + 1) % every_k == 0:
                layers.append(RoBlock(sets, H, num_fields, dim, **kw))
                sets = H
            else:
                layers.append(RoBlock(sets, sets, num_fields, dim, **plain))
        self.stack = nn.ModuleList(layers)
        self.out_sets = H
        self.batch_last = True  # see ``layer_outputs``; tests switch it off to compare
        if interaction == "cin":
            self.cin_out = nn.Linear(blocks * num_fields, 1)
            self.tower = Tower(num_sets, num_fields * dim, hidden, dropout)
        else:
            self.tower = Tower(H, num_fields * dim, hidden, dropout)
        self._hsic: list[Tensor] = []

    def layer_outputs(self, e: Tensor) -> list[Tensor]:  # L x (M', B, F, D): each block's output E^{(l)}
        """Each block's output. When every block is fusable with the cross interaction (or none), the activations
        are transposed once and stay batch-last through the stack (``RoBlock.forward_t``), and the outputs come back
        as (M', B, F, D) views: the same map, fewer passes over the activations."""
        want = self.training and torch.is_grad_enabled() and (self.beta > 0 or self.log_hsic)
        self._hsic = []
        batch_last = self.batch_last and all(b.fusable(want) and b.interaction.kind in ("cross", "none")
                                             for b in self.stack)
        x = _BatchLast.apply(e) if batch_last else e
        x0, outs = x, []
        for block in self.stack:
            step = block.forward_t if batch_last else block
            x, h = step(x, x0, want, hsic_grad=self.beta > 0)  # beta = 0: logged only, no graph kept
            if h is not None:
                self._hsic.append(h)
            if self.x0_source == "regenerated":
                x0 = x
            outs.append(x.permute(0, 3, 1, 2) if batch_last else x)
        if batch_last:
            outs[-1] = _BatchFirst.apply(x)
        return outs

    def hsic_total(self) -> Tensor | None:
        """The unweighted HSIC term of the last training forward, summed (or averaged) over blocks; None if none."""
        if not self._hsic:
            return None
        t = torch.stack(self._hsic)
        return t.sum() if self.hsic_reduction == "sum" else t.mean()

    def router_aux(self) -> Tensor | None:
        """The top-k router's load-balancing loss of the last training forward, summed over blocks; None if none."""
        aux = [b.router.last_aux for b in self.stack if b.router is not None and b.router.last_aux is not None]
        return torch.stack(aux).sum() if aux else None

    def regularization(self) -> Tensor:
        t, aux = self.hsic_total(), self.router_aux()
        reg = self.tower.out.weight.new_zeros(())
        if t is not None and self.beta != 0:
            reg = reg + self.beta * t
        if aux is not None and self.router_aux_weight != 0:
            reg = reg + self.router_aux_weight * aux
        return reg

    def aux_metrics(self) -> dict[str, Tensor]:
        t, aux = self.hsic_total(), self.router_aux()
        out = {} if t is None else {"hsic": t.detach()}
        if aux is not None:
            out["router_aux"] = aux.detach()
        return out

    def forward(self, e: Tensor) -> Tensor:
        outs = self.layer_outputs(e)
        if self.interaction == "cin":
            pooled = torch.cat([x.sum(-1).mean(0) for x in outs], -1)  # (B, L*F)
            return self.cin_out(pooled).squeeze(-1) + self.tower(flatten(e))
        return self.tower(flatten(outs[-1]))
