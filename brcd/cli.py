"""Command line: ``python -m brcd {train-teacher, build-masks, distill, evaluate, encode, demo}``.

Every subcommand takes ``--config`` (a preset name or YAML file), a few common flags and
``--set dotted.key=value`` overrides (values parsed as YAML), then calls :mod:`brcd.task`.
A user error (bad option, config, path or file) is one ``error: ...`` line on stderr and exit
status 2 (:mod:`brcd.errors`); ``--debug`` shows its traceback instead.

Under torchrun (``torchrun --nproc_per_node N -m brcd train-teacher|distill ...``, also with
``--nnodes``) those two commands train on every rank (:mod:`brcd.dist`), and ``evaluate`` /
``encode`` encode a shard of the images on each rank; rank 0 alone prints, logs and writes.
The other commands (build-masks, demo) run in a single process and refuse torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from . import dist
from .config import Config, list_presets, load_config, parse_yaml
from .data import DATASETS
from .errors import USER_ERRORS, Parser, guarded, one_line
from .files import check_output, write_atomic
from .losses import ABLATION_HELP, ABLATIONS, METHODS
from .masks import CONVENTIONS

__all__ = ["main", "build_parser"]


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--config", default="fashion-mnist",
                   help=f"preset ({', '.join(list_presets())}) or YAML file "
                   "(default fashion-mnist)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set teacher.train.epochs=5 (repeatable)")
    g.add_argument("--bits", type=int, help="code length L (teacher and student)")
    g.add_argument("--out", dest="out_dir", help="output folder (checkpoints, logs, cache)")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--seed", type=int)
    g.add_argument("--threads", type=int, help="torch CPU threads (0 = default; 1 is fastest "
                   "for tiny models on a busy machine)")
    g.add_argument("--dataset", help="data.name: " + "; ".join(
        f"{d.name} ({d.help})" for d in DATASETS.values()))
    g.add_argument("--data-root", help="dataset folder")
    g.add_argument("--quiet", action="store_true", help="no progress bars / logs")
    g.add_argument("--debug", action="store_true",
                   help="show the traceback of an error instead of one 'error:' line")


def _stage_flags(p: argparse.ArgumentParser, stage: str) -> None:
    g = p.add_argument_group(stage)
    g.add_argument("--epochs", type=int, help=f"{stage}.train.epochs")
    g.add_argument("--lr", type=float, help=f"{stage}.train.lr")
    g.add_argument("--batch-size", type=int, help=f"{stage}.train.batch_size")
    g.add_argument("--cache-views", type=int, help=f"{stage}.train.cache_views (0 = off)")
    g.add_argument("--model", help=f"{stage}.model.name (tiny-cnn or any timm name)")
    g.add_argument("--image-size", type=int, help=f"{stage}.model.image_size")
    g.add_argument(f"--{stage}-weights", dest="weights", help=f"local weight file for the "
                   f"{stage} backbone ({stage}.model.weights)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--resume", help=f"continue from a {stage}_last.pt checkpoint")
    g.add_argument("--dist-timeout", type=float, default=dist.DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others in a step before "
                   f"the job fails (default {dist.DEFAULT_TIMEOUT:.0f}; rank 0's one-off work, "
                   f"the view cache, may take {dist.SOLO_FACTOR} times it)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m brcd``."""
    ap = Parser(prog="python -m brcd", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("train-teacher", help="train the teacher hashing model (no labels)")
    _common(p)
    _stage_flags(p, "teacher")

    p = sub.add_parser("build-masks", help="k-means on teacher codes + per-cluster bit masks")
    _common(p)
    p.add_argument("--teacher", help="teacher checkpoint (default <out>/teacher_best_teacher.pt)")
    p.add_argument("--clusters", type=int, help="masks.n_clusters (C)")
    p.add_argument("--choose-clusters", help="comma-separated candidates for C (silhouette)")
    p.add_argument("--delta", type=float, help="masks.delta (keep |mu| > delta)")
    p.add_argument("--mask-convention", choices=list(CONVENTIONS), help="masks.convention")

    p = sub.add_parser("distill", help="train the student (BRCD or a KD baseline)")
    _common(p)
    _stage_flags(p, "student")
    p.add_argument("--teacher",
                   help="teacher checkpoint with masks (default <out>/teacher_masks.pt)")
    p.add_argument("--method", choices=list(METHODS), help="distill.method: " + "; ".join(
        f"{m.name}: {m.help}" for m in METHODS.values()))
    p.add_argument("--alpha", type=float, help="distill.alpha (individual-space weight)")
    p.add_argument("--no-mask", action="store_true", help="structural term on unmasked codes")
    p.add_argument("--no-offset-positive", action="store_true", help="alpha_k = alpha always")
    p.add_argument("--no-false-negative", action="store_true", help="keep same-cluster negatives")
    p.add_argument("--distill-mask-convention", choices=list(CONVENTIONS),
                   help="distill.mask_convention: rebuild the teacher checkpoint's mask table "
                   "from its centroids with this convention (default: the stored table)")
    p.add_argument("--ablation", choices=list(ABLATIONS), metavar="VARIANT",
                   help="a BRCD ablation (config overrides; a flag or --set that contradicts "
                   "it is an error): " + "; ".join(
                       f"{k}: {ABLATION_HELP[k]}" for k in ABLATIONS))
    p.add_argument("--kd-weight", type=float,
                   help="distill.kd_weight: weight of the KD term (default: the method's)")
    p.add_argument("--student-seed", type=int,
                   help="distill.seed: varies only the student (init, batches, views)")

    p = sub.add_parser("evaluate", help="test mAP: teacher/teacher, SSHP, ASHP")
    _common(p)
    p.add_argument("--student", help="student checkpoint")
    p.add_argument("--teacher", help="teacher checkpoint (default: the student's teacher)")
    p.add_argument("--topk", type=int, help="K of mAP@K")
    p.add_argument("--sshp-only", action="store_true",
                   help="do not load the student's teacher (no ASHP / teacher numbers)")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")

    p = sub.add_parser("encode", help="codes of a split with a checkpoint (.npy)")
    _common(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="query", choices=["train", "query", "database", "val"])
    p.add_argument("--output", required=True, help="output .npy of ±1 int8 codes; packed uint64 "
                   "words go to <output>.words.npy and labels to <output>.labels.npy")

    p = sub.add_parser("demo", help="the end-to-end Fashion-MNIST demo (brcd/demo.py)",
                       add_help=False)
    p.add_argument("demo_args", nargs=argparse.REMAINDER)
    return ap


def _overrides(args: argparse.Namespace, stage: str | None) -> dict:
    o: dict = {}
    for item in args.overrides:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        o[k.strip()] = parse_yaml(v, f"--set {item!r}")
    for flag, key in (("bits", "bits"), ("out_dir", "out_dir"), ("device", "device"),
                      ("seed", "seed"), ("threads", "threads"), ("dataset", "data.name"),
                      ("data_root", "data.root")):
        if getattr(args, flag, None) is not None:
            o[key] = getattr(args, flag)
    if stage:
        for flag, key in (("epochs", "train.epochs"), ("lr", "train.lr"),
                          ("batch_size", "train.batch_size"), ("cache_views", "train.cache_views"),
                          ("model", "model.name"), ("image_size", "model.image_size"),
                          ("weights", "model.weights"), ("compile", "train.compile")):
            if getattr(args, flag, None) is not None:
                o[f"{stage}.{key}"] = getattr(args, flag)
    if getattr(args, "clusters", None) is not None:
        o["masks.n_clusters"] = args.clusters
    if getattr(args, "choose_clusters", None):
        o["masks.choose_from"] = [int(x) for x in args.choose_clusters.split(",")]
    if getattr(args, "delta", None) is not None:
        o["masks.delta"] = args.delta
    if getattr(args, "mask_convention", None):
        o["masks.convention"] = args.mask_convention
    for flag, key in (("method", "distill.method"), ("alpha", "distill.alpha"),
                      ("kd_weight", "distill.kd_weight"), ("topk", "topk"),
                      ("student_seed", "distill.seed")):
        if getattr(args, flag, None) is not None:
            o[key] = getattr(args, flag)
    if getattr(args, "no_mask", False):
        o["distill.use_mask"] = False
    if getattr(args, "no_offset_positive", False):
        o["distill.offset_positive"] = False
    if getattr(args, "no_false_negative", False):
        o["distill.false_negative"] = False
    if getattr(args, "distill_mask_convention", None):
        o["distill.mask_convention"] = args.distill_mask_convention
    if getattr(args, "ablation", None):
        _apply_ablation(o, args.ablation)
    return o


def _apply_ablation(o: dict, name: str) -> None:
    """Add ``ABLATIONS[name]`` to the overrides ``o``; a key ``o`` sets otherwise is an error."""
    method = o.get("distill.method", "brcd")
    if method != "brcd":
        raise ValueError(f"--ablation {name} is an ablation of BRCD; it needs distill.method "
                         f"brcd, got {method!r}")
    for key, value in ABLATIONS[name].items():
        if key in o and o[key] != value:
            raise ValueError(f"--ablation {name} sets {key}={value!r}, but another flag or --set "
                             f"sets it to {o[key]!r}")
        o[key] = value


def _encode(cfg: Config, args: argparse.Namespace, progress: bool) -> None:
    from fasthash import pack_codes

    from . import data as D
    from . import task

    out = Path(args.output)
    targets = [_npy_name(p) for p in (out, out.with_suffix(".words.npy"),
                                      out.with_suffix(".labels.npy"))]
    for t in targets:  # before any work: a bad --output fails at once
        check_output(t, "--output")
    d = dist.current()  # under torchrun: each rank encodes a shard, rank 0 writes
    device = d.device if d.enabled else task.resolve_device(cfg.device)
    images = getattr(D.make_splits(cfg.data, cfg.seed), args.split)
    codes = task.encode(args.checkpoint, images, cfg.data.view_size, device,
                        bits=cfg.bits, dist=d).numpy()
    if not d.main:
        return
    for t, arr in zip(targets, (codes.astype(np.int8), pack_codes(codes), images.labels),
                      strict=True):
        write_atomic(t, lambda tmp, a=arr: _save_npy(tmp, a))
    print(f"{out}: {codes.shape[0]} codes of {codes.shape[1]} bits ({args.split})")


def _npy_name(path: Path) -> Path:
    """Where ``np.save(path)`` writes: ``path``, with ``.npy`` appended unless it ends so."""
    return path if path.suffix == ".npy" else path.with_name(path.name + ".npy")


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, arr)


def _evaluate(cfg: Config, args: argparse.Namespace, progress: bool) -> None:
    from . import task

    if args.json_out:
        check_output(args.json_out, "--json")
    res = task.evaluate(cfg, student=args.student, teacher=args.teacher, progress=progress,
                        with_teacher=not args.sshp_only)
    if not dist.current().main:  # under torchrun rank 0 prints and writes
        return
    print(json.dumps(res))
    if args.json_out:
        write_atomic(args.json_out, lambda tmp: tmp.write_text(json.dumps(res, indent=2)))


def _stage(name: str, **flags: str):
    """A subcommand that runs ``brcd.task.<name>`` and prints the checkpoint it wrote;
    ``flags`` maps the task's keyword arguments to argparse destinations."""
    def run(cfg: Config, args: argparse.Namespace, progress: bool) -> None:
        from . import task

        kwargs = {k: getattr(args, dest) for k, dest in flags.items()}
        result = getattr(task, name)(cfg, progress=progress, **kwargs)
        if dist.current().main:
            print(result)
    return run


# subcommand -> (its stage section for the per-stage flags, handler)
_COMMANDS = {
    "train-teacher": ("teacher", _stage("train_teacher", resume="resume")),
    "build-masks": (None, _stage("build_masks", teacher="teacher")),
    "distill": ("student", _stage("distill", teacher="teacher", resume="resume")),
    "evaluate": (None, _evaluate),
    "encode": (None, _encode),
}


# the commands that run under torchrun: training on every rank's share of each batch,
# evaluate / encode on every rank's shard of the images
_DISTRIBUTED = ("train-teacher", "distill", "evaluate", "encode")


def _rank0_error(msg: str) -> int:
    """A failure every rank meets alike (before any collective): rank 0 alone says so."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {msg}", file=sys.stderr)
    return 2


def _distributed(args: argparse.Namespace, stage: str, handler) -> int:
    """Run ``handler`` as one rank of a torchrun job: init, train, leave the job."""
    try:
        cfg = load_config(args.config, _overrides(args, stage))
        if stage:
            key = f"{stage}.train.batch_size"
            dist.check_divisible(getattr(cfg, stage).train.batch_size, key,
                                 dist.env_world_size())
        from .stages.encode import resolve_device

        device = resolve_device(cfg.device)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        return _rank0_error(one_line(exc))
    rank = os.environ.get("RANK")

    def run() -> None:
        dist.init(device, getattr(args, "dist_timeout", dist.DEFAULT_TIMEOUT))
        try:
            handler(cfg, args, not args.quiet)
        finally:
            dist.shutdown()
    try:
        return guarded(run, args.debug, prefix=f"[rank {rank}] " if rank != "0" else "")
    except RuntimeError as exc:  # another rank died or stopped answering
        if args.debug or not _collective_failure(exc):
            raise
        print(f"error: [rank {rank}] the torchrun job failed: another rank stopped, or a "
              f"collective waited longer than the timeout "
              f"({getattr(args, 'dist_timeout', dist.DEFAULT_TIMEOUT):g}s) "
              f"({one_line(exc)})", file=sys.stderr)
        return 1


def _collective_failure(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a failed or timed-out collective (gloo raises plain RuntimeErrors)."""
    import torch.distributed

    msg = str(exc).lower()
    return isinstance(exc, torch.distributed.DistError) or any(
        s in msg for s in ("gloo", "nccl", "connection closed", "timed out", "collective"))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status: 0, or 2 on a user error (one ``error:`` line on
    stderr; ``--debug`` raises it instead, see :mod:`brcd.errors`). Under torchrun
    ``train-teacher``, ``distill``, ``evaluate`` and ``encode`` run on every rank; the others
    refuse."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if dist.launched() and (not argv or argv[0] not in _DISTRIBUTED):
        cmd = argv[0] if argv else "<command>"
        return _rank0_error(
            f"'python -m brcd {cmd}' does not run under torchrun (only "
            f"{', '.join(_DISTRIBUTED)} do); run it in a single process, without torchrun: "
            f"checkpoints written under torchrun load there as usual")
    if argv and argv[0] == "demo":
        from . import demo

        return demo.main(argv[1:])
    args = build_parser().parse_args(argv)
    stage, handler = _COMMANDS[args.cmd]
    if dist.launched():
        return _distributed(args, stage, handler)
    return guarded(lambda: handler(load_config(args.config, _overrides(args, stage)), args,
                                   not args.quiet), args.debug)
