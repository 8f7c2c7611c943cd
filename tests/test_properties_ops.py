"""Properties of the fused float ops: similarity, NT-Xent and BRCD equal float64 oracles."""

# Tolerances (shared/KERNELS.md, CPU fp32 path): loss / similarity atol = rtol = 1e-5; gradients
# max-abs error <= 1e-5 * max(max|g|, floor). float64 inputs: 1e-10. fp16 / bf16 inputs are
# computed in fp32 but their gradients are rounded to the input dtype: 1e-2 (the bf16 rule).
# floor = max(1, max|w| * amp / τ) for the losses (amp = 1 / the smallest non-zero row norm,
# masked or not; w = grad_output): where the exact gradient vanishes (B = 1, or every negative
# removed as a false negative: the loss is identically 0) the fixed-shift LSE error that
# KERNELS.md accepts (<= 2.5e-6), times the normalisation's 1/|row| and 1/τ, is the noise floor.
import property_support as P  # noqa: I001  (registers the hypothesis profiles first)
from property_support import one_torch_thread  # noqa: F401  (module-scoped autouse fixture)

import math

import numpy as np
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from fasthash import brcd_contrastive_loss, masked_hamming_similarity, nt_xent_loss

DTYPES = st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16,
                          torch.bfloat16])
REDUCTIONS = st.sampled_from(["mean", "sum", "none"])
TAU = st.floats(0.05, 2.0, allow_nan=False)


def _tol(dtype):
    """(value rtol = atol, gradient tolerance relative to max|g|) for an input dtype."""
    if dtype == torch.float64:
        return 1e-10, 1e-10
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-5, 1e-2
    return 1e-5, 1e-5


def _t(a: np.ndarray, dtype, grad: bool = True) -> torch.Tensor:
    return torch.tensor(a, dtype=dtype).requires_grad_(grad)


def _f64(t: torch.Tensor) -> torch.Tensor:
    """The exact float64 copy of an input (grid values are exact in every dtype)."""
    return t.detach().to(torch.float64).requires_grad_(True)


def _backward_weighted(out: torch.Tensor, ref: torch.Tensor, data) -> torch.Tensor:
    """Backward of both losses under the same drawn output weights ``w`` (grad_output != 1)."""
    w = torch.tensor(data.draw(P.relaxed(1, ref.numel(), signs=False), label="w")).reshape(
        ref.shape)
    (out * w.to(out.dtype)).sum().backward()
    (ref * w).sum().backward()
    return w


def _assert_values(got: torch.Tensor, want: torch.Tensor, tol: float, name: str) -> None:
    g = got.detach().to(torch.float64).numpy()
    w = want.detach().numpy()
    assert g.shape == w.shape, f"{name}: shape {g.shape} != {w.shape}"
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=name)


def _amp(*rows: torch.Tensor) -> float:
    """1 / the smallest non-zero row norm of the given [R, L] tensors."""
    norms = torch.cat([r.detach().to(torch.float64).norm(dim=1) for r in rows])
    norms = norms[norms > 0]
    return 1.0 / float(norms.min()) if norms.numel() else 1.0


def _assert_grad(got: torch.Tensor | None, want: torch.Tensor | None, dtype, tol: float,
                 name: str, floor: float = 1.0) -> None:
    assert got is not None, f"{name}: no gradient"
    assert got.dtype == dtype, f"{name}: gradient dtype {got.dtype} != input dtype {dtype}"
    w = np.zeros(got.shape) if want is None else want.numpy()
    g = got.to(torch.float64).numpy()
    assert np.isfinite(g).all(), f"{name}: non-finite gradient"
    scale = max(float(np.abs(w).max()) if w.size else 0.0, floor)
    err = float(np.abs(g - w).max()) if w.size else 0.0
    assert err <= tol * scale, f"{name}: gradient error {err:.3g} > {tol:g} * max|g| {scale:.3g}"


# ----------------------------------------------------------------------------- similarity


