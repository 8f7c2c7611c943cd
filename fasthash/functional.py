"""Differentiable bit-masked Hamming similarity, the fused BRCD / NT-Xent losses and packed
Hamming distances.

Each function validates its inputs (``ValueError`` / ``TypeError`` naming the argument), then calls
a ``fasthash::`` custom op (:mod:`fasthash.ops.registry`): Triton kernels on CUDA, a blocked torch
implementation on CPU. The losses never materialise the 2B x 2B logits: only per-row statistics
are saved and the backward recomputes the logits tile by tile. Values and gradients equal the
specification in :mod:`fasthash.reference` (tested against float64).

Half-precision (fp16 / bf16) and float32 inputs are computed in float32; float64 inputs in
float64. Outputs are float32 (float64 for float64 inputs); input gradients have the input dtype.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import distributed as _dist
from . import reference as ref
from ._checks import (
    check_bit_mask,
    check_brcd_args,
    check_codes,
    check_ids,
    check_like,
    check_reduction,
    check_temperature,
    check_threads,
    reduce_rows,
)
from .codes import as_search_words
from .env import warn_once
from .ops import registry as _ops
from .ops.blocked import compute_dtype, normalize_rows

if TYPE_CHECKING:  # annotations only: builds without torch.distributed import this module too
    from torch.distributed import ProcessGroup

__all__ = [
    "masked_hamming_similarity",
    "brcd_contrastive_loss",
    "nt_xent_loss",
    "hamming_distance",
]

MaskArg = torch.Tensor | tuple | list | None


def _canon_mask(
    mask: MaskArg, name: str, rows: int, length: int, dt: torch.dtype, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A mask argument as ``(table [C, L] in dtype dt, ids [rows] or None)``."""
    if mask is None:
        return None, None
    if isinstance(mask, (tuple, list)):
        if len(mask) != 2:
            raise ValueError(f"{name} as a tuple must be (mask_table [C, {length}], ids [{rows}])")
        table, ids = mask
        check_bit_mask(table, f"{name}[0] (mask_table)", length, device=device)
        ids = check_ids(ids, f"{name}[1] (ids)", rows, table.shape[0], device)
        return table.to(dt).contiguous(), ids
    check_bit_mask(mask, name, length, rows, device)
    return mask.to(dt), None


# --------------------------------------------------------------------------- similarity


