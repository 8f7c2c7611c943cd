"""Retrieval metrics as pure functions of one bounded block of queries.

Conventions (BRCD_SPEC §6, DeepHash style), shared by every function here:

* **Ranking**: by Hamming distance, ties broken by database index (a stable sort). The research
  code breaks ties arbitrarily; a stable order makes every number reproducible.
* **Relevance**: a database item is relevant to a query iff they share at least one label
  (single-label: equal labels; multi-label: multi-hot rows with a common 1).
* **K larger than N** is clipped to N (all of mAP@K, precision@K).
* **mAP@K**: ``AP@K = (1 / R_K) * sum_{i <= K, rel_i} P@i`` with ``R_K`` the number of relevant
  items within the top K; a query with ``R_K = 0`` scores 0 and still counts in the mean.
  mAP@all is the same with K = N.
* **precision@K**: ``(relevant in top K) / K``.
* **precision within Hamming radius r**: ``(relevant with d <= r) / (items with d <= r)``; a query
  retrieving nothing scores 0 and still counts (the DeepHash convention).
* **precision–recall over radii** r = 0..L: recall averages over queries with at least one
  relevant item; precision averages over queries retrieving at least one item at that radius
  (NaN where no query retrieves anything).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "check_labels",
    "relevance",
    "ranked_relevance",
    "average_precision",
    "precision_at_k",
    "radius_histograms",
    "precision_within_radius",
    "pr_from_histograms",
]


def check_labels(labels, n: int, name: str) -> np.ndarray:
    """Validate labels: int ``[n]`` (single-label) or {0, 1} ``[n, C]`` (multi-label).

    Returns a numpy array (int64 for single-label, float32 multi-hot for multi-label).
    """
    if hasattr(labels, "detach"):  # a torch tensor
        labels = labels.detach().cpu().numpy()
    if not isinstance(labels, np.ndarray):
        labels = np.asarray(labels)
    if labels.ndim not in (1, 2):
        raise ValueError(f"{name} must be [N] class ids or [N, C] multi-hot, got {labels.shape}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} must have {n} rows (one per code), got {labels.shape[0]}")
    if labels.ndim == 1:
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"{name} (single-label) must hold integers, got {labels.dtype}")
        return labels.astype(np.int64, copy=False)
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_
            or np.issubdtype(labels.dtype, np.floating)):
        raise TypeError(f"{name} (multi-label) must be numeric or bool, got {labels.dtype}")
    lab = labels.astype(np.float32, copy=False)
    if not np.isin(lab, (0.0, 1.0)).all():
        raise ValueError(f"{name} (multi-label) must be multi-hot with values 0 and 1")
    return lab


def relevance(query_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """Boolean relevance of a query block to the database: shares at least one label.

    Args:
        query_labels: ``[b]`` ints or ``[b, C]`` multi-hot. db_labels: ``[N]`` or ``[N, C]``.

    Shape:
        -> ``[b, N]`` bool.

    Example:
        >>> relevance(np.array([1, 2]), np.array([2, 1, 1])).astype(int).tolist()
        [[0, 1, 1], [1, 0, 0]]
    """
    if query_labels.ndim != db_labels.ndim:
        raise ValueError(
            "query_labels and db_labels must both be single-label [N] or both multi-hot [N, C], "
            f"got ndim {query_labels.ndim} and {db_labels.ndim}"
        )
    if query_labels.ndim == 1:
        return query_labels[:, None] == db_labels[None, :]
    if query_labels.shape[1] != db_labels.shape[1]:
        raise ValueError(
            f"db_labels must have C = {query_labels.shape[1]} columns like query_labels, "
            f"got {db_labels.shape[1]}"
        )
    return (query_labels @ db_labels.T) > 0


def ranked_relevance(dist: np.ndarray, rel: np.ndarray, order: np.ndarray | None = None):
    """Relevance in rank order (distance, then database index).

    Shape:
        dist ``[b, N]``, rel ``[b, N]`` -> ``[b, N]`` bool.
    """
    if order is None:
        order = np.argsort(dist.astype(np.uint16, copy=False), axis=1, kind="stable")
    return np.take_along_axis(rel, order, axis=1)


def average_precision(rel_sorted: np.ndarray, k: int | None = None) -> np.ndarray:
    """AP@K of each query from its ranked relevance (K = None or K > N means all).

    Works on the positions of the relevant items only (``O(relevant)`` arithmetic after one
    ``nonzero`` pass), not on a cumulative sum over the whole ranking.

    Args:
        rel_sorted: ``[b, N]`` bool relevance in rank order. k: cut-off K >= 1, or None.

    Returns:
        ``[b]`` float64; 0 for a query without a relevant item in its top K.

    Example:
        >>> average_precision(np.array([[True, False, True]]), 3).round(4).tolist()
        [0.8333]
    """
    b, n = rel_sorted.shape
    kk = n if k is None else min(_check_k(k), n)
    rows, cols = np.nonzero(rel_sorted[:, :kk])  # row-major: columns ascend within a row
    nrel = np.bincount(rows, minlength=b)
    starts = np.cumsum(nrel) - nrel
    hits = np.arange(1, len(rows) + 1) - starts[rows]  # rank among the row's relevant items
    num = np.bincount(rows, weights=hits / (cols + 1.0), minlength=b)
    return np.where(nrel > 0, num / np.maximum(nrel, 1), 0.0)


def precision_at_k(rel_sorted: np.ndarray, ks) -> np.ndarray:
    """precision@K for each query and each K (K > N clipped to N).

    Returns:
        ``[b, len(ks)]`` float64.

    Example:
        >>> precision_at_k(np.array([[True, False, True]]), [1, 2, 5]).round(3).tolist()
        [[1.0, 0.5, 0.667]]
    """
    n = rel_sorted.shape[1]
    cols = [min(_check_k(k), n) for k in ks]
    return np.stack([np.count_nonzero(rel_sorted[:, :c], axis=1) / c for c in cols], axis=1)


def radius_histograms(
    dist: np.ndarray, rel: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query histograms of database distances: all items and relevant items.

    Counting instead of sorting: with L-bit codes, d is in [0, L], so cumulative histograms give
    retrieved / relevant-retrieved counts at every radius exactly.

    Shape:
        dist, rel ``[b, N]`` -> (all ``[b, L+1]``, relevant ``[b, L+1]``) int64.
    """
    b = dist.shape[0]
    width = bits + 1
    keys = (np.arange(b, dtype=np.int64)[:, None] * width + dist).ravel()
    h_all = np.bincount(keys, minlength=b * width).reshape(b, width)
    h_rel = np.bincount(keys[rel.ravel()], minlength=b * width).reshape(b, width)
    return h_all, h_rel


