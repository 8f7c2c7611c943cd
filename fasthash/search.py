"""Exact Hamming search over packed binary codes: top-k and radius search.

CPU inputs run on the compiled engine ``fasthash._C`` (C++17, scalar POPCNT / AVX2 /
AVX-512 VPOPCNTDQ chosen from CPUID; ``FASTHASH_SIMD=scalar|avx2|avx512`` forces a level, and
an unknown or unsupported value raises ``ValueError`` at the first search), with
the GIL released and ``num_threads`` worker threads. Without ``_C`` the pure-torch reference
(:func:`fasthash.reference.topk_ref` / :func:`~fasthash.reference.radius_ref`) runs, streamed in
gallery blocks, after a one-time warning. CUDA tensors go to the Triton kernel
:func:`fasthash.ops.hamming_topk_triton.hamming_topk_cuda`. The persistent index
:class:`~fasthash.index.HammingIndex` lives in :mod:`fasthash.index` (re-exported here);
:func:`as_ids` checks the ids its codes carry.

Distances: ``d(q, x) = popcount((q XOR x) AND m)`` over all bits of the W words (the mask ``m``
is all ones when absent). :func:`fasthash.pack_codes` zeroes the padding bits of the last word,
so for packed codes this is the Hamming distance of the L-bit codes. Results are ordered by
(distance, gallery index): exactly a stable argsort of the distances.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

from ._checks import check_device, check_int, check_radius, check_simd, check_threads
from .codes import ArrayLike, as_search_words
from .env import warn_once

__all__ = ["hamming_topk", "hamming_radius", "merge_topk", "merge_radius"]

try:
    from . import _C
except ImportError:  # pragma: no cover - exercised by a subprocess test
    _C = None

_REF_BLOCK = 2048  # gallery codes per block of the reference fallback

# HammingIndex moved to fasthash.index; this module re-exports it lazily (fasthash.index imports
# this module, so an eager import would be circular).


def __getattr__(name: str):
    if name == "HammingIndex":
        from . import index

        return getattr(index, name)
    raise AttributeError(f"module 'fasthash.search' has no attribute {name!r}")


# ----------------------------------------------------------------------------- merging


def merge_topk(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of several partial top-k results, ordered by (distance, gallery index).

    Used wherever a gallery is searched piecewise (the reference fallback's blocks, an index's
    memory-mapped segments); the order is deterministic whatever the order of ``parts``.

    Args:
        parts: ``(distances, indices)`` pairs, ``[Q, k_p]`` each, indices already global (offset
            by the piece's start).
        k: how many to keep per query (at most the total ``sum(k_p)``).

    Shape:
        ``[Q, k_1] ... [Q, k_P]`` -> ``[Q, k]``.

    Returns:
        (int32 distances, int64 indices).

    Example:
        >>> a = (np.array([[1, 3]]), np.array([[4, 0]])); b = (np.array([[1]]), np.array([[2]]))
        >>> [v.tolist() for v in merge_topk([a, b], 2)]
        [[[1, 1]], [[2, 4]]]
    """
    d = np.concatenate([np.asarray(p[0], dtype=np.int32) for p in parts], axis=1)
    i = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts], axis=1)
    if d.size and d.min() >= 0 and d.max() < 1 << 23 and i.min() >= 0 and i.max() < 1 << 40:
        # one int64 key per candidate (distance high, index low): a single sort, ~3x faster
        # than a two-key lexsort on [Q, sum k_p]; stable (timsort) because the parts arrive as
        # sorted runs, which it merges in linear time (keys are distinct: same result)
        key = np.sort((d.astype(np.int64) << 40) | i, axis=1, kind="stable")[:, :k]
        return (key >> 40).astype(np.int32), key & ((1 << 40) - 1)
    order = np.lexsort((i, d), axis=1)[:, :k]  # last key first: by distance, then index
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def merge_radius(
    parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], num_queries: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate partial radius results, each query's ordered by (distance, gallery index).

    Args:
        parts: ``(lims, distances, indices)`` FAISS-style results (see :func:`hamming_radius`)
            of pieces of one gallery, indices already global.
        num_queries: Q (every part has ``Q + 1`` lims).

    Shape:
        -> lims ``[Q + 1]``, distances ``[lims[-1]]``, indices ``[lims[-1]]``.

    Returns:
        (int64 lims, int32 distances, int64 indices).

    Example:
        >>> a = (np.array([0, 1]), np.array([2]), np.array([0]))
        >>> b = (np.array([0, 2]), np.array([2, 1]), np.array([5, 7]))
        >>> [v.tolist() for v in merge_radius([a, b], 1)]
        [[0, 3], [1, 2, 2], [7, 0, 5]]
    """
    counts = [np.diff(np.asarray(p[0], dtype=np.int64)) for p in parts]
    lims = np.zeros(num_queries + 1, dtype=np.int64)
    lims[1:] = np.cumsum(np.sum(counts, axis=0)) if counts else 0
    query = np.concatenate([np.repeat(np.arange(num_queries), c) for c in counts] or [[]])
    d = np.concatenate([np.asarray(p[1], dtype=np.int32) for p in parts] or [np.zeros(0, np.int32)])
    i = np.concatenate([np.asarray(p[2], dtype=np.int64) for p in parts] or [np.zeros(0, np.int64)])
    order = np.lexsort((i, d, query))
    return lims, d[order], i[order]


# ----------------------------------------------------------------------------- index ids

IdsLike = Union[np.ndarray, torch.Tensor, Sequence[int]]  # noqa: UP007 - a runtime alias


def as_ids(ids: IdsLike, name: str, rows: int | None = None) -> np.ndarray:
    """The ids of an index's codes (returned by its searches instead of positions), checked: a
    new C-contiguous int64 array ``[rows]`` of ids in ``[0, 2**63)`` (``rows=None``: any
    length).

    -1 is refused with every negative value: FAISS returns it for "no result", so an id -1
    could not be told apart from one.

    Args:
        ids: integers (numpy, torch on the CPU or a CUDA device, or a list / tuple / range).
        name: the argument's name, for the messages. rows: the length required, or None.

    Returns:
        int64 ``[rows]``, a copy.

    Raises:
        TypeError: not integers. ValueError: a wrong length, or an id outside [0, 2**63).

    Example:
        >>> as_ids([7, 0, 7], "ids").tolist()
        [7, 0, 7]
        >>> as_ids([-1, 2**63], "ids")
        Traceback (most recent call last):
        ...
        ValueError: ids must hold int64 ids in [0, 2**63), got -1
    """
    if isinstance(ids, torch.Tensor):
        check_device(ids, name)
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"{name} must hold integers (int64 ids), got dtype {ids.dtype}")
        ids = ids.detach().cpu().numpy()
    elif isinstance(ids, (list, tuple, range)):
        ids = _sequence_ids(ids, name)
    elif not isinstance(ids, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy array, torch tensor or sequence of ints, got "
            f"{type(ids).__name__}"
        )
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers (int64 ids), got dtype {ids.dtype}")
    if ids.ndim != 1 or (rows is not None and ids.shape[0] != rows):
        want = f"[{rows}] (one id per code)" if rows is not None else "[M]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(ids.shape)}")
    if ids.dtype == np.uint64 and ids.size and int(ids.max()) >= 1 << 63:
        raise ValueError(f"{name} must be < 2**63 (int64 ids), got {int(ids.max())}")
    out = np.array(ids, dtype=np.int64, order="C")  # a copy: the caller may change ids later
    if out.size and out.min() < 0:
        j = int(np.argmax(out < 0))
        raise ValueError(
            f"{name} must be >= 0 (-1 means 'no result' to FAISS users), got {name}[{j}] = "
            f"{int(out[j])}"
        )
    return out


def _sequence_ids(ids: Sequence, name: str) -> np.ndarray:
    """A sequence of ids as an array: Python ints beyond int64 (or -1 with ones beyond it)
    make numpy pick float64 or object, which is an id out of range, not a wrong type."""
    if not len(ids):
        return np.zeros(0, np.int64)
    out = np.asarray(ids)
    if out.dtype.kind in "fO" and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in ids
    ):
        bad = next((int(v) for v in ids if not 0 <= v < 1 << 63), None)
        if bad is not None:
            raise ValueError(f"{name} must hold int64 ids in [0, 2**63), got {bad}")
    return out


# ----------------------------------------------------------------------------- search


def _warn_fallback() -> None:
    warn_once(
        "search:reference",
        "fasthash._C is not built: Hamming search runs the pure-torch reference "
        "(10-100x slower). Build it with 'python setup.py build_ext --inplace'.",
        stacklevel=4,  # the caller of hamming_topk / hamming_radius
    )


def _prepare(queries, gallery, mask):
    """Zero-copy ``np.uint64`` views of C-contiguous words (the engine reads raw rows); the mask
    as one row ``[W]`` or one per query ``[Q, W]``."""
    q, x, m = as_search_words(queries, gallery, mask, contiguous=True)
    if m is not None and m.shape[0] == 1:
        m = m[0]
    return q, x, m


def _is_cuda(*xs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in xs)


def _wants_torch(*xs) -> bool:
    return any(isinstance(t, torch.Tensor) for t in xs)


def _topk_reference(q: np.ndarray, x: np.ndarray, k: int, m: np.ndarray | None):
    """The reference streamed over gallery blocks with a running (distance, index) top-k."""
    from .reference import topk_ref

    best = None
    for lo in range(0, x.shape[0], _REF_BLOCK):
        blk = x[lo : lo + _REF_BLOCK]
        d, i = topk_ref(q, blk, min(k, blk.shape[0]), m)
        part = (d.numpy(), i.numpy() + lo)
        best = part if best is None else merge_topk([best, part], k)
    return best


def _radius_reference(q: np.ndarray, x: np.ndarray, r: int, m: np.ndarray | None):
    """The reference radius search over gallery blocks, merged by (distance, index)."""
    from .reference import radius_ref

    parts = []
    for lo in range(0, x.shape[0], _REF_BLOCK):
        lims, d, i = radius_ref(q, x[lo : lo + _REF_BLOCK], r, m)
        parts.append((lims.numpy(), d.numpy(), i.numpy() + lo))
    return merge_radius(parts, q.shape[0])


def _run_topk(q, x, k, m, num_threads, simd):
    if _C is None:
        _warn_fallback()
        return _topk_reference(q, x, k, m)
    return _C.topk(q, x, k, m, num_threads, simd)


def _run_radius(q, x, r, m, num_threads, simd):
    if _C is None:
        _warn_fallback()
        return _radius_reference(q, x, r, m)
    return _C.radius(q, x, r, m, num_threads, simd)


def hamming_topk(
    queries: ArrayLike,
    gallery: ArrayLike,
    k: int,
    mask: ArrayLike | None = None,
    *,
    num_threads: int | None = None,
    simd: str | None = None,
) -> tuple[ArrayLike, ArrayLike]:
    """Exact k nearest gallery codes of every query by (masked) Hamming distance.

    Args:
        queries: packed words (``np.uint64`` or ``torch.int64``, C-contiguous).
        gallery: packed words with the same number of words per code.
        k: 1 <= k <= N.
        mask: None, one mask ``[W]`` for all queries, or one per query ``[Q, W]`` (packed words):
            only bits set in the mask are counted. An all-zero mask gives distance 0 everywhere.
        num_threads: worker threads, 1 to 1024 (default: every core). Results do not depend
            on it.
        simd: force ``"scalar"``, ``"avx2"`` or ``"avx512"`` for this call (default: the level
            in use, see ``fasthash._C.simd_level()``).

    Shape:
        queries ``[Q, W]``, gallery ``[N, W]`` -> distances ``[Q, k]``, indices ``[Q, k]``.

    Returns:
        (int32 distances, int64 gallery indices), each row ordered by (distance, index) -- equal
        to a stable argsort. numpy for numpy input, torch tensors for torch input.

    Example:
        >>> x = np.array([[3], [1], [1]], np.uint64)
        >>> d, i = hamming_topk(np.array([[0]], np.uint64), x, 2)
        >>> d.tolist(), i.tolist()
        ([[1, 1]], [[1, 2]])
    """
    if _is_cuda(queries, gallery, mask):
        from .ops.hamming_topk_triton import hamming_topk_cuda

        return hamming_topk_cuda(queries, gallery, k, mask)
    q, x, m = _prepare(queries, gallery, mask)
    k = check_int(k, "k", 1, x.shape[0])
    d, i = _run_topk(q, x, k, m, check_threads(num_threads), check_simd(simd))
    if _wants_torch(queries, gallery):
        return torch.from_numpy(d), torch.from_numpy(i)
    return d, i


def hamming_radius(
    queries: ArrayLike,
    gallery: ArrayLike,
    r: int,
    mask: ArrayLike | None = None,
    *,
    num_threads: int | None = None,
    simd: str | None = None,
) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
    """Every gallery code within (masked) Hamming distance ``r`` of each query, FAISS style.

    Args:
        queries, gallery, mask, num_threads, simd: as in :func:`hamming_topk`.
        r: radius, 0 <= r <= 2**63 - 1 (inclusive; r >= the code length returns everything).

    Shape:
        -> lims ``[Q + 1]``, distances ``[lims[-1]]``, indices ``[lims[-1]]``.

    Returns:
        (int64 lims, int32 distances, int64 indices); query i's results are
        ``[lims[i], lims[i + 1])`` ordered by (distance, index). CUDA tensors are searched on the
        CPU and the results returned on their device.

    Example:
        >>> x = np.array([[3], [1]], np.uint64)
        >>> lims, d, i = hamming_radius(np.array([[0]], np.uint64), x, 1)
        >>> lims.tolist(), d.tolist(), i.tolist()
        ([0, 1], [1], [1])
    """
    device = None
    if _is_cuda(queries, gallery, mask):
        device = next(t.device for t in (queries, gallery, mask) if _is_cuda(t))
        # non-tensors go on unchanged, to be named by the validator
        queries, gallery, mask = (
            t.cpu() if isinstance(t, torch.Tensor) else t for t in (queries, gallery, mask)
        )
    q, x, m = _prepare(queries, gallery, mask)
    r = check_radius(r)
    lims, d, i = _run_radius(q, x, r, m, check_threads(num_threads), check_simd(simd))
    if _wants_torch(queries, gallery):
        out = tuple(torch.from_numpy(a) for a in (lims, d, i))
        return tuple(t.to(device) for t in out) if device is not None else out
    return lims, d, i
