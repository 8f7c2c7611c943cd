"""The file layer of :class:`fasthash.index.HammingIndex`: files are untrusted input.

* Layout, version 2 (little endian). The header page, 4096 bytes: magic ``b"FASTHASH"``, u32
  version (2), u32 bits, u64 count, u32 words per code, u32 CRC32 of the codes, u32 flags (bit 0:
  the file holds ids; other bits must be 0), u32 tables (0 for a ``HammingIndex`` file; the table
  count m of a ``MIHIndex`` file, recorded and not interpreted here), u32 CRC32 of the ids
  section (0 without ids), u32 CRC32 of those 44 bytes; zero padding to 4096 bytes (checked:
  every byte of the header page is covered). Then the codes, ``count * words`` uint64 words from
  byte 4096. With ids, zero padding (checked) to the next multiple of 4096 bytes and the ids
  section: ``count`` int64 ids, every one >= 0. The file ends there; its size must equal the
  size these fields declare.
* Version 1 (still read; never written): magic, u32 version (1), u32 bits, u64 count, u32 words,
  u32 CRC32 of the codes, u32 CRC32 of those 32 bytes; zero padding to 4096 bytes; the codes. A
  version 1 file holds no ids and records no tables.
* Reading: only regular files are opened (a FIFO or device is refused before it can block), the
  declared size must equal the file size, a sparse file (holes where the declared codes should be)
  is refused before any pass over it, and the streaming pass checks the CRC32s, that no bit is
  set beyond ``bits`` and that no id is negative.
* A memory-mapped file keeps its descriptor: :meth:`MappedFile.check` compares the file's size
  with the mapped size (``os.fstat``) before every piece is touched, so a file truncated by
  another writer raises ``OSError`` instead of killing the process with SIGBUS.
* Writing goes through a temporary ``.<name>.tmp<pid>.<token>`` in the destination's directory,
  fsync and a rename; the destination keeps an existing file's mode (a new one gets the umask
  default, as ``open()``). Temporaries of dead processes (a killed save) are removed by the next
  save or load of the same path (pids of this host's pid namespace).
"""

from __future__ import annotations

import contextlib
import mmap as _mmap
import os
import re
import secrets
import stat
import struct
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from ._checks import MAX_BITS
from .codes import num_words

MAGIC = b"FASTHASH"
VERSION = 2  # the version save writes; VERSIONS are read
HEADER_V1 = struct.Struct("<8sIIQII")  # magic, version, bits, count, words, codes crc32
HEADER = struct.Struct("<8sIIQIIIII")  # version 2: ... codes crc32, flags, tables, ids crc32
VERSIONS = {1: HEADER_V1, 2: HEADER}
FLAG_IDS = 1  # flags bit 0: the file holds an ids section
HEADER_SIZE = 4096  # the data starts page-aligned so it can be memory-mapped and released
IO_BYTES = 16 << 20  # bounded extra memory while writing or checksumming
_TMP_NAME = 200  # characters of the destination's name kept in a temporary's name
_U32 = struct.Struct("<I")


# ----------------------------------------------------------------------------- header


