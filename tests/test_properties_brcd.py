"""Properties of brcd: evaluate() equals a brute-force mAP oracle; the CLI parses or exits."""

import property_support as P  # noqa: I001  (registers the hypothesis profiles first)
from property_support import one_torch_thread  # noqa: F401  (module-scoped autouse fixture)

import contextlib
import io
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from brcd import cli
from brcd.config import config_to_dict, list_presets, load_config
from brcd.retrieval import evaluate

# ----------------------------------------------------------------------------- evaluate


def _eval_oracle(qb, db, ql, dl, topk, pk, radius):
    """Brute force over explicit Python loops: rank by (distance, index), then every metric."""
    nq, n = qb.shape[0], db.shape[0]
    length = qb.shape[1]
    k = min(topk, n)
    pk = sorted({min(x, n) for x in pk})
    ap_k, ap_all, p_k, p_r = [], [], [], []
    got_r = np.zeros((nq, length + 1))
    good_r = np.zeros((nq, length + 1))
    total_rel = np.zeros(nq)
    for i in range(nq):
        d = [int((qb[i] != db[j]).sum()) for j in range(n)]
        if ql.ndim == 1:
            rel = [bool(ql[i] == dl[j]) for j in range(n)]
        else:
            rel = [bool((ql[i] * dl[j]).sum() > 0) for j in range(n)]
        order = sorted(range(n), key=lambda j: (d[j], j))

        def ap(cut, order=order, rel=rel):
            hits, s = 0, 0.0
            for rank, j in enumerate(order[:cut], start=1):
                if rel[j]:
                    hits += 1
                    s += hits / rank
            return s / hits if hits else 0.0

        ap_k.append(ap(k))
        ap_all.append(ap(n))
        p_k.append([sum(rel[j] for j in order[:c]) / c for c in pk])
        within = [j for j in range(n) if d[j] <= radius]
        p_r.append(sum(rel[j] for j in within) / len(within) if within else 0.0)
        total_rel[i] = sum(rel)
        for r in range(length + 1):
            got_r[i, r] = sum(1 for j in range(n) if d[j] <= r)
            good_r[i, r] = sum(1 for j in range(n) if d[j] <= r and rel[j])
    has = total_rel > 0
    recall = (good_r[has] / total_rel[has, None]).mean(axis=0) if has.any() else np.zeros(
        length + 1)
    precision = []
    for r in range(length + 1):
        vals = [good_r[i, r] / got_r[i, r] for i in range(nq) if got_r[i, r] > 0]
        precision.append(float(np.mean(vals)) if vals else float("nan"))
    return {
        "topk": k, "map_at_k": float(np.mean(ap_k)), "map_all": float(np.mean(ap_all)),
        "precision_at": dict(zip(pk, np.mean(p_k, axis=0).tolist(), strict=True)),
        "p_at_r2": float(np.mean(p_r)), "pr_precision": precision,
        "pr_recall": recall.tolist(), "ap_at_k": np.array(ap_k),
    }


def _code_form(b: np.ndarray, form: str, bits: int):
    if form == "pm1":
        return np.where(b, 1.0, -1.0), None
    if form == "bool":
        return b, None
    if form == "int01":
        return b.astype(np.int32), None
    if form == "torch":
        return torch.from_numpy(np.where(b, 1.0, -1.0).astype(np.float32)), None
    return P.pack_oracle(b), bits  # "words"


@st.composite
def eval_case(draw):
    bits = draw(st.integers(1, 70))
    nq = draw(st.integers(1, 6))
    n = draw(st.integers(1, 30))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = draw(st.sampled_from([0.5, 0.05]))
    db = rng.random((n, bits)) < p
    qb = rng.random((nq, bits)) < p
    if draw(st.booleans()):  # queries that are database items: zero distances and ties
        qb[: min(nq, n)] = db[: min(nq, n)]
    classes = draw(st.integers(1, 4))
    if draw(st.booleans()):
        ql, dl = rng.integers(0, classes, nq), rng.integers(0, classes, n)
    else:
        ql = (rng.random((nq, classes)) < 0.4).astype(np.int64)
        dl = (rng.random((n, classes)) < 0.4).astype(np.int64)
    return bits, qb, db, ql, dl


