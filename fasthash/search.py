"""Exact Hamming search over packed binary codes: top-k, radius search and a persistent index.

CPU inputs run on the compiled engine ``fasthash._C`` (C++17, scalar POPCNT / AVX2 /
AVX-512 VPOPCNTDQ chosen from CPUID; ``FASTHASH_SIMD=scalar|avx2|avx512`` forces a level, and
an unknown or unsupported value raises ``ValueError`` at the first search), with
the GIL released and ``num_threads`` worker threads. Without ``_C`` the pure-torch reference
(:func:`fasthash.reference.topk_ref` / :func:`~fasthash.reference.radius_ref`) runs, streamed in
gallery blocks, after a one-time warning. CUDA tensors go to the Triton kernel
:func:`fasthash.ops.hamming_topk_triton.hamming_topk_cuda`.

Distances: ``d(q, x) = popcount((q XOR x) AND m)`` over all bits of the W words (the mask ``m``
is all ones when absent). :func:`fasthash.pack_codes` zeroes the padding bits of the last word,
so for packed codes this is the Hamming distance of the L-bit codes. Results are ordered by
(distance, gallery index): exactly a stable argsort of the distances.
"""

from __future__ import annotations

import mmap as _mmap
import os
import struct
import tempfile
import warnings
import zlib

import numpy as np
import torch

from .codes import ArrayLike, as_words_numpy, num_words, pack_codes

__all__ = ["hamming_topk", "hamming_radius", "HammingIndex"]

try:
    from . import _C
except ImportError:  # pragma: no cover - exercised by a subprocess test
    _C = None

_WARNED = False
_REF_BLOCK = 2048  # gallery codes per block of the reference fallback


def _warn_fallback() -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            "fasthash._C is not built: Hamming search runs the pure-torch reference "
            "(10-100x slower). Build it with 'python setup.py build_ext --inplace'.",
            RuntimeWarning,
            stacklevel=3,
        )


def _as_words(a: ArrayLike, name: str, ndim: tuple[int, ...] = (2,)) -> np.ndarray:
    """A zero-copy ``np.uint64`` view of C-contiguous packed words (the engine reads raw rows)."""
    return as_words_numpy(a, name, ndim, contiguous=True)


def _check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        rng = f"{lo} <= {name} <= {hi}" if hi is not None else f"{name} >= {lo}"
        raise ValueError(f"{name} must satisfy {rng}, got {v}")
    return v


def _threads(num_threads: int | None) -> int:
    if num_threads is None:
        return 0
    return _check_int(num_threads, "num_threads", 1)


def _prepare(queries, gallery, mask):
    q = _as_words(queries, "queries")
    x = _as_words(gallery, "gallery")
    if x.shape[1] != q.shape[1]:
        raise ValueError(
            f"gallery must have the same number of words per code as queries ({q.shape[1]}), "
            f"got {x.shape[1]} (codes of different bit lengths?)"
        )
    if q.shape[1] < 1:
        raise ValueError("queries must have at least one word per code")
    if x.shape[0] < 1:
        raise ValueError("gallery must contain at least one code")
    m = None
    if mask is not None:
        m = _as_words(mask, "mask", (1, 2))
        if m.shape[-1] != q.shape[1]:
            raise ValueError(f"mask must have {q.shape[1]} words per row, got {m.shape[-1]}")
        if m.ndim == 2 and m.shape[0] not in (1, q.shape[0]):
            raise ValueError(
                f"mask must be one mask [W] or one per query [{q.shape[0]}, W], "
                f"got {m.shape[0]} rows"
            )
        if m.ndim == 2 and m.shape[0] == 1:
            m = m[0]
    return q, x, m


def _is_cuda(*xs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in xs)


def _wants_torch(*xs) -> bool:
    return any(isinstance(t, torch.Tensor) for t in xs)


def _topk_reference(q: np.ndarray, x: np.ndarray, k: int, m: np.ndarray | None):
    """The reference streamed over gallery blocks with a running (distance, index) top-k."""
    from .reference import topk_ref

    best_d = best_i = None
    for lo in range(0, x.shape[0], _REF_BLOCK):
        blk = x[lo : lo + _REF_BLOCK]
        d, i = topk_ref(q, blk, min(k, blk.shape[0]), m)
        i = i + lo
        if best_d is not None:
            # running results first: on equal distances the earlier (smaller) index wins
            d = torch.cat([best_d, d], dim=1)
            i = torch.cat([best_i, i], dim=1)
            d, order = torch.sort(d, dim=1, stable=True)
            i = torch.gather(i, 1, order)
        best_d, best_i = d[:, :k], i[:, :k]
    return best_d.numpy().astype(np.int32), best_i.numpy().astype(np.int64)


