"""The file layer of :class:`fasthash.index.HammingIndex`: files are untrusted input.

* Layout (little endian): magic ``b"FASTHASH"``, u32 version, u32 bits, u64 count, u32 words per
  code, u32 CRC32 of the data, u32 CRC32 of those 32 bytes; zero padding to 4096 bytes (checked:
  every byte of the header page is covered); then ``count * words`` uint64 words.
* Reading: only regular files are opened (a FIFO or device is refused before it can block), the
  declared size must equal the file size, a sparse file (holes where the declared codes should be)
  is refused before any pass over it, and the streaming data pass checks the CRC32 and that no
  bit is set beyond ``bits``.
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

import numpy as np

from ._checks import MAX_BITS
from .codes import num_words

MAGIC = b"FASTHASH"
VERSION = 1
HEADER = struct.Struct("<8sIIQII")  # magic, version, bits, count, words, data crc32
HEADER_SIZE = 4096  # the data starts page-aligned so it can be memory-mapped and released
IO_BYTES = 16 << 20  # bounded extra memory while writing or checksumming
_TMP_NAME = 200  # characters of the destination's name kept in a temporary's name


# ----------------------------------------------------------------------------- header


def pack_header(bits: int, count: int, words: int, data_crc: int) -> bytes:
    """The 4096-byte header page."""
    head = HEADER.pack(MAGIC, VERSION, bits, count, words, data_crc)
    head += struct.pack("<I", zlib.crc32(head))
    return head.ljust(HEADER_SIZE, b"\0")


def parse_header(path: str, head: bytes, size: int) -> tuple[int, int, int, int]:
    """Check a header page against the file size; return ``(bits, count, words, data_crc)``."""
    hs = HEADER.size
    if len(head) < hs + 4 or head[:8] != MAGIC:
        raise ValueError(f"{path} is not a fasthash index (bad magic or too short)")
    _, version, bits, count, words, data_crc = HEADER.unpack(head[:hs])
    (head_crc,) = struct.unpack("<I", head[hs : hs + 4])
    if zlib.crc32(head[:hs]) != head_crc:
        raise ValueError(f"{path}: corrupted header (checksum mismatch)")
    if version != VERSION:
        raise ValueError(f"{path}: unsupported index version {version} (expected {VERSION})")
    if not 1 <= bits <= MAX_BITS or words != num_words(bits):
        raise ValueError(f"{path}: inconsistent header (bits={bits}, words={words})")
    expected = HEADER_SIZE + count * words * 8
    if size != expected:
        raise ValueError(
            f"{path}: truncated or padded file ({size} bytes, expected {expected} for "
            f"{count} codes of {bits} bits)"
        )
    if head.count(0, hs + 4) != HEADER_SIZE - hs - 4:
        raise ValueError(f"{path}: corrupted header (non-zero padding)")
    return bits, count, words, data_crc


# ----------------------------------------------------------------------------- opening


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


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


def read_words(fd: int, path: str, count: int, words: int) -> np.ndarray:
    """The ``[count, words]`` codes of an open index file, read into RAM."""
    nbytes = count * words * 8
    try:
        data = np.empty(count * words, dtype="<u8")
    except MemoryError:
        raise MemoryError(
            f"{path}: its {count} codes ({nbytes / 2**30:.1f} GiB) do not fit in memory; "
            "load it with mmap=True"
        ) from None
    view = memoryview(data.view(np.uint8))
    off = 0
    while off < nbytes:
        got = os.preadv(fd, [view[off : off + IO_BYTES]], HEADER_SIZE + off)
        if got == 0:
            raise ValueError(f"{path}: truncated data")
        off += got
    return data.reshape(count, words).astype(np.uint64, copy=False)


# ----------------------------------------------------------------------------- mapped files


class MappedFile:
    """A read-only memory map of an index file and the descriptor it was mapped from.

    The descriptor stays open (closed when the last user drops this object) so that
    :meth:`check` sees the size of the mapped file itself, even after a rename over its path.
    """

    def __init__(self, fd: int, path: str, count: int, words: int):
        self.path, self.row = path, 8 * words
        self.size = HEADER_SIZE + count * self.row
        self.mm = _mmap.mmap(fd, 0, access=_mmap.ACCESS_READ)
        self.fd = fd  # owned from here on (a failed map leaves it to the caller)
        data = np.frombuffer(self.mm, dtype="<u8", count=count * words, offset=HEADER_SIZE)
        self.data = data.reshape(count, words).view(np.uint64)

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

    def release(self, lo: int, count: int) -> None:
        """Drop the mapped pages of codes [lo, lo + count) from this process (re-read on use)."""
        if not hasattr(self.mm, "madvise"):
            return
        start = HEADER_SIZE + lo * self.row
        end = start + count * self.row
        page = _mmap.PAGESIZE
        a = (start + page - 1) // page * page
        b = end // page * page
        if b > a:
            self.mm.madvise(_mmap.MADV_DONTNEED, a, b - a)

    def close(self) -> None:
        """Close now (only for a map nothing else uses, e.g. a failed load)."""
        self.data = None
        with contextlib.suppress(BufferError):  # a view is still alive: it closes with it
            self.mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self, _close=os.close):  # os.close bound now: usable at interpreter exit
        if getattr(self, "fd", -1) >= 0:
            _close(self.fd)


def iter_rows(
    data: np.ndarray, per: int, mapped: MappedFile | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """``(lo, rows)`` pieces of ``per`` rows; for a mapped gallery each piece is checked before
    use (:meth:`MappedFile.check`) and its pages released after."""
    n = data.shape[0]
    for lo in range(0, n, per):
        if mapped is not None:
            mapped.check()
        yield lo, data[lo : lo + per]
        if mapped is not None:
            mapped.release(lo, min(per, n - lo))


def _le_bytes(rows: np.ndarray) -> np.ndarray:
    """The rows as the file stores them: little-endian bytes (a view on little-endian hosts)."""
    return np.ascontiguousarray(rows, dtype="<u8").reshape(-1).view(np.uint8)


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


def write_index(path: str, bits: int, data: np.ndarray, mapped: MappedFile | None) -> None:
    """Write ``data [count, words]`` as an index file at ``path``, atomically: a temporary in the
    same folder (header page, then the words with their CRC32 in one pass, then the header
    again with the CRC), fsync, rename."""
    remove_stale_temps(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name[:_TMP_NAME]}.tmp{os.getpid()}.{secrets.token_hex(4)}")
    mode = _existing_mode(path)
    count, words = data.shape
    try:
        with open(tmp, "xb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(pack_header(bits, count, words, 0))
            crc = 0
            for _, rows in iter_rows(data, max(1, IO_BYTES // (8 * words)), mapped):
                raw = _le_bytes(rows)
                crc = zlib.crc32(raw, crc)
                f.write(raw)
            f.seek(0)
            f.write(pack_header(bits, count, words, crc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
