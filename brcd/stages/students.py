"""Many student runs at once: each a distill stage plus the codes of its validation-selected
checkpoints, in parallel single-threaded worker processes (the demo's hot path).

Each run saves its result next to its checkpoints (:data:`RESULT`), keyed by the job, the
checksums of its input files and of the code, so rerunning the same command after a crash, an
interrupt or a failure in a later step reuses every finished run instead of training it again."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from ..config import config_from_dict
from ..files import file_digest, load_file, save_file
from ..trainer import load_checkpoint
from .context import make_context
from .distill import DistillInput, distill
from .encode import encode_views, head_codes, load_model

__all__ = ["RESULT", "StudentJob", "student_job", "run_students"]

RESULT = "student_result.pt"  # in the run's out_dir


@dataclass(frozen=True, kw_only=True)
class StudentJob:
    """One student run: its config (as a dict, so it pickles), the teacher checkpoint and the
    ``{"query", "database"}`` uint8 deterministic views to encode (a
    :func:`brcd.files.save_file` file), or, for a student whose backbone is frozen,
    ``eval_feats``: that backbone's features of those views (the head alone encodes them).
    ``student`` and ``variant`` name the student kind and the ablation variant in the results."""

    bits: int
    method: str
    seed: int
    config: dict[str, Any]
    teacher: str
    eval_views: str
    eval_feats: str | None = None
    student: str = "tiny-cnn"
    variant: str = "full"
    threads: int = 1


def _history(out: Path) -> list[dict]:
    log = out / "student_metrics.jsonl"
    if not log.is_file():
        return []
    return [{k: v for k, v in json.loads(line).items() if k != "step_losses"}
            for line in log.read_text().splitlines()]


def student_job(job: StudentJob, progress: bool = False) -> dict[str, Any]:
    """Distill, then encode the queries (and, for SSHP, the database) with the best-SSHP and
    best-ASHP checkpoints. Returns int8 codes, their epochs and validation scores, timings
    and the training log, and saves them in the run's folder (:data:`RESULT`). When that
    folder already holds the result of the same job on the same inputs (file checksums), the
    job returns it, with ``"reused": True``, and trains nothing."""
    torch.set_num_threads(job.threads)
    cfg = config_from_dict(job.config)
    out = Path(cfg.out_dir)
    key = _key(job)
    if (saved := _saved(out / RESULT, key)) is not None:
        return saved
    for old in out.glob("student_*"):
        old.unlink()  # a rerun starts afresh (the trainer appends to its metrics log)
    t0 = time.perf_counter()
    distill(DistillInput.from_config(cfg, teacher=job.teacher), make_context(cfg, progress))
    train_s = time.perf_counter() - t0
    ev = load_file(job.eval_feats or job.eval_views, "eval features" if job.eval_feats
                   else "eval views", memo=True)
    res: dict[str, Any] = {"job": {"bits": job.bits, "method": job.method, "seed": job.seed,
                                   "student": job.student, "variant": job.variant},
                           "train_s": round(train_s, 1)}
    size = cfg.student.model.image_size
    encoded: dict[int, dict] = {}
    for paradigm in ("sshp", "ashp"):
        path = out / f"student_best_{paradigm}.pt"
        ckpt = load_checkpoint(path if path.is_file() else out / "student_last.pt")
        epoch = int(ckpt["epoch"])
        enc = encoded.setdefault(epoch, {})
        model = None
        for split in ("query", "database") if paradigm == "sshp" else ("query",):
            if split not in enc:
                model = model or load_model(ckpt, cfg.bits)[0]
                enc[split] = (head_codes(model, ev[split], torch.device("cpu"))
                              if job.eval_feats else encode_views(model, ev[split], size))
        res[f"{paradigm}_epoch"] = epoch
        res[f"{paradigm}_val"] = float(ckpt.get("best", {}).get(paradigm, float("nan")))
        res[f"{paradigm}_query"] = enc["query"].to(torch.int8)
        if paradigm == "sshp":
            res["sshp_database"] = enc["database"].to(torch.int8)
    res["eval_s"] = round(time.perf_counter() - t0 - train_s, 1)
    res["history"] = _history(out)
    save_file({"key": key, "result": res}, out / RESULT)
    return res


@functools.cache
def _code_digest() -> str:
    """SHA-256 of the brcd and fasthash Python sources and the torch version: a result saved
    by other code is not reused."""
    import fasthash

    h = hashlib.sha256(torch.__version__.encode())
    for pkg in (Path(__file__).parents[1], Path(fasthash.__file__).parent):
        for f in sorted(pkg.rglob("*.py")):
            h.update(f.relative_to(pkg.parent).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _key(job: StudentJob) -> dict[str, Any]:
    """What a saved result must match: the job (its thread count aside: results do not depend
    on it), the payload checksums of the teacher and eval files it read, and the code."""
    inputs = [job.teacher, job.eval_feats or job.eval_views]
    return {"job": {k: v for k, v in asdict(job).items() if k != "threads"},
            "inputs": [file_digest(p, "student job input") for p in inputs],
            "code": _code_digest()}


def _saved(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The result saved at ``path`` if its key equals ``key``, else None (also when the file
    is missing or unreadable: the run is then trained again)."""
    if not path.is_file():
        return None
    try:
        saved = load_file(path, "student result")
    except ValueError:
        return None
    return {**saved["result"], "reused": True} if saved.get("key") == key else None


def run_students(jobs: list[StudentJob], workers: int) -> list[dict[str, Any]]:
    """Run ``jobs`` (``workers`` processes, or in this process when ``workers <= 1``).

    Returns:
        the :func:`student_job` results in the order of ``jobs``.
    """
    from tqdm.auto import tqdm

    results: dict[int, dict] = {}
    bar = tqdm(total=len(jobs), desc="students", dynamic_ncols=True)

    def done(i: int, r: dict) -> None:
        j = r["job"]
        results[i] = r
        bar.update(1)
        tqdm.write(f"   {j['student']:>13} {j['method']:>8} {j['variant']:>17} {j['bits']}b "
                   f"seed {j['seed']}: val SSHP "
                   f"{r['sshp_val']:.3f} ASHP {r['ashp_val']:.3f} "
                   + ("(saved result)" if r.get("reused") else f"(train {r['train_s']:.0f}s)"))

    if workers <= 1:
        for i, job in enumerate(jobs):
            done(i, student_job(job, progress=True))
    else:
        ctx = get_context("spawn")  # fresh interpreters: no forked OpenMP state
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            futs = {ex.submit(student_job, job): i for i, job in enumerate(jobs)}
            for f in as_completed(futs):
                done(futs[f], f.result())
    bar.close()
    return [results[i] for i in range(len(jobs))]

