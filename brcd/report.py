"""The demo report: ``report.md`` and its figures rendered from a metrics dict alone.

:func:`write_report` reads nothing but the dict (what ``python -m brcd demo`` writes to
``metrics.json``), so ``--report-only`` re-renders the markdown and the plots of an earlier run.
The statistics (paired-seed verdicts, ablation deltas, the diagnosis paragraph) come from
:mod:`brcd.analysis`; metrics written before a section existed render without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import analysis
from .plots import plot_ablation, plot_map_vs_bits, plot_mask_heatmap, plot_pr_curves

__all__ = ["write_report", "paired_sentence", "label", "fmt"]

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


def _pm(r: dict) -> str:
    """``+0.004 ± 0.002`` (or ``+0.004`` with one seed) of a paired result."""
    return f"{r['diff_mean']:+.3f}" + (f" ± {r['diff_std']:.3f}" if r.get("diff_std") is not None
                                       else "")


def _two_se(r: dict) -> str:
    se = r.get("se")
    if se is None and r.get("diff_std") is not None:  # the schema's "paired" need not hold se
        se = r["diff_std"] / np.sqrt(r["n"])
    return f"{2 * se:.3f}" if se is not None else "–"


_VERDICT_WORDS = {
    "win": "BRCD is ahead by more than twice the standard error",
    "loss": "BRCD is behind by more than twice the standard error",
    "tie": "the difference is within twice the standard error",
}


def paired_sentence(bits: str | int, paradigm: str, student: str, r: dict) -> str:
    """One column's paired verdict in words.

    Args:
        bits, paradigm (``"sshp"`` / ``"ashp"``), student: the column. r: its
            :func:`brcd.analysis.paired_table` entry.

    Returns:
        e.g. ``"32 bits SSHP, paper-student: BRCD vs KD codes +0.004 ± 0.002 over 3 paired
        seeds: tie (2·SE = 0.005): the difference is within twice the standard error."``

    Example:
        >>> paired_sentence(32, "sshp", "tiny-cnn", {"best_baseline": "sp", "diff_mean": 0.01,
        ...                 "diff_std": None, "se": None, "n": 1, "verdict": "n/a"})[-47:]
        '1 seed: n/a (a verdict needs two paired seeds).'
    """
    head = (f"{bits} bits {paradigm.upper()}, {student}: BRCD vs {label(r['best_baseline'])} "
            f"{_pm(r)} over {r['n']} ")
    if r["verdict"] not in _VERDICT_WORDS:
        return head + "seed: n/a (a verdict needs two paired seeds)."
    return (head + f"paired seeds: {r['verdict']} (2·SE = {_two_se(r)}): "
            f"{_VERDICT_WORDS[r['verdict']]}.")


def _table(m: dict, key: str = "map") -> dict:
    return {(int(b), meth, par): vals for b, d in m[key].items()
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
        f"{o['student_epochs']} epochs on the same views{sym}"
        + (f"; paper student: frozen ImageNet Lite0 at {o['paper_size']} px + MLP head, "
           f"{o['paper_epochs']} epochs of the head on cached features of those views"
           if "paper_epochs" in o and "paper-student" in o.get("students", []) else "")
        + ". Checkpoints selected on the validation split (validation queries vs training "
        "images), never on the test queries.",
        "",
    ]
    return lines + ([f"> {m['note']}", ""] if m.get("note") else [])


def _student_label(m: dict, student: str) -> str:
    return (m.get("students") or {}).get(student, {}).get("label", student)


def _map_table(m: dict, key: str) -> list[str]:
    bits_list, methods, table = m["bits"], m["methods"], _table(m, key)
    lines = ["| model | " + " | ".join(f"{b} bits SSHP | {b} bits ASHP" for b in bits_list)
             + " |", "|---|" + "---|---|" * len(bits_list)]
    tt = " | ".join(f"{fmt(m['teacher'][str(b)]['map'])} | (T/T)" for b in bits_list)
    lines.append(f"| {TEACHER_LABEL}, teacher/teacher | {tt} |")
    for meth in methods:
        cells = " | ".join(f"{fmt(table.get((b, meth, 'sshp'), []))} | "
                           f"{fmt(table.get((b, meth, 'ashp'), []))}" for b in bits_list)
        lines.append(f"| {label(meth)} | {cells} |")
    return lines


def _retrieval(m: dict) -> list[str]:
    lines = [f"## Retrieval: mAP@{m['topk']} on the test queries", "",
             "SSHP: student queries and database. ASHP: student queries, teacher database. "
             f"Mean ± std over {m['seeds']} paired student seed(s) (one value: one seed). "
             "Ranking by Hamming distance, ties by database index.", ""]
    for student, key in analysis.STUDENT_MAPS.items():
        if analysis.student_map(m, student):
            lines += [f"### Student {_student_label(m, student)}", ""] + _map_table(m, key) + [""]
    mb = str(m["main_bits"])
    main = next(iter(m.get("students") or {}), "tiny-cnn")  # whose runs "details" holds
    lines += [f"### More metrics at {mb} bits ({main} student, seed 0)", "",
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


def _students(m: dict) -> list[str]:
    st = m.get("students")
    if not st:
        return []
    batches = sorted({int(b) for s in st.values() for b in (s.get("speedup") or {})})
    lines = ["## Students", "",
             "Encode speed-up = teacher encode time / student encode time at that batch size.",
             "", "| student | parameters | trainable | "
             + " | ".join(f"speed-up, batch {b}" for b in batches) + " |",
             "|---|---|---|" + "---|" * len(batches)]
    for name, s in st.items():
        sp = s.get("speedup") or {}
        trainable = s.get("trainable_params", s.get("params"))
        lines.append(f"| {s.get('label', name)} | {s['params'] / 1e6:.2f}M | "
                     + (f"{trainable / 1e6:.2f}M" if trainable is not None else "–") + " | "
                     + " | ".join(f"**{sp[str(b)]:.1f}x**" if str(b) in sp else "–"
                                  for b in batches) + " |")
    return lines + [""]


def _paired(m: dict) -> list[str]:
    tables = {s: analysis.paired_for(m, s) for s in analysis.STUDENT_MAPS}
    tables = {s: t for s, t in tables.items() if t}
    lines = ["## BRCD against the best baseline (paired seeds)", "",
             "Per column, the best baseline is the one with the highest mean mAP; seed i of "
             "BRCD and of the baseline share initialisation and batch order, so the table gives "
             "mean ± std of the per-seed differences BRCD − baseline. Verdict: win if the mean "
             "exceeds 2·SE (SE = std / √n), loss if it is below −2·SE, else tie.", ""]
    if not tables:
        return lines + ["- (BRCD not run)", ""]
    lines += ["| student | bits | paradigm | best baseline | BRCD − baseline | n | 2·SE | "
              "verdict |", "|---|---|---|---|---|---|---|---|"]
    said = []
    for student, t in tables.items():
        for b in sorted(t, key=int):
            for par in analysis.PARADIGMS:
                if par in t[b]:
                    r = t[b][par]
                    lines.append(f"| {student} | {b} | {par.upper()} | "
                                 f"{label(r['best_baseline'])} | {_pm(r)} | {r['n']} | "
                                 f"{_two_se(r)} | **{r['verdict']}** |")
                    said.append(f"- {paired_sentence(b, par, student, r)}")
    return lines + [""] + said + [""]


def _ablation(m: dict) -> list[str]:
    abl = m.get("ablation")
    if not abl:
        return []
    diffs = analysis.ablation_paired_for(m)
    lines = ["## Ablation (paper-protocol student)", "",
             "mAP mean ± std over seeds, and the paired difference variant − full BRCD with "
             "its verdict (2·SE rule, as above).", ""]
    for b in sorted(abl, key=int):
        lines += [f"### {b} bits", "",
                  "| variant | SSHP | SSHP − full | verdict | ASHP | ASHP − full | verdict |",
                  "|---|---|---|---|---|---|---|"]
        order = [v for v in analysis.ABLATION_VARIANTS if v in abl[b]]
        for var in order + [v for v in abl[b] if v not in order]:
            cells = []
            for par in analysis.PARADIGMS:
                r = (diffs.get(b) or {}).get(var, {}).get(par)
                cells += [fmt(abl[b][var].get(par) or []),
                          _pm(r) if r else "–", r["verdict"] if r else "–"]
            lines.append(f"| {analysis.ABLATION_LABELS.get(var, var)} | " + " | ".join(cells)
                         + " |")
        lines.append("")
    return lines


def _diagnosis(m: dict) -> list[str]:
    diag = m.get("diagnosis") or {}
    lines = ["## Diagnosis", ""]
    for student in analysis.STUDENT_MAPS:
        for b in sorted(diag.get(student) or {}, key=int):
            d = diag[student][b]
            isd, nra = d.get("isd") or {}, d.get("nra") or {}
            meths = list(dict.fromkeys([*isd, *nra]))
            if meths:
                lines += [f"### Alignment with the teacher: {student}, {b} bits (seed 0)", "",
                          "| model | ISD | NRA@10 | NRA@100 | NRA@1000 |", "|---|---|---|---|---|"]
                for meth in meths:
                    lines.append(f"| {label(meth)} | "
                                 + (f"{isd[meth]:.3f}" if isd.get(meth) is not None else "–")
                                 + " | " + " | ".join(
                                     f"{nra[meth][k]:.3f}" if k in (nra.get(meth) or {})
                                     else "–" for k in ("10", "100", "1000")) + " |")
                lines.append("")
            terms = d.get("loss_terms") or {}
            if terms:
                lines += [f"### Loss parts, first → last epoch: {student}, {b} bits", "",
                          "| model | part | first epoch | last epoch |", "|---|---|---|---|"]
                for meth, t in terms.items():
                    first, last = t.get("first") or {}, t.get("last") or {}
                    for part in dict.fromkeys([*first, *last]):
                        lines.append(f"| {label(meth)} | {part} | "
                                     + " | ".join(f"{x[part]:.4f}" if part in x else "–"
                                                  for x in (first, last)) + " |")
                lines.append("")
    clusters = diag.get("clusters") or {}
    if clusters:
        lines += ["### Clusters, offset positives and false negatives", "",
                  "| bits | offset-positive views | bits kept per cluster (mean, min–max) | "
                  "negatives removed per row | share of the 2B − 2 |", "|---|---|---|---|---|"]
        for b in sorted(clusters, key=int):
            c = clusters[b]
            kept = c.get("bits_kept") or []
            lines.append(
                f"| {b} | "
                + (f"{100 * c['offset_share']:.1f}%" if c.get("offset_share") is not None
                   else "–") + " | "
                + (f"{np.mean(kept):.1f} ({min(kept)}–{max(kept)})" if kept else "–") + " | "
                + (f"{c['fn_removed_per_row']:.2f}" if c.get("fn_removed_per_row") is not None
                   else "–") + " | "
                + (f"{100 * c['fn_removed_share']:.1f}%" if c.get("fn_removed_share")
                   is not None else "–") + " |")
        lines.append("")
    if not diag and not m.get("ablation"):
        return []  # older metrics: the paired verdicts above are all there is to say
    text = analysis.diagnosis_text(m)
    return lines + ["### What the numbers say", ""] + [p + "\n" for p in text]


def _speed(m: dict) -> list[str]:
    # every student's own timing (the teacher timed next to it); older metrics: the one student
    timed = {s.get("label", n): s["encode"] for n, s in (m.get("students") or {}).items()
             if s.get("encode")} or {"student": m["speed"]["encode"]}
    sp = next(iter(timed.values()))
    lines = [f"## Encode speed (forward pass, fp32, {sp['threads']} thread(s))", "",
             "| student | batch | teacher ms/batch | teacher img/s | student ms/batch | "
             "student img/s | student speed-up |", "|---|---|---|---|---|---|---|"]
    for name, sp in timed.items():
        for bs in sp["batches"]:
            t, s = sp[f"teacher_bs{bs}"], sp[f"student_bs{bs}"]
            lines.append(f"| {name} | {bs} | {t['ms_per_batch']} | {t['images_per_s']} | "
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
    abl = m.get("ablation") or {}
    ab = str(mb) if str(mb) in abl else next(iter(abl), None)
    if ab is not None:
        plot_ablation({analysis.ABLATION_LABELS.get(v, v): d for v, d in abl[ab].items()},
                      out / "ablation.png", title=f"Ablation, paper student ({ab} bits)")
    lines = ["## Figures", ""]
    for title, name in (("Precision–recall", "pr_curves.png"),
                        ("mAP against code length", "map_vs_bits.png"),
                        (f"Bit masks ({mb} bits)", "mask_heatmap.png"),
                        ("Ablation", "ablation.png")):
        if name == "ablation.png" and ab is None:
            continue  # a stale figure of an earlier run
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
    lines = (_header(m) + _students(m) + _retrieval(m) + _paired(m) + _ablation(m)
             + _diagnosis(m) + _speed(m) + _clusters(m) + _figures(out, m))
    lines += ["## Time per phase", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in m["phases"].items()]
    lines += ["", "All numbers: `metrics.json`. Checkpoints and the view cache: `work/`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
