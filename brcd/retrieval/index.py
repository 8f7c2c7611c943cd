"""Thin adapter between brcd's evaluation code and fasthash's search engine.

Everything in :mod:`brcd.retrieval` reaches packed-code search through the two functions of
this module, :func:`block_distances` (``fasthash.hamming_distance``) and :func:`topk`
(``fasthash.hamming_topk``); fasthash picks its compiled core or its reference fallback.

Codes enter as ±1 floats / {0, 1} integers / bools ``[N, L]`` (numpy or torch) or, with ``bits``
given, as packed uint64 words ``[N, ceil(L / 64)]`` in the layout of :mod:`fasthash.codes`.
"""

from __future__ import annotations

import numpy as np
import torch

from fasthash.codes import as_words, pack_codes

__all__ = ["as_packed", "block_distances", "topk", "stable_order", "iter_query_blocks", "engine"]


def as_packed(codes, bits: int | None = None, name: str = "codes") -> tuple[np.ndarray, int]:
    """Return ``(packed np.uint64 words [N, W], L)`` for codes or already-packed words.

    Args:
        codes: ±1 floats, {0, 1} integers or bools ``[N, L]`` (numpy or CPU/GPU torch), or, when
            ``bits`` is given, packed words (``np.uint64`` / ``torch.int64``) ``[N, ceil(L/64)]``.
            ``np.memmap`` words are used without copying.
        bits: the code length L when ``codes`` is packed; None when ``codes`` is unpacked.
        name: argument name used in error messages.

    Shape:
        ``[N, L]`` or ``[N, W]`` -> ``[N, W]``.

    Returns:
        (C-contiguous ``np.uint64`` words, code length L).

    Example:
        >>> w, L = as_packed(np.array([[1., -1., 1.]])); w.tolist(), L
        ([[5]], 3)
    """
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits < 1:
            raise ValueError(f"bits must be a positive integer, got {bits!r}")
        # rows of ceil(L / 64) words and no bit set beyond L (the padding must be 0)
        words = as_words(codes, name, bits=int(bits))
        if not words.flags.c_contiguous:
            words = np.ascontiguousarray(words)
        return words, int(bits)
    if isinstance(codes, np.ndarray) and codes.dtype == np.uint64:
        raise ValueError(f"{name} looks packed (uint64 words): pass bits=<code length>")
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu()
    if not isinstance(codes, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(codes).__name__}")
    if codes.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, L], got shape {tuple(codes.shape)}")
    try:
        words = pack_codes(codes)
    except (TypeError, ValueError) as err:  # re-raise naming the caller's argument
        raise type(err)(str(err).replace("codes", name, 1)) from None
    if isinstance(words, torch.Tensor):
        words = words.numpy().view(np.uint64)
    return np.ascontiguousarray(words), int(codes.shape[1])


def engine() -> str:
    """The search engine in use, for reports: ``"fasthash._C (<simd level>)"`` or the
    pure-torch reference fallback (fasthash warns once when it is used)."""
    import fasthash

    if getattr(fasthash, "HAS_C", False):
        return f"fasthash._C ({fasthash._C.simd_level()})"
    return "fasthash reference (no _C)"


def block_distances(query_words: np.ndarray, db_words: np.ndarray) -> np.ndarray:
    """Exact Hamming distances of a bounded block of queries against the whole database.

    The caller bounds the block (``Q_block x N`` entries); this never tiles the database.

    Args:
        query_words: packed ``np.uint64`` words of the query block.
        db_words: packed ``np.uint64`` words of the database (may be an ``np.memmap``).

    Shape:
        ``[b, W]`` x ``[N, W]`` -> ``[b, N]``.

    Returns:
        int32 distances.

    Example:
        >>> block_distances(np.array([[5]], np.uint64), np.array([[6], [5]], np.uint64)).tolist()
        [[2, 0]]
    """
    import fasthash

    return fasthash.hamming_distance(np.ascontiguousarray(query_words), db_words).numpy()


def topk(query_words: np.ndarray, db_words: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by Hamming distance, ties broken by database index (fasthash.hamming_topk).

    Args:
        query_words: packed query words. db_words: packed database words. k: 1 <= k <= N.

    Shape:
        ``[Q, W]`` x ``[N, W]`` -> distances ``[Q, k]``, indices ``[Q, k]``.

    Returns:
        (int32 distances, int64 indices), rows ordered by (distance, index).

    Example:
        >>> d, i = topk(np.array([[0]], np.uint64), np.array([[3], [1], [1]], np.uint64), 2)
        >>> d.tolist(), i.tolist()
        ([[1, 1]], [[1, 2]])
    """
    import fasthash

    d, i = fasthash.hamming_topk(np.ascontiguousarray(query_words), db_words, k)
    return np.asarray(d, dtype=np.int32), np.asarray(i, dtype=np.int64)


def stable_order(dist: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Row-wise ranking by (distance, index): a stable argsort (a radix sort on uint16 keys when
    every distance fits, i.e. L < 65536; uint32 keys otherwise).

    Args:
        dist: non-negative Hamming distances. bits: the code length L (the largest possible
            distance); None: the largest distance in ``dist``.

    Shape:
        ``[b, N]`` -> ``[b, N]`` int64 column indices.

    Example:
        >>> stable_order(np.array([[70000, 3, 3]]), bits=70000).tolist()
        [[1, 2, 0]]
    """
    top = int(bits) if bits is not None else (int(dist.max()) if dist.size else 0)
    keys = np.uint16 if top < 1 << 16 else np.uint32
    return np.argsort(dist.astype(keys, copy=False), axis=1, kind="stable")


def iter_query_blocks(num_queries: int, num_db: int, max_entries: int = 1 << 22):
    """Yield ``(lo, hi)`` query ranges whose ``(hi - lo) x num_db`` block stays under
    ``max_entries`` (at least one query per block), so memory never grows with ``Q x N``."""
    step = max(1, int(max_entries) // max(1, int(num_db)))
    for lo in range(0, int(num_queries), step):
        yield lo, min(int(num_queries), lo + step)
