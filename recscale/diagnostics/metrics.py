"""Collapse diagnostics as pure functions of tensors (no Lightning here).

Singular values of a tall ``(n, d)`` matrix come from the ``d x d`` Gram matrix in float64 (``sigma = sqrt(eig(X^T X))``),
so a 190,000-row field table costs one ``n d^2`` product and a ``d x d`` eigenproblem, never an ``n x d`` SVD.
Wide matrices use ``X X^T`` instead. Where the paper and its reference code differ, the paper's choice is the default:

* IA: ICML 2024 Def. 1 takes the raw table. The ICML reference analysis code L2-normalises each row first and does not
  centre: ``normalize_rows=True`` reproduces it (DESIGN.md).
* RankMe: SIGIR 2026 Sec. 2.2 applies it to the raw sample matrix ``Z`` (no centring), summing over its
  ``min(N, K)`` singular values (the reference takes ``torch.svd(Z).S``); a Gram matrix of size ``K > N`` has
  ``K - N`` extra zero eigenvalues, each of which would add ``eps = 1e-7`` to ``p``, so spectra are cut to the rank.

Resolution: an eigenvalue of a float64 Gram has an absolute error of about ``eps64 * lambda_1`` (``eps64 = 2.2e-16``),
so a singular value ``sigma_k = sqrt(lambda_k)`` below about ``1e-7 * sigma_1`` (``GRAM_RESOLUTION``) is round-off
(the audit measured relative errors up to 7e3 there, and 9e-4 just above it). ``spectrum_from_gram`` reports such
values as exactly 0 ("not resolved"); they changed IA and RankMe by less than 1e-6 relative anyway.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

GRAM_RESOLUTION = 1e-7  # sigma_k / sigma_1 below this is float64-Gram round-off (sqrt of ~10 eps64)


def _prep(x: Tensor, center: bool, normalize_rows: bool) -> Tensor:
    x = x.detach().to(torch.float64)
    if normalize_rows:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if center:
        x = x - x.mean(0, keepdim=True)
    return x


def xtx(x: Tensor, blocks: int = 8) -> Tensor:
    """``X^T X`` of a float64 ``X`` (n, d), symmetric by construction: only the lower triangle is computed (from
    lower-triangular column blocks, BLAS's ``syrk`` without a torch binding, for d >= 512) and the upper triangle is
    its mirror, diagonal blocks included. A GEMM's diagonal block is not bitwise symmetric on every CPU (AVX2 vs
    AVX-512 kernels sum in different orders), so mirroring is what makes ``g == g.T`` hold everywhere. For d >= 512
    this does about (blocks+1)/(2 blocks) of the multiply-adds of ``X.T @ X`` (BENCHMARKS.md); the same products,
    summed in float64."""
    d = x.shape[1]
    if d < 512:
        g = x.T @ x
    else:
        b = -(-d // blocks)
        g = torch.zeros(d, d, dtype=x.dtype, device=x.device)
        for i in range(0, d, b):
            g[i:, i:i + b] = x[:, i:].T @ x[:, i:i + b]  # rows i.., columns i..i+b of the Gram (lower part)
    lower = g.tril()
    return lower + lower.tril(-1).T


def singular_values(x: Tensor, *, center: bool = False, normalize_rows: bool = False) -> Tensor:
    """Singular values of ``x`` (n, d), descending, float64, via the smaller Gram matrix."""
    x = _prep(x, center, normalize_rows)
    gram = xtx(x) if x.shape[0] >= x.shape[1] else xtx(x.T)
    return spectrum_from_gram(gram)


def information_abundance(x: Tensor | None = None, *, sigma: Tensor | None = None, center: bool = False,
                          normalize_rows: bool = False) -> float:
    """ICML 2024 Def. 1: ``IA(E) = ||sigma||_1 / ||sigma||_inf`` (1 <= IA <= rank; d for orthonormal columns)."""
    s = singular_values(x, center=center, normalize_rows=normalize_rows) if sigma is None else sigma
    return float(s.sum() / s.max()) if s.max() > 0 else 0.0


def normalized_spectrum(x: Tensor, **kw) -> Tensor:
    """``sigma_k / sigma_1`` (ICML 2024 Fig. 1b)."""
    s = singular_values(x, **kw)
    return s / s[0] if s[0] > 0 else s


def rankme(z: Tensor | None = None, *, sigma: Tensor | None = None, eps: float = 1e-7, center: bool = False) -> float:
    """RankMe (Garrido et al. 2023; SIGIR 2026 Sec. 2.2): ``exp(-sum_k p_k log p_k)``, ``p_k = sigma_k/||sigma||_1 + eps``,
    over the ``min(N, K)`` singular values of ``z`` (N, K) (``sigma`` must hold exactly those)."""
    s = singular_values(z, center=center) if sigma is None else sigma.to(torch.float64)
    p = s / s.sum().clamp_min(1e-300) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def covariance_spectrum(z: Tensor) -> Tensor:
    """Eigenvalues of the centred covariance of ``z`` (n, d), descending, normalised by the largest (SIGIR Fig. 1)."""
    x = _prep(z, center=True, normalize_rows=False)
    ev = torch.linalg.eigvalsh(xtx(x) / max(x.shape[0] - 1, 1)).flip(0).clamp_min(0.0)
    return ev / ev[0] if ev[0] > 0 else ev


def _basis(x: Tensor, rtol: float = 1e-10) -> Tensor:
    """Orthonormal basis of the column space of ``x`` (n, d) from its Gram matrix (rank-revealing)."""
    x = x.detach().to(torch.float64)
    ev, vec = torch.linalg.eigh(x.T @ x)
    keep = ev > rtol * ev.max().clamp_min(1e-300)
    return (x @ vec[:, keep]) / ev[keep].sqrt()


def principal_cosines(a: Tensor, b: Tensor) -> Tensor:
    """Cosines of the principal angles between the column spaces of ``a`` (n, d1) and ``b`` (n, d2): the singular
    values of ``U_a^T U_b`` with orthonormal bases ``U`` (Miao & Ben-Israel 1992; ICML 2024 Sec. 5.3, App. F)."""
    return torch.linalg.svdvals(_basis(a).T @ _basis(b)).clamp(0.0, 1.0)


def set_similarity(a: Tensor, b: Tensor) -> float:
    """Space similarity of two embedding sets of one field: the mean principal cosine (1 = same space, 0 =
    orthogonal). Diversity is ``1 - similarity``. The extracted paper text lost the exact normalisation of App. F; the
    mean over the ``min(d1, d2)`` cosines is our reading."""
    return float(principal_cosines(a, b).mean())


def set_diversity(tables: list[Tensor]) -> float:
    """Average ``1 - similarity`` over all pairs of a field's embedding sets (ICML 2024 Fig. 10a)."""
    pairs = [(i, j) for i in range(len(tables)) for j in range(i + 1, len(tables))]
    if not pairs:
        return 0.0
    return sum(1.0 - set_similarity(tables[i], tables[j]) for i, j in pairs) / len(pairs)


