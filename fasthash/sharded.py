"""Exact Hamming search over index files sharded across a Ray cluster: :class:`ShardedHammingIndex`.

Each shard is a file written by :meth:`fasthash.HammingIndex.save`, opened memory-mapped by one
Ray actor (:class:`fasthash._sharded_actor.ShardWorker`) on the node where Ray places it. A search
sends the queries to every shard in bounded batches, each put once in Ray's object store (tiny
ones inlined in the tasks); each shard answers a batch with its own top-k only (int32 distances
and int64 global indices, packed as one int64 key ``distance << 40 | index`` when indices fit),
several batches are in flight at once, and the driver merges the shards' answers per batch with
one vectorised sort (a stable sort of the keys, which merges the shards' sorted runs; else
:func:`fasthash.search.merge_topk` / :func:`~fasthash.search.merge_radius`). The result equals
:func:`fasthash.hamming_topk` / :func:`~fasthash.hamming_radius` on the concatenation of the
files in the given order: global indices, ties broken by global index; files with ids give ids
(ties still by global position, as in a one-node index with ids).

Faults: actors restart from their files (``max_restarts``) and their calls are retried
(``max_task_retries``); a shard that still fails raises :class:`ShardError` naming it and its
file. A result never silently lacks a shard.

Needs the optional extra ``fasthash[ray]``; ``import fasthash.sharded`` works without it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ._checks import check_int, check_radius, check_threads
from ._sharded_actor import ShardWorker
from ._sharded_support import (
    ShardError,
    _acquire_cluster,
    _as_index,
    _collect,
    _kill,
    _merge_radius_batch,
    _merge_topk_batch,
    _open_shards,
    _ray,
    _release_cluster,
    _Shard,
    _shard_paths,
)
from .codes import ArrayLike, as_search_words
from .index import HammingIndex

__all__ = ["ShardedHammingIndex", "ShardError"]

BATCH = 1024  # queries per batch sent to the shards (default)
WINDOW = 3  # batches in flight at once (each is one task per shard)
RESULT_ELEMS = 1 << 22  # a batch holds at most this many top-k results per shard (48 MiB)
START_TIMEOUT = 300.0  # seconds for every shard to be placed and to open its file
CALL_TIMEOUT = 600.0  # seconds a shard may take to answer one query batch
# A batch this small travels inside its tasks (Ray inlines small arguments: one round trip
# fewer than fetching a put object, ~2x lower latency at Q = 1); larger ones are put once.
INLINE_BYTES = 64 << 10


class ShardedHammingIndex:
    """Exact Hamming index over index files, one Ray actor per file (``fasthash[ray]``).

    Open it with :meth:`from_files` or :meth:`build`, search it like a
    :class:`~fasthash.index.HammingIndex`; the results are those of one search over the
    concatenation of the files in order (indices are global positions, or the files' ids).
    Close it (or use ``with``) to end its actors; a local cluster it started ends with the
    last index using it, a cluster the caller joined is never shut down.

    Example:
        >>> codes = np.random.default_rng(0).integers(0, 2, (1000, 64)).astype(bool)
        >>> with ShardedHammingIndex.build(codes, 2, "/tmp/shards") as index:  # doctest: +SKIP
        ...     d, i = index.search(codes[:5], 3)
    """

    def __init__(self, shards: list[_Shard], bits: int, started: bool, batch: int, window: int):
        """Use :meth:`from_files` or :meth:`build`."""
        self._shards, self.bits, self._started = shards, bits, started
        self._batch, self._window = batch, window
        self._call_timeout = CALL_TIMEOUT
        self._codec = HammingIndex(bits)  # converts queries like HammingIndex.search
        self._n = sum(s.count for s in shards)
        self._closed = False
        self._after_submit: Callable[[int], None] | None = None  # test seam: batch submitted
        # the last search's timings: batches, batch_size, total_s, wait_s (for the shards'
        # answers, after the last submission), merge_s (the driver's merges)
        self.last_stats: dict = {}

    # ---- opening
    @classmethod
    def from_files(
        cls,
        paths: Sequence[str | os.PathLike],
        num_threads: int | None = None,
        *,
        num_cpus: float = 1,
        max_restarts: int = 3,
        batch_size: int = BATCH,
        window: int = WINDOW,
        actor_options: dict | None = None,
        start_timeout: float = START_TIMEOUT,
        call_timeout: float = CALL_TIMEOUT,
    ) -> ShardedHammingIndex:
        """Open index files as shards, one Ray actor per file, in the given (global) order.

        Each actor loads its file with ``HammingIndex.load(path, mmap=True)`` (the CRC32 pass
        included) on its node, so the paths must be readable there (a shared file system, or
        the same files on every node). Files that are missing, corrupted, of another bit length
        than the first, or that mix files with and without ids are refused here.

        Args:
            paths: index files written by :meth:`HammingIndex.save` (absolute, or relative to
                the current directory).
            num_threads: engine threads per shard search, 1 to 1024 (default: the CPUs Ray
                assigned the actor, ``num_cpus``).
            num_cpus: CPUs each actor asks Ray for (fractions allowed).
            max_restarts: restarts of a dead actor (from its file), and retries of each call.
            batch_size: queries per batch (fewer when ``k`` is large: at most 4M results per
                shard and batch).
            window: batches in flight at once.
            actor_options: more ``.options()`` for the actors (e.g. ``resources`` or a
                ``scheduling_strategy`` to pin shards to the nodes holding their files; the
                default spreads them).
            start_timeout: seconds allowed for every actor to be placed and open its file.
            call_timeout: seconds a shard may take to answer one query batch; past it the
                search raises :class:`ShardError` naming the shard (a lost node whose actor
                cannot be placed again, a stalled file system) instead of waiting forever.

        Returns:
            the opened index.

        Raises:
            ValueError / OSError: a file is missing, not an index file, corrupted, or of another
                bit length (the message names the path).
            ShardError: an actor could not start (placement timed out, its process died).
        """
        paths = _shard_paths(paths)
        check_threads(num_threads)
        check_int(max_restarts, "max_restarts", 0)
        if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or num_cpus < 0:
            raise ValueError(f"num_cpus must be a number >= 0, got {num_cpus!r}")
        batch = check_int(batch_size, "batch_size", 1)
        window = check_int(window, "window", 1)
        if isinstance(call_timeout, bool) or not isinstance(call_timeout, (int, float)) or not (
                call_timeout > 0):
            raise ValueError(f"call_timeout must be a number of seconds > 0, got {call_timeout!r}")
        ray = _ray()
        started = _acquire_cluster()
        shards: list[_Shard] = []
        try:
            opts = {"num_cpus": num_cpus, "max_restarts": max_restarts,
                    "max_task_retries": max_restarts, "scheduling_strategy": "SPREAD",
                    **(actor_options or {})}
            worker = ray.remote(ShardWorker)
            for n, path in enumerate(paths):
                shards.append(_Shard(n, path, worker.options(**opts).remote(path, num_threads)))
            bits = _open_shards(ray, shards, start_timeout)
            index = cls(shards, bits, started, batch, window)
            index._call_timeout = float(call_timeout)
            return index
        except BaseException:
            _kill(ray, shards)
            _release_cluster(started)
            raise

    @classmethod
    def build(
        cls,
        codes_or_index: ArrayLike | HammingIndex,
        num_shards: int,
        directory: str | os.PathLike,
        *,
        bits: int | None = None,
        **open_options,
    ) -> ShardedHammingIndex:
        """Split a gallery into ``num_shards`` contiguous, near-equal files, then open them.

        The files are ``directory/shard-<j>-of-<S>.fhidx`` (``directory`` is created; files of
        those names are replaced). Shard j holds codes ``[j*N//S, (j+1)*N//S)``, so global
        indices are the gallery's positions; a ``HammingIndex`` with ids gives its ids to the
        shards. One shard is held in RAM at a time while the files are written.

        Args:
            codes_or_index: a :class:`HammingIndex`, or codes ``[N, bits]`` (as
                :meth:`HammingIndex.add` takes), or packed words ``[N, W]`` with ``bits``.
            num_shards: 1 <= num_shards <= N.
            directory: where the files go.
            bits: the code length, needed for packed words only.
            open_options: passed to :meth:`from_files`.

        Returns:
            the opened index.
        """
        source = _as_index(codes_or_index, bits)
        words, ids = source.snapshot()  # one consistent (codes, ids) pair
        n = words.shape[0]
        if not n:
            raise ValueError("codes_or_index is empty: there is nothing to shard")
        num_shards = check_int(num_shards, "num_shards", 1, n)
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        paths = []
        for j in range(num_shards):
            lo, hi = j * n // num_shards, (j + 1) * n // num_shards
            part = HammingIndex(source.bits)
            if ids is None:
                part.add(words[lo:hi])
            else:
                part.add(words[lo:hi], ids=np.asarray(ids[lo:hi]))
            paths.append(os.path.join(directory, f"shard-{j:05d}-of-{num_shards:05d}.fhidx"))
            part.save(paths[-1])
            del part
        return cls.from_files(paths, **open_options)

    # ---- contents
    def __len__(self) -> int:
        return self._n

    @property
    def ntotal(self) -> int:
        """Number of codes over all shards (FAISS's name for ``len``)."""
        return self._n

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def paths(self) -> list[str]:
        """The shard files, in global order."""
        return [s.path for s in self._shards]

    @property
    def shards(self) -> list[dict]:
        """Per shard: path, count, offset (its first global index), node id, threads, pid
        (as first opened)."""
        return [{"path": s.path, "count": s.count, "offset": s.offset, **(s.info or {})}
                for s in self._shards]

    # ---- search
    def _prepare(self, queries: ArrayLike, mask: ArrayLike | None):
        if self._closed:
            raise ValueError("the sharded index is closed")
        if not self._n:
            raise ValueError("the index is empty: every shard file holds 0 codes")
        q = self._codec._to_words(queries, "queries")
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu()
        empty = np.zeros((0, q.shape[1]), dtype=np.uint64)
        _, _, m = as_search_words(q, empty, mask, contiguous=True, nonempty=False)
        return q, m

    def search(
        self, queries: ArrayLike, k: int, mask: ArrayLike | None = None
    ) -> tuple[ArrayLike, ArrayLike]:
        """Exact top-k by (masked) Hamming distance over every shard.

        Args:
            queries: codes ``[Q, bits]`` or packed words ``[Q, W]`` (as
                :meth:`HammingIndex.search` takes).
            k: 1 <= k <= len(index).
            mask: None, ``[W]`` or ``[Q, W]`` packed mask words.

        Shape:
            queries ``[Q, bits]`` or ``[Q, W]`` -> distances ``[Q, k]``, indices ``[Q, k]``.

        Returns:
            (int32 distances, int64 global indices or ids) ordered by (distance, global
            index) -- equal to :func:`fasthash.hamming_topk` on the concatenated shards; torch
            tensors for torch queries.

        Raises:
            ShardError: a shard failed past its restarts (no partial result is returned).
        """
        q, m = self._prepare(queries, mask)
        k = check_int(k, "k", 1, self._n)
        dist = np.empty((q.shape[0], k), dtype=np.int32)
        idx = np.empty((q.shape[0], k), dtype=np.int64)

        def done(lo: int, parts: list) -> None:
            d, i = _merge_topk_batch(parts, k)
            dist[lo : lo + d.shape[0]], idx[lo : lo + d.shape[0]] = d, i

        self._fanout("topk", q, m, k, max(1, min(self._batch, RESULT_ELEMS // k)), done)
        if isinstance(queries, torch.Tensor):
            return torch.from_numpy(dist), torch.from_numpy(idx)
        return dist, idx

    def range_search(
        self, queries: ArrayLike, r: int, mask: ArrayLike | None = None
    ) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
        """Every code within (masked) Hamming distance ``r``, over every shard.

        Args:
            queries, mask: as in :meth:`search`.
            r: radius, 0 <= r <= 2**63 - 1 (inclusive).

        Shape:
            -> lims ``[Q + 1]``, distances ``[lims[-1]]``, indices ``[lims[-1]]``.

        Returns:
            (int64 lims, int32 distances, int64 global indices or ids); query i's results are
            ``[lims[i], lims[i + 1])`` ordered by (distance, global index) -- equal to
            :func:`fasthash.hamming_radius` on the concatenated shards.

        Raises:
            ShardError: as in :meth:`search`.
        """
        q, m = self._prepare(queries, mask)
        r = check_radius(r)
        counts, dists, idxs = [np.zeros(0, np.int64)], [np.zeros(0, np.int32)], [
            np.zeros(0, np.int64)]

        def done(lo: int, parts: list) -> None:
            lims, d, i = _merge_radius_batch(parts, parts[0][0].shape[0] - 1)
            counts.append(np.diff(lims))
            dists.append(d)
            idxs.append(i)

        self._fanout("radius", q, m, r, self._batch, done)
        lims = np.zeros(q.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.concatenate(counts), out=lims[1:])
        out = (lims, np.concatenate(dists), np.concatenate(idxs))
        if isinstance(queries, torch.Tensor):
            return tuple(torch.from_numpy(a) for a in out)
        return out

    def _fanout(self, method: str, q: np.ndarray, m, arg: int, batch: int, done) -> None:
        """Send ``q`` to every non-empty shard in batches (each put once in the object store,
        or inlined when tiny), at most ``window`` batches in flight; ``done(first_query,
        parts)`` gets each batch's per-shard answers in order."""
        ray = _ray()
        shards = [s for s in self._shards if s.count]
        per_query = m is not None and m.shape[0] > 1
        m_ref = m if m is None or per_query or m.nbytes <= INLINE_BYTES else ray.put(m)
        pending: deque = deque()
        stats = {"batches": 0, "batch_size": batch, "wait_s": 0.0, "merge_s": 0.0}
        t_start = time.perf_counter()

        def finish() -> None:
            lo0, refs0 = pending.popleft()
            t0 = time.perf_counter()
            parts = _collect(ray, shards, refs0, self._call_timeout)
            t1 = time.perf_counter()
            done(lo0, parts)
            stats["wait_s"] += t1 - t0
            stats["merge_s"] += time.perf_counter() - t1

        for b, lo in enumerate(range(0, q.shape[0], batch)):
            q_ref, mb = q[lo : lo + batch], (m[lo : lo + batch] if per_query else m_ref)
            if q_ref.nbytes + (mb.nbytes if per_query else 0) > INLINE_BYTES:
                q_ref, mb = ray.put(q_ref), (ray.put(mb) if per_query else mb)
            refs = [getattr(s.actor, method).remote(q_ref, arg, mb, s.expect) for s in shards]
            pending.append((lo, refs))
            stats["batches"] += 1
            if self._after_submit is not None:
                self._after_submit(b)
            if len(pending) >= self._window:
                finish()
        while pending:
            finish()
        stats["total_s"] = time.perf_counter() - t_start
        self.last_stats = stats

    # ---- life cycle
    def close(self) -> None:
        """End the shard actors (and a local cluster this index started, with its last user);
        idempotent."""
        if self._closed:
            return
        self._closed = True
        ray = _ray()
        _kill(ray, self._shards)
        _release_cluster(self._started)

    def __enter__(self) -> ShardedHammingIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.num_shards} shards"
        return f"ShardedHammingIndex(bits={self.bits}, n={self._n}, {state})"
