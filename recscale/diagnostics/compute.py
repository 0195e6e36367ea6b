"""One full diagnostics pass over a CTRModel: metrics, CSV tables and figures (no Lightning here).

Everything about the embedding tables comes from one float64 Gram matrix per field, ``G_f = E_f^T E_f`` of the
``(|V_f|, M*D)`` table with all sets side by side: its diagonal ``D x D`` blocks are the per-set Grams (per-set IA and
spectra), the whole matrix gives the IA of the concatenated sets, and its off-diagonal blocks give the principal angles
between sets. The DCNv2 sub-embedding IA needs only ``B^T G B`` per block. RankMe accumulates the Gram of the sample
matrix chunk by chunk (``K x K``), or, for a sample narrower than wide (``N < K``), keeps its rows and uses the
``N x N`` Gram, so that it sums over exactly ``min(N, K)`` singular values (SIGIR 2026 Eq. 1) and the eigensolver
works on the smaller matrix. Every product runs on the model's device in float64; only reduced values (spectra of at
most ``min(N, K)`` entries, scalars) reach the host. See recscale.diagnostics.metrics for the definitions and the
papers' sections.

Parts and their cost (``Report.metrics["seconds/<part>"]``): ``tables`` (IA, spectra, diversity, sub-embedding IA),
``rankme`` (embedding sample), ``gradients`` (dL/dZ), ``layers`` (per-layer IA and RankMe), ``figures``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from recscale.diagnostics import metrics as mt

# keys logged as MLflow metrics (``diag/<key>``); every other value goes to the per-pass values.csv (contract C4)
HEADLINE = ("ia/mean", "ia_set/mean", "rankme/embeddings", "rankme/gradients", "rankme/sample_rows", "diversity/mean",
            "diversity_se_split/mean", "sub_ia/correlation_factor", "seconds")
_LAYER_KEY = re.compile(r"layer[1-9]\d*/(ia_mean|rankme)")


def headline(values: dict[str, float]) -> dict[str, float]:
    """The values of a pass that are logged as metrics: the headline scalars and ``layer{l}/ia_mean|rankme``."""
    return {k: v for k, v in values.items() if k in HEADLINE or _LAYER_KEY.fullmatch(k)}


@dataclass
class Options:
    normalize_rows: bool = False  # IA of row-normalised tables (ICML reference analysis code) instead of raw (paper)
    rankme: bool = True  # RankMe and covariance spectrum of the sample's flattened field embeddings (SIGIR Fig. 1)
    gradient_rankme: bool = True  # RankMe of dL/dZ on the same sample (SIGIR Sec. 4.2, Fig. 4)
    # "train": dropout active with a fixed seed, BatchNorm on batch statistics (SIGIR Sec. 4.2 and its reference code,
    # which calls model.train() and backpropagates the 50k validation batch); "eval": inference-mode network
    gradient_mode: Literal["train", "eval"] = "train"
    gradient_seed: int = 0  # seed of the dropout masks of the train-mode gradient pass (the training RNG is untouched)
    # train mode: rows per backward (BatchNorm batch statistics); 0 = the whole sample as one batch (reference code).
    # 8192 bounds memory: a 50,000-row backward through DCNv2 ME 10x at depth 8 was OOM-killed at 20 GB RSS
    gradient_batch_rows: int = 8192
    layers: bool = True  # per-layer IA and RankMe for backbones with `layer_outputs` (issue 11)
    layer_rows: int = 4096  # rows of the fixed sample used per layer (the first ones; the sample is random already)
    figures: bool = True
    chunk_rows: int = 8192
    title: str = ""  # appended to figure titles, e.g. "step 8"
    progress: Callable[[str, float], None] | None = None  # called with (part, seconds) after each part


@dataclass
class Report:
    metrics: dict[str, float] = field(default_factory=dict)  # every value of the pass (headline ones: `headline`)
    tables: dict[str, list[dict]] = field(default_factory=dict)  # name -> CSV rows
    figures: dict[str, object] = field(default_factory=dict)  # name -> matplotlib Figure


@contextmanager
def _part(rep: Report, name: str, opts: Options):
    t = time.perf_counter()
    yield
    dt = time.perf_counter() - t
    rep.metrics[f"seconds/{name}"] = dt
    if opts.progress is not None:
        opts.progress(name, dt)


class Moments:
    """Second moments of a sample matrix ``Z`` (n, K) fed in row chunks, in float64 on Z's device.

    ``n >= K``: the ``K x K`` Gram and the column sums are accumulated. ``n < K``: the rows are kept (n K values, fewer
    than the K^2 of the Gram) and the ``n x n`` Gram is used, so the spectrum has exactly ``min(n, K)`` entries.
    """

    def __init__(self, n: int, fields: int = 1):
        self.n, self.k, self.fields = n, None, fields  # fields: column groups of equal width (per-field blocks)
        self.g: Tensor | None = None  # (K, K)
        self.s: Tensor | None = None  # (K,)
        self.rows: list[Tensor] = []

    def add(self, x: Tensor) -> None:  # x (b, K)
        x = x.detach().to(torch.float64)
        self.k = x.shape[1]
        if self.n < self.k:
            self.rows.append(x)
        elif self.g is None:
            self.g, self.s = mt.xtx(x), x.sum(0)
        else:
            self.g += mt.xtx(x)
            self.s += x.sum(0)

    @property
    def rank(self) -> int:
        return min(self.n, self.k)

    def _z(self) -> Tensor:
        return torch.cat(self.rows)

    def sigma(self) -> Tensor:
        """The ``min(n, K)`` singular values of Z, descending (values below the Gram's resolution are 0)."""
        g = mt.xtx(self._z().T) if self.rows else self.g
        return mt.spectrum_from_gram(g, self.rank)

    def covariance_spectrum(self) -> Tensor:
        """Eigenvalues of the centred covariance (rank <= min(n - 1, K)), descending, normalised by the largest."""
        if self.rows:
            z = self._z()
            z = z - z.mean(0, keepdim=True)
            c = mt.xtx(z.T) / max(self.n - 1, 1)
        else:
            c = (self.g - torch.outer(self.s, self.s) / self.n) / max(self.n - 1, 1)
        ev = mt.eigvalsh(c).flip(0).clamp_min(0.0)[: self.rank]
        return ev / ev[0].clamp_min(1e-300)

    def block_grams(self, blocks: int) -> Tensor:
        """The diagonal ``(K/blocks)``-square blocks of ``Z^T Z``: (blocks, d, d), the Grams of Z's column groups."""
        if self.rows:
            z = self._z().unflatten(1, (blocks, -1))  # (n, blocks, d)
            return torch.einsum("nfd,nfe->fde", z, z)
        d = self.k // blocks
        g = self.g.view(blocks, d, blocks, d)
        return torch.stack([g[f, :, f] for f in range(blocks)])


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
                g = mt.xtx(t).cpu()
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


def _lookup(model, ids: Tensor) -> Tensor:
    """Field embeddings (M, B, F, D) of ids (B, F), detached, on the model's device, outside inference mode."""
    emb = model.embedding
    ids = ids.to(emb.weight.device).clone()
    flat = F.embedding(ids + emb.offsets, emb.weight).detach()  # (B, F, M*D)
    return flat.view(len(ids), -1, emb.num_sets, emb.dim).permute(2, 0, 1, 3)


def _flat(e: Tensor) -> Tensor:  # (M, B, F, D) -> (B, F*M*D), the field-major layout of the embedding table
    return e.permute(1, 2, 0, 3).reshape(e.shape[1], -1)


def _embedding_moments(model, ids: Tensor, opts: Options) -> Moments:
    """Moments of Z (N, F*M*D), the sample's flattened field embeddings."""
    z = Moments(len(ids))
    with torch.inference_mode(False), torch.no_grad():
        for s in range(0, len(ids), opts.chunk_rows):
            z.add(_flat(_lookup(model, ids[s:s + opts.chunk_rows])))
    return z


def _layer_moments(model, ids: Tensor, opts: Options) -> list[list[Moments]]:
    """Per layer l (0 = the input embeddings) and set m, moments of the layer output (N_l, F_l*D_l), in eval mode (the
    representation as served), on the first ``layer_rows`` rows of the sample."""
    bb = model.backbone
    n = min(len(ids), opts.layer_rows)
    layers: list[list[Moments]] | None = None
    was = bb.training
    bb.eval()
    try:
        with torch.inference_mode(False), torch.no_grad():
            for s in range(0, n, opts.chunk_rows):
                e = _lookup(model, ids[s:min(s + opts.chunk_rows, n)])  # (M, B, F, D)
                outs = [e, *bb.layer_outputs(e)]  # each (M, B, F_l, D_l)
                if layers is None:
                    layers = [[Moments(n, o.shape[2]) for _ in range(o.shape[0])] for o in outs]
                for acc, o in zip(layers, outs):
                    for m in range(o.shape[0]):
                        acc[m].add(o[m].flatten(1))
    finally:
        bb.train(was)
    return layers


def _gradient_moments(model, ids: Tensor, y: Tensor, opts: Options) -> Moments:
    """Moments of dL/dZ (N, F*M*D), ``L`` the mean BCE over the sample, parameters' ``.grad`` untouched.

    Train mode (default, SIGIR Sec. 4.2): dropout draws its masks from a generator seeded with ``gradient_seed`` inside
    ``torch.random.fork_rng`` (the CPU and the device's CUDA RNG state are restored afterwards, so the training stream
    is unchanged), BatchNorm normalises with batch statistics and its running statistics are restored afterwards (resume
    stays exact). Backward passes of ``gradient_batch_rows`` rows (BatchNorm statistics per batch; 0 = one backward over
    the whole sample, as the reference code does).
    """
    bb = model.backbone
    dev = model.embedding.weight.device
    n = len(y)
    train = opts.gradient_mode == "train"
    step = (opts.gradient_batch_rows or n) if train else opts.chunk_rows
    acc = Moments(n)
    was = bb.training
    saved = {k: b.detach().clone() for k, b in bb.named_buffers() if not b.is_inference()}
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.default_generator.manual_seed(opts.gradient_seed)
        if dev.type == "cuda":
            with torch.cuda.device(dev):
                torch.cuda.manual_seed(opts.gradient_seed)
        bb.train(train)
        try:
            for s in range(0, n, step):
                # `validate`/`test` run callbacks under inference_mode, where no graph can be built: leave it here
                with torch.inference_mode(False), torch.enable_grad():
                    e = _lookup(model, ids[s:s + step]).requires_grad_(True)
                    yb = y[s:s + step].to(dev).clone()
                    loss = F.binary_cross_entropy_with_logits(_call(bb, e), yb, reduction="sum") / n
                    (g,) = torch.autograd.grad(loss, e)  # parameters' .grad untouched (safe under DDP)
                    acc.add(_flat(g))
        finally:
            bb.train(was)
            with torch.no_grad():
                for k, b in bb.named_buffers():
                    if k in saved:
                        b.copy_(saved[k])
    return acc


def _ia(sigma: Tensor) -> float:
    return mt.information_abundance(sigma=sigma)


def compute_report(model, sample: tuple[Tensor, Tensor] | None, opts: Options | None = None,
                   field_names: list[str] | None = None) -> Report:
    opts = opts or Options()
    emb = model.embedding
    M, D, dims = emb.num_sets, emb.dim, emb.field_dims
    names = field_names or [f"f{i}" for i in range(len(dims))]
    order = np.argsort(dims, kind="stable")  # fields by cardinality (ICML Fig. 2)
    rep = Report()
    bb = model.backbone
    hp = getattr(model, "hparams", {}) or {}
    t0 = time.perf_counter()

    with _part(rep, "tables", opts):
        full, per_set = field_grams(model, opts.normalize_rows)
        # spectra cut to each table's rank min(|V_f|, width), values below the Gram's resolution are 0 (not resolved)
        sig_full = [mt.spectrum_from_gram(g, min(dims[f], M * D)) for f, g in enumerate(full)]
        ia_full = np.array([_ia(s) for s in sig_full])
        ia_set = mt.ia_from_grams(torch.stack([torch.stack(gs) for gs in per_set], 1)).cpu().numpy()  # (M, F)
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
        rep.tables["spectra"] = [
            {"field": names[f], "cardinality": dims[f], "k": k + 1,
             "sigma_over_sigma1": (v if v > 0 else float("nan"))}  # NaN: below the Gram's resolution
            for f in order for k, v in enumerate((sig_full[f] / sig_full[f][0].clamp_min(1e-300)).tolist())]

        # diversity of a field's sets (principal angles, from the off-diagonal Gram blocks; ICML Fig. 10a). ME: the
        # embedding sets. SE at scale s > 1: the table split into s column blocks of the base size, the paper's "SE"
        # comparator of Fig. 10a. SE 1x has nothing to compare: no value (never NaN).
        scale = int(hp.get("scale", 1) or 1)
        split = (M, D, "diversity") if M > 1 else (scale, D // scale, "diversity_se_split") \
            if scale > 1 and D % scale == 0 else None
        if split is not None and not opts.normalize_rows:
            sets, d, key = split
            div = mt.diversity_from_grams(torch.stack(full), sets, d).tolist()
            rep.metrics[f"{key}/mean"] = float(np.mean(div))
            for f, n in enumerate(names):
                rep.metrics[f"{key}/{n}"] = div[f]
            rep.tables["diversity"] = [{"field": names[f], "cardinality": dims[f], key: div[f]} for f in order]

        # DCNv2: sub-embedding IA (Evidence II, Fig. 3/9) and interaction patterns (Fig. 10b)
        sub_mats = []
        if hasattr(bb, "blocks"):
            blocks = bb.blocks().detach().cpu()  # (S, F, F, D, D), next to the host Grams
            for m in range(M):
                sub_mats.append(mt.sub_embedding_ia([per_set[f][m] for f in range(len(dims))],
                                                    blocks[min(m, blocks.shape[0] - 1)]).cpu())
            patterns = mt.interaction_pattern(blocks).cpu()  # (S, F, F)
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
                            A[i, j] = _ia(mt.spectrum_from_gram(per_set[i][m][sl:sl + k, sl:sl + k], min(dims[i], k)))
                sub_mats.append(A)
        cf = []
        if sub_mats:
            cf = [mt.correlation_factor(torch.nan_to_num(A, nan=0.0), torch.from_numpy(ia_set[m]))
                  for m, A in enumerate(sub_mats)]
            rep.metrics["sub_ia/correlation_factor"] = float(np.mean(cf))  # mean over sets
            for m, c in enumerate(cf):
                rep.metrics[f"sub_ia_set{m}/correlation_factor"] = c
            srt = np.argsort(ia_set[0], kind="stable")  # fields by IA(E_i) ascending (ICML Fig. 3)
            A0 = sub_mats[0].numpy()[np.ix_(srt, srt)]
            rep.tables["sub_embedding_ia"] = [
                {"field_i": names[srt[a]], "field_j": names[srt[b]], "ia": float(A0[a, b])}
                for a in range(len(dims)) for b in range(len(dims))]
            rep.tables["sub_embedding_ia_sums"] = [
                {"field": names[srt[a]], "row_sum": float(np.nansum(A0[a])), "col_sum": float(np.nansum(A0[:, a]))}
                for a in range(len(dims))]

    # RankMe of Z and of dL/dZ on the fixed validation sample; per-layer IA and RankMe on its first layer_rows rows
    cov, layer_ia, layer_rm = {}, None, None
    want_layers = opts.layers and hasattr(bb, "layer_outputs")
    if sample is not None and opts.rankme:
        with _part(rep, "rankme", opts):
            z = _embedding_moments(model, sample[0], opts)
            rep.metrics["rankme/embeddings"] = mt.rankme(sigma=z.sigma())
            cov["z"] = z.covariance_spectrum().cpu().numpy()
    if sample is not None and want_layers:
        with _part(rep, "layers", opts):
            layer_ia, layer_rm = _layer_values(_layer_moments(model, sample[0], opts), rep)
    if sample is not None and opts.gradient_rankme:
        with _part(rep, "gradients", opts):
            g = _gradient_moments(model, sample[0], sample[1], opts)
            rep.metrics["rankme/gradients"] = mt.rankme(sigma=g.sigma())
            cov["grad"] = g.covariance_spectrum().cpu().numpy()
    if sample is not None and (opts.rankme or opts.gradient_rankme):
        n = len(sample[1])
        rep.metrics["rankme/sample_rows"] = float(n)
        rep.tables["covariance_spectrum"] = [{"of": k, "index": i + 1, "normalized_eigenvalue": float(v)}
                                             for k, arr in cov.items() for i, v in enumerate(arr)]

    if opts.figures:
        with _part(rep, "figures", opts):
            from recscale.diagnostics import plots

            t = f" ({opts.title})" if opts.title else ""
            rep.figures["ia_heatmap"] = plots.ia_heatmap(ia_full, ia_set, names, order, t)
            rep.figures["spectra"] = plots.spectra(sig_full, dims, t)
            if cov:
                rep.figures["covariance_spectrum"] = plots.covariance_spectra(cov, n, t)
            if sub_mats:
                rep.figures["sub_embedding_ia"] = plots.sub_ia(sub_mats[0].numpy(), ia_set[0], cf[0], M, t)
            if hasattr(bb, "blocks") and M > 1:
                rep.figures["interaction_patterns"] = plots.patterns(
                    mt.interaction_pattern(bb.blocks().detach().cpu()).numpy(), t)
            if "diversity" in rep.tables:
                key = "diversity" if M > 1 else "diversity_se_split"
                rep.figures["diversity"] = plots.diversity([r[key] for r in rep.tables["diversity"]],
                                                           [r["field"] for r in rep.tables["diversity"]], key, t)
            if layer_ia is not None:
                rep.figures["ia_vs_depth"] = plots.ia_vs_depth(layer_ia, layer_rm, min(len(sample[1]), opts.layer_rows), t)
    rep.metrics["seconds"] = time.perf_counter() - t0
    return rep


def _layer_values(layers: list[list[Moments]], rep: Report) -> tuple[np.ndarray, np.ndarray]:
    """Per layer l and set m: mean per-field IA (ICML 2024 Def. 1 applied to the sample's (N, D_l) matrix of each of
    the layer's F_l fields: the diagonal blocks of the layer output's Gram, no centring) and RankMe of the flattened
    (N, F_l*D_l) output (SIGIR 2026 Eq. 1). Layer 0 is the input embeddings. Values (L+1, M) each."""
    ia = np.zeros((len(layers), len(layers[0])))
    rm = np.zeros_like(ia)
    for l, per_set in enumerate(layers):
        for m, acc in enumerate(per_set):
            rm[l, m] = mt.rankme(sigma=acc.sigma())
            ia[l, m] = float(mt.ia_from_grams(acc.block_grams(acc.fields)).mean())
            rep.metrics[f"layer{l}/set{m}/ia_mean"] = float(ia[l, m])
            rep.metrics[f"layer{l}/set{m}/rankme"] = float(rm[l, m])
        rep.metrics[f"layer{l}/ia_mean"] = float(ia[l].mean())  # mean over sets
        rep.metrics[f"layer{l}/rankme"] = float(rm[l].mean())
    return ia, rm
