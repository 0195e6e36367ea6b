"""Hilbert-Schmidt Independence Criterion (HSIC) estimators for RoBlock's decoupler loss (ROBLOCK.md Sec. 2.3).

RoBlock states that an HSIC term, weighted by beta, makes the decoupled components independent; the kernel, the
estimator and the normalisation are our reading (ROBLOCK.md marks them [ours]):

* Linear kernel, biased, per field (the default): ``HSIC_lin(A, C) = ||A_c^T C_c||_F^2 / (n - 1)^2`` with ``A_c`` the
  column-centred batch matrix. It equals the trace form ``tr(K H L H) / (n - 1)^2`` with ``K = A A^T``, ``L = C C^T``,
  ``H = I - 11^T / n`` (the tests check the identity), at O(n d^2) instead of O(n^2 d).
* Normalised (CKA): ``nHSIC(A, C) = HSIC(A, C) / sqrt(HSIC(A, A) HSIC(C, C))`` in [0, 1], scale invariant, so the loss
  cannot be lowered by shrinking the components.
* Gaussian kernel ``k(a, a') = exp(-||a - a'||^2 / (2 s^2))``, bandwidth ``s`` = median pairwise distance (detached;
  the median heuristic) unless given. Biased estimator ``tr(K H L H) / (n - 1)^2`` (Gretton et al. 2005); unbiased
  estimator of Song et al. (2012), with ``K~``, ``L~`` the Grams with zeroed diagonals:
  ``HSIC_u = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))``.
* Random Fourier features (ROBLOCK.md Sec. 2.3 alternative (b), the "reduced HSIC" R4 asks for): the Gaussian
  kernel approximated as ``k(a, a') ~ phi(a) . phi(a')`` with ``phi(a) = sqrt(2 / r) cos(a W / s + u)``,
  ``W ~ N(0, I)`` (d x r), ``u ~ U[0, 2 pi)`` (Rahimi & Recht 2007), fixed per module; the biased HSIC of the
  approximate Grams is then exactly the linear HSIC of the features, O(n d r) instead of O(n^2 d).
* Decorrelation surrogate (the "why HSIC" ablation): the mean squared off-diagonal entry of the correlation matrix of
  all components' columns (Barlow-Twins style; within- and across-component pairs).
"""

from __future__ import annotations

import torch
from torch import Tensor


class _Gram(torch.autograd.Function):
    """``S = X^T X`` over the row axis, with the one-matmul backward ``dL/dX = X (G + G^T)`` (autograd's generic
    matmul backward makes two, one per operand). (..., n, d) -> (..., d, d)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.matmul(x.transpose(-1, -2), x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        g = g.to(x.dtype)  # under autocast the Gram's consumer may have run in float32
        return torch.matmul(x, g + g.transpose(-1, -2))


def gram(x: Tensor, rows_last: bool = False) -> Tensor:
    """``x^T x`` over the second-to-last axis (..., n, d) -> (..., d, d); ``rows_last``: x is (..., d, n)."""
    if rows_last:
        x = x.transpose(-1, -2)
    return _Gram.apply(x) if x.requires_grad else torch.matmul(x.transpose(-1, -2), x)


class _CenteredGramRowsLast(torch.autograd.Function):
    """``(G_c, mean)`` of x (..., d, n) (rows last): ``mean = x 1 / n`` and ``G_c = X_c X_c^T`` with ``X_c = x - mean``.
    Backward: ``dL/dx = (G + G^T) X_c``; the path through the mean adds nothing, since it is
    ``-(G + G^T) X_c 1 1^T / n`` and the centred rows sum to 0. One matmul instead of autograd's matmul, negation,
    mean expansion and two sums over the (..., d, n) activations. The mean is returned without a gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = x.mean(-1, keepdim=True)
        xc = x - mean
        ctx.save_for_backward(xc)
        ctx.mark_non_differentiable(mean)
        return torch.matmul(xc, xc.transpose(-1, -2)), mean

    @staticmethod
    def backward(ctx, g: Tensor, _dmean: Tensor | None) -> Tensor:
        (xc,) = ctx.saved_tensors
        g = g.to(xc.dtype)  # under autocast the Gram's consumer may have run in float32
        return torch.matmul(g + g.transpose(-1, -2), xc)


