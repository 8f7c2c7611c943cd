"""Exact (masked) Hamming distances and top-k search over packed int64 words in Triton.
Imports triton: load lazily (``fasthash.search`` calls :func:`hamming_topk_cuda` for CUDA
tensors; :func:`fasthash.functional.hamming_distance` calls :func:`hamming_distance_forward`).

Popcount: the GPU uses the hardware ``popc.b64`` instruction (inline PTX); the Triton interpreter
cannot run inline asm, so a constexpr switch selects a SWAR popcount there (arithmetic shifts
are harmless: every step masks away the sign-extended bits).

Top-k (``_hamming_topk_fwd_kernel``): one program per (query tile, gallery split). Each gallery
tile's distances become int64 keys ``distance << 32 | index`` (``_IDX_BITS = 32``), so ascending
key order IS the (distance, index) order of the CPU engine and
:func:`fasthash.reference.topk_ref` (ties by gallery index) and every key is unique. A tile is
reduced to its KP smallest keys with a bitonic top-k, merged with the running KP best (join +
top-k), and each program writes its KP keys; the launcher merges the splits with one
``torch.topk`` over ``splits * KP`` keys per query.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_int
from ..codes import as_search_words
from ._triton_common import check_device, interpreting, next_pow2
from ._triton_common import num_sms as _num_sms

# Top-k keys are ``distance << _IDX_BITS | index`` (int64); the sentinel, the int64 maximum, is
# larger than every real key. jit functions may read only constexpr globals, hence the _JIT twin.
_IDX_BITS = 32
_IDX_BITS_JIT = tl.constexpr(_IDX_BITS)
_SENTINEL = tl.constexpr(0x7FFFFFFFFFFFFFFF)
_MAX_KP = 1024  # above this k the launcher merges distance chunks with torch.topk


@triton.jit
def _popcount64(x, HW_POPC: tl.constexpr):
    if HW_POPC:
        return tl.inline_asm_elementwise(
            "popc.b64 $0, $1;", "=r,l", [x], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        x = x - ((x >> 1) & 0x5555555555555555)
        x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
        return ((x * 0x0101010101010101) >> 56).to(tl.int32)


@triton.jit
def _tile_distances(Q, X, MSK, rq, qmask, rn, nmask, W, stride_q, stride_x, stride_m,
                    MASK_MODE: tl.constexpr, HW_POPC: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr):
    acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.int32)
    q_off = rq.to(tl.int64) * stride_q  # 64-bit offsets: galleries beyond 2^31 words
    x_off = rn.to(tl.int64) * stride_x
    for w in range(0, W):
        qw = tl.load(Q + q_off + w, mask=qmask, other=0)
        xw = tl.load(X + x_off + w, mask=nmask, other=0)
        d = qw[:, None] ^ xw[None, :]
        if MASK_MODE == 1:  # one global mask [W]
            d = d & tl.load(MSK + w)
        if MASK_MODE == 2:  # one mask per query [Q, W]
            d = d & tl.load(MSK + rq * stride_m + w, mask=qmask, other=0)[:, None]
        acc += _popcount64(d, HW_POPC)
    return acc


@triton.jit
def _merge_extract(best, key, BLOCK_Q: tl.constexpr, KP: tl.constexpr):
    """KP smallest of ``best`` and ``key`` by repeated row minima (the interpreter's choice:
    its bitonic sort runs a Python combine per element and is ~100x slower)."""
    cols = tl.arange(0, KP)[None, :]
    out = tl.full([BLOCK_Q, KP], _SENTINEL, tl.int64)
    for j in tl.static_range(KP):
        mn = tl.minimum(tl.min(best, 1), tl.min(key, 1))
        out = tl.where(cols == j, mn[:, None], out)
        # keys are unique (they contain the index), so this removes exactly the minimum
        best = tl.where(best == mn[:, None], _SENTINEL, best)
        key = tl.where(key == mn[:, None], _SENTINEL, key)
    return out


@triton.jit
def _hamming_distance_fwd_kernel(
    Q, X, MSK, OUT, NQ, NX, W, stride_q, stride_x, stride_m, stride_o,
    MASK_MODE: tl.constexpr, HW_POPC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    qmask = rq < NQ
    nmask = rn < NX
    d = _tile_distances(Q, X, MSK, rq, qmask, rn, nmask, W, stride_q, stride_x, stride_m,
                        MASK_MODE, HW_POPC, BLOCK_Q, BLOCK_N)
    tl.store(OUT + rq[:, None].to(tl.int64) * stride_o + rn[None, :], d,
             mask=qmask[:, None] & nmask[None, :])


@triton.jit
def _hamming_topk_fwd_kernel(
    Q, X, MSK, KEYS, NQ, NX, W, stride_q, stride_x, stride_m, n_per_split, n_split,
    MASK_MODE: tl.constexpr, HW_POPC: tl.constexpr, USE_SORT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = rq < NQ
    best = tl.full([BLOCK_Q, KP], _SENTINEL, tl.int64)
    start = pid_s * n_per_split
    end = tl.minimum(NX, start + n_per_split)
    for n0 in range(start, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < end
        d = _tile_distances(Q, X, MSK, rq, qmask, rn, nmask, W, stride_q, stride_x, stride_m,
                            MASK_MODE, HW_POPC, BLOCK_Q, BLOCK_N)
        key = (d.to(tl.int64) << _IDX_BITS_JIT) | rn.to(tl.int64)[None, :]
        key = tl.where(nmask[None, :], key, _SENTINEL)
        if USE_SORT:  # bitonic top-k of the tile, then of (running best ++ tile best)
            if BLOCK_N > KP:
                key = tl.topk(key, KP, dim=1, descending=False)
            both = tl.reshape(tl.join(best, key), [BLOCK_Q, 2 * KP])
            best = tl.topk(both, KP, dim=1, descending=False)
        else:
            best = _merge_extract(best, key, BLOCK_Q, KP)
    offs = (rq[:, None].to(tl.int64) * n_split + pid_s) * KP + tl.arange(0, KP)[None, :]
    tl.store(KEYS + offs, best, mask=qmask[:, None])


# --------------------------------------------------------------------------- launchers


def _prepare(queries, gallery, mask):
    """Checked contiguous int64 words on one device, the kernels' mask mode and mask stride."""
    tensors = [t for t in (queries, gallery, mask) if isinstance(t, torch.Tensor)]
    if not tensors:
        raise TypeError("queries or gallery must be a torch tensor (on CUDA)")
    device = next((t.device for t in tensors if t.device.type == "cuda"), tensors[0].device)
    q, x, m = as_search_words(queries, gallery, mask, to="torch", device=device)
    check_device(q, x)
    if x.shape[0] >= 2**_IDX_BITS:
        raise ValueError(f"gallery must have fewer than 2**{_IDX_BITS} codes")
    q, x = q.contiguous(), x.contiguous()
    if m is None:
        return q, x, q, 0, 0
    m = m.contiguous()
    mode, stride_m = (1, 0) if m.shape[0] == 1 else (2, m.stride(0))
    return q, x, m, mode, stride_m