def gram(x: Tensor, normalize_rows: bool = False) -> Tensor:
    """``X^T X`` in float64 (D x D): everything the sub-embedding IA of a linear projection of ``X`` needs."""
    x = _prep(x, center=False, normalize_rows=normalize_rows)
    return xtx(x)


def sub_embedding_ia(grams: list[Tensor], blocks: Tensor) -> Tensor:
    """DCNv2 sub-embedding IA (ICML 2024 Evidence II): ``A[i, j] = IA(E_i^{->j})`` with ``E_i^{->j} = E_i B[i, j]``.

    ``grams[i] = E_i^T E_i`` (float64), ``blocks[i, j]`` the (D x D) block of the first cross layer that carries field i
    to field j (``recscale.models.backbones.DCNv2.blocks``). The singular values of ``E_i B`` are the square roots of the
    eigenvalues of ``B^T (E_i^T E_i) B``: exact, and independent of the table's row count.
    """
    F = len(grams)
    B = blocks.detach().to(torch.float64)
    G = torch.stack(grams)  # (F, D, D)
    M = B.transpose(-1, -2) @ G[:, None] @ B  # (F, F, D, D): the Grams of E_i B[i, j]
    return ia_from_grams(M).reshape(F, F)


def ffm_sub_embedding_ia(tables: list[Tensor], normalize_rows: bool = False) -> Tensor:
    """FFM sub-embedding IA (ICML 2024 Evidence I): ``A[i, j] = IA(E_i^{->j})`` where field i's table holds the F-1
    column blocks ``E_i^{->j}`` (j != i, in field order); the diagonal is NaN."""
    F = len(tables)
    out = torch.full((F, F), float("nan"), dtype=torch.float64)
    for i, t in enumerate(tables):
        k = t.shape[1] // (F - 1)
        for j in range(F):
            if j != i:
                slot = j - (j > i)
                out[i, j] = information_abundance(t[:, slot * k : (slot + 1) * k], normalize_rows=normalize_rows)
    return out


def correlation_factor(sub_ia: Tensor, field_ia: Tensor) -> float:
    """How much ``IA(E_i^{->j})`` follows the IA of the field it interacts with (ICML 2024 Fig. 9: 0.68 SE vs 0.52 ME
    on Criteo): the Pearson correlation, over all pairs i != j, between ``A[i, j]`` and ``IA(E_j)``. The paper names the
    quantity without a formula; this is our reading."""
    F = sub_ia.shape[0]
    mask = ~torch.eye(F, dtype=torch.bool)
    a = sub_ia.to(torch.float64)[mask]
    b = field_ia.to(torch.float64)[None, :].expand(F, F)[mask]
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def interaction_pattern(blocks: Tensor) -> Tensor:
    """``||W_{i->j}||_F`` for every field pair (ICML 2024 Fig. 10b); ``blocks`` (..., F, F, D, D) -> (..., F, F)."""
    return blocks.detach().to(torch.float64).pow(2).sum((-1, -2)).sqrt()


