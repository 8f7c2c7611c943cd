"""``python -m brcd demo``: the end-to-end BRCD demo on Fashion-MNIST, with a report.

It does all set-up itself and runs, on CPU in minutes:

1. data: Fashion-MNIST from the Debian package (scikit-learn's digits, with a printed note, when
   it is absent); 5,000 training images (500 per class), 1,000 test queries, a 14,000-image
   database, 500 validation queries that retrieve against the training split (model selection
   never sees the test queries);
2. teachers (16/32/64 bits): frozen ImageNet EfficientNet-Lite2 (offline wheel) at 64 px + an MLP
   hash head trained without labels (CIBHash loss) on cached backbone features of 8 augmented
   views per image (:func:`brcd.task.train_teacher` with ``cache_views``); k-means clusters and
   per-cluster bit masks (:func:`brcd.task.build_masks`);
3. students: a 0.17M-parameter CNN at 28x28 distilled with BRCD (anchored on both views, as
   the baselines use both; ``--paper-brcd`` for view 1 only) and with each baseline
   (no KD, kd-codes, SP, RKD) by :func:`brcd.task.distill` on the same cached views, 3 seeds at
   the main code length and 1 seed at the others, in parallel single-threaded worker processes;
   the SSHP / ASHP checkpoints are the best on the validation split;
4. evaluation (:mod:`brcd.retrieval`): teacher/teacher, SSHP and ASHP mAP@1000, mAP@all,
   precision within radius 2, PR curves, ISD and NRA@K; share of augmented views flagged as offset
   positives; bits kept per cluster; encode speed (teacher vs student, batch 1/32/256) and search
   speed (fasthash vs FAISS when installed);
5. ``<out>/report.md`` with the tables and plots, ``<out>/metrics.json`` with every number.

``--quick`` runs a documented subset in about 3 minutes: 32 bits only, one seed, 1,000 training
images (100 per class), 4 views, 300 queries, a 3,000-image database, 10 teacher and 4 student
epochs. Everything written lives under ``--out`` (default ``runs/demo``);
``<out>/work`` holds checkpoints and the shared view cache, reused by a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

METHODS = ("none", "kd-codes", "sp", "rkd", "brcd")
LABELS = {"teacher": "teacher (Lite2)", "none": "student, no KD", "kd-codes": "KD codes",
          "sp": "SP", "rkd": "RKD", "brcd": "BRCD"}
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"

__all__ = ["add_arguments", "main"]


# ------------------------------------------------------------------------------ arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (used by ``python -m brcd demo``)."""
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--quick", action="store_true",
                        help="documented subset: 32 bits, 1 seed, 1k training images, 4 views, "
                        "3k database, 300 queries")
    parser.add_argument("--dataset", default="auto", choices=["auto", "fashion-mnist", "digits"],
                        help="auto: Fashion-MNIST when installed, else scikit-learn digits")
    parser.add_argument("--data-root", default=FASHION_ROOT, help="Fashion-MNIST IDX folder")
    parser.add_argument("--bits", default=None,
                        help="comma-separated code lengths (default 16,32,64; quick: 32)")
    parser.add_argument("--main-bits", type=int, default=32,
                        help="code length that gets several seeds (default 32)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="student seeds at --main-bits (default 3; quick: 1)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"student objectives (default {','.join(METHODS)})")
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


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options whose default depends on --quick."""
    q = args.quick
    if args.bits is None:
        args.bits = "32" if q else "16,32,64"
    args.bits = sorted({int(b) for b in str(args.bits).split(",") if b.strip()})
    if args.seeds is None:
        args.seeds = 1 if q else 3
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; valid: {list(METHODS)}")
    if args.teacher_epochs is None:
        args.teacher_epochs = 10 if q else 20
    if args.student_epochs is None:
        args.student_epochs = 4 if q else 8
    if args.views is None:
        args.views = 4 if q else 8
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


# ------------------------------------------------------------------------------ helpers
class _Log:
    """Timestamped progress lines; also collects per-phase wall-clock seconds."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}

    def __call__(self, msg: str) -> None:
        print(f"[demo {time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    @contextmanager
    def phase(self, name: str):
        self(f"== {name}")
        t = time.perf_counter()
        yield
        self.phases[name] = round(time.perf_counter() - t, 1)
        self(f"   {name}: {self.phases[name]:.1f}s")


def _free_cores(interval: float = 0.5) -> float:
    """Idle cores right now, from two /proc/stat samples (the load average lags a minute
    behind, e.g. right after ``make`` built the extension)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total

    cores = os.cpu_count() or 1
    try:
        i0, t0 = sample()
        time.sleep(interval)
        i1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return float(cores)
    return cores * (i1 - i0) / max(1, t1 - t0)


def _auto_threads(requested: int) -> int:
    """Threads for the main process: the idle cores (OpenMP barriers stall badly when threads
    outnumber the free cores: measured 4x slower with 2 threads on a busy 2-core box)."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    return max(1, min(cores, int(round(_free_cores()))))


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def _prebuild_view_cache(cfg, splits, bf16: bool, log) -> None:
    """Build the shared view cache with the frozen teacher backbone, channels-last and (when
    ``bf16``) under bf16 autocast (the cache stores float16 features either way, and its key
    ignores these options); :func:`brcd.task.train_teacher` then finds it."""
    from . import task

    task.view_cache(_with(cfg, {"teacher.train.autocast": "bf16" if bf16 else "none",
                                "teacher.train.channels_last": True}), splits, log)


def _clone(cfg, **changes):
    from .config import config_from_dict, config_to_dict

    d = config_to_dict(cfg)
    d.update(changes)
    return config_from_dict(d)


def _with(cfg, dotted: dict[str, Any]):
    """A copy of ``cfg`` with dotted overrides, e.g. ``{"student.train.autocast": "bf16"}``."""
    from .config import config_from_dict, config_to_dict

    d = config_to_dict(cfg)
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config_from_dict(d)


def _link_cache(run_dir: Path, cache_dir: Path) -> None:
    """Every run folder shares ONE view cache (task keeps it in ``<out_dir>/cache``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    link = run_dir / "cache"
    if link.is_symlink() and not link.exists():  # dangling (the output folder was moved)
        link.unlink()
    if not link.exists():
        link.symlink_to(cache_dir.resolve(), target_is_directory=True)


def _base_config(args, dataset: str):
    from .config import load_config

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
        "data.num_workers": 0,
    }
    if dataset == "fashion-mnist":
        o["data.root"] = args.data_root
        if args.quick:
            o.update({"data.train_per_class": 100, "data.n_query": 300,
                      "data.n_database": 3000, "data.n_val": 200})
    else:  # 1,797 images of 8x8 digits, upsampled to the same 28 px views
        o.update({"data.name": "digits", "data.root": None, "data.train_per_class": None,
                  "data.n_train": 1000, "data.n_query": 300, "data.n_database": None,
                  "data.n_val": 150})
    if args.train_images is not None:
        o.update({"data.train_per_class": None, "data.n_train": args.train_images})
    for flag in ("n_query", "n_database", "n_val"):
        if getattr(args, flag) is not None:
            o[f"data.{flag}"] = getattr(args, flag)
    return load_config("fashion-mnist", o)


@torch.no_grad()
def _encode_views(model, views: torch.Tensor, size: int, batch: int = 512,
                  features: bool = False, channels_last: bool = True) -> torch.Tensor:
    """Codes (or backbone features) of prepared uint8 views, in fp32, in batches."""
    from .data import prepare_batch

    model.eval()
    out = []
    for i in range(0, len(views), batch):
        x = prepare_batch(views[i:i + batch], size, None, channels_last=channels_last)
        out.append((model.features(x) if features else model(x).codes).float())
    return torch.cat(out)


def _det_views(images, size: int) -> torch.Tensor:
    from .data import eval_views

    return torch.cat(list(eval_views(images, size, 512)))


# ------------------------------------------------------------------------------ students
def _student_job(job: dict) -> dict:
    """One student run in a worker process: distill, then encode queries / database with the
    validation-selected checkpoints. Returns codes and the training log."""
    torch.set_num_threads(job["threads"])
    from . import task
    from .config import config_from_dict
    from .trainer import load_checkpoint

    cfg = config_from_dict(job["config"])
    out = Path(cfg.out_dir)
    for old in out.glob("student_*"):
        old.unlink()  # a rerun starts afresh (the trainer appends to its metrics log)
    t0 = time.perf_counter()
    # the student's backbone runs under bf16 autocast when its config says
    # student.train.autocast: bf16 (set by run() where the CPU has native bf16)
    task.distill(cfg, teacher=job["teacher"], progress=job["progress"])
    train_s = time.perf_counter() - t0
    ev = torch.load(job["eval_views"], weights_only=True)
    res: dict[str, Any] = {"job": {k: job[k] for k in ("bits", "method", "seed")},
                           "train_s": round(train_s, 1)}
    size = cfg.student.model.image_size
    encoded: dict[int, dict] = {}
    for paradigm in ("sshp", "ashp"):
        path = out / f"student_best_{paradigm}.pt"
        if not path.is_file():
            path = out / "student_last.pt"
        ckpt = load_checkpoint(path)
        epoch = int(ckpt["epoch"])
        if epoch not in encoded:
            model, _ = task.load_model(ckpt, cfg.bits)
            q = _encode_views(model, ev["query"], size)
            db = _encode_views(model, ev["database"], size) if paradigm == "sshp" else None
            encoded[epoch] = {"query": q, "database": db}
        elif encoded[epoch]["database"] is None and paradigm == "sshp":
            model, _ = task.load_model(ckpt, cfg.bits)
            encoded[epoch]["database"] = _encode_views(model, ev["database"], size)
        res[f"{paradigm}_epoch"] = epoch
        res[f"{paradigm}_val"] = float(ckpt.get("best", {}).get(paradigm, float("nan")))
        res[f"{paradigm}_query"] = encoded[epoch]["query"].to(torch.int8)
        if paradigm == "sshp":
            res["sshp_database"] = encoded[epoch]["database"].to(torch.int8)
    res["eval_s"] = round(time.perf_counter() - t0 - train_s, 1)
    log = out / "student_metrics.jsonl"
    res["history"] = ([{k: v for k, v in json.loads(line).items() if k != "step_losses"}
                       for line in log.read_text().splitlines()] if log.is_file() else [])
    return res


def _run_students(jobs: list[dict], workers: int, log: _Log) -> list[dict]:
    from tqdm.auto import tqdm

    results = []
    bar = tqdm(total=len(jobs), desc="students", dynamic_ncols=True)

    def done(r):
        j = r["job"]
        results.append(r)
        bar.update(1)
        tqdm.write(f"   {j['method']:>8} {j['bits']}b seed {j['seed']}: val SSHP "
                   f"{r['sshp_val']:.3f} ASHP {r['ashp_val']:.3f} (train {r['train_s']:.0f}s)")

    if workers <= 1:
        for job in jobs:
            done(_student_job({**job, "progress": True}))
    else:
        ctx = get_context("spawn")  # fresh interpreters: no forked OpenMP state
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            futs = [ex.submit(_student_job, {**job, "progress": False}) for job in jobs]
            for f in as_completed(futs):
                done(f.result())
    bar.close()
    order = {(j["bits"], j["method"], j["seed"]): i for i, j in enumerate(jobs)}
    return sorted(results, key=lambda r: order[(r["job"]["bits"], r["job"]["method"],
                                                r["job"]["seed"])])


# ------------------------------------------------------------------------------ speed
def _time_call(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@torch.no_grad()
def _encode_speed(teacher, t_size: int, student, s_size: int, batches: list[int]) -> dict:
    """ms per batch and images/s of the forward pass (fp32, eval mode, inputs prepared).

    Each figure is the median of a few timed calls after a warm-up call; fewer calls for big
    batches (at least ~1,000 images per figure where that is cheap)."""
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "dtype": "float32",
                           "batches": batches}
    for name, model, size in (("teacher", teacher, t_size), ("student", student, s_size)):
        model.eval()
        for bs in batches:
            x = torch.randn(bs, 3, size, size).contiguous(memory_format=torch.channels_last)
            reps = max(1, min(10, 512 // bs))
            sec = _time_call(lambda m=model, x=x: m(x), reps)
            out[f"{name}_bs{bs}"] = {"ms_per_batch": round(sec * 1e3, 2),
                                     "images_per_s": round(bs / sec, 1)}
    for bs in batches:
        out[f"speedup_bs{bs}"] = round(out[f"student_bs{bs}"]["images_per_s"]
                                       / out[f"teacher_bs{bs}"]["images_per_s"], 1)
    return out


def _search_speed(db_words: np.ndarray, q_words: np.ndarray, bits: int, topk: int,
                  gallery: int, use_faiss: bool, log: _Log) -> dict:
    """fasthash exact top-k vs FAISS IndexBinaryFlat: the demo database and a synthetic one."""
    from fasthash import to_faiss_bytes

    from .retrieval.index import engine
    from .retrieval.index import topk as fh_topk

    faiss = None
    if use_faiss:
        try:
            import faiss  # noqa: F811
        except ImportError:
            log("FAISS is not installed: search speed of fasthash only")
    rng = np.random.default_rng(0)
    cases = [("demo database", db_words, q_words, topk), ("demo database", db_words, q_words, 10)]
    if gallery > 0:
        big = rng.integers(0, 2**63, size=(gallery, db_words.shape[1]), dtype=np.uint64)
        if bits % 64:
            big &= np.uint64((1 << (bits % 64)) - 1)
        cases.append((f"synthetic {gallery:,}", big, q_words, 10))
    out: dict[str, Any] = {"engine": engine(), "bits": bits, "cases": []}
    for name, g, q, k in cases:
        k = min(k, len(g))
        rec: dict[str, Any] = {"gallery": name, "n": int(len(g)), "queries": int(len(q)), "k": k}
        sec = _time_call(lambda g=g, q=q, k=k: fh_topk(q, g, k), 2)
        rec["fasthash_qps"] = round(len(q) / sec, 1)
        if faiss is not None:
            dim = 8 * ((bits + 7) // 8)
            index = faiss.IndexBinaryFlat(dim)
            index.add(to_faiss_bytes(g, bits))
            qb = to_faiss_bytes(q, bits)
            sec_f = _time_call(lambda index=index, qb=qb, k=k: index.search(qb, k), 2)
            rec["faiss_qps"] = round(len(q) / sec_f, 1)
            rec["speedup_vs_faiss"] = round(rec["fasthash_qps"] / rec["faiss_qps"], 2)
        out["cases"].append(rec)
        log(f"   search {name} k={k}: fasthash {rec['fasthash_qps']:,.0f} QPS"
            + (f", FAISS {rec['faiss_qps']:,.0f} QPS" if "faiss_qps" in rec else ""))
    return out


# ------------------------------------------------------------------------------ report
def _fmt(vals: list[float]) -> str:
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def _comparisons(table: dict, bits_list: list[int], methods: list[str]) -> list[str]:
    """Honest one-liners: BRCD against every other student, per code length and paradigm.

    A margin smaller than the seed spread (the larger std of the two, or 0.005 with one seed)
    is called a tie, not a win."""
    lines = []
    if "brcd" not in methods:
        return lines

    def spread(vals):
        return float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.005

    for b in bits_list:
        for par in ("sshp", "ashp"):
            mine = table.get((b, "brcd", par))
            if not mine:
                continue
            m = float(np.mean(mine))
            others = [(o, table[(b, o, par)]) for o in methods
                      if o != "brcd" and table.get((b, o, par))]
            if not others:
                continue
            lost = [f"{LABELS[o]} {np.mean(v):.3f}" for o, v in others if np.mean(v) >= m]
            tied = [f"{LABELS[o]} {np.mean(v):.3f}" for o, v in others
                    if 0 < m - np.mean(v) < max(spread(mine), spread(v))]
            tag = f"- {b} bits {par.upper()}: BRCD ({_fmt(mine)})"
            best_o, best_v = max(others, key=lambda t: np.mean(t[1]))
            if lost:
                lines.append(f"{tag} does NOT beat " + ", ".join(lost) + ".")
            elif tied:
                lines.append(f"{tag} is ahead of every baseline, but within seed noise of "
                             + ", ".join(tied) + f": no clear win (best baseline "
                             f"{LABELS[best_o]} {_fmt(best_v)}, +{m - np.mean(best_v):.3f}).")
            else:
                how = ("by more than the seed spread" if len(mine) > 1 else
                       "by more than 0.005 (one seed, no spread measured)")
                lines.append(f"{tag} beats every baseline {how}; best baseline "
                             f"{LABELS[best_o]} {_fmt(best_v)} (+{m - np.mean(best_v):.3f}).")
    return lines


def _write_report(out: Path, m: dict, log: _Log) -> Path:
    """Render ``<out>/report.md`` from the metrics dict (also usable on a saved metrics.json)."""
    bits_list, methods = m["bits"], m["methods"]
    args = argparse.Namespace(**m["options"])
    table = {(int(b), meth, par): vals for b, d in m["map"].items()
             for meth, pd in d.items() for par, vals in pd.items()}
    k = m["topk"]
    # metrics.json files written before the option existed ran the paper's one-view BRCD
    sym = "" if getattr(args, "paper_brcd", True) else " (BRCD anchored on both views)"
    lines = [
        "# BRCD demo report",
        "",
        f"Command: `{m['command']}`  ",
        f"Dataset: **{m['dataset']}** ({m['splits']}).  ",
        f"Wall-clock: {m['wall_s'] / 60:.1f} min on {m['machine']}; main process "
        f"{m['threads']} thread(s), {args.workers} student worker(s) x 1 thread, training "
        f"precision {m['precision']}.  ",
        f"Teacher: frozen ImageNet EfficientNet-Lite2 at 64 px + MLP head, trained "
        f"{args.teacher_epochs} epochs without labels on {args.views} cached views per image. "
        f"Student: tiny-cnn ({m['student_params'] / 1e6:.2f}M parameters) at 28 px, "
        f"{args.student_epochs} epochs on the same views{sym}. Checkpoints selected on the "
        "validation split (validation queries vs training images), never on the test queries.",
        "",
    ]
    if m.get("note"):
        lines += [f"> {m['note']}", ""]
    lines += [f"## Retrieval: mAP@{k} on the test queries", "",
              "SSHP: student queries and database. ASHP: student queries, teacher database. "
              f"At {m['main_bits']} bits: mean ± std over {m['seeds']} student seed(s); other "
              "lengths one seed. Ranking by Hamming distance, ties by database index.", ""]
    head = "| model | " + " | ".join(f"{b} bits SSHP | {b} bits ASHP" for b in bits_list) + " |"
    lines += [head, "|---|" + "---|---|" * len(bits_list)]
    tt = " | ".join(f"{_fmt(m['teacher'][str(b)]['map'])} | (T/T)" for b in bits_list)
    lines.append(f"| {LABELS['teacher']}, teacher/teacher | {tt} |")
    for meth in methods:
        cells = " | ".join(f"{_fmt(table.get((b, meth, 'sshp'), []))} | "
                           f"{_fmt(table.get((b, meth, 'ashp'), []))}" for b in bits_list)
        lines.append(f"| {LABELS[meth]} | {cells} |")
    lines += ["", "### BRCD against the baselines", ""]
    lines += _comparisons(table, bits_list, methods) or ["- (BRCD not run)"]
    mb = str(m["main_bits"])
    lines += ["", f"### More metrics at {mb} bits (seed 0)", "",
              "| model | paradigm | mAP@all | P@H≤2 | P@100 | ISD | NRA@10 | NRA@100 | NRA@1000 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in m["details"].get(mb, []):
        nra = row.get("nra") or {}
        lines.append(
            f"| {LABELS[row['model']]} | {row['paradigm']} | {row['map_all']:.3f} | "
            f"{row['p_at_r2']:.3f} | {row['p_at_100']:.3f} | "
            + (f"{row['isd']:.3f}" if row.get("isd") is not None else "–") + " | "
            + " | ".join(f"{nra[str(x)]:.3f}" if str(x) in nra else "–"
                         for x in (10, 100, 1000)) + " |")
    lines += ["", "ISD: mean normalised Hamming distance of a query's student code to its "
              "teacher code (0 = identical). NRA@K: overlap of a query's K nearest database "
              "items in the student's (SSHP) and the teacher's code space.", ""]
    sp = m["speed"]["encode"]
    lines += ["## Encode speed (forward pass, fp32, "
              f"{sp['threads']} thread(s))", "",
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
    lines += ["", "## Clusters, bit masks and offset positives", "",
              "| bits | clusters | bits kept per cluster | mean kept | offset-positive views |",
              "|---|---|---|---|---|"]
    for b in bits_list:
        c = m["clusters"][str(b)]
        lines.append(f"| {b} | {c['n_clusters']} | {', '.join(map(str, c['bits_kept']))} | "
                     f"{np.mean(c['bits_kept']):.1f} | {100 * c['offset_share']:.1f}% |")
    lines += ["", "Offset positive: an augmented view whose (unmasked) teacher code is nearest "
              "to another cluster's centroid than its image's cluster.", "", "## Figures", ""]
    for title, name in (("Precision–recall", "pr_curves.png"),
                        ("mAP against code length", "map_vs_bits.png"),
                        (f"Bit masks ({mb} bits)", "mask_heatmap.png")):
        if (out / name).is_file():
            lines += [f"![{title}]({name})", ""]
    lines += ["## Time per phase", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k_} | {v} |" for k_, v in m["phases"].items()]
    lines += ["", "All numbers: `metrics.json`. Checkpoints and the view cache: `work/`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    log(f"wrote {path}")
    return path


# ------------------------------------------------------------------------------ main
def _choose_dataset(args, log: _Log) -> tuple[str, str | None]:
    if args.dataset != "auto":
        return args.dataset, None
    root = Path(args.data_root)
    if any((root / f"train-images-idx3-ubyte{s}").is_file() for s in ("", ".gz")):
        return "fashion-mnist", None
    note = (f"note: Fashion-MNIST is not installed under {root} (Debian package "
            "dataset-fashion-mnist); this demo runs on scikit-learn's 8x8 digits instead, "
            "so its numbers are not comparable to the Fashion-MNIST reference figures.")
    log(note)
    return "digits", note


def run(args: argparse.Namespace) -> dict:
    """Run the whole demo; returns the metrics dict (also written to ``<out>/metrics.json``)."""
    args = _defaults(args)
    log = _Log()
    out = Path(args.out)
    work = out / "work"
    cache_dir = work / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    threads = _auto_threads(args.threads)
    torch.set_num_threads(threads)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and _cpu_has_bf16())
    if args.device != "cpu":
        bf16 = False  # the trainer's own AMP handles CUDA
    dataset, note = _choose_dataset(args, log)
    log(f"dataset {dataset}; bits {args.bits}; methods {args.methods}; seeds at "
        f"{args.main_bits} bits: {args.seeds}; main process {threads} thread(s); "
        f"precision {'bf16' if bf16 else 'fp32'}; out {out}")

    from . import data as D
    from . import task
    from .masks import ClusterMasks, assign_clusters
    from .models import count_parameters, create_model
    from .plots import plot_map_vs_bits, plot_mask_heatmap, plot_pr_curves
    from .retrieval import as_packed, evaluate, isd, nra
    from .trainer import load_checkpoint

    base = _base_config(args, dataset)
    splits = D.make_splits(base.data, base.seed)
    log(splits.summary())
    ql, dl = splits.query.labels, splits.database.labels

    # -- 1. teachers, clusters and masks ------------------------------------------------------
    teachers: dict[int, Path] = {}
    with log.phase("teachers, clusters and masks"):
        for b in args.bits:
            tdir = work / f"b{b}" / "teacher"
            _link_cache(tdir, cache_dir)
            cfg_b = _clone(base, bits=b, out_dir=str(tdir))
            if b == args.bits[0] and args.device == "cpu":
                log("view cache: augmented views + frozen Lite2 features (once, then reused)")
                _prebuild_view_cache(cfg_b, splits, bf16, log)
            log(f"teacher {b} bits")
            tpath = task.train_teacher(cfg_b, progress=True)
            teachers[b] = task.build_masks(cfg_b, teacher=tpath, progress=True)

    # -- 2. deterministic views of queries / database; teacher codes -------------------------
    with log.phase("teacher codes of queries and database"):
        vs = base.data.view_size
        ev = {"query": _det_views(splits.query, vs), "database": _det_views(splits.database, vs)}
        ev_path = work / "eval_views.pt"
        torch.save(ev, ev_path)
        t_codes: dict[int, dict[str, torch.Tensor]] = {}
        feats = None
        for b in args.bits:
            tmodel, tspec = task.load_model(teachers[b], b)
            if feats is None:  # the frozen backbone is shared by every code length
                tmodel.set_autocast("bf16" if bf16 else "none")
                feats = {s: _encode_views(tmodel, ev[s], tspec["image_size"], 256,
                                          features=True) for s in ev}
            with torch.no_grad():
                t_codes[b] = {s: tmodel.head_forward(f).codes.float() for s, f in feats.items()}

    # -- 3. students -----------------------------------------------------------------------
    jobs = []
    for b in args.bits:
        for meth in args.methods:
            for seed in range(args.seeds if b == args.main_bits else 1):
                sdir = work / f"b{b}" / f"{meth}-s{seed}"
                _link_cache(sdir, cache_dir)
                cfg_s = _with(base, {"bits": b, "out_dir": str(sdir), "distill.method": meth,
                                     "distill.seed": seed,
                                     "distill.symmetric": not args.paper_brcd,
                                     "student.train.autocast": "bf16" if bf16 else "none"})
                from .config import config_to_dict

                jobs.append({"bits": b, "method": meth, "seed": seed,
                             "config": config_to_dict(cfg_s), "teacher": str(teachers[b]),
                             "eval_views": str(ev_path), "threads": 1,
                             "device": args.device})
    with log.phase(f"students ({len(jobs)} runs, {args.workers} worker(s))"):
        results = _run_students(jobs, args.workers, log)

    # -- 4. evaluation -----------------------------------------------------------------------
    mapk: dict[str, dict] = {str(b): {m_: {"sshp": [], "ashp": []} for m_ in args.methods}
                             for b in args.bits}
    details: dict[str, list] = {}
    pr: dict[str, tuple] = {}
    teacher_m: dict[str, dict] = {}
    runs = []
    with log.phase("evaluation"):
        for b in args.bits:
            tq, tdb = t_codes[b]["query"], t_codes[b]["database"]
            r = evaluate(tq, tdb, ql, dl, topk=args.topk)
            teacher_m[str(b)] = {"map": [r.map_at_k], "map_all": r.map_all, "p_at_r2": r.p_at_r2}
            log(f"teacher {b} bits: mAP@{r.topk} {r.map_at_k:.4f}")
            if b == args.main_bits:
                pr[LABELS["teacher"]] = (r.pr_precision, r.pr_recall)
                details[str(b)] = [{"model": "teacher", "paradigm": "T/T", "map_all": r.map_all,
                                    "p_at_r2": r.p_at_r2, "p_at_100": r.precision_at.get(100,
                                                                                        np.nan),
                                    "isd": None, "nra": None}]
        for res in results:
            j = res["job"]
            b, meth = j["bits"], j["method"]
            tq, tdb = t_codes[b]["query"], t_codes[b]["database"]
            s = evaluate(res["sshp_query"].float(), res["sshp_database"].float(), ql, dl,
                         topk=args.topk)
            a = evaluate(res["ashp_query"].float(), tdb, ql, dl, topk=args.topk)
            mapk[str(b)][meth]["sshp"].append(s.map_at_k)
            mapk[str(b)][meth]["ashp"].append(a.map_at_k)
            run_rec = {**j, "sshp": s.as_dict(), "ashp": a.as_dict(), "train_s": res["train_s"],
                       "eval_s": res["eval_s"], "sshp_epoch": res["sshp_epoch"],
                       "ashp_epoch": res["ashp_epoch"], "val_sshp": res["sshp_val"],
                       "val_ashp": res["ashp_val"], "history": res["history"]}
            if b == args.main_bits and j["seed"] == 0:
                sq, sdb = res["sshp_query"].float(), res["sshp_database"].float()
                run_rec["isd_ashp_query"] = isd(res["ashp_query"].float(), tq)
                run_rec["nra_sshp"] = {str(k_): v for k_, v in
                                       nra(sq, sdb, tq, tdb, ks=(10, 100, 1000)).items()}
                for par, rr in (("SSHP", s), ("ASHP", a)):
                    details[str(b)].append({
                        "model": meth, "paradigm": par, "map_all": rr.map_all,
                        "p_at_r2": rr.p_at_r2, "p_at_100": rr.precision_at.get(100, np.nan),
                        "isd": run_rec["isd_ashp_query"] if par == "ASHP" else None,
                        "nra": run_rec["nra_sshp"] if par == "SSHP" else None})
                pr[f"{LABELS[meth]} SSHP"] = (s.pr_precision, s.pr_recall)
                if meth == "brcd":
                    pr["BRCD ASHP"] = (a.pr_precision, a.pr_recall)
            runs.append(run_rec)
            log(f"{meth:>8} {b}b seed {j['seed']}: SSHP {s.map_at_k:.4f}  ASHP {a.map_at_k:.4f}")

    # -- 5. clusters / masks / offset positives ---------------------------------------------
    clusters = {}
    with log.phase("clusters and offset positives"):
        for b in args.bits:
            ck = load_checkpoint(teachers[b])
            masks = ClusterMasks.from_dict(ck["masks"])
            tmodel, tspec = task.load_model(ck, b)
            cfg_b = _clone(base, bits=b, out_dir=str(work / f"b{b}" / "teacher"))
            # the cache the teachers were trained on (built in phase 1, loaded here)
            cache = task.view_cache(cfg_b, splits, lambda *_: None, teacher=ck)
            n, v, dim = cache.feats.shape
            with torch.no_grad():
                vcodes = tmodel.head_forward(cache.feats.reshape(-1, dim).float()).codes
            hat = assign_clusters(vcodes, masks.centroids).reshape(n, v)
            share = float((hat != masks.train_cluster_ids[:, None]).float().mean())
            clusters[str(b)] = {"n_clusters": masks.n_clusters,
                                "bits_kept": masks.mask_table.sum(1).long().tolist(),
                                "cluster_sizes": torch.bincount(masks.train_cluster_ids,
                                                                minlength=masks.n_clusters).tolist(),
                                "offset_share": share}
            log(f"{b} bits: {100 * share:.1f}% of augmented views are offset positives; bits "
                f"kept per cluster {clusters[str(b)]['bits_kept']}")
            if b == args.main_bits:
                plot_mask_heatmap(masks.mask_table, out / "mask_heatmap.png",
                                  title=f"Bits kept per cluster ({b} bits)")

    # -- 6. speed ----------------------------------------------------------------------------
    with log.phase("encode and search speed"):
        mb = args.main_bits
        teacher_model, tspec = task.load_model(teachers[mb], mb)
        student_model = create_model("tiny-cnn", mb, head=base.student.model.head,
                                     hidden=base.student.model.hidden)
        enc = _encode_speed(teacher_model.to(memory_format=torch.channels_last),
                            tspec["image_size"],
                            student_model.to(memory_format=torch.channels_last),
                            base.student.model.image_size, args.speed_batches)
        log("encode: student speed-up over teacher " + ", ".join(
            f"{enc[f'speedup_bs{bs}']}x at batch {bs}" for bs in args.speed_batches))
        dbw, _ = as_packed(t_codes[mb]["database"])
        qw, _ = as_packed(t_codes[mb]["query"])
        search = _search_speed(dbw, qw, mb, args.topk,
                               args.search_gallery if not args.quick else
                               min(args.search_gallery, 100_000), not args.no_faiss, log)

    # -- 7. plots, metrics, report ------------------------------------------------------------
    plot_pr_curves(pr, out / "pr_curves.png", title=f"Precision–recall over Hamming radii "
                   f"({args.main_bits} bits, test queries)")
    series = {LABELS["teacher"]: {b: teacher_m[str(b)]["map"][0] for b in args.bits}}
    for meth in args.methods:
        for par in ("sshp", "ashp"):
            pts = {}
            for b in args.bits:
                vals = mapk[str(b)][meth][par]
                if vals:
                    pts[b] = (float(np.mean(vals)), float(np.std(vals, ddof=1))
                              if len(vals) > 1 else 0.0)
            if pts and (par == "sshp" or meth == "brcd"):
                series[f"{LABELS[meth]} {par.upper()}"] = pts
    plot_map_vs_bits(series, out / "map_vs_bits.png", metric=f"mAP@{args.topk}")
    metrics = {
        "command": "python -m brcd demo " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["demo"]
                                                      else sys.argv[1:]),
        "dataset": dataset, "note": note, "splits": splits.summary(), "bits": args.bits,
        "main_bits": args.main_bits, "seeds": args.seeds, "methods": args.methods,
        "topk": min(args.topk, len(dl)), "map": mapk, "teacher": teacher_m,
        "details": details, "runs": runs, "clusters": clusters,
        "speed": {"encode": enc, "search": search},
        "student_params": count_parameters(student_model),
        "teacher_params": count_parameters(teacher_model),
        "threads": threads, "precision": "bf16 autocast" if bf16 else "fp32",
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "options": {k: v for k, v in vars(args).items()},
        "phases": log.phases,
    }
    metrics["wall_s"] = round(time.perf_counter() - log.t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    _write_report(out, metrics, log)
    log(f"done in {metrics['wall_s'] / 60:.1f} min")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m brcd demo``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m brcd demo",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if args.report_only:
            path = Path(args.out) / "metrics.json"
            if not path.is_file():
                raise ValueError(f"--report-only needs {path} from an earlier run")
            _write_report(Path(args.out), json.loads(path.read_text()), _Log())
        else:
            run(args)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
