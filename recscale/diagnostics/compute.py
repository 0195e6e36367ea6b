"""One full diagnostics pass over a CTRModel: metrics, CSV tables and figures (no Lightning here).

Everything about the embedding tables comes from one float64 Gram matrix per field, ``G_f = E_f^T E_f`` of the
``(|V_f|, M*D)`` table with all sets side by side: its diagonal ``D x D`` blocks are the per-set Grams (per-set IA and
spectra), the whole matrix gives the IA of the concatenated sets, and its off-diagonal blocks give the principal angles
between sets. The DCNv2 sub-embedding IA needs only ``B^T G B`` per block. RankMe accumulates the Gram of the sample
matrix chunk by chunk. See recscale.diagnostics.metrics for the definitions and the papers' sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from recscale.diagnostics import metrics as mt


@dataclass
class Options:
    normalize_rows: bool = False  # IA of row-normalised tables (ICML reference analysis code) instead of raw (paper)
    rankme: bool = True  # RankMe and covariance spectrum of the sample's flattened field embeddings (SIGIR Fig. 1)
    gradient_rankme: bool = True  # RankMe of dL/dZ on the same sample (SIGIR Sec. 4.2, Fig. 4)
    figures: bool = True
    chunk_rows: int = 8192


@dataclass
class Report:
    metrics: dict[str, float] = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)  # name -> CSV rows
    figures: dict[str, object] = field(default_factory=dict)  # name -> matplotlib Figure


def field_grams(model, normalize_rows: bool = False) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Per field: the Gram of the concatenated sets (M*D square) and the per-set Grams (D square), float64.

    The products run where the model lives (GPU: the (|V|, M*D) tables never leave it); the reduced M*D x M*D Grams
    are returned on the host, where the hundreds of small eigen-solves that follow are cheaper than as GPU calls."""
    emb = model.embedding
    M, D = emb.num_sets, emb.dim
    full, per_set = [], []
    with torch.no_grad():
        for f in range(len(emb.field_dims)):
            t = emb.table(f).detach().to(torch.float64)
            if not normalize_rows:
                g = (t.T @ t).cpu()
                full.append(g)
                per_set.append([g[m * D:(m + 1) * D, m * D:(m + 1) * D] for m in range(M)])
            else:
                full.append(mt.gram(t, normalize_rows=True).cpu())
                per_set.append([mt.gram(t[:, m * D:(m + 1) * D], normalize_rows=True).cpu() for m in range(M)])
    return full, per_set


def _call(module, *args):
    """``module(*args)`` with any inference-mode parameter or buffer (left by `validate`/`test`) replaced by a clone,
    so that autograd can record the call."""
    state = dict(module.named_parameters())
    state.update(module.named_buffers())
    if not any(t.is_inference() for t in state.values()):
        return module(*args)
    state = {k: (t.clone() if t.is_inference() else t) for k, t in state.items()}
    return torch.func.functional_call(module, state, args)


def _sample_grams(model, ids: Tensor, y: Tensor, opts: Options, want_grad: bool):
    """Gram, column sums of Z (the sample's flattened field embeddings, N x F*M*D) and of dL/dZ, accumulated in float64."""
    emb, bb = model.embedding, model.backbone
    dev = emb.weight.device
    was_training = model.training
    model.eval()
    n = len(y)
    acc = {}

    def add(name, x):
        x = x.to(torch.float64)
        if name not in acc:
            acc[name] = [mt.xtx(x), x.sum(0)]
        else:
            acc[name][0] += mt.xtx(x)
            acc[name][1] += x.sum(0)

    try:
        for s in range(0, n, opts.chunk_rows):
            xb, yb = ids[s:s + opts.chunk_rows].to(dev), y[s:s + opts.chunk_rows].to(dev)
            # `validate`/`test` run callbacks under inference_mode, where no graph can be built: leave it here
            with torch.inference_mode(False), torch.enable_grad():
                xb, yb = xb.clone(), yb.clone()  # the sample may have been made under inference_mode
                flat = F.embedding(xb + emb.offsets, emb.weight).detach()  # (B, F, M*D)
                add("z", flat.reshape(len(xb), -1))
                if want_grad:
                    e = flat.view(len(xb), -1, emb.num_sets, emb.dim).permute(2, 0, 1, 3).requires_grad_(True)
                    loss = F.binary_cross_entropy_with_logits(_call(bb, e), yb, reduction="sum") / n
                    (g,) = torch.autograd.grad(loss, e)  # parameters' .grad untouched (safe under DDP)
                    add("grad", g.permute(1, 2, 0, 3).reshape(len(xb), -1))
    finally:
        model.train(was_training)
    return acc, n


