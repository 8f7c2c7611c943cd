"""The files brcd writes and reads back (checkpoints, the view cache, the demo's eval views):
plain data only, a checksum, written atomically, verified and loaded with ``weights_only=True``.

Format: the bytes of ``torch.save(payload)`` followed by a 48-byte trailer, the 16-byte magic
:data:`MAGIC` and the SHA-256 digest of those payload bytes. ``torch.load`` ignores the trailer,
so a brcd file is still an ordinary torch file to other tools; brcd itself loads a file only
after the digest matches, and only with ``weights_only=True`` (tensors, dicts, lists, tuples,
str and numbers: nothing in a file can run code). The payload is serialised in memory, so
the same payload always gives the same bytes, whatever the path or process (:func:`file_digest`
reads the checksum, e.g. to tell whether a run's inputs changed).

Files without the trailer (a damaged trailer, or a file written by brcd before checksums or by
something else) are REFUSED with a ``ValueError``: brcd cannot tell an old file from a damaged
one. To adopt a file you trust, re-save it once::

    brcd.files.save_file(torch.load(path, weights_only=True), path)
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["MAGIC", "save_file", "load_file", "file_digest", "check_plain", "write_atomic",
           "check_folder", "check_output"]

MAGIC = b"brcd-sha256-v1\n\x00"  # 16 bytes, then the 32-byte digest
_TRAILER = len(MAGIC) + 32
_SCALARS = (str, int, float, bool, type(None))


def check_plain(obj: Any, where: str = "payload") -> None:
    """Raise ``TypeError`` naming the entry unless ``obj`` is plain data: tensors, dicts (str or
    int keys), lists, tuples, str, int, float, bool and None (what ``weights_only=True`` loads).

    Example:
        >>> check_plain({"w": torch.zeros(2), "cfg": {"lr": 0.1, "sizes": [1, 2]}})
    """
    if isinstance(obj, torch.Tensor) or type(obj) in _SCALARS:
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; brcd files use str "
                                "or int keys")
            check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple, torch.Size):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; brcd files hold only tensors, dicts, "
                    "lists, tuples, str, int, float, bool and None (loadable with "
                    "weights_only=True)")


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temporary file next to ``path``, flush it to disk, then rename it to
    ``path`` (a reader never sees half a file; a failed write leaves no temporary behind).

    Returns:
        ``path``.
    """
    path = Path(path)
    check_output(path, "output")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_file(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` (plain data, see :func:`check_plain`) with its checksum trailer, through a
    temporary file and an atomic rename (:func:`write_atomic`).

    Returns:
        ``path``.
    """
    check_plain(obj)
    # Serialised in memory: torch.save names its zip records after the file it writes to, so
    # saving straight to the temporary file would make the bytes, and the checksum, depend on
    # the writing process's pid. This way equal payloads give equal files (file_digest).
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.write(MAGIC + hashlib.sha256(data).digest())
    return write_atomic(path, write)


def file_digest(path: str | Path, what: str = "file") -> str:
    """The SHA-256 of a :func:`save_file` file's payload, read from its trailer (the payload is
    not re-hashed: :func:`load_file` verifies it whenever the file is read).

    Args:
        path: the file. what: what it is, for messages.

    Returns:
        64 hex digits; equal for two files exactly when their payloads are equal.

    Raises:
        ValueError: naming the path, when it is missing or has no brcd trailer.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     len(file_digest(save_file({"x": torch.zeros(2)}, d + "/a.pt")))
        64
    """
    path = Path(path)
    name = f"{what} {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{name} does not exist")
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - _TRAILER))
        trailer = fh.read()
    _check_trailer(name, size, trailer)
    return trailer[len(MAGIC):].hex()


def _check_trailer(name: str, size: int, trailer: bytes) -> None:
    """Refuse a file of ``size`` bytes whose last 48 bytes ``trailer`` are no brcd trailer."""
    if size < _TRAILER or trailer[:len(MAGIC)] != MAGIC:
        raise ValueError(
            f"{name} is not a checksummed brcd file ({size} bytes: truncated, empty, damaged, "
            "not written by brcd, or written by a brcd without checksums; to adopt a file you "
            "trust, re-save it with brcd.files.save_file)")


def _usable(path: Path, target: Path, what: str, writable: bool) -> None:
    """The first existing path at or above ``path`` must be a (writable) folder."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        at = "" if p == target else f": {str(p)!r}"
        raise ValueError(f"{what} {str(target)!r}{at} is a file, not a folder")
    if writable and not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(target)!r}: folder {str(p)!r} is not writable")


def check_folder(path: str | Path, what: str) -> Path:
    """Raise ``ValueError`` naming ``what`` unless ``path`` is a folder or could be made one (no
    part of it is a file). Returns ``Path(path)``."""
    path = Path(path)
    _usable(path, path, what, writable=False)
    return path


def check_output(path: str | Path, what: str) -> Path:
    """Raise ``ValueError`` naming ``what`` unless ``path`` can be written as a file: it is not
    a folder, no part of its folder is a file, and the nearest existing folder is writable.
    Returns ``Path(path)``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder, not a file")
    _usable(path.parent, path, what, writable=True)
    return path


def _first_line(exc: BaseException) -> str:
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    return lines[0] if lines else type(exc).__name__


# load_file(memo=True): the view cache, a feature bank and the eval views/features of one demo
_MEMO_SIZE = 4
_MEMO: dict[tuple, Any] = {}


def load_file(path: str | Path, what: str = "file", *, memo: bool = False) -> Any:
    """Verify the checksum of a file written by :func:`save_file`, then load it on the CPU with
    ``weights_only=True``.

    Args:
        path: the file. what: what it is, for messages (``"checkpoint"``, ``"view cache"``).
        memo: keep the payload of the last few such loads in this process and return it again
            while the file's size and mtime are unchanged (for large read-only caches that
            every job of a worker process reads; the caller must not modify the payload).

    Returns:
        the payload.

    Raises:
        ValueError: naming the path, when the file is missing, truncated, empty, damaged, has
            no brcd checksum, or holds anything but plain data.
    """
    path = Path(path)
    name = f"{what} {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{name} does not exist")
    if memo:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _MEMO:
            _MEMO[key] = load_file(path, what)
            while len(_MEMO) > _MEMO_SIZE:
                _MEMO.pop(next(iter(_MEMO)))
        return _MEMO[key]
    size = path.stat().st_size
    with open(path, "rb") as fh:
        data = fh.read(max(0, size - _TRAILER))
        trailer = fh.read()
    _check_trailer(name, size, trailer)
    if hashlib.sha256(data).digest() != trailer[len(MAGIC):]:
        raise ValueError(f"{name} is damaged: its SHA-256 checksum does not match its contents")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - anything a checksummed but malformed file raises
        raise ValueError(f"{name} was refused: it holds more than tensors and plain data, or is "
                         f"malformed (weights_only=True load: {_first_line(err)})") from err
