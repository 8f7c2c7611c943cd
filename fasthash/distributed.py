"""The fused contrastive losses over the global batch of a ``torch.distributed`` process group.

Used by :func:`fasthash.nt_xent_loss` and :func:`fasthash.brcd_contrastive_loss` when they get
``group=``. Each rank passes its local rows; the negatives are every row of every rank, and the
value is the single-process loss on the rank-major concatenation of the ranks' batches (ranks
may hold different numbers of rows).

How (per rank, ``n`` local rows, ``B`` global rows, L bits):

1. One small ``all_gather`` of a metadata vector (row count, L, dtype, hyper-parameters, an
   error flag) before any data moves: ranks that disagree, or a rank whose inputs failed their
   checks, make *every* rank raise the same error instead of leaving the others waiting.
2. ``all_gather`` of the normalised codes ``[n, 2L]`` (and of the cluster ids): O(B L).
3. The fused op streams the 2n local rows against all 2B global columns
   (``fasthash::contrastive_lse_rows``); no rank builds a local x global logit matrix, and
   no rank computes another rank's rows.
4. ``all_gather`` of the per-row ``lse`` and losses (vectors): the loss value.
5. Backward: ``all_gather`` of the upstream gradients (one scalar per rank for "mean"/"sum", the
   per-row vector for "none"); each rank then computes the gradient of its own rows over the
   global columns (``fasthash::contrastive_lse_rows_backward``). Nothing of size B x L is
   reduced or scattered.

Gradient convention (the one of ``torch.distributed.nn``): the inputs of rank r receive the
gradient, with respect to rank r's rows, of ``sum_q <grad_output_q, output_q>`` over all ranks
q. For "mean" / "sum" every rank returns the same global loss L, so with ``grad_output = 1``
each rank's backward receives ``world_size * dL/d(its local rows)``; DistributedDataParallel,
which averages parameter gradients over ranks, then yields exactly the parameter gradients of
one process on the global batch. Without DDP, average the parameter gradients over the ranks
(``all_reduce`` then divide by ``world_size``). For "none" each rank returns its own rows'
losses and receives the gradient of ``sum_q <w_q, rows_q>`` (no ``world_size`` factor).

Every rank must call the loss (and, when it needs gradients, backward) the same number of
times, as with DDP. Failures are turned into errors on every rank only up to step 1: one rank
failing later (e.g. out of memory in its local kernel) leaves the others waiting in the next
collective, bounded only by the process group's timeout. The nccl path (CUDA tensors, Triton
kernels with a row offset) is untested here: this project's CI has no GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .ops import registry as _ops

__all__ = ["check_group", "agree", "gather_rows", "global_contrastive_loss"]

# devices whose tensors a backend communicates (unknown backends are not checked)
_BACKEND_DEVICES = {"gloo": {"cpu"}, "nccl": {"cuda"}, "mpi": {"cpu", "cuda"},
                    "ucc": {"cpu", "cuda"}}
_META_LEN = 16  # fixed length of the metadata vector: every rank sends the same shape
_REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}


def check_group(group: Any) -> dist.ProcessGroup:
    """``group`` as a process group this rank belongs to, or a clear error (no collective).

    Args:
        group: what the caller passed as ``group=``.

    Returns:
        the group, unchanged.

    Raises:
        TypeError: not a ``ProcessGroup``. ValueError: torch.distributed missing or not
            initialised, or this rank not a member.

    Example:
        After ``torch.distributed.init_process_group("gloo")`` (not executed here)::

            pg = check_group(dist.group.WORLD)  # the same object back
            check_group("world")  # TypeError: group must be a ...ProcessGroup or None
    """
    if not dist.is_available():
        raise ValueError("group= needs torch.distributed, which this torch build lacks")
    if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("group must contain this rank: torch.distributed.new_group returned "
                         "NON_GROUP_MEMBER here because this process is not one of its ranks")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}"
        )
    if not dist.is_initialized():
        raise ValueError(
            "group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group first (torchrun sets the environment), or "
            "pass group=None for the single-process loss"
        )
    if dist.get_rank(group) < 0:
        raise ValueError("group must contain this rank (this process is not a member of group)")
    return group


def _backend_devices(group: dist.ProcessGroup) -> set[str] | None:
    name = str(dist.get_backend(group))
    if ":" in name:  # "cpu:gloo,cuda:nccl"
        return {pair.split(":")[0] for pair in name.split(",")}
    return _BACKEND_DEVICES.get(name)


def _meta_device(devices: set[str] | None, data: torch.device) -> torch.device:
    """The device of the metadata exchange: fixed by the backend (every rank picks the same
    kind, whatever its data), the CPU when the backend talks CPU."""
    if devices is None:
        return data
    if "cpu" in devices:
        return torch.device("cpu")
    return data if data.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def _check_device(device: torch.device, devices: set[str] | None, group, name: str) -> None:
    if devices is not None and device.type not in devices:
        backend = dist.get_backend(group)
        want = " or ".join(sorted(devices))
        raise ValueError(
            f"{name} is on {device} but group's backend {backend!r} communicates {want} "
            f"tensors: move the codes to {want}, or use a group of a matching backend (nccl "
            "for CUDA tensors, gloo for CPU tensors)"
        )


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x.contiguous(), group=group)
    return out


def gather_rows(
    x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup, blocks: int = 1
) -> torch.Tensor | list[torch.Tensor]:
    """Rank-major concatenation of every rank's ``x`` (``[sizes[rank], ...]``), sizes unequal
    allowed: each rank pads to ``max(sizes)`` rows for one ``all_gather``. With ``blocks = k``,
    ``x`` is k stacked blocks of ``sizes[rank]`` rows and the result the k global blocks.

    Args:
        x: this rank's rows ``[blocks * sizes[rank], ...]``. sizes: every rank's row count (from
            :func:`agree`). group: the process group. blocks: the number of stacked blocks.

    Shape:
        ``[blocks * n, ...]`` -> ``[sum(sizes), ...]`` (a list of ``blocks`` of them if > 1).

    Returns:
        the global rows (every rank gets the same).

    Example:
        On 2 ranks holding 2 and 1 rows (not executed here)::

            x = torch.full((2,) if rank == 0 else (1,), float(rank))
            gather_rows(x, [2, 1], dist.group.WORLD)  # tensor([0., 0., 1.]) on both ranks
    """
    n_max, n = max(sizes), sizes[dist.get_rank(group)]
    buf = x.new_zeros((blocks * n_max, *x.shape[1:]))
    for j in range(blocks):
        buf[j * n_max : j * n_max + n] = x[j * n : (j + 1) * n]
    parts = _all_gather(buf, group)
    out = [torch.cat([p[j * n_max : j * n_max + s] for p, s in zip(parts, sizes, strict=True)])
           for j in range(blocks)]
    return out[0] if blocks == 1 else out


def _raise_everywhere(group, err: Exception | None, flags: list[bool], what: str) -> None:
    """Every rank raises: the failing rank its own error, the others a TypeError (for a
    TypeError there) or a ValueError naming the rank, the error's class and its message."""
    msgs: list[Any] = [None] * len(flags)
    local = None if err is None else (type(err).__name__, str(err))
    dist.all_gather_object(msgs, local, group=group)
    if err is not None:
        raise err
    bad = next(r for r, f in enumerate(flags) if f)
    kind, msg = msgs[bad]
    cls = TypeError if kind == "TypeError" else ValueError
    if kind not in ("TypeError", "ValueError"):
        msg = f"{kind}: {msg}"
    raise cls(f"{what}: rank {bad} of group rejected its inputs, so every rank stops: {msg}")


