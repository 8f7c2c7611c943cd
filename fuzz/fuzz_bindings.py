"""Coverage-guided atheris target for the compiled bindings fasthash._C.topk / radius /
hamming_distances (arbitrary shapes, dtypes, layouts, values, k / r, num_threads, simd, mask)
and the multi-index hashing tables fasthash._C.MIHTables (bits, num_tables, galleries,
queries, masks, k / r, budget, give_up, threads). A query MIH reports done must have the exact
answer; one it reports not done (budget, give_up, too many masked-out bits) has none to check,
but with an unlimited budget, no give-up and no mask every query must be done.

Every input is classified by the bindings' contract (csrc/bindings.cpp docstrings): VALID inputs
must give exactly the numpy oracle's answer, INVALID ones must raise TypeError / ValueError, and
EITHER (an int64 or big-endian or misaligned array, a bool k, simd "auto") may do either, but an
accepted one must be exact. A violation is a *wrong answer*: it is counted, recorded (first few
in full, with the input's bytes) in FUZZ_WRONG_FILE as JSON lines, and fuzzing goes on. A crash
(signal, sanitizer report) or a hang (libFuzzer -timeout) stops libFuzzer, which writes the
input to its artifact prefix; fuzz/run.py restarts it and counts.

Run through fuzz/run.py, or by hand:

    PYTHONPATH=build/fuzz/tree python fuzz/fuzz_bindings.py -max_total_time=60 build/fuzz/corpus
    python fuzz/fuzz_bindings.py crash-<sha1>       # replay one input (prints the verdict)

With PYTHONPATH at a tree built by ``fuzz/build_ext.py --flags -fsanitize-coverage=...`` (what
fuzz/run.py does when clang is available) libFuzzer also sees the C++ code's coverage; the
extension is imported lazily, on the first input, after libFuzzer's core is loaded and its
coverage callbacks are made global, so its coverage counters register with it.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys

import atheris
import numpy as np

C = None
LEVELS: list[str] = []
WRONG_FILE = os.environ.get("FUZZ_WRONG_FILE")
KEEP_WRONG = int(os.environ.get("FUZZ_KEEP_WRONG", "20"))
_wrong_seen = 0

VALID, INVALID, EITHER = "valid", "invalid", "either"
MAX_WORDS = (1 << 20) // 64  # _C accepts codes of at most 2^20 bits


def _load() -> None:
    """Import fasthash._C once libFuzzer runs (see the module docstring)."""
    global C, LEVELS
    d = os.path.dirname(atheris.__file__)
    for f in os.listdir(d):
        if f.startswith("core_with_libfuzzer"):
            try:  # RTLD_NOLOAD: only promote the already-loaded core's symbols to global
                ctypes.CDLL(os.path.join(d, f), mode=os.RTLD_NOW | os.RTLD_GLOBAL | 4)
            except OSError:
                pass
    import fasthash._C as _C

    C = _C
    LEVELS = list(C.available_simd_levels())
    print(f"fuzz_bindings: fasthash._C from {C.__file__}; levels {LEVELS}", file=sys.stderr)


# ----------------------------------------------------------------------------- inputs


def _words(fdp, rows: int, w: int) -> np.ndarray:
    """uint64 [rows, w] from the fuzzer's bytes (random, few distinct values or extremes)."""
    mode = fdp.ConsumeIntInRange(0, 3)
    n = rows * w
    if mode == 0:
        raw = fdp.ConsumeBytes(8 * n)
        a = np.frombuffer(raw.ljust(8 * n, b"\0"), dtype="<u8").astype(np.uint64)
    elif mode == 1:  # ties: a few small values
        raw = fdp.ConsumeBytes(n)
        a = (np.frombuffer(raw.ljust(n, b"\0"), dtype=np.uint8) & 3).astype(np.uint64)
    elif mode == 2:  # extremes
        raw = fdp.ConsumeBytes(n)
        bits = np.frombuffer(raw.ljust(n, b"\0"), dtype=np.uint8) & 1
        a = np.where(bits == 1, np.uint64(2**64 - 1), np.uint64(0)).astype(np.uint64)
    else:  # one repeated word
        a = np.full(n, np.uint64(fdp.ConsumeIntInRange(0, 2**64 - 1)), dtype=np.uint64)
    return a.reshape(rows, w)


