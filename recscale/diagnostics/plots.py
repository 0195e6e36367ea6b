"""Figures of the diagnostics (matplotlib, Agg backend): the papers' plots, one function each."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def ia_heatmap(ia_full, ia_set, names, order):
    """Per-field IA, fields sorted by cardinality (ICML 2024 Fig. 2); one row per set plus the concatenation."""
    rows = ([ia_set[m] for m in range(len(ia_set))] if len(ia_set) > 1 else []) + [ia_full]
    labels = ([f"set {m}" for m in range(len(ia_set))] if len(ia_set) > 1 else []) + ["all sets" if len(ia_set) > 1 else "IA"]
    data = np.array(rows)[:, order]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(names)), 1.2 + 0.35 * len(rows)))
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(order)), [names[i] for i in order], rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title("information abundance per field (fields by cardinality, ascending)", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def spectra(sig_full, dims, names):
    """Normalised singular spectra sigma_k / sigma_1 per field (ICML 2024 Fig. 1b), coloured by log cardinality."""
    fig, ax = plt.subplots(figsize=(6, 4))
    logc = np.log10(np.asarray(dims, dtype=float))
    cmap = plt.get_cmap("plasma")
    span = max(logc.max() - logc.min(), 1e-9)
    for f, s in enumerate(sig_full):
        s = s.numpy()
        ax.plot(np.arange(1, len(s) + 1), s / max(s[0], 1e-300), color=cmap((logc[f] - logc.min()) / span), lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel(r"$\sigma_k / \sigma_1$")
    ax.set_title("normalised singular spectrum per field (colour: log cardinality)", fontsize=9)
    fig.tight_layout()
    return fig


def covariance_spectra(cov: dict):
    """Eigenvalues of the centred covariance, normalised by the largest, log scale (SIGIR 2026 Fig. 1 and Fig. 4)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, arr in cov.items():
        ax.plot(np.arange(1, len(arr) + 1), np.maximum(arr, 1e-300), label={"z": "embeddings", "grad": "gradients"}[name])
    ax.set_yscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel("normalised eigenvalue")
    ax.legend()
    ax.set_title("covariance spectrum of the validation sample", fontsize=9)
    fig.tight_layout()
    return fig


def sub_ia(A, field_ia, names, corr):
    """Sub-embedding IA matrix IA(E_i^{->j}), fields sorted by IA(E_i) ascending (ICML 2024 Fig. 3 / Fig. 9)."""
    srt = np.argsort(field_ia, kind="stable")
    data = A[np.ix_(srt, srt)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 1.2, 1.2]})
    im = axes[0].imshow(data, cmap="viridis")
    axes[0].set_xlabel("j (interacting field, by IA)")
    axes[0].set_ylabel("i (field, by IA)")
    axes[0].set_title(f"IA(E_i->j), correlation factor {corr:.2f}", fontsize=9)
    fig.colorbar(im, ax=axes[0])
    axes[1].plot(np.nansum(data, 1))
    axes[1].set_title("sum over j", fontsize=9)
    axes[2].plot(np.nansum(data, 0))
    axes[2].set_title("sum over i", fontsize=9)
    fig.tight_layout()
    return fig


def patterns(norms):
    """||W^(m)_{i->j}||_F per embedding set (ICML 2024 Fig. 10b)."""
    S = norms.shape[0]
    cols = min(S, 5)
    rows = -(-S // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for s in range(rows * cols):
        ax = axes[s // cols][s % cols]
        ax.axis("off")
        if s < S:
            ax.imshow(norms[s], cmap="magma")
            ax.set_title(f"set {s}", fontsize=8)
    fig.suptitle("interaction patterns ||W_{i->j}||_F", fontsize=9)
    fig.tight_layout()
    return fig
