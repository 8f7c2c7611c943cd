"""Report figures (matplotlib, Agg backend, PNG): precision–recall curves, mAP against code
length, the per-cluster bit-mask heatmap and the ablation bars.

Each function takes plain Python/numpy data (e.g. the ``pr_precision`` / ``pr_recall`` of a
:class:`brcd.retrieval.RetrievalMetrics`), writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never open a window, works without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_pr_curves", "plot_map_vs_bits", "plot_mask_heatmap", "plot_ablation"]


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pr_curves(curves: dict, path, title: str = "Precision–recall over Hamming radii") -> Path:
    """Precision–recall curves, one line per model.

    Args:
        curves: ``{name: (precision [L+1], recall [L+1])}``; NaN precision points are skipped.
        path: output PNG path. title: figure title.

    Returns:
        the written path.

    Example:
        >>> plot_pr_curves({"teacher": ([1, .8, .5], [0, .4, 1])}, "/tmp/pr.png").name
        'pr.png'
    """
    if not isinstance(curves, dict) or not curves:
        raise ValueError("curves must be a non-empty dict {name: (precision, recall)}")
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, (prec, rec) in curves.items():
        p, r = np.asarray(prec, float), np.asarray(rec, float)
        if p.shape != r.shape:
            raise ValueError(f"curves[{name!r}]: precision and recall must have the same length")
        ok = np.isfinite(p) & np.isfinite(r)
        ax.plot(r[ok], p[ok], marker=".", ms=3, lw=1.4, label=str(name))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_map_vs_bits(series: dict, path, metric: str = "mAP@1000") -> Path:
    """mAP against code length, one line per model.

    Args:
        series: ``{name: {bits: mAP}}`` or ``{name: {bits: (mean, std)}}`` (error bars).
        path: output PNG path. metric: y-axis label.

    Returns:
        the written path.

    Example:
        >>> plot_map_vs_bits({"BRCD": {16: .6, 32: (.65, .01)}}, "/tmp/m.png").name
        'm.png'
    """
    if not isinstance(series, dict) or not series:
        raise ValueError("series must be a non-empty dict {name: {bits: mAP}}")
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    all_bits = set()
    for name, pts in series.items():
        bits = sorted(int(b) for b in pts)
        all_bits.update(bits)
        vals = [pts[b] for b in bits]
        mean = np.array([v[0] if isinstance(v, (tuple, list)) else v for v in vals], float)
        std = np.array([v[1] if isinstance(v, (tuple, list)) else 0.0 for v in vals], float)
        ax.errorbar(bits, mean, yerr=std, marker="o", ms=4, capsize=3, lw=1.4, label=str(name))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_bits))
    ax.set_xticklabels([str(b) for b in sorted(all_bits)])
    ax.set_xlabel("code length (bits)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_mask_heatmap(mask, path, title: str = "Bits kept per cluster") -> Path:
    """Heatmap of the per-cluster bit-mask table (1 = bit kept for that cluster).

    Args:
        mask: ``[C, L]`` {0, 1} / bool (numpy or torch). path: output PNG path.

    Returns:
        the written path.

    Example:
        >>> plot_mask_heatmap(np.eye(3, 8), "/tmp/mask.png").name
        'mask.png'
    """
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask, dtype=float)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D [C, L] table, got shape {m.shape}")
    c, length = m.shape
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.16 * length), min(8, 1.5 + 0.35 * c)))
    ax.imshow(m, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("bit")
    ax.set_ylabel("cluster")
    ax.set_yticks(range(c))
    ax.set_yticklabels([f"{i} ({int(m[i].sum())})" for i in range(c)], fontsize=7)
    ax.set_title(f"{title} (black = kept; {m.sum(1).mean():.1f}/{length} on average)",
                 fontsize=10)
    return _save(fig, path)


def plot_ablation(variants: dict, path, title: str = "Ablation") -> Path:
    """Grouped bars: mean mAP per variant and paradigm, error bars = std over seeds.

    Args:
        variants: ``{name: {"sshp": [per seed], "ashp": [per seed]}}`` in display order.
        path: output PNG path. title: figure title.

    Returns:
        the written path.

    Example:
        >>> plot_ablation({"full": {"sshp": [.6, .62]}, "no mask": {"sshp": [.58]}},
        ...               "/tmp/ab.png").name
        'ab.png'
    """
    if not isinstance(variants, dict) or not variants:
        raise ValueError("variants must be a non-empty dict {name: {paradigm: [mAP per seed]}}")
    names = list(variants)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.0 + 0.9 * len(names)), 4.2))
    x = np.arange(len(names))
    for i, par in enumerate(("sshp", "ashp")):
        vals = [list(variants[n].get(par) or []) for n in names]
        mean = [np.mean(v) if v else np.nan for v in vals]
        std = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(x + (i - 0.5) * 0.38, mean, 0.38, yerr=std, capsize=3, label=par.upper())
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("mAP")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)