def compute_report(model, sample: tuple[Tensor, Tensor] | None, opts: Options | None = None,
                   field_names: list[str] | None = None) -> Report:
    opts = opts or Options()
    emb = model.embedding
    M, D, dims = emb.num_sets, emb.dim, emb.field_dims
    names = field_names or [f"f{i}" for i in range(len(dims))]
    order = np.argsort(dims, kind="stable")  # fields sorted by cardinality (ICML Fig. 2)
    rep = Report()
    full, per_set = field_grams(model, opts.normalize_rows)

    # information abundance: per set and for the concatenation of a field's sets
    sig_full = [mt.spectrum_from_gram(g) for g in full]
    ia_full = np.array([mt.information_abundance(sigma=s) for s in sig_full])
    ia_set = np.array([[mt.information_abundance(sigma=mt.spectrum_from_gram(per_set[f][m])) for f in range(len(dims))]
                       for m in range(M)])  # (M, F)
    for f, n in enumerate(names):
        rep.metrics[f"ia/{n}"] = float(ia_full[f])
    rep.metrics["ia/mean"] = float(ia_full.mean())
    if M > 1:
        for m in range(M):
            for f, n in enumerate(names):
                rep.metrics[f"ia_set{m}/{n}"] = float(ia_set[m, f])
        rep.metrics["ia_set/mean"] = float(ia_set.mean())
    rep.tables["ia"] = [{"field": names[f], "cardinality": dims[f], "ia_concat": float(ia_full[f]),
                         **{f"ia_set{m}": float(ia_set[m, f]) for m in range(M)}} for f in order]
    rep.tables["spectra"] = [{"field": names[f], "cardinality": dims[f], "k": k + 1,
                              "sigma_over_sigma1": float(v)}
                             for f in order for k, v in enumerate((sig_full[f] / sig_full[f][0].clamp_min(1e-300)).tolist())]

    # ME: diversity of a field's sets (principal angles, from the off-diagonal Gram blocks)
    if M > 1 and not opts.normalize_rows:
        div = []
        for f in range(len(dims)):
            g = full[f]
            blk = lambda a, b: g[a * D:(a + 1) * D, b * D:(b + 1) * D]  # noqa: E731
            sims = [float(mt.principal_cosines_from_gram(blk(a, a), blk(b, b), blk(a, b)).mean())
                    for a in range(M) for b in range(a + 1, M)]
            div.append(1.0 - float(np.mean(sims)))
        rep.metrics["diversity/mean"] = float(np.mean(div))
        rep.tables["diversity"] = [{"field": names[f], "cardinality": dims[f], "diversity": div[f]} for f in order]

    # DCNv2: sub-embedding IA (Evidence II, Fig. 3/9) and interaction patterns (Fig. 10b)
    bb = model.backbone
    sub_mats = []
    if hasattr(bb, "blocks"):
        blocks = bb.blocks().detach().cpu()  # (S, F, F, D, D), next to the host Grams
        for m in range(M):
            A = mt.sub_embedding_ia([per_set[f][m] for f in range(len(dims))], blocks[min(m, blocks.shape[0] - 1)])
            sub_mats.append(A)
        patterns = mt.interaction_pattern(blocks)  # (S, F, F)
        rep.tables["interaction_pattern"] = [
            {"set": s, "field_i": names[i], "field_j": names[j], "fro_norm": float(patterns[s, i, j])}
            for s in range(patterns.shape[0]) for i in range(len(dims)) for j in range(len(dims))]
    elif type(bb).__name__ == "FFM":
        k = D // (len(dims) - 1)
        for m in range(M):
            A = torch.full((len(dims), len(dims)), float("nan"), dtype=torch.float64)
            for i in range(len(dims)):
                for j in range(len(dims)):
                    if i != j:
                        sl = (j - (j > i)) * k
                        A[i, j] = mt.information_abundance(sigma=mt.spectrum_from_gram(per_set[i][m][sl:sl + k, sl:sl + k]))
            sub_mats.append(A)
    if sub_mats:
        cf = [mt.correlation_factor(torch.nan_to_num(A, nan=0.0), torch.from_numpy(ia_set[m])) for m, A in enumerate(sub_mats)]
        rep.metrics["sub_ia/correlation_factor"] = float(np.mean(cf))
        srt = np.argsort(ia_set[0], kind="stable")  # fields by IA(E_i) ascending (ICML Fig. 3)
        A0 = sub_mats[0].numpy()[np.ix_(srt, srt)]
        rep.tables["sub_embedding_ia"] = [
            {"field_i": names[srt[a]], "field_j": names[srt[b]], "ia": float(A0[a, b])}
            for a in range(len(dims)) for b in range(len(dims))]
        rep.tables["sub_embedding_ia_sums"] = [
            {"field": names[srt[a]], "row_sum": float(np.nansum(A0[a])), "col_sum": float(np.nansum(A0[:, a]))}
            for a in range(len(dims))]

    # RankMe of Z and of dL/dZ on the fixed validation sample
    cov = {}
    if sample is not None and (opts.rankme or opts.gradient_rankme):
        acc, n = _sample_grams(model, sample[0], sample[1], opts, opts.gradient_rankme)
        for name, key in (("z", "rankme/embeddings"), ("grad", "rankme/gradients")):
            if name in acc:
                g, s = acc[name]
                rep.metrics[key] = mt.rankme(sigma=mt.spectrum_from_gram(g))
                c = (g - torch.outer(s, s) / n) / max(n - 1, 1)  # centred covariance from the same sums
                ev = torch.linalg.eigvalsh(c).flip(0).clamp_min(0.0)
                cov[name] = (ev / ev[0].clamp_min(1e-300)).cpu().numpy()
        rep.metrics["rankme/sample_rows"] = float(n)
        rep.tables["covariance_spectrum"] = [{"of": k, "index": i + 1, "normalized_eigenvalue": float(v)}
                                             for k, arr in cov.items() for i, v in enumerate(arr)]

    if opts.figures:
        from recscale.diagnostics import plots

        rep.figures["ia_heatmap"] = plots.ia_heatmap(ia_full, ia_set, names, order)
        rep.figures["spectra"] = plots.spectra(sig_full, dims, names)
        if cov:
            rep.figures["covariance_spectrum"] = plots.covariance_spectra(cov)
        if sub_mats:
            rep.figures["sub_embedding_ia"] = plots.sub_ia(sub_mats[0].numpy(), ia_set[0], names,
                                                           rep.metrics["sub_ia/correlation_factor"])
        if hasattr(bb, "blocks") and M > 1:
            rep.figures["interaction_patterns"] = plots.patterns(mt.interaction_pattern(blocks).numpy())
    return rep
