"""The shard worker of :class:`fasthash.sharded.ShardedHammingIndex`: one index file, one Ray actor.

:class:`ShardWorker` is a plain class (so this module imports without Ray); the sharded index
turns it into an actor with ``ray.remote``. Each worker opens its file with
``HammingIndex.load(path, mmap=True)`` on the node where Ray placed it, and answers top-k and
radius searches of query batches with ``HammingIndex.search`` / ``range_search``, its results
already in the global numbering: the gallery position ``offset + local``, or the file's ids when
it holds ids (each row is ordered by (distance, local position), so the driver's stable merge in
shard order equals one search over the concatenated files).

A worker restarted by Ray after a crash re-runs ``__init__`` and opens its file again. Every
call carries the file's fingerprint (a hash of its header page, which covers the count, the bit
length and the data checksums) seen by the first open, so a restart that finds another file
under the same path refuses to answer instead of returning other codes.
"""

from __future__ import annotations

import hashlib
import os
import stat

import numpy as np

_HEADER_PAGE = 4096  # the header page of an index file (see fasthash._indexfile)
KEY_SHIFT = 40  # packed top-k keys: distance << 40 | global position (positions < 2**40)


def _fingerprint(path: str) -> int:
    """A 64-bit hash of the file's header page (its counts, bit length and data checksums).
    Not a CRC32: the page ends with its own CRC32, which makes every page's CRC32 the same."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        page = os.pread(fd, _HEADER_PAGE, 0)
        return int.from_bytes(hashlib.blake2b(page, digest_size=8).digest(), "little")
    finally:
        os.close(fd)


def _assigned_cpus() -> int:
    """The CPUs Ray assigned this actor (its ``num_cpus``), at least 1."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


class ShardWorker:
    """One shard: a memory-mapped :class:`~fasthash.index.HammingIndex` file.

    A file that cannot be opened does not fail the constructor (Ray would report a wall of
    actor-death text): the error is kept, :meth:`info` returns it and the searches raise it.

    Args:
        path: the shard's index file (on the node where the actor runs).
        num_threads: engine threads per search; None: the CPUs Ray assigned the actor.
    """

    def __init__(self, path: str, num_threads: int | None):
        self.path = path
        self.error: BaseException | None = None
        self.index, self.has_ids, self.fingerprint = None, False, 0
        try:
            self.threads = int(num_threads) if num_threads else _assigned_cpus()
            self._open()
        except Exception as e:  # reported by info() and every search
            self.error = e

    def _open(self) -> None:
        before = _fingerprint(self.path)  # a missing file fails here, before torch is imported
        from .index import HammingIndex

        index = HammingIndex.load(self.path, mmap=True)
        if _fingerprint(self.path) != before:
            raise OSError(f"{self.path} was replaced while it was being opened; try again")
        self.index, self.fingerprint = index, before
        self.has_ids = bool(getattr(index, "has_ids", False))

    def info(self) -> dict | BaseException:
        """The shard's description, or the exception its file raised when opened."""
        if self.error is not None:
            return self.error
        import ray

        return {
            "bits": self.index.bits,
            "count": len(self.index),
            "has_ids": self.has_ids,
            "fingerprint": self.fingerprint,
            "threads": self.threads,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
        }

    def _check(self, expect: tuple[int, int]) -> int:
        """Raise unless the open file is the one the driver opened; return the shard's offset
        (the global position of its first code)."""
        if self.error is not None:
            raise self.error
        fingerprint, offset = expect
        if fingerprint != self.fingerprint:
            raise OSError(
                f"{self.path} is not the file the sharded index opened (it was replaced since); "
                "open the shards again"
            )
        return int(offset)

    def topk(self, q: np.ndarray, k: int, mask: np.ndarray | None, expect: tuple[int, int]):
        """The shard's ``min(k, len)`` best per query, ordered by (distance, position).

        Returns:
            ``(distances, indices, ids)``: int32 distances ``[Q, k']`` and either int64 global
            positions ``[Q, k']`` (ids None) or, for a file with ids, the ids (indices None).
            Without ids and with every global position below ``2**KEY_SHIFT`` the pair comes
            packed, ``(None, keys, None)`` with ``keys = distance << KEY_SHIFT | position``
            (still ordered), so the driver merges the shards with one sort of the keys.
        """
        offset = self._check(expect)
        d, i = self.index.search(q, min(int(k), len(self.index)), mask, num_threads=self.threads)
        if self.has_ids:
            return d, None, i
        i += offset
        if offset + len(self.index) <= 1 << KEY_SHIFT:  # distances <= 2**20 always fit
            i |= d.astype(np.int64) << KEY_SHIFT
            return None, i, None
        return d, i, None

    def radius(self, q: np.ndarray, r: int, mask: np.ndarray | None, expect: tuple[int, int]):
        """Every code within ``r``: ``(lims [Q + 1], distances, indices, ids)``, each query's
        results ordered by (distance, position); indices are global positions (ids None) or,
        for a file with ids, None and the ids."""
        offset = self._check(expect)
        lims, d, i = self.index.range_search(q, r, mask, num_threads=self.threads)
        if self.has_ids:
            return lims, d, None, i
        i += offset
        return lims, d, i, None

    def pid(self) -> int:
        """The worker's process id (tests use it to see a restart)."""
        return os.getpid()