def agree(
    group: Any,
    what: str,
    device: torch.device,
    prepare: Callable[[], tuple[Any, int, dict[str, float]]],
) -> tuple[Any, list[int]]:
    """Run the local checks and preparation ``prepare() -> (result, rows, fields)`` under one
    metadata ``all_gather``, so that bad input on any rank, or ranks that disagree on a field
    (code length, dtype, hyper-parameters), raise on every rank. Any exception of
    ``prepare`` counts (not only ``TypeError`` / ``ValueError``), so no rank is left waiting in
    the metadata exchange. A failure after it, once data moves (e.g. out of memory in the local
    kernel), is bounded only by the process group's timeout.

    Args:
        group: the process group (checked by :func:`check_group`). what: the loss's name, for
            the messages. device: the device of the codes (checked against the backend).
        prepare: the local checks and preparation; raises on bad input.

    Returns:
        ``(result, sizes)``: ``prepare``'s result and ``sizes[q]``, the row count of rank q.

    Example:
        Every rank of a 2-rank gloo group calls it (not executed here)::

            result, sizes = agree(dist.group.WORLD, "my_loss", torch.device("cpu"),
                                  lambda: (x * 2, x.shape[0], {"the code length L": L}))
            # rank 0 with 3 rows, rank 1 with 5: sizes == [3, 5] on both ranks
    """
    pg = check_group(group)
    devices = _backend_devices(pg)
    err, result, rows, fields = None, None, 0, {}
    try:
        _check_device(device, devices, pg, "the codes")
        result, rows, fields = prepare()
        if len(fields) > _META_LEN - 2:
            raise AssertionError("too many metadata fields")  # a programming error
    except Exception as e:  # noqa: BLE001 - any local failure must reach every rank
        err = e
    meta = torch.zeros(_META_LEN, dtype=torch.float64)
    meta[0], meta[1] = float(err is not None), float(rows)
    meta[2 : 2 + len(fields)] = torch.tensor(list(fields.values()), dtype=torch.float64)
    gathered = torch.stack(_all_gather(meta.to(_meta_device(devices, device)), pg)).cpu()
    flags = [bool(f) for f in gathered[:, 0]]
    if any(flags):
        _raise_everywhere(pg, err, flags, what)
    for j, name in enumerate(fields):
        col = gathered[:, 2 + j]
        if not bool((col == col[0]).all()):
            vals = ", ".join(f"rank {r} has {v:g}" for r, v in enumerate(col.tolist()))
            raise ValueError(f"{what}: the ranks of group disagree on {name}: {vals}")
    return result, [int(v) for v in gathered[:, 1]]


