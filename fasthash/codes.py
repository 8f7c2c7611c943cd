"""Binary codes: the sign straight-through estimator, packing to uint64 words and THE
packed-input validator.

Layout (used everywhere in fasthash, on CPU and GPU): bit ``j`` of an L-bit code is bit
``j % 64`` (least significant first) of word ``j // 64``; a code occupies ``ceil(L / 64)`` words
and the padding bits of the last word are 0. A ``+1`` (or 1 / True) sets the bit, ``-1`` (or 0 /
False) clears it, so the Hamming distance of two ±1 codes equals ``popcount(a XOR b)``.

NumPy inputs give ``np.uint64`` words. Torch inputs give ``torch.int64`` words on the same device
(the same 64 bits; torch's uint64 supports too few ops), which every fasthash op accepts.
Every op that takes packed words checks them with :func:`as_words` (one array) or
:func:`as_search_words` (queries, gallery and mask together), so the messages are the same
everywhere.

The FAISS binary layout is one uint8 per 8 bits, least significant bit first, i.e. exactly the
little-endian bytes of our words: :func:`to_faiss_bytes` / :func:`from_faiss_bytes` convert.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

from ._checks import check_bits, check_device

ArrayLike = Union[np.ndarray, torch.Tensor]  # noqa: UP007 - a runtime alias on 3.10

__all__ = [
    "sign_ste",
    "pack_codes",
    "unpack_codes",
    "to_faiss_bytes",
    "from_faiss_bytes",
    "num_words",
    "as_words",
    "as_search_words",
]


def num_words(bits: int) -> int:
    """Number of uint64 words that hold an L-bit code: ``ceil(bits / 64)``.

    Example:
        >>> num_words(64), num_words(65)
        (1, 2)
    """
    return (check_bits(bits) + 63) // 64


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Sign with a straight-through gradient: ±1 forward (``sign(0) = +1``), identity backward.

    Args:
        x: real-valued tensor (typically ``sigmoid(logits) - 0.5`` or logits).

    Shape:
        any; the output has the shape and dtype of ``x``.

    Returns:
        ``torch.where(x >= 0, 1, -1)`` whose gradient w.r.t. ``x`` is the identity.

    Example:
        >>> x = torch.tensor([-0.2, 0.0, 0.7], requires_grad=True)
        >>> b = sign_ste(x); b.sum().backward()
        >>> b.tolist(), x.grad.tolist()
        ([-1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    hard = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    return x + (hard - x).detach()


def _to_bits(codes: ArrayLike, name: str) -> ArrayLike:
    """Validate codes and return a bool array/tensor of the same kind (True = bit set)."""
    if isinstance(codes, torch.Tensor):
        check_device(codes, name)
        if codes.ndim != 2:
            raise ValueError(f"{name} must be 2-D [N, L], got shape {tuple(codes.shape)}")
        if codes.dtype == torch.bool:
            return codes
        c = codes.detach()
        if c.is_floating_point():
            if not torch.isfinite(c).all():
                raise ValueError(f"{name} contains NaN or inf; expected ±1 values")
            if not ((c == 1) | (c == -1)).all():
                raise ValueError(
                    f"{name} (floating point) must hold only -1 and +1; binarise first, "
                    "e.g. with fasthash.sign_ste or torch.where(x >= 0, 1.0, -1.0)"
                )
            return c > 0
        if c.is_complex():
            raise TypeError(f"{name} must be real (±1 floats, 0/1 integers or bools)")
        if not ((c == 0) | (c == 1)).all():
            raise ValueError(f"{name} (integer) must hold only 0 and 1")
        return c == 1
    if isinstance(codes, np.ndarray):
        if codes.ndim != 2:
            raise ValueError(f"{name} must be 2-D [N, L], got shape {codes.shape}")
        if codes.dtype == np.bool_:
            return codes
        if np.issubdtype(codes.dtype, np.floating):
            if not np.isfinite(codes).all():
                raise ValueError(f"{name} contains NaN or inf; expected ±1 values")
            if not ((codes == 1) | (codes == -1)).all():
                raise ValueError(
                    f"{name} (floating point) must hold only -1 and +1; binarise first, "
                    "e.g. np.where(x >= 0, 1.0, -1.0)"
                )
            return codes > 0
        if np.issubdtype(codes.dtype, np.integer):
            if not ((codes == 0) | (codes == 1)).all():
                raise ValueError(f"{name} (integer) must hold only 0 and 1")
            return codes == 1
        raise TypeError(f"{name} must hold ±1 floats, 0/1 integers or bools, got {codes.dtype}")
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(codes).__name__}")


def pack_codes(codes: ArrayLike, bits: int | None = None) -> ArrayLike:
    """Pack binary codes into uint64 words (bit j -> bit j % 64 of word j // 64).

    Args:
        codes: ±1 floats, {0, 1} integers or bools; numpy array or torch tensor (any device).
        bits: the code length L; defaults to ``codes.shape[1]`` and must equal it when given.

    Shape:
        codes ``[N, L]`` -> words ``[N, ceil(L / 64)]``.

    Returns:
        ``np.uint64`` words for numpy input; ``torch.int64`` words (same bits) on the input's
        device for torch input.

    Example:
        >>> pack_codes(np.array([[1, -1, 1.0]]))
        array([[5]], dtype=uint64)
    """
    return _pack(codes, bits, "codes")


def _pack(codes: ArrayLike, bits: int | None, name: str) -> ArrayLike:
    """:func:`pack_codes` with ``name`` (the caller's argument) in its messages."""
    b = _to_bits(codes, name)
    n, length = b.shape
    if bits is not None and check_bits(bits) != length:
        raise ValueError(f"bits must equal {name}.shape[1] = {length}, got {bits}")
    if length < 1:
        raise ValueError(f"{name} must have at least one bit (shape [N, L] with L >= 1)")
    w = num_words(length)
    pad = w * 64 - length
    if isinstance(b, np.ndarray):
        if pad:
            b = np.concatenate([b, np.zeros((n, pad), dtype=bool)], axis=1)
        packed = np.packbits(b.reshape(n, w * 8, 8), axis=-1, bitorder="little")
        return np.ascontiguousarray(packed.reshape(n, w * 8)).view("<u8").astype(np.uint64)
    # Torch path (any device): the bits of a word are distinct powers of two, so their sum is
    # their OR; 1 << 63 is the int64 minimum and the sum still has the intended bit pattern.
    bb = b.to(torch.int64)
    if pad:
        bb = torch.nn.functional.pad(bb, (0, pad))
    shifts = torch.arange(64, device=bb.device, dtype=torch.int64)
    weights = torch.bitwise_left_shift(torch.ones_like(shifts), shifts)
    return (bb.reshape(n, w, 64) * weights).sum(dim=-1).contiguous()


def unpack_codes(words: ArrayLike, bits: int) -> ArrayLike:
    """Unpack uint64 words into ±1 float32 codes (inverse of :func:`pack_codes`).

    Args:
        words: ``np.uint64`` array or ``torch.int64`` / ``torch.uint64`` tensor.
        bits: the code length L.

    Shape:
        words ``[N, ceil(L / 64)]`` -> codes ``[N, L]``.

    Returns:
        float32 ±1 codes, numpy for numpy input, torch (same device) for torch input.

    Example:
        >>> unpack_codes(np.array([[5]], dtype=np.uint64), 3)
        array([[ 1., -1.,  1.]], dtype=float32)
    """
    # padding bits are ignored here (as always), so no tail check
    bits = check_bits(bits)
    to = "torch" if isinstance(words, torch.Tensor) else "numpy"
    w = as_words(words, "words", bits=bits, to=to, check_tail=False)
    n, nw = w.shape  # explicit shapes: zero rows give [0, bits]
    if isinstance(w, np.ndarray):
        u8 = np.ascontiguousarray(w).view(np.uint8).reshape(n, 8 * nw)
        b = np.unpackbits(u8, axis=1, bitorder="little")[:, :bits]
        return np.where(b.astype(bool), np.float32(1), np.float32(-1))
    shifts = torch.arange(64, device=w.device, dtype=torch.int64)
    b = torch.bitwise_and(torch.bitwise_right_shift(w.unsqueeze(-1), shifts), 1)
    b = b.reshape(n, 64 * nw)[:, :bits]
    return b.to(torch.float32) * 2 - 1


def as_words(
    words: ArrayLike,
    name: str = "words",
    *,
    bits: int | None = None,
    ndim: tuple[int, ...] = (2,),
    contiguous: bool = False,
    to: str = "numpy",
    check_tail: bool = True,
) -> ArrayLike:
    """THE packed-input validator: check packed words and view them without copying.

    Every fasthash entry point that takes packed codes (search, the index, distances, the Triton
    launchers, the references, FAISS conversion) goes through this function, so a bad argument
    gets the same message everywhere.

    Args:
        words: ``np.uint64`` / ``np.int64`` arrays or ``torch.int64`` / ``torch.uint64`` tensors
            (the same 64 bits are reinterpreted, never cast).
        name: the argument name used in error messages.
        bits: the code length L: rows must have ``ceil(L / 64)`` words and, with
            ``check_tail``, no bit may be set beyond L in the last word.
        ndim: the accepted numbers of dimensions (``(2,)`` for ``[N, W]``, ``(1, 2)`` for masks).
        contiguous: require C-contiguous input (the compiled engine reads raw rows).
        to: ``"numpy"`` (an ``np.uint64`` view; tensors must be on the CPU) or ``"torch"``
            (a ``torch.int64`` tensor on the input's device; numpy input is shared, and copied
            only when it is not C-contiguous).
        check_tail: with ``bits``, reject set bits beyond L (codes of a longer length).

    Shape:
        unchanged.

    Returns:
        the words as ``np.uint64`` (``to="numpy"``) or ``torch.int64`` (``to="torch"``).

    Example:
        >>> as_words(torch.tensor([[-1]])).tolist()
        [[18446744073709551615]]
        >>> as_words(np.array([[5]], np.uint64), to="torch")
        tensor([[5]])
    """
    if to not in ("numpy", "torch"):
        raise ValueError(f"to must be 'numpy' or 'torch', got {to!r}")
    if isinstance(words, torch.Tensor):
        if words.dtype not in (torch.int64, torch.uint64):
            raise TypeError(
                f"{name} must be packed words (torch.int64 or np.uint64), got dtype {words.dtype}"
            )
        check_device(words, name)
        if to == "numpy" and words.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU like the other inputs, got {words.device}")
        if contiguous and not words.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous())")
        t = words.detach().view(torch.int64)
        out = t.numpy().view(np.uint64) if to == "numpy" else t
    elif isinstance(words, np.ndarray):
        if words.dtype not in (np.uint64, np.int64):
            raise TypeError(
                f"{name} must be packed words (np.uint64 or torch.int64), got dtype {words.dtype}"
            )
        if contiguous and not words.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
        if to == "numpy":
            out = words.view(np.uint64)
        else:
            out = torch.from_numpy(np.ascontiguousarray(words).view(np.int64))
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(words).__name__}")
    if out.ndim not in ndim:
        want = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"{name} must be {want} packed words, got shape {tuple(out.shape)}")
    if bits is not None:
        _check_bits(out, check_bits(bits), name, check_tail)
    return out


