"""The evaluate stage: test-protocol retrieval of teacher and student codes (query split vs
database split), the validation mAP the trainers select on, and the per-run metrics the demo
reports (SSHP / ASHP metrics, ISD, NRA@K)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..retrieval import evaluate as retrieval_evaluate
from ..retrieval import isd, map_at_k, nra
from ..trainer import load_checkpoint
from .context import Context
from .encode import encode_images, load_model

__all__ = ["EvalInput", "evaluate", "retrieval_map", "run_maps", "score_run", "score_runs"]


def retrieval_map(query_codes, db_codes, query_labels, db_labels, *, topk: int) -> float:
    """mAP@topk (clipped to the database size) of ±1 codes (torch or numpy)."""
    q = query_codes.numpy() if isinstance(query_codes, torch.Tensor) else query_codes
    db = db_codes.numpy() if isinstance(db_codes, torch.Tensor) else db_codes
    k = min(int(topk), len(db))
    return map_at_k(q, db, query_labels, db_labels, topk=k)


@dataclass(frozen=True, kw_only=True)
class EvalInput:
    """The checkpoints to evaluate, the code length, and whether to add the student's teacher
    (from its checkpoint) when ``teacher`` is None."""

    bits: int
    student: Path | None = None
    teacher: Path | None = None
    with_teacher: bool = True

    @classmethod
    def from_config(cls, cfg, student=None, teacher=None, with_teacher: bool = True) -> EvalInput:
        """The evaluate stage's input (``cfg.bits``) for the given checkpoints."""
        return cls(bits=cfg.bits, student=Path(student) if student is not None else None,
                   teacher=Path(teacher) if teacher is not None else None,
                   with_teacher=with_teacher)


def evaluate(inp: EvalInput, ctx: Context) -> dict[str, float]:
    """Test-protocol mAP@``ctx.topk``: the query split against the database split.

    In a torchrun job (``ctx.dist``) each rank encodes a shard of the query and database
    splits; rank 0 scores the gathered codes and every rank returns its scores.

    Args:
        inp: the checkpoints. ctx: the run context.

    Returns:
        ``{"teacher": T/T, "sshp": S/S, "ashp": S query vs T database}`` for the models given.
    """
    sp, vs, dev, k, d = ctx.splits, ctx.data.view_size, ctx.device, ctx.topk, ctx.dist
    ql, dl = sp.query.labels, sp.database.labels

    def codes(ckpt):
        model, spec = load_model(ckpt, inp.bits)
        model.to(dev)
        return (encode_images(model, sp.query, vs, spec["image_size"], device=dev, dist=d),
                encode_images(model, sp.database, vs, spec["image_size"], device=dev, dist=d))

    def score(q, db, q_labels, db_labels, *, topk):  # once, by rank 0 in a torchrun job
        return d.broadcast(retrieval_map(q, db, q_labels, db_labels, topk=topk) if d.main
                           else None)

    res: dict[str, float] = {}
    sq = None
    teacher = inp.teacher
    if inp.student is not None:
        s_ckpt = load_checkpoint(inp.student)
        sq, sdb = codes(s_ckpt)
        res["sshp"] = score(sq, sdb, ql, dl, topk=k)
        tp = s_ckpt.get("teacher_path")
        if teacher is None and inp.with_teacher and tp and Path(tp).is_file():
            teacher = tp
    if teacher is not None:
        tq, tdb = codes(teacher)
        res["teacher"] = score(tq, tdb, ql, dl, topk=k)
        if sq is not None:
            res["ashp"] = score(sq, tdb, ql, dl, topk=k)
    if not res:
        raise ValueError("evaluate needs a student and/or a teacher checkpoint")
    return res


def score_run(codes: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], query_labels,
              db_labels, *, topk: int, alignment: bool = False) -> dict[str, Any]:
    """Full retrieval metrics of one student run in both paradigms.

    Args:
        codes: the student's ±1 ``sshp_query`` / ``sshp_database`` / ``ashp_query`` codes
            (the SSHP- and ASHP-selected checkpoints may differ). teacher: the teacher's
            ``query`` / ``database`` codes. query_labels, db_labels: class ids.
        topk: K of mAP@K. alignment: also ISD (ASHP queries vs the teacher's) and NRA@10/100/1000.

    Returns:
        ``{"sshp": RetrievalMetrics, "ashp": RetrievalMetrics}`` plus ``"isd"`` / ``"nra"``.
    """
    sq, sdb = codes["sshp_query"].float(), codes["sshp_database"].float()
    aq = codes["ashp_query"].float()
    tq, tdb = teacher["query"], teacher["database"]
    out: dict[str, Any] = {
        "sshp": retrieval_evaluate(sq, sdb, query_labels, db_labels, topk=topk),
        "ashp": retrieval_evaluate(aq, tdb, query_labels, db_labels, topk=topk),
    }
    if alignment:
        out["isd"] = isd(aq, tq)
        out["nra"] = {str(k): v for k, v in nra(sq, sdb, tq, tdb, ks=(10, 100, 1000)).items()}
    return out


