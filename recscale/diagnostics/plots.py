"""Figures of the diagnostics (matplotlib, Agg backend): the papers' plots, one function each.

Sized for MLflow's artifact viewer (about 800-1000 px wide at the 110 dpi `write_report` uses): 9-11 pt text, every
axis labelled, a colour bar with a label wherever colour carries a value, a legend wherever lines are several. ``t`` is
appended to every title (the run's step)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from recscale.diagnostics.metrics import GRAM_RESOLUTION  # noqa: E402

plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8})


def ia_heatmap(ia_full, ia_set, names, order, t=""):
    """Per-field IA, fields sorted by cardinality (ICML 2024 Fig. 2; Fig. 8b's per-set view). One row per set plus the
    concatenation, each row with its own colour scale and colour bar (one scale for IA <= D and IA <= M*D flattens the
    per-set rows)."""
    M = len(ia_set)
    rows = ([(f"set {m}", ia_set[m]) for m in range(M)] if M > 1 else []) + [("all sets" if M > 1 else "IA", ia_full)]
    F = len(order)
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(7.0, 0.22 * F + 1.5), 0.9 + 0.55 * len(rows) + 0.6),
                             squeeze=False, sharex=True)
    for ax, (label, vals) in zip(axes[:, 0], rows):
        im = ax.imshow(np.asarray(vals)[order][None, :], aspect="auto", cmap="viridis")
        ax.set_yticks([0], [label])
        cb = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
        cb.ax.tick_params(labelsize=7)
        cb.set_label("IA", fontsize=7)
    ax = axes[-1, 0]
    ax.set_xticks(range(F), [names[i] for i in order], rotation=90, fontsize=8 if F <= 40 else 6)
    ax.set_xlabel("field (ascending cardinality)")
    axes[0, 0].set_title(f"Information abundance per field{t}")
    fig.tight_layout()
    return fig


def spectra(sig_full, dims, t=""):
    """Normalised singular spectra sigma_k / sigma_1 per field (ICML 2024 Fig. 1b), coloured by log10 cardinality, each
    curve cut at the field's rank and at the float64 Gram's resolution (below it values are round-off)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    logc = np.log10(np.asarray(dims, dtype=float))
    norm = matplotlib.colors.Normalize(logc.min(), max(logc.max(), logc.min() + 1e-9))
    cmap = plt.get_cmap("plasma")
    low = 1.0
    for f, s in enumerate(sig_full):
        s = s.cpu().numpy()
        r = s / max(s[0], 1e-300)
        r = np.where(r > 0, r, np.nan)
        low = min(low, float(np.nanmin(r)) if np.isfinite(r).any() else 1.0)
        ax.plot(np.arange(1, len(r) + 1), r, color=cmap(norm(logc[f])), lw=0.9)
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(GRAM_RESOLUTION, low) / 2, top=1.5)
    if low < 10 * GRAM_RESOLUTION:
        ax.axhline(GRAM_RESOLUTION, color="grey", lw=0.6, ls=":", label="float64 Gram resolution")
        ax.legend(loc="lower left")
    ax.set_xlabel("k")
    ax.set_ylabel(r"$\sigma_k / \sigma_1$")
    ax.set_title(f"Normalised singular spectrum per field{t}")
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label="log10 field cardinality")
    fig.tight_layout()
    return fig


def covariance_spectra(cov: dict, n: int, t=""):
    """Eigenvalues of the centred covariance of the sample, normalised by the largest, log scale (SIGIR 2026 Fig. 1
    and Fig. 4). Only the resolvable range is drawn: lambda_k / lambda_1 >= GRAM_RESOLUTION^2 (the covariance's
    eigenvalues are squares of singular values); the sample's rank limit min(N - 1, K) is marked."""
    floor = GRAM_RESOLUTION ** 2
    fig, ax = plt.subplots(figsize=(7, 4.2))
    k, low = 0, 1.0
    for name, arr in cov.items():
        k = max(k, len(arr))
        a = np.where(arr >= floor, arr, np.nan)
        low = min(low, float(np.nanmin(a)) if np.isfinite(a).any() else 1.0)
        ax.plot(np.arange(1, len(a) + 1), a, label={"z": "embeddings Z", "grad": "gradients dL/dZ"}[name], lw=1.1)
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(floor, low) / 2, top=2.0)
    if n - 1 <= k:
        ax.axvline(n - 1, color="grey", lw=0.8, ls="--", label=f"sample rank limit N-1 = {n - 1}")
    ax.set_xlabel("index k")
    ax.set_ylabel(r"$\lambda_k / \lambda_1$")
    ax.legend()
    ax.set_title(f"Covariance spectrum of the validation sample (N = {n:,}){t}")
    fig.tight_layout()
    return fig