def _check_bits(w: ArrayLike, bits: int, name: str, check_tail: bool) -> None:
    if w.shape[-1] != num_words(bits):
        raise ValueError(
            f"{name} must have ceil(bits / 64) = {num_words(bits)} words per row for bits={bits}, "
            f"got {w.shape[-1]}"
        )
    if check_tail and has_stray_bits(w, bits):
        raise ValueError(
            f"{name} has bits set beyond bits={bits} in the last word "
            "(codes of a different length?)"
        )


def has_stray_bits(w: ArrayLike, bits: int) -> bool:
    """Whether any row of words ``w [..., W]`` sets a bit at or beyond ``bits`` (the padding of
    the last word, which must be 0)."""
    if not bits % 64 or not w.shape[0]:
        return False
    last = w[..., -1]
    if isinstance(last, np.ndarray):
        return bool((last >> np.uint64(bits % 64)).any())
    # arithmetic shift of int64: any set bit at or above bits % 64 leaves a non-zero
    return bool((last >> (bits % 64)).ne(0).any())


def as_search_words(
    queries: ArrayLike,
    gallery: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    names: tuple[str, str, str] = ("queries", "gallery", "mask"),
    to: str = "numpy",
    contiguous: bool = False,
    device: torch.device | None = None,
    nonempty: bool = True,
) -> tuple[ArrayLike, ArrayLike, ArrayLike | None]:
    """Validate the (queries, gallery, mask) words of a search or distance call together.

    Each argument goes through :func:`as_words`; then the gallery must have the queries' words
    per code (at least one) and, with ``nonempty``, at least one code; the mask is one mask
    ``[W]`` or one per query ``[Q, W]``.

    Args:
        queries, gallery, mask: packed words (mask may be None).
        names: the three argument names used in error messages.
        to, contiguous: as in :func:`as_words`.
        device: ``to="torch"`` only: move every input to this device. Without it, torch inputs
            must all be on the queries' device.
        nonempty: require at least one gallery code.

    Shape:
        queries ``[Q, W]``, gallery ``[N, W]``, mask ``[W]`` or ``[Q, W]`` -> queries, gallery and
        the mask as ``[1, W]`` or ``[Q, W]`` (None without a mask).

    Returns:
        ``(queries, gallery, mask)`` words of the requested kind.

    Example:
        >>> q, x, m = as_search_words(np.zeros((2, 1), np.uint64), np.ones((3, 1), np.uint64),
        ...                           np.ones(1, np.uint64))
        >>> q.shape, x.shape, m.shape
        ((2, 1), (3, 1), (1, 1))
    """
    qn, xn, mn = names
    q = as_words(queries, qn, contiguous=contiguous, to=to)
    x = as_words(gallery, xn, contiguous=contiguous, to=to)
    q, x = _same_device(q, x, xn, qn, device)
    if x.shape[1] != q.shape[1]:
        raise ValueError(
            f"{xn} must have the same number of words per code as {qn} ({q.shape[1]}), "
            f"got {x.shape[1]} (codes of different bit lengths?)"
        )
    if q.shape[1] < 1:
        raise ValueError(f"{qn} must have at least one word per code")
    if nonempty and x.shape[0] < 1:
        raise ValueError(f"{xn} must contain at least one code")
    if mask is None:
        return q, x, None
    m = as_words(mask, mn, ndim=(1, 2), contiguous=contiguous, to=to)
    q, m = _same_device(q, m, mn, qn, device)
    if m.shape[-1] != q.shape[1]:
        raise ValueError(f"{mn} must have {q.shape[1]} words per row, got {m.shape[-1]}")
    if m.ndim == 2 and m.shape[0] not in (1, q.shape[0]):
        raise ValueError(
            f"{mn} must be one mask [W] or one per query [{q.shape[0]}, W], got {m.shape[0]} rows"
        )
    return q, x, m.reshape(1, -1) if m.ndim == 1 else m


