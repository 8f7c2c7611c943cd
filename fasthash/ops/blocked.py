"""Blocked torch implementations of the fused ops (the CPU path; device-agnostic torch code).

Nothing here allocates an N x N matrix: the contrastive log-sum-exp walks row blocks x column
blocks of the logits with an online (or, when it is safe, fixed-shift) log-sum-exp and keeps only
per-row statistics; the backward recomputes the logits block by block. Peak extra memory is
``O(N * L + BLOCK_ROWS * BLOCK_COLS)``. A whole batch whose logits fit one block (``2B x 2B <=
BLOCK_ROWS x BLOCK_COLS``, e.g. B <= 256) is computed as that one tile with a handful of ops:
at small N the per-tile bookkeeping, not the math, was the cost of a call.

Math (shared with the Triton kernels in ``contrastive_triton.py``): with ``Z = [za; zb]``
(``R = 2B`` unit-norm or zero rows), ``G = Z Z^T / tau`` and ``partner(a) = (a + B) mod R``,

    lse[a] = log( exp(pos[a mod B]) + sum_{b in keep(a)} exp(G[a, b]) )

where ``keep(a)`` drops ``b = a``, ``b = partner(a)`` and, with clusters, every ``b`` whose
``col_cluster[b] == row_cluster[a]``. The gradient of ``sum_a g[a] * lse[a]`` w.r.t. row ``i`` is

    dZ[i] = (1/tau) * sum_b ( g[i] P[i, b] + g[b] P[b, i] ) Z[b],   P[a, b] = exp(G[a, b] - lse[a])

(the first term: ``i`` as a row; the second: ``i`` as a column of every other row), and
``d pos[k] = sum_{a in {k, k+B}} g[a] exp(pos[k] - lse[a])``.

Row subsets (the distributed losses): ``za``, ``zb`` may be the gathered global halves while
only the rows of one rank are computed, ``row_offset = off`` and ``row_count = n``: local row
``i < n`` is global row ``off + i`` and local row ``n + i`` is global row ``B + off + i``;
``pos`` then holds the n local positives, the columns are every global row, and the backward
takes the global ``grad_lse`` and ``lse`` (the gradient of a local row's code needs every row's
``g`` and ``lse``, but no gradient of another rank's codes). ``row_offset = 0``, ``row_count =
B`` is the whole batch and runs exactly the code of the single-process loss.
"""

from __future__ import annotations

import math

import torch

from ._constants import FIXED_SHIFT_LIMIT

# Tile sizes of the CPU path: 256 x 1024 fp32 logits = 1 MiB, about one core's L2; the peak
# extra memory is a few tiles plus O(N L) (31 MiB at 2B = 16384, L = 64; 512 x 2048 tiles gave
# 64 MiB and no clear speed-up). Tests shrink them to exercise the tiling at small N.
BLOCK_ROWS = 256
BLOCK_COLS = 1024


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; an all-zero row stays zero (and gets zero gradient).

    A zero row is divided by ``inf`` (``0 / inf = 0``; its gradients ``g / inf`` and
    ``-g x / inf^2`` are exactly 0 and the ``where`` stops them before the norm), so autograd
    never sees ``0 * inf`` and the graph has three nodes (this runs on every loss call).
    """
    n = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(n > 0, n, math.inf)


def _normalize_backward(x: torch.Tensor, xhat: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of :func:`normalize_rows`: ``(g - xhat (g . xhat)) / |x|``."""
    n = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    ok = n > 0
    proj = (g * xhat).sum(dim=1, keepdim=True)
    return (g - xhat * proj) / torch.where(ok, n, torch.ones_like(n)) * ok


def compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half/bf16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def apply_mask(
    x: torch.Tensor, table: torch.Tensor | None, ids: torch.Tensor | None, dt: torch.dtype
) -> torch.Tensor:
    """``x * M`` in dtype ``dt`` with mask rows ``table[ids]`` (or ``table`` itself without ids)."""
    x = x.to(dt)
    if table is None:
        return x
    m = table.to(x.device, dt)
    if ids is not None:
        m = m[ids]
    return x * m


# --------------------------------------------------------------------------- masked similarity


