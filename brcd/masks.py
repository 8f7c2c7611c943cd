"""Clusters of teacher codes and per-cluster bit masks (BRCD_SPEC §4-5).

k-means (scikit-learn, k-means++, ``n_init`` restarts) runs on the teacher's ±1 codes of the
training images (deterministic view). Centroids ``mu_c`` lie in ``[-1, 1]^L``; the mask keeps bit
j of cluster c iff ``|mu_c[j]| > delta`` ("agree": the bits the cluster agrees on), or the
opposite ("redundant"), or every bit ("none"), or no bit ("zero": the research code's degenerate
all-zero table, BRCD_SPEC §8.1, for comparison only). The result, :class:`ClusterMasks`, is
stored in the teacher checkpoint next to the teacher that produced it — never in side files.
Offset positives are assigned with :func:`assign_clusters` on the UNMASKED teacher codes.
:func:`training_mask_table` gives the table a distillation run uses (``distill.mask_convention``
may rebuild it from the stored centroids with another convention, an ablation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "ClusterMasks",
    "kmeans_codes",
    "choose_n_clusters",
    "mask_table_from_centroids",
    "training_mask_table",
    "assign_clusters",
    "compute_cluster_masks",
    "cluster_stats",
]

# masks.convention -> which bits a cluster keeps, from |mu| and delta. "redundant" is the
# opposite reading of the paper (an ablation); "none" keeps every bit; "zero" keeps none: the
# research code's mask builder swaps the arguments of two replacements and so sets every entry to
# 0 (BRCD_SPEC §8.1). Reproduced for comparison only, never a sensible choice: every masked
# similarity is then 0, so the structural term is a constant 0 logit.
CONVENTIONS = {
    "agree": lambda a, delta: a > delta,
    "redundant": lambda a, delta: a <= delta,
    "none": lambda a, delta: torch.ones_like(a, dtype=torch.bool),
    "zero": lambda a, delta: torch.zeros_like(a, dtype=torch.bool),
}


@dataclass
class ClusterMasks:
    """Centroids, mask table and the training images' cluster ids, as stored in checkpoints.

    Attributes:
        centroids: float32 ``[C, L]`` in [-1, 1]. mask_table: float32 {0,1} ``[C, L]``.
        train_cluster_ids: int64 ``[N_train]`` (k-means labels, in training-split order).
        train_indices: int64 ``[N_train]`` pool indices of the training split (a consistency
            check at distillation time). delta, convention: how the masks were built.
        silhouette: ``{C: score}`` when C was chosen by silhouette, else empty.
    """

    centroids: torch.Tensor
    mask_table: torch.Tensor
    train_cluster_ids: torch.Tensor
    train_indices: torch.Tensor
    delta: float
    convention: str
    silhouette: dict

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def bits(self) -> int:
        return int(self.centroids.shape[1])

    def to_dict(self) -> dict:
        """Plain data for a checkpoint: tensors, a float, a str and ``{int: float}``."""
        return {"centroids": self.centroids, "mask_table": self.mask_table,
                "train_cluster_ids": self.train_cluster_ids, "train_indices": self.train_indices,
                "delta": float(self.delta), "convention": str(self.convention),
                "silhouette": {int(c): float(v) for c, v in self.silhouette.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> ClusterMasks:
        """Inverse of :meth:`to_dict`; a ``ValueError`` when ``d`` is not such a dict."""
        names = [f for f in cls.__dataclass_fields__]
        tensors = ("centroids", "mask_table", "train_cluster_ids", "train_indices")
        if not isinstance(d, dict) or sorted(d) != sorted(names) or not all(
                isinstance(d[k], torch.Tensor) for k in tensors):
            raise ValueError(f"malformed masks in the checkpoint: expected {names}")
        c, t, ids, idx = (d[k] for k in tensors)
        if (c.ndim != 2 or t.shape != c.shape or ids.ndim != 1 or ids.shape != idx.shape
                or (len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < c.shape[0])):
            raise ValueError("malformed masks in the checkpoint: centroids / mask_table "
                             "[C, L], cluster ids in [0, C) for every training image")
        return cls(**d)

    def report(self) -> str:
        """A short text table: size and bits kept per cluster."""
        sizes = torch.bincount(self.train_cluster_ids, minlength=self.n_clusters).tolist()
        kept = self.mask_table.sum(1).long().tolist()
        lines = [f"{self.n_clusters} clusters on {self.bits}-bit teacher codes, mask "
                 f"{self.convention} (delta={self.delta}):",
                 "cluster  images  bits kept"]
        lines += [f"{c:7d} {sizes[c]:7d} {kept[c]:5d}/{self.bits}" for c in range(self.n_clusters)]
        lines.append(f"mean bits kept: {sum(kept) / len(kept):.1f}/{self.bits}")
        if self.silhouette:
            lines.append("silhouette: " + ", ".join(
                f"C={c}: {s:.3f}" for c, s in sorted(self.silhouette.items())))
        return "\n".join(lines)


def _as_numpy_codes(codes) -> np.ndarray:
    arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if arr.ndim != 2 or not ((arr == 1) | (arr == -1)).all():
        raise ValueError("codes must be ±1 values of shape [N, L]")
    return arr.astype(np.float64)


def kmeans_codes(codes, n_clusters: int, n_init: int = 10,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ on ±1 codes.

    Args:
        codes: ±1 ``[N, L]`` (torch or numpy). n_clusters: C >= 2 (<= N). n_init: restarts.

    Returns:
        ``(centroids float32 [C, L], labels int64 [N])``; centroids are cluster means of ±1
        codes, hence in [-1, 1].
    """
    from sklearn.cluster import KMeans

    x = _as_numpy_codes(codes)
    if not 2 <= n_clusters <= len(x):
        raise ValueError(f"n_clusters must be in [2, N = {len(x)}], got {n_clusters}")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    km = KMeans(n_clusters=n_clusters, init="k-means++", n_init=n_init, random_state=seed)
    labels = km.fit_predict(x)
    return (torch.from_numpy(km.cluster_centers_).float(),
            torch.from_numpy(labels.astype(np.int64)))