def _same_device(q, v, name: str, q_name: str, device):
    if not isinstance(q, torch.Tensor):
        return q, v
    if device is not None:
        return q.to(device), v.to(device)
    if v.device != q.device:
        raise ValueError(f"{name} must be on {q.device} like {q_name}, got {v.device}")
    return q, v


def to_faiss_bytes(words: ArrayLike, bits: int) -> np.ndarray:
    """Convert packed words to FAISS's binary layout (uint8, ``ceil(L / 8)`` bytes per code).

    FAISS needs a dimension divisible by 8: for L not a multiple of 8 the index dimension is
    ``8 * ceil(L / 8)`` and the extra bits are 0 in every code, so distances are unchanged.

    Args:
        words: packed words (see :func:`pack_codes`).
        bits: the code length L.

    Shape:
        ``[N, ceil(L / 64)]`` -> ``[N, ceil(L / 8)]``.

    Returns:
        C-contiguous ``np.uint8`` array for ``faiss.IndexBinaryFlat(8 * ceil(L / 8))``.

    Example:
        >>> to_faiss_bytes(np.array([[5]], dtype=np.uint64), 3)
        array([[5]], dtype=uint8)
    """
    # check_tail=False: the historical contract copies whatever the padding holds
    bits = check_bits(bits)
    arr = as_words(words, "words", bits=bits, check_tail=False)
    nbytes = (bits + 7) // 8
    return np.ascontiguousarray(np.ascontiguousarray(arr).view(np.uint8)[:, :nbytes])


