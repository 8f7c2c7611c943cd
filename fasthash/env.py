"""Backend report (``fasthash.backend_info()``, ``python -m fasthash.env``) and the one-time
warnings of the slower paths (:func:`warn_once`).

Never falls back silently: this says which path each op takes on this machine. ``import
fasthash`` imports this module, so it imports only the standard library at module level.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import warnings

__all__ = ["backend_info", "warn_once"]

# keys of the warnings already given in this process
_WARNED: set[str] = set()


def warn_once(
    key: str, message: str, category: type[Warning] = RuntimeWarning, stacklevel: int = 2
) -> bool:
    """Warn the first time ``key`` is seen in this process, stay silent afterwards.

    Every fasthash slower path (no compiled core, an old core, a Triton kernel not used)
    reports itself through this function, once per key.

    Args:
        key: identifies the slower path (e.g. ``"search:reference"``).
        message: the warning text; it should name the path taken and how to avoid it.
        category: the warning class.
        stacklevel: as for :func:`warnings.warn`, counted from the caller of ``warn_once``
            (2 = the caller's caller).

    Returns:
        True when the warning was issued now, False when ``key`` had already warned.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):
        ...     warnings.simplefilter("always")
        ...     warn_once("doc-example", "slow path"), warn_once("doc-example", "slow path")
        (True, False)
    """
    if key in _WARNED:
        return False
    _WARNED.add(key)
    warnings.warn(message, category, stacklevel=stacklevel + 1)
    return True


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def backend_info() -> dict:
    """Versions and backends in use on this machine.

    Returns:
        dict with python / torch / numpy / triton versions, whether ``fasthash._C`` is built and
        the SIMD level it runs (``FASTHASH_SIMD`` overrides), the CUDA device (or None), and
        whether Triton kernels would run compiled on a GPU, interpreted on the CPU
        (``TRITON_INTERPRET=1``) or not at all (the torch CPU paths are used).

    Example:
        >>> info = backend_info(); sorted(info)[:3]
        ['c_extension', 'cpu', 'cpu_count']
    """
    import numpy as np
    import torch

    import fasthash

    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        try:
            from importlib.metadata import version

            triton_version = version("triton")
        except Exception:  # noqa: BLE001 - metadata may be missing in odd installs
            triton_version = "unknown"
    cuda = torch.cuda.is_available()
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if triton_version is None:
        kernels = "unavailable (triton not installed): torch paths"
    elif cuda:
        kernels = "compiled (CUDA)"
    elif interpret:
        kernels = "interpreted on CPU (TRITON_INTERPRET=1)"
    else:
        kernels = "not used on CPU: blocked torch paths"
    simd = None
    if fasthash.HAS_C:
        try:
            simd = fasthash._C.simd_level()
        except ValueError as e:  # an invalid FASTHASH_SIMD: report it rather than fail the report
            simd = f"invalid: {e}"

    return {
        "fasthash": fasthash.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "triton": triton_version,
        "c_extension": bool(fasthash.HAS_C),
        "simd_level": simd,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "triton_kernels": kernels,
    }


def main() -> None:
    import json

    print(json.dumps(backend_info(), indent=2))


if __name__ == "__main__":
    main()
