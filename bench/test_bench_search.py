"""pytest-benchmark: exact top-k, the pure-torch reference vs fasthash._C at each SIMD level.

Small sizes (N = 20k, 64 and 256 bits) so `make bench` stays short; the FAISS comparison at
1M-100M codes is bench/search_vs_faiss.py.
"""

import numpy as np
import pytest

from fasthash.reference import topk_ref

C = pytest.importorskip("fasthash._C")
LEVELS = C.available_simd_levels()
N, Q, K = 20_000, 16, 10


def _codes(bits: int):
    rng = np.random.default_rng(bits)
    w = bits // 64
    return (rng.integers(1, 2**64, (Q, w), dtype=np.uint64),
            rng.integers(1, 2**64, (N, w), dtype=np.uint64))


@pytest.mark.parametrize("bits", [64, 256])
def test_reference(benchmark, bits):
    q, x = _codes(bits)
    benchmark.group = f"topk N={N} Q={Q} k={K} {bits} bits"
    benchmark.pedantic(topk_ref, args=(q[:4], x, K), rounds=3, iterations=1)
    benchmark.extra_info["queries"] = 4  # the reference materialises [Q, N, W, 8]


@pytest.mark.parametrize("bits", [64, 256])
@pytest.mark.parametrize("simd", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled(benchmark, bits, simd, threads):
    if simd not in LEVELS:
        pytest.skip(f"CPU lacks {simd}")
    q, x = _codes(bits)
    benchmark.group = f"topk N={N} Q={Q} k={K} {bits} bits"
    d, i = benchmark(C.topk, q, x, K, None, threads, simd)
    rd, _ = topk_ref(q[:2], x, K)
    np.testing.assert_array_equal(d[:2], rd.numpy())
