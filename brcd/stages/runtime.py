"""Process-level helpers of long runs: timed phase logs, thread counts from the idle cores and
native-bf16 detection."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["PhaseLog", "free_cores", "auto_threads", "cpu_has_bf16"]


class PhaseLog:
    """Timestamped progress lines; also collects per-phase wall-clock seconds in ``phases``."""

    def __init__(self, prefix: str = "demo") -> None:
        self.prefix = prefix
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}

    def __call__(self, msg: str) -> None:
        print(f"[{self.prefix} {time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Log the start and the duration of the ``with`` block as phase ``name``."""
        self(f"== {name}")
        t = time.perf_counter()
        yield
        self.phases[name] = round(time.perf_counter() - t, 1)
        self(f"   {name}: {self.phases[name]:.1f}s")


def free_cores(interval: float = 0.5) -> float:
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


def auto_threads(requested: int) -> int:
    """``requested`` if > 0, else the idle cores (OpenMP barriers stall badly when threads
    outnumber the free cores: measured 4x slower with 2 threads on a busy 2-core box)."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    return max(1, min(cores, int(round(free_cores()))))


def cpu_has_bf16() -> bool:
    """Whether the CPU has native bf16 arithmetic (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags
