"""A persistent exact Hamming index: :class:`HammingIndex` (in RAM or memory-mapped from a file).

The index holds packed words (layout of :mod:`fasthash.codes`) and searches them with
:func:`fasthash.search.hamming_topk` / :func:`~fasthash.search.hamming_radius`. A memory-mapped
gallery is searched in 64 MiB segments whose pages are released after use, and the segments'
results are merged by (distance, index) with :func:`~fasthash.search.merge_topk` /
:func:`~fasthash.search.merge_radius`, so results equal one search over the whole gallery.

Files are versioned and checksummed, written through a temporary file and a rename, and verified
when read (header always, data CRC32 and padding bits by default); see :mod:`fasthash._indexfile`.
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
from .search import hamming_radius, hamming_topk, merge_radius, merge_topk

__all__ = ["HammingIndex"]

# the file layout (defined in fasthash._indexfile), for tools that write index files directly
_MAGIC, _VERSION = _file.MAGIC, _file.VERSION
_HEADER, _HEADER_SIZE = _file.HEADER, _file.HEADER_SIZE

_SEGMENT_BYTES = 64 << 20  # memory-mapped galleries are searched 64 MiB at a time


class HammingIndex:
    """Exact Hamming index of L-bit codes, in RAM or memory-mapped from a file.

    Threads: searches may run concurrently with each other and with :meth:`add` (and with
    :meth:`save`, :meth:`words_array`, ``len``). Each search works on a consistent snapshot of
    the gallery taken under a short lock at its start (the scan itself runs without the lock,
    so concurrent searches scan in parallel); an add is published at once under the same lock,
    so a search sees either all or none of an add, and ``len`` counts every completed add.

    Memory-mapped files: the file's size is checked (``os.fstat`` of the kept descriptor)
    before every segment is scanned, copied or written, so a file truncated by another writer
    raises ``OSError`` naming it instead of crashing. A truncation in the middle of one
    segment's scan cannot be caught and kills the process with SIGBUS, as can touching the map
    returned by :meth:`words_array` after a truncation. :meth:`save` never truncates: it
    replaces the file by a rename, and an open map keeps reading the old file.

    Args:
        bits: the code length L, 1 <= L <= 2**20 (the compiled engine's limit).

    Example:
        >>> index = HammingIndex(3)
        >>> index.add(np.array([[1, -1, 1], [-1, -1, -1]], np.float32))
        >>> d, i = index.search(np.array([[1, 1, 1]], np.float32), 1)
        >>> d.tolist(), i.tolist(), len(index)
        ([[1]], [[0]], 2)
    """

    def __init__(self, bits: int):
        self.bits = check_bits(bits, MAX_BITS)
        self.words = num_words(self.bits)
        self._lock = threading.Lock()  # guards the three fields below
        self._chunks: list[np.ndarray] = []  # added since the last snapshot (joined lazily)
        self._data: np.ndarray = np.zeros((0, self.words), dtype=np.uint64)  # never modified
        self._file: _file.MappedFile | None = None  # the map _data views, if any

    def __getstate__(self) -> dict:
        return {"bits": self.bits, "data": np.array(self._snapshot()[0])}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["bits"])
        self._data = state["data"]

    # ---- contents
    def __len__(self) -> int:
        with self._lock:
            return int(self._data.shape[0]) + sum(int(c.shape[0]) for c in self._chunks)

    @property
    def ntotal(self) -> int:
        """Number of codes (FAISS's name for ``len``)."""
        return len(self)

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

    def add(self, codes: ArrayLike) -> None:
        """Append codes to the index (a memory-mapped index is first copied into RAM).

        Safe while other threads search: a search sees all or none of these codes.

        Args:
            codes: ±1 floats, 0/1 integers or bools ``[N, bits]``, or packed words ``[N, W]``
                (``np.uint64`` / ``torch.int64``), numpy or torch on the CPU or a CUDA device.

        Example:
            >>> index = HammingIndex(70); index.add(np.ones((2, 70), np.float32)); len(index)
            2
        """
        w = self._to_words(codes, "codes")
        if not w.shape[0]:
            return
        w = np.array(w, dtype=np.uint64, copy=True)
        with self._lock:
            if self._file is not None:
                self._materialize_locked()
            self._chunks.append(w)

    def _snapshot(self) -> tuple[np.ndarray, _file.MappedFile | None]:
        """The gallery now and the map it views (None in RAM); pending adds are joined first.
        The array is never modified afterwards (adds make new ones), so it may be scanned
        without the lock."""
        with self._lock:
            if self._chunks:
                self._data = np.concatenate([self._data, *self._chunks])
                self._chunks = []
            return self._data, self._file

    def _materialize_locked(self) -> None:
        """Copy a memory-mapped gallery into RAM (before it is modified); holds the lock."""
        data, mapped = self._data, self._file
        out = np.empty(data.shape, dtype=np.uint64)
        for lo, rows in _file.iter_rows(data, max(1, _file.IO_BYTES // (8 * self.words)), mapped):
            out[lo : lo + rows.shape[0]] = rows
        self._data, self._file = out, None  # the map closes when its last search finishes

    def words_array(self) -> np.ndarray:
        """The packed gallery ``[N, W]`` (a read-only memory map for a mapped index: reading it
        after another writer truncated the file kills the process with SIGBUS)."""
        return self._snapshot()[0]

    # ---- search
    def _segments(
        self, data: np.ndarray, mapped: _file.MappedFile | None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, words) pieces of a snapshot; a memory map is cut so RSS stays bounded, and
        the file's size is checked before each piece."""
        if mapped is None:
            yield 0, data
            return
        yield from _file.iter_rows(data, max(1, _SEGMENT_BYTES // (8 * self.words)), mapped)

    def _searchable(self) -> tuple[np.ndarray, _file.MappedFile | None]:
        data, mapped = self._snapshot()
        if data.shape[0] == 0:
            raise ValueError("the index is empty: add codes before searching")
        return data, mapped

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
            k: 1 <= k <= len(index) (at the start of this search).
            mask: None, ``[W]`` or ``[Q, W]`` packed mask words.
            num_threads: worker threads, 1 to 1024 (default: every core).

        Shape:
            queries ``[Q, bits]`` or ``[Q, W]`` -> distances ``[Q, k]``, indices ``[Q, k]``.

        Returns:
            (int32 distances, int64 indices) ordered by (distance, index); torch tensors for
            torch queries.

        Raises:
            OSError: the memory-mapped file was truncated (see the class docstring).

        Example:
            >>> index = HammingIndex(2); index.add(np.array([[1, 1], [1, -1]], np.float32))
            >>> [v.tolist() for v in index.search(np.array([[1, -1]], np.float32), 2)]
            [[[0, 1]], [[1, 0]]]
        """
        data, mapped = self._searchable()
        k = check_int(k, "k", 1, data.shape[0])
        q = self._to_words(queries, "queries")
        check_threads(num_threads)
        best = None
        for lo, seg in self._segments(data, mapped):
            d, i = hamming_topk(q, seg, min(k, seg.shape[0]), mask, num_threads=num_threads)
            part = (d, i + lo)
            best = part if best is None else merge_topk([best, part], k)
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
            -> lims ``[Q + 1]``, distances ``[lims[-1]]``, indices ``[lims[-1]]``.

        Returns:
            (int64 lims, int32 distances, int64 indices); query i's results are
            ``[lims[i], lims[i + 1])`` ordered by (distance, index).

        Example:
            >>> index = HammingIndex(2); index.add(np.array([[1, 1], [1, -1]], np.float32))
            >>> [v.tolist() for v in index.range_search(np.array([[1, -1]], np.float32), 0)]
            [[0, 1], [0], [1]]
        """
        data, mapped = self._searchable()
        r = check_radius(r)
        q = self._to_words(queries, "queries")
        check_threads(num_threads)
        parts = []
        for lo, seg in self._segments(data, mapped):
            lims, d, i = hamming_radius(q, seg, r, mask, num_threads=num_threads)
            parts.append((lims, d, i + lo))
        out = parts[0] if len(parts) == 1 else merge_radius(parts, q.shape[0])
        if isinstance(queries, torch.Tensor):
            return tuple(torch.from_numpy(a) for a in out)
        return out

    # ---- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index atomically: versioned header + words + CRC32, via a temp file + rename.

        Layout (little endian): magic ``b"FASTHASH"``, u32 version, u32 bits, u64 count, u32 words
        per code, u32 CRC32 of the data, u32 CRC32 of those 32 bytes; zero padding to 4096 bytes;
        then ``count * words`` uint64 words.

        An existing file keeps its permission bits; a new one gets the default of ``open()``
        (0666 less the umask). The temporary ``.<name>.tmp<pid>.<token>`` lives in the
        destination's folder until the rename; one left by a killed save is removed by the
        next save or load of the same path.

        Args:
            path: the destination.

        Example:
            >>> import tempfile, os.path
            >>> index = HammingIndex(8); index.add(np.ones((3, 8), np.float32))
            >>> with tempfile.TemporaryDirectory() as d:
            ...     index.save(os.path.join(d, "g.fhidx"))
            ...     len(HammingIndex.load(os.path.join(d, "g.fhidx"), mmap=False))
            3
        """
        data, mapped = self._snapshot()
        _file.write_index(os.fspath(path), self.bits, data, mapped)

    @classmethod
    def load(
        cls, path: str | os.PathLike, mmap: bool = True, verify: bool = True
    ) -> HammingIndex:
        """Open a saved index; ``mmap=True`` maps the gallery instead of reading it into RAM.

        Args:
            path: a regular file written by :meth:`save`.
            mmap: search the file through a read-only memory map, in 64 MiB segments whose pages
                are released after use, so the resident memory stays far below the file size.
            verify: one streaming pass that checks the data CRC32 and that no code sets a bit
                beyond ``bits``. The header (magic, CRC32, version, sizes, zero padding) is
                always checked; with ``mmap=False`` the padding bits are checked always too.

        Returns:
            the index (memory-mapped or in RAM).

        Raises:
            ValueError: not a regular file, not an index file, unknown version, truncated,
                sparse (holes instead of the declared codes), corrupted, or bits set beyond
                ``bits``.
            MemoryError: ``mmap=False`` and the codes do not fit in memory.

        Example:
            See :meth:`save`.
        """
        path = os.fspath(path)
        _file.remove_stale_temps(path)
        fd = _file.open_regular(path)
        index = mapped = None
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, _HEADER_SIZE, 0)
            bits, count, words, data_crc = _file.parse_header(path, head, size)
            _file.check_allocated(fd, path, size, count)
            index = cls(bits)
            if count and mmap:
                mapped = _file.MappedFile(fd, path, count, words)
                if verify:
                    _file.data_pass(mapped.data, bits, path, data_crc, mapped)
                index._data, index._file = mapped.data, mapped
            elif count:
                data = _file.read_words(fd, path, count, words)
                _file.data_pass(data, bits, path, data_crc if verify else None, None)
                index._data = data
        except BaseException:
            if mapped is not None:
                mapped.close()
            else:
                os.close(fd)
            raise
        if mapped is None:
            os.close(fd)
        return index

    # ---- FAISS interop
    @classmethod
    def from_faiss(cls, index) -> HammingIndex:
        """Build from a ``faiss.IndexBinaryFlat`` (its d bits; codes are copied).

        Args:
            index: a ``faiss.IndexBinaryFlat``.

        Returns:
            a ``HammingIndex(index.d)`` holding the same codes.
        """
        import faiss

        from .codes import from_faiss_bytes

        if not isinstance(index, faiss.IndexBinaryFlat):
            raise TypeError(f"index must be a faiss.IndexBinaryFlat, got {type(index).__name__}")
        out = cls(index.d)
        if index.ntotal:
            codes = faiss.vector_to_array(index.xb).reshape(index.ntotal, index.code_size)
            out.add(from_faiss_bytes(codes, index.d))
        return out

    def to_faiss(self):
        """A ``faiss.IndexBinaryFlat`` holding the same codes (dimension ``8 * ceil(bits / 8)``).

        Returns:
            the FAISS index (the codes are copied; padding bits are 0).
        """
        import faiss

        from .codes import to_faiss_bytes

        out = faiss.IndexBinaryFlat(8 * ((self.bits + 7) // 8))
        data, mapped = self._snapshot()
        if mapped is not None:
            mapped.check()
        if data.shape[0]:
            out.add(to_faiss_bytes(data, self.bits))
        return out

    def __repr__(self) -> str:
        where = "mmap" if self._file is not None else "ram"
        return f"HammingIndex(bits={self.bits}, n={len(self)}, {where})"