def masked_similarity_cpu(
    x: torch.Tensor,
    y: torch.Tensor,
    mx_table: torch.Tensor | None,
    mx_ids: torch.Tensor | None,
    my_table: torch.Tensor | None,
    my_ids: torch.Tensor | None,
    normalize: bool,
) -> torch.Tensor:
    """``S = xhat @ yhat^T`` of masked (and optionally row-normalised) codes; the output is the
    only N x M allocation."""
    dt = compute_dtype(x, y)
    xm = apply_mask(x, mx_table, mx_ids, dt)
    ym = apply_mask(y, my_table, my_ids, dt)
    if normalize:
        xm, ym = normalize_rows(xm), normalize_rows(ym)
    return xm @ ym.T


def masked_similarity_grad_cpu(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    mx_table: torch.Tensor | None,
    mx_ids: torch.Tensor | None,
    my_table: torch.Tensor | None,
    my_ids: torch.Tensor | None,
    normalize: bool,
) -> torch.Tensor:
    """Gradient of ``sum(grad * S)`` w.r.t. ``x`` (call with swapped roles and ``grad.T`` for y).

    Returns the gradient in the compute dtype; masked bits are exactly zero.
    """
    dt = compute_dtype(x, y)
    xm = apply_mask(x, mx_table, mx_ids, dt)
    ym = apply_mask(y, my_table, my_ids, dt)
    g = grad.to(dt)
    if normalize:
        xh, yh = normalize_rows(xm), normalize_rows(ym)
        gx = _normalize_backward(xm, xh, g @ yh)
    else:
        gx = g @ ym
    if mx_table is not None:
        m = mx_table.to(gx.device, dt)
        gx = gx * (m[mx_ids] if mx_ids is not None else m)
    return gx


# --------------------------------------------------------------------------- contrastive LSE


# Same-cluster exclusion folded into the logits matmul: appending -BIG * onehot(row cluster) to
# the rows and onehot(column cluster) to the columns adds exactly -BIG to dropped logits and
# exactly 0 (products with 0) to kept ones, so exp() of a dropped logit underflows to exactly 0:
# an exact removal without a compare / masked_fill pass per tile. Used by the tiled path while
# the number of distinct clusters in the batch is small (the one-tile path compares once).
_BIG = 1.0e4
_MAX_ONEHOT = 128


def _cluster_features(row_cluster, col_cluster, dt):
    """(-BIG * onehot(row), onehot(col)) over the batch's distinct clusters, or None if many."""
    both = torch.cat([row_cluster, col_cluster])
    uniq, inv = torch.unique(both, return_inverse=True)
    if uniq.numel() > _MAX_ONEHOT:
        return None
    oh = torch.nn.functional.one_hot(inv, uniq.numel()).to(dt)
    n = row_cluster.shape[0]
    return oh[:n] * -_BIG, oh[n:]


def _band_hits(r0: int, r1: int, c0: int, c1: int, half: int) -> bool:
    """Whether columns [c0, c1) meet the diagonal or the partner band of rows [r0, r1)."""
    spans = [(r0, r1)]  # diagonal
    if r0 < half:  # rows of the first half: partners r + half
        spans.append((r0 + half, min(r1, half) + half))
    if r1 > half:  # rows of the second half: partners r - half
        spans.append((max(r0, half) - half, r1 - half))
    return any(a < c1 and c0 < b for a, b in spans)


def _fill_bands(tile: torch.Tensor, r0: int, r1: int, c0: int, half: int, value: float) -> None:
    """Set the diagonal (``b = a``) and partner (``b = (a + B) mod 2B``) entries of the tile
    ``logits[r0:r1, c0:c0 + tile.shape[1]]`` to ``value`` in place.

    Tile entry ``(i, j)`` is global ``(r0 + i, c0 + j)``, so each band is one diagonal of the
    tile (of its first-half or second-half rows): filling diagonal views replaces building
    arange / compare masks per tile. An offset outside the tile gives an empty view (a no-op).
    """
    if not _band_hits(r0, r1, c0, c0 + tile.shape[1], half):
        return
    tile.diagonal(r0 - c0).fill_(value)
    if r0 < half:  # rows of the first half: partner column r + half
        tile[:min(r1, half) - r0].diagonal(r0 + half - c0).fill_(value)
    if r1 > half:  # rows of the second half: partner column r - half
        lo = max(r0, half)
        tile[lo - r0:].diagonal(lo - half - c0).fill_(value)