def _global_index(n: int, off: int, total: int, device) -> torch.Tensor:
    """Global row numbers of the 2n local rows (student rows, then their teacher rows)."""
    r = torch.arange(off, off + n, device=device)
    return torch.cat([r, r + total])


class _GlobalContrastive(torch.autograd.Function):
    """Local rows of the fused contrastive loss against the gathered global batch."""

    @staticmethod
    def forward(ctx, za, zb, pos, ids, inv_tau, reduction, group, sizes):
        rank = dist.get_rank(group)
        n, off = sizes[rank], sum(sizes[:rank])
        za_g, zb_g = gather_rows(torch.cat([za, zb]), sizes, group, blocks=2)
        rc = cc = None
        if ids is not None:
            c = gather_rows(ids, sizes, group)
            rc, cc = torch.cat([c[:, 0], c[:, 0]]), torch.cat([c[:, 0], c[:, 1]])
        lse = _ops.contrastive_lse_rows(za_g, zb_g, pos, rc, cc, inv_tau, off, n)
        rows = lse - torch.cat([pos, pos]).to(lse.dtype)
        ls, lt, rs, rt = gather_rows(torch.cat([lse, rows]), sizes, group, blocks=4)
        lse_g = torch.cat([ls, lt])
        ctx.save_for_backward(za_g, zb_g, pos, lse_g, rc, cc)
        ctx.meta = (inv_tau, reduction, group, sizes)
        if reduction == "none":
            return rows
        rows_g = torch.cat([rs, rt])  # the single-process row order
        return rows_g.mean() if reduction == "mean" else rows_g.sum()

    @staticmethod
    def backward(ctx, grad):
        za_g, zb_g, pos, lse_g, rc, cc = ctx.saved_tensors
        inv_tau, reduction, group, sizes = ctx.meta
        rank, total = dist.get_rank(group), sum(sizes)
        n, off = sizes[rank], sum(sizes[:rank])
        grad = grad.to(lse_g.dtype)
        if reduction == "none":
            g = torch.cat(gather_rows(grad.contiguous(), sizes, group, blocks=2))
        else:  # every rank's output is the same L: the objective is sum_q grad_q * L
            tot = torch.cat(_all_gather(grad.reshape(1), group)).sum()
            g = (tot / (2 * total) if reduction == "mean" else tot).expand(2 * total).contiguous()
        need_a, need_b, need_pos = ctx.needs_input_grad[:3]
        ga = gb = gp = None
        if need_a or need_b:
            rows = 2 * n if need_b else n
            gz = _ops.contrastive_lse_rows_backward(g, za_g, zb_g, lse_g, rc, cc, inv_tau,
                                                    off, n, rows)
            ga = gz[:n] if need_a else None
            gb = gz[n:] if need_b else None
        if need_pos:
            idx = _global_index(n, off, total, g.device)
            g_loc, lse_loc = g[idx], lse_g[idx]
            # d rows[a] / d pos[k] = exp(pos[k] - lse[a]) - 1 for the two rows a = k, n + k
            p = (torch.exp(torch.cat([pos, pos]).to(lse_g.dtype) - lse_loc) - 1.0) * g_loc
            gp = (p[:n] + p[n:]).to(pos.dtype)
        return ga, gb, gp, None, None, None, None, None


def global_contrastive_loss(
    za: torch.Tensor,
    zb: torch.Tensor,
    pos: torch.Tensor,
    ids: torch.Tensor | None,
    inv_tau: float,
    reduction: str,
    group: dist.ProcessGroup,
    sizes: list[int],
) -> torch.Tensor:
    """The fused contrastive loss of this rank's rows over the global batch of ``group``.

    Args:
        za, zb: this rank's normalised (masked) codes ``[n, L]`` of the two halves; pos: their
            positive logits ``[n]``; ids: ``[n, 2]`` int64 (cluster, augmented-view cluster) or
            None. inv_tau: 1 / tau. reduction: "mean", "sum" or "none". group: the process
            group; sizes: every rank's row count (from :func:`agree`).

    Returns:
        the global loss (the same on every rank) for "mean" / "sum"; this rank's ``2n`` row
        losses (student rows, then teacher rows) for "none". Gradients follow the convention of
        the module docstring.

    Example:
        What :func:`fasthash.nt_xent_loss` does with ``group=`` (not executed here)::

            (za, zb, pos, inv_tau), sizes = agree(pg, "nt_xent_loss", z1.device, prepare)
            loss = global_contrastive_loss(za, zb, pos, None, inv_tau, "mean", pg, sizes)
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(_REDUCTIONS)}, got {reduction!r}")
    return _GlobalContrastive.apply(za, zb, pos, ids, inv_tau, reduction, group, sizes)


def reduction_code(reduction: str) -> float:
    """The metadata code of a reduction (an unknown one is refused by the loss's own check)."""
    return float(_REDUCTIONS.get(reduction, -1))
