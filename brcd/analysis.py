"""Statistics behind the demo report (numpy only): paired-seed verdicts of BRCD against the best
baseline, the ablation against full BRCD, the false-negative removals of a batch, and the
diagnosis paragraph written from the numbers of a metrics dict.

Paired seeds: seed i of two methods shares its initialisation and batch order, so the per-seed
difference ``d_i = a_i - b_i`` removes the variation the two runs share. With ``n`` seeds,
``SE = std(d, ddof=1) / sqrt(n)``; the verdict is ``"win"`` when ``mean(d) > 2 SE``,
``"loss"`` when ``mean(d) < -2 SE``, else ``"tie"`` (``"n/a"`` with fewer than two seeds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "PARADIGMS",
    "STUDENT_MAPS",
    "ABLATION_VARIANTS",
    "ABLATION_LABELS",
    "paired_verdict",
    "best_baseline",
    "paired_table",
    "ablation_paired",
    "student_map",
    "paired_for",
    "ablation_paired_for",
    "false_negative_counts",
    "false_negative_removals",
    "diagnosis_text",
]

PARADIGMS = ("sshp", "ashp")
# metrics key of each student's mAP table
STUDENT_MAPS = {"tiny-cnn": "map", "paper-student": "map_paper_student"}
ABLATION_VARIANTS = ("full", "no-mask", "no-offset", "no-false-negative", "alpha-1",
                     "opposite-mask", "zero-mask")
ABLATION_LABELS = {
    "full": "full BRCD",
    "no-mask": "no bit mask",
    "no-offset": "no offset-positive handling",
    "no-false-negative": "no false-negative removal",
    "alpha-1": "α = 1",
    "opposite-mask": "opposite mask convention",
    "zero-mask": "all-zero mask (research code)",
}


def paired_verdict(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Mean ± std of the per-seed differences ``a - b`` and the 2·SE verdict.

    Args:
        a, b: one value per seed, in the same seed order (``a[i]`` and ``b[i]`` paired).

    Shape:
        ``[n]`` and ``[n]``.

    Returns:
        ``{"diff_mean", "diff_std" (ddof=1), "se", "n", "verdict"}``; ``verdict`` is ``"win"``
        (mean > 2·SE), ``"loss"`` (mean < -2·SE) or ``"tie"``. With n = 1: ``diff_std`` and
        ``se`` are None and ``verdict`` is ``"n/a"``.

    Example:
        >>> r = paired_verdict([0.51, 0.62, 0.73], [0.50, 0.60, 0.70])
        >>> round(r["diff_mean"], 4), round(r["diff_std"], 4), r["verdict"]
        (0.02, 0.01, 'win')
    """
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.ndim != 1 or b_arr.ndim != 1:
        raise ValueError("a and b must be 1-D lists of per-seed values")
    if len(a_arr) != len(b_arr):
        raise ValueError(f"a and b must have the same length (paired seeds), got {len(a_arr)} "
                         f"and {len(b_arr)}")
    if len(a_arr) == 0:
        raise ValueError("a and b must hold at least one seed each, got empty lists")
    d = a_arr - b_arr
    n = len(d)
    mean = float(d.mean())
    if n < 2:
        return {"diff_mean": mean, "diff_std": None, "se": None, "n": n, "verdict": "n/a"}
    std = float(d.std(ddof=1))
    se = std / math.sqrt(n)
    verdict = "win" if mean > 2 * se else "loss" if mean < -2 * se else "tie"
    return {"diff_mean": mean, "diff_std": std, "se": se, "n": n, "verdict": verdict}


def best_baseline(column: dict[str, Sequence[float]]) -> str | None:
    """The baseline (any method but ``"brcd"``) with the highest mean in one column.

    Args:
        column: ``{method: [value per seed]}`` of one (code length, paradigm); methods without
            values are skipped.

    Returns:
        the method name; equal means go to the one listed first; None without a baseline.

    Example:
        >>> best_baseline({"none": [0.5], "sp": [0.6, 0.62], "brcd": [0.9]})
        'sp'
    """
    best, best_mean = None, -math.inf
    for meth, vals in column.items():
        if meth == "brcd" or not vals:
            continue
        mean = float(np.mean(vals))
        if mean > best_mean:  # strict: the earlier method keeps an equal mean
            best, best_mean = meth, mean
    return best


