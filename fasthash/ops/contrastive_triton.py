"""Fused contrastive log-sum-exp (BRCD / NT-Xent) in Triton: flash-style forward with an online
log-sum-exp over column tiles, deterministic recompute backward. Imports triton: load lazily.

Math (as :mod:`fasthash.ops.blocked`): ``Z = [za; zb]`` (R = 2B unit or zero rows),
``G = Z Z^T / tau``; row a's statistic is
``lse[a] = log(exp(pos[a mod B]) + sum_{b in keep(a)} exp(G[a, b]))`` with keep(a) dropping
``b = a``, the partner ``(a + B) mod R`` and, with clusters, ``col_cluster[b] == row_cluster[a]``.

Forward (``_contrastive_lse_fwd_kernel``): one program per (row tile, column split). The row tile
is loaded once with ``log2(e) / tau`` folded in, so ``tl.dot`` yields base-2 logits and each
logit costs one ``exp2``. Two constexpr variants: an online max (``FIXED_SHIFT=False``) or, when
``2 / tau`` is small enough that ``exp2(s - 1/tau)`` cannot underflow, a fixed shift by the
bound ``|G| <= 1/tau`` (no running max, no rescaling). Only ``(m, l)`` per row and split leave the
kernel; the launcher merges splits with a log-add (O(splits * R)).

Backward (``_contrastive_lse_bwd_kernel``): one program per (row tile of the rows that need a
gradient, column split); it recomputes each logit tile and accumulates
``dZ[i] += (g[i] P[i, b] + g[b] P[b, i]) Z[b]`` (the row and the column role of row i, using the
saved per-row lse), so no atomics and no second kernel are needed; splits are summed by the
launcher in a fixed order (deterministic).

Row subsets (the distributed losses): ``ROW_OFF`` / ``N_LOC`` select the rows ``ROW_OFF + [0,
N_LOC)`` of each half of the gathered global ``Z`` (program rows are local, ``_global_rows``
maps them); the columns stay every global row, ``POS`` holds the N_LOC local positives and the
backward reads the global ``LSE`` / ``G``. ``ROW_OFF = 0, N_LOC = HALF`` is the whole batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._constants import FIXED_SHIFT_LIMIT, LN2, LOG2E
from ._triton_common import check_device, dot_precision, next_pow2
from ._triton_common import num_sms as _num_sms
from .blocked import check_global_vectors, row_segments

_LOG2E = tl.constexpr(LOG2E)  # jit functions may read only constexpr globals


@triton.jit
def _global_rows(loc, ROW_OFF, N_LOC, HALF):
    # global rows of local rows loc: the first N_LOC are student rows ROW_OFF + i, the next
    # N_LOC their teacher rows HALF + ROW_OFF + i (ROW_OFF = 0, N_LOC = HALF: the identity)
    return tl.where(loc < N_LOC, ROW_OFF + loc, HALF + ROW_OFF + loc - N_LOC)


@triton.jit
def _contrastive_lse_fwd_kernel(
    Z, POS, RC, CC, M_OUT, L_OUT,
    R, HALF, L, stride_z, cols_per_split,
    scale,  # log2(e) / tau
    ROW_OFF, N_LOC,  # the row subset: local row i < N_LOC is global ROW_OFF + i (docstring)
    HAS_CL: tl.constexpr,
    FIXED_SHIFT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    loc = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = loc < 2 * N_LOC
    rows = _global_rows(loc, ROW_OFF, N_LOC, HALF)
    offs_l = tl.arange(0, BLOCK_L)
    lmask = offs_l < L
    q = tl.load(Z + rows[:, None] * stride_z + offs_l[None, :],
                mask=rmask[:, None] & lmask[None, :], other=0.0).to(tl.float32)
    q = q * scale  # base-2 logits straight out of the dot
    partner = tl.where(rows < HALF, rows + HALF, rows - HALF)
    sample = tl.where(loc < N_LOC, loc, loc - N_LOC)  # index of the local positive
    pos2 = tl.load(POS + sample, mask=rmask, other=0.0).to(tl.float32) * _LOG2E
    first = (pid_s == 0).to(tl.float32)
    if FIXED_SHIFT:
        # |logit|, |pos| <= 1/tau, so exp2(x - scale) lies in (2^(-2 scale), 1]
        m_i = tl.zeros([BLOCK_R], dtype=tl.float32) + scale
        l_i = tl.exp2(pos2 - scale) * first
    else:
        m_i = pos2
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32) + first
    if HAS_CL:
        rc = tl.load(RC + rows, mask=rmask, other=-1)
    c_start = pid_s * cols_per_split
    c_end = tl.minimum(R, c_start + cols_per_split)
    for c0 in range(c_start, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < c_end
        k = tl.load(Z + cols[:, None] * stride_z + offs_l[None, :],
                    mask=cmask[:, None] & lmask[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        keep = (cmask[None, :] & (cols[None, :] != rows[:, None])
                & (cols[None, :] != partner[:, None]))
        if HAS_CL:
            cc = tl.load(CC + cols, mask=cmask, other=-2)
            keep = keep & (rc[:, None] != cc[None, :])
        if FIXED_SHIFT:
            p = tl.where(keep, tl.exp2(s - scale), 0.0)
            l_i += tl.sum(p, 1)
        else:
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(p, 1)
            m_i = m_new
    tl.store(M_OUT + pid_s * (2 * N_LOC) + loc, m_i, mask=rmask)
    tl.store(L_OUT + pid_s * (2 * N_LOC) + loc, l_i, mask=rmask)


@triton.jit
def _contrastive_lse_bwd_kernel(
    Z, LSE, G, RC, CC, DZ,
    R, HALF, GRAD_ROWS, L, stride_z, cols_per_split,
    scale,  # log2(e) / tau
    inv_tau,
    ROW_OFF, N_LOC,  # the row subset (as the forward); LSE and G are the global vectors
    HAS_CL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    loc = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = loc < GRAD_ROWS
    rows = _global_rows(loc, ROW_OFF, N_LOC, HALF)
    offs_l = tl.arange(0, BLOCK_L)
    lmask = offs_l < L
    q = tl.load(Z + rows[:, None] * stride_z + offs_l[None, :],
                mask=rmask[:, None] & lmask[None, :], other=0.0).to(tl.float32)
    q = q * scale
    partner = tl.where(rows < HALF, rows + HALF, rows - HALF)
    lse_r = tl.load(LSE + rows, mask=rmask, other=0.0) * _LOG2E
    g_r = tl.load(G + rows, mask=rmask, other=0.0)
    if HAS_CL:
        rc_r = tl.load(RC + rows, mask=rmask, other=-1)
        cc_r = tl.load(CC + rows, mask=rmask, other=-2)
    acc = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)
    c_start = pid_s * cols_per_split
    c_end = tl.minimum(R, c_start + cols_per_split)
    for c0 in range(c_start, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < c_end
        k = tl.load(Z + cols[:, None] * stride_z + offs_l[None, :],
                    mask=cmask[:, None] & lmask[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        lse_c = tl.load(LSE + cols, mask=cmask, other=0.0) * _LOG2E
        g_c = tl.load(G + cols, mask=cmask, other=0.0)
        geo = (cmask[None, :] & (cols[None, :] != rows[:, None])
               & (cols[None, :] != partner[:, None]))
        keep_r = geo
        keep_c = geo
        if HAS_CL:
            rc_c = tl.load(RC + cols, mask=cmask, other=-1)
            cc_c = tl.load(CC + cols, mask=cmask, other=-2)
            keep_r = keep_r & (rc_r[:, None] != cc_c[None, :])
            keep_c = keep_c & (rc_c[None, :] != cc_r[:, None])
        # select, never multiply: non-kept entries may overflow to inf
        p = tl.where(keep_r, tl.exp2(s - lse_r[:, None]) * g_r[:, None], 0.0)
        p += tl.where(keep_c, tl.exp2(s - lse_c[None, :]) * g_c[None, :], 0.0)
        acc += tl.dot(p, k, input_precision=DOT_PRECISION)
    acc = acc * inv_tau
    tl.store(DZ + (pid_s * GRAD_ROWS + loc[:, None]) * L + offs_l[None, :], acc,
             mask=rmask[:, None] & lmask[None, :])


# --------------------------------------------------------------------------- launchers


def _blocks(length: int, device: torch.device, block_r: int | None, block_c: int | None):
    bl = next_pow2(length)
    if device.type == "cuda":
        # sized with ptxas for sm_90 (tests/test_kernels_aot.py): <= 227 KiB shared memory,
        # no register spills in the forward
        if bl <= 128:
            br, bc, warps = 128, 64, 8
        elif bl <= 256:
            br, bc, warps = 64, 32, 8
        else:  # up to 512 bits: operand tiles of 32 x 512 fp32 (64 KiB) each
            br, bc, warps = 32, 32, 8
    else:  # interpreter: few, large-ish tiles (each program step costs milliseconds)
        br, bc, warps = 64, 64, 4
    return bl, block_r or br, block_c or bc, warps


def _splits(n_row_tiles: int, n_col_tiles: int, device: torch.device, splits: int | None) -> int:
    if splits is None:
        target = 2 * _num_sms(device)
        splits = max(1, -(-target // n_row_tiles)) if device.type == "cuda" else 1
    return max(1, min(splits, n_col_tiles))


def _prepare(za, zb, row_cluster, col_cluster):
    check_device(za, zb)
    if za.shape != zb.shape:
        raise ValueError(f"zb must have shape {tuple(za.shape)} like za, got {tuple(zb.shape)}")
    if (row_cluster is None) != (col_cluster is None):
        raise ValueError("row_cluster and col_cluster must both be given or both be None")
    z = torch.cat([za, zb]).contiguous()
    if z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        z = z.float()
    rc = cc = None
    if row_cluster is not None:
        rc = row_cluster.to(torch.int64).contiguous()
        cc = col_cluster.to(torch.int64).contiguous()
    return z, rc, cc


def _check_rows(half: int, row_offset: int, row_count: int | None, n_pos: int | None) -> int:
    """The number of local rows per half of a row subset, checked against the batch (by the
    blocked path's own check, so both paths refuse the same subsets)."""
    row_segments(half, row_offset, row_count)
    n = half if row_count is None else row_count
    if n_pos is not None and n_pos != n:
        raise ValueError(f"pos must hold {n} positives (one per local row), got {n_pos}")
    return n


def contrastive_lse_forward(
    za: torch.Tensor,
    zb: torch.Tensor,
    pos: torch.Tensor,
    row_cluster: torch.Tensor | None,
    col_cluster: torch.Tensor | None,
    inv_tau: float,
    *,
    row_offset: int = 0,
    row_count: int | None = None,
    block_r: int | None = None,
    block_c: int | None = None,
    splits: int | None = None,
    fixed_shift: bool | None = None,
) -> torch.Tensor:
    """Per-row lse [2 row_count] (float32) of the fused contrastive loss; see the module
    docstring.

    Args:
        za, zb: the two halves of Z (unit or zero rows), ``[B, L]`` each, fp32/fp16/bf16.
        pos: positive logits ``[row_count]`` (already divided by tau). row_cluster,
            col_cluster: int ``[2B]`` or both None. inv_tau: 1 / tau.
        row_offset, row_count: the rows computed, ``row_offset + [0, row_count)`` of each
            half (default: every row; the distributed losses pass one rank's rows).
        block_r, block_c, splits, fixed_shift: tiling overrides (tests, tuning).

    Returns:
        float32 ``[2 row_count]``: the student rows, then their teacher rows.
    """
    z, rc, cc = _prepare(za, zb, row_cluster, col_cluster)
    total, length = z.shape
    n_loc = _check_rows(za.shape[0], row_offset, row_count, pos.shape[0])
    bl, br, bc, warps = _blocks(length, z.device, block_r, block_c)
    n_rt, n_ct = triton.cdiv(2 * n_loc, br), triton.cdiv(total, bc)
    n_split = _splits(n_rt, n_ct, z.device, splits)
    cols_per_split = triton.cdiv(n_ct, n_split) * bc
    n_split = triton.cdiv(total, cols_per_split)
    if fixed_shift is None:
        fixed_shift = 2.0 * inv_tau < FIXED_SHIFT_LIMIT[torch.float32]  # fp32 kernels
    m = torch.empty(n_split, 2 * n_loc, dtype=torch.float32, device=z.device)
    lsum = torch.empty_like(m)
    pos = pos.float().contiguous()
    scale = inv_tau * LOG2E
    _contrastive_lse_fwd_kernel[(n_rt, n_split)](
        z, pos, rc if rc is not None else pos, cc if cc is not None else pos, m, lsum,
        total, za.shape[0], length, z.stride(0), cols_per_split, scale, row_offset, n_loc,
        HAS_CL=rc is not None, FIXED_SHIFT=bool(fixed_shift),
        BLOCK_R=br, BLOCK_C=bc, BLOCK_L=bl, DOT_PRECISION=dot_precision(),
        num_warps=warps,
    )
    if n_split == 1:
        return (m[0] + torch.log2(lsum[0])) * LN2
    mx = m.max(dim=0).values
    return (mx + torch.log2((lsum * torch.exp2(m - mx)).sum(dim=0))) * LN2


def contrastive_lse_backward(
    grad_lse: torch.Tensor,
    za: torch.Tensor,
    zb: torch.Tensor,
    lse: torch.Tensor,
    row_cluster: torch.Tensor | None,
    col_cluster: torch.Tensor | None,
    inv_tau: float,
    grad_rows: int,
    *,
    row_offset: int = 0,
    row_count: int | None = None,
    block_r: int | None = None,
    block_c: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Gradient [grad_rows, L] (float32) of ``sum(grad_lse * lse)`` w.r.t. the first
    ``grad_rows`` rows of ``[za; zb]`` (with ``row_offset`` / ``row_count``: of the local rows,
    as the forward; ``grad_lse`` and ``lse`` stay the global [2B] vectors), recomputing the
    logits tile by tile."""
    z, rc, cc = _prepare(za, zb, row_cluster, col_cluster)
    total, length = z.shape
    n_loc = _check_rows(za.shape[0], row_offset, row_count, None)
    if not 0 < grad_rows <= 2 * n_loc:
        raise ValueError(f"grad_rows must be in [1, {2 * n_loc}], got {grad_rows}")
    check_global_vectors(total, grad_lse=grad_lse, lse=lse)
    bl, br, bc, warps = _blocks(length, z.device, block_r, block_c)
    n_rt, n_ct = triton.cdiv(grad_rows, br), triton.cdiv(total, bc)
    n_split = _splits(n_rt, n_ct, z.device, splits)
    cols_per_split = triton.cdiv(n_ct, n_split) * bc
    n_split = triton.cdiv(total, cols_per_split)
    dz = torch.empty(n_split, grad_rows, length, dtype=torch.float32, device=z.device)
    g = grad_lse.float().contiguous()
    lse = lse.float().contiguous()
    _contrastive_lse_bwd_kernel[(n_rt, n_split)](
        z, lse, g, rc if rc is not None else g, cc if cc is not None else g, dz,
        total, za.shape[0], grad_rows, length, z.stride(0), cols_per_split,
        inv_tau * LOG2E, inv_tau, row_offset, n_loc,
        HAS_CL=rc is not None, BLOCK_R=br, BLOCK_C=bc, BLOCK_L=bl,
        DOT_PRECISION=dot_precision(), num_warps=warps,
    )
    return dz[0] if n_split == 1 else dz.sum(dim=0)


__all__ = ["contrastive_lse_forward", "contrastive_lse_backward"]