@st.composite
def sim_mask(draw, rows: int, length: int):
    """(argument for fasthash, float64 [rows, L] expanded mask or None)."""
    form = draw(st.sampled_from(["none", "dense", "table"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = draw(st.sampled_from([0.5, 0.9, 0.0, 1.0]))
    if form == "none":
        return None, None
    if form == "dense":
        m = (rng.random((rows, length)) < p).astype(np.float64)
        mdt = draw(st.sampled_from([torch.float32, torch.int64, torch.bool, torch.float64]))
        return torch.tensor(m).to(mdt), torch.tensor(m)
    c = draw(st.integers(1, 4))
    table = (rng.random((c, length)) < p).astype(np.float64)
    ids = rng.integers(0, c, rows)
    idt = draw(st.sampled_from([torch.int64, torch.int32]))
    arg = (torch.tensor(table, dtype=torch.float32), torch.tensor(ids, dtype=idt))
    return arg, torch.tensor(table[ids])


@given(
    n=st.integers(1, 9), m=st.integers(1, 9), length=st.integers(1, 70), dtype=DTYPES,
    normalize=st.booleans(), data=st.data(),
)
def test_masked_similarity_equals_float64_oracle(n, m, length, dtype, normalize, data):
    x = _t(data.draw(P.relaxed(n, length), label="x"), dtype)
    y = _t(data.draw(P.relaxed(m, length), label="y"), dtype)
    mx_arg, mx = data.draw(sim_mask(n, length), label="mask_x")
    my_arg, my = data.draw(sim_mask(m, length), label="mask_y")
    out = masked_hamming_similarity(x, y, mx_arg, my_arg, normalize=normalize)
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == want_dtype and out.shape == (n, m)

    x64, y64 = _f64(x), _f64(y)
    xm = x64 if mx is None else x64 * mx
    ym = y64 if my is None else y64 * my
    ref = P.cos64(xm, ym) if normalize else xm @ ym.T
    vtol, gtol = _tol(dtype)
    scale = 1.0 if normalize else max(1.0, float(ref.detach().abs().max()))
    _assert_values(out / scale, ref / scale, vtol, "similarity")

    g = torch.tensor(data.draw(P.relaxed(n, m, signs=False), label="grad_output"))
    (out * g.to(out.dtype)).sum().backward()
    (ref * g).sum().backward()
    _assert_grad(x.grad, x64.grad, dtype, gtol, "dS/dx")
    _assert_grad(y.grad, y64.grad, dtype, gtol, "dS/dy")
    if mx is not None:  # masked-out bits get exactly zero gradient
        assert (x.grad[mx == 0] == 0).all(), "gradient leaks into masked-out bits of x"
    if my is not None:
        assert (y.grad[my == 0] == 0).all(), "gradient leaks into masked-out bits of y"


# ----------------------------------------------------------------------------- NT-Xent


@given(
    b=st.integers(1, 8), length=st.integers(1, 48), dtype=DTYPES, tau=TAU,
    reduction=REDUCTIONS, data=st.data(),
)
def test_nt_xent_equals_float64_oracle(b, length, dtype, tau, reduction, data):
    z1 = _t(data.draw(P.relaxed(b, length), label="z1"), dtype)
    z2 = _t(data.draw(P.relaxed(b, length), label="z2"), dtype)
    out = nt_xent_loss(z1, z2, tau, reduction=reduction)
    a1, a2 = _f64(z1), _f64(z2)
    ref = P.reduce64(P.nt_xent_oracle(a1, a2, tau), reduction)
    vtol, gtol = _tol(dtype)
    _assert_values(out, ref, vtol, f"nt_xent ({reduction})")
    w = _backward_weighted(out, ref, data)
    floor = max(1.0, float(w.abs().max()) * _amp(a1, a2) / tau)
    _assert_grad(z1.grad, a1.grad, dtype, gtol, "dL/dz1", floor)
    _assert_grad(z2.grad, a2.grad, dtype, gtol, "dL/dz2", floor)


@given(b=st.integers(1, 6), length=st.integers(1, 32), tau=st.floats(0.002, 0.05),
       data=st.data())
def test_nt_xent_is_finite_and_accurate_at_small_temperatures(b, length, tau, data):
    """Logits up to 1/τ = 500: exp overflows float32 unless the log-sum-exp is shifted."""
    z1 = _t(data.draw(P.relaxed(b, length, signs=True), label="z1"), torch.float32)
    z2 = _t(data.draw(P.relaxed(b, length, signs=True), label="z2"), torch.float32)
    out = nt_xent_loss(z1, z2, tau)
    ref = P.nt_xent_oracle(_f64(z1), _f64(z2), tau).mean()
    assert math.isfinite(out.item()), f"loss {out.item()} at τ={tau}"
    # float32 cosines carry ~1e-7 relative error, amplified by 1/τ in every logit
    assert abs(out.item() - ref.item()) <= 1e-5 + 1e-5 * abs(ref.item()) + 1e-6 / tau
    out.backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


# ----------------------------------------------------------------------------- BRCD


@st.composite
def brcd_case(draw):
    b = draw(st.integers(1, 7))
    length = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = draw(P.relaxed(b, length))
    t = draw(P.relaxed(b, length))
    t2 = draw(P.relaxed(b, length))
    form = draw(st.sampled_from(["none", "table-1", "clusters", "clusters+aug", "ids-no-table"]))
    table = c = c_aug = None
    if form != "none" and form != "ids-no-table":
        rows = 1 if form == "table-1" else draw(st.integers(1, 4))
        p = draw(st.sampled_from([0.6, 0.9, 1.0, 0.0]))
        table = (rng.random((rows, length)) < p).astype(np.float64)
    if form in ("clusters", "clusters+aug", "ids-no-table"):
        n_c = table.shape[0] if table is not None else draw(st.integers(1, 4))
        c = rng.integers(0, n_c, b).tolist()
        c_aug = rng.integers(0, n_c, b).tolist() if form == "clusters+aug" else None
    alpha = draw(st.sampled_from([0.0, 1.0, 0.8, 0.5]) | st.floats(0, 1))
    return s, t, t2, table, c, c_aug, alpha


@given(case=brcd_case(), dtype=DTYPES, tau=TAU, reduction=REDUCTIONS,
       detach=st.booleans(), data=st.data())
def test_brcd_loss_equals_float64_oracle(case, dtype, tau, reduction, detach, data):
    s_np, t_np, t2_np, table, c, c_aug, alpha = case
    s, t, t2 = _t(s_np, dtype), _t(t_np, dtype), _t(t2_np, dtype)
    kw = {}
    if table is not None:
        kw["mask_table"] = torch.tensor(table, dtype=data.draw(
            st.sampled_from([torch.float32, torch.int64, torch.bool]), label="table dtype"))
    if c is not None:
        idt = data.draw(st.sampled_from([torch.int64, torch.int32]), label="ids dtype")
        kw["cluster_ids"] = torch.tensor(c, dtype=idt)
        if c_aug is not None:
            kw["aug_cluster_ids"] = torch.tensor(c_aug, dtype=idt)
    out = brcd_contrastive_loss(s, t, t2, alpha=alpha, temperature=tau, reduction=reduction,
                                detach_teacher=detach, **kw)
    s64, t64, t264 = _f64(s), _f64(t), _f64(t2)
    tab = None if table is None else torch.tensor(table)
    ca = c_aug if c_aug is not None else c
    ref = P.reduce64(P.brcd_oracle(s64, t64, t264, tab, c, ca, alpha, tau), reduction)
    vtol, gtol = _tol(dtype)
    _assert_values(out, ref, vtol, f"brcd ({reduction})")
    w = _backward_weighted(out, ref, data)
    mrows = [] if tab is None else [tab[torch.tensor(c)] if c is not None else tab[:1]]
    amp = _amp(s64, t64, t264, *(r * x for r in mrows for x in (s64, t264)))
    floor = max(1.0, float(w.abs().max()) * amp / tau)
    _assert_grad(s.grad, s64.grad, dtype, gtol, "dL/dstudent", floor)
    if detach:
        assert t.grad is None and t2.grad is None, "teacher got a gradient with detach_teacher"
    else:
        _assert_grad(t.grad, t64.grad, dtype, gtol, "dL/dteacher_same", floor)
        _assert_grad(t2.grad, t264.grad, dtype, gtol, "dL/dteacher_other", floor)


# ----------------------------------------------------------------------------- invalid input


def _bad_tensor(draw, good: torch.Tensor) -> object:
    how = draw(st.sampled_from(
        ["int", "bool", "complex", "nan", "inf", "1d", "3d", "no-rows", "no-bits", "numpy",
         "list", "none", "wrong-L"]))
    if how == "int":
        return good.to(torch.int64)
    if how == "bool":
        return good > 0
    if how == "complex":
        return good.to(torch.complex64)
    if how in ("nan", "inf"):
        bad = good.detach().clone()
        bad[0, 0] = float("nan") if how == "nan" else float("inf")
        return bad
    if how == "1d":
        return good[0]
    if how == "3d":
        return good[None]
    if how == "no-rows":
        return good[:0]
    if how == "no-bits":
        return good[:, :0]
    if how == "numpy":
        return good.detach().numpy()
    if how == "list":
        return good.tolist()
    if how == "none":
        return None
    return torch.cat([good, good], dim=1)  # wrong-L


BAD_TAU = st.sampled_from([0.0, -0.3, float("nan"), float("inf"), "0.3", True, None, -1e-9,
                           complex(1, 0)])
BAD_REDUCTION = st.sampled_from(["avg", "", "MEAN", None, 1, "none "])


@given(
    fn=st.sampled_from(["similarity", "nt_xent", "brcd"]),
    what=st.sampled_from(["first", "second", "third", "tau", "alpha", "reduction", "mask",
                          "ids", "aug-ids", "normalize", "rows"]),
    b=st.integers(1, 5), length=st.integers(1, 20), data=st.data(),
)
def test_fused_ops_reject_bad_input_cleanly(fn, what, b, length, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    codes = [torch.tensor(rng.integers(-64, 65, (b, length)) / 64.0, dtype=torch.float32)
             for _ in range(3)]
    if fn == "similarity" and what in ("third", "tau", "alpha", "reduction", "aug-ids"):
        what = "first"
    if fn == "nt_xent" and what in ("third", "alpha", "mask", "ids", "aug-ids", "normalize"):
        what = "second"
    if fn == "brcd" and what == "normalize":
        what = "alpha"
    args = list(codes)
    kw: dict = {}
    if what in ("first", "second", "third"):
        args[["first", "second", "third"].index(what)] = _bad_tensor(data.draw, codes[0])
    elif what == "rows":
        args[1] = torch.cat([codes[1], codes[1][:1]])  # B + 1 rows
        if fn == "similarity":  # any M is fine for similarity: break the mask rows instead
            kw["mask_y"] = torch.ones(b, length)
    elif what == "tau":
        kw["temperature"] = data.draw(BAD_TAU, label="tau")
    elif what == "alpha":
        kw["alpha"] = data.draw(st.sampled_from([-0.1, 1.5, float("nan"), "0.5", None, True]))
    elif what == "reduction":
        kw["reduction"] = data.draw(BAD_REDUCTION, label="reduction")
    elif what == "normalize":
        kw["normalize"] = data.draw(st.sampled_from([1, 0, "yes", None]), label="normalize")
    elif what == "mask":
        bad = data.draw(st.sampled_from(["values", "shape", "numpy", "empty-table"]))
        table = {
            "values": torch.full((2, length), 0.5),
            "shape": torch.ones(2, length + 1),
            "numpy": np.ones((2, length)),
            "empty-table": torch.ones(0, length),
        }[bad]
        if fn == "similarity":
            kw["mask_x"] = (table, torch.zeros(b, dtype=torch.int64)) if bad != "shape" else \
                torch.ones(b + 1, length)
        else:
            kw["mask_table"] = table
            kw["cluster_ids"] = torch.zeros(b, dtype=torch.int64)
    elif what in ("ids", "aug-ids"):
        bad = data.draw(st.sampled_from(["range", "negative", "float", "shape", "list"]))
        ids = {
            "range": torch.full((b,), 2, dtype=torch.int64),
            "negative": torch.full((b,), -1, dtype=torch.int64),
            "float": torch.zeros(b),
            "shape": torch.zeros(b + 1, dtype=torch.int64),
            "list": [0] * b,
        }[bad]
        table = torch.ones(2, length)
        if fn == "similarity":
            kw["mask_y"] = (table, ids)
        else:
            kw["mask_table"] = table
            good_ids = torch.zeros(b, dtype=torch.int64)
            kw["cluster_ids"] = ids if what == "ids" else good_ids
            if what == "aug-ids":
                kw["aug_cluster_ids"] = ids
    note(f"{fn}: bad {what}: {kw}")
    with pytest.raises(P.BAD_INPUT):
        if fn == "similarity":
            masked_hamming_similarity(args[0], args[1], **kw)
        elif fn == "nt_xent":
            nt_xent_loss(args[0], args[1], **kw)
        else:
            brcd_contrastive_loss(*args, **kw)
