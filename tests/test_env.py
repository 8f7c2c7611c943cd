"""`import fasthash` is light (no triton, no brcd), survives a missing _C with one warning,
and the backend report names every path."""

import json
import subprocess
import sys
import time
import warnings

import fasthash
from fasthash import env

_BLOCK_C = """
import importlib.abc, sys, warnings
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fasthash._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as w:
    import fasthash
    import numpy as np
    from fasthash.reference import topk_ref
msgs = [str(x.message) for x in w if "fasthash._C" in str(x.message)]
print(len(msgs), fasthash.HAS_C, "reference" in msgs[0])
"""


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_is_fast_and_imports_neither_triton_nor_brcd():
    code = (
        "import sys, time; t = time.perf_counter(); import fasthash; "
        "print(time.perf_counter() - t, 'triton' in sys.modules, 'brcd' in sys.modules, "
        "'torch' in sys.modules)"
    )
    seconds, triton, brcd, torch = _run(code).split()
    assert float(seconds) < 2.0
    assert (triton, brcd, torch) == ("False", "False", "False")


def test_missing_extension_warns_once_and_names_the_slower_path():
    assert _run(_BLOCK_C) == "1 False True"


def test_warn_once_warns_once_per_key(monkeypatch):
    monkeypatch.setattr(env, "_WARNED", set())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert env.warn_once("k1", "slow path one", stacklevel=1) is True
        assert env.warn_once("k1", "slow path one") is False
        assert env.warn_once("k2", "slow path two", UserWarning) is True
    assert [(str(x.message), x.category) for x in w] == [
        ("slow path one", RuntimeWarning), ("slow path two", UserWarning)]
    assert w[0].filename == __file__  # stacklevel counts from warn_once's caller


def test_backend_info_reports_versions_and_paths():
    info = fasthash.backend_info()
    for key in ("torch", "numpy", "triton", "c_extension", "simd_level", "cuda_device"):
        assert key in info
    assert info["c_extension"] is fasthash.HAS_C
    if fasthash.HAS_C:
        assert info["simd_level"] in {"scalar", "avx2", "avx512"}, info["simd_level"]
    assert isinstance(info["triton_kernels"], str) and info["triton_kernels"]


def test_env_module_prints_json():
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "fasthash.env"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["fasthash"] == fasthash.__version__
    assert time.perf_counter() - t < 60


def test_unknown_attribute_is_an_attribute_error():
    try:
        fasthash.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_invalid_simd_override_is_reported_not_hidden():
    import os

    env = dict(os.environ, FASTHASH_SIMD="bogus")
    out = subprocess.run(
        [sys.executable, "-m", "fasthash.env"], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    level = json.loads(out.stdout)["simd_level"]
    if fasthash.HAS_C:
        assert level.startswith("invalid") and "FASTHASH_SIMD" in level