def row_segments(half: int, row_offset: int, row_count: int | None, rows: int | None = None):
    """Global row spans ``(g0, g1, l0)`` of the first ``rows`` (default ``2 * row_count``) local
    rows of a row subset (see the module docstring): local row ``l0 + j`` is global row
    ``g0 + j``. The whole batch is one span, so it runs exactly the single-process loop."""
    n = half if row_count is None else row_count
    rows = 2 * n if rows is None else rows
    if not (0 <= row_offset and 0 < n and row_offset + n <= half and 0 < rows <= 2 * n):
        raise ValueError(f"row subset [{row_offset}, {row_offset} + {n}) x {rows} rows does not "
                         f"fit a batch of {half}")
    if row_offset == 0 and n == half:
        return [(0, rows, 0)]
    spans = [(row_offset, row_offset + min(rows, n), 0)]
    if rows > n:
        spans.append((half + row_offset, half + row_offset + rows - n, n))
    return spans


def check_global_vectors(total: int, **vectors: torch.Tensor) -> None:
    """A backward's ``grad_lse`` / ``lse`` must be the global ``[2B]`` vectors of every row: the
    forward of a row subset returns only its local ``[2 row_count]``, which (passed here) would
    be read out of bounds by the kernels."""
    for name, v in vectors.items():
        if tuple(v.shape) != (total,):
            raise ValueError(
                f"{name} must be the global [2B] = [{total}] vector of every row of [za; zb] "
                f"(gather the ranks' local [2 row_count] vectors first), got shape "
                f"{tuple(v.shape)}"
            )


def _row_blocks(spans):
    """``(r0, r1, lo)`` row blocks of at most BLOCK_ROWS global rows, ``lo`` their local start."""
    for g0, g1, l0 in spans:
        for r0 in range(g0, g1, BLOCK_ROWS):
            yield r0, min(g1, r0 + BLOCK_ROWS), l0 + r0 - g0