def _layout(fdp, a: np.ndarray, allow_1d: bool) -> tuple[object, str, str]:
    """(argument, verdict, description) for a uint64 [rows, w] array passed in some form."""
    choice = fdp.ConsumeIntInRange(0, 31)
    if choice < 16:
        return a, VALID, "c-uint64"
    if choice == 16:
        return a.view(np.int64), EITHER, "int64"
    if choice == 17:
        return a.astype(">u8"), EITHER, "big-endian"
    if choice == 18:  # misaligned but C-contiguous native uint64
        buf = np.zeros(a.size * 8 + 1, dtype=np.uint8)
        m = np.frombuffer(buf.data, dtype=np.uint64, count=a.size, offset=1).reshape(a.shape)
        m[...] = a
        return m, EITHER, "misaligned"
    if choice == 19:
        return np.repeat(a, 2, axis=0)[::2], (VALID if a.shape[0] <= 1 else INVALID), "strided"
    if choice == 20:
        f = np.asfortranarray(a)
        return f, (VALID if f.flags.c_contiguous else INVALID), "fortran"
    if choice == 21:
        return a.reshape(-1), (VALID if allow_1d else INVALID), "1-d"
    if choice == 22:
        return a.reshape(1, 1, *a.shape[-1:]) if a.ndim == 1 else a[None], INVALID, "3-d"
    if choice == 23:
        return np.uint64(5), INVALID, "0-d scalar"
    if choice == 24:
        return a.tolist(), INVALID, "list"
    if choice == 25:
        return None, (VALID if allow_1d else INVALID), "None"
    if choice == 26:
        return "words", INVALID, "str"
    dt = ["float64", "uint32", "uint8", "bool", "object"][choice - 27]
    return a.astype(dt), INVALID, dt


def _int(fdp, lo: int, hi: int) -> object:
    """Mostly an int in [lo, hi]; sometimes a boundary value or a non-int."""
    c = fdp.ConsumeIntInRange(0, 15)
    if c < 12:
        return fdp.ConsumeIntInRange(lo, hi)
    return [0, -1, 1024, 1025, 2**31 - 1, 2**31, 2**63 - 1, -(2**63), 2**64, True, 1.5, None,
            "3", np.int64(2)][fdp.ConsumeIntInRange(0, 13)]


def _simd(fdp) -> str:
    c = fdp.ConsumeIntInRange(0, 9)
    if c < 5:
        return ""
    if c < 8:
        return ["scalar", "avx2", "avx512"][c - 5]
    if c == 8:
        return ["auto", "AVX2", "sse", "\0", "scalar "][fdp.ConsumeIntInRange(0, 4)]
    return fdp.ConsumeUnicodeNoSurrogates(6)


class _Verdict:
    """The verdict of one call so far (VALID, then EITHER or INVALID as reasons arrive)."""

    def __init__(self) -> None:
        self.verdict, self.why = VALID, []

    def worse(self, v: str, reason: str) -> None:
        if v == INVALID:
            self.verdict = INVALID
        elif v == EITHER and self.verdict == VALID:
            self.verdict = EITHER
        if v != VALID:
            self.why.append(reason)


def _checked_int(v, lo: int, hi: int, name: str, worse) -> int | None:
    """The int an argument passes as, after noting its verdict (None: not an int)."""
    if isinstance(v, bool):
        worse(EITHER, f"{name} bool")
        v = int(v)
    if isinstance(v, np.integer):
        v = int(v)
    if not isinstance(v, int):
        worse(INVALID, f"{name} {type(v).__name__}")
        return None
    if v < lo or v > hi:
        worse(INVALID, f"{name}={v}")
    return v


def _too_many_probes(bits: int, tables, k, fn: str, x: np.ndarray, q: np.ndarray) -> bool:
    """Whether an unlimited MIH search could probe more than ~10^5 buckets: m tables of
    ceil(bits / m) bits probed to radius floor(R / m) + 1, R the radius searched (r, or the
    k-th smallest distance)."""
    tables, k = (int(v) if isinstance(v, (np.integer, bool)) else v for v in (tables, k))
    if not (isinstance(tables, int) and isinstance(k, int) and 1 <= tables <= bits) or \
            x.shape[1] != q.shape[1]:
        return False
    if fn == "mih_topk":
        if not (1 <= k <= len(x)) or len(q) == 0:
            return False
        radius = int(np.sort(_oracle_dist(q, x, None), axis=1)[:, k - 1].max())
    else:
        radius = k
    length, depth = -(-bits // tables), min(radius // tables + 1, -(-bits // tables))
    return tables * sum(math.comb(length, i) for i in range(depth + 1)) * max(1, len(q)) > 1e5


def make_mih_call(fdp) -> dict:
    """One MIHTables build + topk / radius call, and its verdict (csrc/bindings.cpp mih_new,
    mih_query; csrc/include/fasthash/mih.h: bits beyond ``bits`` must be zero)."""
    vd = _Verdict()
    worse = vd.worse
    fn = ["mih_topk", "mih_radius"][fdp.ConsumeIntInRange(0, 1)]
    # half the inputs take only well-formed arguments, so that most of them reach the search
    clean = fdp.ConsumeBool()
    layout = (lambda fdp, a, allow_1d: (a, VALID, "c-uint64")) if clean else _layout
    integer = (lambda fdp, lo, hi: fdp.ConsumeIntInRange(max(lo, 0), max(hi, 0))) if clean \
        else _int
    bits = integer(fdp, 1, 200)
    b = bits if isinstance(bits, int) and 1 <= bits <= 200 else fdp.ConsumeIntInRange(1, 200)
    w = (b + 63) // 64 if clean or fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeIntInRange(0, 4)
    n, nq = fdp.ConsumeIntInRange(int(clean), 80), fdp.ConsumeIntInRange(0, 6)
    x, q = _words(fdp, n, w), _words(fdp, nq, w)
    m_rows = [None, None, "1d", 1, nq, fdp.ConsumeIntInRange(0, 8)][
        fdp.ConsumeIntInRange(0, 4 if clean else 5)]
    m = None if m_rows is None else _words(fdp, 1 if m_rows == "1d" else m_rows, w)
    if m is not None and clean:  # mostly ones: a table may have <= 10 masked-out bits
        m = ~(m & _words(fdp, *m.shape) & _words(fdp, *m.shape))
    if m is not None and m_rows == "1d":
        m = m.reshape(-1)
    tail = not clean and fdp.ConsumeIntInRange(0, 15) == 0  # bits beyond `bits` kept: a broken
    # precondition (mih.h), so only a crash or a hang counts
    if not tail and w * 64 > b:
        keep = np.array([np.uint64(2**64 - 1) if 64 * (j + 1) <= b
                         else np.uint64((1 << max(0, b - 64 * j)) - 1) for j in range(w)],
                        dtype=np.uint64)
        x, q = x & keep, q & keep
        if m is not None:
            m = m & keep
    elif w * 64 > b:
        vd.why.append("bits beyond `bits` set: only a crash or a hang counts")
    xa, xv, xd = layout(fdp, x, allow_1d=False)
    qa, qv, qd = layout(fdp, q, allow_1d=False)
    ma, mv, md = (None, VALID, "None") if m is None else layout(fdp, m, allow_1d=True)
    tables = integer(fdp, -(-b // 64), b) if clean else _int(fdp, 0, b + 2)
    threads, qthreads = integer(fdp, -1, 8), integer(fdp, -1, 8)
    if fn == "mih_topk":
        k = integer(fdp, 1, n) if clean else _int(fdp, -2, n + 2)
    else:
        k = integer(fdp, 0, b + 2)
    # in scans of the gallery: one probe costs ~1500 / (N W) of them here (tiny galleries), so
    # the default (4 scans) leaves most queries not done, and 10^4..10^6 let them finish
    budget = [None, math.inf, math.inf, 1e4, 1e6, 1e-3, 0.0, -1.0, math.nan, "4"][
        fdp.ConsumeIntInRange(0, 5 if clean else 9)]
    give_up = [0.0, 0.0, 0.0, 0.5, 3.0][fdp.ConsumeIntInRange(0, 4)]
    if budget == math.inf and _too_many_probes(b, tables, k, fn, x, q):
        budget = None  # unlimited is documented to run practically forever on such a search
    worse(xv, f"gallery {xd}")
    worse(qv, f"queries {qd}")
    worse(mv, f"mask {md}")
    bv = _checked_int(bits, 1, 1 << 20, "bits", worse)
    if isinstance(xa, np.ndarray) and xa.ndim == 2 and bv is not None and \
            xa.shape[1] != (bv + 63) // 64:
        worse(INVALID, "gallery words != ceil(bits / 64)")
    tv = _checked_int(tables, 1, 2**31 - 1, "num_tables", worse)
    if tv is not None and bv is not None and (tv > bv or -(-bv // max(tv, 1)) > 64):
        worse(INVALID, f"num_tables={tv} for {bv} bits")
    _checked_int(threads, 0, C.MAX_THREADS, "num_threads", worse)
    _checked_int(qthreads, 0, C.MAX_THREADS, "query num_threads", worse)
    if isinstance(qa, np.ndarray) and qa.ndim == 2 and isinstance(xa, np.ndarray) and \
            xa.ndim == 2 and qa.shape[1] != xa.shape[1]:
        worse(INVALID, "queries words")
    qrows = qa.shape[0] if isinstance(qa, np.ndarray) and qa.ndim == 2 else -1
    if isinstance(ma, np.ndarray) and isinstance(xa, np.ndarray) and xa.ndim == 2 and \
            ma.ndim in (1, 2) and (ma.shape[-1] != xa.shape[1] or (
                ma.ndim == 2 and ma.shape[0] not in (1, qrows))):
        worse(INVALID, f"mask shape {ma.shape}")
    rows = xa.shape[0] if isinstance(xa, np.ndarray) and xa.ndim == 2 else n
    if fn == "mih_topk":
        _checked_int(k, 1, rows, "k", worse)
    else:
        _checked_int(k, 0, 2**63 - 1, "r", worse)
        if rows < 1:
            worse(INVALID, "empty tables")
    if isinstance(budget, str):
        worse(INVALID, "budget str")
    elif budget is not None and not budget > 0:
        worse(INVALID, f"budget={budget}")
    return {"fn": fn, "q": qa, "x": xa, "m": ma, "k": k, "threads": threads,
            "qthreads": qthreads, "bits": bits, "tables": tables, "budget": budget,
            "give_up": give_up, "simd": "", "verdict": vd.verdict, "why": vd.why,
            "unchecked": tail and w * 64 > b}


def make_call(data: bytes) -> dict:
    """Decode one fuzzer input into a call of _C and its verdict."""
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeIntInRange(0, 3) == 0:
        return make_mih_call(fdp)
    fn = ["topk", "radius", "hamming_distances"][fdp.ConsumeIntInRange(0, 2)]
    big = fdp.ConsumeIntInRange(0, 63) == 0
    w = fdp.ConsumeIntInRange(MAX_WORDS - 1, MAX_WORDS + 1) if big else fdp.ConsumeIntInRange(0, 6)
    nq = fdp.ConsumeIntInRange(0, 2 if big else 9)
    n = fdp.ConsumeIntInRange(0, 2 if big else 70)
    wx = w if fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeIntInRange(0, 7)
    q = _words(fdp, nq, w)
    x = _words(fdp, n, wx)
    mrows = [None, 1, nq, "1d"][fdp.ConsumeIntInRange(0, 3)]
    if fdp.ConsumeIntInRange(0, 15) == 0:
        mrows = fdp.ConsumeIntInRange(0, 12)
    mw = w if fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeIntInRange(0, 7)
    if mrows is None:
        m_arr = None
    else:
        m_arr = _words(fdp, 1 if mrows == "1d" else mrows, mw)
        if mrows == "1d":
            m_arr = m_arr.reshape(-1)
    qa, qv, qd = _layout(fdp, q, allow_1d=False)
    xa, xv, xd = _layout(fdp, x, allow_1d=False)
    if m_arr is None:
        ma, mv, md = None, VALID, "None"
    else:
        ma, mv, md = _layout(fdp, m_arr, allow_1d=True)
    k = _int(fdp, -2, n + 2)
    threads = _int(fdp, -1, 8)
    simd = _simd(fdp)

    # ---- the verdict, from the contract of csrc/bindings.cpp
    vd = _Verdict()
    worse = vd.worse

    worse(qv, f"queries {qd}")
    worse(xv, f"gallery {xd}")
    worse(mv, f"mask {md}")
    # shapes, from the arrays actually passed (a flattened mask may change its meaning)
    if isinstance(qa, np.ndarray) and qa.ndim == 2 and isinstance(xa, np.ndarray) and xa.ndim == 2:
        width = qa.shape[1]
        if width < 1:
            worse(INVALID, "no words")
        if width > MAX_WORDS:
            worse(INVALID, "more than 2^20 bits")
        if xa.shape[1] != width:
            worse(INVALID, "gallery width")
        if isinstance(ma, np.ndarray) and ma.ndim in (1, 2):
            if ma.shape[-1] != width or (ma.ndim == 2 and ma.shape[0] not in (1, qa.shape[0])):
                worse(INVALID, f"mask shape {ma.shape}")
    if fn == "topk":
        _checked_int(k, 1, n, "k", worse)
    elif fn == "radius":
        _checked_int(k, 0, 2**63 - 1, "r", worse)
    _checked_int(threads, 0, getattr(C, "MAX_THREADS", 2**31 - 1), "num_threads", worse)
    if fn in ("topk", "radius") and n < 1:
        worse(INVALID, "empty gallery")
    if simd == "auto":
        worse(EITHER, "simd auto")
    elif simd not in ("", *LEVELS):
        worse(INVALID, f"simd {simd!r}")
    return {"fn": fn, "q": qa, "x": xa, "m": ma, "k": k, "threads": threads, "simd": simd,
            "verdict": vd.verdict, "why": vd.why}


# ----------------------------------------------------------------------------- oracle


def _oracle_dist(q: np.ndarray, x: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    diff = q[:, None, :] ^ x[None, :, :]
    if m is not None:
        diff = diff & m.reshape(-1, q.shape[1])[:, None, :]
    if diff.size == 0:
        return np.zeros((q.shape[0], x.shape[0]), dtype=np.int64)
    return np.bitwise_count(diff).sum(axis=-1, dtype=np.int64)


def _vals(a) -> np.ndarray | None:
    """The uint64 values an accepted argument holds (int64: the same bits)."""
    if a is None:
        return None
    a = np.asarray(a)
    return a.view(np.uint64) if a.dtype == np.int64 else a.astype(np.uint64)


def _check(call: dict, out) -> str | None:
    """None if ``out`` is the exact answer, else what is wrong."""
    q, x, m = _vals(call["q"]), _vals(call["x"]), _vals(call["m"])
    d = _oracle_dist(q, x, m)
    fn = call["fn"]
    if fn == "hamming_distances":
        if not (isinstance(out, np.ndarray) and out.dtype == np.int32 and out.shape == d.shape):
            return f"distances: got {type(out).__name__} {getattr(out, 'dtype', '')} " \
                   f"{getattr(out, 'shape', '')}, want int32 {d.shape}"
        return None if np.array_equal(out, d) else "distances differ from popcount(xor & mask)"
    k = int(call["k"])
    order = np.argsort(d, axis=1, kind="stable")
    done = np.ones(len(d), dtype=bool)
    if fn.startswith("mih_"):
        done, stats = out[-2], out[-1]
        if done.dtype != np.bool_ or done.shape != (len(d),):
            return f"done: {done.dtype} {done.shape}"
        if stats["not_done"] != int((~done).sum()):
            return f"stats not_done {stats['not_done']} != {int((~done).sum())}"
        if call["budget"] == math.inf and call["give_up"] == 0 and call["m"] is None \
                and not done.all():
            return "a query was left undone with an unlimited budget and no mask"
    if fn in ("topk", "mih_topk"):  # the rows of done queries (all, for the scan)
        dd, ii = out[0], out[1]
        want_d = np.take_along_axis(d, order[:, :k], axis=1)
        if dd.dtype != np.int32 or ii.dtype != np.int64 or dd.shape != want_d.shape:
            return f"{fn}: dtypes/shape {dd.dtype} {ii.dtype} {dd.shape} != {want_d.shape}"
        if not np.array_equal(dd[done], want_d[done]):
            return f"{fn} distances differ from the stable argsort"
        if not np.array_equal(ii[done], order[done, :k]):
            return f"{fn} indices differ from the stable argsort (ties by index)"
        return None
    lims, dd, ii = out[0], out[1], out[2]
    want_l, want_d, want_i = [0], [], []
    for row, o, ok in zip(d, order, done, strict=True):
        keep = o[row[o] <= k] if ok else o[:0]  # a query MIH did not finish has no results
        want_d += row[keep].tolist()
        want_i += keep.tolist()
        want_l.append(len(want_d))
    if lims.dtype != np.int64 or dd.dtype != np.int32 or ii.dtype != np.int64:
        return f"{fn} dtypes {lims.dtype} {dd.dtype} {ii.dtype}"
    if lims.tolist() != want_l:
        return f"{fn} lims differ"
    if dd.tolist() != want_d or ii.tolist() != want_i:
        return f"{fn} results differ from (distance, index) order"
    return None


def _call_mih(call: dict):
    t = C.MIHTables(call["x"], call["bits"], call["tables"], call["threads"])
    search = t.topk if call["fn"] == "mih_topk" else t.radius
    return search(call["q"], call["k"], call["m"], call["budget"], call["give_up"],
                  call["qthreads"])


def run_one(data: bytes) -> tuple[str, str | None, dict]:
    """Run one input; return (outcome, problem, call) with outcome ok | rejected | wrong."""
    if C is None:
        _load()
    call = make_call(data)
    fn = None if call["fn"].startswith("mih_") else getattr(C, call["fn"])
    try:
        if fn is None:
            out = _call_mih(call)
        elif call["fn"] == "hamming_distances":
            out = fn(call["q"], call["x"], call["m"], call["threads"], call["simd"])
        else:
            out = fn(call["q"], call["x"], call["k"], call["m"], call["threads"], call["simd"])
    except (TypeError, ValueError) as exc:
        if call["verdict"] == VALID:
            return "wrong", f"rejected a valid input: {type(exc).__name__}: {exc}", call
        return "rejected", None, call
    except Exception as exc:  # noqa: BLE001 - any other exception is a defect
        return "wrong", f"unexpected {type(exc).__name__}: {exc}", call
    if call["verdict"] == INVALID:
        return "wrong", f"accepted an invalid input ({'; '.join(call['why'])})", call
    if call.get("unchecked"):  # the input broke a documented precondition: any answer goes
        return "ok", None, call
    problem = _check(call, out)
    return ("wrong", problem, call) if problem else ("ok", None, call)


def _describe(call: dict) -> dict:
    def short(a):
        if isinstance(a, np.ndarray):
            return f"ndarray {a.dtype.str} {a.shape} c={a.flags.c_contiguous} " \
                   f"aligned={a.flags.aligned}"
        return repr(a)[:80]

    extra = {k: repr(call[k]) for k in ("bits", "tables", "qthreads", "budget", "give_up")
             if k in call}
    return {**extra, "fn": call["fn"], "queries": short(call["q"]), "gallery": short(call["x"]),
            "mask": short(call["m"]), "k_or_r": repr(call["k"]), "num_threads":
            repr(call["threads"]), "simd": repr(call["simd"]), "verdict": call["verdict"],
            "why": call["why"]}


def test_one_input(data: bytes) -> None:
    global _wrong_seen
    outcome, problem, call = run_one(data)
    if outcome != "wrong":
        return
    _wrong_seen += 1
    if WRONG_FILE:
        rec = {"problem": problem, "call": _describe(call)}
        if _wrong_seen <= KEEP_WRONG:
            rec["input_hex"] = data.hex()
        with open(WRONG_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")


def main() -> None:
    args = sys.argv
    replay = [a for a in args[1:] if not a.startswith("-") and os.path.isfile(a)]
    if replay and os.environ.get("FUZZ_REPLAY", "1") == "1" and len(replay) == len(args) - 1:
        for path in replay:  # replay mode: print each input's verdict
            outcome, problem, call = run_one(open(path, "rb").read())
            print(json.dumps({"input": path, "outcome": outcome, "problem": problem,
                              "call": _describe(call)}))
        return
    # Python-level coverage of the input decoding and the checks, so that libFuzzer also
    # explores the argument space when the extension carries no coverage (no clang build)
    g = globals()
    for name in ("make_call", "make_mih_call", "_words", "_layout", "_int", "_simd",
                 "_checked_int", "_check", "run_one"):
        g[name] = atheris.instrument_func(g[name])
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
