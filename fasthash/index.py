"""A persistent exact Hamming index: :class:`HammingIndex` (in RAM or memory-mapped from a file).

The index holds packed words (layout of :mod:`fasthash.codes`) and searches them with
:func:`fasthash.search.hamming_topk` / :func:`~fasthash.search.hamming_radius`. A memory-mapped
gallery is searched in 64 MiB segments whose pages are released after use, and the segments'
results are merged by (distance, index) with :func:`~fasthash.search.merge_topk` /
:func:`~fasthash.search.merge_radius`, so results equal one search over the whole gallery.

Files are versioned and checksummed, written through a temporary file and a rename, and verified
when read (header always, data CRC32 by default).
"""

from __future__ import annotations

import mmap as _mmap
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator

import numpy as np
import torch

from ._checks import check_int
from .codes import ArrayLike, as_words, num_words, pack_codes
from .search import hamming_radius, hamming_topk, merge_radius, merge_topk

__all__ = ["HammingIndex"]

_MAGIC = b"FASTHASH"
_VERSION = 1
_HEADER = struct.Struct("<8sIIQII")  # magic, version, bits, count, words, data crc32
_HEADER_SIZE = 4096  # the data starts page-aligned so it can be memory-mapped and released
_SEGMENT_BYTES = 64 << 20  # memory-mapped galleries are searched 64 MiB at a time
_IO_BYTES = 16 << 20  # bounded extra memory while writing or checksumming


def _crc32(buf: np.ndarray, chunk: int = _IO_BYTES, release=None) -> int:
    """CRC32 of an array's bytes, streamed in chunks (``release(lo, n)`` after each one)."""
    crc = 0
    view = memoryview(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))
    for lo in range(0, len(view), chunk):
        crc = zlib.crc32(view[lo : lo + chunk], crc)
        if release is not None:
            release(lo, min(chunk, len(view) - lo))
    return crc


def _read_header(path: str, head: bytes, size: int) -> tuple[int, int, int, int]:
    """Check a file header; return ``(bits, count, words, data_crc)``."""
    hs = _HEADER.size
    if len(head) < hs + 4 or head[:8] != _MAGIC:
        raise ValueError(f"{path} is not a fasthash index (bad magic or too short)")
    _, version, bits, count, words, data_crc = _HEADER.unpack(head[:hs])
    (head_crc,) = struct.unpack("<I", head[hs : hs + 4])
    if zlib.crc32(head[:hs]) != head_crc:
        raise ValueError(f"{path}: corrupted header (checksum mismatch)")
    if version != _VERSION:
        raise ValueError(f"{path}: unsupported index version {version} (expected {_VERSION})")
    if bits < 1 or words != num_words(bits):
        raise ValueError(f"{path}: inconsistent header (bits={bits}, words={words})")
    expected = _HEADER_SIZE + count * words * 8
    if size != expected:
        raise ValueError(
            f"{path}: truncated or padded file ({size} bytes, expected {expected} for "
            f"{count} codes of {bits} bits)"
        )
    return bits, count, words, data_crc