def from_faiss_bytes(codes_u8: np.ndarray, bits: int) -> np.ndarray:
    """Convert FAISS binary codes (uint8, LSB first) to packed uint64 words.

    Args:
        codes_u8: ``np.uint8`` array ``[N, ceil(L / 8)]`` as stored by ``IndexBinaryFlat``.
        bits: the code length L; bits beyond L must be 0.

    Shape:
        ``[N, ceil(L / 8)]`` -> ``[N, ceil(L / 64)]``.

    Returns:
        ``np.uint64`` words.

    Example:
        >>> from_faiss_bytes(np.array([[5]], dtype=np.uint8), 3)
        array([[5]], dtype=uint64)
    """
    if not isinstance(codes_u8, np.ndarray) or codes_u8.dtype != np.uint8:
        raise TypeError("codes_u8 must be a numpy uint8 array")
    if codes_u8.ndim != 2:
        raise ValueError(f"codes_u8 must be 2-D [N, bytes], got shape {codes_u8.shape}")
    bits = check_bits(bits)
    nbytes = (bits + 7) // 8
    if codes_u8.shape[1] != nbytes:
        raise ValueError(
            f"codes_u8 must have ceil(bits / 8) = {nbytes} bytes per row for bits={bits}, "
            f"got {codes_u8.shape[1]}"
        )
    n = codes_u8.shape[0]
    w = num_words(bits)
    buf = np.zeros((n, w * 8), dtype=np.uint8)
    buf[:, :nbytes] = codes_u8
    if bits % 8:
        tail = np.uint8((1 << (bits % 8)) - 1)
        if (buf[:, nbytes - 1] & ~tail).any():
            raise ValueError(f"codes_u8 has bits set beyond bits={bits}")
    return buf.view("<u8").astype(np.uint64)
