"""A suite of student runs for one teacher per code length: students x methods x ablation
variants x paired seeds, their scores, paired verdicts, diagnosis and encode speed-ups.

What ``python -m brcd demo`` runs after its teachers (:mod:`brcd.demo` only chooses the sizes):

* students (:data:`STUDENTS`): ``tiny-cnn`` (the config's student, trained from scratch) and
  ``paper-student``, the paper's protocol (BRCD_SPEC §2): a frozen ImageNet backbone
  (:data:`PAPER_STUDENT`, below the teacher's input size) with a trainable MLP hash head; its
  features of the bank and of the test views are extracted once (:func:`paper_features`), so
  each of its runs trains and encodes with the head alone;
* seed s gives every method and variant of a student the same initialisation and batch order
  (``distill.seed``), so :mod:`brcd.analysis` compares them seed by seed;
* the BRCD ablation (:data:`brcd.losses.ABLATIONS`) runs for the paper student at the main
  code length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import analysis
from ..config import Config, ModelConfig, config_to_dict, override
from ..files import save_file
from ..losses import ABLATIONS
from ..models import count_parameters
from .context import make_context
from .encode import build_model, encode_views, load_model
from .evaluate import run_maps, score_runs
from .masks import MasksInput, mask_stats
from .speed import encode_speed
from .students import StudentJob
from .views import cache_path, student_feature_bank, view_cache

__all__ = ["STUDENTS", "PAPER_STUDENT", "Suite", "suite_jobs", "paper_features", "score_suite",
           "cluster_report", "student_speed"]

STUDENTS = ("tiny-cnn", "paper-student")

# the paper's student: a frozen ImageNet backbone (offline wheel) and a trainable MLP head
PAPER_STUDENT = {"name": "tf_efficientnet_lite0", "pretrained": True, "freeze_backbone": True,
                 "head": "mlp", "hidden": 512}


@dataclass(frozen=True, kw_only=True)
class Suite:
    """Which runs: ``students`` (of :data:`STUDENTS`), code lengths ``bits``, ``methods``,
    ``seeds`` paired seeds, the ablation (``ablation``) at ``main_bits``, the paper student's
    input size and head epochs, BRCD's both-view anchor (``symmetric``), and the
    ``autocast`` of the student runs."""

    students: list[str]
    bits: list[int]
    methods: list[str]
    seeds: int
    main_bits: int
    ablation: bool = True
    paper_size: int = 48
    paper_epochs: int = 6
    symmetric: bool = True
    autocast: str = "none"

    def overrides(self, student: str) -> dict[str, Any]:
        """The config overrides of ``student`` (none for ``tiny-cnn``: the config's own)."""
        if student == "tiny-cnn":
            return {}
        e = self.paper_epochs
        return {**{f"student.model.{k}": v for k, v in PAPER_STUDENT.items()},
                "student.model.image_size": self.paper_size, "student.train.epochs": e,
                "student.train.eval_every": max(1, e // 3)}

    def variants(self, student: str, bits: int) -> list[tuple[str, str]]:
        """(method, ablation variant) pairs of ``student`` at ``bits``."""
        pairs = [(m, "full") for m in self.methods]
        if (student == "paper-student" and bits == self.main_bits and self.ablation
                and "brcd" in self.methods):
            pairs += [("brcd", v) for v in ABLATIONS if v != "full"]
        return pairs


def suite_jobs(suite: Suite, base: Config, teachers: dict[int, Path], ev: dict[str, Path],
               work: Path) -> list[StudentJob]:
    """Every run of ``suite``, long tiny-cnn runs first (better packing on the workers).

    Args:
        suite: the runs. base: the run config. teachers: ``{bits: teacher_masks.pt}``.
        ev: ``{"views": eval views file, "paper": the paper student's eval features file}``.
        work: where each run's folder goes (``b<bits>/<student>/<method>[-<variant>]-s<seed>``).

    Returns:
        the :class:`StudentJob` list.
    """
    jobs = []
    for student in suite.students:
        for b in suite.bits:
            for meth, var in suite.variants(student, b):
                for seed in range(suite.seeds):
                    name = meth if var == "full" else f"{meth}-{var}"
                    cfg = override(base, {
                        "bits": b, "out_dir": str(work / f"b{b}" / student / f"{name}-s{seed}"),
                        "distill.method": meth, "distill.seed": seed,
                        "distill.symmetric": suite.symmetric,
                        "student.train.autocast": suite.autocast,
                        **suite.overrides(student), **ABLATIONS[var]})
                    jobs.append(StudentJob(
                        bits=b, method=meth, seed=seed, config=config_to_dict(cfg),
                        teacher=str(teachers[b]), eval_views=str(ev["views"]),
                        eval_feats=str(ev["paper"]) if student == "paper-student" else None,
                        student=student, variant=var))
    return jobs


def paper_features(suite: Suite, base: Config, splits, views: dict[str, torch.Tensor],
                   work: Path, log: Callable[[str], None]) -> Path:
    """Extract the paper student's frozen-backbone features once for every run: the teacher's
    bank views (the distill stage's feature bank; the teacher's view cache must exist) and the
    test ``views``.

    Returns:
        the file of ``{"query", "database"}`` float16 features (:func:`brcd.files.save_file`).
    """
    cfg = override(base, {"bits": suite.main_bits, **suite.overrides("paper-student"),
                          "student.train.autocast": suite.autocast})
    ctx = make_context(cfg, splits=splits, logger=log)
    tm, nv = cfg.teacher.model, cfg.teacher.train.cache_views
    cache = view_cache(ctx, model=None, model_cfg=tm, n_views=nv, extract=cfg.teacher.train)
    model = build_model(cfg.student.model, cfg.bits, cfg.student.train.autocast)
    model.to(memory_format=torch.channels_last)
    student_feature_bank(ctx, cache, cache_path(ctx, tm, nv), model=model,
                         model_cfg=cfg.student.model, extract=cfg.student.train)
    size = cfg.student.model.image_size
    feats = {k: encode_views(model, v, size, features=True).half()
             for k, v in views.items()}
    return save_file(feats, work / f"eval_feats_{cfg.student.model.name}_{size}.pt")


def _pick(results: list[dict], student: str, variant: str | None = "full") -> list[dict]:
    """One student's results of one variant, or (None) its BRCD runs renamed to the variant."""
    out = []
    for r in results:
        j = r["job"]
        if j["student"] != student or (variant is not None and j["variant"] != variant):
            continue
        if variant is None:
            if j["method"] != "brcd":
                continue
            r = {**r, "job": {**j, "method": j["variant"]}}
        out.append(r)
    return out


def _diagnosis(scored: dict, main_bits: int) -> dict[str, Any]:
    """Alignment (seed 0) and first/last-epoch loss parts per method at ``main_bits``."""
    keep = ("ntxent", "kl", "own", "kd")
    isd, nra, terms = {}, {}, {}
    for run in scored["runs"]:
        if run["bits"] != main_bits or run["seed"] != 0:
            continue
        m = run["method"]
        if "isd_ashp_query" in run:
            isd[m], nra[m] = run["isd_ashp_query"], run["nra_sshp"]
        hist = run.get("history") or []
        if hist:
            terms[m] = {w: {k: v for k, v in hist[i].items() if k in keep or
                            k.startswith("brcd_")} for w, i in (("first", 0), ("last", -1))}
    return {str(main_bits): {"isd": isd, "nra": nra, "loss_terms": terms}}


def score_suite(suite: Suite, results: list[dict], t_codes: dict[int, dict[str, torch.Tensor]],
                query_labels, db_labels, *, topk: int, log: Callable[[str], None]
                ) -> dict[str, Any]:
    """Score every run (:func:`brcd.stages.evaluate.score_runs`), then the paired verdicts,
    the ablation and the per-student diagnosis.

    Returns:
        the metrics keys ``map`` (the first student's), ``teacher``, ``details``, ``pr``,
        ``runs`` (every student's), ``map_paper_student``, ``details_paper_student``,
        ``ablation``, ``ablation_paired``, ``paired`` and ``diagnosis`` (without
        ``"clusters"``).
    """
    kw = dict(query_labels=query_labels, db_labels=db_labels, main_bits=suite.main_bits,
              topk=topk, log=log)
    scored = {st: score_runs(_pick(results, st), t_codes, methods=suite.methods, **kw)
              for st in suite.students}
    out: dict[str, Any] = {**scored[suite.students[0]],
                           "runs": [r for st in suite.students for r in scored[st]["runs"]]}
    if "paper-student" in suite.students:
        out["map_paper_student"] = scored["paper-student"]["map"]
        out["details_paper_student"] = scored["paper-student"]["details"]
        mb = suite.main_bits  # the ablation ran at the main length only: --full has BRCD at more
        ab = [r for r in _pick(results, "paper-student", None) if r["job"]["bits"] == mb]
        if suite.ablation and ab:  # mAP@K only: the ablation table reads nothing else
            table: dict[str, dict[str, list[float]]] = {
                v: {"sshp": [], "ashp": []} for v in ABLATIONS
                if any(r["job"]["method"] == v for r in ab)}
            for r in ab:
                col = table[r["job"]["method"]]
                for p, v in run_maps(r, t_codes[mb]["database"], query_labels, db_labels,
                                     topk=topk).items():
                    col[p].append(v)
            out["ablation"] = {str(mb): table}
            out["ablation_paired"] = analysis.ablation_paired(out["ablation"])
    out["paired"] = {st: analysis.paired_table(scored[st]["map"], suite.methods)
                     for st in suite.students}
    out["diagnosis"] = {st: _diagnosis(scored[st], suite.main_bits) for st in suite.students}
    return out


def cluster_report(base: Config, bits: list[int], splits, teachers: dict[int, Path],
                   log: Callable[[str], None]) -> dict[str, dict]:
    """Per code length: cluster sizes, bits kept, the offset-positive share of the bank views and
    the negatives per row the false-negative rule removes (:func:`brcd.stages.mask_stats`)."""
    out = {}
    for b in bits:
        cfg = override(base, {"bits": b})
        st = out[str(b)] = mask_stats(
            MasksInput.from_config(cfg, teachers[b]), make_context(cfg, progress=False,
                                                                   splits=splits),
            batch_size=min(cfg.student.train.batch_size, len(splits.train)))
        log(f"{b} bits: {100 * st['offset_share']:.1f}% of augmented views are offset "
            f"positives; {st['fn_removed_per_row']:.1f} negatives per row removed as false "
            f"negatives; bits kept per cluster {st['bits_kept']}")
    return out


def student_speed(teacher: Path, mc: ModelConfig, batches: list[int],
                  log: Callable[[str], None]) -> dict[str, Any]:
    """A student's parameters and its encode speed-up over a teacher checkpoint.

    Returns:
        ``{"label", "params", "trainable_params", "speedup": {batch: x}, "encode": ...}``
        (:func:`brcd.stages.speed.encode_speed`).
    """
    tmodel, spec = load_model(teacher)
    smodel = build_model(mc, spec["bits"])
    enc = encode_speed(tmodel.to(memory_format=torch.channels_last),
                       smodel.to(memory_format=torch.channels_last), t_size=spec["image_size"],
                       s_size=mc.image_size, batches=batches)
    log(f"encode: {mc.name} at {mc.image_size} px: speed-up over the teacher " + ", ".join(
        f"{enc[f'speedup_bs{bs}']}x at batch {bs}" for bs in batches))
    what = ("frozen ImageNet Lite0 + MLP head" if mc.freeze_backbone
            else f"{mc.name}, trained from scratch")
    return {"label": f"{what}, {mc.image_size} px", "params": count_parameters(smodel),
            "trainable_params": count_parameters(smodel, trainable_only=True),
            "speedup": {str(bs): enc[f"speedup_bs{bs}"] for bs in batches}, "encode": enc}