class Header(NamedTuple):
    """The fields of a header page (a version 1 file reads as flags = tables = ids_crc = 0)."""

    version: int
    bits: int
    count: int
    words: int
    data_crc: int
    flags: int = 0
    tables: int = 0
    ids_crc: int = 0

    @property
    def has_ids(self) -> bool:
        return bool(self.flags & FLAG_IDS)

    @property
    def data_end(self) -> int:
        """The byte just past the codes."""
        return HEADER_SIZE + self.count * self.words * 8

    @property
    def ids_offset(self) -> int:
        """Where the ids section starts: the first page boundary at or after the codes."""
        return -(-self.data_end // HEADER_SIZE) * HEADER_SIZE

    @property
    def size(self) -> int:
        """The file size these fields declare."""
        return self.ids_offset + 8 * self.count if self.has_ids else self.data_end


def pack_header(bits: int, count: int, words: int, data_crc: int, flags: int = 0,
                tables: int = 0, ids_crc: int = 0) -> bytes:
    """The 4096-byte version 2 header page."""
    head = HEADER.pack(MAGIC, VERSION, bits, count, words, data_crc, flags, tables, ids_crc)
    head += _U32.pack(zlib.crc32(head))
    return head.ljust(HEADER_SIZE, b"\0")


def parse_header(path: str, head: bytes, size: int) -> Header:
    """Check a header page (version 1 or 2) against the file size; return its fields."""
    if len(head) < 12 or head[:8] != MAGIC:
        raise ValueError(f"{path} is not a fasthash index (bad magic or too short)")
    (version,) = _U32.unpack_from(head, 8)
    layout = VERSIONS.get(version)
    if layout is None:
        raise ValueError(
            f"{path}: unsupported index version {version} (this fasthash reads versions "
            f"{', '.join(map(str, VERSIONS))})"
        )
    hs = layout.size
    if len(head) < hs + 4:
        raise ValueError(f"{path} is not a fasthash index (too short)")
    (head_crc,) = _U32.unpack_from(head, hs)
    if zlib.crc32(head[:hs]) != head_crc:
        raise ValueError(f"{path}: corrupted header (checksum mismatch)")
    h = Header(*layout.unpack(head[:hs])[1:])
    if not 1 <= h.bits <= MAX_BITS or h.words != num_words(h.bits):
        raise ValueError(f"{path}: inconsistent header (bits={h.bits}, words={h.words})")
    if h.flags & ~FLAG_IDS:
        raise ValueError(f"{path}: unsupported header flags {h.flags:#x} (known: {FLAG_IDS:#x})")
    if size != h.size:
        raise ValueError(
            f"{path}: truncated or padded file ({size} bytes, expected {h.size} for "
            f"{h.count} codes of {h.bits} bits{' with ids' if h.has_ids else ''})"
        )
    if h.ids_crc and not h.has_ids:
        raise ValueError(f"{path}: corrupted header (ids CRC without ids)")
    if head.count(0, hs + 4) != HEADER_SIZE - hs - 4:
        raise ValueError(f"{path}: corrupted header (non-zero padding)")
    return h


# ----------------------------------------------------------------------------- opening


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _require_regular(path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise ValueError(
            f"{path} is not a regular file ({_kind(mode)}): an index is a file written by "
            "HammingIndex.save"
        )


def open_regular(path: str) -> int:
    """A read-only descriptor of the regular file ``path`` (anything else raises ValueError).

    The path is checked before opening (a FIFO would block the open) and the descriptor after
    it (opened non-blocking, so a path swapped for a FIFO in between cannot block either).
    """
    _require_regular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        _require_regular(path, os.fstat(fd).st_mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_allocated(fd: int, path: str, size: int, count: int) -> None:
    """Refuse a mostly sparse file: holes where the declared codes should be are never written
    by :func:`write_index`, and would make a load read (or checksum) data that is not there.
    Only files with less than half their bytes allocated are refused, so that a file system
    that stores some all-zero blocks as holes (ZFS with compression) does not trip it."""
    blocks = getattr(os.fstat(fd), "st_blocks", None)
    if blocks is None or 2 * blocks * 512 >= size or not hasattr(os, "SEEK_HOLE"):
        return
    try:
        hole = os.lseek(fd, HEADER_SIZE, os.SEEK_HOLE)
    except OSError:  # no hole reporting on this file system
        return
    if hole < size:
        raise ValueError(
            f"{path}: sparse file (a hole at byte {hole}, {blocks * 512} of {size} bytes "
            f"allocated): its {count} declared codes were never written; refusing to read it "
            "(a genuine index copied sparsely: 'cp --sparse=never' it first)"
        )


def _check_gap(fd: int, path: str, h: Header) -> None:
    """The bytes between the codes and the ids section must be zero (every byte is covered)."""
    if h.has_ids and h.ids_offset > h.data_end:
        gap = os.pread(fd, h.ids_offset - h.data_end, h.data_end)
        if gap.count(0) != h.ids_offset - h.data_end:
            raise ValueError(f"{path}: corrupted file (non-zero padding before the ids)")


def _read(fd: int, path: str, offset: int, count: int, dtype: str, what: str) -> np.ndarray:
    """``count`` items of ``dtype`` at ``offset`` of an open file, read into RAM."""
    nbytes = count * np.dtype(dtype).itemsize
    try:
        data = np.empty(count, dtype=dtype)
    except MemoryError:
        raise MemoryError(
            f"{path}: its {what} ({nbytes / 2**30:.1f} GiB) do not fit in memory; load it "
            "with mmap=True"
        ) from None
    view = memoryview(data.view(np.uint8))
    off = 0
    while off < nbytes:
        got = os.preadv(fd, [view[off : off + IO_BYTES]], offset + off)
        if got == 0:
            raise ValueError(f"{path}: truncated data")
        off += got
    return data


# ----------------------------------------------------------------------------- mapped files


class MappedFile:
    """A read-only memory map of an index file and the descriptor it was mapped from.

    The descriptor stays open (closed when the last user drops this object) so that
    :meth:`check` sees the size of the mapped file itself, even after a rename over its path.
    ``data`` views the codes ``[count, words]``, ``ids`` the ids ``[count]`` (None without).
    """

    def __init__(self, fd: int, path: str, header: Header):
        self.path, self.size = path, header.size
        self.mm = _mmap.mmap(fd, 0, access=_mmap.ACCESS_READ)
        self.fd = fd  # owned from here on (a failed map leaves it to the caller)
        count, words = header.count, header.words
        data = np.frombuffer(self.mm, dtype="<u8", count=count * words, offset=HEADER_SIZE)
        self.data = data.reshape(count, words).view(np.uint64)
        self.ids_offset, self.ids = header.ids_offset, None
        if header.has_ids:
            self.ids = np.frombuffer(self.mm, "<i8", count, self.ids_offset).view(np.int64)

    def check(self) -> None:
        """Raise ``OSError`` if the file no longer covers the mapping (touching it would SIGBUS).

        A truncation between this check and the reads that follow cannot be caught: that
        window is one segment's scan (or one copy / write chunk).
        """
        now = os.fstat(self.fd).st_size
        if now < self.size:
            raise OSError(
                f"{self.path}: the memory-mapped index file shrank from {self.size} to {now} "
                "bytes while open (truncated or rewritten in place by another writer); "
                "load it again"
            )

    def release(self, start: int, end: int) -> None:
        """Drop the mapped pages within bytes [start, end) from this process (re-read on use)."""
        if not hasattr(self.mm, "madvise"):
            return
        page = _mmap.PAGESIZE
        a = (start + page - 1) // page * page
        b = end // page * page
        if b > a:
            self.mm.madvise(_mmap.MADV_DONTNEED, a, b - a)

    def close(self) -> None:
        """Close now (only for a map nothing else uses, e.g. a failed load)."""
        self.data = self.ids = None
        with contextlib.suppress(BufferError):  # a view is still alive: it closes with it
            self.mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self, _close=os.close):  # os.close bound now: usable at interpreter exit
        if getattr(self, "fd", -1) >= 0:
            _close(self.fd)


def iter_rows(
    data: np.ndarray, per: int, mapped: MappedFile | None = None, start: int = HEADER_SIZE
) -> Iterator[tuple[int, np.ndarray]]:
    """``(lo, rows)`` pieces of ``per`` rows; for a mapped array (whose row 0 is at byte
    ``start`` of the file: the codes, or ``mapped.ids_offset`` for the ids) each piece is
    checked before use (:meth:`MappedFile.check`) and its pages released after."""
    n = data.shape[0]
    row = data.itemsize * (data.shape[1] if data.ndim == 2 else 1)
    for lo in range(0, n, per):
        if mapped is not None:
            mapped.check()
        yield lo, data[lo : lo + per]
        if mapped is not None:
            mapped.release(start + lo * row, start + min(lo + per, n) * row)


def iter_ids(ids: np.ndarray, mapped: MappedFile | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`iter_rows` over an ids array (16 MiB pieces)."""
    return iter_rows(ids, IO_BYTES // 8, mapped, mapped.ids_offset if mapped else HEADER_SIZE)


def compact(
    data: np.ndarray, ids: np.ndarray | None, keep: np.ndarray | None, mapped: MappedFile | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """New in-RAM copies of the rows ``keep`` (bool [N]; None: all) of the codes and ids (None:
    none), read piecewise (a map is checked before, and released after, every piece)."""
    n = data.shape[0] if keep is None else int(np.count_nonzero(keep))
    out = np.empty((n, data.shape[1]), dtype=np.uint64)
    out_ids = None if ids is None else np.empty(n, dtype=np.int64)
    per = max(1, IO_BYTES // (8 * data.shape[1]))
    jobs = [(out, iter_rows(data, per, mapped))]
    if ids is not None:
        jobs.append((out_ids, iter_ids(ids, mapped)))
    for dst, pieces in jobs:
        at = 0
        for lo, rows in pieces:
            part = rows if keep is None else rows[keep[lo : lo + rows.shape[0]]]
            dst[at : at + part.shape[0]] = part
            at += part.shape[0]
    return out, out_ids


def _le_bytes(rows: np.ndarray, dtype: str = "<u8") -> np.ndarray:
    """The rows as the file stores them: little-endian bytes (a view on little-endian hosts)."""
    return np.ascontiguousarray(rows, dtype=dtype).reshape(-1).view(np.uint8)


def data_pass(
    data: np.ndarray, bits: int, path: str, want_crc: int | None, mapped: MappedFile | None
) -> None:
    """One streaming pass over the codes of a file: the CRC32 (when ``want_crc`` is given) and
    the padding bits beyond ``bits``, which must be 0 (``HammingIndex.add`` rejects them)."""
    per = max(1, IO_BYTES // (8 * data.shape[1]))
    crc, tail = 0, np.uint64(0)
    for _, rows in iter_rows(data, per, mapped):
        if want_crc is not None:
            crc = zlib.crc32(_le_bytes(rows), crc)
        if bits % 64:
            tail |= np.bitwise_or.reduce(rows[:, -1])
    if want_crc is not None and crc != want_crc:
        raise ValueError(f"{path}: corrupted data (checksum mismatch)")
    if bits % 64 and int(tail) >> (bits % 64):
        raise ValueError(
            f"{path}: codes have bits set beyond bits={bits} in the last word (a file not "
            "written by HammingIndex.save, or codes of a different length)"
        )


def ids_pass(ids: np.ndarray, path: str, want_crc: int | None, mapped: MappedFile | None) -> None:
    """One streaming pass over the ids section: its CRC32 (when given) and that no id is < 0."""
    crc, low = 0, 0
    for _, part in iter_ids(ids, mapped):
        if want_crc is not None:
            crc = zlib.crc32(_le_bytes(part, "<i8"), crc)
        low = min(low, int(part.min()))
    if want_crc is not None and crc != want_crc:
        raise ValueError(f"{path}: corrupted ids (checksum mismatch)")
    if low < 0:
        raise ValueError(f"{path}: negative id {low} in the ids section (ids are >= 0)")


class Loaded(NamedTuple):
    """What :func:`read_index` found; ``ids`` is None without ids, ``mapped`` when in RAM."""

    header: Header
    data: np.ndarray
    ids: np.ndarray | None
    mapped: MappedFile | None


def read_index(path: str, mmap: bool, verify: bool) -> Loaded:
    """Open, check and map (or read) an index file (see ``HammingIndex.load`` for the checks)."""
    remove_stale_temps(path)
    fd = open_regular(path)
    mapped = None
    try:
        size = os.fstat(fd).st_size
        h = parse_header(path, os.pread(fd, HEADER_SIZE, 0), size)
        check_allocated(fd, path, size, h.count)
        _check_gap(fd, path, h)
        data, ids = np.zeros((0, h.words), np.uint64), np.zeros(0, np.int64) if h.has_ids else None
        if h.count and mmap:
            mapped = MappedFile(fd, path, h)
            data, ids = mapped.data, mapped.ids
            if verify:
                data_pass(data, h.bits, path, h.data_crc, mapped)
                if ids is not None:
                    ids_pass(ids, path, h.ids_crc, mapped)
        elif h.count:
            data = _read(fd, path, HEADER_SIZE, h.count * h.words, "<u8", f"{h.count} codes")
            data = data.reshape(h.count, h.words).astype(np.uint64, copy=False)
            data_pass(data, h.bits, path, h.data_crc if verify else None, None)
            if h.has_ids:
                raw = _read(fd, path, h.ids_offset, h.count, "<i8", f"{h.count} ids")
                ids = raw.astype(np.int64, copy=False)
                ids_pass(ids, path, h.ids_crc if verify else None, None)
    except BaseException:
        if mapped is not None:
            mapped.close()
        else:
            os.close(fd)
        raise
    if mapped is None:
        os.close(fd)
    return Loaded(h, data, ids, mapped)


# ----------------------------------------------------------------------------- writing


def _temp_pattern(path: str) -> tuple[str, re.Pattern]:
    folder, name = os.path.split(path)
    base = re.escape(name[:_TMP_NAME])
    return folder or ".", re.compile(rf"\.{base}\.tmp(\d+)\.[0-9a-f]{{8}}")


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (of this pid namespace) exists and is not a zombie."""
    if os.name != "posix" or pid == os.getpid():
        return True  # os.kill(pid, 0) would terminate it on Windows: never guess there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def remove_stale_temps(path: str) -> None:
    """Remove the temporaries that saves of ``path`` by dead processes left behind."""
    folder, pattern = _temp_pattern(path)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):  # a read-only folder, or removed meanwhile
                os.unlink(os.path.join(folder, name))


def _existing_mode(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None


def _write_pieces(f, pieces: Iterator[tuple[int, np.ndarray]], dtype: str) -> int:
    """Write every piece as little-endian bytes; return their CRC32."""
    crc = 0
    for _, part in pieces:
        raw = _le_bytes(part, dtype)
        crc = zlib.crc32(raw, crc)
        f.write(raw)
    return crc


def write_index(
    path: str, bits: int, data: np.ndarray, mapped: MappedFile | None,
    ids: np.ndarray | None = None, tables: int = 0,
) -> None:
    """Write ``data [count, words]`` (and ``ids [count]`` when given: the file then has an ids
    section, even when empty) as a version 2 index file at ``path``, atomically: a temporary in
    the same folder (header page, the words with their CRC32 in one pass, the ids likewise, then
    the header again with the CRCs), fsync, rename."""
    remove_stale_temps(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name[:_TMP_NAME]}.tmp{os.getpid()}.{secrets.token_hex(4)}")
    mode = _existing_mode(path)
    count, words = data.shape
    flags = 0 if ids is None else FLAG_IDS
    h = Header(VERSION, bits, count, words, 0, flags, tables)
    try:
        with open(tmp, "xb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(pack_header(*h[1:]))
            pieces = iter_rows(data, max(1, IO_BYTES // (8 * words)), mapped)
            h = h._replace(data_crc=_write_pieces(f, pieces, "<u8"))
            if ids is not None:
                f.write(bytes(h.ids_offset - h.data_end))
                h = h._replace(ids_crc=_write_pieces(f, iter_ids(ids, mapped), "<i8"))
            f.seek(0)
            f.write(pack_header(*h[1:]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