def centered_gram_rows_last(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., d, n) -> (the centred Gram (..., d, d), the row mean (..., d, 1), no gradient)."""
    if x.requires_grad:
        return _CenteredGramRowsLast.apply(x)
    mean = x.mean(-1, keepdim=True)
    xc = x - mean
    return torch.matmul(xc, xc.transpose(-1, -2)), mean


def pair_index(k: int, device=None) -> tuple[Tensor, Tensor]:
    """Indices (i, j) of the K(K-1)/2 component pairs i < j."""
    return torch.triu_indices(k, k, offset=1, device=device).unbind(0)


def linear_hsic_pairs(c: Tensor, normalized: bool = True, eps: float = 1e-12) -> Tensor:
    """Linear-kernel HSIC (or CKA) of every component pair, batched.  c: (..., n, K, D) -> (..., K(K-1)/2).

    One Gram of the concatenated centred components ``S = X_c^T X_c`` (..., KD, KD) serves all pairs: block (k, j) of
    S is the cross-covariance ``C_k,c^T C_j,c`` and ``HSIC(C_k, C_j) = ||S_kj||_F^2 / (n - 1)^2``.
    """
    *lead, n, K, D = c.shape
    x = c.reshape(*lead, n, K * D)
    x = x - x.mean(-2, keepdim=True)
    if K * D <= n:
        return linear_hsic_from_gram(gram(x), K, n, normalized, eps)
    # wide components (e.g. random features): the sample-space form ||A_c^T C_c||_F^2 = sum(K_c * L_c) with the
    # n x n Grams K_c = A_c A_c^T, O(K n^2) memory instead of O((K D)^2)
    xs = x.view(*lead, n, K, D).movedim(-2, -3)  # (..., K, n, D)
    G = torch.matmul(xs, xs.transpose(-1, -2))  # (..., K, n, n)
    q = torch.einsum("...kab,...jab->...kj", G, G)
    return _pairs(q, K, n, normalized, eps)


def _pairs(q: Tensor, K: int, n: int, normalized: bool, eps: float) -> Tensor:
    """(..., K, K) squared cross-covariance norms -> the K(K-1)/2 pair values (CKA or HSIC)."""
    i, j = pair_index(K, q.device)
    if normalized:
        d = q.diagonal(dim1=-2, dim2=-1)
        return q[..., i, j] / (d[..., i] * d[..., j]).clamp_min(eps).sqrt()
    return q[..., i, j] / (n - 1) ** 2


def linear_hsic_from_gram(S: Tensor, K: int, n: int, normalized: bool = True, eps: float = 1e-12) -> Tensor:
    """``linear_hsic_pairs`` from the Gram ``S = X_c^T X_c`` (..., K*D, K*D) of the n centred, concatenated components
    (component-major columns) -> (..., K(K-1)/2). RoBlock's fused path forms S as ``A^T (X_c^T X_c) A`` when the
    components are an affine map ``C = X A + a`` of the block input (centring removes ``a``)."""
    D = S.shape[-1] // K
    q = S.reshape(*S.shape[:-2], K, D, K, D).pow(2).sum((-1, -3))  # (..., K, K): ||S_kj||_F^2
    return _pairs(q, K, n, normalized, eps)


def decorrelation_penalty(c: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean squared off-diagonal correlation of all KD columns of ``c``.  (..., n, K, D) -> (...)."""
    *lead, n, K, D = c.shape
    x = c.reshape(*lead, n, K * D)
    x = x - x.mean(-2, keepdim=True)
    x = x / x.pow(2).sum(-2, keepdim=True).clamp_min(eps).sqrt()
    r = torch.matmul(x.transpose(-1, -2), x)  # correlation matrix (..., KD, KD)
    off = r.pow(2).sum((-1, -2)) - r.diagonal(dim1=-2, dim2=-1).pow(2).sum(-1)
    return off / max(K * D * (K * D - 1), 1)


def _sq_dists(x: Tensor) -> Tensor:
    """Squared pairwise distances of the rows: (..., n, d) -> (..., n, n)."""
    sq = x.pow(2).sum(-1)
    return (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * torch.matmul(x, x.transpose(-1, -2))).clamp_min(0)


@torch.no_grad()
def _median_sq_dist(d2: Tensor) -> Tensor:
    """The median off-diagonal entry of squared distances (..., n, n) -> (...), detached (the median heuristic)."""
    n = d2.shape[-1]
    iu = torch.triu_indices(n, n, offset=1, device=d2.device)
    return d2[..., iu[0], iu[1]].median(-1).values.clamp_min(1e-12)


