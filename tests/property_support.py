"""Shared pieces of the property suites: hypothesis profiles, strategies and independent oracles.

Profiles (chosen by the environment variable HYPOTHESIS_PROFILE, default "ci"):

* ``ci``: a few examples per property (HYPOTHESIS_CI_EXAMPLES, default 20), derandomized, no
  example database, no deadline: the whole property suite runs in well under a minute.
* ``fuzz``: FUZZ_EXAMPLES_PER_TEST examples per property (default 3000: about 10^5 in total
  over the suite), random, with the default example database; used by ``make fuzz``.

The oracles here never call fasthash: integer distances use ``numpy.bitwise_count`` over the
XOR of the words, bit packing uses explicit loops over bits, and the float ops are written out
in float64 torch (autograd only differentiates them), so a property compares fasthash with a
second, independent implementation of the specification.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# ----------------------------------------------------------------------------- profiles

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

# registered once: every property module imports this module (cached in sys.modules)
# ci: few examples, the same every run; fuzz (make fuzz): many, fresh every run
for _name, _examples, _extra in (
    ("ci", os.environ.get("HYPOTHESIS_CI_EXAMPLES", "20"), {"derandomize": True, "database": None}),
    ("fuzz", os.environ.get("FUZZ_EXAMPLES_PER_TEST", "3000"), {"derandomize": False}),
):
    settings.register_profile(_name, max_examples=int(_examples), deadline=None, print_blob=True,
                              suppress_health_check=_SUPPRESS, **_extra)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))



def heavy(weight: float):
    """``@heavy(w)``: a costly property runs ``w`` times the profile's examples under "fuzz"
    (at least 10) and at most 10 examples under "ci"."""
    n = settings.default.max_examples
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "fuzz":
        return settings(max_examples=max(10, int(n * weight)))
    return settings(max_examples=min(n, 10))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors: one intra-op thread is 10-20x faster than two on a busy 2-core machine.
    Module-scoped (restored afterwards), so it leaks into no other test module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: the exceptions a bad argument may raise (DESIGN.md convention 8); anything else is a defect
BAD_INPUT = (TypeError, ValueError)

# ----------------------------------------------------------------------------- integer oracles

U64 = np.uint64
ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


def nwords(bits: int) -> int:
    return (bits + 63) // 64


def tail_mask(bits: int) -> np.uint64:
    """The valid bits of the last word of an L-bit code."""
    r = bits % 64
    return ALL_ONES if r == 0 else np.uint64((1 << r) - 1)


def dist_oracle(q: np.ndarray, x: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """``D[i, j] = popcount((q_i ^ x_j) & m_i)`` with numpy's bitwise_count (int64 [Q, N])."""
    q = np.asarray(q, dtype=U64)
    x = np.asarray(x, dtype=U64)
    diff = q[:, None, :] ^ x[None, :, :]
    if m is not None:
        m = np.asarray(m, dtype=U64).reshape(-1, q.shape[1])  # [1, W] or [Q, W]
        diff = diff & m[:, None, :]
    if diff.size == 0:
        return np.zeros((q.shape[0], x.shape[0]), dtype=np.int64)
    return np.bitwise_count(diff).sum(axis=-1, dtype=np.int64)


