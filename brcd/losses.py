"""Training objectives composed from fasthash ops (BRCD_SPEC §2-5).

The three fasthash entry points are reached through ONE adapter each (:func:`nt_xent`,
:func:`masked_similarity`, :func:`brcd_term`): the fused ``fasthash.functional`` ops, which equal
the pure-torch references in ``fasthash.reference`` (swapping back is a one-line change).

* :func:`cibhash_loss` — ``L_own = NTXent(b1, b2; tau) + lambda_KL * sym. Bernoulli KL``.
* :func:`brcd_distill_loss` — ``L_BRCD`` with switches for the bit mask, offset positives and
  false-negative removal (ablations), expressed through the single BRCD op.
* KD baselines under the same trainer: :func:`kd_codes_loss` (bitwise BCE to the teacher code),
  :func:`sp_loss` (similarity-preserving KD, Tung & Mori 2019), :func:`rkd_distance_loss`
  (distance-wise relational KD, Park et al. 2019).

:data:`METHODS` is the registry of student objectives (``distill.method``): config validation,
the CLI's choices and help, the demo and the distill stage all read it. A new KD method is one
function decorated with :func:`register_method` (plus its test), nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import fasthash
from fasthash import reference

from .dist import gather_with_grad
from .masks import assign_clusters
from .models import HashOutput

__all__ = [
    "nt_xent",
    "masked_similarity",
    "brcd_term",
    "bernoulli_kl",
    "cibhash_loss",
    "brcd_distill_loss",
    "kd_codes_loss",
    "sp_loss",
    "rkd_distance_loss",
    "KDBatch",
    "Method",
    "METHODS",
    "register_method",
]


# ---- the three adapters: the only places that choose between reference and fused ops -------
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.3,
            group: Any = None) -> torch.Tensor:
    """NT-Xent over two views: fasthash.nt_xent_loss (= reference.nt_xent_ref); with a process
    ``group``, over every rank's rows (each rank passes its own; see :mod:`brcd.dist`)."""
    return fasthash.nt_xent_loss(z1, z2, temperature, group=group)


def masked_similarity(x: torch.Tensor, y: torch.Tensor, mask_x: torch.Tensor | None = None,
                      mask_y: torch.Tensor | None = None) -> torch.Tensor:
    """Masked cosine similarity: fasthash.masked_hamming_similarity (= masked_similarity_ref)."""
    return fasthash.masked_hamming_similarity(x, y, mask_x, mask_y)


def brcd_term(student: torch.Tensor, teacher_same_view: torch.Tensor,
              teacher_other_view: torch.Tensor, mask_table: torch.Tensor | None,
              cluster_ids: torch.Tensor | None, aug_cluster_ids: torch.Tensor | None,
              alpha: float, temperature: float, group: Any = None) -> torch.Tensor:
    """The BRCD term: fasthash.brcd_contrastive_loss (= reference.brcd_loss_ref); with a process
    ``group``, over every rank's rows (teacher codes and cluster ids gathered too)."""
    return fasthash.brcd_contrastive_loss(
        student, teacher_same_view, teacher_other_view, mask_table=mask_table,
        cluster_ids=cluster_ids, aug_cluster_ids=aug_cluster_ids, alpha=alpha,
        temperature=temperature, group=group)
# ---------------------------------------------------------------------------------------------


