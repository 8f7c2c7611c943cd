"""Bit-masked Hamming (cosine) similarity in Triton. Imports triton: load lazily.

``S[a, b] = sum_j mx[a, j] my[b, j] x[a, j] y[b, j] * rx[a] * ry[b]`` with
``rx[a] = 1 / |mx[a] * x[a]|`` (0 for an empty row) when normalising, else 1. Masks come as a
table plus optional row ids (the BRCD form ``mask_table[ids[a]]``; no ids: row a uses row a).

Forward (``_masked_similarity_fwd_kernel``): one program per output tile; the L axis is walked
in chunks, the masks are applied after loading (masked bits are zeros, so they add nothing to
the dot or the norms) and the norms are accumulated alongside the dot, so x and y are read once
per tile and S is written once: the kernel is bound by writing S.

Backward (``_masked_similarity_bwd_kernel``, grad w.r.t. x; y uses the same kernel with the
roles swapped and ``grad^T`` via strides): ``dxhat = grad @ yhat`` accumulated over column tiles,
then the normalisation's Jacobian ``dx = (dxhat - xhat (dxhat . xhat)) * rx`` and the mask
(masked bits get exactly zero gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import check_device, dot_precision, next_pow2


@triton.jit
def _load_masked(P, MT, MI, rows, rmask, offs_l, lmask, stride_p, stride_m,
                 HAS_M: tl.constexpr, HAS_IDS: tl.constexpr):
    v = tl.load(P + rows[:, None] * stride_p + offs_l[None, :],
                mask=rmask[:, None] & lmask[None, :], other=0.0).to(tl.float32)
    if HAS_M:
        if HAS_IDS:
            mrow = tl.load(MI + rows, mask=rmask, other=0)
        else:
            mrow = rows
        m = tl.load(MT + mrow[:, None] * stride_m + offs_l[None, :],
                    mask=rmask[:, None] & lmask[None, :], other=0.0).to(tl.float32)
        v = v * m  # after the load: v is finite, masked bits become exact zeros
    return v


@triton.jit
def _masked_similarity_fwd_kernel(
    X, Y, MXT, MXI, MYT, MYI, OUT,
    N, M, L, stride_x, stride_y, stride_mx, stride_my, stride_o,
    HAS_MX: tl.constexpr, MX_IDS: tl.constexpr, HAS_MY: tl.constexpr, MY_IDS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask = rn < N
    mmask = rm < M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    nx = tl.zeros([BLOCK_N], dtype=tl.float32)
    ny = tl.zeros([BLOCK_M], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        lmask = offs_l < L
        x = _load_masked(X, MXT, MXI, rn, nmask, offs_l, lmask, stride_x, stride_mx, HAS_MX, MX_IDS)
        y = _load_masked(Y, MYT, MYI, rm, mmask, offs_l, lmask, stride_y, stride_my, HAS_MY, MY_IDS)
        acc += tl.dot(x, tl.trans(y), input_precision=DOT_PRECISION)
        if NORMALIZE:
            nx += tl.sum(x * x, 1)
            ny += tl.sum(y * y, 1)
    if NORMALIZE:
        rx = tl.where(nx > 0, 1.0 / tl.sqrt(tl.where(nx > 0, nx, 1.0)), 0.0)
        ry = tl.where(ny > 0, 1.0 / tl.sqrt(tl.where(ny > 0, ny, 1.0)), 0.0)
        acc = acc * rx[:, None] * ry[None, :]
    tl.store(OUT + rn[:, None] * stride_o + rm[None, :], acc,
             mask=nmask[:, None] & mmask[None, :])


@triton.jit
def _masked_similarity_bwd_kernel(
    GRAD, X, Y, MXT, MXI, MYT, MYI, DX,
    N, M, L, stride_gn, stride_gm, stride_x, stride_y, stride_mx, stride_my,
    HAS_MX: tl.constexpr, MX_IDS: tl.constexpr, HAS_MY: tl.constexpr, MY_IDS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    offs_l = tl.arange(0, BLOCK_L)  # the whole (padded) code: the accumulator is [BN, L]
    lmask = offs_l < L
    acc = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mmask = rm < M
        y = _load_masked(Y, MYT, MYI, rm, mmask, offs_l, lmask, stride_y, stride_my, HAS_MY, MY_IDS)
        if NORMALIZE:
            ny = tl.sum(y * y, 1)
            y = y * tl.where(ny > 0, 1.0 / tl.sqrt(tl.where(ny > 0, ny, 1.0)), 0.0)[:, None]
        g = tl.load(GRAD + rn[:, None] * stride_gn + rm[None, :] * stride_gm,
                    mask=nmask[:, None] & mmask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(g, y, input_precision=DOT_PRECISION)
    if NORMALIZE:
        x = _load_masked(X, MXT, MXI, rn, nmask, offs_l, lmask, stride_x, stride_mx, HAS_MX, MX_IDS)
        nx = tl.sum(x * x, 1)
        rx = tl.where(nx > 0, 1.0 / tl.sqrt(tl.where(nx > 0, nx, 1.0)), 0.0)
        xh = x * rx[:, None]
        proj = tl.sum(acc * xh, 1)
        acc = (acc - xh * proj[:, None]) * rx[:, None]
    if HAS_MX:
        if MX_IDS:
            mrow = tl.load(MXI + rn, mask=nmask, other=0)
        else:
            mrow = rn
        mx = tl.load(MXT + mrow[:, None] * stride_mx + offs_l[None, :],
                     mask=nmask[:, None] & lmask[None, :], other=0.0).to(tl.float32)
        acc = tl.where(mx != 0, acc, 0.0)  # exactly zero on masked bits
    tl.store(DX + rn[:, None] * L + offs_l[None, :], acc, mask=nmask[:, None] & lmask[None, :])


# --------------------------------------------------------------------------- launchers


def _codes(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.float()
    return x if x.stride(1) == 1 else x.contiguous()


def _mask(table: torch.Tensor | None, ids: torch.Tensor | None, like: torch.Tensor):
    if table is None:
        return like, like, 0
    table = table.contiguous()
    ids_t = ids.to(torch.int64).contiguous() if ids is not None else like
    return table, ids_t, table.stride(0)


def _fwd_config(device: torch.device, block_n=None, block_m=None, block_l=None):
    """(BLOCK_N, BLOCK_M, BLOCK_L, num_warps) of the forward; on sm_90 128 x 128 x 16 with 8
    warps compiles without spills (32-wide L chunks spill)."""
    if device.type == "cuda":
        return block_n or 128, block_m or 128, block_l or 16, 8
    return block_n or 64, block_m or 64, block_l or 64, 4


def _bwd_config(bl: int, device: torch.device, block_n=None, block_m=None):
    """(BLOCK_N, BLOCK_M, num_warps) of the backward, whose accumulator holds whole codes:
    [BN, BL] fp32 registers and [BM, BL] operand tiles."""
    if device.type == "cuda":
        bn = block_n or (64 if bl <= 128 else 32 if bl <= 256 else 16)
        bm = block_m or (64 if bl <= 256 else 32)
        return bn, bm, 8 if bl > 64 else 4
    return block_n or 64, block_m or 64, 4


def masked_similarity_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    mx_table: torch.Tensor | None,
    mx_ids: torch.Tensor | None,
    my_table: torch.Tensor | None,
    my_ids: torch.Tensor | None,
    normalize: bool,
    *,
    block_n: int | None = None,
    block_m: int | None = None,
    block_l: int | None = None,
) -> torch.Tensor:
    """Masked (cosine) similarity ``[N, M]`` float32; masks as ``(table, ids or None)``.

    Args:
        x ``[N, L]``, y ``[M, L]``: codes (fp32/fp16/bf16; any row stride).
        mx_table ``[C, L]`` / mx_ids ``[N]`` (or ``[N, L]`` table and no ids), same for y.
        normalize: cosine or raw masked inner product. block_*: tiling overrides.
    """
    check_device(x, y)
    x, y = _codes(x), _codes(y)
    n, length = x.shape
    m = y.shape[0]
    bn, bm, bl, warps = _fwd_config(x.device, block_n, block_m, block_l)
    bl = min(bl, next_pow2(length))
    out = torch.empty(n, m, dtype=torch.float32, device=x.device)
    mxt, mxi, smx = _mask(mx_table, mx_ids, x)
    myt, myi, smy = _mask(my_table, my_ids, y)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    _masked_similarity_fwd_kernel[grid](
        x, y, mxt, mxi, myt, myi, out, n, m, length, x.stride(0), y.stride(0), smx, smy,
        out.stride(0),
        HAS_MX=mx_table is not None, MX_IDS=mx_ids is not None,
        HAS_MY=my_table is not None, MY_IDS=my_ids is not None, NORMALIZE=bool(normalize),
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_L=bl, DOT_PRECISION=dot_precision(), num_warps=warps,
    )
    return out


def masked_similarity_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    mx_table: torch.Tensor | None,
    mx_ids: torch.Tensor | None,
    my_table: torch.Tensor | None,
    my_ids: torch.Tensor | None,
    normalize: bool,
    *,
    block_n: int | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """Gradient ``[N, L]`` float32 of ``sum(grad * S)`` w.r.t. x (pass ``grad.mT`` and swapped
    arguments for y; any strides of ``grad`` are fine)."""
    check_device(grad, x, y)
    x, y = _codes(x), _codes(y)
    n, length = x.shape
    m = y.shape[0]
    if grad.shape != (n, m):
        raise ValueError(f"grad must have shape [{n}, {m}], got {tuple(grad.shape)}")
    bl = next_pow2(length)
    bn, bm, warps = _bwd_config(bl, x.device, block_n, block_m)
    dx = torch.empty(n, length, dtype=torch.float32, device=x.device)
    mxt, mxi, smx = _mask(mx_table, mx_ids, x)
    myt, myi, smy = _mask(my_table, my_ids, y)
    _masked_similarity_bwd_kernel[(triton.cdiv(n, bn),)](
        grad, x, y, mxt, mxi, myt, myi, dx, n, m, length, grad.stride(0), grad.stride(1),
        x.stride(0), y.stride(0), smx, smy,
        HAS_MX=mx_table is not None, MX_IDS=mx_ids is not None,
        HAS_MY=my_table is not None, MY_IDS=my_ids is not None, NORMALIZE=bool(normalize),
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_L=bl, DOT_PRECISION=dot_precision(), num_warps=warps,
    )
    return dx


__all__ = ["masked_similarity_forward", "masked_similarity_backward"]
