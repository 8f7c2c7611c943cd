"""Pure-torch references: THE specification of every fasthash op.

Every fast path (C++ search, Triton kernels, blocked CPU losses) is tested against these
functions, CPU fallbacks call them, and benchmarks use them as the naive baseline. They favour
clarity over speed and work in float64 when given float64. The math follows
``shared/BRCD_SPEC.md`` §3-5.

Packed codes use the layout of :mod:`fasthash.codes` (bit j -> bit j % 64 of word j // 64).
Inputs are checked by the shared validators (:func:`fasthash.codes.as_search_words` for packed
words, :mod:`fasthash._checks` for the rest), so a reference rejects bad input with the same
message as the fast path it specifies; this module holds only the math.
"""

from __future__ import annotations

import numpy as np
import torch

from ._checks import (
    check_bit_mask,
    check_brcd_args,
    check_codes,
    check_int,
    check_like,
    check_probabilities,
    check_temperature,
    reduce_rows,
)
from .codes import as_search_words

__all__ = [
    "masked_similarity_ref",
    "hamming_distance_ref",
    "topk_ref",
    "radius_ref",
    "nt_xent_ref",
    "bernoulli_kl_ref",
    "brcd_loss_ref",
]

# popcount of every byte value; exact integer Hamming distances without a torch popcount op
_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def masked_similarity_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    mask_x: torch.Tensor | None = None,
    mask_y: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Bit-masked cosine similarity of relaxed codes.

    .. math::
        S[a, b] = \frac{\sum_j m^x_{aj} m^y_{bj} x_{aj} y_{bj}}
                       {\lVert m^x_a \odot x_a \rVert \, \lVert m^y_b \odot y_b \rVert}

    and ``S[a, b] = 0`` when either masked norm is 0 (e.g. an empty mask). On ±1 codes this is
    ``(popcount(I) - 2 * popcount((x XOR y) AND I)) / sqrt(popcount(m_a) * popcount(m_b))`` with
    ``I = m_a AND m_b``; unmasked it is ``1 - 2 * hamming / L``. Masked-out bits get exactly zero
    gradient.

    Args:
        x: relaxed codes. y: relaxed codes with the same L.
        mask_x, mask_y: {0, 1} per-row masks or None (all ones).

    Shape:
        x ``[N, L]``, y ``[M, L]``, mask_x ``[N, L]``, mask_y ``[M, L]`` -> ``[N, M]``.

    Returns:
        similarities in the dtype of ``x``.

    Example:
        >>> x = torch.tensor([[1., -1., 1.]]); masked_similarity_ref(x, x)
        tensor([[1.]])
    """
    check_codes(x, "x")
    check_codes(y, "y", x.shape[1])
    n, length = x.shape
    mx = None if mask_x is None else check_bit_mask(mask_x, "mask_x", length, n)
    my = None if mask_y is None else check_bit_mask(mask_y, "mask_y", length, y.shape[0])
    xm = x if mx is None else x * mx.to(x.dtype)
    ym = y if my is None else y * my.to(y.dtype)
    num = xm @ ym.T
    den = xm.norm(dim=1, keepdim=True) * ym.norm(dim=1, keepdim=True).T
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _popcount(t: torch.Tensor) -> torch.Tensor:
    """Per-word popcount of an int64 tensor (exact), summed over the last axis."""
    u8 = t.contiguous().view(torch.uint8).reshape(*t.shape, 8)
    return _POPCOUNT8.to(t.device)[u8.long()].sum(dim=(-1, -2))


def hamming_distance_ref(
    q_words: np.ndarray | torch.Tensor,
    x_words: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact (masked) Hamming distances of packed codes.

    ``D[i, j] = popcount((q_i XOR x_j) AND m_i)`` with ``m_i`` the global mask [W], the i-th row
    of a per-query mask [Q, W], or all ones.

    Args:
        q_words: packed query words. x_words: packed gallery words. mask: packed mask words.

    Shape:
        ``[Q, W]`` x ``[N, W]`` -> ``[Q, N]``.

    Returns:
        int64 distances.

    Example:
        >>> hamming_distance_ref(np.array([[5]], np.uint64), np.array([[6]], np.uint64))
        tensor([[2]])
    """
    q, x, m = as_search_words(q_words, x_words, mask, to="torch")
    diff = torch.bitwise_xor(q[:, None, :], x[None, :, :])
    if m is not None:
        diff = torch.bitwise_and(diff, m[:, None, :])
    return _popcount(diff)


