"""Where a benchmark's numbers come from: one record shared by the bench/ scripts (backend,
CPU model, cores, commit, versions, load), so that only ratios measured in one run are read."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
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