def bernoulli_kl(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Symmetric Bernoulli KL with stop-gradient targets (reference.bernoulli_kl_ref)."""
    return reference.bernoulli_kl_ref(p1, p2)


def cibhash_loss(out1: HashOutput, out2: HashOutput, temperature: float = 0.3,
                 kl_weight: float = 0.001, group: Any = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """CIBHash-style own loss of a hashing model on two views (BRCD_SPEC §2).

    Args:
        out1, out2: model outputs of view 1 and view 2 of the same B images.
        temperature: NT-Xent tau. kl_weight: lambda_KL.
        group: a process group: NT-Xent over every rank's rows; the KL term is this rank's
            mean (DDP's gradient average makes it the global batch's). ``"ntxent"`` is then the
            global value, ``"kl"`` this rank's.

    Shape:
        codes and probs ``[B, L]`` -> scalar.

    Returns:
        ``(loss, {"ntxent": ..., "kl": ...})``.

    Example:
        >>> from brcd.models import create_model
        >>> m = create_model("tiny-cnn", 8); x = torch.randn(4, 3, 16, 16)
        >>> loss, parts = cibhash_loss(m(x), m(x.flip(-1))); loss.ndim
        0
    """
    nt = nt_xent(out1.codes, out2.codes, temperature, group)
    kl = bernoulli_kl(out1.probs.float(), out2.probs.float())
    return nt + kl_weight * kl, {"ntxent": float(nt.detach()), "kl": float(kl.detach())}


def brcd_distill_loss(
    student: torch.Tensor,
    teacher_same_view: torch.Tensor,
    teacher_other_view: torch.Tensor,
    mask_table: torch.Tensor | None,
    cluster_ids: torch.Tensor | None,
    aug_cluster_ids: torch.Tensor | None,
    *,
    alpha: float = 0.8,
    temperature: float = 0.3,
    use_mask: bool = True,
    offset_positive: bool = True,
    false_negative: bool = True,
    group: Any = None,
) -> torch.Tensor:
    """``L_BRCD`` with each robust component switchable (BRCD_SPEC §3-5).

    * ``use_mask=False``: every mask row is all ones (structural term on full codes).
    * ``offset_positive=False``: alpha_k = alpha for every sample (ĉ ignored).
    * ``false_negative=False``: no negative is removed from the denominators.
    With all three on this is exactly ``brcd_term(s, t, t', M, c, ĉ)``. Switching false
    negatives off is expressed through the same op by giving each sample its own cluster id
    and its own mask row (``[M[c]; M[c]]``, 2B rows); an offset positive then gets a teacher id
    no row uses (B + k), which sets alpha_k = 1 and removes nothing.

    Args:
        student: student codes s (view 1), with gradient. teacher_same_view: t (view 1).
        teacher_other_view: t' (view 2). mask_table: ``[C, L]`` {0,1} or None.
        cluster_ids: c ``[B]`` int64 or None. aug_cluster_ids: ĉ ``[B]`` (nearest centroid of
        the unmasked t') or None. alpha, temperature: as in the spec.
        group: a process group: the term over every rank's rows, each rank passing its own B
            rows (the per-sample ids and masks of ``false_negative=False`` are global then).

    Returns:
        the scalar loss.
    """
    bsz, length = student.shape
    if cluster_ids is None:  # no clusters: plain (optionally one global mask) contrastive term
        return brcd_term(student, teacher_same_view, teacher_other_view, mask_table, None, None,
                         alpha, temperature, group)
    c = cluster_ids.long()
    c_all = c if group is None or (false_negative and mask_table is not None and use_mask) \
        else gather_with_grad(c, group)  # every rank's ids (the tables below index them)
    if mask_table is None or not use_mask:
        n_c = 1 if mask_table is None else mask_table.shape[0]
        mask_table = torch.ones(max(n_c, int(c_all.max()) + 1), length,
                                device=student.device)
    c_hat = c if (aug_cluster_ids is None or not offset_positive) else aug_cluster_ids.long()
    if false_negative:
        return brcd_term(student, teacher_same_view, teacher_other_view, mask_table, c, c_hat,
                         alpha, temperature, group)
    n_all = c_all.shape[0]  # rows of the global batch; this rank's start at rank * bsz
    start = 0 if group is None else torch.distributed.get_rank(group) * bsz
    rows = torch.arange(start, start + bsz, device=student.device)
    per_sample = mask_table.to(student.device)[c_all]
    table = torch.cat([per_sample, per_sample], dim=0)
    ids_aug = torch.where(c_hat != c, rows + n_all, rows)
    return brcd_term(student, teacher_same_view, teacher_other_view, table, rows, ids_aug,
                     alpha, temperature, group)


def kd_codes_loss(student: HashOutput, teacher_codes: torch.Tensor) -> torch.Tensor:
    """Code matching: bitwise BCE of the student's bit probabilities to the teacher's bits."""
    target = (teacher_codes.detach() > 0).to(student.logits.dtype)
    return F.binary_cross_entropy_with_logits(student.logits, target)


def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD: ``||norm(S S^T) - norm(T T^T)||_F^2 / B^2`` (row-normalised)."""
    gs = F.normalize(student @ student.T, dim=1)
    gt = F.normalize(teacher.detach() @ teacher.detach().T, dim=1)
    return (gs - gt).pow(2).sum() / student.shape[0] ** 2


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance loss: smooth-L1 between mean-normalised pairwise distances."""

    def pdist(e: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(e, e).clamp_min(1e-12)
        off = ~torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
        return d / d[off].mean()

    with torch.no_grad():
        td = pdist(teacher.float())
    off = ~torch.eye(student.shape[0], dtype=torch.bool, device=student.device)
    return F.smooth_l1_loss(pdist(student.float())[off], td[off])


# ---- the method registry ---------------------------------------------------------------------
@dataclass(kw_only=True)
class KDBatch:
    """What a KD term sees in one distillation step (both views of the same B images).

    Attributes:
        s1, s2: the student's outputs of view 1 / view 2. t1, t2: the teacher's ±1 codes of
        the same views (float32, no gradient). cluster_ids: each image's cluster c ``[B]`` (None
        without masks). mask_table: ``[C, L]`` {0,1}; centroids: ``[C, L]`` (None without
        masks). temperature: tau of the contrastive terms. options: the run's
        :class:`brcd.config.DistillConfig` (alpha, ablation switches, ``symmetric``).
        group: the process group of a torchrun job (None in a single process): each tensor
        holds this rank's rows, and a term over pairs of rows must see every rank's
        (:func:`brcd.dist.gather_with_grad`, or ``group=`` of the fused losses).
    """

    s1: HashOutput
    s2: HashOutput
    t1: torch.Tensor
    t2: torch.Tensor
    cluster_ids: torch.Tensor | None
    mask_table: torch.Tensor | None
    centroids: torch.Tensor | None
    temperature: float
    options: object
    group: Any = None


KDLoss = Callable[[KDBatch], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class Method:
    """A student objective: ``L_own + weight * kd_loss`` (``kd_loss`` None: ``L_own`` only).

    Attributes:
        name: the ``distill.method`` value. label: the name in reports. kd_loss: the KD term.
        weight: its default weight (``distill.kd_weight`` overrides it). needs_teacher: the
        student cannot train without a teacher. needs_masks: the teacher checkpoint must hold
        clusters and masks (``build-masks``). shares_teacher_space: the term pulls the
        student's codes onto the teacher's, so ASHP (student queries, teacher database) is
        meaningful; relational terms (SP, RKD) match similarities only. help: one line for
        ``--help``.
    """

    name: str
    label: str
    kd_loss: KDLoss | None
    weight: float
    needs_teacher: bool
    needs_masks: bool
    shares_teacher_space: bool
    help: str


METHODS: dict[str, Method] = {}


def register_method(name: str, *, label: str, weight: float = 1.0, needs_teacher: bool = True,
                    needs_masks: bool = False, shares_teacher_space: bool,
                    help: str) -> Callable[[KDLoss | None], KDLoss | None]:
    """Register a student objective under ``name`` (decorates its KD term).

    Args:
        name: the ``distill.method`` value (must be new). label, weight, needs_teacher,
            needs_masks, shares_teacher_space, help: see :class:`Method`.

    Returns:
        a decorator that registers ``kd_loss(batch: KDBatch) -> scalar`` and returns it.

    Example:
        >>> @register_method("l2-codes", label="L2 codes", shares_teacher_space=True,
        ...                  help="squared error to the teacher codes")
        ... def _l2(b):
        ...     return 0.5 * ((b.s1.codes - b.t1).pow(2).mean() + (b.s2.codes - b.t2).pow(2).mean())
        >>> METHODS.pop("l2-codes").label
        'L2 codes'
    """
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")

    def deco(fn: KDLoss | None) -> KDLoss | None:
        METHODS[name] = Method(name=name, label=label, kd_loss=fn, weight=float(weight),
                               needs_teacher=needs_teacher, needs_masks=needs_masks,
                               shares_teacher_space=shares_teacher_space, help=help)
        return fn

    return deco


register_method("none", label="student, no KD", weight=0.0, needs_teacher=False,
                shares_teacher_space=False, help="the student's own loss only")(None)


@register_method("kd-codes", label="KD codes", shares_teacher_space=True,
                 help="bitwise BCE of the student's bits to the teacher's")
def _kd_codes(b: KDBatch) -> torch.Tensor:
    b.s1.logits, b.s2.logits = b.s1.logits.float(), b.s2.logits.float()
    return 0.5 * (kd_codes_loss(b.s1, b.t1) + kd_codes_loss(b.s2, b.t2))


# SP and RKD: their papers' usual weights
@register_method("sp", label="SP", weight=3000.0, shares_teacher_space=False,
                 help="similarity-preserving KD (Tung & Mori 2019)")
def _sp(b: KDBatch) -> torch.Tensor:
    s1, s2, t1, t2 = (gather_with_grad(x, b.group)
                      for x in (b.s1.codes.float(), b.s2.codes.float(), b.t1, b.t2))
    return 0.5 * (sp_loss(s1, t1) + sp_loss(s2, t2))


@register_method("rkd", label="RKD", weight=25.0, shares_teacher_space=False,
                 help="distance-wise relational KD (Park et al. 2019)")
def _rkd(b: KDBatch) -> torch.Tensor:
    s1, s2, t1, t2 = (gather_with_grad(x, b.group)
                      for x in (b.s1.codes.float(), b.s2.codes.float(), b.t1, b.t2))
    return 0.5 * (rkd_distance_loss(s1, t1) + rkd_distance_loss(s2, t2))


@register_method("brcd", label="BRCD", needs_masks=True, shares_teacher_space=True,
                 help="bit-mask robust contrastive KD (the paper; ablation switches in distill.*)")
def _brcd(b: KDBatch) -> torch.Tensor:
    o = b.options
    opts = dict(alpha=o.alpha, temperature=b.temperature, use_mask=o.use_mask,
                offset_positive=o.offset_positive, false_negative=o.false_negative,
                group=b.group)
    s1, s2 = b.s1.codes.float(), b.s2.codes.float()
    kd = brcd_distill_loss(s1, b.t1, b.t2, b.mask_table, b.cluster_ids,
                           assign_clusters(b.t2, b.centroids), **opts)
    if o.symmetric:  # the view-2 anchor too, as L_own and the baselines use both views
        kd = 0.5 * (kd + brcd_distill_loss(s2, b.t2, b.t1, b.mask_table, b.cluster_ids,
                                           assign_clusters(b.t1, b.centroids), **opts))
    return kd