def masked_hamming_similarity(
    x: torch.Tensor,
    y: torch.Tensor,
    mask_x: MaskArg = None,
    mask_y: MaskArg = None,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    r"""Bit-masked Hamming (cosine) similarity of relaxed codes, differentiable.

    .. math:: S[a, b] = \frac{\sum_j m^x_{aj} m^y_{bj} x_{aj} y_{bj}}
                             {\lVert m^x_a \odot x_a \rVert \lVert m^y_b \odot y_b \rVert}

    (0 when a masked norm is 0). On ±1 codes this is
    ``(popcount(I) - 2 popcount((x XOR y) AND I)) / sqrt(|m_a| |m_b|)``; unmasked it is
    ``1 - 2 hamming / L``. ``normalize=False`` returns the raw masked inner product (the
    numerator). Masked-out bits get exactly zero gradient.

    Args:
        x: relaxed codes (float32, bf16, fp16 or float64). y: relaxed codes with the same L.
        mask_x: None (all ones), a {0, 1} tensor ``[N, L]``, or the BRCD form
            ``(mask_table [C, L], ids [N])`` meaning row a uses ``mask_table[ids[a]]``.
        mask_y: the same for y (``[M, L]`` or ``(mask_table, ids [M])``).
        normalize: divide by the masked norms (cosine) or not (inner product).

    Shape:
        x ``[N, L]``, y ``[M, L]`` -> ``[N, M]``.

    Returns:
        float32 similarities (float64 for float64 inputs).

    Example:
        >>> x = torch.tensor([[1., -1., 1., 1.]]); y = torch.tensor([[1., 1., 1., -1.]])
        >>> masked_hamming_similarity(x, y)
        tensor([[0.]])
        >>> m = torch.tensor([[1, 0, 1, 0]])  # keep bits 0 and 2, where x and y agree
        >>> round(masked_hamming_similarity(x, y, m, m).item(), 6)
        1.0
    """
    check_codes(x, "x")
    check_codes(y, "y", x.shape[1])
    if y.device != x.device:
        raise ValueError(f"y must be on {x.device} like x, got {y.device}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    dt = compute_dtype(x, y)
    length = x.shape[1]
    mxt, mxi = _canon_mask(mask_x, "mask_x", x.shape[0], length, dt, x.device)
    myt, myi = _canon_mask(mask_y, "mask_y", y.shape[0], length, dt, x.device)
    return _ops.masked_similarity(x, y, mxt, mxi, myt, myi, normalize)


# --------------------------------------------------------------------------- losses


def brcd_contrastive_loss(
    student: torch.Tensor,
    teacher_same: torch.Tensor,
    teacher_other: torch.Tensor,
    *,
    mask_table: torch.Tensor | None = None,
    cluster_ids: torch.Tensor | None = None,
    aug_cluster_ids: torch.Tensor | None = None,
    alpha: float = 0.8,
    temperature: float = 0.3,
    reduction: str = "mean",
    detach_teacher: bool = True,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    r"""The BRCD distillation term (BRCD_SPEC §3-5), fused: the 2B x 2B logits are never built.

    With ``m_k = mask_table[cluster_ids[k]]``, ``Z = [m ⊙ s ; m ⊙ t']`` (2B rows),
    ``G = S(Z, Z) / τ`` (masked cosine), ``A_k = cos(s_k, t_k) / τ`` and positive
    ``P_k = α_k A_k + (1 - α_k) G[k, B + k]`` (``α_k = 1`` when ``aug_cluster_ids[k] !=
    cluster_ids[k]``, an offset positive), row a (sample k = a mod B) contributes
    ``-P_k + log(exp(P_k) + Σ_b exp(G[a, b]))`` over its negatives b: every row but a and its
    partner, minus false negatives (columns of a's cluster; student columns use ``cluster_ids``,
    teacher columns ``aug_cluster_ids``). Equals :func:`fasthash.reference.brcd_loss_ref`.

    Memory is O(B·L): the forward keeps one log-sum-exp per row (online over column tiles) and
    the backward recomputes the logits tile by tile.

    Args:
        student: student codes s (view 1); gradients flow here.
        teacher_same: teacher codes t of the same view. teacher_other: teacher codes t' of the
            other view. Both are detached unless ``detach_teacher=False``.
        mask_table: {0, 1} per-cluster bit masks M ``[C, L]`` or None (all ones). A one-row table
            applies to every sample without ``cluster_ids``.
        cluster_ids: c ``[B]`` (int64/int32 in [0, C)) or None (no false negatives).
        aug_cluster_ids: ĉ ``[B]``, nearest centroid of the unmasked t', or None (= c).
        alpha: weight of the individual-space positive, in [0, 1].
        temperature: τ > 0.
        reduction: "mean" (over the 2B rows), "sum" or "none" (per-row losses ``[2B]``).
        detach_teacher: stop gradients into the teacher codes (default True).
        group: a ``torch.distributed`` process group, or None (this process's rows only). With
            a group each rank passes its local rows (their codes, ids and the same
            ``mask_table``); the negatives are every row of every rank and the value is the
            loss of one process on the rank-major concatenation of the ranks' batches (sizes
            may differ). "mean" / "sum" return that global loss on every rank; "none" returns
            this rank's ``2B_local`` row losses. Gradient convention: with ``grad_output = 1``
            on every rank, each rank's backward receives ``world_size x dL/d(its rows)`` of the
            global L, which DistributedDataParallel's averaging turns into the gradients of one
            process on the global batch; without DDP average the ranks' gradients (details:
            :mod:`fasthash.distributed`). Every rank must call it (and backward) alike.

    Shape:
        student, teacher_same, teacher_other ``[B, L]``; ids ``[B]`` -> scalar or ``[2B]``.

    Returns:
        float32 loss (float64 for float64 student codes).

    Example:
        >>> s = torch.tensor([[1., -1.], [-1., 1.]]); brcd_contrastive_loss(s, s, s).item() < 0.1
        True
    """
    args = (student, teacher_same, teacher_other, mask_table, cluster_ids, aug_cluster_ids,
            alpha, temperature, reduction, detach_teacher)
    if group is not None:
        return _brcd_global(args, group)
    zs, zt, pos, c, c_aug, inv_tau = _brcd_parts(*args)
    if c is None:
        row_cl = col_cl = None
    else:
        row_cl = torch.cat([c, c])
        col_cl = torch.cat([c, c_aug])
    lse = _ops.contrastive_lse_auto(zs, zt, pos, row_cl, col_cl, inv_tau)
    return reduce_rows(lse - torch.cat([pos, pos]), reduction)


def _brcd_parts(
    student, teacher_same, teacher_other, mask_table, cluster_ids, aug_cluster_ids,
    alpha, temperature, reduction, detach_teacher,
):
    """Checked inputs of the BRCD term as ``(zs, zt, pos, c, c_aug, 1 / tau)``: masked,
    normalised student and teacher rows, positives and int64 cluster ids (or None)."""
    teachers = {"teacher_same": teacher_same, "teacher_other": teacher_other}
    c, c_aug, alpha, tau = check_brcd_args(
        student, teachers, mask_table, cluster_ids, aug_cluster_ids,
        alpha=alpha, temperature=temperature, reduction=reduction,
    )
    inv_tau = 1.0 / tau
    dt = compute_dtype(student)
    s = student.to(dt)
    t = teacher_same.to(dt)
    t2 = teacher_other.to(dt)
    if detach_teacher:
        t, t2 = t.detach(), t2.detach()
    if mask_table is None:
        m = None
    elif c is None:  # a one-row table (checked)
        m = mask_table[0].to(dt)
    else:
        m = mask_table.to(dt)[c]
    zs = normalize_rows(s if m is None else s * m)
    zt = normalize_rows(t2 if m is None else t2 * m)
    a_ind = (normalize_rows(s) * normalize_rows(t)).sum(dim=1) * inv_tau
    g_pos = (zs * zt).sum(dim=1) * inv_tau
    # alpha rounded to the compute dtype first, as a dtype tensor would be: then 1 - alpha is
    # exact in float64 and rounds like the dtype's own subtraction, and the two weights sum to
    # 1 in that dtype (rounding 1 - alpha from the float64 alpha shifts every positive by an ulp)
    a32 = float(np.float32(alpha)) if dt == torch.float32 else alpha
    pos = a32 * a_ind + (1.0 - a32) * g_pos
    if c is not None:
        # alpha_k = 1 (an offset positive): 1 * a + 0 * g is exactly a, so select a_ind
        pos = torch.where(c_aug != c, a_ind, pos)
    return zs, zt, pos, c, c_aug, inv_tau


def _brcd_global(args: tuple, group) -> torch.Tensor:
    """:func:`brcd_contrastive_loss` over the global batch of ``group``."""
    student, mask_table, alpha, temperature, reduction, detach_teacher = (
        args[0], args[3], *args[6:10])

    def prepare():
        parts = _brcd_parts(*args)
        zs, zt, pos, c = parts[:4]
        table = -1.0 if mask_table is None else float(mask_table.shape[0])
        fields = {
            **_common_fields("brcd_contrastive_loss", zs, zt, pos, reduction),
            "alpha": float(alpha), "temperature": float(temperature),
            "detach_teacher": float(bool(detach_teacher)),
            "whether cluster ids are given": float(c is not None),
            "the mask_table rows C": table, "the mask_table contents (checksum)":
                0.0 if mask_table is None else _checksum(mask_table),
        }
        return parts, student.shape[0], fields

    parts, sizes = _dist.agree(group, "brcd_contrastive_loss", _device_of(student), prepare)
    zs, zt, pos, c, c_aug, inv_tau = parts
    ids = None if c is None else torch.stack([c, c_aug], dim=1)
    return _dist.global_contrastive_loss(zs, zt, pos, ids, inv_tau, reduction, group, sizes)


def _common_fields(kind: str, za, zb, pos, reduction: str) -> dict[str, float]:
    """Metadata every rank of a distributed loss must agree on (see fasthash.distributed)."""
    needs_grad = torch.is_grad_enabled() and (za.requires_grad or zb.requires_grad
                                              or pos.requires_grad)
    return {
        "the loss called (0 NT-Xent, 1 BRCD)": float(kind == "brcd_contrastive_loss"),
        "the code length L": float(za.shape[1]),
        "the compute dtype (0 float32, 1 float64)": float(za.dtype == torch.float64),
        "the device type (0 CPU, 1 CUDA)": float(za.device.type == "cuda"),
        "the reduction (0 mean, 1 sum, 2 none)": _dist.reduction_code(reduction),
        "whether a backward will run (grad mode and inputs requiring grad)": float(needs_grad),
    }


def _device_of(x) -> torch.device:
    """The device of a tensor argument (the CPU for a non-tensor, which its check refuses)."""
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _checksum(table: torch.Tensor) -> float:
    """CRC32 of a {0, 1} table's bits (as uint8, row-major; its shape is agreed separately),
    whatever its dtype: equal tables give equal values; tables differing only within 4
    consecutive entries (a CRC32 burst) never do, others with probability about 2**-32 (a
    weighted sum collided on swapped entries). The value is exact in float64 metadata."""
    data = table.detach().to(torch.uint8).cpu().contiguous().numpy()
    return float(zlib.crc32(data.tobytes()))


def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.3,
    *,
    reduction: str = "mean",
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    r"""SimCLR NT-Xent over the 2B rows of two views (cosine similarity), fused.

    Row a's positive is its other view ``(a + B) mod 2B``; its negatives are the other 2B - 2
    rows: ``L = mean_a [-s[a, p(a)] + log Σ_{b≠a} exp(s[a, b])]``, ``s = cos / τ``. Equals
    :func:`fasthash.reference.nt_xent_ref`; gradients reach both views. O(B·L) memory.

    Args:
        z1, z2: the two views' relaxed codes. temperature: τ > 0.
        reduction: "mean", "sum" or "none" (per-row ``[2B]``).
        group: a ``torch.distributed`` process group, or None (this process's rows only). With
            a group the negatives are every row of every rank and the value is the loss of one
            process on the rank-major concatenation of the ranks' batches; the reductions and
            the gradient convention (``world_size x dL/d(local rows)`` per rank, what DDP
            expects) are those of :func:`brcd_contrastive_loss`.

    Shape:
        ``[B, L]`` and ``[B, L]`` -> scalar (or ``[2B]``).

    Returns:
        float32 loss (float64 for float64 inputs).

    Example:
        >>> z = torch.eye(4); bool(nt_xent_loss(z[:2], z[:2]) < nt_xent_loss(z[:2], z[2:]))
        True
    """
    if group is not None:
        return _nt_xent_global(z1, z2, temperature, reduction, group)
    za, zb, pos, inv_tau = _nt_xent_parts(z1, z2, temperature, reduction)
    lse = _ops.contrastive_lse_auto(za, zb, pos, None, None, inv_tau)
    return reduce_rows(lse - torch.cat([pos, pos]), reduction)


def _nt_xent_parts(z1, z2, temperature, reduction):
    """Checked inputs of NT-Xent as ``(za, zb, pos, 1 / tau)``."""
    check_codes(z1, "z1")
    check_codes(z2, "z2", z1.shape[1])
    check_like(z2, "z2", z1, "z1")
    inv_tau = 1.0 / check_temperature(temperature)
    check_reduction(reduction)
    dt = compute_dtype(z1, z2)
    za = normalize_rows(z1.to(dt))
    zb = normalize_rows(z2.to(dt))
    pos = (za * zb).sum(dim=1) * inv_tau
    return za, zb, pos, inv_tau


def _nt_xent_global(z1, z2, temperature, reduction, group) -> torch.Tensor:
    """:func:`nt_xent_loss` over the global batch of ``group``."""

    def prepare():
        parts = _nt_xent_parts(z1, z2, temperature, reduction)
        fields = {**_common_fields("nt_xent_loss", *parts[:3], reduction),
                  "temperature": float(temperature)}
        return parts, z1.shape[0], fields

    (za, zb, pos, inv_tau), sizes = _dist.agree(group, "nt_xent_loss", _device_of(z1), prepare)
    return _dist.global_contrastive_loss(za, zb, pos, None, inv_tau, reduction, group, sizes)


# --------------------------------------------------------------------------- packed distances


def hamming_distance(
    x_words: np.ndarray | torch.Tensor,
    y_words: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    *,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Exact all-pairs (masked) Hamming distances of packed codes.

    ``D[i, j] = popcount((x_i XOR y_j) AND m_i)``, ``m_i`` a global mask ``[W]``, the i-th row of
    a per-query mask ``[Q, W]``, or all ones. CPU: the compiled core ``fasthash._C`` (threaded,
    SIMD), or the pure-torch reference after a one-time warning when ``_C`` is missing; CUDA: a
    Triton kernel (hardware popcount).

    Args:
        x_words: packed query words (numpy uint64 or torch int64, layout of
            :mod:`fasthash.codes`). y_words: packed gallery words. mask: packed mask words.
        num_threads: CPU worker threads, 1 to 1024 (default: every core). Results do not
            depend on it.

    Shape:
        ``[Q, W]`` x ``[N, W]`` -> ``[Q, N]``.

    Returns:
        int32 distances (a torch tensor on the device of the inputs).

    Example:
        >>> hamming_distance(np.array([[5]], np.uint64), np.array([[6], [5]], np.uint64))
        tensor([[2, 0]], dtype=torch.int32)
    """
    q, x, m = as_search_words(
        x_words, y_words, mask, names=("x_words", "y_words", "mask"), to="torch", nonempty=False
    )
    threads = check_threads(num_threads)
    if x.shape[0] == 0:  # every path agrees on an empty gallery: no distances
        return torch.zeros(q.shape[0], 0, dtype=torch.int32, device=q.device)
    if q.is_cuda:
        from .ops.hamming_topk_triton import hamming_distance_forward

        return hamming_distance_forward(q, x, m)
    from . import _C, HAS_C

    if HAS_C:
        qn, xn = (np.ascontiguousarray(t.numpy()).view(np.uint64) for t in (q, x))
        mn = None if m is None else np.ascontiguousarray(m.numpy()).view(np.uint64)
        return torch.from_numpy(_C.hamming_distances(qn, xn, mask=mn, num_threads=threads))
    warn_once(
        "hamming_distance:reference",
        "fasthash._C is not built: fasthash.hamming_distance runs the pure-torch reference "
        "(fasthash.reference.hamming_distance_ref), 10-100x slower. Build it with "
        "'python setup.py build_ext --inplace'.",
    )
    return ref.hamming_distance_ref(q, x, m).to(torch.int32)