def topk_ref(
    q_words: np.ndarray | torch.Tensor,
    x_words: np.ndarray | torch.Tensor,
    k: int,
    mask: np.ndarray | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by Hamming distance, ties broken by gallery index (a stable sort).

    Args:
        q_words, x_words, mask: as in :func:`hamming_distance_ref`. k: 1 <= k <= N.

    Shape:
        ``[Q, W]`` x ``[N, W]`` -> distances ``[Q, k]``, indices ``[Q, k]``.

    Returns:
        (int32 distances, int64 gallery indices), each row ordered by (distance, index).

    Example:
        >>> d, i = topk_ref(np.array([[0]], np.uint64), np.array([[3], [1], [1]], np.uint64), 2)
        >>> d.tolist(), i.tolist()
        ([[1, 1]], [[1, 2]])
    """
    dist = hamming_distance_ref(q_words, x_words, mask)
    k = check_int(k, "k", 1, dist.shape[1])
    d, i = torch.sort(dist, dim=1, stable=True)
    return d[:, :k].to(torch.int32), i[:, :k]


def radius_ref(
    q_words: np.ndarray | torch.Tensor,
    x_words: np.ndarray | torch.Tensor,
    r: int,
    mask: np.ndarray | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every gallery item within Hamming distance ``r`` (inclusive), FAISS range-search style.

    Args:
        q_words, x_words, mask: as in :func:`hamming_distance_ref`. r: radius >= 0.

    Shape:
        -> lims ``[Q + 1]``, distances ``[lims[-1]]``, indices ``[lims[-1]]``.

    Returns:
        (int64 lims, int32 distances, int64 indices); query i's results are
        ``[lims[i], lims[i+1])``, ordered by (distance, index).

    Example:
        >>> lims, d, i = radius_ref(np.array([[0]], np.uint64), np.array([[3], [1]], np.uint64), 1)
        >>> lims.tolist(), d.tolist(), i.tolist()
        ([0, 1], [1], [1])
    """
    r = check_int(r, "r", 0)
    dist = hamming_distance_ref(q_words, x_words, mask)
    d_sorted, i_sorted = torch.sort(dist, dim=1, stable=True)
    keep = d_sorted <= r
    counts = keep.sum(dim=1)
    lims = torch.zeros(dist.shape[0] + 1, dtype=torch.int64)
    lims[1:] = torch.cumsum(counts, 0)
    return lims, d_sorted[keep].to(torch.int32), i_sorted[keep]


def nt_xent_ref(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.3) -> torch.Tensor:
    r"""SimCLR NT-Xent over the 2B rows of two views, cosine similarity.

    With ``z = [z1; z2]`` and ``s[a, b] = cos(z_a, z_b) / tau``, row ``a``'s positive is its
    other view ``p(a) = (a + B) mod 2B`` and its negatives are the other 2B - 2 rows:

    .. math:: \mathcal{L} = \frac{1}{2B} \sum_a \Big[-s[a, p(a)]
              + \log \sum_{b \ne a} e^{s[a, b]}\Big]

    Args:
        z1, z2: the two views' (relaxed) codes. temperature: tau > 0.

    Shape:
        ``[B, L]`` and ``[B, L]`` -> scalar.

    Returns:
        the mean loss (a 0-dim tensor).

    Example:
        >>> z = torch.eye(4); nt_xent_ref(z[:2], z[:2], 0.3) < nt_xent_ref(z[:2], z[2:], 0.3)
        tensor(True)
    """
    check_codes(z1, "z1")
    check_codes(z2, "z2", z1.shape[1])
    check_like(z2, "z2", z1, "z1", device=False)
    tau = check_temperature(temperature)
    b = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    s = masked_similarity_ref(z, z) / tau
    eye = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    s = s.masked_fill(eye, float("-inf"))
    partner = torch.arange(2 * b, device=z.device).add(b).remainder(2 * b)
    return (torch.logsumexp(s, dim=1) - s[torch.arange(2 * b), partner]).mean()


def bernoulli_kl_ref(p1: torch.Tensor, p2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    r"""Symmetric Bernoulli KL of two views' bit probabilities, with stop-gradient targets.

    .. math:: \tfrac12\big[\mathrm{KL}(p^1 \,\|\, \mathrm{sg}\,p^2)
              + \mathrm{KL}(p^2 \,\|\, \mathrm{sg}\,p^1)\big]

    where ``KL(p || q) = sum_j p_j log(p_j / q_j) + (1 - p_j) log((1 - p_j) / (1 - q_j))`` is summed
    over bits and averaged over the batch (CIBHash). Probabilities are clamped to
    ``[eps, 1 - eps]`` inside the logarithms.

    Args:
        p1, p2: bit probabilities ``sigmoid(logits)`` of the two views.

    Shape:
        ``[B, L]`` and ``[B, L]`` -> scalar.

    Returns:
        the mean symmetric KL (a 0-dim tensor).

    Example:
        >>> p = torch.full((2, 4), 0.3); bernoulli_kl_ref(p, p)
        tensor(0.)
    """
    check_codes(p1, "p1")
    check_codes(p2, "p2", p1.shape[1])
    check_like(p2, "p2", p1, "p1", device=False)
    check_probabilities(p1, "p1")
    check_probabilities(p2, "p2")

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        p = p.clamp(eps, 1 - eps)
        q = q.detach().clamp(eps, 1 - eps)
        out = p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())
        return out.sum(dim=1).mean()

    return 0.5 * (kl(p1, p2) + kl(p2, p1))


def brcd_loss_ref(
    student: torch.Tensor,
    teacher_same_view: torch.Tensor,
    teacher_other_view: torch.Tensor,
    mask_table: torch.Tensor | None = None,
    cluster_ids: torch.Tensor | None = None,
    aug_cluster_ids: torch.Tensor | None = None,
    alpha: float = 0.8,
    temperature: float = 0.3,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""The BRCD distillation term (BRCD_SPEC §3-5), mean over the 2B rows.

    For sample k: student anchor code ``s_k`` (view 1), teacher codes ``t_k`` (view 1) and
    ``t'_k`` (view 2), cluster ``c_k``, mask row ``m_k = M[c_k]``.

    * ``Z = [m ⊙ s ; m ⊙ t']`` (2B x L): both rows of sample k use sample k's mask.
    * ``G[a, b] = S(Z_a, Z_b) / tau`` with S the masked cosine of :func:`masked_similarity_ref`.
    * ``A_k = cos(s_k, t_k) / tau`` (unmasked, same view).
    * ``P_k = alpha_k A_k + (1 - alpha_k) G[k, B + k]``, the positive logit of rows k and B + k;
      ``alpha_k = 1`` for an offset positive (``aug_cluster_ids[k] != cluster_ids[k]``), else alpha.
    * Row a (sample ``k = a mod B``) has negatives ``G[a, b]`` for every ``b`` other than a and
      its partner, except false negatives: columns whose cluster equals ``c_k`` are removed
      exactly (student columns b < B use ``c_b``, teacher columns use ``aug_cluster_ids``).
    * ``L = mean_a [ -P + log(exp(P) + sum_{kept b} exp(G[a, b])) ]``.

    Without ``cluster_ids`` every mask row is ``mask_table[0]`` if a one-row table is given, else
    all ones, and no false negative or offset positive is detected. Teacher inputs are detached.

    Args:
        student: student codes s (gradient flows). teacher_same_view: t. teacher_other_view: t'.
        mask_table: {0, 1} per-cluster bit masks M, or None (all ones).
        cluster_ids: c, int64 in [0, C). aug_cluster_ids: ĉ (nearest centroid of the UNMASKED
            t'), or None (= cluster_ids: no offset positives, teacher columns use c).
        alpha: weight of the individual-space positive, in [0, 1]. temperature: tau > 0.
        reduction: ``"mean"`` (the loss), ``"sum"``, or ``"none"`` (the 2B per-row losses).

    Shape:
        student, teachers ``[B, L]``; mask_table ``[C, L]``; ids ``[B]`` -> scalar (or ``[2B]``).

    Returns:
        the BRCD loss reduced as asked.

    Example:
        >>> s = torch.tensor([[1., -1.], [-1., 1.]]); brcd_loss_ref(s, s, s).item() < 0.1
        True
    """
    teachers = {"teacher_same_view": teacher_same_view, "teacher_other_view": teacher_other_view}
    c, c_aug, alpha, tau = check_brcd_args(
        student, teachers, mask_table, cluster_ids, aug_cluster_ids,
        alpha=alpha, temperature=temperature, reduction=reduction, same_device=False,
    )
    bsz, length = student.shape
    dev, dt = student.device, student.dtype
    t = teacher_same_view.detach()
    t2 = teacher_other_view.detach()
    if mask_table is None:
        m = torch.ones(bsz, length, dtype=dt, device=dev)
    elif c is None:  # a one-row table (checked)
        m = mask_table.to(dev, dt).expand(bsz, length)
    else:
        m = mask_table.to(dev, dt)[c]

    z = torch.cat([m * student, m * t2.to(dt)], dim=0)
    g = masked_similarity_ref(z, z) / tau
    a_ind = torch.diagonal(masked_similarity_ref(student, t.to(dt))) / tau
    rows = torch.arange(bsz, device=dev)
    g_pos = g[rows, rows + bsz]
    alpha_k = torch.full((bsz,), float(alpha), dtype=dt, device=dev)
    if c is not None:
        alpha_k = torch.where(c_aug != c, torch.ones_like(alpha_k), alpha_k)
    pos = alpha_k * a_ind + (1 - alpha_k) * g_pos
    pos2 = torch.cat([pos, pos])

    two_b = 2 * bsz
    idx = torch.arange(two_b, device=dev)
    partner = (idx + bsz) % two_b
    keep = torch.ones(two_b, two_b, dtype=torch.bool, device=dev)
    keep[idx, idx] = False
    keep[idx, partner] = False
    if c is not None:
        row_cluster = torch.cat([c, c])
        col_cluster = torch.cat([c, c_aug])
        keep &= row_cluster[:, None] != col_cluster[None, :]
    neg = g.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(torch.cat([pos2[:, None], neg], dim=1), dim=1)
    return reduce_rows(lse - pos2, reduction)
