"""``nn.Module`` faces of the fused ops: they only hold hyper-parameters and call
:mod:`fasthash.functional`.

The losses take the process group in the constructor (``group=``, like ``process_group=`` of
``torch.nn.SyncBatchNorm``): a module built with a group computes the loss over the global
batch of that group on every call; ``group=None`` (the default) is the single-process loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from . import functional as F

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["MaskedHammingSimilarity", "BRCDContrastiveLoss", "NTXentLoss"]


class MaskedHammingSimilarity(nn.Module):
    """Module face of :func:`fasthash.functional.masked_hamming_similarity`.

    Args:
        normalize: cosine (True) or raw masked inner product (False).

    Shape:
        x ``[N, L]``, y ``[M, L]``, masks ``[N, L]`` / ``(table [C, L], ids [N])`` -> ``[N, M]``.

    Example:
        >>> sim = MaskedHammingSimilarity(); sim(torch.ones(2, 8), torch.ones(3, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, x, y, mask_x=None, mask_y=None) -> torch.Tensor:
        return F.masked_hamming_similarity(x, y, mask_x, mask_y, normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"


class BRCDContrastiveLoss(nn.Module):
    """Module face of :func:`fasthash.functional.brcd_contrastive_loss`.

    Args:
        alpha: weight of the individual-space positive in [0, 1]. temperature: τ > 0.
        reduction: "mean", "sum" or "none". detach_teacher: stop gradients into the teacher.
        group: a ``torch.distributed`` process group: negatives from every rank's rows and the
            global loss on every rank (each rank's backward gets ``world_size x`` the gradient
            of its rows, which DDP averages back; see
            :func:`fasthash.functional.brcd_contrastive_loss`). None: this process only.

    Shape:
        student, teacher_same, teacher_other ``[B, L]``; mask_table ``[C, L]``; ids ``[B]``.

    Example:
        >>> loss = BRCDContrastiveLoss(alpha=0.8, temperature=0.3)
        >>> s = torch.tensor([[1., -1.], [-1., 1.]]); loss(s, s, s).item() < 0.1
        True
    """

    def __init__(
        self,
        alpha: float = 0.8,
        temperature: float = 0.3,
        reduction: str = "mean",
        detach_teacher: bool = True,
        *,
        group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.temperature = temperature
        self.reduction = reduction
        self.detach_teacher = detach_teacher
        self.group = group

    def forward(
        self,
        student: torch.Tensor,
        teacher_same: torch.Tensor,
        teacher_other: torch.Tensor,
        mask_table: torch.Tensor | None = None,
        cluster_ids: torch.Tensor | None = None,
        aug_cluster_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return F.brcd_contrastive_loss(
            student,
            teacher_same,
            teacher_other,
            mask_table=mask_table,
            cluster_ids=cluster_ids,
            aug_cluster_ids=aug_cluster_ids,
            alpha=self.alpha,
            temperature=self.temperature,
            reduction=self.reduction,
            detach_teacher=self.detach_teacher,
            group=self.group,
        )

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, detach_teacher={self.detach_teacher}"
                f"{_group_repr(self.group)}")


class NTXentLoss(nn.Module):
    """Module face of :func:`fasthash.functional.nt_xent_loss`.

    Args:
        temperature: τ > 0. reduction: "mean", "sum" or "none".
        group: a ``torch.distributed`` process group (the global batch, as
            :class:`BRCDContrastiveLoss`) or None.

    Shape:
        z1, z2 ``[B, L]`` -> scalar (or ``[2B]``).

    Example:
        >>> z = torch.eye(4); bool(NTXentLoss(0.3)(z[:2], z[2:]) > 0)
        True
    """

    def __init__(
        self,
        temperature: float = 0.3,
        reduction: str = "mean",
        *,
        group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.reduction = reduction
        self.group = group

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return F.nt_xent_loss(z1, z2, self.temperature, reduction=self.reduction,
                              group=self.group)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, reduction={self.reduction!r}"
                f"{_group_repr(self.group)}")


def _group_repr(group) -> str:
    if group is None:
        return ""
    import torch.distributed as dist

    try:
        return f", group=<{dist.get_world_size(group)} ranks>"
    except Exception:  # noqa: BLE001 - a repr never raises (e.g. torch.distributed torn down)
        return ", group=<process group>"
