"""torch.library registration of the fused ops (the registration stratum).

Each op is a ``torch.library.custom_op`` whose default implementation is the blocked torch path
(:mod:`fasthash.ops.blocked`), with ``register_kernel("cuda")`` launching the Triton kernels, a
fake (meta) implementation and an autograd formula whose backward is itself a custom op. This
is what makes ``torch.compile`` and ``torch.library.opcheck`` work on CPU and GPU (KERNELS.md:
``triton_op`` fails under ``torch.compile`` on CPU). Triton is imported only inside the CUDA
kernels, so importing this module never imports triton.

Ops (inputs are validated by :mod:`fasthash.functional`, not here):

* ``fasthash::masked_similarity(x, y, mx_table, mx_ids, my_table, my_ids, normalize) -> S``
  and ``fasthash::masked_similarity_grad(grad, x, y, ...) -> dS/dx`` (y via swapped roles).
* ``fasthash::contrastive_lse(za, zb, pos, row_cluster, col_cluster, inv_tau) -> lse [2B]``
  and ``fasthash::contrastive_lse_backward(grad_lse, za, zb, lse, ..., grad_rows) -> dZ``.
* ``fasthash::contrastive_lse_rows(za, zb, pos, ..., inv_tau, row_offset, row_count)`` and
  ``fasthash::contrastive_lse_rows_backward``: the same for one rank's rows of the gathered
  global batch (the distributed losses, :mod:`fasthash.distributed`); no autograd formula (the
  caller's ``autograd.Function`` gathers the global ``grad_lse`` first).

The losses call :func:`contrastive_lse_auto`: on plain eager CPU tensors it runs the op's CPU
implementation and autograd formula through a plain ``autograd.Function`` (the same functions,
so the same numbers), skipping the dispatcher's Python layers that cost as much as the math
of a small batch; everything else (CUDA, torch.compile, subclasses) calls the op.
"""

# no `from __future__ import annotations`: custom_op infers its schema from real type hints
import torch

from ..env import warn_once
from . import blocked

Tensor = torch.Tensor

# Triton kernels keep a whole (padded) code row in registers; longer codes use the torch path.
_TRITON_MAX_BITS = 512