def topk_oracle(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k smallest per row ordered by (distance, index): a stable argsort."""
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


def radius_oracle(d: np.ndarray, r: int):
    """FAISS-style (lims, distances, indices) of every d <= r, per row by (distance, index)."""
    lims, ds, ids = [0], [], []
    for row in d:
        hits = sorted((int(v), j) for j, v in enumerate(row) if v <= r)
        ds += [h[0] for h in hits]
        ids += [h[1] for h in hits]
        lims.append(len(ds))
    return np.array(lims, np.int64), np.array(ds, np.int64), np.array(ids, np.int64)


def pack_oracle(bits_bool: np.ndarray) -> np.ndarray:
    """Explicit loop: bit j of a code -> bit j % 64 of word j // 64 (np.uint64 [N, W])."""
    n, length = bits_bool.shape
    out = np.zeros((n, nwords(length)), dtype=U64)
    for i in range(n):
        for j in range(length):
            if bits_bool[i, j]:
                out[i, j // 64] |= np.uint64(1) << np.uint64(j % 64)
    return out


def unpack_oracle(words: np.ndarray, bits: int) -> np.ndarray:
    """Explicit loop inverse of :func:`pack_oracle`: bool [N, bits]."""
    words = np.asarray(words, dtype=U64)
    out = np.zeros((words.shape[0], bits), dtype=bool)
    for i in range(words.shape[0]):
        for j in range(bits):
            out[i, j] = bool((int(words[i, j // 64]) >> (j % 64)) & 1)
    return out


def faiss_bytes_oracle(words: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bytes of each word, first ceil(bits / 8) of them (uint8 [N, nbytes])."""
    nbytes = (bits + 7) // 8
    out = np.zeros((words.shape[0], nbytes), dtype=np.uint8)
    for i in range(words.shape[0]):
        for b in range(nbytes):
            out[i, b] = (int(words[i, b // 8]) >> (8 * (b % 8))) & 0xFF
    return out


# ----------------------------------------------------------------------------- strategies


@st.composite
def words_arrays(draw, rows: int, w: int, bits: int | None = None) -> np.ndarray:
    """np.uint64 [rows, w]: random, tie-heavy (few distinct values, duplicated rows), sparse or
    extreme (0 / all ones) words; with ``bits``, the padding bits of the last word are 0."""
    kind = draw(st.sampled_from(["random", "ties", "sparse", "extreme"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "random":
        a = rng.integers(0, 2**64, (rows, w), dtype=U64, endpoint=False)
    elif kind == "ties":
        a = rng.integers(0, 4, (rows, w), dtype=U64)
        if rows > 1:
            a[rows // 2 :] = a[: rows - rows // 2]
    elif kind == "sparse":
        a = np.zeros((rows, w), dtype=U64)
        for _ in range(rng.integers(0, 3 * max(rows, 1))):
            if rows:
                i, j, b = rng.integers(0, rows), rng.integers(0, w), rng.integers(0, 64)
                a[i, j] |= np.uint64(1) << np.uint64(b)
    else:
        a = np.where(rng.random((rows, w)) < 0.5, U64(0), ALL_ONES).astype(U64)
    if bits is not None and rows:
        a[:, -1] &= tail_mask(bits)
    return a


@st.composite
def masks(draw, nq: int, w: int):
    """None, one mask [W] or [1, W], or one per query [Q, W] (random, all ones or all zero)."""
    form = draw(st.sampled_from(["none", "1d", "row", "per-query"]))
    if form == "none":
        return None
    rows = nq if form == "per-query" else 1
    fill = draw(st.sampled_from(["random", "random", "ones", "zeros"]))
    if fill == "random":
        m = draw(words_arrays(rows, w))
    elif fill == "ones":
        m = np.full((rows, w), ALL_ONES, dtype=U64)
    else:
        m = np.zeros((rows, w), dtype=U64)
    return m[0] if form == "1d" else m


def as_kind(a: np.ndarray | None, kind: str):
    """The same 64-bit words as np.uint64, np.int64, torch.int64 or torch.uint64."""
    if a is None:
        return None
    a = np.ascontiguousarray(a, dtype=U64)
    if kind == "np.uint64":
        return a
    if kind == "np.int64":
        return a.view(np.int64)
    t = torch.from_numpy(a.view(np.int64).copy())
    return t.view(torch.uint64) if kind == "torch.uint64" else t


WORD_KINDS = ["np.uint64", "np.int64", "torch.int64", "torch.uint64"]


def to_np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype == torch.uint64:
            a = a.view(torch.int64)
        return a.numpy()
    return np.asarray(a)


def to_u64(a) -> np.ndarray:
    """Words of any accepted kind as np.uint64 (bits reinterpreted)."""
    a = to_np(a)
    return a.view(U64) if a.dtype in (np.int64, np.uint64) else a.astype(U64)


#: relaxed-code values used by the float properties: multiples of 1/64 in [-1, 1] (exact in
#: every float dtype, includes 0 and ±1, so masked norms can be exactly zero)
GRID = st.integers(-64, 64).map(lambda v: v / 64.0)


@st.composite
def relaxed(draw, rows: int, length: int, signs: bool | None = None) -> np.ndarray:
    """float64 [rows, length] relaxed codes: ±1 signs or grid values (some zero rows)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    use_signs = draw(st.booleans()) if signs is None else signs
    if use_signs:
        return np.where(rng.random((rows, length)) < 0.5, -1.0, 1.0)
    a = rng.integers(-64, 65, (rows, length)) / 64.0
    if rows and draw(st.booleans()):
        a[rng.integers(0, rows)] = 0.0
    return a


# ----------------------------------------------------------------------------- float oracles


def cos64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity in float64, 0 where a norm is 0 (zero gradient there)."""
    nx2 = (x * x).sum(dim=1)
    ny2 = (y * y).sum(dim=1)
    nx = torch.sqrt(torch.where(nx2 > 0, nx2, torch.ones_like(nx2)))
    ny = torch.sqrt(torch.where(ny2 > 0, ny2, torch.ones_like(ny2)))
    ok = (nx2 > 0)[:, None] & (ny2 > 0)[None, :]
    s = (x @ y.T) / (nx[:, None] * ny[None, :])
    return torch.where(ok, s, torch.zeros_like(s))


def _masked_lse(logits: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
    """Row-wise log-sum-exp over the kept entries (every row keeps at least one)."""
    return torch.logsumexp(logits.masked_fill(~torch.from_numpy(keep), float("-inf")), dim=1)


def nt_xent_oracle(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-row NT-Xent [2B] in float64: ``-s[a, p(a)] + log sum_{b != a} exp(s[a, b])``."""
    b = z1.shape[0]
    z = torch.cat([z1, z2])
    s = cos64(z, z) / tau
    keep = np.array([[c != a for c in range(2 * b)] for a in range(2 * b)])
    partner = [(a + b) % (2 * b) for a in range(2 * b)]
    return _masked_lse(s, keep) - s[torch.arange(2 * b), torch.tensor(partner)]


def brcd_oracle(s, t, t2, table, c, c_aug, alpha: float, tau: float) -> torch.Tensor:
    """Per-row BRCD loss [2B] in float64; the kept negatives are listed by explicit loops.

    ``c``/``c_aug`` are lists (or None); ``table`` a float64 [C, L] tensor or None."""
    bsz, length = s.shape
    if table is None:
        m = torch.ones(bsz, length, dtype=torch.float64)
    elif c is None:
        m = table[0].expand(bsz, length)
    else:
        m = table[torch.tensor(c)]
    z = torch.cat([m * s, m * t2])
    g = cos64(z, z) / tau
    a_ind = (rowcos(s, t)) / tau
    alpha_k = torch.tensor(
        [alpha if c is None or c_aug[k] == c[k] else 1.0 for k in range(bsz)], dtype=torch.float64)
    pos = alpha_k * a_ind + (1 - alpha_k) * g[torch.arange(bsz), torch.arange(bsz) + bsz]
    pos2 = torch.cat([pos, pos])
    # column 0 holds the positive; columns 1.. the logits G[a, b] of the kept negatives
    keep = np.zeros((2 * bsz, 2 * bsz + 1), dtype=bool)
    keep[:, 0] = True
    for a in range(2 * bsz):
        k = a % bsz
        for col in range(2 * bsz):
            if col == a or col == (a + bsz) % (2 * bsz):
                continue
            if c is not None and (c[col] if col < bsz else c_aug[col - bsz]) == c[k]:
                continue
            keep[a, col + 1] = True
    return _masked_lse(torch.cat([pos2[:, None], g], dim=1), keep) - pos2


def rowcos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine ``cos(x_k, y_k)`` in float64 (0 where a norm is 0)."""
    nx2, ny2 = (x * x).sum(dim=1), (y * y).sum(dim=1)
    ok = (nx2 > 0) & (ny2 > 0)
    den = torch.sqrt(torch.where(ok, nx2 * ny2, torch.ones_like(nx2)))
    return torch.where(ok, (x * y).sum(dim=1) / den, torch.zeros_like(nx2))


def reduce64(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    return rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows


def assert_close_scaled(got, want, rel: float, name: str = "value") -> None:
    """``max |got - want| <= rel * max(1, max |want|)`` (the KERNELS.md form for gradients)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    if want.size == 0:
        return
    assert np.isfinite(got).all(), f"{name}: non-finite values {got}"
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:g} * {scale:.3g}"


def isclose_loss(got: float, want: float, rtol: float, atol: float) -> bool:
    return math.isfinite(got) and abs(got - want) <= atol + rtol * abs(want)