def _paired_prefix(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    # seeds run in order, so the first min(len) values of both are the seeds both ran
    n = min(len(a), len(b))
    return paired_verdict(list(a)[:n], list(b)[:n])


def paired_table(map_dict: dict, methods: Sequence[str] | None = None) -> dict[str, dict]:
    """BRCD against the best baseline of every column of a mAP table.

    Args:
        map_dict: ``{bits: {method: {"sshp": [per seed], "ashp": [per seed]}}}`` (metrics
            ``"map"`` / ``"map_paper_student"``). methods: the methods to consider, in tie-break
            order (None: the table's order).

    Returns:
        ``{bits: {paradigm: {"best_baseline", "diff_mean", "diff_std", "se", "n", "verdict"}}}``
        with diff = BRCD - best baseline over the seeds both ran; columns without BRCD or
        without a baseline are left out.

    Example:
        >>> t = paired_table({"32": {"sp": {"sshp": [.5, .6]}, "brcd": {"sshp": [.6, .6]}}})
        >>> t["32"]["sshp"]["best_baseline"], t["32"]["sshp"]["verdict"]
        ('sp', 'tie')
    """
    out: dict[str, dict] = {}
    for bits, per_method in map_dict.items():
        order = list(per_method) if methods is None else [x for x in methods if x in per_method]
        for par in PARADIGMS:
            column = {x: per_method[x].get(par) or [] for x in order}
            mine, best = column.get("brcd"), best_baseline(column)
            if mine and best is not None:
                out.setdefault(str(bits), {})[par] = {
                    "best_baseline": best, **_paired_prefix(mine, column[best])}
    return out


def ablation_paired(ablation_dict: dict) -> dict[str, dict]:
    """Every ablation variant against full BRCD, per code length and paradigm.

    Args:
        ablation_dict: ``{bits: {variant: {"sshp": [per seed], "ashp": [per seed]}}}`` with a
            ``"full"`` variant (metrics ``"ablation"``).

    Returns:
        ``{bits: {variant: {paradigm: {"reference": "full", "diff_mean", "diff_std", "se", "n",
        "verdict"}}}}`` with diff = variant - full; variants without values are left out.

    Example:
        >>> r = ablation_paired({"32": {"full": {"sshp": [.5, .75]},
        ...                             "no-mask": {"sshp": [.25, .5]}}})
        >>> r["32"]["no-mask"]["sshp"]["diff_mean"], r["32"]["no-mask"]["sshp"]["verdict"]
        (-0.25, 'loss')
    """
    out: dict[str, dict] = {}
    for bits, variants in ablation_dict.items():
        full = variants.get("full") or {}
        for var, pars in variants.items():
            if var == "full":
                continue
            for par in PARADIGMS:
                vals, ref = pars.get(par) or [], full.get(par) or []
                if vals and ref:
                    out.setdefault(str(bits), {}).setdefault(var, {})[par] = {
                        "reference": "full", **_paired_prefix(vals, ref)}
    return out


def student_map(m: dict, student: str) -> dict:
    """A student's mAP table in the metrics, or ``{}``.

    ``m["map"]`` is the first student the demo ran: tiny-cnn in metrics without
    ``"students"`` (older runs), else only if ``"tiny-cnn"`` is among ``m["students"]``.
    """
    if student == "tiny-cnn" and "students" in m and "tiny-cnn" not in m["students"]:
        return {}
    return m.get(STUDENT_MAPS.get(student, "")) or {}


def paired_for(m: dict, student: str) -> dict[str, dict]:
    """``m["paired"][student]`` if the metrics hold it, else computed from its mAP table."""
    if student in (m.get("paired") or {}):
        return m["paired"][student]
    table = student_map(m, student)
    return paired_table(table, m.get("methods")) if table else {}


def ablation_paired_for(m: dict) -> dict[str, dict]:
    """``m["ablation_paired"]`` if the metrics hold it, else computed from ``m["ablation"]``."""
    if m.get("ablation_paired"):
        return m["ablation_paired"]
    return ablation_paired(m["ablation"]) if m.get("ablation") else {}


def _as_numpy(x: Any) -> np.ndarray:
    # torch tensors (possibly on an accelerator) without importing torch here
    return np.asarray(x.detach().cpu()) if hasattr(x, "detach") else np.asarray(x)


def false_negative_counts(cluster_ids: Sequence[int],
                          aug_cluster_ids: Sequence[int]) -> np.ndarray:
    """Negatives the BRCD false-negative rule removes from each of a batch's 2B rows.

    Rows and columns follow :func:`fasthash.reference.brcd_loss_ref`: rows and columns
    ``0..B-1`` are the student anchors, ``B..2B-1`` the teacher's other view. Row ``a`` (sample
    ``k = a mod B``) has cluster ``c_k``; student column ``b`` has ``c_b``, teacher column
    ``B + b`` has ``ĉ_b``. Of the 2B - 2 negatives (all but the row itself and its partner
    ``(a + B) mod 2B``) those whose column cluster equals the row's are removed.

    Args:
        cluster_ids: c, the images' clusters. aug_cluster_ids: ĉ, the nearest-centroid cluster
            of each teacher other-view code.

    Shape:
        ``[B]`` and ``[B]`` -> ``[2B]``.

    Returns:
        int64 counts per row.

    Example:
        >>> false_negative_counts([0, 0, 1, 1], [0, 1, 1, 1]).tolist()
        [1, 2, 3, 3, 1, 2, 3, 3]
    """
    c, c_aug = _as_numpy(cluster_ids), _as_numpy(aug_cluster_ids)
    if c.ndim != 1 or c.shape != c_aug.shape or len(c) < 2:
        raise ValueError(f"cluster_ids and aug_cluster_ids must be 1-D of the same length >= 2, "
                         f"got shapes {c.shape} and {c_aug.shape}")
    bsz = len(c)
    same = np.concatenate([c, c])[:, None] == np.concatenate([c, c_aug])[None, :]
    idx = np.arange(2 * bsz)
    same[idx, idx] = False
    same[idx, (idx + bsz) % (2 * bsz)] = False
    return same.sum(axis=1).astype(np.int64)


def false_negative_removals(cluster_ids: Sequence[int], view_cluster_ids: Sequence[Sequence[int]],
                            batch_size: int, n_batches: int, seed: int = 0) -> dict[str, float]:
    """How many negatives the false-negative rule removes per row, over random batches.

    Each batch draws ``batch_size`` distinct images and, per image, two distinct views: view 1
    is the student anchor, view 2 the teacher's other view whose nearest-centroid cluster ĉ the
    teacher columns use (:func:`false_negative_counts`).

    Args:
        cluster_ids: the images' clusters c. view_cluster_ids: ĉ of every cached view.
        batch_size: B, 2 <= B <= N. n_batches: >= 1. seed: the sampling seed.

    Shape:
        cluster_ids ``[N]``, view_cluster_ids ``[N, V]`` with V >= 2.

    Returns:
        ``{"per_row": mean removed per row, "share": that mean / (2B - 2)}``.

    Example:
        >>> r = false_negative_removals([0, 0, 1, 1], [[0, 0], [1, 1], [1, 1], [1, 1]], 4, 3)
        >>> r["per_row"], r["share"]
        (2.25, 0.375)
    """
    c = _as_numpy(cluster_ids)
    views = _as_numpy(view_cluster_ids)
    if c.ndim != 1:
        raise ValueError(f"cluster_ids must be 1-D [N], got shape {c.shape}")
    if views.ndim != 2 or views.shape[0] != len(c) or views.shape[1] < 2:
        raise ValueError(f"view_cluster_ids must be [N, V] with N = {len(c)} and V >= 2, got "
                         f"shape {views.shape}")
    if not (isinstance(batch_size, int | np.integer) and 2 <= batch_size <= len(c)):
        raise ValueError(f"batch_size must be an int in [2, {len(c)}], got {batch_size!r}")
    if not (isinstance(n_batches, int | np.integer) and n_batches >= 1):
        raise ValueError(f"n_batches must be an int >= 1, got {n_batches!r}")
    rng = np.random.default_rng(seed)
    n_views = views.shape[1]
    total = 0
    for _ in range(n_batches):
        idx = rng.choice(len(c), size=batch_size, replace=False)
        v1 = rng.integers(n_views, size=batch_size)
        v2 = (v1 + rng.integers(1, n_views, size=batch_size)) % n_views  # uniform among v != v1
        total += int(false_negative_counts(c[idx], views[idx, v2]).sum())
    per_row = total / (n_batches * 2 * batch_size)
    return {"per_row": per_row, "share": per_row / (2 * batch_size - 2)}


# ---------------------------------------------------------------- diagnosis paragraph

def _label(method: str) -> str:
    from .losses import METHODS

    return METHODS[method].label if method in METHODS else method


def _columns(paired: dict) -> list[tuple[str, str, dict]]:
    return [(b, par, paired[b][par]) for b in sorted(paired, key=int) for par in PARADIGMS
            if par in paired[b]]


def _verdict_sentence(student: str, paired: dict) -> str | None:
    cols = [(b, p, r) for b, p, r in _columns(paired) if r.get("verdict") in
            ("win", "tie", "loss")]
    if not cols:
        if _columns(paired):
            return (f"{student}: every column has a single seed, so no paired verdict against "
                    "the best baseline is possible.")
        return None
    counts = {v: sum(r["verdict"] == v for _, _, r in cols) for v in ("win", "tie", "loss")}
    parts = "; ".join(f"{b} bits {p.upper()} {r['verdict']} ({r['diff_mean']:+.3f} vs "
                      f"{_label(r['best_baseline'])}, n = {r['n']})" for b, p, r in cols)
    return (f"{student}: over paired seeds BRCD wins {counts['win']}, ties {counts['tie']} and "
            f"loses {counts['loss']} of {len(cols)} columns ({parts}).")


# ISD differences below this (0.5% of the bits) are read as "about as close" to the teacher
_ISD_SAME = 0.005


def _alignment_sentence(bits: str, diag: dict, baselines: list[str], lost: bool) -> str | None:
    isd, nra = diag.get("isd") or {}, diag.get("nra") or {}
    said = []
    for base in baselines:
        facts = []
        if "brcd" in isd and base in isd:
            facts.append(f"ISD {isd['brcd']:.3f} vs {isd[base]:.3f}")
        if "100" in (nra.get("brcd") or {}) and "100" in (nra.get(base) or {}):
            facts.append(f"NRA@100 {nra['brcd']['100']:.3f} vs {nra[base]['100']:.3f}")
        if "brcd" in isd and base in isd:
            d = isd["brcd"] - isd[base]
            where = ("closer to the teacher's than" if d < -_ISD_SAME else
                     "farther from the teacher's than" if d > _ISD_SAME else
                     "about as close to the teacher's as")
            facts.append(f"so BRCD's codes are {where} those of {_label(base)}")
        if facts:
            said.append(f"BRCD vs {_label(base)}: " + ", ".join(facts))
    if not said:
        return None
    text = (f"Alignment at {bits} bits (seed 0; ISD 0 = identical to the teacher, NRA@100 1 = "
            "the same 100 neighbours): " + "; ".join(said) + ".")
    if lost and "brcd" in isd and all(b in isd and isd["brcd"] <= isd[b] + _ISD_SAME
                                      for b in baselines):
        text += (" BRCD is at least as close to the teacher as the best baseline, yet that does "
                 "not turn into a mAP win.")
    elif lost and "brcd" in isd and any(b in isd and isd["brcd"] > isd[b] + _ISD_SAME
                                        for b in baselines):
        text += " BRCD imitates the teacher less closely than the best baseline does."
    return text


def _ablation_sentence(bits: str, abl: dict) -> str | None:
    rows = [(var, par, abl[var][par]) for var in abl for par in PARADIGMS if par in abl[var]]
    scored = [(v, p, r) for v, p, r in rows if r.get("verdict") in ("win", "tie", "loss")]
    if not scored:
        return None
    moved = [(v, p, r) for v, p, r in scored if r["verdict"] != "tie"]
    n_var = len({v for v, _, _ in scored})
    if not moved:
        return (f"Ablations at {bits} bits: every variant tested ({n_var}) ties with full BRCD "
                "in every paradigm (|difference| within 2·SE), so none of the switched-off parts "
                "measurably changes mAP here.")
    said = "; ".join(
        f"{ABLATION_LABELS.get(v, v)} {p.upper()} {r['diff_mean']:+.3f} ± {r['diff_std']:.3f} "
        f"({'better' if r['verdict'] == 'win' else 'worse'} than full)" for v, p, r in moved)
    return (f"Ablations at {bits} bits: {len(moved)} of {len(scored)} variant-paradigm "
            f"comparisons differ from full BRCD beyond 2·SE: {said}; the rest tie.")


def _cluster_sentence(bits: str, cl: dict) -> str | None:
    facts = []
    if cl.get("offset_share") is not None:
        facts.append(f"{100 * cl['offset_share']:.1f}% of the augmented views are offset "
                     "positives (their positive uses the individual term only)")
    if cl.get("fn_removed_per_row") is not None:
        share = cl.get("fn_removed_share")
        facts.append(f"the false-negative rule removes {cl['fn_removed_per_row']:.2f} negatives "
                     "per row" + (f" ({100 * share:.1f}% of the 2B - 2)" if share is not None
                                  else ""))
    kept = cl.get("bits_kept")
    if kept:
        k = np.asarray(kept, dtype=float)
        what = (f"the masks keep {k.mean():.1f} of {bits} bits per cluster on average "
                f"(min {int(k.min())}, max {int(k.max())})")
        if k.min() == int(bits):
            what += ", i.e. every bit, so the masked structural term equals the unmasked one"
        elif k.max() == 0:
            what += ", i.e. none, so the structural term is zero"
        facts.append(what)
    if not facts:
        return None
    return f"Clusters at {bits} bits: " + "; ".join(facts) + "."


def _loss_sentence(bits: str, terms: dict) -> str | None:
    t = terms.get("brcd") or {}
    first, last = t.get("first") or {}, t.get("last") or {}
    parts = [p for p in first if p in last]
    if not parts:
        return None
    moves = ", ".join(f"{p} {first[p]:.3f} → {last[p]:.3f}" for p in parts)
    return f"BRCD's loss parts at {bits} bits, first → last epoch: {moves}."


def diagnosis_text(metrics: dict) -> list[str]:
    """One evidence-backed paragraph per student, written from the numbers in ``metrics``.

    Each paragraph states the paired verdicts against the best baseline and, per code length
    with diagnosis numbers: BRCD's alignment with the teacher against the best baselines
    (ISD, NRA@100), the ablation deltas and their verdicts (paper student), the offset-positive
    share, the false-negative removals per row, the bits the masks keep, and how BRCD's loss
    parts moved from the first to the last epoch. A sentence whose numbers are missing is left
    out; a student without any number gets no paragraph.

    Args:
        metrics: the demo's metrics dict (``metrics.json``; keys as in its schema).

    Returns:
        the paragraphs, tiny-cnn first.

    Example:
        >>> diagnosis_text({"map": {"32": {"sp": {"sshp": [.5, .6]},
        ...                                "brcd": {"sshp": [.6, .8]}}}})[0][:40]
        'tiny-cnn: over paired seeds BRCD wins 1,'
    """
    diag_all = metrics.get("diagnosis") or {}
    clusters = diag_all.get("clusters") or {}
    abl = ablation_paired_for(metrics)
    out = []
    for student in STUDENT_MAPS:
        paired = paired_for(metrics, student)
        diag = diag_all.get(student) or {}
        sentences = [_verdict_sentence(student, paired)]
        for bits in sorted(set(diag) | (set(abl) if student == "paper-student" else set()),
                           key=int):
            cols = paired.get(bits, {})
            not_won = [f"{p.upper()} ({r['verdict']})" for p, r in cols.items()
                       if r.get("verdict") != "win"]
            baselines = list(dict.fromkeys(r["best_baseline"] for r in cols.values()))
            evidence = [
                _alignment_sentence(bits, diag.get(bits) or {}, baselines, bool(not_won)),
                _ablation_sentence(bits, abl.get(bits) or {}) if student == "paper-student"
                else None,
                _cluster_sentence(bits, clusters.get(bits) or {}),
                _loss_sentence(bits, (diag.get(bits) or {}).get("loss_terms") or {}),
            ]
            evidence = [e for e in evidence if e]
            if not_won and evidence:
                sentences.append(f"BRCD does not win at {bits} bits in "
                                 + " and ".join(not_won) + "; what was measured there follows.")
            sentences += evidence
        text = [s for s in sentences if s]
        if text:
            out.append(" ".join(text))
    return out
