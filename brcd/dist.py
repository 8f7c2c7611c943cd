"""Multi-process training on torch.distributed: ``torchrun ... -m brcd train-teacher|distill``.

brcd builds no transport of its own; under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` in the environment) :func:`init` starts the default process group (nccl on
CUDA, gloo on CPU, with a timeout) and the stages then:

* take, per step, rank r's rows ``[r·B/W, (r+1)·B/W)`` of the single-process batch of the
  configured (global) size B, with the same augmented views (:meth:`Dist.share`), so the
  rank-major concatenation of the ranks' rows IS the single-process batch;
* compute the losses over the global batch: the fused NT-Xent / BRCD terms with ``group=``,
  the in-batch KD baselines on rows gathered with autograd (:func:`gather_with_grad`);
  BatchNorm layers use the global batch's statistics (:func:`sync_batchnorm`). Each rank's
  backward receives ``W × ∂L/∂(its rows)`` and DDP averages the parameter gradients over the
  W ranks, so one step equals a single process's step on the global batch;
* wrap the trainable module in ``DistributedDataParallel`` (:meth:`Dist.wrap`);
* write checkpoints, metrics and logs and show progress on rank 0 only; build the view cache
  on rank 0 while the others wait (:meth:`Dist.solo`); encode validation sets in shards and
  gather the codes, rank 0 scores them (:meth:`Dist.gather_rows`, :meth:`Dist.broadcast`).

Without torchrun :func:`current` is the single-process :class:`Dist` and nothing changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Dist", "current", "launched", "env_world_size", "init", "shutdown",
           "check_divisible", "gather_with_grad", "sync_batchnorm", "DEFAULT_TIMEOUT",
           "SOLO_FACTOR"]

DEFAULT_TIMEOUT = 600.0  # seconds a collective of a training step may wait for the other ranks
SOLO_FACTOR = 6  # rank 0's one-off work (view cache) may take this many timeouts

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` (``local_rank`` on its node).

    ``group`` is the default process group (None in a single process): the losses, DDP and
    BatchNorm use it on the training device. ``side`` is a gloo group (same timeout) for CPU
    tensors and objects; the wait for rank 0's solo work (:meth:`solo`) may take
    ``SOLO_FACTOR`` timeouts.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None
    side: Any = None
    device: torch.device | None = None
    timeout_s: float = DEFAULT_TIMEOUT
    owned: bool = False  # init started the default group (shutdown destroys it)

    @property
    def enabled(self) -> bool:
        """Whether this process is one rank of a torch.distributed job."""
        return self.group is not None

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, logs and shows progress."""
        return self.rank == 0

    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows ``[r·B/W, (r+1)·B/W)`` of a global batch ``rows`` (all of it in a
        single process).

        Example:
            >>> Dist(rank=1, world=2).share(torch.arange(6)).tolist()
            [3, 4, 5]
        """
        if self.world == 1:
            return rows
        b = rows.shape[0] // self.world
        return rows[self.rank * b:(self.rank + 1) * b]

    def shard(self, n: int) -> tuple[int, int]:
        """``[lo, hi)`` of this rank's contiguous part of ``n`` items (sizes differ by <= 1).

        Example:
            >>> [Dist(rank=r, world=3).shard(7) for r in range(3)]
            [(0, 2), (2, 4), (4, 7)]
        """
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def wrap(self, module: nn.Module, method: str = "forward") -> nn.Module:
        """``module`` (or its ``method``) behind DistributedDataParallel; ``module`` itself in a
        single process. The parameters stay ``module``'s (checkpoint ``module.state_dict()``)."""
        if not self.enabled:
            return module if method == "forward" else getattr(module, method)
        from torch.nn.parallel import DistributedDataParallel as DDP

        target = module if method == "forward" else _Method(module, method)
        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" \
            else None
        return DDP(target, device_ids=ids, process_group=self.group)

    def mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of each value (``values`` itself in a single process): what a
        step logs, so the log and the finiteness check are the same on every rank."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.side)
        return (t / self.world).tolist()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (a picklable object)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.side)
        return box[0]

    @contextmanager
    def solo(self) -> Iterator[bool]:
        """Run the block's work on rank 0 only (``with d.solo() as mine: if mine: ...``); the
        other ranks wait at a barrier after it, up to ``SOLO_FACTOR`` timeouts. A rank-0
        failure inside the block reaches the others as a failed barrier."""
        yield self.main
        if self.enabled:
            dist.monitored_barrier(group=self.side,
                                   timeout=timedelta(seconds=self.timeout_s * SOLO_FACTOR))

    def gather_rows(self, part: torch.Tensor) -> torch.Tensor:
        """Concatenation in rank order of every rank's CPU ``part`` (its rows may differ in
        number by rank: :meth:`shard`); ``part`` itself in a single process. No gradient."""
        if not self.enabled:
            return part
        part = part.detach().cpu().contiguous()
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([part.shape[0]]), group=self.side)
        n_max = int(max(s.item() for s in sizes))
        pad = torch.zeros((n_max, *part.shape[1:]), dtype=part.dtype)
        pad[:part.shape[0]] = part
        out = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(out, pad, group=self.side)
        return torch.cat([o[:int(s.item())] for o, s in zip(out, sizes, strict=True)])

    def sharded(self, n: int, fn: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """``fn(0, n)`` computed as ``fn(lo, hi)`` on every rank's :meth:`shard`, gathered
        (fewer than ``world`` rows: on rank 0, broadcast)."""
        if not self.enabled:
            return fn(0, n)
        if n < self.world:
            return self.broadcast(fn(0, n) if self.main else None)
        return self.gather_rows(fn(*self.shard(n)))


class _Method(nn.Module):
    """``module.<method>`` as a module's forward (DDP needs its forward to run)."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.inner, self.method = module, method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, self.method)(*args, **kwargs)


_CURRENT = Dist()


def current() -> Dist:
    """This process's :class:`Dist` (the single-process one unless :func:`init` ran)."""
    return _CURRENT


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one rank of a job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None and default is not None:
        return default
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name} must be an integer (set by torchrun), "
                         f"got {raw!r}") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` of a launched process, else 1."""
    return _env_int("WORLD_SIZE") if launched() else 1


def check_divisible(batch_size: int, key: str, world: int) -> None:
    """The global batch splits evenly over the ranks, else ``ValueError`` naming ``key``.

    Example:
        >>> try:
        ...     check_divisible(32, "student.train.batch_size", 3)
        ... except ValueError as err:
        ...     print(str(err)[:63])
        student.train.batch_size=32 does not divide by the world size 3
    """
    if world > 1 and batch_size % world:
        raise ValueError(f"{key}={batch_size} does not divide by the world size {world} (every "
                         f"rank takes batch_size / world_size rows of each global batch); use a "
                         f"multiple of {world}")


def init(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT) -> Dist:
    """Join the torchrun job: backend nccl on CUDA, gloo otherwise, ``timeout_s`` per collective
    (a rank that stops answering fails the job instead of hanging it); CUDA on
    ``cuda:LOCAL_RANK``.

    A default group the program started itself (with the backend this device needs) is used
    as it is, and :func:`shutdown` leaves it to the program.

    Args:
        device: the resolved run device; ``cuda`` becomes ``cuda:LOCAL_RANK``.
        timeout_s: seconds a collective waits (rank 0's solo work: ``SOLO_FACTOR`` times it).

    Returns:
        the :class:`Dist`, also what :func:`current` returns from now on.
    """
    global _CURRENT
    if not timeout_s > 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {timeout_s!r}")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK", rank)
    if device.type == "cuda":
        if device.index not in (None, local):
            raise ValueError(f"device {str(device)!r}: under torchrun each rank uses "
                             f"cuda:LOCAL_RANK; pass --device cuda (or auto)")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but this node has "
                             f"{torch.cuda.device_count()} CUDA device(s); start at most that "
                             f"many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    elif dist.get_backend() != backend:
        raise ValueError(f"the process group already started uses {dist.get_backend()}, but "
                         f"device {str(device)!r} needs {backend}")
    side = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    _CURRENT = Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local,
                    group=dist.group.WORLD, side=side, device=device,
                    timeout_s=float(timeout_s), owned=owned)
    if (rank, world) != (_CURRENT.rank, _CURRENT.world):
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world} disagree with the process group "
                         f"(rank {_CURRENT.rank} of {_CURRENT.world})")
    return _CURRENT


def shutdown() -> None:
    """Leave the job: destroy the groups :func:`init` started (the default one only when init
    started it); :func:`current` is single-process again."""
    global _CURRENT
    d, _CURRENT = _CURRENT, Dist()
    if not dist.is_initialized():
        return
    if d.owned:
        dist.destroy_process_group()
    elif d.side is not None:
        dist.destroy_process_group(d.side)


def gather_with_grad(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's ``x`` (same shape on every rank) concatenated in rank order; ``x`` itself
    when ``group`` is None. With gradient when ``x`` needs one: the backward sums the ranks'
    gradients of the gathered rows, so rank r's rows receive ``Σ_ranks ∂L_rank/∂x_r`` (``W ×
    ∂L/∂x_r`` when every rank computes the same loss L over the gathered rows)."""
    if group is None:
        return x
    if x.requires_grad:
        return _AllGather.apply(x, group)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.cat(out)


class _AllGather(torch.autograd.Function):
    """Rows of every rank, concatenated; the backward sums the ranks' gradients of this
    rank's rows (an all-reduce then a slice: simple, and the gathered codes are small)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group, ctx.rows = group, x.shape[0]
        ctx.rank = dist.get_rank(group)
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


class _AllReduce(torch.autograd.Function):
    """The sum over ranks, with its gradient: the sum over ranks of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch (every rank's
    rows), so W ranks normalise exactly as one process would; eval mode is unchanged. The
    parameters, buffers and state dict are BatchNorm's (checkpoints are interchangeable)."""

    _group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._group is None:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        n = xf.numel() // xf.shape[1] * dist.get_world_size(self._group)
        # one collective for both moments; float64 sums keep E[x²] - E[x]² exact enough
        xd = xf.double()
        moments = _AllReduce.apply(torch.stack([xd.sum(dims), (xd * xd).sum(dims)]),
                                   self._group) / n
        mean, var = moments[0].float(), (moments[1] - moments[0] ** 2).clamp_min(0).float()
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        self.num_batches_tracked.add_(1)
        f = (1.0 / float(self.num_batches_tracked) if self.momentum is None
             else self.momentum)
        self.running_mean.mul_(1 - f).add_(f * mean.to(self.running_mean.dtype))
        unbiased = var * (n / max(n - 1, 1))
        self.running_var.mul_(1 - f).add_(f * unbiased.to(self.running_var.dtype))


def sync_batchnorm(model: nn.Module, d: Dist) -> nn.Module:
    """Make every BatchNorm layer of ``model`` use the global batch's statistics in training
    (in place; nothing happens in a single process). Returns ``model``."""
    if not d.enabled:
        return model
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) in (
                nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            m.__class__ = _global_class(type(m))
            m._group = d.group
    return model


_GLOBAL_CLASSES: dict[type, type] = {}


def _global_class(base: type) -> type:
    # a subclass per BatchNorm class keeps the input-dimension check of the original one
    if base not in _GLOBAL_CLASSES:
        _GLOBAL_CLASSES[base] = type(f"Global{base.__name__}", (_GlobalBatchNorm, base), {})
    return _GLOBAL_CLASSES[base]
