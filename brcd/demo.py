"""``python -m brcd demo``: the end-to-end BRCD demo on Fashion-MNIST, with a report.

A thin script: it only chooses which stages (:mod:`brcd.stages`) to run, on CPU in minutes:

1. data: Fashion-MNIST from the Debian package (scikit-learn's digits, with a note, when it is
   absent); 5,000 training images (500 per class), 1,000 test queries, a 14,000-image database,
   500 validation queries retrieving against the training split (selection never sees the test
   queries);
2. teachers (16/32/64 bits): frozen ImageNet EfficientNet-Lite2 (offline wheel) at 64 px + an MLP
   hash head trained without labels on cached features of 8 augmented views per image; k-means
   clusters and per-cluster bit masks;
3. students: a 0.17M-parameter CNN at 28x28 distilled with each objective of
   :data:`brcd.losses.METHODS` (BRCD anchored on both views, as the baselines use both;
   ``--paper-brcd`` for view 1 only) on the same cached views, 3 seeds at the main code length
   and 1 at the others, in parallel single-threaded workers; SSHP / ASHP checkpoints chosen on
   the validation split;
4. evaluation: mAP@1000, mAP@all, P@H≤2, PR curves, ISD, NRA@K, offset positives, bits kept,
   encode and search speed; ``<out>/report.md`` + plots (:mod:`brcd.report`), ``metrics.json``.

``--quick`` runs a documented subset in about a minute: 32 bits, one seed, 1,000 training images
(100 per class), 4 views, 300 queries, a 3,000-image database, 10 teacher / 4 student epochs.
Everything lives under ``--out`` (default ``runs/demo``); ``<out>/work`` holds checkpoints and
the shared view cache, reused by a rerun.
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
from .config import config_to_dict, load_config, override
from .data import DATASETS, eval_views
from .errors import Parser, guarded
from .files import save_file
from .losses import METHODS as _REGISTRY
from .report import write_report
from .stages.evaluate import score_runs
from .stages.runtime import PhaseLog, auto_threads, cpu_has_bf16
from .stages.speed import speed_report

METHODS = tuple(_REGISTRY)
FASHION_ROOT = DATASETS["fashion-mnist"].default_root

# options whose default depends on --quick: (full demo, --quick)
_QUICK = {"bits": ("16,32,64", "32"), "seeds": (3, 1), "teacher_epochs": (20, 10),
          "student_epochs": (8, 4), "views": (8, 4)}

__all__ = ["add_arguments", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (used by ``python -m brcd demo``)."""
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--quick", action="store_true",
                        help="documented subset: 32 bits, 1 seed, 1k training images, 4 views, "
                        "3k database, 300 queries")
    parser.add_argument("--dataset", default="auto", choices=["auto", *DATASETS],
                        help="auto: Fashion-MNIST when installed, else scikit-learn digits")
    parser.add_argument("--data-root", default=None,
                        help=f"dataset folder (default: the dataset's, e.g. {FASHION_ROOT})")
    parser.add_argument("--bits", default=None,
                        help="comma-separated code lengths (default 16,32,64; quick: 32)")
    parser.add_argument("--main-bits", type=int, default=32,
                        help="code length that gets several seeds (default 32)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="student seeds at --main-bits (default 3; quick: 1)")
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
                        help="BRCD anchored on the student's view-1 codes only, as in the paper "
                        "(default: both views anchor, distill.symmetric, as the KD baselines "
                        "use both views)")
    parser.add_argument("--workers", type=int, default=2,
                        help="parallel student processes, 1 thread each (default 2)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the main process (0 = cores minus current load)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="training/feature precision on CPU: bf16 autocast where the CPU has "
                        "native bf16 (AMX / AVX512-BF16), else fp32 (default auto)")
    parser.add_argument("--device", default="cpu", help="cpu (default) | cuda | auto")
    parser.add_argument("--search-gallery", type=int, default=1_000_000,
                        help="synthetic gallery size for the search-speed comparison")
    parser.add_argument("--no-faiss", action="store_true", help="skip the FAISS comparison")
    parser.add_argument("--report-only", action="store_true",
                        help="only re-render <out>/report.md from <out>/metrics.json")
    parser.add_argument("--speed-batches", default="1,32,256",
                        help="batch sizes of the encode-speed table (default 1,32,256)")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of error lines")


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options whose default depends on --quick."""
    for name, (full, quick) in _QUICK.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.bits = sorted({int(b) for b in str(args.bits).split(",") if b.strip()})
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; valid: {list(METHODS)}")
    args.speed_batches = [int(b) for b in str(args.speed_batches).split(",") if b.strip()]
    if not args.speed_batches or min(args.speed_batches) < 1:
        raise ValueError("--speed-batches must list positive batch sizes, e.g. 1,32,256")
    for name in ("seeds", "teacher_epochs", "student_epochs", "views", "workers", "topk"):
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
        "teacher.train.lr": 1e-3,
        "teacher.train.eval_every": max(1, args.teacher_epochs // 4),
        "student.train.epochs": args.student_epochs, "student.train.cache_views": args.views,
        "teacher.train.channels_last": True, "student.train.channels_last": True,
        # two validations per run (middle and end): selection on the validation split
        "student.train.eval_every": max(1, (args.student_epochs + 1) // 2),
        "data.num_workers": 0, "cache_dir": str(Path(args.out) / "work" / "cache"),
    }
    if dataset == "digits":  # 1,797 images of 8x8 digits, upsampled to the same 28 px views
        o.update({"data.name": "digits", "data.root": None, "data.train_per_class": None,
                  "data.n_train": 1000, "data.n_query": 300, "data.n_database": None,
                  "data.n_val": 150})
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


def _jobs(args, base, teachers, ev_path: Path, work: Path, bf16: bool) -> list[S.StudentJob]:
    jobs = []
    for b in args.bits:
        for meth in args.methods:
            for seed in range(args.seeds if b == args.main_bits else 1):
                cfg = override(base, {
                    "bits": b, "out_dir": str(work / f"b{b}" / f"{meth}-s{seed}"),
                    "distill.method": meth, "distill.seed": seed,
                    "distill.symmetric": not args.paper_brcd,
                    "student.train.autocast": "bf16" if bf16 else "none"})
                jobs.append(S.StudentJob(bits=b, method=meth, seed=seed, config=config_to_dict(
                    cfg), teacher=str(teachers[b]), eval_views=str(ev_path)))
    return jobs


def _clusters(args, base, splits, teachers, log) -> dict[str, dict]:
    """Per code length: cluster sizes, bits kept and offset-positive views of the bank."""
    out = {}
    for b in args.bits:
        cfg_b = override(base, {"bits": b})
        out[str(b)] = S.mask_stats(S.MasksInput.from_config(cfg_b, teachers[b]),
                                   S.make_context(cfg_b, progress=False, splits=splits))
        log(f"{b} bits: {100 * out[str(b)]['offset_share']:.1f}% of augmented views are offset "
            f"positives; bits kept per cluster {out[str(b)]['bits_kept']}")
    return out


def run(args: argparse.Namespace) -> dict:
    """Run the whole demo; returns the metrics dict (also written to ``<out>/metrics.json``)."""
    args = _defaults(args)
    log, out = PhaseLog(), Path(args.out)
    work = out / "work"
    (work / "cache").mkdir(parents=True, exist_ok=True)
    threads = auto_threads(args.threads)
    torch.set_num_threads(threads)
    # bf16 autocast only where the CPU has it natively; CUDA keeps the trainer's own AMP
    bf16 = args.device == "cpu" and (args.precision == "bf16" or (
        args.precision == "auto" and cpu_has_bf16()))
    dataset, note = _choose_dataset(args, log)
    log(f"dataset {dataset}; bits {args.bits}; methods {args.methods}; seeds at "
        f"{args.main_bits} bits: {args.seeds}; main process {threads} thread(s); "
        f"precision {'bf16' if bf16 else 'fp32'}; out {out}")
    base = _base_config(args, dataset)
    splits = S.make_context(base).splits
    log(splits.summary())
    ql, dl = splits.query.labels, splits.database.labels
    with log.phase("teachers, clusters and masks"):
        teachers = _teachers(args, base, splits, work, bf16, log)
    with log.phase("teacher codes of queries and database"):
        vs = base.data.view_size
        ev = {s: torch.cat(list(eval_views(getattr(splits, s), vs, 512)))
              for s in ("query", "database")}
        save_file(ev, work / "eval_views.pt")
        t_codes = S.shared_backbone_codes(teachers, ev, autocast="bf16" if bf16 else "none")
    jobs = _jobs(args, base, teachers, work / "eval_views.pt", work, bf16)
    with log.phase(f"students ({len(jobs)} runs, {args.workers} worker(s))"):
        results = S.run_students(jobs, args.workers)
    with log.phase("evaluation"):
        scored = score_runs(results, t_codes, ql, dl, methods=args.methods,
                            main_bits=args.main_bits, topk=args.topk, log=log)
    with log.phase("clusters and offset positives"):
        clusters = _clusters(args, base, splits, teachers, log)
    with log.phase("encode and search speed"):
        mb = args.main_bits
        speed, s_params, t_params = speed_report(
            teachers[mb], base.student.model, t_codes[mb], batches=args.speed_batches,
            topk=args.topk, gallery=min(args.search_gallery, 100_000) if args.quick
            else args.search_gallery, use_faiss=not args.no_faiss, log=log)
    argv = sys.argv[2:] if sys.argv[1:2] == ["demo"] else sys.argv[1:]
    metrics = {
        "command": "python -m brcd demo " + " ".join(argv), "dataset": dataset, "note": note,
        "splits": splits.summary(), "bits": args.bits, "main_bits": args.main_bits,
        "seeds": args.seeds, "methods": args.methods, "topk": min(args.topk, len(dl)),
        **scored, "clusters": clusters, "speed": speed, "student_params": s_params,
        "teacher_params": t_params, "threads": threads,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "options": vars(args),
        "phases": log.phases, "wall_s": round(time.perf_counter() - log.t0, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    log(f"wrote {write_report(out, metrics)}")
    log(f"done in {metrics['wall_s'] / 60:.1f} min")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m brcd demo``; returns the exit status (2: a user error, one
    ``error:`` line; ``--debug`` shows its traceback)."""
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