def choose_n_clusters(codes, candidates: list[int], n_init: int = 10, seed: int = 0,
                      sample: int = 5000) -> tuple[int, dict]:
    """Pick C by the best silhouette score (Hamming ≙ Euclidean on ±1 codes).

    Returns:
        ``(best C, {C: score})``.
    """
    from sklearn.metrics import silhouette_score

    x = _as_numpy_codes(codes)
    scores = {}
    for c in candidates:
        _, labels = kmeans_codes(x, int(c), n_init, seed)
        if len(np.unique(labels.numpy())) < 2:
            scores[int(c)] = -1.0
            continue
        scores[int(c)] = float(silhouette_score(x, labels.numpy(), sample_size=min(sample, len(x)),
                                                random_state=seed))
    return max(scores, key=scores.get), scores


def mask_table_from_centroids(centroids: torch.Tensor, delta: float = 0.5,
                              convention: str = "agree") -> torch.Tensor:
    """Per-cluster bit masks from centroids.

    Args:
        centroids: ``[C, L]`` in [-1, 1]. delta: threshold in [0, 1).
        convention: ``"agree"`` keeps ``|mu| > delta``; ``"redundant"`` keeps ``|mu| <= delta``;
            ``"none"`` keeps every bit; ``"zero"`` keeps none (the research code's all-zero
            table, BRCD_SPEC §8.1; for comparison only).

    Returns:
        float32 {0,1} ``[C, L]``.

    Example:
        >>> mask_table_from_centroids(torch.tensor([[0.9, -0.2, -0.6]]))
        tensor([[1., 0., 1.]])
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {tuple(CONVENTIONS)}, got {convention!r}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    return CONVENTIONS[convention](centroids.abs(), delta).float()


def training_mask_table(masks: ClusterMasks, convention: str | None) -> torch.Tensor:
    """The mask table a distillation run trains with (``distill.mask_convention``).

    Args:
        masks: the teacher checkpoint's clusters and masks.
        convention: None: the stored ``masks.mask_table`` (built with ``masks.convention``);
            else a key of :data:`CONVENTIONS`: the table rebuilt from ``masks.centroids`` and
            ``masks.delta`` with that convention (an ablation; the clusters, hence the cluster
            ids and the false-negative rule, stay the checkpoint's).

    Shape:
        ``[C, L]`` float32 {0, 1}.

    Returns:
        the table (the stored tensor itself when ``convention`` is None).

    Example:
        >>> cm = ClusterMasks(torch.tensor([[0.9, -0.2]]), torch.tensor([[1., 0.]]),
        ...                   torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
        ...                   0.5, "agree", {})
        >>> training_mask_table(cm, "redundant")
        tensor([[0., 1.]])
    """
    if convention is None:
        return masks.mask_table
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be None (the stored table) or one of "
                         f"{tuple(CONVENTIONS)}, got {convention!r}")
    return mask_table_from_centroids(masks.centroids, masks.delta, convention)


def assign_clusters(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (squared Euclidean, ties to the lower id) of UNMASKED codes ``[B, L]``."""
    c = centroids.to(codes.device, codes.dtype)
    d = (codes * codes).sum(1, keepdim=True) - 2 * codes @ c.T + (c * c).sum(1)[None]
    return d.argmin(dim=1)


def compute_cluster_masks(codes, train_indices, n_clusters: int = 10, *, delta: float = 0.5,
                          convention: str = "agree", n_init: int = 10, seed: int = 0,
                          choose_from: list[int] | None = None) -> ClusterMasks:
    """k-means on teacher codes + mask table (optionally C chosen by silhouette).

    Args:
        codes: teacher ±1 codes of the training split ``[N, L]`` (deterministic view).
        train_indices: pool indices of those images ``[N]``.
        n_clusters: C (ignored when ``choose_from`` is given).
        delta, convention: see :func:`mask_table_from_centroids`. n_init, seed: k-means.
        choose_from: candidate values of C for the silhouette choice.

    Returns:
        a :class:`ClusterMasks`.
    """
    scores: dict = {}
    if choose_from:
        n_clusters, scores = choose_n_clusters(codes, choose_from, n_init, seed)
    centroids, labels = kmeans_codes(codes, n_clusters, n_init, seed)
    return ClusterMasks(
        centroids=centroids,
        mask_table=mask_table_from_centroids(centroids, delta, convention),
        train_cluster_ids=labels,
        train_indices=torch.as_tensor(np.asarray(train_indices), dtype=torch.int64),
        delta=float(delta), convention=convention, silhouette=scores,
    )


def cluster_stats(masks: ClusterMasks, view_codes: torch.Tensor,
                  view_clusters: torch.Tensor | None = None) -> dict:
    """Cluster sizes, bits kept per cluster and the share of offset-positive views.

    Args:
        masks: the clusters and masks. view_codes: the teacher's UNMASKED ±1 codes of V
            augmented views of each training image ``[N, V, L]`` (training-split order).
        view_clusters: their nearest centroids ``[N, V]`` when the caller has them already
            (:func:`assign_clusters` of ``view_codes``).

    Returns:
        ``{"n_clusters", "bits_kept", "cluster_sizes", "offset_share", "mask_table"}``: a view
        is an offset positive when its nearest centroid is not its image's cluster.
    """
    n, v, length = view_codes.shape
    hat = view_clusters if view_clusters is not None else assign_clusters(
        view_codes.reshape(n * v, length).float(), masks.centroids).reshape(n, v)
    share = float((hat != masks.train_cluster_ids[:, None]).float().mean())
    return {"n_clusters": masks.n_clusters,
            "bits_kept": masks.mask_table.sum(1).long().tolist(),
            "cluster_sizes": torch.bincount(masks.train_cluster_ids,
                                            minlength=masks.n_clusters).tolist(),
            "offset_share": share,
            "mask_table": masks.mask_table.long().tolist()}