class HammingIndex:
    """Exact Hamming index of L-bit codes, in RAM or memory-mapped from a file.

    Args:
        bits: the code length L (>= 1).

    Example:
        >>> index = HammingIndex(3)
        >>> index.add(np.array([[1, -1, 1], [-1, -1, -1]], np.float32))
        >>> d, i = index.search(np.array([[1, 1, 1]], np.float32), 1)
        >>> d.tolist(), i.tolist(), len(index)
        ([[1]], [[0]], 2)
    """

    def __init__(self, bits: int):
        self.bits = check_int(bits, "bits", 1)
        self.words = num_words(self.bits)
        self._chunks: list[np.ndarray] = []  # added since the last search (concatenated lazily)
        self._data: np.ndarray = np.zeros((0, self.words), dtype=np.uint64)
        self._mmap: _mmap.mmap | None = None

    # ---- contents
    def __len__(self) -> int:
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
        return np.ascontiguousarray(as_words(pack_codes(codes), name))

    def add(self, codes: ArrayLike) -> None:
        """Append codes to the index (a memory-mapped index is first copied into RAM).

        Args:
            codes: ±1 floats, 0/1 integers or bools ``[N, bits]``, or packed words ``[N, W]``
                (``np.uint64`` / ``torch.int64``), numpy or torch on any device.

        Example:
            >>> index = HammingIndex(70); index.add(np.ones((2, 70), np.float32)); len(index)
            2
        """
        if self._mmap is not None:
            self._materialize()
        w = self._to_words(codes, "codes")
        if w.shape[0]:
            self._chunks.append(np.array(w, dtype=np.uint64, copy=True))

    def _gallery(self) -> np.ndarray:
        if self._chunks:
            self._data = np.ascontiguousarray(np.concatenate([self._data, *self._chunks]))
            self._chunks = []
        return self._data

    def _materialize(self) -> None:
        """Copy a memory-mapped gallery into RAM (before it is modified)."""
        data = np.array(self._data, copy=True)
        self._close_mmap()
        self._data = data

    def _close_mmap(self) -> None:
        if self._mmap is not None:
            self._data = np.zeros((0, self.words), dtype=np.uint64)
            try:
                self._mmap.close()
            except BufferError:  # a view is still alive; the mapping closes with it
                pass
            self._mmap = None

    def words_array(self) -> np.ndarray:
        """The packed gallery ``[N, W]`` (a read-only memory map for a mapped index)."""
        return self._gallery()

    # ---- search
    def _segments(self) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, words) pieces of the gallery; a memory map is cut so RSS stays bounded."""
        data = self._gallery()
        if self._mmap is None:
            yield 0, data
            return
        per = max(1, _SEGMENT_BYTES // (8 * self.words))
        for lo in range(0, data.shape[0], per):
            yield lo, data[lo : lo + per]
            self._release(lo, min(per, data.shape[0] - lo))

    def _release(self, lo: int, count: int) -> None:
        """Drop the mapped pages of codes [lo, lo + count) from this process (re-read on use)."""
        if self._mmap is None or not hasattr(self._mmap, "madvise"):
            return
        start = _HEADER_SIZE + lo * 8 * self.words
        end = start + count * 8 * self.words
        page = _mmap.PAGESIZE
        a = (start + page - 1) // page * page
        b = end // page * page
        if b > a:
            self._mmap.madvise(_mmap.MADV_DONTNEED, a, b - a)

    def _check_searchable(self) -> None:
        if len(self) == 0:
            raise ValueError("the index is empty: add codes before searching")

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
            k: 1 <= k <= len(index).
            mask: None, ``[W]`` or ``[Q, W]`` packed mask words.
            num_threads: worker threads (default: every core).

        Shape:
            queries ``[Q, bits]`` or ``[Q, W]`` -> distances ``[Q, k]``, indices ``[Q, k]``.

        Returns:
            (int32 distances, int64 indices) ordered by (distance, index); torch tensors for
            torch queries.

        Example:
            >>> index = HammingIndex(2); index.add(np.array([[1, 1], [1, -1]], np.float32))
            >>> [v.tolist() for v in index.search(np.array([[1, -1]], np.float32), 2)]
            [[[0, 1]], [[1, 0]]]
        """
        self._check_searchable()
        k = check_int(k, "k", 1, len(self))
        q = self._to_words(queries, "queries")
        best = None
        for lo, seg in self._segments():
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
            queries: codes ``[Q, bits]`` or packed words ``[Q, W]``. r: radius >= 0 (inclusive).
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
        self._check_searchable()
        r = check_int(r, "r", 0)
        q = self._to_words(queries, "queries")
        parts = []
        for lo, seg in self._segments():
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

        Args:
            path: the destination; its directory holds the temporary file until the rename.

        Example:
            >>> import tempfile, os.path
            >>> index = HammingIndex(8); index.add(np.ones((3, 8), np.float32))
            >>> with tempfile.TemporaryDirectory() as d:
            ...     index.save(os.path.join(d, "g.fhidx"))
            ...     len(HammingIndex.load(os.path.join(d, "g.fhidx"), mmap=False))
            3
        """
        data = self._gallery()
        path = os.fspath(path)
        head = _HEADER.pack(_MAGIC, _VERSION, self.bits, data.shape[0], self.words, _crc32(data))
        head += struct.pack("<I", zlib.crc32(head))
        fd, tmp = tempfile.mkstemp(prefix=".fasthash-", dir=os.path.dirname(path) or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(head.ljust(_HEADER_SIZE, b"\0"))
                per = max(1, _IO_BYTES // (8 * self.words))
                for lo in range(0, data.shape[0], per):
                    f.write(np.ascontiguousarray(data[lo : lo + per], dtype="<u8").tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(
        cls, path: str | os.PathLike, mmap: bool = True, verify: bool = True
    ) -> HammingIndex:
        """Open a saved index; ``mmap=True`` maps the gallery instead of reading it into RAM.

        Args:
            path: a file written by :meth:`save`.
            mmap: search the file through a read-only memory map, in 64 MiB segments whose pages
                are released after use, so the resident memory stays far below the file size.
            verify: check the data CRC32 (one streaming pass). The header is always checked.

        Returns:
            the index (memory-mapped or in RAM).

        Raises:
            ValueError: not an index file, unknown version, truncated or corrupted.

        Example:
            See :meth:`save`.
        """
        path = os.fspath(path)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            bits, count, words, data_crc = _read_header(path, f.read(_HEADER_SIZE), size)
            index = cls(bits)
            if count == 0:
                return index
            if mmap:
                index._map(f, count, data_crc if verify else None, path)
            else:
                data = np.fromfile(f, dtype="<u8", count=count * words)
                if data.size != count * words:
                    raise ValueError(f"{path}: truncated data")
                index._data = data.reshape(count, words).astype(np.uint64, copy=False)
                if verify and _crc32(index._data) != data_crc:
                    raise ValueError(f"{path}: corrupted data (checksum mismatch)")
        return index

    def _map(self, f, count: int, data_crc: int | None, path: str) -> None:
        """Memory-map ``count`` codes of an open index file; check their CRC32 when given,
        releasing the pages as the checksum passes them."""
        mm = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
        self._mmap = mm
        data = np.frombuffer(mm, dtype="<u8", count=count * self.words, offset=_HEADER_SIZE)
        self._data = data.reshape(count, self.words).view(np.uint64)
        if data_crc is None:
            return
        row = 8 * self.words

        def release(lo: int, n: int) -> None:
            self._release(lo // row, n // row)

        if _crc32(self._data, _IO_BYTES, release) != data_crc:
            self._close_mmap()
            raise ValueError(f"{path}: corrupted data (checksum mismatch)")

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
        data = self._gallery()
        if data.shape[0]:
            out.add(to_faiss_bytes(data, self.bits))
        return out

    def __repr__(self) -> str:
        where = "mmap" if self._mmap is not None else "ram"
        return f"HammingIndex(bits={self.bits}, n={len(self)}, {where})"