def triton_usable() -> bool:
    """True when the Triton kernels can be imported (triton installed and importable)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: use the torch path
        return False
    return True


def _use_triton(key: str, length: int, *ts: Tensor) -> bool:
    """Whether a CUDA call runs the Triton kernels: triton importable, L within the kernels'
    register budget and no float64 input (float64 stays exact on the torch path)."""
    if any(t.dtype == torch.float64 for t in ts):
        return False
    if length > _TRITON_MAX_BITS or not triton_usable():
        warn_once(f"triton:{key}", f"fasthash: Triton kernel not used for {key} (triton missing "
                  f"or L > {_TRITON_MAX_BITS}); running the blocked torch path on CUDA")
        return False
    return True


# --------------------------------------------------------------------------- masked similarity


@torch.library.custom_op("fasthash::masked_similarity", mutates_args=())
def masked_similarity(
    x: Tensor,
    y: Tensor,
    mx_table: Tensor | None,
    mx_ids: Tensor | None,
    my_table: Tensor | None,
    my_ids: Tensor | None,
    normalize: bool,
) -> Tensor:
    """Masked (cosine) similarity [N, M]; the CPU / default implementation."""
    return blocked.masked_similarity_cpu(x, y, mx_table, mx_ids, my_table, my_ids, normalize)


@masked_similarity.register_fake
def _(x, y, mx_table, mx_ids, my_table, my_ids, normalize):
    return x.new_empty((x.shape[0], y.shape[0]), dtype=blocked.compute_dtype(x, y))


@torch.library.register_kernel("fasthash::masked_similarity", "cuda")
def _(x, y, mx_table, mx_ids, my_table, my_ids, normalize):
    if not _use_triton("masked_similarity", x.shape[1], x, y):
        return blocked.masked_similarity_cpu(x, y, mx_table, mx_ids, my_table, my_ids, normalize)
    from .masked_similarity_triton import masked_similarity_forward

    return masked_similarity_forward(x, y, mx_table, mx_ids, my_table, my_ids, normalize)


@torch.library.custom_op("fasthash::masked_similarity_grad", mutates_args=())
def masked_similarity_grad(
    grad: Tensor,
    x: Tensor,
    y: Tensor,
    mx_table: Tensor | None,
    mx_ids: Tensor | None,
    my_table: Tensor | None,
    my_ids: Tensor | None,
    normalize: bool,
) -> Tensor:
    """Gradient of ``sum(grad * S)`` w.r.t. ``x`` [N, L] (compute dtype)."""
    return blocked.masked_similarity_grad_cpu(
        grad, x, y, mx_table, mx_ids, my_table, my_ids, normalize
    )


@masked_similarity_grad.register_fake
def _(grad, x, y, mx_table, mx_ids, my_table, my_ids, normalize):
    return x.new_empty(x.shape, dtype=blocked.compute_dtype(x, y))


@torch.library.register_kernel("fasthash::masked_similarity_grad", "cuda")
def _(grad, x, y, mx_table, mx_ids, my_table, my_ids, normalize):
    if not _use_triton("masked_similarity", x.shape[1], x, y):
        return blocked.masked_similarity_grad_cpu(
            grad, x, y, mx_table, mx_ids, my_table, my_ids, normalize
        )
    from .masked_similarity_triton import masked_similarity_backward

    return masked_similarity_backward(grad, x, y, mx_table, mx_ids, my_table, my_ids, normalize)


def _ms_setup(ctx, inputs, output):
    x, y, mx_table, mx_ids, my_table, my_ids, normalize = inputs
    ctx.save_for_backward(x, y, mx_table, mx_ids, my_table, my_ids)
    ctx.normalize = normalize


def _ms_backward(ctx, grad):
    x, y, mx_table, mx_ids, my_table, my_ids = ctx.saved_tensors
    gx = gy = None
    if ctx.needs_input_grad[0]:
        gx = masked_similarity_grad(grad, x, y, mx_table, mx_ids, my_table, my_ids, ctx.normalize)
        gx = gx.to(x.dtype)
    if ctx.needs_input_grad[1]:
        gy = masked_similarity_grad(
            grad.mT, y, x, my_table, my_ids, mx_table, mx_ids, ctx.normalize
        ).to(y.dtype)
    return gx, gy, None, None, None, None, None


masked_similarity.register_autograd(_ms_backward, setup_context=_ms_setup)


# --------------------------------------------------------------------------- contrastive LSE


@torch.library.custom_op("fasthash::contrastive_lse", mutates_args=())
def contrastive_lse(
    za: Tensor,
    zb: Tensor,
    pos: Tensor,
    row_cluster: Tensor | None,
    col_cluster: Tensor | None,
    inv_tau: float,
) -> Tensor:
    """Per-row log-sum-exp [2B] of the fused contrastive loss (blocked torch implementation)."""
    return blocked.contrastive_lse_cpu(za, zb, pos, row_cluster, col_cluster, inv_tau)


@contrastive_lse.register_fake
def _(za, zb, pos, row_cluster, col_cluster, inv_tau):
    return za.new_empty((2 * za.shape[0],), dtype=blocked.compute_dtype(za, zb, pos))


@torch.library.register_kernel("fasthash::contrastive_lse", "cuda")
def _(za, zb, pos, row_cluster, col_cluster, inv_tau):
    if not _use_triton("contrastive_lse", za.shape[1], za, zb, pos):
        return blocked.contrastive_lse_cpu(za, zb, pos, row_cluster, col_cluster, inv_tau)
    from .contrastive_triton import contrastive_lse_forward

    return contrastive_lse_forward(za, zb, pos, row_cluster, col_cluster, inv_tau)


@torch.library.custom_op("fasthash::contrastive_lse_backward", mutates_args=())
def contrastive_lse_backward(
    grad_lse: Tensor,
    za: Tensor,
    zb: Tensor,
    lse: Tensor,
    row_cluster: Tensor | None,
    col_cluster: Tensor | None,
    inv_tau: float,
    grad_rows: int,
) -> Tensor:
    """Gradient [grad_rows, L] w.r.t. the first ``grad_rows`` rows of ``[za; zb]``."""
    return blocked.contrastive_lse_backward_cpu(
        grad_lse, za, zb, lse, row_cluster, col_cluster, inv_tau, grad_rows
    )


@contrastive_lse_backward.register_fake
def _(grad_lse, za, zb, lse, row_cluster, col_cluster, inv_tau, grad_rows):
    return za.new_empty((grad_rows, za.shape[1]), dtype=blocked.compute_dtype(za, zb, lse))


@torch.library.register_kernel("fasthash::contrastive_lse_backward", "cuda")
def _(grad_lse, za, zb, lse, row_cluster, col_cluster, inv_tau, grad_rows):
    if not _use_triton("contrastive_lse", za.shape[1], za, zb, lse):
        return blocked.contrastive_lse_backward_cpu(
            grad_lse, za, zb, lse, row_cluster, col_cluster, inv_tau, grad_rows
        )
    from .contrastive_triton import contrastive_lse_backward as launch

    return launch(grad_lse, za, zb, lse, row_cluster, col_cluster, inv_tau, grad_rows)


def _lse_setup(ctx, inputs, output):
    za, zb, pos, row_cluster, col_cluster, inv_tau = inputs
    ctx.save_for_backward(za, zb, pos, row_cluster, col_cluster, output)
    ctx.inv_tau = inv_tau


def _lse_backward(ctx, grad):
    return _lse_grads(ctx, grad, contrastive_lse_backward)


def _lse_grads(ctx, grad, backward):
    """The autograd formula of ``contrastive_lse``, with ``backward`` computing ``dZ`` (the
    ``contrastive_lse_backward`` op, or its CPU implementation on the eager CPU lane)."""
    za, zb, pos, row_cluster, col_cluster, lse = ctx.saved_tensors
    half = za.shape[0]
    need_a, need_b, need_pos = ctx.needs_input_grad[:3]
    ga = gb = gp = None
    if need_a or need_b:
        # the teacher half is skipped when it does not need a gradient (the usual distillation)
        rows = 2 * half if need_b else half
        gz = backward(grad, za, zb, lse, row_cluster, col_cluster, ctx.inv_tau, rows)
        if need_a:
            ga = gz[:half].to(za.dtype)
        if need_b:
            gb = gz[half:].to(zb.dtype)
    if need_pos:
        # d lse[a] / d pos[k] = exp(pos[k] - lse[a]) for the two rows a = k, k + B
        p = torch.exp(torch.cat([pos, pos]).to(lse.dtype) - lse) * grad.to(lse.dtype)
        gp = (p[:half] + p[half:]).to(pos.dtype)
    return ga, gb, gp, None, None, None


contrastive_lse.register_autograd(_lse_backward, setup_context=_lse_setup)


class _EagerCPUContrastiveLse(torch.autograd.Function):
    """``fasthash::contrastive_lse`` on the eager CPU lane: the op's CPU implementation and its
    autograd formula (the same functions, so the same numbers), without the dispatcher's
    Python layers around a custom op (schema defaults, alias checks, the generated autograd
    Function, a second op call in the backward): about 0.2 ms per forward + backward, which is
    most of a small batch's cost (bench/loss_overhead.py)."""

    @staticmethod
    def forward(ctx, za, zb, pos, row_cluster, col_cluster, inv_tau):
        lse = blocked.contrastive_lse_cpu(za, zb, pos, row_cluster, col_cluster, inv_tau)
        _lse_setup(ctx, (za, zb, pos, row_cluster, col_cluster, inv_tau), lse)
        return lse

    @staticmethod
    def backward(ctx, grad):
        return _lse_grads(ctx, grad, blocked.contrastive_lse_backward_cpu)