def eigvalsh(g: Tensor) -> Tensor:
    """``torch.linalg.eigvalsh`` (ascending), on one CPU thread for matrices up to 1024 square: MKL's threaded
    eigensolver gains nothing there and, on a busy machine, spin-waits (measured 0.49 s vs 0.009 s CPU for a 390 x 390
    Gram with 2 threads vs 1 under load); the thread count is restored afterwards."""
    n = torch.get_num_threads()
    if g.device.type != "cpu" or g.shape[-1] > 1024 or n == 1:
        return torch.linalg.eigvalsh(g)
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(g)
    finally:
        torch.set_num_threads(n)


def ia_from_grams(g: Tensor) -> Tensor:
    """IA (ICML 2024 Def. 1) of every matrix ``X`` whose Gram ``X^T X`` is in the batch ``g`` (..., d, d) -> (...):
    one batched eigensolver call; unresolved singular values (below ``GRAM_RESOLUTION * sigma_1``) count as 0."""
    s = eigvalsh(g.to(torch.float64)).clamp_min(0.0).sqrt()  # ascending
    smax = s[..., -1:]
    s = torch.where(s >= GRAM_RESOLUTION * smax, s, torch.zeros_like(s))
    return torch.where(smax[..., 0] > 0, s.sum(-1) / smax[..., 0].clamp_min(1e-300), torch.zeros_like(s[..., 0]))


def spectrum_from_gram(g: Tensor, rank: int | None = None) -> Tensor:
    """Singular values (descending) of any ``X`` with ``X^T X = g``: the first ``rank`` of them (pass ``min(n, d)``
    for an ``(n, d)`` matrix; the Gram's other eigenvalues are zero), values below ``GRAM_RESOLUTION * sigma_1``
    set to 0 (not resolved by a float64 Gram, see the module docstring)."""
    s = eigvalsh(g.to(torch.float64)).flip(0).clamp_min(0.0).sqrt()
    if rank is not None:
        s = s[:rank]
    return torch.where(s >= GRAM_RESOLUTION * s[:1], s, torch.zeros_like(s)) if len(s) else s


def diversity_from_grams(g: Tensor, sets: int, d: int, rtol: float = 1e-10) -> Tensor:
    """``1 - mean principal cosine`` over the set pairs of each field (ICML 2024 Fig. 10a, ``set_diversity``), from the
    fields' Grams of their concatenated sets, g (F, sets d, sets d) -> (F,), in two batched calls.

    ``principal_cosines_from_gram`` for every field and pair at once: each diagonal block is whitened by one batched
    eigendecomposition, with the directions it drops (eigenvalue <= rtol * largest) kept as zero columns, so that
    ``W_a^T G_ab W_b`` has the compact product's singular values padded with zeros; each pair keeps its first
    ``min(rank_a, rank_b)``, the number of principal angles. A field with a rank-0 set gives NaN, like the per-pair
    form."""
    F = g.shape[0]
    blocks = g.to(torch.float64).reshape(F, sets, d, sets, d).transpose(2, 3)  # (F, a, b, d, d): G_ab
    diag = torch.arange(sets)
    ev, vec = torch.linalg.eigh(blocks[:, diag, diag])  # (F, S, d), (F, S, d, d)
    keep = ev > rtol * ev.max(-1, keepdim=True).values.clamp_min(1e-300)
    w = vec * torch.where(keep, ev.clamp_min(1e-300).rsqrt(), torch.zeros_like(ev)).unsqueeze(-2)
    a, b = torch.triu_indices(sets, sets, 1)
    cos = torch.linalg.svdvals(w[:, a].transpose(-1, -2) @ blocks[:, a, b] @ w[:, b]).clamp(0.0, 1.0)  # (F, P, d)
    r = torch.minimum(keep.sum(-1)[:, a], keep.sum(-1)[:, b])  # (F, P)
    mean = (cos * (torch.arange(d) < r.unsqueeze(-1))).sum(-1) / r  # NaN where r = 0
    return 1.0 - mean.mean(-1)


def principal_cosines_from_gram(g_aa: Tensor, g_bb: Tensor, g_ab: Tensor, rtol: float = 1e-10) -> Tensor:
    """Principal cosines of the column spaces of A and B given only ``A^T A``, ``B^T B`` and ``A^T B``.

    With ``A^T A = V L V^T``, ``U_A = A V L^{-1/2}`` is an orthonormal basis, so ``U_A^T U_B = L_A^{-1/2} V_A^T (A^T B)
    V_B L_B^{-1/2}``: D x D work however many rows the tables have. Equals ``principal_cosines(A, B)``.
    """
    def whiten(g):
        ev, vec = torch.linalg.eigh(g.to(torch.float64))
        keep = ev > rtol * ev.max().clamp_min(1e-300)
        return vec[:, keep] / ev[keep].sqrt()

    wa, wb = whiten(g_aa), whiten(g_bb)
    return torch.linalg.svdvals(wa.T @ g_ab.to(torch.float64) @ wb).clamp(0.0, 1.0)