@given(
    case=eval_case(), form=st.sampled_from(["pm1", "bool", "int01", "torch", "words"]),
    topk=st.integers(1, 40), pk=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    radius=st.integers(0, 8), block=st.sampled_from([1, 7, 64, 1 << 22]),
    map_all=st.booleans(),
)
def test_evaluate_equals_brute_force(case, form, topk, pk, radius, block, map_all):
    bits, qb, db, ql, dl = case
    q, qbits = _code_form(qb, form, bits)
    d, _ = _code_form(db, form, bits)
    got = evaluate(q, d, ql, dl, topk, bits=qbits, pk=tuple(pk), radius=radius,
                   map_all=map_all, block_entries=block)
    want = _eval_oracle(qb, db, ql, dl, topk, pk, radius)
    assert got.topk == want["topk"] and got.bits == bits
    assert got.num_queries == qb.shape[0] and got.num_db == db.shape[0]
    np.testing.assert_allclose(got.map_at_k, want["map_at_k"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.ap_at_k, want["ap_at_k"], rtol=1e-12, atol=1e-12)
    if map_all:
        np.testing.assert_allclose(got.map_all, want["map_all"], rtol=1e-12, atol=1e-12)
    else:
        assert np.isnan(got.map_all)
    assert sorted(got.precision_at) == sorted(want["precision_at"])
    for kk, v in want["precision_at"].items():
        np.testing.assert_allclose(got.precision_at[kk], v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.p_at_r2, want["p_at_r2"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.pr_recall, want["pr_recall"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.pr_precision, want["pr_precision"], rtol=1e-12, atol=1e-12)


@given(
    what=st.sampled_from(["labels-rows", "labels-float", "labels-ndim", "labels-mixed", "topk",
                          "pk", "radius", "bits-mismatch", "empty-db", "empty-q", "packed-no-bits",
                          "multi-hot-values", "labels-C", "block"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_evaluate_rejects_bad_input_cleanly(what, seed):
    rng = np.random.default_rng(seed)
    q = np.where(rng.random((3, 8)) < 0.5, 1.0, -1.0)
    d = np.where(rng.random((5, 8)) < 0.5, 1.0, -1.0)
    ql, dl = rng.integers(0, 3, 3), rng.integers(0, 3, 5)
    kw: dict = {}
    if what == "labels-rows":
        dl = dl[:4]
    elif what == "labels-float":
        ql = ql.astype(np.float64) + 0.5
    elif what == "labels-ndim":
        ql = ql.reshape(3, 1, 1)
    elif what == "labels-mixed":
        ql = np.eye(3, dtype=np.int64)
    elif what == "topk":
        kw["topk"] = [0, -1, 1.5, None, True][seed % 5]
    elif what == "pk":
        kw["pk"] = [(0,), (-3, 1), (1.5,)][seed % 3]
    elif what == "radius":
        kw["radius"] = [-1, 1.5, None, True][seed % 4]
    elif what == "bits-mismatch":
        d = np.ones((5, 9))
    elif what == "empty-db":
        d, dl = d[:0], dl[:0]
    elif what == "empty-q":
        q, ql = q[:0], ql[:0]
    elif what == "packed-no-bits":
        q = P.pack_oracle(q > 0)
    elif what == "multi-hot-values":
        ql, dl = np.full((3, 2), 2), np.ones((5, 2), np.int64)
    elif what == "labels-C":
        ql, dl = np.ones((3, 2), np.int64), np.ones((5, 3), np.int64)
    elif what == "block":
        kw["block_entries"] = [None, "x", [4]][seed % 3]  # (<= 0 means one query per block)
    note(f"{what}: {kw}")
    with pytest.raises(P.BAD_INPUT):
        evaluate(q, d, ql, dl, **kw)


# ----------------------------------------------------------------------------- the CLI


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + k + ".")
        else:
            yield prefix + k


CONFIG_KEYS = sorted(_flat(config_to_dict(load_config(None))))
COMMANDS = ["train-teacher", "build-masks", "distill", "evaluate", "encode"]
FLAGS = ["--config", "--set", "--bits", "--out", "--device", "--seed", "--threads", "--dataset",
         "--data-root", "--quiet", "--epochs", "--lr", "--batch-size", "--cache-views",
         "--model", "--image-size", "--teacher-weights", "--student-weights", "--compile",
         "--resume", "--teacher", "--clusters", "--choose-clusters", "--delta",
         "--mask-convention", "--method", "--alpha", "--no-mask", "--no-offset-positive",
         "--no-false-negative", "--kd-weight", "--student-seed", "--student", "--topk",
         "--sshp-only", "--json", "--checkpoint", "--split", "--output", "--bogus", "-x"]
YAML_VALUES = ["1", "0", "-3", "2.5", "nan", "inf", "true", "null", "abc", "[1, 2]", "{a: 1}",
               "[", "{", ":", "'", "\"x", "- a", "&a b", "*a", "!!python/object:os.system",
               "1e400", "", " ", "%", "@", "`", "|", ">", "0x10", "10000000000000000000000"]
VALUES = ["1", "0", "-1", "16", "3.5", "nan", "inf", "abc", "", "cpu", "cuda:7", "auto",
          "fashion-mnist", "digits", "cifar10", "agree", "brcd", "2,4,8", "a,b", ",", "query",
          "=", "--", "-", "x=y", "1e999", "\x00"] + [f"{k}={v}" for k in ("bits", "seed")
                                                   for v in ("8", "x")]


@st.composite
def argv_tokens(draw, allow_demo: bool = True):
    cmds = COMMANDS + (["demo"] if allow_demo else []) + ["", "help", "Train-Teacher", "-h"]
    argv = [draw(st.sampled_from(cmds))] if draw(st.integers(0, 9)) else []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 9))
        if kind <= 3:
            argv += [draw(st.sampled_from(FLAGS)), draw(st.sampled_from(VALUES))]
        elif kind <= 6:
            key = draw(st.sampled_from(CONFIG_KEYS + ["nope", "data", "a..b", ".", "bits.x"]))
            argv += ["--set", f"{key}={draw(st.sampled_from(YAML_VALUES))}"]
        elif kind == 7:
            argv.append(draw(st.sampled_from(FLAGS)))
        elif kind == 8:
            argv += ["--config", draw(st.sampled_from(list_presets() + ["nope", "x.yaml"]))]
        else:
            argv.append(draw(st.text(max_size=6)))
    if allow_demo and argv and argv[0] == "demo":
        argv = argv[:1]  # demo's own parser runs the demo: only check that routing exists
    return argv


def _run(fn):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            res = fn()
        except SystemExit as exc:
            return ("exit", exc.code), out.getvalue(), err.getvalue()
    return ("ok", res), out.getvalue(), err.getvalue()


@given(argv=argv_tokens(allow_demo=False))
def test_cli_parser_parses_or_exits_cleanly(argv):
    """build_parser().parse_args on random flags: a Namespace, or SystemExit 0 (help) / 2 with
    an "error:" line; never another exception."""
    note(repr(argv))
    (how, val), out, err = _run(lambda: cli.build_parser().parse_args(argv))
    if how == "ok":
        assert val.cmd in COMMANDS
        return
    assert val in (0, 2), f"exit code {val!r}"
    assert "Traceback" not in err, err
    if val == 2:  # argparse's usage lines may come first; the error itself is one line
        assert "error: " in err.strip().splitlines()[-1], err


#: config values no run can use, which load_config must reject up front (as it already does for
#: bits <= 0, view_size <= 0, temperature <= 0, alpha outside [0, 1], n_clusters <= 0, ...) so
#: the CLI fails with its one-line error instead of deep inside a run
_NAN = float("nan")
_INF = float("inf")
BAD_CONFIG = {
    "topk": [0, -5], "bits": [0, -1], "temperature": [0, -0.3, _NAN, _INF],
    "distill.alpha": [-0.1, 1.5, _NAN], "masks.n_clusters": [0, -1],
    "teacher.train.batch_size": [0, -2], "student.train.lr": [0, -1.0, _NAN, _INF],
    "teacher.train.lr": [-1.0, _NAN], "teacher.model.image_size": [0, -1],
    "student.model.image_size": [0], "data.view_size": [0, -16], "masks.n_init": [0, -1],
    "kl_weight": [-1.0, _NAN], "distill.kd_weight": [-1.0, _NAN], "data.n_train": [0, -1],
    "data.n_query": [0, -1], "data.n_val": [-1], "data.test_fraction": [0.0, 1.0, 1.5, -0.1],
    "teacher.train.weight_decay": [-0.1, _NAN],
    "teacher.train.eval_every": [-1],  # 0 is valid: no validation
    "teacher.model.hidden": [0, -1], "masks.delta": [_NAN], "seed": [2**70],
}


@given(key=st.sampled_from(sorted(BAD_CONFIG)), data=st.data())
def test_config_rejects_values_no_run_can_use(key, data):
    value = data.draw(st.sampled_from(BAD_CONFIG[key]), label="value")
    with pytest.raises(P.BAD_INPUT):
        load_config(None, {key: value})


def _stub(cfg, args, progress):
    assert cfg.__class__.__name__ == "Config"


@given(argv=argv_tokens(allow_demo=False))
def test_cli_main_returns_or_fails_with_one_line_error(argv):
    """main(argv) with the stage handlers stubbed out: 0 for a valid configuration, or exit
    status 2 with ONE "error: ..." line (config/flag errors) or argparse's usage message;
    never a traceback."""
    note(repr(argv))
    stubs = {name: (stage, _stub) for name, (stage, _) in cli._COMMANDS.items()}
    with mock.patch.dict(cli._COMMANDS, stubs):
        (how, val), out, err = _run(lambda: cli.main(list(argv)))
    assert "Traceback" not in err, err
    if how == "exit":
        assert val in (0, 2), f"SystemExit({val!r})"
        if val == 2:
            assert "error: " in err.strip().splitlines()[-1], err
        return
    assert val in (0, 2), f"main returned {val!r}"
    if val == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr: {err!r}"
