"""One BRCD distill training step: 2 ranks × B rows (torchrun, gloo, CPU) against 1 process ×
2B rows, the same global batch. Prints the ratios; writes bench/results/dist_step.json.

    .venv/bin/python bench/dist_step.py [--batch 64] [--steps 8] [--quick]

Each run is the real ``python -m brcd distill`` (digits, tiny-cnn student, BRCD with masks,
fresh views, no validation) for two epochs of ``--steps`` steps; the time per step is the
second epoch's ``seconds`` in ``student_metrics.jsonl`` divided by its steps (augmentation,
teacher codes, student forward/backward, the losses' collectives, Adam). Memory per rank: the
process's peak resident set (``ru_maxrss``; it includes ~0.5 GB of imports) and the growth of
the peak during training (``VmHWM`` after ``Trainer.fit`` minus ``VmRSS`` before it). The
single process runs with 1 and with 2 torch threads (2 ranks × 1 thread use the same 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "dist_step.json"


def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(argv: list[str], report: str) -> int:
    """Run ``python -m brcd`` ``argv`` in this process (a rank under torchrun), recording
    memory around the training loop into ``report``.rank<R>.json."""
    from brcd import trainer
    from brcd.cli import main

    mem: dict[str, float] = {}
    fit = trainer.Trainer.fit

    def measured_fit(self):
        mem["rss_before_mb"] = _proc_kb("VmRSS") / 1024
        out = fit(self)
        mem["hwm_after_mb"] = _proc_kb("VmHWM") / 1024
        return out

    trainer.Trainer.fit = measured_fit
    rc = main(argv)
    mem["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mem["train_growth_mb"] = mem.get("hwm_after_mb", 0.0) - mem.get("rss_before_mb", 0.0)
    rank = os.environ.get("RANK", "0")
    Path(f"{report}.rank{rank}.json").write_text(json.dumps(mem))
    return rc


def _sets(over: dict) -> list[str]:
    return [a for k, v in over.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def _run(tmp: Path, name: str, ranks: int, batch: int, steps: int, threads: int,
         masks: Path) -> dict:
    out = tmp / name
    over = {"device": "cpu", "threads": threads, "student.train.batch_size": batch,
            "student.train.steps_per_epoch": steps, "student.train.epochs": 2,
            "student.train.eval_every": 0}
    argv = ["distill", "--config", "digits", *_sets(over), "--teacher", str(masks),
            "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(tmp / name), "--"]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(ranks), *cmd[1:]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + argv, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "student_metrics.jsonl").read_text().splitlines()]
    mems = [json.loads((tmp / f"{name}.rank{r}.json").read_text()) for r in range(ranks)]
    return {"ranks": ranks, "rows_per_rank": batch // ranks, "global_batch": batch,
            "threads_per_rank": threads, "step_s": recs[-1]["seconds"] / steps,
            "loss_epoch2": recs[-1]["loss"], "wall_s": round(time.perf_counter() - t0, 1),
            "per_rank_memory": mems}


def _teacher(tmp: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from brcd_support import TINY

    from brcd import task
    from brcd.config import load_config

    fast = {k: v for k, v in TINY.items() if not k.startswith("data.")}  # digits' own split
    cfg = load_config("digits", {**fast, "out_dir": str(tmp / "teacher")})
    task.train_teacher(cfg, progress=False)
    return task.build_masks(cfg, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="B: rows per rank of the 2-rank run")
    ap.add_argument("--steps", type=int, default=8, help="steps per epoch (2 epochs)")
    ap.add_argument("--quick", action="store_true", help="--batch 32 --steps 3 (smoke run)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker:
        sys.exit(worker([a for a in rest if a != "--"], args.worker))
    if args.quick:
        args.batch, args.steps = 32, 3
    b2 = 2 * args.batch
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        masks = _teacher(tmp)
        runs = {name: _run(tmp, name, ranks, b2, args.steps, threads, masks)
                for name, ranks, threads in (("1x2B_1thread", 1, 1), ("1x2B_2threads", 1, 2),
                                             ("2xB", 2, 1))}
    two = runs["2xB"]
    ratios = {
        "step_time_2xB_over_1x2B_1thread": two["step_s"] / runs["1x2B_1thread"]["step_s"],
        "step_time_2xB_over_1x2B_2threads": two["step_s"] / runs["1x2B_2threads"]["step_s"],
        "train_growth_per_rank_2xB_over_1x2B": max(
            m["train_growth_mb"] for m in two["per_rank_memory"]) / max(
            1e-9, runs["1x2B_1thread"]["per_rank_memory"][0]["train_growth_mb"]),
        "loss_2xB_minus_1x2B": two["loss_epoch2"] - runs["1x2B_1thread"]["loss_epoch2"],
    }
    for name, r in runs.items():
        mem = ", ".join(f"rank {i}: peak {m['peak_rss_mb']:.0f} MB, training +"
                        f"{m['train_growth_mb']:.1f} MB"
                        for i, m in enumerate(r["per_rank_memory"]))
        print(f"{name:>14}: {r['step_s'] * 1e3:7.1f} ms/step (global batch {r['global_batch']}, "
              f"{r['rows_per_rank']} rows/rank); {mem}")
    for k, v in ratios.items():
        print(f"{k}: {v:.4g}")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({
        "what": "one BRCD distill step (digits, tiny-cnn), 2 ranks x B (gloo, CPU) vs 1 x 2B",
        "batch_per_rank": args.batch, "steps": args.steps, "cpu_count": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0], "runs": runs, "ratios": ratios}, indent=2))
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
