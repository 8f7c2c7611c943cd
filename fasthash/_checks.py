"""Argument checks shared by :mod:`fasthash.functional`, :mod:`fasthash.reference` and the search
modules: scalars, relaxed codes, {0, 1} bit masks and cluster ids.

Packed uint64 words are validated by :func:`fasthash.codes.as_words`, not here. Every check
raises ``TypeError`` (wrong kind) or ``ValueError`` (wrong value) naming the argument and the
expected value, so the fast paths and the references reject bad input with the same message.
"""

from __future__ import annotations

import math

import numpy as np
import torch

REDUCTIONS = ("mean", "sum", "none")
# Worker threads of one search call. The pool of the compiled core keeps its threads for the life
# of the process, so the count is bounded; csrc/include/fasthash/search.h (kMaxThreads, exported
# as fasthash._C.MAX_THREADS) checks the same bound.
MAX_THREADS = 1024
MAX_BITS = 1 << 20  # the longest code the compiled engine searches (and a HammingIndex holds)
MAX_RADIUS = (1 << 63) - 1  # the engine's int64 radius; any r >= the code length returns all
# the smallest normal float32: 1 / tau and log2(e) / tau (the kernels' logit scale) stay finite
MIN_TEMPERATURE = 2.0**-126
DEVICES = ("cpu", "cuda")  # where tensors may live (meta tensors hold no data to check)