def gaussian_gram(x: Tensor, sigma: float | None = None) -> Tensor:
    """``K_ij = exp(-||x_i - x_j||^2 / (2 s^2))``; ``s`` = median off-diagonal pairwise distance (detached) if None.
    (..., n, d) -> (..., n, n)."""
    d2 = _sq_dists(x)
    if sigma is None:
        s2 = _median_sq_dist(d2)[..., None, None]
    else:
        s2 = torch.as_tensor(sigma**2, dtype=x.dtype, device=x.device)
    return torch.exp(-d2 / (2 * s2))


def median_bandwidth(x: Tensor, rows: int = 512) -> Tensor:
    """The median heuristic's s (detached) from the first ``rows`` rows: (..., n, d) -> (...)."""
    with torch.no_grad():
        return _median_sq_dist(_sq_dists(x[..., :rows, :])).sqrt()


def rff_features(x: Tensor, W: Tensor, u: Tensor, sigma: Tensor | float) -> Tensor:
    """``sqrt(2 / r) cos(x W / s + u)``: x (..., n, d), W (d, r), u (r,), s broadcastable to (..., 1, 1)."""
    s = sigma if isinstance(sigma, float) else sigma[..., None, None]
    return torch.cos(torch.matmul(x, W) / s + u) * (2.0 / W.shape[-1]) ** 0.5


def rff_hsic_pairs(c: Tensor, W: Tensor, u: Tensor, normalized: bool = True, sigma: float | None = None) -> Tensor:
    """Random-Fourier-feature HSIC (or CKA) of every component pair: c (..., n, K, d) -> (..., K(K-1)/2); the
    bandwidth of each component is the median heuristic's unless ``sigma`` is given."""
    comps = c.movedim(-2, -3)  # (..., K, n, d)
    s = median_bandwidth(comps) if sigma is None else float(sigma)
    return linear_hsic_pairs(rff_features(comps, W, u, s).movedim(-3, -2), normalized)


def hsic_biased(K: Tensor, L: Tensor) -> Tensor:
    """``tr(K H L H) / (n - 1)^2`` = ``sum(HKH * L) / (n - 1)^2``.  (..., n, n) x (..., n, n) -> (...)."""
    n = K.shape[-1]
    Kc = K - K.mean(-1, keepdim=True) - K.mean(-2, keepdim=True) + K.mean((-1, -2), keepdim=True)
    return (Kc * L).sum((-1, -2)) / (n - 1) ** 2


def hsic_unbiased(K: Tensor, L: Tensor) -> Tensor:
    """Song et al. (2012) unbiased HSIC (see the module docstring); needs n >= 4.  (..., n, n) x 2 -> (...)."""
    n = K.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 samples, got {n}")
    eye = torch.eye(n, dtype=torch.bool, device=K.device)
    Kt, Lt = K.masked_fill(eye, 0), L.masked_fill(eye, 0)
    kl = torch.matmul(Kt, Lt)
    t1 = kl.diagonal(dim1=-2, dim2=-1).sum(-1)  # tr(K~ L~)
    t2 = Kt.sum((-1, -2)) * Lt.sum((-1, -2)) / ((n - 1) * (n - 2))
    t3 = kl.sum((-1, -2)) * 2 / (n - 2)
    return (t1 + t2 - t3) / (n * (n - 3))


def kernel_hsic_pairs(c: Tensor, estimator: str = "biased", normalized: bool = True, sigma: float | None = None,
                      eps: float = 1e-12) -> Tensor:
    """Gaussian-kernel HSIC (or its normalised form) of every component pair.  c: (..., n, K, d) -> (..., K(K-1)/2)."""
    est = hsic_biased if estimator == "biased" else hsic_unbiased
    grams = gaussian_gram(c.movedim(-2, -3), sigma)  # (..., K, n, n)
    K = c.shape[-2]
    i, j = pair_index(K, c.device)
    h = est(grams[..., i, :, :], grams[..., j, :, :])
    if not normalized:
        return h
    self_h = est(grams, grams).clamp_min(eps)  # (..., K)
    return h / (self_h[..., i] * self_h[..., j]).sqrt()