def sub_ia(A, field_ia, corr, num_sets, t=""):
    """Sub-embedding IA matrix IA(E_i^{->j}) of set 0, fields sorted by IA(E_i) ascending (ICML 2024 Fig. 3 / Fig. 9),
    with its row and column sums; the title's correlation factor is set 0's (the metric averages the sets)."""
    srt = np.argsort(field_ia, kind="stable")
    data = A[np.ix_(srt, srt)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1.3, 1.3]})
    im = axes[0].imshow(data, cmap="viridis")
    axes[0].set_xlabel("j (interacting field, by IA(E_j))")
    axes[0].set_ylabel("i (field, by IA(E_i))")
    which = " of set 0" if num_sets > 1 else ""
    axes[0].set_title(f"IA(E_i->j){which}; correlation factor {corr:.2f}{t}")
    fig.colorbar(im, ax=axes[0], label="IA")
    axes[1].plot(np.nansum(data, 1))
    axes[1].set_xlabel("i (by IA)")
    axes[1].set_ylabel("sum over j of IA")
    axes[1].set_title("row sums")
    axes[2].plot(np.nansum(data, 0))
    axes[2].set_xlabel("j (by IA)")
    axes[2].set_ylabel("sum over i of IA")
    axes[2].set_title("column sums")
    fig.tight_layout()
    return fig


def patterns(norms, t=""):
    """||W^(m)_{i->j}||_F per embedding set (ICML 2024 Fig. 10b), one shared colour scale so sets compare."""
    S = norms.shape[0]
    cols = min(S, 5)
    rows = -(-S // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 1.2, 2.4 * rows + 0.6), squeeze=False)
    vmax = float(norms.max()) if norms.size else 1.0
    im = None
    for s in range(rows * cols):
        ax = axes[s // cols][s % cols]
        if s < S:
            im = ax.imshow(norms[s], cmap="magma", vmin=0.0, vmax=vmax)
            ax.set_title(f"set {s}")
            ax.set_xlabel("j", labelpad=1)
            ax.set_ylabel("i", labelpad=1)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.axis("off")
    fig.suptitle(r"Interaction patterns $\|W_{i\to j}\|_F$ of the first cross layer (fields in data order)" + t)
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), label=r"$\|W_{i\to j}\|_F$", shrink=0.8)
    return fig


def diversity(values, fields, key, t=""):
    """Set diversity 1 - mean principal cosine per field, fields by ascending cardinality (ICML 2024 Fig. 10a). For SE
    the table is split into column blocks of the base size (the paper's SE comparator)."""
    fig, ax = plt.subplots(figsize=(max(7.0, 0.2 * len(fields) + 1.5), 3.6))
    ax.bar(range(len(values)), values, color="tab:blue" if key == "diversity" else "tab:orange")
    ax.set_xticks(range(len(fields)), fields, rotation=90, fontsize=8 if len(fields) <= 40 else 6)
    ax.set_xlabel("field (ascending cardinality)")
    ax.set_ylabel("diversity (1 - mean cos)")
    ax.set_ylim(0, 1)
    what = "embedding sets" if key == "diversity" else "SE table split into base-size blocks"
    ax.set_title(f"Set diversity per field, {what}{t}")
    fig.tight_layout()
    return fig


def ia_vs_depth(ia, rm, rows, t=""):
    """Per-layer mean field IA and RankMe against depth l (l = 0: the input embeddings), one line per set (issue 11)."""
    L1, M = ia.shape
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(L1)
    for m in range(M):
        kw = {"label": f"set {m}" if M > 1 else "SE", "marker": "o", "ms": 3, "lw": 1}
        axes[0].plot(x, ia[:, m], **kw)
        axes[1].plot(x, rm[:, m], **kw)
    axes[0].set_ylabel("mean per-field IA")
    axes[1].set_ylabel("RankMe of the layer output")
    for ax in axes:
        ax.set_xlabel("layer l (0 = input embeddings)")
        ax.set_xticks(x)
    if M <= 10:
        axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    axes[0].set_title(f"IA vs depth{t}")
    axes[1].set_title(f"RankMe vs depth (N = {rows:,}){t}")
    fig.tight_layout()
    return fig