def check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    """``int(value)`` for an integer in ``[lo, hi]`` (``hi=None``: no upper bound).

    bool is not an integer here (``k=True`` is a mistake, not 1).
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        rng = f"{lo} <= {name} <= {hi}" if hi is not None else f"{name} >= {lo}"
        raise ValueError(f"{name} must satisfy {rng}, got {v}")
    return v


def check_threads(num_threads: int | None) -> int:
    """The compiled engine's thread count: None -> 0 (every core), else an integer in
    ``[1, MAX_THREADS]`` (1024)."""
    if num_threads is None:
        return 0
    return check_int(num_threads, "num_threads", 1, MAX_THREADS)


def check_bits(bits, hi: int | None = None) -> int:
    """``int(bits)`` for a code length: an integer >= 1 (and <= ``hi`` when given)."""
    return check_int(bits, "bits", 1, hi)


def check_radius(r) -> int:
    """``int(r)`` for a search radius: an integer in ``[0, 2**63 - 1]`` (the engine's int64)."""
    return check_int(r, "r", 0, MAX_RADIUS)


def check_simd(simd) -> str:
    """A SIMD level name for the compiled engine ("" = the level in use); the engine checks the
    name itself (``fasthash._C.available_simd_levels()``)."""
    if simd is None:
        return ""
    if not isinstance(simd, str):
        raise TypeError(
            f"simd must be None or a level name ('scalar', 'avx2' or 'avx512'), "
            f"got {type(simd).__name__}"
        )
    return simd


def check_device(t: torch.Tensor, name: str) -> None:
    """Raise unless tensor ``t`` lives on the CPU or a CUDA device (a meta tensor has no data)."""
    if t.device.type not in DEVICES:
        raise ValueError(f"{name} must be on the CPU or a CUDA device, got {t.device.type}")


def _is_real(value) -> bool:
    """A Python or numpy real scalar, bool excluded (``temperature=True`` is a mistake)."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(
        value, (int, float, np.integer, np.floating)
    )


def check_temperature(temperature) -> float:
    """``float(temperature)`` for a finite number >= MIN_TEMPERATURE (Python or numpy scalar)."""
    if not (_is_real(temperature) and math.isfinite(temperature)
            and temperature >= MIN_TEMPERATURE):
        raise ValueError(
            f"temperature must be a finite number > 0, at least 2**-126 (~1.2e-38, so that "
            f"1 / temperature is finite in float32), got {temperature!r}"
        )
    return float(temperature)


def check_alpha(alpha) -> float:
    """``float(alpha)`` for a number in [0, 1] (Python or numpy scalar)."""
    if not (_is_real(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply a reduction accepted by :func:`check_reduction` to per-row losses."""
    if check_reduction(reduction) == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def check_codes(x, name: str, length: int | None = None) -> None:
    """Raise unless ``x`` is a finite floating-point ``[N, L]`` tensor (N, L >= 1) with
    ``L == length`` when given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_device(x, name)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of relaxed codes, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, L], got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one bit, got {tuple(x.shape)}")
    if length is not None and x.shape[1] != length:
        raise ValueError(f"{name} must have L = {length} bits per row, got {x.shape[1]}")
    if not torch.isfinite(x.detach()).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_like(
    v: torch.Tensor, name: str, like: torch.Tensor, like_name: str, *, device: bool = True
) -> None:
    """``v`` has as many rows as ``like`` and (when ``device``) lives on its device."""
    if v.shape[0] != like.shape[0]:
        raise ValueError(
            f"{name} must have B = {like.shape[0]} rows like {like_name}, got {v.shape[0]}"
        )
    if device and v.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like {like_name}, got {v.device}")


def check_probabilities(p: torch.Tensor, name: str) -> None:
    if ((p.detach() < 0) | (p.detach() > 1)).any():
        raise ValueError(f"{name} must hold probabilities in [0, 1]")


def check_bit_mask(
    mask, name: str, length: int, rows: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """A {0, 1} mask tensor ``[rows, length]`` (``rows=None``: a table ``[C, length]``, C >= 1),
    on ``device`` when given; returned detached."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    check_device(mask, name)
    want = f"[{rows}, {length}]" if rows is not None else f"[C, {length}] with C >= 1"
    if mask.ndim != 2 or mask.shape[1] != length or mask.shape[0] < 1:
        raise ValueError(f"{name} must have shape {want}, got {tuple(mask.shape)}")
    if rows is not None and mask.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got {mask.shape[0]}")
    m = mask.detach()
    if not ((m == 0) | (m == 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1")
    if device is not None and mask.device != device:
        raise ValueError(f"{name} must be on {device} like the codes, got {mask.device}")
    return m


def check_ids(
    ids, name: str, rows: int, n_table: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Cluster ids: an integer tensor ``[rows]`` in ``[0, n_table)`` (``n_table=None``: >= 0),
    on ``device`` when given; returned as int64."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an integer (int64/int32) torch.Tensor [{rows}], got {got}")
    check_device(ids, name)
    if ids.shape != (rows,):
        raise ValueError(f"{name} must have shape [{rows}], got {tuple(ids.shape)}")
    if device is not None and ids.device != device:
        raise ValueError(f"{name} must be on {device} like the codes, got {ids.device}")
    if rows:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (n_table is not None and hi >= n_table):
            want = f"[0, {n_table})" if n_table is not None else ">= 0"
            raise ValueError(f"{name} must hold cluster ids in {want}, got min {lo}, max {hi}")
    return ids.long()


def check_brcd_args(
    student: torch.Tensor,
    teachers: dict[str, torch.Tensor],
    mask_table: torch.Tensor | None,
    cluster_ids: torch.Tensor | None,
    aug_cluster_ids: torch.Tensor | None,
    *,
    alpha,
    temperature,
    reduction,
    same_device: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, float, float]:
    """Every check of the BRCD term, shared by the fused loss and its reference.

    Returns:
        ``(c, c_aug, alpha, temperature)``: int64 cluster ids (``c_aug`` defaults to ``c``;
        both None without clusters) and the checked scalars.
    """
    check_codes(student, "student")
    bsz, length = student.shape
    for name, t in teachers.items():
        check_codes(t, name, length)
        check_like(t, name, student, "student", device=same_device)
    tau = check_temperature(temperature)
    a = check_alpha(alpha)
    check_reduction(reduction)
    dev = student.device if same_device else None
    n_table = None
    if mask_table is not None:
        check_bit_mask(mask_table, "mask_table", length, device=dev)
        n_table = mask_table.shape[0]
    c = c_aug = None
    if cluster_ids is not None:
        c = check_ids(cluster_ids, "cluster_ids", bsz, n_table, dev)
    if aug_cluster_ids is not None:
        if c is None:
            raise ValueError("aug_cluster_ids needs cluster_ids")
        c_aug = check_ids(aug_cluster_ids, "aug_cluster_ids", bsz, n_table, dev)
    elif c is not None:
        c_aug = c
    if mask_table is not None and c is None and mask_table.shape[0] != 1:
        raise ValueError("cluster_ids is required when mask_table has more than one row")
    return c, c_aug, a, tau
