"""A persistent exact Hamming index: :class:`HammingIndex` (in RAM or memory-mapped from a file).

The index holds packed words (layout of :mod:`fasthash.codes`), optionally one int64 id per
code, and searches them with :func:`fasthash.search.hamming_topk` /
:func:`~fasthash.search.hamming_radius`. A memory-mapped gallery is searched in 64 MiB segments
whose pages are released after use, and the segments' results are merged by (distance, index)
with :func:`~fasthash.search.merge_topk` / :func:`~fasthash.search.merge_radius`, so results
equal one search over the whole gallery.

Files are versioned and checksummed, written through a temporary file and a rename, and verified
when read (header always, CRC32s, padding bits and ids by default); see :mod:`fasthash._indexfile`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import numpy as np
import torch

from . import _indexfile as _file
from ._checks import MAX_BITS, check_bits, check_device, check_int, check_radius, check_threads
from .codes import ArrayLike, _pack, as_words, num_words
from .search import IdsLike, as_ids, hamming_radius, hamming_topk, merge_radius, merge_topk

__all__ = ["HammingIndex"]

# the file layout (defined in fasthash._indexfile), for tools that write index files directly
_MAGIC, _VERSION = _file.MAGIC, _file.VERSION
_HEADER, _HEADER_SIZE = _file.HEADER, _file.HEADER_SIZE

_SEGMENT_BYTES = 64 << 20  # memory-mapped galleries are searched 64 MiB at a time

class HammingIndex:
    """Exact Hamming index of L-bit codes, in RAM or memory-mapped from a file.

    Ids: searches of an index whose codes were added with ids (int64, >= 0) return those ids
    instead of positions (insertion order), ordered by (distance, position). Codes are all
    with ids or all without: the first non-empty add decides, an add of the other kind raises
    ``ValueError``, and an index emptied by :meth:`remove_ids` keeps its kind (an index with
    ids keeps it through save/load). Duplicate ids are allowed, as in FAISS: each code is its
    own result, and :meth:`remove_ids` removes every code with the id.

    Threads: searches may run concurrently with each other and with :meth:`add`,
    :meth:`remove_ids`, :meth:`save`, :meth:`snapshot` and ``len``. Each search works on a
    consistent snapshot of the codes and ids taken under a short lock at its start (the scan
    runs without the lock, so searches scan in parallel); an add or a removal is published at
    once under the same lock, so a search sees all or none of it.

    Memory-mapped files: the file's size is checked (``os.fstat`` of the kept descriptor)
    before every segment is scanned, copied or written, so a file truncated by another writer
    raises ``OSError`` naming it instead of crashing. A truncation during one segment's scan
    cannot be caught and kills the process with SIGBUS, as can touching the maps returned by
    :meth:`words_array` / :meth:`ids_array` after one. :meth:`save` never truncates: it
    replaces the file by a rename, and an open map keeps reading the old file.

    Args:
        bits: the code length L, 1 <= L <= 2**20 (the compiled engine's limit).

    Attributes:
        file_tables: the table count recorded in the file it was loaded from (else 0).

    Example:
        >>> index = HammingIndex(3)
        >>> index.add(np.array([[1, -1, 1], [-1, -1, -1]], np.float32), ids=[70, 9])
        >>> d, i = index.search(np.array([[1, 1, 1]], np.float32), 1)
        >>> d.tolist(), i.tolist(), len(index)
        ([[1]], [[70]], 2)
    """

    def __init__(self, bits: int):
        self.bits = check_bits(bits, MAX_BITS)
        self.words = num_words(self.bits)
        self.file_tables = 0
        self._lock = threading.Lock()  # guards the fields below
        self._chunks: list[np.ndarray] = []  # added since the last snapshot (joined lazily)
        self._id_chunks: list[np.ndarray] = []  # their ids (index with ids)
        self._data: np.ndarray = np.zeros((0, self.words), dtype=np.uint64)  # never modified
        self._ids: np.ndarray | None = None  # int64 [N] exactly when the index has ids
        self._kind: bool | None = None  # True: ids, False: positions, None: not decided
        self._file: _file.MappedFile | None = None  # the map _data (and _ids) view, if any

    def __getstate__(self) -> dict:
        with self._lock:  # the kind with the same snapshot: an add may land right after it
            words, ids, _ = self._snapshot_locked()
            kind = self._kind
        return {"bits": self.bits, "data": np.array(words), "kind": kind,
                "ids": None if ids is None else np.array(ids), "file_tables": self.file_tables}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["bits"])
        self._data, self._ids = state["data"], state.get("ids")
        self._kind = state.get("kind", False if len(self._data) else None)
        self.file_tables = state.get("file_tables", 0)

    # ---- contents
    def __len__(self) -> int:
        with self._lock:
            return int(self._data.shape[0]) + sum(int(c.shape[0]) for c in self._chunks)

    @property
    def ntotal(self) -> int:
        """Number of codes (FAISS's name for ``len``)."""
        return len(self)

    @property
    def has_ids(self) -> bool:
        """Whether the codes carry ids (also when :meth:`remove_ids` emptied the index)."""
        return bool(self._kind)

    def _to_words(self, codes: ArrayLike, name: str) -> np.ndarray:
        """C-contiguous packed words [N, W] from codes (anything pack_codes takes) or words.

        64-bit integer arrays with ``ceil(bits / 64)`` columns are packed words (no bit may be
        set beyond ``bits``); anything else goes through :func:`fasthash.pack_codes` and must
        have ``bits`` columns.
        """
        if isinstance(codes, torch.Tensor):
            check_device(codes, name)
            codes = codes.detach().cpu()
        if not isinstance(codes, (np.ndarray, torch.Tensor)):
            raise TypeError(
                f"{name} must be a numpy array or torch tensor, got {type(codes).__name__}"
            )
        is_torch = isinstance(codes, torch.Tensor)
        packed = codes.dtype in ((torch.int64, torch.uint64) if is_torch else (np.uint64, np.int64))
        if packed and codes.ndim == 2 and codes.shape[1] == self.words:
            return np.ascontiguousarray(as_words(codes, name, bits=self.bits))
        if codes.ndim != 2 or codes.shape[1] != self.bits:
            raise ValueError(
                f"{name} must be codes [N, {self.bits}] or packed words [N, {self.words}], "
                f"got shape {tuple(codes.shape)}"
            )
        return np.ascontiguousarray(as_words(_pack(codes, None, name), name))

    def add(self, codes: ArrayLike, ids: IdsLike | None = None) -> None:
        """Append codes (and their ids); a memory-mapped index is first copied into RAM.
        A concurrent search sees all or none of these codes.

        Args:
            codes: ±1 floats, 0/1 integers or bools ``[N, bits]``, or packed words ``[N, W]``
                (``np.uint64`` / ``torch.int64``), numpy or torch on the CPU or a CUDA device.
            ids: None, or one id per code: integers >= 0 ``[N]`` (numpy, torch or a sequence;
                duplicates allowed), returned by searches instead of positions.

        Raises:
            ValueError: bad codes or ids, or codes with ids added to codes without (or the
                reverse; see the class docstring).

        Example:
            >>> index = HammingIndex(70); index.add(np.ones((2, 70), np.float32)); len(index)
            2
        """
        w = self._to_words(codes, "codes")
        new_ids = None if ids is None else as_ids(ids, "ids", w.shape[0])
        if not w.shape[0]:
            return
        w = np.array(w, dtype=np.uint64, copy=True)
        with self._lock:
            self._check_kind_locked(new_ids is not None)
            if self._file is not None:
                self._materialize_locked()
            self._chunks.append(w)
            if new_ids is not None:
                self._id_chunks.append(new_ids)

    def _check_kind_locked(self, with_ids: bool) -> None:
        """Refuse an add of the other kind than the codes held (or held before a removal)."""
        if self._kind is None:
            self._kind = with_ids
            if with_ids and self._ids is None:
                self._ids = np.zeros(0, dtype=np.int64)
        elif self._kind != with_ids:
            held, given = ("with", "without") if self._kind else ("without", "with")
            raise ValueError(
                f"ids: this index holds codes added {held} ids, so codes cannot be added "
                f"{given} ids (an index holds codes all with ids or all without: searches "
                "return either ids or positions); use another HammingIndex"
            )

    def _snapshot(self) -> tuple[np.ndarray, np.ndarray | None, _file.MappedFile | None]:
        """(words, ids or None, map or None) now, taken under one lock acquisition; pending
        adds are joined first. The arrays are never modified afterwards (adds and removals
        make new ones), so they may be read without the lock."""
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> tuple[np.ndarray, np.ndarray | None, _file.MappedFile | None]:
        self._join_locked()
        for a in (self._data, self._ids):
            if a is not None:
                a.flags.writeable = False  # handed out: a caller's write would change results
        return self._data, self._ids, self._file

    def _join_locked(self) -> None:
        if self._chunks:
            self._data = np.concatenate([self._data, *self._chunks])
            self._chunks = []
        if self._id_chunks:
            self._ids = np.concatenate([self._ids, *self._id_chunks])
            self._id_chunks = []

    def _materialize_locked(self, keep: np.ndarray | None = None) -> None:
        """Copy a memory-mapped gallery (rows ``keep`` of it) into RAM; holds the lock."""
        self._join_locked()
        self._data, self._ids = _file.compact(self._data, self._ids, keep, self._file)
        self._file = None  # the map closes when its last search finishes

    def words_array(self) -> np.ndarray:
        """The packed gallery ``[N, W]``, read-only (a memory map for a mapped index: reading it
        after another writer truncated the file kills the process with SIGBUS)."""
        return self._snapshot()[0]

    def ids_array(self) -> np.ndarray | None:
        """The ids ``[N]`` (int64, read-only; row i = the id of code i), or None when the index
        has no ids. A memory map for a mapped index (see :meth:`words_array`)."""
        return self._snapshot()[1]

    def snapshot(self) -> tuple[np.ndarray, np.ndarray | None]:
        """A consistent pair ``(words [N, W], ids [N] or None)``, taken under one lock: the same
        N codes and their ids even while other threads add or remove. Never modified later.

        Example:
            >>> index = HammingIndex(8); index.add(np.ones((2, 8), np.float32), ids=[5, 3])
            >>> words, ids = index.snapshot(); words.shape, ids.tolist()
            ((2, 1), [5, 3])
        """
        words, ids, _ = self._snapshot()
        return words, ids

    def remove_ids(self, ids: IdsLike) -> int:
        """Remove codes. With ids: every code whose id is in ``ids`` (every copy of a duplicate;
        absent ids are ignored). Without ids: ``ids`` are positions (ignored when >= len), and
        later codes move down, as in FAISS's ``IndexBinaryFlat``. A memory-mapped index is
        first copied into RAM (unless nothing is removed). A concurrent search sees the index
        before or after the removal.

        Args:
            ids: integers >= 0 ``[M]`` (numpy, torch or a sequence).

        Returns:
            the number of codes removed.

        Example:
            >>> index = HammingIndex(4); index.add(np.ones((3, 4), np.float32), ids=[7, 8, 7])
            >>> index.remove_ids([7, 100]), index.ids_array().tolist()
            (2, [8])
        """
        sel = as_ids(ids, "ids")
        with self._lock:
            self._join_locked()
            n = self._data.shape[0]
            if self._ids is not None:
                drop = np.concatenate(
                    [np.isin(p, sel) for _, p in _file.iter_ids(self._ids, self._file)]
                    or [np.zeros(0, bool)]
                )
            else:
                drop = np.zeros(n, dtype=bool)
                drop[sel[sel < n]] = True
            removed = int(np.count_nonzero(drop))
            if removed:
                self._materialize_locked(~drop)
            return removed

    # ---- search
    def _segments(self, data: np.ndarray, mapped) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, words) pieces of a snapshot: a memory map is cut so RSS stays bounded, and
        the file's size is checked before each piece."""
        per = data.shape[0] if mapped is None else _SEGMENT_BYTES // (8 * self.words)
        return _file.iter_rows(data, max(1, per), mapped)

    def _searchable(self) -> tuple[np.ndarray, np.ndarray | None, _file.MappedFile | None]:
        data, ids, mapped = self._snapshot()
        if data.shape[0] == 0:
            raise ValueError("the index is empty: add codes before searching")
        return data, ids, mapped

    @staticmethod
    def _label(pos: np.ndarray, ids: np.ndarray | None, mapped) -> np.ndarray:
        """The results' ids (positions when the index has none)."""
        if ids is None:
            return pos
        if mapped is not None:
            mapped.check()
        return np.asarray(ids[pos], dtype=np.int64)

    def search(
        self,
        queries: ArrayLike,
        k: int,
        mask: ArrayLike | None = None,
        *,
        num_threads: int | None = None,
    ) -> tuple[ArrayLike, ArrayLike]:
        """Exact top-k by (masked) Hamming distance (see :func:`fasthash.hamming_topk`).

        Args:
            queries: codes ``[Q, bits]`` or packed words ``[Q, W]`` (as :meth:`add` takes).
            k: 1 <= k <= len(index) (at the start of this search; a larger k is an error,
                never padded).
            mask: None, ``[W]`` or ``[Q, W]`` packed mask words.
            num_threads: worker threads, 1 to 1024 (default: every core).

        Shape:
            queries ``[Q, bits]`` or ``[Q, W]`` -> distances ``[Q, k]``, ids ``[Q, k]``.

        Returns:
            (int32 distances, int64 ids) ordered by (distance, position); the ids are the
            codes' positions when the index has no ids. Torch tensors for torch queries.

        Raises:
            OSError: the memory-mapped file was truncated (see the class docstring).

        Example:
            >>> index = HammingIndex(2); index.add(np.array([[1, 1], [1, -1]], np.float32))
            >>> [v.tolist() for v in index.search(np.array([[1, -1]], np.float32), 2)]
            [[[0, 1]], [[1, 0]]]
        """
        data, ids, mapped = self._searchable()
        k = check_int(k, "k", 1, data.shape[0])
        q = self._to_words(queries, "queries")
        check_threads(num_threads)
        best = None
        for lo, seg in self._segments(data, mapped):
            d, i = hamming_topk(q, seg, min(k, seg.shape[0]), mask, num_threads=num_threads)
            part = (d, i + lo)
            best = part if best is None else merge_topk([best, part], k)
        best = best[0], self._label(best[1], ids, mapped)
        if isinstance(queries, torch.Tensor):
            return torch.from_numpy(best[0]), torch.from_numpy(best[1])
        return best

    def range_search(
        self,
        queries: ArrayLike,
        r: int,
        mask: ArrayLike | None = None,
        *,
        num_threads: int | None = None,
    ) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
        """Every code within (masked) Hamming distance ``r`` (see :func:`fasthash.hamming_radius`).

        Args:
            queries: codes ``[Q, bits]`` or packed words ``[Q, W]``.
            r: radius, 0 <= r <= 2**63 - 1 (inclusive).
            mask, num_threads: as in :meth:`search`.

        Shape:
            -> lims ``[Q + 1]``, distances ``[lims[-1]]``, ids ``[lims[-1]]``.

        Returns:
            (int64 lims, int32 distances, int64 ids); query i's results are
            ``[lims[i], lims[i + 1])`` ordered by (distance, position); ids as in :meth:`search`.

        Example:
            >>> index = HammingIndex(2); index.add(np.array([[1, 1], [1, -1]], np.float32))
            >>> [v.tolist() for v in index.range_search(np.array([[1, -1]], np.float32), 0)]
            [[0, 1], [0], [1]]
        """
        data, ids, mapped = self._searchable()
        r = check_radius(r)
        q = self._to_words(queries, "queries")
        check_threads(num_threads)
        parts = []
        for lo, seg in self._segments(data, mapped):
            lims, d, i = hamming_radius(q, seg, r, mask, num_threads=num_threads)
            parts.append((lims, d, i + lo))
        lims, d, i = parts[0] if len(parts) == 1 else merge_radius(parts, q.shape[0])
        out = lims, d, self._label(i, ids, mapped)
        if isinstance(queries, torch.Tensor):
            return tuple(torch.from_numpy(a) for a in out)
        return out

    # ---- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index atomically: file format version 2 (:mod:`fasthash._indexfile`).

        An existing file keeps its permission bits; a new one gets the default of ``open()``
        (0666 less the umask). The temporary ``.<name>.tmp<pid>.<token>`` lives in the
        destination's folder until the rename; one left by a killed save is removed by the
        next save or load of the same path.

        Args:
            path: the destination.

        Example:
            >>> import tempfile, os.path
            >>> index = HammingIndex(8); index.add(np.ones((3, 8), np.float32), ids=[4, 5, 6])
            >>> with tempfile.TemporaryDirectory() as d:
            ...     index.save(os.path.join(d, "g.fhidx"))
            ...     HammingIndex.load(os.path.join(d, "g.fhidx"), mmap=False).ids_array().tolist()
            [4, 5, 6]
        """
        self._save(path)

    def _save(self, path: str | os.PathLike, *, tables: int = 0) -> None:
        """:meth:`save`, recording ``tables`` (u32) in the header (``MIHIndex``: its table count,
        read back as ``file_tables``)."""
        tables = check_int(tables, "tables", 0, (1 << 32) - 1)
        data, ids, mapped = self._snapshot()
        _file.write_index(os.fspath(path), self.bits, data, mapped, ids, tables)

    @classmethod
    def load(
        cls, path: str | os.PathLike, mmap: bool = True, verify: bool = True
    ) -> HammingIndex:
        """Open a saved index (format version 1 or 2); ``mmap=True`` maps the codes and ids.

        Args:
            path: a regular file written by :meth:`save`.
            mmap: search the file through a read-only memory map, in 64 MiB segments whose pages
                are released after use, so the resident memory stays far below the file size.
            verify: one streaming pass that checks the CRC32s of the codes and ids, that no
                code sets a bit beyond ``bits`` and that no id is negative. The header (magic,
                CRC32, version, flags, sizes, zero padding) is always checked; with
                ``mmap=False`` the padding bits and ids are checked always too.

        Returns:
            the index (memory-mapped or in RAM; ``file_tables`` read from the header).

        Raises:
            ValueError: not a regular file, not an index file, unknown version, truncated,
                sparse (holes instead of the declared codes), corrupted, bits set beyond
                ``bits``, or negative ids.
            MemoryError: ``mmap=False`` and the codes do not fit in memory.

        Example:
            See :meth:`save`.
        """
        found = _file.read_index(os.fspath(path), mmap, verify)
        h = found.header
        index = cls(h.bits)
        index._data, index._ids, index._file = found.data, found.ids, found.mapped
        index._kind = True if h.has_ids else (False if h.count else None)
        index.file_tables = h.tables
        return index

    # ---- FAISS interop
    @classmethod
    def from_faiss(cls, index) -> HammingIndex:
        """Build from a ``faiss.IndexBinaryFlat`` (its d bits; codes are copied), or from a
        ``faiss.IndexBinaryIDMap`` (or ``IDMap2``) around one (its ids kept).

        Args:
            index: the FAISS index.

        Returns:
            a ``HammingIndex(index.d)`` holding the same codes (and ids).
        """
        import faiss

        from .codes import from_faiss_bytes

        ids = None
        if isinstance(index, faiss.IndexBinaryIDMap):
            ids = faiss.vector_to_array(index.id_map).astype(np.int64)
            index = faiss.downcast_IndexBinary(index.index)
        if not isinstance(index, faiss.IndexBinaryFlat):
            raise TypeError(
                "index must be a faiss.IndexBinaryFlat or an IndexBinaryIDMap around one, got "
                f"{type(index).__name__}"
            )
        out = cls(index.d)
        if index.ntotal:
            codes = faiss.vector_to_array(index.xb).reshape(index.ntotal, index.code_size)
            out.add(from_faiss_bytes(codes, index.d), ids)
        elif ids is not None:
            with out._lock:
                out._check_kind_locked(True)  # an empty IDMap: an index with ids
        return out

    def to_faiss(self):
        """A ``faiss.IndexBinaryFlat`` holding the same codes (dimension ``8 * ceil(bits / 8)``),
        in a ``faiss.IndexBinaryIDMap`` with the ids if the index has ids.

        Returns:
            the FAISS index (the codes and ids are copied; padding bits are 0).
        """
        import faiss

        from .codes import to_faiss_bytes

        flat = faiss.IndexBinaryFlat(8 * ((self.bits + 7) // 8))
        data, ids, mapped = self._snapshot()
        if mapped is not None:
            mapped.check()
        out = flat if ids is None else faiss.IndexBinaryIDMap(flat)  # the map keeps flat alive
        if data.shape[0] and ids is None:
            flat.add(to_faiss_bytes(data, self.bits))
        elif data.shape[0]:
            out.add_with_ids(to_faiss_bytes(data, self.bits), np.ascontiguousarray(ids))
        return out

    def __repr__(self) -> str:
        where = "mmap" if self._file is not None else "ram"
        ids = ", ids" if self._kind else ""
        return f"HammingIndex(bits={self.bits}, n={len(self)}{ids}, {where})"
