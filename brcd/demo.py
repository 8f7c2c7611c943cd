"""``python -m brcd demo``: the end-to-end BRCD demo on Fashion-MNIST, with a report.

A thin script: it only chooses which stages (:mod:`brcd.stages`) to run, on CPU:

1. data: Fashion-MNIST from the Debian package (scikit-learn's digits, with a note, when it is
   absent; ``--dataset imagefolder --data-root DIR`` for any class-per-folder tree); 5,000
   training images (500 per class), 1,000 test queries, a 14,000-image database, 500 validation
   queries retrieving against the training split (selection never sees the test queries);
2. teacher (32 bits; ``--full``: 16/32/64): frozen ImageNet EfficientNet-Lite2 at 64 px + an
   MLP hash head trained without labels on cached features of 8 augmented views per image;
   k-means clusters and per-cluster bit masks;
3. the students of :mod:`brcd.stages.suite` (tiny-cnn from scratch; the paper's frozen Lite0 +
   head at 48 px, with the BRCD ablation), every method, 3 paired seeds, on the same cached
   views, in parallel single-threaded workers; checkpoints chosen on validation;
4. evaluation, paired verdicts (:mod:`brcd.analysis`), diagnosis, encode and search speed;
   ``<out>/report.md`` + plots (:mod:`brcd.report`), ``metrics.json``.

``--quick``: 32 bits, one seed, 1,000 training images, 4 views, 300 queries, a 3,000-image
database, 10 teacher / 4 student / 4 head epochs. ``<out>/work`` keeps checkpoints and caches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import stages as S
from . import task
from .config import load_config, override
from .data import DATASETS, demo_protocol, eval_views
from .errors import Parser, guarded
from .files import save_file
from .losses import METHODS as _REGISTRY
from .report import write_report
from .stages.runtime import PhaseLog, auto_threads, cpu_has_bf16
from .stages.speed import speed_report
from .stages.suite import (
    STUDENTS,
    Suite,
    cluster_report,
    paper_features,
    score_suite,
    student_speed,
    suite_jobs,
)

METHODS = tuple(_REGISTRY)
FASHION_ROOT = DATASETS["fashion-mnist"].default_root

# (demo, --quick) defaults; --full: bits 16,32,64. Student epochs: what fits 15 minutes; their
# cost on the validation split (3 seeds) is in the README's "Demo time" section
_QUICK = {"bits": ("32", "32"), "seeds": (3, 1), "teacher_epochs": (20, 10),
          "student_epochs": (6, 4), "paper_epochs": (6, 4), "views": (8, 4)}
__all__ = ["add_arguments", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (used by ``python -m brcd demo``)."""
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--quick", action="store_true",
                        help="documented subset: 1 seed, 1k training images, 4 views (above)")
    parser.add_argument("--dataset", default="auto", choices=["auto", *DATASETS],
                        help="auto: Fashion-MNIST when installed, else scikit-learn digits")
    parser.add_argument("--data-root", default=None,
                        help=f"dataset folder (default: the dataset's, e.g. {FASHION_ROOT})")
    parser.add_argument("--full", action="store_true",
                        help="every code length: --bits 16,32,64 (3 seeds each)")
    parser.add_argument("--bits", default=None,
                        help="comma-separated code lengths (default 32; --full: 16,32,64)")
    parser.add_argument("--main-bits", type=int, default=32,
                        help="code length of the ablation, alignment and speed (default 32)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="paired seeds per method and code length (default 3; quick: 1)")
    parser.add_argument("--students", default=",".join(STUDENTS),
                        help="tiny-cnn (from scratch), paper-student (frozen ImageNet Lite0 + "
                        "MLP head, the paper's protocol); default both")
    parser.add_argument("--paper-size", type=int, default=48,
                        help="the paper student's input size (default 48; teacher 64)")
    parser.add_argument("--paper-epochs", type=int, default=None,
                        help="epochs of the paper student's head (default 6; quick: 4)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the BRCD ablation")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated student objectives (default: all): " + "; ".join(
                            f"{m.name}: {m.help}" for m in _REGISTRY.values()))
    parser.add_argument("--teacher-epochs", type=int, default=None)
    parser.add_argument("--student-epochs", type=int, default=None)
    parser.add_argument("--views", type=int, default=None,
                        help="cached augmented views per image (default 8; quick: 4)")
    parser.add_argument("--topk", type=int, default=1000, help="K of mAP@K (default 1000)")
    g = parser.add_argument_group("data sizes (default: the protocol above)")
    g.add_argument("--train-images", type=int, default=None,
                   help="random training images instead of 500 (quick: 100) per class")
    g.add_argument("--n-query", type=int, default=None, help="test queries")
    g.add_argument("--n-database", type=int, default=None, help="database size")
    g.add_argument("--n-val", type=int, default=None, help="validation queries")
    parser.add_argument("--paper-brcd", action="store_true",
                        help="BRCD anchored on view 1 only, as in the paper (default: both "
                        "views, as the KD baselines use both)")
    parser.add_argument("--workers", type=int, default=2,
                        help="parallel student processes, 1 thread each (default 2)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the main process (0 = cores minus current load)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="CPU precision: auto = bf16 autocast where native (AMX / "
                        "AVX512-BF16), else fp32")
    parser.add_argument("--device", default="cpu", help="cpu (default) | cuda | auto")
    parser.add_argument("--search-gallery", type=int, default=1_000_000,
                        help="synthetic gallery size for the search-speed comparison")
    parser.add_argument("--no-faiss", action="store_true", help="skip the FAISS comparison")
    parser.add_argument("--report-only", action="store_true", help="re-render the report only")
    parser.add_argument("--speed-batches", default="1,32,256",
                        help="batch sizes of the encode-speed table (default 1,32,256)")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of error lines")


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options whose default depends on --quick."""
    if args.full and args.bits is None:
        args.bits = "16,32,64"
    for name, (full, quick) in _QUICK.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.bits = sorted({int(b) for b in str(args.bits).split(",") if b.strip()})
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; valid: {list(METHODS)}")
    args.students = [m.strip() for m in str(args.students).split(",") if m.strip()]
    bad = [m for m in args.students if m not in STUDENTS]
    if bad or not args.students:
        raise ValueError(f"--students: unknown {bad}; valid: {list(STUDENTS)}")
    if not 16 <= args.paper_size <= 512:
        raise ValueError(f"--paper-size must be in [16, 512], got {args.paper_size}")
    args.speed_batches = [int(b) for b in str(args.speed_batches).split(",") if b.strip()]
    if not args.speed_batches or min(args.speed_batches) < 1:
        raise ValueError("--speed-batches must list positive batch sizes, e.g. 1,32,256")
    for name in ("seeds", "teacher_epochs", "student_epochs", "paper_epochs", "views",
                 "workers", "topk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.views < 2:
        raise ValueError("--views must be >= 2 (two distinct views per step)")
    if not args.bits or min(args.bits) < 1:
        raise ValueError("--bits must list positive code lengths, e.g. 16,32,64")
    if args.main_bits not in args.bits:
        args.main_bits = args.bits[len(args.bits) // 2]
    return args


def _base_config(args, dataset: str):
    o: dict[str, Any] = {
        "device": args.device, "topk": args.topk, "seed": 0,
        "teacher.train.epochs": args.teacher_epochs, "teacher.train.cache_views": args.views,
        # the head on cached Lite2 features: lr 1e-3 beat the paper's 5e-4 on the validation
        # split (best 0.640 vs 0.635 at 32 bits), validated every 5 of the 20 epochs
        "teacher.train.lr": 1e-3, "teacher.train.eval_every": max(1, args.teacher_epochs // 4),
        "student.train.epochs": args.student_epochs, "student.train.cache_views": args.views,
        # one resumable checkpoint per run, at its end (and the validation-best ones)
        "teacher.train.save_every": 0, "student.train.save_every": 0,
        "teacher.train.channels_last": True, "student.train.channels_last": True,
        # two validations per run (middle and end): selection on the validation split
        "student.train.eval_every": max(1, (args.student_epochs + 1) // 2),
        "data.num_workers": 0, "cache_dir": str(Path(args.out) / "work" / "cache"),
    }
    if dataset == "digits":  # 1,797 images of 8x8 digits, upsampled to the same 28 px views
        o.update({"data.name": "digits", "data.root": None, "data.train_per_class": None,
                  "data.n_train": 1000, "data.n_query": 300, "data.n_database": None,
                  "data.n_val": 150})
    elif dataset == "imagefolder":  # sizes scaled to the folder (brcd.data.demo_protocol)
        o.update(demo_protocol(dataset, args.data_root, quick=args.quick))
    else:  # the Fashion-MNIST protocol on any registered dataset
        o.update({"data.name": dataset, "data.root": args.data_root
                  or DATASETS[dataset].default_root})
        if args.quick:
            o.update({"data.train_per_class": 100, "data.n_query": 300,
                      "data.n_database": 3000, "data.n_val": 200})
    if args.train_images is not None:
        o.update({"data.train_per_class": None, "data.n_train": args.train_images})
    for flag in ("n_query", "n_database", "n_val"):
        if getattr(args, flag) is not None:
            o[f"data.{flag}"] = getattr(args, flag)
    return load_config("fashion-mnist", o)


def _choose_dataset(args, log: PhaseLog) -> tuple[str, str | None]:
    if args.dataset != "auto":
        return args.dataset, None
    root = Path(args.data_root or FASHION_ROOT)
    if any((root / f"train-images-idx3-ubyte{s}").is_file() for s in ("", ".gz")):
        return "fashion-mnist", None
    log(note := f"note: Fashion-MNIST is not installed under {root} (Debian package "
        "dataset-fashion-mnist); this demo runs on scikit-learn's 8x8 digits instead, so its "
        "numbers are not comparable to the Fashion-MNIST reference figures.")
    return "digits", note


def _teachers(args, base, splits, work: Path, bf16: bool, log: PhaseLog) -> dict[int, Path]:
    """Teacher + clusters + masks per code length; the view cache is built once, first."""
    teachers = {}
    for b in args.bits:
        cfg_b = override(base, {"bits": b, "out_dir": str(work / f"b{b}" / "teacher")})
        if b == args.bits[0] and args.device == "cpu":
            log("view cache: augmented views + frozen Lite2 features (once, then reused)")
            # channels-last and bf16 (where native) for the extraction; the key ignores both
            task.view_cache(override(cfg_b, {"teacher.train.autocast": "bf16" if bf16 else "none",
                                             "teacher.train.channels_last": True}), splits, log)
        log(f"teacher {b} bits")
        teachers[b] = task.build_masks(cfg_b, teacher=task.train_teacher(cfg_b))
    return teachers


def run(args: argparse.Namespace) -> dict:
    """Run the whole demo; returns the metrics dict (also written to ``<out>/metrics.json``)."""
    args = _defaults(args)
    log, out, work = PhaseLog(), Path(args.out), Path(args.out) / "work"
    (work / "cache").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads := auto_threads(args.threads))
    bf16 = args.device == "cpu" and (args.precision == "bf16" or (  # CUDA keeps its own AMP
        args.precision == "auto" and cpu_has_bf16()))
    dataset, note = _choose_dataset(args, log)
    log(f"dataset {dataset}; bits {args.bits}; students {args.students}; methods "
        f"{args.methods}; {args.seeds} paired seed(s); main process {threads} thread(s); "
        f"precision {'bf16' if bf16 else 'fp32'}; out {out}")
    base = _base_config(args, dataset)
    splits = S.make_context(base).splits
    log(splits.summary())
    ql, dl = splits.query.labels, splits.database.labels
    with log.phase("teachers, clusters and masks"):
        teachers = _teachers(args, base, splits, work, bf16, log)
    with log.phase("teacher codes of queries and database"):
        views = {s: torch.cat(list(eval_views(getattr(splits, s), base.data.view_size, 512)))
                 for s in ("query", "database")}
        ev = {"views": save_file(views, work / "eval_views.pt")}
        t_codes = S.shared_backbone_codes(teachers, views, autocast="bf16" if bf16 else "none")
    suite = Suite(**{k: getattr(args, k) for k in ("students", "bits", "methods", "seeds",
                  "main_bits", "paper_size", "paper_epochs")}, ablation=not args.no_ablation,
                  symmetric=not args.paper_brcd, autocast="bf16" if bf16 else "none")
    if "paper-student" in args.students:
        with log.phase("paper student: frozen Lite0 features (once)"):
            ev["paper"] = paper_features(suite, base, splits, views, work, log)
    jobs = suite_jobs(suite, base, teachers, ev, work)
    with log.phase(f"students ({len(jobs)} runs, {args.workers} worker(s))"):
        results = S.run_students(jobs, args.workers)
    with log.phase("evaluation"):
        scored = score_suite(suite, results, t_codes, ql, dl, topk=args.topk, log=log)
    with log.phase("clusters and offset positives"):
        clusters = cluster_report(base, args.bits, splits, teachers, log)
    with log.phase("encode and search speed"):
        mb = args.main_bits  # tiny-cnn is the config's own student: its timing serves both
        students = {st: student_speed(teachers[mb], override(base, suite.overrides(st))
                                      .student.model, args.speed_batches, log)
                    for st in args.students}
        speed, s_params, t_params = speed_report(
            teachers[mb], base.student.model, t_codes[mb], batches=args.speed_batches,
            topk=args.topk, gallery=min(args.search_gallery, 100_000) if args.quick
            else args.search_gallery, use_faiss=not args.no_faiss, log=log, encode=students.get(
                "tiny-cnn", {}).get("encode"))
    argv = sys.argv[2:] if sys.argv[1:2] == ["demo"] else sys.argv[1:]
    metrics = {
        "command": "python -m brcd demo " + " ".join(argv), "dataset": dataset, "note": note,
        "splits": splits.summary(), "bits": args.bits, "main_bits": args.main_bits,
        "seeds": args.seeds, "methods": args.methods, "students": students,
        "topk": min(args.topk, len(dl)), **scored,
        "diagnosis": {**scored["diagnosis"], "clusters": clusters},
        "clusters": clusters, "speed": speed, "student_params": s_params,
        "teacher_params": t_params, "threads": threads, "precision": "bf16" if bf16 else "fp32",
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "options": vars(args),
        "phases": log.phases, "wall_s": round(time.perf_counter() - log.t0, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    log(f"wrote {write_report(out, metrics)}")
    log(f"done in {metrics['wall_s'] / 60:.1f} min")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m brcd demo``; the exit status (2: a user error, one ``error:`` line)."""
    parser = Parser(prog="python -m brcd demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return guarded(lambda: _report_only(args) if args.report_only else run(args), args.debug)


def _report_only(args: argparse.Namespace) -> None:
    path = Path(args.out) / "metrics.json"
    if not path.is_file():
        raise ValueError(f"--report-only needs {path} from an earlier run")
    print(f"wrote {write_report(args.out, json.loads(path.read_text()))}")


if __name__ == "__main__":
    raise SystemExit(main())
