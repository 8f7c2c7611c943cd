"""The demo report: ``report.md`` and its figures rendered from a metrics dict alone.

:func:`write_report` reads nothing but the dict (what ``python -m brcd demo`` writes to
``metrics.json``), so ``--report-only`` re-renders the markdown and the plots of an earlier run.
:func:`comparisons` states BRCD against each baseline in words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .plots import plot_map_vs_bits, plot_mask_heatmap, plot_pr_curves

__all__ = ["write_report", "comparisons", "label", "fmt"]

TEACHER_LABEL = "teacher (Lite2)"


def label(method: str) -> str:
    """The report name of a method (:data:`brcd.losses.METHODS`) or of ``"teacher"``."""
    from .losses import METHODS

    if method == "teacher":
        return TEACHER_LABEL
    return METHODS[method].label if method in METHODS else method


def fmt(vals: list[float]) -> str:
    """``–``, one value, or ``mean ± std`` (sample std) to 3 decimals."""
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def _spread(vals: list[float]) -> float:
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.005


def comparisons(table: dict, bits_list: list[int], methods: list[str]) -> list[str]:
    """Honest one-liners: BRCD against every other student, per code length and paradigm.

    A margin smaller than the seed spread (the larger std of the two, or 0.005 with one seed)
    is called a tie, not a win.

    Args:
        table: ``{(bits, method, "sshp" | "ashp"): [mAP per seed]}``. bits_list, methods: the
            rows and columns to compare.

    Returns:
        one sentence per (bits, paradigm) where BRCD and a baseline ran.
    """
    lines: list[str] = []
    if "brcd" not in methods:
        return lines
    for b in bits_list:
        for par in ("sshp", "ashp"):
            mine = table.get((b, "brcd", par))
            others = [(o, table[(b, o, par)]) for o in methods
                      if o != "brcd" and table.get((b, o, par))]
            if mine and others:
                lines.append(_verdict(f"- {b} bits {par.upper()}: BRCD ({fmt(mine)})", mine,
                                      others))
    return lines


def _verdict(tag: str, mine: list[float], others: list[tuple[str, list[float]]]) -> str:
    m = float(np.mean(mine))
    lost = [f"{label(o)} {np.mean(v):.3f}" for o, v in others if np.mean(v) >= m]
    tied = [f"{label(o)} {np.mean(v):.3f}" for o, v in others
            if 0 < m - np.mean(v) < max(_spread(mine), _spread(v))]
    best_o, best_v = max(others, key=lambda t: np.mean(t[1]))
    if lost:
        return f"{tag} does NOT beat " + ", ".join(lost) + "."
    if tied:
        return (f"{tag} is ahead of every baseline, but within seed noise of " + ", ".join(tied)
                + f": no clear win (best baseline {label(best_o)} {fmt(best_v)}, "
                f"+{m - np.mean(best_v):.3f}).")
    how = ("by more than the seed spread" if len(mine) > 1 else
           "by more than 0.005 (one seed, no spread measured)")
    return (f"{tag} beats every baseline {how}; best baseline {label(best_o)} {fmt(best_v)} "
            f"(+{m - np.mean(best_v):.3f}).")


def _table(m: dict) -> dict:
    return {(int(b), meth, par): vals for b, d in m["map"].items()
            for meth, pd in d.items() for par, vals in pd.items()}


def _header(m: dict) -> list[str]:
    o = m["options"]
    # metrics.json files written before the option existed ran the paper's one-view BRCD
    sym = "" if o.get("paper_brcd", True) else " (BRCD anchored on both views)"
    lines = [
        "# BRCD demo report", "",
        f"Command: `{m['command']}`  ",
        f"Dataset: **{m['dataset']}** ({m['splits']}).  ",
        f"Wall-clock: {m['wall_s'] / 60:.1f} min on {m['machine']}; main process "
        f"{m['threads']} thread(s), {o['workers']} student worker(s) x 1 thread, training "
        f"precision {m['precision']}.  ",
        f"Teacher: frozen ImageNet EfficientNet-Lite2 at 64 px + MLP head, trained "
        f"{o['teacher_epochs']} epochs without labels on {o['views']} cached views per image. "
        f"Student: tiny-cnn ({m['student_params'] / 1e6:.2f}M parameters) at 28 px, "
        f"{o['student_epochs']} epochs on the same views{sym}. Checkpoints selected on the "
        "validation split (validation queries vs training images), never on the test queries.",
        "",
    ]
    return lines + ([f"> {m['note']}", ""] if m.get("note") else [])


def _retrieval(m: dict) -> list[str]:
    bits_list, methods, table = m["bits"], m["methods"], _table(m)
    lines = [f"## Retrieval: mAP@{m['topk']} on the test queries", "",
             "SSHP: student queries and database. ASHP: student queries, teacher database. "
             f"At {m['main_bits']} bits: mean ± std over {m['seeds']} student seed(s); other "
             "lengths one seed. Ranking by Hamming distance, ties by database index.", "",
             "| model | " + " | ".join(f"{b} bits SSHP | {b} bits ASHP" for b in bits_list)
             + " |", "|---|" + "---|---|" * len(bits_list)]
    tt = " | ".join(f"{fmt(m['teacher'][str(b)]['map'])} | (T/T)" for b in bits_list)
    lines.append(f"| {TEACHER_LABEL}, teacher/teacher | {tt} |")
    for meth in methods:
        cells = " | ".join(f"{fmt(table.get((b, meth, 'sshp'), []))} | "
                           f"{fmt(table.get((b, meth, 'ashp'), []))}" for b in bits_list)
        lines.append(f"| {label(meth)} | {cells} |")
    lines += ["", "### BRCD against the baselines", ""]
    lines += comparisons(table, bits_list, methods) or ["- (BRCD not run)"]
    mb = str(m["main_bits"])
    lines += ["", f"### More metrics at {mb} bits (seed 0)", "",
              "| model | paradigm | mAP@all | P@H≤2 | P@100 | ISD | NRA@10 | NRA@100 | NRA@1000 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in m["details"].get(mb, []):
        nra = row.get("nra") or {}
        lines.append(
            f"| {label(row['model'])} | {row['paradigm']} | {row['map_all']:.3f} | "
            f"{row['p_at_r2']:.3f} | {row['p_at_100']:.3f} | "
            + (f"{row['isd']:.3f}" if row.get("isd") is not None else "–") + " | "
            + " | ".join(f"{nra[str(x)]:.3f}" if str(x) in nra else "–"
                         for x in (10, 100, 1000)) + " |")
    return lines + ["", "ISD: mean normalised Hamming distance of a query's student code to "
                    "its teacher code (0 = identical). NRA@K: overlap of a query's K nearest "
                    "database items in the student's (SSHP) and the teacher's code space.", ""]


def _speed(m: dict) -> list[str]:
    sp = m["speed"]["encode"]
    lines = [f"## Encode speed (forward pass, fp32, {sp['threads']} thread(s))", "",
             "| batch | teacher ms/batch | teacher img/s | student ms/batch | student img/s | "
             "student speed-up |", "|---|---|---|---|---|---|"]
    for bs in sp["batches"]:
        t, s = sp[f"teacher_bs{bs}"], sp[f"student_bs{bs}"]
        lines.append(f"| {bs} | {t['ms_per_batch']} | {t['images_per_s']} | "
                     f"{s['ms_per_batch']} | {s['images_per_s']} | "
                     f"**{sp[f'speedup_bs{bs}']}x** |")
    ss = m["speed"]["search"]
    lines += ["", f"## Search speed (exact top-k, {ss['bits']}-bit codes, engine "
              f"`{ss['engine']}`)", "",
              "| gallery | N | queries | k | fasthash QPS | FAISS QPS | fasthash / FAISS |",
              "|---|---|---|---|---|---|---|"]
    for c in ss["cases"]:
        lines.append(f"| {c['gallery']} | {c['n']:,} | {c['queries']} | {c['k']} | "
                     f"{c['fasthash_qps']:,.0f} | "
                     + (f"{c['faiss_qps']:,.0f} | {c['speedup_vs_faiss']}x |"
                        if "faiss_qps" in c else "– | – |"))
    return lines


def _clusters(m: dict) -> list[str]:
    lines = ["", "## Clusters, bit masks and offset positives", "",
             "| bits | clusters | bits kept per cluster | mean kept | offset-positive views |",
             "|---|---|---|---|---|"]
    for b in m["bits"]:
        c = m["clusters"][str(b)]
        lines.append(f"| {b} | {c['n_clusters']} | {', '.join(map(str, c['bits_kept']))} | "
                     f"{np.mean(c['bits_kept']):.1f} | {100 * c['offset_share']:.1f}% |")
    return lines + ["", "Offset positive: an augmented view whose (unmasked) teacher code is "
                    "nearest to another cluster's centroid than its image's cluster.", ""]


def _series(m: dict) -> dict[str, dict[int, Any]]:
    """mAP against code length: the teacher, every method's SSHP and BRCD's ASHP."""
    series: dict[str, dict[int, Any]] = {
        TEACHER_LABEL: {int(b): m["teacher"][str(b)]["map"][0] for b in m["bits"]}}
    for meth in m["methods"]:
        for par in ("sshp", "ashp"):
            pts = {}
            for b in m["bits"]:
                vals = m["map"][str(b)][meth][par]
                if vals:
                    pts[int(b)] = (float(np.mean(vals)),
                                   float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
            if pts and (par == "sshp" or meth == "brcd"):
                series[f"{label(meth)} {par.upper()}"] = pts
    return series


def _figures(out: Path, m: dict) -> list[str]:
    """Render the figures the metrics allow; return their markdown."""
    mb = m["main_bits"]
    if m.get("pr"):
        plot_pr_curves({k: tuple(v) for k, v in m["pr"].items()}, out / "pr_curves.png",
                       title=f"Precision–recall over Hamming radii ({mb} bits, test queries)")
    plot_map_vs_bits(_series(m), out / "map_vs_bits.png", metric=f"mAP@{m['topk']}")
    table = m["clusters"].get(str(mb), {}).get("mask_table")
    if table is not None:
        plot_mask_heatmap(np.asarray(table), out / "mask_heatmap.png",
                          title=f"Bits kept per cluster ({mb} bits)")
    lines = ["## Figures", ""]
    for title, name in (("Precision–recall", "pr_curves.png"),
                        ("mAP against code length", "map_vs_bits.png"),
                        (f"Bit masks ({mb} bits)", "mask_heatmap.png")):
        if (out / name).is_file():
            lines += [f"![{title}]({name})", ""]
    return lines


def write_report(out: str | Path, m: dict) -> Path:
    """Render ``<out>/report.md`` and its PNG figures from the metrics dict ``m``.

    Args:
        out: the output folder. m: the demo's metrics (``metrics.json``).

    Returns:
        the path of ``report.md``.

    Example:
        >>> write_report("runs/demo", json.load(open("runs/demo/metrics.json")))  # doctest: +SKIP
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = _header(m) + _retrieval(m) + _speed(m) + _clusters(m) + _figures(out, m)
    lines += ["## Time per phase", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in m["phases"].items()]
    lines += ["", "All numbers: `metrics.json`. Checkpoints and the view cache: `work/`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