def precision_within_radius(h_all: np.ndarray, h_rel: np.ndarray, r: int) -> np.ndarray:
    """Per-query precision of the items within Hamming radius r (0 when nothing is retrieved).

    Shape:
        histograms ``[b, L+1]`` -> ``[b]`` float64.

    Example:
        >>> precision_within_radius(np.array([[1, 1, 2]]), np.array([[1, 0, 0]]), 1).tolist()
        [0.5]
    """
    r = min(int(r), h_all.shape[1] - 1)
    got = h_all[:, : r + 1].sum(axis=1)
    good = h_rel[:, : r + 1].sum(axis=1)
    return np.where(got > 0, good / np.maximum(got, 1), 0.0)


def pr_from_histograms(h_all: np.ndarray, h_rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean precision and recall at every Hamming radius r = 0..L (conventions: module doc).

    Args:
        h_all, h_rel: per-query histograms from :func:`radius_histograms`, all queries stacked.

    Returns:
        (precision ``[L+1]``, recall ``[L+1]``), float64.
    """
    got = np.cumsum(h_all, axis=1)
    good = np.cumsum(h_rel, axis=1)
    total_rel = h_rel.sum(axis=1, keepdims=True)
    has_rel = total_rel[:, 0] > 0
    recall = (good[has_rel] / total_rel[has_rel]).mean(axis=0) if has_rel.any() else (
        np.zeros(h_all.shape[1]))
    with np.errstate(invalid="ignore", divide="ignore"):
        prec_q = np.where(got > 0, good / np.maximum(got, 1), np.nan)
        counted = (got > 0).sum(axis=0)
        precision = np.where(counted > 0, np.nansum(prec_q, axis=0) / np.maximum(counted, 1),
                             np.nan)
    return precision, recall


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"K must be a positive integer, got {k!r}")
    return int(k)