def _dist_config(device: torch.device, block_q=None, block_n=None):
    """(BLOCK_Q, BLOCK_N, num_warps): 32 x 128 with 8 warps has no spills on sm_90."""
    if device.type == "cuda":
        return block_q or 32, block_n or 128, 8
    return block_q or 32, block_n or 64, 4


def _topk_config(kp: int, device: torch.device, block_q=None, block_n=None):
    """(BLOCK_Q, BLOCK_N, num_warps) for a running top-KP: fewer queries per program as KP grows
    (the running keys and the bitonic network live in registers; checked with ptxas)."""
    if device.type == "cuda":
        bn = block_n or max(kp, 128)
        bq = block_q or (32 if kp <= 32 else 16 if kp <= 64 else 8 if kp <= 256 else 4)
        return bq, bn, 8 if bq >= 32 else 4
    return block_q or 32, block_n or max(kp, 64), 4


def hamming_distance_forward(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    block_q: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """All-pairs (masked) Hamming distances ``[Q, N]`` int32 of packed int64 words.

    Args:
        queries ``[Q, W]``, gallery ``[N, W]``: torch.int64 words (CUDA, or CPU under the
        interpreter). mask: None, ``[W]`` or ``[Q, W]`` int64 words.
    """
    q, x, m, mode, sm = _prepare(queries, gallery, mask)
    nq, w = q.shape
    nx = x.shape[0]
    bq, bn, warps = _dist_config(q.device, block_q, block_n)
    out = torch.empty(nq, nx, dtype=torch.int32, device=q.device)
    grid = (triton.cdiv(nq, bq), triton.cdiv(nx, bn))
    _hamming_distance_fwd_kernel[grid](
        q, x, m, out, nq, nx, w, q.stride(0), x.stride(0), sm, out.stride(0),
        MASK_MODE=mode, HW_POPC=not interpreting(), BLOCK_Q=bq, BLOCK_N=bn, num_warps=warps,
    )
    return out


def _keys_to_result(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = torch.topk(keys, k, dim=1, largest=False, sorted=True).values
    return (top >> _IDX_BITS).to(torch.int32), top & ((1 << _IDX_BITS) - 1)


def hamming_topk_cuda(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    mask: torch.Tensor | None = None,
    *,
    block_q: int | None = None,
    block_n: int | None = None,
    splits: int | None = None,
    use_sort: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k Hamming search on the GPU, ordered by (distance, gallery index).

    Args:
        queries: ``[Q, W]`` torch.int64 packed words (CUDA; CPU tensors under the interpreter).
        gallery: ``[N, W]`` packed words; torch.int64 on the same device (numpy uint64 arrays or
            torch.uint64 tensors are reinterpreted and copied to the queries' device).
        k: 1 <= k <= N.
        mask: None, a global mask ``[W]`` or per-query masks ``[Q, W]`` (int64 words).
        block_q, block_n, splits: tiling overrides (tests, tuning).
        use_sort: bitonic top-k per tile (default on the GPU) or repeated row minima (default
            in the interpreter, whose sort is very slow).

    Shape:
        -> distances ``[Q, k]``, indices ``[Q, k]``.

    Returns:
        (int32 distances, int64 gallery indices), equal to :func:`fasthash.reference.topk_ref`.

    Example:
        >>> q = torch.zeros(1, 1, dtype=torch.int64, device="cuda")  # doctest: +SKIP
        >>> hamming_topk_cuda(q, torch.tensor([[3], [1], [1]], device="cuda"), 2)  # doctest: +SKIP
        (tensor([[1, 1]], dtype=torch.int32), tensor([[1, 2]]))
    """
    q, x, m, mode, sm = _prepare(queries, gallery, mask)
    nq, w = q.shape
    nx = x.shape[0]
    k = check_int(k, "k", 1, nx)
    if nq == 0:
        return (torch.empty(0, k, dtype=torch.int32, device=q.device),
                torch.empty(0, k, dtype=torch.int64, device=q.device))
    kp = next_pow2(k)
    if kp > _MAX_KP:
        # very large k: exact distances chunk by chunk, merged on the fly with torch.topk
        best = None
        chunk = max(kp, 1 << 16)
        for c0 in range(0, nx, chunk):
            d = hamming_distance_forward(q, x[c0:c0 + chunk], m if mode else None)
            idx = torch.arange(c0, c0 + d.shape[1], device=q.device, dtype=torch.int64)
            keys = (d.to(torch.int64) << _IDX_BITS) | idx[None, :]
            if best is not None:
                keys = torch.cat([best, keys], dim=1)
            best = torch.topk(keys, min(k, keys.shape[1]), dim=1, largest=False).values
        return _keys_to_result(best, k)
    cuda = q.device.type == "cuda"
    bq, bn, warps = _topk_config(kp, q.device, block_q, block_n)
    if bn < kp or bn & (bn - 1):
        raise ValueError(f"block_n must be a power of two >= {kp}, got {bn}")
    n_qt, n_nt = triton.cdiv(nq, bq), triton.cdiv(nx, bn)
    if splits is None:
        splits = max(1, -(-4 * _num_sms(q.device) // n_qt)) if cuda else 1
    splits = max(1, min(splits, n_nt))
    n_per_split = triton.cdiv(n_nt, splits) * bn
    splits = triton.cdiv(nx, n_per_split)
    keys = torch.empty(nq, splits * kp, dtype=torch.int64, device=q.device)
    _hamming_topk_fwd_kernel[(n_qt, splits)](
        q, x, m, keys, nq, nx, w, q.stride(0), x.stride(0), sm, n_per_split, splits,
        MASK_MODE=mode, HW_POPC=not interpreting(),
        USE_SORT=(not interpreting()) if use_sort is None else bool(use_sort),
        BLOCK_Q=bq, BLOCK_N=bn, KP=kp, num_warps=warps,
    )
    return _keys_to_result(keys, k)


__all__ = ["hamming_topk_cuda", "hamming_distance_forward"]