def run_maps(res: dict, teacher_db: torch.Tensor, query_labels, db_labels, *,
             topk: int) -> dict[str, float]:
    """mAP@topk of one student run's codes: ``{"sshp": S/S, "ashp": S query vs teacher_db}``."""
    return {"sshp": retrieval_map(res["sshp_query"].float(), res["sshp_database"].float(),
                                  query_labels, db_labels, topk=topk),
            "ashp": retrieval_map(res["ashp_query"].float(), teacher_db, query_labels, db_labels,
                                  topk=topk)}


def score_runs(results: list[dict], teacher_codes: dict[int, dict[str, torch.Tensor]],
               query_labels, db_labels, *, methods: list[str], main_bits: int, topk: int,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score the teacher at every code length and every :func:`brcd.stages.run_students`
    result; alignment (ISD, NRA), details and PR curves for seed 0 at ``main_bits``.

    Returns:
        ``{"map": {bits: {method: {"sshp": [...], "ashp": [...]}}}, "teacher", "details",
        "pr", "runs"}`` (JSON-ready; what :func:`brcd.report.write_report` reads).
    """
    from ..report import label

    mb, k, ql, dl = main_bits, topk, query_labels, db_labels
    bits_list = sorted(teacher_codes)
    mapk = {str(b): {m: {"sshp": [], "ashp": []} for m in methods} for b in bits_list}
    teacher, details, pr, runs = {}, {str(mb): []}, {}, []
    for b in bits_list:
        tc = teacher_codes[b]
        r = retrieval_evaluate(tc["query"], tc["database"], ql, dl, topk=k)
        teacher[str(b)] = {"map": [r.map_at_k], "map_all": r.map_all, "p_at_r2": r.p_at_r2}
        log(f"teacher {b} bits: mAP@{r.topk} {r.map_at_k:.4f}")
        if b == mb:
            pr[label("teacher")] = (r.pr_precision, r.pr_recall)
            details[str(b)].append(_detail("teacher", "T/T", r))
    for res in results:
        j = res["job"]
        b, meth, first = j["bits"], j["method"], j["bits"] == mb and j["seed"] == 0
        tc = teacher_codes[b]
        if first:  # every metric; the other runs only feed the mAP@K tables
            sc = score_run(res, tc, ql, dl, topk=k, alignment=True)
            s, a = sc["sshp"], sc["ashp"]
            scores = {"sshp": s.as_dict(), "ashp": a.as_dict()}
        else:
            scores = {p: {"topk": min(k, len(dl)), "map_at_k": v} for p, v in
                      run_maps(res, tc["database"], ql, dl, topk=k).items()}
        for p in ("sshp", "ashp"):
            mapk[str(b)][meth][p].append(scores[p]["map_at_k"])
        run = {**j, **scores, **{f: res[f] for f in (
                   "train_s", "eval_s", "sshp_epoch", "ashp_epoch", "history")},
               "val_sshp": res["sshp_val"], "val_ashp": res["ashp_val"]}
        if first:
            run["isd_ashp_query"], run["nra_sshp"] = sc["isd"], sc["nra"]
            details[str(b)] += [_detail(meth, "SSHP", s, nra=sc["nra"]),
                                _detail(meth, "ASHP", a, isd=sc["isd"])]
            pr[f"{label(meth)} SSHP"] = (s.pr_precision, s.pr_recall)
            if meth == "brcd":
                pr["BRCD ASHP"] = (a.pr_precision, a.pr_recall)
        runs.append(run)
        log(f"{meth:>8} {b}b seed {j['seed']}: SSHP {scores['sshp']['map_at_k']:.4f}  ASHP "
            f"{scores['ashp']['map_at_k']:.4f}")
    return {"map": mapk, "teacher": teacher, "details": details, "pr": pr, "runs": runs}


def _detail(model: str, paradigm: str, r, isd=None, nra=None) -> dict[str, Any]:
    return {"model": model, "paradigm": paradigm, "map_all": r.map_all, "p_at_r2": r.p_at_r2,
            "p_at_100": r.precision_at.get(100, np.nan), "isd": isd, "nra": nra}
