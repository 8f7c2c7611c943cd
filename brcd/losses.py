"""Training objectives composed from fasthash ops (BRCD_SPEC §2-5).

The three fasthash entry points are reached through ONE adapter each (:func:`nt_xent`,
:func:`masked_similarity`, :func:`brcd_term`): the fused ``fasthash.functional`` ops, which equal
the pure-torch references in ``fasthash.reference`` (swapping back is a one-line change).

* :func:`cibhash_loss` — ``L_own = NTXent(b1, b2; tau) + lambda_KL * sym. Bernoulli KL``.
* :func:`brcd_distill_loss` — ``L_BRCD`` with switches for the bit mask, offset positives and
  false-negative removal (ablations), expressed through the single BRCD op;
  :func:`brcd_diagnostics` — no-grad summaries of the inputs that term used (logged parts).
* KD baselines under the same trainer: :func:`kd_codes_loss` (bitwise BCE to the teacher code),
  :func:`sp_loss` (similarity-preserving KD, Tung & Mori 2019), :func:`rkd_distance_loss`
  (distance-wise relational KD, Park et al. 2019).

:data:`METHODS` is the registry of student objectives (``distill.method``): config validation,
the CLI's choices and help, the demo and the distill stage all read it. A new KD method is one
function decorated with :func:`register_method` (plus its test), nothing else.

:data:`ABLATIONS` names the BRCD ablation variants of issue 12 (config overrides, each changing
exactly one term; :data:`ABLATION_HELP` describes them): the demo, the report and
``python -m brcd distill --ablation`` read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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
    "brcd_diagnostics",
    "ABLATIONS",
    "ABLATION_HELP",
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
        return brcd_term(student, teacher_same_view, teacher_other_view,
                         mask_table if use_mask else None, None, None, alpha, temperature, group)
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


@torch.no_grad()
def brcd_diagnostics(
    student: torch.Tensor,
    teacher_same_view: torch.Tensor,
    teacher_other_view: torch.Tensor,
    mask_table: torch.Tensor | None,
    cluster_ids: torch.Tensor | None,
    aug_cluster_ids: torch.Tensor | None,
    *,
    use_mask: bool = True,
    offset_positive: bool = True,
    false_negative: bool = True,
    group: Any = None,
) -> dict[str, float]:
    """No-grad summaries of what :func:`brcd_distill_loss` (same arguments) used, for the logs.

    * ``"brcd_ind_pos"``: mean ``cos(s_k, t_k)`` (= ``A_k * tau``) over the anchor rows.
    * ``"brcd_struct_pos"``: mean masked cosine of the positive pair ``(m_k ⊙ s_k, m_k ⊙ t'_k)``
      with the mask rows the loss used (all ones when ``use_mask`` is off); 0 for an empty mask.
    * ``"brcd_offset"``: share of offset positives (``ĉ_k != c_k``); 0 when ``offset_positive``
      is off or without clusters.
    * ``"brcd_fn_removed"``: mean number of negatives removed per row by the false-negative rule
      (columns of the anchor's cluster, student columns by ``c``, teacher columns by ``ĉ``);
      0 when ``false_negative`` is off (its per-sample ids remove nothing) or without clusters.

    Args:
        as :func:`brcd_distill_loss` (alpha and temperature do not enter). With a ``group`` the
        summaries are over this rank's rows, the false negatives counted against every rank's
        columns (a collective: every rank must call it).

    Returns:
        the four values as floats (one device sync).

    Example:
        >>> s = torch.tensor([[1., 1.], [1., -1.]]); c = torch.tensor([0, 0])
        >>> d = brcd_diagnostics(s, s, s, None, c, c)
        >>> round(d["brcd_ind_pos"], 6), d["brcd_fn_removed"]  # both other rows share cluster 0
        (1.0, 2.0)
    """
    s, t, t2 = (x.detach().float() for x in (student, teacher_same_view, teacher_other_view))
    bsz, length = s.shape
    zero = s.new_zeros(())
    if cluster_ids is None:  # the loss's no-cluster path: one global row or all ones
        m = (mask_table.to(s)[0].expand(bsz, length) if mask_table is not None and use_mask
             else torch.ones_like(s))
        offset, fn = zero, zero
    else:
        c = cluster_ids.long()
        c_hat = c if (aug_cluster_ids is None or not offset_positive) else aug_cluster_ids.long()
        m = (mask_table.to(s)[c] if mask_table is not None and use_mask
             else torch.ones_like(s))
        offset = (c_hat != c).float().mean() if offset_positive else zero
        if false_negative:
            c_all, c_hat_all = gather_with_grad(c, group), gather_with_grad(c_hat, group)
            # row k's columns of its own cluster c_k, less itself (student column k, cluster
            # c_k) and its partner (teacher column k, cluster ĉ_k); row B + k alike
            same = ((c_all[None, :] == c[:, None]).sum(1) - 1
                    + (c_hat_all[None, :] == c[:, None]).sum(1) - (c_hat == c).long())
            fn = same.float().mean()
        else:
            fn = zero

    def cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        den = x.norm(dim=1) * y.norm(dim=1)
        return torch.where(den > 0, (x * y).sum(1) / den.clamp_min(1e-30), 0.0)

    vals = torch.stack([cos(s, t).mean(), cos(m * s, m * t2).mean(), offset, fn]).tolist()
    return dict(zip(("brcd_ind_pos", "brcd_struct_pos", "brcd_offset", "brcd_fn_removed"), vals,
                    strict=True))


# ---- BRCD ablations (issue 12): config overrides, each changing exactly the term it names ------
ABLATIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "no-mask": {"distill.use_mask": False},
    "no-offset": {"distill.offset_positive": False},
    "no-false-negative": {"distill.false_negative": False},
    "alpha-1": {"distill.alpha": 1.0},
    "opposite-mask": {"distill.mask_convention": "redundant"},
    "zero-mask": {"distill.mask_convention": "zero"},
}
ABLATION_HELP: dict[str, str] = {
    "full": "BRCD as configured (bit mask, offset positives, false-negative removal)",
    "no-mask": "structural term on unmasked codes (every mask row all ones)",
    "no-offset": "no offset-positive handling (alpha_k = alpha for every sample)",
    "no-false-negative": "same-cluster negatives stay in the denominators",
    "alpha-1": "alpha = 1: the positive is the individual term A_k only (negatives unchanged)",
    "opposite-mask": "opposite mask convention: keep |mu| <= delta instead of > delta",
    "zero-mask": "the research code's all-zero mask (BRCD_SPEC 8.1): every structural "
                 "similarity 0; false negatives still removed by cluster id",
}


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
        parts: no-grad diagnostics a term may put here (name -> float); the distill stage logs
        them with the step's loss parts (BRCD: :func:`brcd_diagnostics`).
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
    parts: dict[str, float] = field(default_factory=dict)


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
    """L_BRCD of the batch with the run's switches; fills ``b.parts`` (:func:`brcd_diagnostics`,
    the mean of both directions when ``symmetric``).

    ``b.mask_table`` is the table to train with: the caller applies ``distill.mask_convention``
    (:func:`brcd.masks.training_mask_table`); ``use_mask=False`` then replaces it by ones. The
    cluster ids, hence offset positives and false negatives, never depend on the table — with
    the "zero" table (the research code's) false negatives are still removed by cluster id.
    """
    o = b.options
    switches = dict(use_mask=o.use_mask, offset_positive=o.offset_positive,
                    false_negative=o.false_negative, group=b.group)
    views = [(b.s1.codes.float(), b.t1, b.t2)]
    if o.symmetric:  # the view-2 anchor too, as L_own and the baselines use both views
        views.append((b.s2.codes.float(), b.t2, b.t1))
    kds, diags = [], []
    for s, t_same, t_other in views:
        c_hat = assign_clusters(t_other, b.centroids) if b.centroids is not None else None
        kds.append(brcd_distill_loss(s, t_same, t_other, b.mask_table, b.cluster_ids, c_hat,
                                     alpha=o.alpha, temperature=b.temperature, **switches))
        diags.append(brcd_diagnostics(s, t_same, t_other, b.mask_table, b.cluster_ids, c_hat,
                                      **switches))
    b.parts.update({k: sum(d[k] for d in diags) / len(diags) for k in diags[0]})
    return kds[0] if len(kds) == 1 else 0.5 * (kds[0] + kds[1])
