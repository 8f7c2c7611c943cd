"""Exact multi-index hashing: :class:`MIHIndex` (Norouzi, Punjani & Fleet, "Fast Exact Search in
Hamming Space with Multi-Index Hashing", TPAMI 2014), with the interface of
:class:`~fasthash.index.HammingIndex`.

Algorithm. A code of L bits is cut into m contiguous substrings of ``L // m`` or ``L // m + 1``
bits, and table j groups the codes by the value of substring j. If a code is within distance R
of the query, some substring is within ``R // m`` of the query's substring (pigeonhole). k-NN
probes substring radius 0, 1, 2, ... table by table; once tables ``0..j`` are probed through
radius r and the others through ``r - 1``, every code within ``m r + j`` has been seen, so the
search stops as soon as its k-th best distance is at most that (the paper's per-table bound).
Candidates are verified by their full distance and ordered by (distance, position), so results
equal :func:`fasthash.hamming_topk` / :func:`~fasthash.hamming_radius` exactly, ties included.

Default m: substrings of about log2(N) bits, ``m = round(L / log2 N)`` (the paper's rule),
clamped to ``[ceil(L / 64), L]`` (a substring has at most 64 bits), chosen when the tables are
built (:attr:`MIHIndex.num_tables`). Saved files record only an m given by the user (a default
one is chosen again, from the N of the loaded file).

Memory per code: the HammingIndex's ``8 W`` bytes plus, per table, one entry holding a copy of
the code and its u32 position (``8 W + 4`` bytes: a probe reads its bucket sequentially) and a
bucket directory: ``m (8 W + 4)`` bytes plus about 4 bytes per bucket (dense directories for
substrings of <= 24 bits, else sorted distinct keys, <= 12 bytes each). 64-bit codes at N = 10^7
(m = 3): 36 bytes + ~5 bytes of directories per code.

Masks. A masked-out bit of a substring is a wildcard: the probe enumerates its values. Tables
whose substring has more than 10 masked-out bits (``fasthash._C.MIH_MAX_WILDCARDS``) are left
out, and the pigeonhole bound runs over the tables kept (still exact); a query whose mask leaves
no table is answered by the linear scan. Global and per-query masks both work this way.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import torch

from ._checks import check_int, check_radius, check_threads
from .codes import ArrayLike, as_words
from .index import HammingIndex
from .search import IdsLike, hamming_radius, hamming_topk, merge_radius, merge_topk

try:
    from . import _C
except ImportError:  # pragma: no cover - exercised by a subprocess test
    _C = None

__all__ = ["MIHIndex", "default_num_tables"]

METHODS = ("auto", "mih", "scan")
_MIN_AUTO_N = 4096  # below this the scan of a query takes microseconds: auto always scans
_MAX_AUTO_BITS = 256  # longer codes need m >= L / 20 tables of 8 W + 4 bytes per code
_MAX_CODES = (1 << 32) - 2  # the tables hold u32 positions
# Per-query probing budgets, as fractions of the cost of scanning that query (the C++ cost model
# of fasthash._C.MIH_PROBE_COST / MIH_ENTRY_COST): past it the query is finished by the scan.
_AUTO_BUDGET = 0.15
_FORCED_BUDGET = 4.0
# auto: once the cost of the finished queries (an aborted one: its probing + its scan) passes
# this many scans per query, counting at least 16 queries, the remaining queries are scanned
_AUTO_GIVE_UP = 0.4


def _available_memory() -> int | None:
    """Bytes the system can still give this process (MemAvailable, else free pages), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def default_num_tables(bits: int, n: int) -> int:
    """The paper's rule: substrings of about log2(n) bits, ``round(bits / log2 n)``, clamped to
    ``[ceil(bits / 64), bits]``.

    Example:
        >>> default_num_tables(64, 10**7), default_num_tables(128, 10**6), default_num_tables(8, 5)
        (3, 6, 3)
    """
    m = round(bits / math.log2(max(n, 2)))
    return int(min(bits, max(-(-bits // 64), m, 1)))


def _check_tables(num_tables, bits: int, where: str = "num_tables") -> int:
    lo = -(-bits // 64)
    if lo > bits:  # pragma: no cover - bits >= 1 always has a valid count
        raise ValueError(f"{where}: no table count fits {bits} bits")
    try:
        return check_int(num_tables, "num_tables", lo, bits)
    except ValueError:
        raise ValueError(
            f"{where} must satisfy ceil(bits / 64) = {lo} <= num_tables <= bits = {bits} "
            f"(substrings of 1 to 64 bits), got {num_tables}"
        ) from None


def _check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    return method


class MIHIndex:
    """Exact Hamming index searched by multi-index hashing (see the module docstring), with
    the linear scan of :class:`~fasthash.index.HammingIndex` as fallback.

    Storage, ids, files and the scan are a composed :class:`~fasthash.index.HammingIndex`; the
    C++ tables (``fasthash._C.MIHTables``) are built lazily from a consistent snapshot before
    the first MIH search after a change (``add``, ``remove_ids``, ``load``): one counting sort
    per table, threaded over tables (10^7 64-bit codes, m = 3: about 3 s on 2 busy cores).
    The old tables are dropped first, and only tables of the current snapshot are kept. A build
    whose entries (``m N (8 W + 4)`` bytes) exceed the available memory is refused with a
    ``MemoryError`` naming m and the bytes (``method="auto"`` then scans). A memory-mapped file
    is checked before a build and by the fallback scan: a truncated one raises ``OSError``.
    Searches may run concurrently with each other and with ``add``.

    ``method``: ``"scan"`` is the HammingIndex's scan. ``"mih"`` probes the tables for every
    query with a budget of 4x the cost of scanning it (e.g. m = 1 on 64-bit codes exceeds it);
    a query whose mask leaves no table, or whose next probe or bucket read would pass its
    budget, is finished by the scan: results are exact always. ``"auto"`` scans galleries of
    fewer than 4096 codes, codes longer than 256 bits, radius searches with ``r >= bits``;
    otherwise it probes each query with a budget of 0.15 of its scan cost (a query stops before
    reading a bucket that would pass it, e.g. one of many duplicate codes, and is finished by
    the scan), and once the cost of the finished queries (an aborted query: its probing plus
    its scan) passes 0.4 scans per query, counting at least 16 queries, it scans all the rest.
    Costs are the C++ cost model (counted probes and bucket entries,
    ``fasthash._C.MIH_PROBE_COST`` / ``MIH_ENTRY_COST`` in units of one word distance of the
    scan), so the choice is deterministic: a query's probing costs at most its budget plus one
    probe. The fallback scan is the HammingIndex's (segmented and checked for a mapped file).

    Args:
        bits: the code length L, 1 <= L <= 16384 (m <= L tables of <= 64 bits).
        num_tables: m, ``ceil(L / 64) <= m <= L``, or None for the default rule at build time.

    Example:
        >>> index = MIHIndex(16, num_tables=2)
        >>> index.add(np.array([[0x00FF], [0x0F0F], [0x00FE]], np.uint64), ids=[10, 11, 12])
        >>> d, i = index.search(np.array([[0x00FF]], np.uint64), 2, method="mih")
        >>> d.tolist(), i.tolist(), index.num_tables
        ([[0, 1]], [[10, 12]], 2)
    """

    def __init__(self, bits: int, num_tables: int | None = None):
        self._index = HammingIndex(bits)
        self.bits, self.words = self._index.bits, self._index.words
        if self.bits > 64 * 256:
            raise ValueError(f"bits must satisfy 1 <= bits <= 16384 for MIHIndex, got {bits}")
        self._fixed = None if num_tables is None else _check_tables(num_tables, self.bits)
        self._lock = threading.Lock()
        self._built: tuple[np.ndarray, object] | None = None  # (words it was built from, tables)

    def __getstate__(self) -> dict:
        return {"index": self._index, "num_tables": self._fixed}  # the tables are rebuilt

    def __setstate__(self, state: dict) -> None:
        self._index, self._fixed = state["index"], state["num_tables"]
        self.bits, self.words = self._index.bits, self._index.words
        self._lock, self._built = threading.Lock(), None

    # ---- contents (delegated)
    def __len__(self) -> int:
        return len(self._index)

    @property
    def ntotal(self) -> int:
        """Number of codes (FAISS's name for ``len``)."""
        return len(self._index)

    @property
    def has_ids(self) -> bool:
        """Whether the codes carry ids (see :class:`~fasthash.index.HammingIndex`)."""
        return self._index.has_ids

    @property
    def num_tables(self) -> int:
        """m: the tables built (or to be built) for the current codes."""
        built = self._built
        if built is not None and built[0] is self._index.snapshot()[0]:
            return built[1].num_tables
        return self._fixed or default_num_tables(self.bits, len(self))

    def add(self, codes: ArrayLike, ids: IdsLike | None = None) -> None:
        """Append codes (and ids): as :meth:`fasthash.index.HammingIndex.add`; the tables are
        rebuilt before the next MIH search."""
        self._index.add(codes, ids)

    def remove_ids(self, ids: IdsLike) -> int:
        """Remove codes (as :meth:`fasthash.index.HammingIndex.remove_ids`); returns how many.
        The tables are rebuilt before the next MIH search."""
        return self._index.remove_ids(ids)

    def words_array(self) -> np.ndarray:
        """The packed codes ``[N, W]``."""
        return self._index.words_array()

    def ids_array(self) -> np.ndarray | None:
        """The ids ``[N]``, or None without ids."""
        return self._index.ids_array()

    def snapshot(self) -> tuple[np.ndarray, np.ndarray | None]:
        """A consistent ``(words, ids or None)`` pair (see HammingIndex.snapshot)."""
        return self._index.snapshot()

    # ---- tables
    def _tables_for(self, words: np.ndarray, mapped=None, num_threads: int = 0):
        """The tables of this snapshot, built now if the last ones are of other codes; cached
        only while the snapshot is the index's current one."""
        if _C is None:
            raise RuntimeError("MIHIndex needs the compiled core fasthash._C (method='scan' works)")
        with self._lock:
            built = self._built
            if built is not None and built[0] is words:
                return built[1]
            current = self._index._snapshot()[0] is words
            if current:
                self._built = built = None  # the old tables go before the new ones are made
            m = self._fixed or default_num_tables(self.bits, words.shape[0])
            self._check_memory(words.shape[0], m)
            if mapped is not None:
                mapped.check()  # reading a truncated map would SIGBUS
            tables = _C.MIHTables(words, self.bits, m, num_threads)
            if current:  # a search of an older snapshot must not replace a newer cache
                self._built = (words, tables)
            return tables

    def _check_memory(self, n: int, m: int) -> None:
        """Refuse a build whose entries (m N (8 W + 4) bytes) exceed the available memory."""
        need = m * n * (8 * self.words + 4)
        avail = _available_memory()
        if avail is not None and need > avail:
            raise MemoryError(
                f"MIHIndex: num_tables = {m} tables of {n} codes need {need} bytes, but only "
                f"{avail} bytes of memory are available; use fewer tables (num_tables) or "
                "method='scan'"
            )

    def build(self, num_threads: int | None = None) -> None:
        """Build the tables for the current codes now (otherwise the first MIH search does).

        Example:
            >>> index = MIHIndex(8); index.add(np.ones((3, 8), np.float32)); index.build()
            >>> index.num_tables, index.table_bytes() > 0
            (5, True)
        """
        words, _, mapped = self._index._snapshot()
        if words.shape[0]:
            self._tables_for(words, mapped, check_threads(num_threads))

    def table_bytes(self) -> int:
        """Bytes held by the built tables (0 before they are built)."""
        built = self._built
        return 0 if built is None else int(built[1].nbytes)

    # ---- search
    def _prepare(self, queries, mask, method: str, num_threads):
        """(words, ids, map, q, mask words or None, threads, use_mih) for a search."""
        method = _check_method(method)
        words, ids, mapped = self._index._snapshot()
        n = words.shape[0]
        if n == 0:
            raise ValueError("the index is empty: add codes before searching")
        q = self._index._to_words(queries, "queries")
        threads = check_threads(num_threads)
        m = None
        if mask is not None:
            m = np.ascontiguousarray(as_words(mask, "mask", ndim=(1, 2), contiguous=False))
            if m.shape[-1] != self.words or (m.ndim == 2 and m.shape[0] not in (1, q.shape[0])):
                raise ValueError(
                    f"mask must be [W] or [Q, W] with W = {self.words} words and Q = "
                    f"{q.shape[0]} queries, got shape {tuple(m.shape)}"
                )
            m = m.reshape(-1) if m.ndim == 2 and m.shape[0] == 1 else m
        if method == "mih" and n > _MAX_CODES:
            raise ValueError(f"method='mih' holds fewer than 2**32 - 1 codes, the index has {n}")
        use = method == "mih" or (
            method == "auto" and _MIN_AUTO_N <= n <= _MAX_CODES and self.bits <= _MAX_AUTO_BITS
        )
        return words, ids, mapped, q, m, threads, use

    def _search_tables(self, words: np.ndarray, mapped, threads: int, method: str):
        """The tables for a search; None (scan instead) when ``auto`` finds no memory for them."""
        try:
            return self._tables_for(words, mapped, threads)
        except MemoryError:
            if method == "auto":
                return None
            raise

    def _budget(self, words: np.ndarray, method: str) -> tuple[float, float]:
        """(per-query budget, give-up ratio) of a method (see the class docstring)."""
        share = _FORCED_BUDGET if method == "mih" else _AUTO_BUDGET
        return share * words.shape[0] * self.words, _AUTO_GIVE_UP if method == "auto" else 0.0

    def search(
        self,
        queries: ArrayLike,
        k: int,
        mask: ArrayLike | None = None,
        *,
        method: str = "auto",
        num_threads: int | None = None,
    ) -> tuple[ArrayLike, ArrayLike]:
        """Exact top-k by (masked) Hamming distance, equal to :func:`fasthash.hamming_topk`.

        Args:
            queries: codes ``[Q, bits]`` or packed words ``[Q, W]``.
            k: 1 <= k <= len(index).
            mask: None, ``[W]`` or ``[Q, W]`` packed mask words (see the module docstring).
            method: ``"auto"``, ``"mih"`` or ``"scan"`` (see the class docstring).
            num_threads: worker threads, 1 to 1024 (default: every core).

        Shape:
            queries ``[Q, bits]`` or ``[Q, W]`` -> distances ``[Q, k]``, ids ``[Q, k]``.

        Returns:
            (int32 distances, int64 ids or positions) ordered by (distance, position); torch
            tensors for torch queries.

        Raises:
            MemoryError: ``method="mih"`` and no memory for the tables (see the class docstring).
            OSError: the memory-mapped file was truncated.

        Example:
            >>> index = MIHIndex(8); index.add(np.array([[1], [3], [1]], np.uint64))
            >>> [v.tolist() for v in index.search(np.array([[1]], np.uint64), 3, method="mih")]
            [[[0, 0, 1]], [[0, 2, 1]]]
        """
        words, ids, mapped, q, m, threads, use = self._prepare(queries, mask, method, num_threads)
        if not use:
            return self._index.search(queries, k, mask, num_threads=num_threads)
        k = check_int(k, "k", 1, words.shape[0])
        budget, give_up = self._budget(words, method)
        tables = self._search_tables(words, mapped, threads, method)
        if tables is None:
            return self._index.search(queries, k, mask, num_threads=num_threads)
        d, pos, done, _ = tables.topk(q, k, m, budget, give_up, threads)
        if not done.all():
            rest, best = ~done, None
            for lo, seg in self._index._segments(words, mapped):  # checks a mapped file
                dd, ii = hamming_topk(q[rest], seg, min(k, seg.shape[0]), _rows(m, rest),
                                      num_threads=num_threads)
                best = (dd, ii + lo) if best is None else merge_topk([best, (dd, ii + lo)], k)
            d[rest], pos[rest] = best
        out = (d, HammingIndex._label(pos, ids, mapped))
        return tuple(torch.from_numpy(a) for a in out) if isinstance(queries, torch.Tensor) else out

    def range_search(
        self,
        queries: ArrayLike,
        r: int,
        mask: ArrayLike | None = None,
        *,
        method: str = "auto",
        num_threads: int | None = None,
    ) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
        """Every code within (masked) distance ``r``, equal to :func:`fasthash.hamming_radius`.

        Args:
            queries, mask, method, num_threads: as in :meth:`search` (``"auto"`` scans when
                ``r >= bits``: every code is a result).
            r: radius, 0 <= r <= 2**63 - 1 (inclusive).

        Shape:
            -> lims ``[Q + 1]``, distances ``[lims[-1]]``, ids ``[lims[-1]]``.

        Returns:
            (int64 lims, int32 distances, int64 ids or positions); query i's results are
            ``[lims[i], lims[i + 1])`` ordered by (distance, position).

        Example:
            >>> index = MIHIndex(8); index.add(np.array([[1], [3], [1]], np.uint64))
            >>> [v.tolist() for v in index.range_search(np.array([[1]], np.uint64), 0)]
            [[0, 2], [0, 0], [0, 2]]
        """
        words, ids, mapped, q, m, threads, use = self._prepare(queries, mask, method, num_threads)
        r = check_radius(r)
        if not use or (method == "auto" and r >= self.bits):
            return self._index.range_search(queries, r, mask, num_threads=num_threads)
        budget, give_up = self._budget(words, method)
        tables = self._search_tables(words, mapped, threads, method)
        if tables is None:
            return self._index.range_search(queries, r, mask, num_threads=num_threads)
        lims, d, pos, done, _ = tables.radius(q, min(r, self.bits), m, budget, give_up, threads)
        if not done.all():
            rest, parts = ~done, []
            for lo, seg in self._index._segments(words, mapped):  # checks a mapped file
                pl, pd, pi = hamming_radius(q[rest], seg, r, _rows(m, rest),
                                            num_threads=num_threads)
                parts.append((pl, pd, pi + lo))
            part = parts[0] if len(parts) == 1 else merge_radius(parts, int(rest.sum()))
            lims, d, pos = _splice_radius((lims, d, pos), part, rest)
        out = (lims, d, HammingIndex._label(pos, ids, mapped))
        return tuple(torch.from_numpy(a) for a in out) if isinstance(queries, torch.Tensor) else out

    # ---- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write a HammingIndex file (format v2, checksummed) recording the ``num_tables``
        given to the constructor (none for the default rule: a load chooses it for its N).

        Example:
            >>> import tempfile, os.path
            >>> index = MIHIndex(8, num_tables=2); index.add(np.ones((3, 8), np.float32))
            >>> with tempfile.TemporaryDirectory() as d:
            ...     index.save(os.path.join(d, "g.fhidx"))
            ...     MIHIndex.load(os.path.join(d, "g.fhidx"), mmap=False).num_tables
            2
        """
        self._index._save(path, tables=self._fixed or 0)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True, verify: bool = True) -> MIHIndex:
        """Open a file of :meth:`save` (or of ``HammingIndex.save``: default m); the file is
        checked by :meth:`fasthash.index.HammingIndex.load` (header always, checksums with
        ``verify``), the stored table count here. The tables are built by the first MIH search
        (or :meth:`build`) from the loaded, memory-mapped or in-RAM, codes.

        Raises:
            ValueError: a bad or corrupted file (naming ``path``), or a stored table count out
                of range for its bits.
        """
        inner = HammingIndex.load(path, mmap=mmap, verify=verify)
        out = cls.__new__(cls)
        out._index, out.bits, out.words = inner, inner.bits, inner.words
        out._lock, out._built = threading.Lock(), None
        stored = inner.file_tables
        out._fixed = None
        if stored:
            out._fixed = _check_tables(stored, inner.bits, f"{os.fspath(path)}: stored num_tables")
        return out

    # ---- FAISS interop
    @classmethod
    def from_faiss(cls, index, num_tables: int | None = None) -> MIHIndex:
        """From a ``faiss.IndexBinaryFlat``, an ``IndexBinaryIDMap`` around one (ids kept), or
        an ``IndexBinaryMultiHash`` (its codes; its ``nhash`` is the default ``num_tables``
        when it is a valid count for ``d`` bits, ``ceil(d / 64) <= nhash <= d``).

        Args:
            index: the FAISS index (codes and ids are copied).
            num_tables: as in the constructor.

        Returns:
            an ``MIHIndex(index.d)`` holding the same codes (and ids).
        """
        import faiss

        if isinstance(index, faiss.IndexBinaryMultiHash):
            lo = -(-int(index.d) // 64)
            if num_tables is None and lo <= int(index.nhash) <= int(index.d):
                num_tables = int(index.nhash)
            index = faiss.downcast_IndexBinary(index.storage)
        inner = HammingIndex.from_faiss(index)
        out = cls(inner.bits, num_tables)
        out._index = inner
        return out

    def to_faiss(self):
        """A ``faiss.IndexBinaryFlat`` (in an ``IndexBinaryIDMap`` with ids) of the codes."""
        return self._index.to_faiss()

    def __repr__(self) -> str:
        return f"MIHIndex(bits={self.bits}, n={len(self)}, num_tables={self.num_tables})"


def _rows(m: np.ndarray | None, sel: np.ndarray) -> np.ndarray | None:
    """The mask rows of the selected queries (one shared mask stays as it is)."""
    return m if m is None or m.ndim == 1 else np.ascontiguousarray(m[sel])


def _splice_radius(first, second, rest: np.ndarray):
    """Radius results of all queries from ``first`` (queries not in ``rest`` have results there)
    and ``second`` (the queries of ``rest``, in order)."""
    lims1, d1, i1 = first
    lims2, d2, i2 = second
    nq = lims1.shape[0] - 1
    owner = np.concatenate([np.repeat(np.arange(nq), np.diff(lims1)),
                            np.repeat(np.flatnonzero(rest), np.diff(lims2))])
    order = np.argsort(owner, kind="stable")  # each query's results come from one part, sorted
    counts = np.bincount(owner, minlength=nq)
    lims = np.zeros(nq + 1, dtype=np.int64)
    lims[1:] = np.cumsum(counts)
    return lims, np.concatenate([d1, d2])[order], np.concatenate([i1, i2])[order]