def _eager_cpu(*ts: Tensor) -> bool:
    """Whether a call may take the eager CPU lane: plain CPU tensors, no tracing (torch.compile,
    make_fx, fake tensors) and no functorch transform, which need the registered op."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return all(type(t) is Tensor and t.device.type == "cpu" for t in ts)


def contrastive_lse_auto(
    za: Tensor,
    zb: Tensor,
    pos: Tensor,
    row_cluster: Tensor | None,
    col_cluster: Tensor | None,
    inv_tau: float,
) -> Tensor:
    """:func:`contrastive_lse` as the losses call it: the eager CPU lane
    (:class:`_EagerCPUContrastiveLse`) for plain CPU tensors, else the registered op (CUDA,
    torch.compile, tensor subclasses and transforms)."""
    if _eager_cpu(za, zb, pos):
        return _EagerCPUContrastiveLse.apply(za, zb, pos, row_cluster, col_cluster, inv_tau)
    return contrastive_lse(za, zb, pos, row_cluster, col_cluster, inv_tau)


# --------------------------------------------------------------------------- row subsets


@torch.library.custom_op("fasthash::contrastive_lse_rows", mutates_args=())
def contrastive_lse_rows(
    za: Tensor,
    zb: Tensor,
    pos: Tensor,
    row_cluster: Tensor | None,
    col_cluster: Tensor | None,
    inv_tau: float,
    row_offset: int,
    row_count: int,
) -> Tensor:
    """lse [2 row_count] of the rows ``row_offset + [0, row_count)`` of each half of the global
    ``[za; zb]`` against every global column; ``pos`` holds their ``row_count`` positives."""
    return blocked.contrastive_lse_cpu(za, zb, pos, row_cluster, col_cluster, inv_tau,
                                       row_offset=row_offset, row_count=row_count)


@contrastive_lse_rows.register_fake
def _(za, zb, pos, row_cluster, col_cluster, inv_tau, row_offset, row_count):
    return za.new_empty((2 * row_count,), dtype=blocked.compute_dtype(za, zb, pos))


@torch.library.register_kernel("fasthash::contrastive_lse_rows", "cuda")
def _(za, zb, pos, row_cluster, col_cluster, inv_tau, row_offset, row_count):
    if not _use_triton("contrastive_lse", za.shape[1], za, zb, pos):
        return blocked.contrastive_lse_cpu(za, zb, pos, row_cluster, col_cluster, inv_tau,
                                           row_offset=row_offset, row_count=row_count)
    from .contrastive_triton import contrastive_lse_forward

    return contrastive_lse_forward(za, zb, pos, row_cluster, col_cluster, inv_tau,
                                   row_offset=row_offset, row_count=row_count)


@torch.library.custom_op("fasthash::contrastive_lse_rows_backward", mutates_args=())
def contrastive_lse_rows_backward(
    grad_lse: Tensor,
    za: Tensor,
    zb: Tensor,
    lse: Tensor,
    row_cluster: Tensor | None,
    col_cluster: Tensor | None,
    inv_tau: float,
    row_offset: int,
    row_count: int,
    grad_rows: int,
) -> Tensor:
    """Gradient [grad_rows, L] of ``sum(grad_lse * lse)`` (both global [2B]) w.r.t. the first
    ``grad_rows`` local rows (``row_count`` student rows, then their teacher rows)."""
    return blocked.contrastive_lse_backward_cpu(
        grad_lse, za, zb, lse, row_cluster, col_cluster, inv_tau, grad_rows,
        row_offset=row_offset, row_count=row_count,
    )


@contrastive_lse_rows_backward.register_fake
def _(grad_lse, za, zb, lse, row_cluster, col_cluster, inv_tau, row_offset, row_count,
      grad_rows):
    return za.new_empty((grad_rows, za.shape[1]), dtype=blocked.compute_dtype(za, zb, lse))


@torch.library.register_kernel("fasthash::contrastive_lse_rows_backward", "cuda")
def _(grad_lse, za, zb, lse, row_cluster, col_cluster, inv_tau, row_offset, row_count,
      grad_rows):
    kw = dict(row_offset=row_offset, row_count=row_count)
    if not _use_triton("contrastive_lse", za.shape[1], za, zb, lse):
        return blocked.contrastive_lse_backward_cpu(
            grad_lse, za, zb, lse, row_cluster, col_cluster, inv_tau, grad_rows, **kw
        )
    from .contrastive_triton import contrastive_lse_backward as launch

    return launch(grad_lse, za, zb, lse, row_cluster, col_cluster, inv_tau, grad_rows, **kw)