def _radius_reference(q: np.ndarray, x: np.ndarray, r: int, m: np.ndarray | None):
    from .reference import hamming_distance_ref

    ds, ids = [[] for _ in range(q.shape[0])], [[] for _ in range(q.shape[0])]
    for lo in range(0, x.shape[0], _REF_BLOCK):
        dist = hamming_distance_ref(q, x[lo : lo + _REF_BLOCK], m).numpy()
        for a in range(q.shape[0]):
            j = np.flatnonzero(dist[a] <= r)
            ds[a].append(dist[a, j])
            ids[a].append(j + lo)
    lims = np.zeros(q.shape[0] + 1, dtype=np.int64)
    out_d, out_i = [], []
    for a in range(q.shape[0]):
        d = np.concatenate(ds[a]) if ds[a] else np.zeros(0, np.int64)
        i = np.concatenate(ids[a]) if ids[a] else np.zeros(0, np.int64)
        order = np.argsort(d, kind="stable")
        out_d.append(d[order])
        out_i.append(i[order])
        lims[a + 1] = lims[a] + len(d)
    return (
        lims,
        np.concatenate(out_d).astype(np.int32) if out_d else np.zeros(0, np.int32),
        np.concatenate(out_i).astype(np.int64) if out_i else np.zeros(0, np.int64),
    )


def _run_topk(q, x, k, m, num_threads, simd):
    if _C is None:
        _warn_fallback()
        return _topk_reference(q, x, k, m)
    return _C.topk(q, x, k, m, num_threads, simd or "")


def _run_radius(q, x, r, m, num_threads, simd):
    if _C is None:
        _warn_fallback()
        return _radius_reference(q, x, r, m)
    return _C.radius(q, x, r, m, num_threads, simd or "")


def hamming_topk(
    queries: ArrayLike,
    gallery: ArrayLike,
    k: int,
    mask: ArrayLike | None = None,
    num_threads: int | None = None,
    *,
    simd: str | None = None,
) -> tuple[ArrayLike, ArrayLike]:
    """Exact k nearest gallery codes of every query by (masked) Hamming distance.

    Args:
        queries: packed words (``np.uint64`` or ``torch.int64``, C-contiguous).
        gallery: packed words with the same number of words per code.
        k: 1 <= k <= N.
        mask: None, one mask ``[W]`` for all queries, or one per query ``[Q, W]`` (packed words):
            only bits set in the mask are counted. An all-zero mask gives distance 0 everywhere.
        num_threads: worker threads (default: every core). Results do not depend on it.
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
    k = _check_int(k, "k", 1, x.shape[0])
    d, i = _run_topk(q, x, k, m, _threads(num_threads), simd)
    if _wants_torch(queries, gallery):
        return torch.from_numpy(d), torch.from_numpy(i)
    return d, i


def hamming_radius(
    queries: ArrayLike,
    gallery: ArrayLike,
    r: int,
    mask: ArrayLike | None = None,
    num_threads: int | None = None,
    *,
    simd: str | None = None,
) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
    """Every gallery code within (masked) Hamming distance ``r`` of each query, FAISS style.

    Args:
        queries, gallery, mask, num_threads, simd: as in :func:`hamming_topk`.
        r: radius >= 0 (inclusive).

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
        queries, gallery = queries.cpu(), gallery.cpu()
        mask = mask.cpu() if isinstance(mask, torch.Tensor) else mask
    q, x, m = _prepare(queries, gallery, mask)
    r = _check_int(r, "r", 0)
    lims, d, i = _run_radius(q, x, r, m, _threads(num_threads), simd)
    if _wants_torch(queries, gallery):
        out = tuple(torch.from_numpy(a) for a in (lims, d, i))
        return tuple(t.to(device) for t in out) if device is not None else out
    return lims, d, i


# ----------------------------------------------------------------------------- HammingIndex

_MAGIC = b"FASTHASH"
_VERSION = 1
_HEADER = struct.Struct("<8sIIQII")  # magic, version, bits, count, words, data crc32
_HEADER_SIZE = 4096  # the data starts page-aligned so it can be memory-mapped and released
_SEGMENT_BYTES = 64 << 20  # memory-mapped galleries are searched 64 MiB at a time