def _one_tile(spans, total: int, fixed: bool) -> bool:
    """Whether the whole problem is one tile: the whole batch's first ``rows`` rows (one span
    from 0, B or 2B rows) against all ``total`` columns in at most one block's worth of logits,
    fixed shift.

    At small N the per-call bookkeeping of the tile loop (slices, index masks, the one-hot
    cluster features) costs more than the math of a single ``2B x 2B`` tile; the one-tile paths
    below run a handful of ops instead and materialise nothing larger than the tiled path."""
    if not fixed or len(spans) != 1 or spans[0][0] != 0 or spans[0][1] % (total // 2):
        return False
    return spans[0][1] * total <= BLOCK_ROWS * BLOCK_COLS


def _zero_block_diagonals(e: torch.Tensor, half: int) -> None:
    """Zero the diagonal and partner entries of the first ``k B`` rows (``k`` = 1 or 2) of the
    whole-batch logits ``[k B, 2B]`` in place: seen as ``[k, B, 2, B]`` they are exactly the
    diagonals of the ``B x B`` blocks, one strided view (one fill instead of three)."""
    e.view(e.shape[0] // half, half, 2, half).diagonal(dim1=1, dim2=3).fill_(0.0)


def _same_cluster(row_cluster: torch.Tensor, col_cluster: torch.Tensor) -> torch.Tensor:
    """``D[a, b] = row_cluster[a] == col_cluster[b]`` over the whole (one-tile) batch."""
    return row_cluster[:, None] == col_cluster[None, :]


def _lse_one_tile(z, pos2, row_cluster, col_cluster, inv_tau, half):
    """:func:`contrastive_lse_cpu` for a whole batch that is one tile (fixed shift): the same
    sums as the tiled loop with one row block and one column block, in a handful of ops."""
    e = torch.addmm(z.new_full((1, 1), -inv_tau), z, z.T, alpha=inv_tau).exp_()
    _zero_block_diagonals(e, half)
    if row_cluster is not None:
        e.masked_fill_(_same_cluster(row_cluster, col_cluster), 0.0)
    acc = torch.exp(pos2 - inv_tau).add_(e.sum(dim=1))
    return acc.log_().add_(inv_tau)


def _lse_backward_one_tile(z, coef, row_cluster, col_cluster, inv_tau, half, grad_rows):
    """:func:`contrastive_lse_backward_cpu` for a whole batch that is one tile (fixed shift).

    With ``A[i, b] = a[i] [b in keep(i)]`` the weight of ``E[i, b]`` is ``A[i, b] + A[b, i]``
    (row role + column role): the same-cluster test of the column role is the transposed test
    of the row role, so one compare serves both; the diagonal / partner bands are zeroed in
    ``E`` (their weight then does not matter, and every weight is finite)."""
    e = torch.addmm(z.new_full((1, 1), -inv_tau), z[:grad_rows], z.T, alpha=inv_tau).exp_()
    _zero_block_diagonals(e, half)
    if row_cluster is None:
        w = coef[:grad_rows, None] + coef[None, :]
    else:
        a = torch.where(_same_cluster(row_cluster, col_cluster), 0.0, coef[:, None])
        w = a[:grad_rows] + a[:, :grad_rows].T
    return torch.mm(e.mul_(w), z).mul_(inv_tau)


def contrastive_lse_cpu(
    za: torch.Tensor,
    zb: torch.Tensor,
    pos: torch.Tensor,
    row_cluster: torch.Tensor | None,
    col_cluster: torch.Tensor | None,
    inv_tau: float,
    *,
    row_offset: int = 0,
    row_count: int | None = None,
) -> torch.Tensor:
    """Per-row ``lse`` [2 row_count] (default [2B]) of the fused contrastive loss for the rows
    ``row_offset + [0, row_count)`` of each half (see the module docstring); ``pos`` holds
    their ``row_count`` positives."""
    dt = compute_dtype(za, zb, pos)
    z = torch.cat([za, zb]).to(dt)
    total, half = z.shape[0], za.shape[0]
    spans = row_segments(half, row_offset, row_count)
    if pos.shape[0] != (half if row_count is None else row_count):
        raise ValueError(f"pos must hold one positive per local row, got {pos.shape[0]}")
    pos2 = torch.cat([pos, pos]).to(dt)
    fixed = 2.0 * inv_tau < FIXED_SHIFT_LIMIT[dt]
    if _one_tile(spans, total, fixed):
        return _lse_one_tile(z, pos2, row_cluster, col_cluster, inv_tau, half)
    zs = z * inv_tau  # rows pre-scaled: one matmul gives logits
    zt = z.T
    shift = torch.full((1, 1), -inv_tau, dtype=dt, device=z.device)
    lse = torch.empty(pos2.shape[0], dtype=dt, device=z.device)
    feats = None
    if fixed and row_cluster is not None:
        feats = _cluster_features(row_cluster, col_cluster, dt)
    if feats is not None:  # clusters handled inside the matmul (see _BIG)
        zs = torch.cat([zs, feats[0]], dim=1)
        zt = torch.cat([z, feats[1]], dim=1).T
        row_cluster = col_cluster = None
    for r0, r1, lo in _row_blocks(spans):
        q = zs[r0:r1]
        if fixed:
            # logits and positives are bounded by 1/tau: exp(x - 1/tau) is in (e^{-2/tau}, 1],
            # so no running max is needed and each logit costs one exp
            acc = torch.exp(pos2[lo:lo + r1 - r0] - inv_tau)
        else:
            m = pos2[lo:lo + r1 - r0].clone()
            acc = torch.ones_like(m)
        for c0 in range(0, total, BLOCK_COLS):
            c1 = min(total, c0 + BLOCK_COLS)
            drop = None
            if row_cluster is not None:
                drop = row_cluster[r0:r1, None] == col_cluster[None, c0:c1]
            if fixed:
                e = torch.addmm(shift, q, zt[:, c0:c1]).exp_()
                _fill_bands(e, r0, r1, c0, half, 0.0)
                if drop is not None:
                    e.masked_fill_(drop, 0.0)
                acc += e.sum(dim=1)
            else:
                s = q @ zt[:, c0:c1]
                _fill_bands(s, r0, r1, c0, half, -math.inf)
                if drop is not None:
                    s.masked_fill_(drop, -math.inf)
                m_new = torch.maximum(m, s.amax(dim=1))
                acc = acc * torch.exp(m - m_new) + torch.exp(s - m_new[:, None]).sum(dim=1)
                m = m_new
        lse[lo:lo + r1 - r0] = (torch.log(acc) + inv_tau) if fixed else (m + torch.log(acc))
    return lse


def contrastive_lse_backward_cpu(
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
) -> torch.Tensor:
    """Gradient of ``sum(grad_lse * lse)`` w.r.t. the first ``grad_rows`` rows of ``[za; zb]``
    (with a row subset: of its local rows; ``grad_lse`` and ``lse`` are the global [2B]
    vectors), recomputing the logits block by block (no N x N buffer).

    In the fixed-shift regime one exp per logit serves both roles:
    ``g[i] P[i, b] + g[b] P[b, i] = E[i, b] (a[i] + c[b])`` with ``E = exp(G - 1/tau)``,
    ``a = g exp(1/tau - lse)`` (both factors are finite there); otherwise two exps are used.
    """
    dt = compute_dtype(za, zb, lse)
    z = torch.cat([za, zb]).to(dt)
    total, half = z.shape[0], za.shape[0]
    check_global_vectors(total, grad_lse=grad_lse, lse=lse)
    g = grad_lse.to(dt)
    lse = lse.to(dt)
    fixed = 2.0 * inv_tau < FIXED_SHIFT_LIMIT[dt]
    coef = g * torch.exp(inv_tau - lse) if fixed else None
    spans = row_segments(half, row_offset, row_count, grad_rows)
    if _one_tile(spans, total, fixed):
        return _lse_backward_one_tile(z, coef, row_cluster, col_cluster, inv_tau, half,
                                      grad_rows)
    zs = z * inv_tau
    zt = z.T
    shift = torch.full((1, 1), -inv_tau, dtype=dt, device=z.device)
    feats = None
    if fixed and row_cluster is not None:
        feats = _cluster_features(row_cluster, col_cluster, dt)
    if feats is not None:
        # weights w[i, b] = a[i] [rc_i != cc_b] + c[b] [rc_b != cc_i] as two exact low-rank
        # products: a_i - a_i * onehot(rc_i).onehot(cc_b) sums a_i and -a_i (exactly 0 when
        # dropped), likewise for the column role
        oh_r, oh_c = feats[0] / -_BIG, feats[1]  # onehot(row cluster), onehot(col cluster)
        ones = torch.ones(total, 1, dtype=dt, device=z.device)
        cf = coef[:, None]
        wr_a = torch.cat([cf, -cf * oh_r], dim=1)  # row role, row side
        wr_b = torch.cat([ones, oh_c], dim=1).T  # row role, column side
        wc_a = torch.cat([ones, -oh_c], dim=1)  # column role, row side (i's column cluster)
        wc_b = torch.cat([cf, cf * oh_r], dim=1).T  # column role, column side (b's row cluster)
        row_cluster = col_cluster = None
    out = torch.empty(grad_rows, z.shape[1], dtype=dt, device=z.device)
    for r0, r1, lo in _row_blocks(spans):
        q = zs[r0:r1]
        acc = torch.zeros(r1 - r0, z.shape[1], dtype=dt, device=z.device)
        for c0 in range(0, total, BLOCK_COLS):
            c1 = min(total, c0 + BLOCK_COLS)
            drop_r = drop_c = None
            if row_cluster is not None:
                # the column role tests row b's cluster against row i's column cluster
                drop_r = row_cluster[r0:r1, None] == col_cluster[None, c0:c1]
                drop_c = row_cluster[None, c0:c1] == col_cluster[r0:r1, None]
            if fixed:
                # the bands are zeroed in E, so their weights do not matter (all are finite)
                e = torch.addmm(shift, q, zt[:, c0:c1]).exp_()
                _fill_bands(e, r0, r1, c0, half, 0.0)
                if feats is not None:
                    w = (wr_a[r0:r1] @ wr_b[:, c0:c1]).addmm_(wc_a[r0:r1], wc_b[:, c0:c1])
                elif drop_r is None:
                    w = coef[r0:r1, None] + coef[None, c0:c1]
                else:
                    w = torch.where(drop_r, 0.0, coef[r0:r1, None])
                    w.add_(torch.where(drop_c, 0.0, coef[None, c0:c1]))
                p = e.mul_(w)
            else:
                s = q @ zt[:, c0:c1]
                # the bands become exactly 0 after exp; non-kept entries may otherwise be inf:
                # replace them (never multiply them by zero)
                _fill_bands(s, r0, r1, c0, half, -math.inf)
                p = torch.exp(s - lse[r0:r1, None])
                p_c = torch.exp(s - lse[None, c0:c1])
                if drop_r is not None:
                    p.masked_fill_(drop_r, 0.0)
                    p_c.masked_fill_(drop_c, 0.0)
                p.mul_(g[r0:r1, None]).add_(p_c.mul_(g[None, c0:c1]))
            acc.addmm_(p, z[c0:c1])
        out[lo:lo + r1 - r0] = acc * inv_tau
    return out
