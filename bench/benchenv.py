"""What the bench/ scripts share: where a benchmark's numbers come from (backend, CPU model,
cores, commit, versions, load), so that only ratios measured in one run are read, and the
best-of-N timer."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def cpu_model() -> str:
    """The ``model name`` of /proc/cpuinfo ("" where there is none)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return ""


def environment(**extra: Any) -> dict[str, Any]:
    """The record: ``fasthash.backend_info()``, CPU model, cores, commit (and whether tracked
    files differ from it), Python and torch versions, argv, the load average now, plus
    ``extra``.

    Example:
        >>> environment(threads=1)["threads"]
        1
    """
    import torch

    import fasthash

    return {"backend": fasthash.backend_info(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "commit": _git("rev-parse", "--short", "HEAD"),
            "worktree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "python": platform.python_version(), "torch": torch.__version__,
            "argv": sys.argv[1:], "loadavg_at_start": os.getloadavg(), **extra}


def best_time(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    """The best wall time of ``reps`` calls of ``fn``, and the last call's result."""
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out