def _crc32(buf, chunk: int = 16 << 20, release=None) -> int:
    crc = 0
    view = memoryview(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))
    for lo in range(0, len(view), chunk):
        crc = zlib.crc32(view[lo : lo + chunk], crc)
        if release is not None:
            release(lo, min(chunk, len(view) - lo))
    return crc & 0xFFFFFFFF


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
        self.bits = _check_int(bits, "bits", 1)
        self.words = num_words(self.bits)
        self._chunks: list[np.ndarray] = []
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
        """Packed words [N, W] from codes (anything pack_codes takes) or packed words.

        64-bit integer arrays with ``ceil(bits / 64)`` columns are packed words; anything else
        goes through :func:`fasthash.pack_codes` and must have ``bits`` columns.
        """
        is_int64 = (isinstance(codes, np.ndarray) and codes.dtype in (np.uint64, np.int64)) or (
            isinstance(codes, torch.Tensor) and codes.dtype in (torch.int64, torch.uint64)
        )
        if isinstance(codes, torch.Tensor) and codes.device.type != "cpu":
            codes = codes.cpu()
        if is_int64 and codes.ndim == 2 and codes.shape[1] == self.words:
            if isinstance(codes, torch.Tensor):
                codes = codes.contiguous()
            w = _as_words(codes if isinstance(codes, torch.Tensor) else np.ascontiguousarray(codes),
                          name)
            if self.bits % 64 and (w[:, -1] >> np.uint64(self.bits % 64)).any():
                raise ValueError(
                    f"{name} has bits set beyond bits={self.bits} in the last word "
                    "(codes of a different length?)"
                )
            return w
        if not isinstance(codes, (np.ndarray, torch.Tensor)):
            raise TypeError(
                f"{name} must be a numpy array or torch tensor, got {type(codes).__name__}"
            )
        if codes.ndim != 2 or codes.shape[1] != self.bits:
            raise ValueError(
                f"{name} must be codes [N, {self.bits}] or packed words [N, {self.words}], "
                f"got shape {tuple(codes.shape)}"
            )
        w = pack_codes(codes)
        return _as_words(w if isinstance(w, np.ndarray) else w.contiguous(), name)

    def add(self, codes: ArrayLike) -> None:
        """Append codes: ±1 floats, 0/1 integers, bools ``[N, bits]`` or packed words ``[N, W]``."""
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
    def _segments(self):
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

    def search(
        self,
        queries: ArrayLike,
        k: int,
        mask: ArrayLike | None = None,
        num_threads: int | None = None,
    ) -> tuple[ArrayLike, ArrayLike]:
        """Exact top-k (see :func:`hamming_topk`); queries as codes or packed words.

        Shape:
            queries ``[Q, bits]`` or ``[Q, W]`` -> distances ``[Q, k]``, indices ``[Q, k]``.

        Returns:
            (int32 distances, int64 indices) ordered by (distance, index).
        """
        n = len(self)
        if n == 0:
            raise ValueError("the index is empty: add codes before searching")
        k = _check_int(k, "k", 1, n)
        q = self._to_words(queries, "queries")
        best = None
        for lo, seg in self._segments():
            d, i = hamming_topk(q, seg, min(k, seg.shape[0]), mask, num_threads)
            if best is None and seg.shape[0] == n:
                best = (d, i)
                break
            keys = (d.astype(np.int64) << 40) | (i + lo)
            best = keys if best is None else np.sort(np.concatenate([best, keys], 1), 1)[:, :k]
        if not isinstance(best, tuple):
            best = ((best >> 40).astype(np.int32), best & ((1 << 40) - 1))
        if isinstance(queries, torch.Tensor):
            return torch.from_numpy(best[0]), torch.from_numpy(best[1])
        return best

    def range_search(
        self,
        queries: ArrayLike,
        r: int,
        mask: ArrayLike | None = None,
        num_threads: int | None = None,
    ) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
        """Radius search (see :func:`hamming_radius`); queries as codes or packed words."""
        if len(self) == 0:
            raise ValueError("the index is empty: add codes before searching")
        r = _check_int(r, "r", 0)
        q = self._to_words(queries, "queries")
        parts = []
        for lo, seg in self._segments():
            lims, d, i = hamming_radius(q, seg, r, mask, num_threads)
            parts.append((lims, d, i + lo))
        if len(parts) == 1:
            lims, d, i = parts[0]
        else:
            counts = sum(np.diff(p[0]) for p in parts)
            lims = np.zeros(q.shape[0] + 1, dtype=np.int64)
            lims[1:] = np.cumsum(counts)
            d = np.empty(lims[-1], np.int32)
            i = np.empty(lims[-1], np.int64)
            for a in range(q.shape[0]):
                da = np.concatenate([p[1][p[0][a] : p[0][a + 1]] for p in parts])
                ia = np.concatenate([p[2][p[0][a] : p[0][a + 1]] for p in parts])
                order = np.argsort(da, kind="stable")  # segments are in index order
                d[lims[a] : lims[a + 1]] = da[order]
                i[lims[a] : lims[a + 1]] = ia[order]
        if isinstance(queries, torch.Tensor):
            return torch.from_numpy(lims), torch.from_numpy(d), torch.from_numpy(i)
        return lims, d, i

    # ---- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index atomically: versioned header + words + CRC32, via a temp file + rename.

        Layout (little endian): magic ``b"FASTHASH"``, u32 version, u32 bits, u64 count, u32 words
        per code, u32 CRC32 of the data, u32 CRC32 of those 32 bytes; zero padding to 4096 bytes;
        then ``count * words`` uint64 words.
        """
        data = self._gallery()
        path = os.fspath(path)
        head = _HEADER.pack(_MAGIC, _VERSION, self.bits, data.shape[0], self.words, _crc32(data))
        head += struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)
        fd, tmp = tempfile.mkstemp(prefix=".fasthash-", dir=os.path.dirname(path) or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(head.ljust(_HEADER_SIZE, b"\0"))
                per = max(1, (16 << 20) // (8 * self.words))  # bounded extra memory
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
    def load(cls, path: str | os.PathLike, mmap: bool = True, verify: bool = True) -> HammingIndex:
        """Open a saved index; ``mmap=True`` maps the gallery instead of reading it into RAM.

        Args:
            path: a file written by :meth:`save`.
            mmap: search the file through a read-only memory map, in 64 MiB segments whose pages
                are released after use, so the resident memory stays far below the file size.
            verify: check the data CRC32 (one streaming pass). The header is always checked.

        Raises:
            ValueError: not an index file, unknown version, truncated or corrupted.
        """
        path = os.fspath(path)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEADER_SIZE)
            hs = _HEADER.size
            if len(head) < hs + 4 or head[:8] != _MAGIC:
                raise ValueError(f"{path} is not a fasthash index (bad magic or too short)")
            magic, version, bits, count, words, data_crc = _HEADER.unpack(head[:hs])
            (head_crc,) = struct.unpack("<I", head[hs : hs + 4])
            if zlib.crc32(head[:hs]) & 0xFFFFFFFF != head_crc:
                raise ValueError(f"{path}: corrupted header (checksum mismatch)")
            if version != _VERSION:
                raise ValueError(
                    f"{path}: unsupported index version {version} (expected {_VERSION})"
                )
            if bits < 1 or words != num_words(bits):
                raise ValueError(f"{path}: inconsistent header (bits={bits}, words={words})")
            expected = _HEADER_SIZE + count * words * 8
            if size != expected:
                raise ValueError(
                    f"{path}: truncated or padded file ({size} bytes, expected {expected} for "
                    f"{count} codes of {bits} bits)"
                )
            index = cls(bits)
            if count == 0:
                return index
            if mmap:
                mm = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
                index._mmap = mm
                data = np.frombuffer(mm, dtype="<u8", count=count * words, offset=_HEADER_SIZE)
                index._data = data.reshape(count, words).view(np.uint64)
                if verify:
                    per = 16 << 20

                    def release(lo, n):
                        index._release(lo // (8 * words), n // (8 * words))

                    crc = _crc32(index._data, per, release)
                    if crc != data_crc:
                        index._close_mmap()
                        raise ValueError(f"{path}: corrupted data (checksum mismatch)")
            else:
                data = np.fromfile(f, dtype="<u8", count=count * words)
                if data.size != count * words:
                    raise ValueError(f"{path}: truncated data")
                index._data = data.reshape(count, words).astype(np.uint64, copy=False)
                if verify and _crc32(index._data) != data_crc:
                    raise ValueError(f"{path}: corrupted data (checksum mismatch)")
        return index

    # ---- FAISS interop
    @classmethod
    def from_faiss(cls, index) -> HammingIndex:
        """Build from a ``faiss.IndexBinaryFlat`` (its d bits; codes are copied)."""
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
        """A ``faiss.IndexBinaryFlat`` holding the same codes (dimension ``8 * ceil(bits / 8)``)."""
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
