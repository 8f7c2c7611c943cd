"""The BRCD ablation switches of issue 12: each variant changes exactly the term it names.

Every BRCD call goes through the single adapter ``brcd.losses.brcd_term``; it is monkeypatched
here to record its inputs while ``METHODS["brcd"].kd_loss`` runs on a small hand-made batch
(table passed through ``training_mask_table`` as the distill stage does). Numbers marked "by
hand" were worked out on paper from the batch below.
"""

import dataclasses
import math

import pytest
import torch

from brcd import cli, losses
from brcd.config import load_config
from brcd.losses import ABLATION_HELP, ABLATIONS, METHODS, KDBatch, brcd_diagnostics
from brcd.masks import (
    CONVENTIONS,
    ClusterMasks,
    assign_clusters,
    mask_table_from_centroids,
    training_mask_table,
)
from brcd.models import HashOutput

B, L, TAU = 6, 8, 0.3
CENTROIDS = torch.tensor([
    [0.9, 0.9, 0.9, 0.9, 0.2, -0.2, 0.9, 0.9],
    [-0.9, -0.9, 0.9, 0.9, 0.9, 0.9, -0.2, 0.2],
    [0.9, -0.9, -0.9, 0.2, -0.9, 0.2, 0.9, -0.9],
])
AGREE = torch.tensor([  # |mu| > 0.5, by hand
    [1, 1, 1, 1, 0, 0, 1, 1],
    [1, 1, 1, 1, 1, 1, 0, 0],
    [1, 1, 1, 0, 1, 0, 1, 1],
], dtype=torch.float32)
C_IDS = torch.tensor([0, 0, 1, 1, 2, 2])
C_HAT = torch.tensor([0, 1, 1, 1, 2, 0])  # offset positives at k = 1 and k = 5
FLIPS = [0, 1, 2, 0, 1, 3]  # s_k = t_k with its first FLIPS[k] bits flipped
COS_ST = [1 - 2 * f / L for f in FLIPS]  # cos(s_k, t_k) = 1 - 2 hamming / L
# negatives removed per row by hand: (#c_j == c_k) - 1 + (#ĉ_j == c_k) - [ĉ_k == c_k], with
# #c == (2, 2, 2) and #ĉ == (2, 3, 1) for clusters (0, 1, 2)
FN_REMOVED = [2, 3, 3, 3, 1, 2]
VARIANTS = [v for v in ABLATIONS if v != "full"]


def _sign(x):
    return torch.where(x >= 0, 1.0, -1.0)


def _out(codes):
    logits = codes.clone().requires_grad_(True)
    p = torch.sigmoid(logits)
    return HashOutput(logits, p, torch.where(p >= 0.5, 1.0, -1.0) + p - p.detach())


@pytest.fixture
def data():
    t = _sign(CENTROIDS[C_IDS]).clone()
    t[1::2, 7] *= -1  # view 1 not exactly the centroid's sign pattern for odd k
    t2 = _sign(CENTROIDS[C_HAT])
    s = t.clone()
    for k, f in enumerate(FLIPS):
        s[k, :f] *= -1
    s2 = t2.clone()
    s2[:, 0] *= -1
    masks = ClusterMasks(CENTROIDS, AGREE.clone(), C_IDS.clone(), torch.arange(B), 0.5, "agree",
                         {})
    assert torch.equal(mask_table_from_centroids(CENTROIDS, 0.5, "agree"), AGREE)
    assert assign_clusters(t2, CENTROIDS).tolist() == C_HAT.tolist()
    return s, s2, t, t2, masks


def _options(variant, **extra):
    return load_config(None, {**ABLATIONS[variant], **extra}).distill


def _batch(data, dc):
    s, s2, t, t2, masks = data
    return KDBatch(s1=_out(s), s2=_out(s2), t1=t, t2=t2, cluster_ids=C_IDS,
                   mask_table=training_mask_table(masks, dc.mask_convention),
                   centroids=masks.centroids, temperature=TAU, options=dc)


FIELDS = ("student", "t_same", "t_other", "table", "ids", "aug_ids", "alpha", "temperature")


@pytest.fixture
def recorder(monkeypatch):
    calls: list[dict] = []
    real = losses.brcd_term

    def record(*args, **kwargs):
        calls.append(dict(zip(FIELDS, args[:8], strict=True)))
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "brcd_term", record)
    return calls


def _run(data, recorder, variant, **extra):
    recorder.clear()
    b = _batch(data, _options(variant, **extra))
    loss = METHODS["brcd"].kd_loss(b)
    assert len(recorder) == (2 if extra.get("distill.symmetric") else 1)
    return loss, dict(recorder[0]), b


def _same(x, y):
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                and x.shape == y.shape and torch.equal(x.float(), y.float()))
    return x == y


def _removed_per_row(ids, aug_ids):
    """Negatives the false-negative rule removes from each of the 2B rows (BRCD_SPEC §4)."""
    n = ids.shape[0]
    col = torch.cat([ids, aug_ids]).tolist()
    out = []
    for a in range(2 * n):
        out.append(sum(1 for j in range(2 * n)
                       if j not in (a, (a + n) % (2 * n)) and col[j] == ids[a % n].item()))
    return out


def test_full_run_passes_the_stored_table_and_ids(data, recorder):
    _, rec, _ = _run(data, recorder, "full")
    assert torch.equal(rec["table"], AGREE)
    assert rec["ids"].tolist() == C_IDS.tolist() and rec["aug_ids"].tolist() == C_HAT.tolist()
    assert rec["alpha"] == 0.8 and rec["temperature"] == TAU
    assert _removed_per_row(rec["ids"], rec["aug_ids"]) == FN_REMOVED * 2


# the inputs of brcd_term each variant changes (everything else must equal the full run's)
CHANGED = {
    "no-mask": {"table"},
    "no-offset": {"aug_ids"},
    "no-false-negative": {"table", "ids", "aug_ids"},  # per-sample ids and mask rows
    "alpha-1": {"alpha"},
    "opposite-mask": {"table"},
    "zero-mask": {"table"},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_ablation_changes_exactly_the_input_it_names(data, recorder, variant):
    _, full, _ = _run(data, recorder, "full")
    _, rec, _ = _run(data, recorder, variant)
    assert {f for f in FIELDS if not _same(full[f], rec[f])} == CHANGED[variant]
    table, ids, aug = rec["table"], rec["ids"], rec["aug_ids"]
    if variant == "no-mask":
        assert table.shape == (3, L) and torch.all(table == 1)
    elif variant == "no-offset":
        assert torch.equal(aug, C_IDS)
    elif variant == "alpha-1":
        assert rec["alpha"] == 1.0
    elif variant == "opposite-mask":
        assert torch.equal(table, mask_table_from_centroids(CENTROIDS, 0.5, "redundant"))
        assert torch.equal(table, 1 - AGREE)
    elif variant == "zero-mask":
        assert table.shape == (3, L) and torch.all(table == 0)
    elif variant == "no-false-negative":
        # each row keeps the full run's mask row M[c_k], no negative is removed, and the
        # offset positives (alpha_k = 1) are exactly the full run's
        assert table.shape == (2 * B, L)
        assert torch.equal(table[ids], AGREE[C_IDS])
        assert _removed_per_row(ids, aug) == [0] * (2 * B)
        offsets = (C_HAT != C_IDS).tolist()
        assert (aug != ids).tolist() == (full["aug_ids"] != full["ids"]).tolist() == offsets


def test_the_registry_overrides_exactly_one_config_key():
    assert list(ABLATIONS) == ["full", "no-mask", "no-offset", "no-false-negative", "alpha-1",
                               "opposite-mask", "zero-mask"]
    assert list(ABLATION_HELP) == list(ABLATIONS) and all(ABLATION_HELP.values())
    base = dataclasses.asdict(_options("full"))
    assert base == dataclasses.asdict(load_config(None).distill)
    for v, ov in ABLATIONS.items():
        got = dataclasses.asdict(_options(v))
        diff = {f"distill.{k}": got[k] for k in got if got[k] != base[k]}
        assert diff == ov, v


def _explicit(s, t, t2, masks, c, c_hat, alpha, fn):
    """Per-row loops straight from BRCD_SPEC §3-5 in float64 (masks: per-sample rows)."""
    s, t, t2, masks = (x.double() for x in (s, t, t2, masks))
    z = [masks[k] * s[k] for k in range(B)] + [masks[k] * t2[k] for k in range(B)]

    def sim(a, b):
        den = float(z[a].norm() * z[b].norm())
        return 0.0 if den == 0 else float((z[a] * z[b]).sum()) / den

    cols = c + c_hat
    total = 0.0
    for a in range(2 * B):
        k = a % B
        ak = 1.0 if c_hat[k] != c[k] else alpha
        pos = ak * float(s[k] @ t[k] / (s[k].norm() * t[k].norm())) / TAU
        pos += (1 - ak) * sim(k, B + k) / TAU
        terms = [pos] + [sim(a, j) / TAU for j in range(2 * B)
                         if j not in (a, (a + B) % (2 * B)) and not (fn and cols[j] == c[k])]
        m = max(terms)
        total += -pos + m + math.log(sum(math.exp(x - m) for x in terms))
    return total / (2 * B)


@pytest.mark.parametrize("variant", list(ABLATIONS))
def test_each_variant_equals_the_spec_with_its_inputs(data, recorder, variant):
    s, _, t, t2, _ = data
    loss, _, _ = _run(data, recorder, variant)
    table = {"no-mask": torch.ones(3, L), "opposite-mask": 1 - AGREE,
             "zero-mask": torch.zeros(3, L)}.get(variant, AGREE)
    c_hat = C_IDS if variant == "no-offset" else C_HAT
    want = _explicit(s, t, t2, table[C_IDS], C_IDS.tolist(), c_hat.tolist(),
                     1.0 if variant == "alpha-1" else 0.8, variant != "no-false-negative")
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_zero_mask_loss_is_the_hand_formula_with_g_zero(data, recorder):
    loss, rec, b = _run(data, recorder, "zero-mask")
    s, _, _, t2, _ = data
    z = losses.masked_similarity(s, t2, (rec["table"], C_IDS), (rec["table"], C_IDS))
    assert torch.all(z == 0)  # every structural similarity, the positive pair's included
    # G = 0: P_k = alpha_k A_k and each kept negative contributes exp(0) = 1
    want = 0.0
    for k in range(B):
        ak = 1.0 if C_HAT[k] != C_IDS[k] else 0.8
        p = ak * COS_ST[k] / TAU
        want += -p + math.log(math.exp(p) + (2 * B - 2 - FN_REMOVED[k]))
    assert float(loss.detach()) == pytest.approx(want / B, rel=1e-6)
    assert b.parts["brcd_struct_pos"] == 0.0
    assert b.parts["brcd_fn_removed"] == pytest.approx(sum(FN_REMOVED) / B)  # still removed


def test_alpha_1_positives_are_the_individual_term(data, recorder):
    """alpha = 1: every positive is P_k = A_k = cos(s_k, t_k) / tau (offset or not); the
    negatives stay the masked structural similarities G with false negatives removed."""
    s, _, _, t2, _ = data
    loss, _, _ = _run(data, recorder, "alpha-1")
    a = torch.tensor(COS_ST, dtype=torch.float64) / TAU
    z = torch.cat([AGREE[C_IDS] * s, AGREE[C_IDS] * t2]).double()
    norms = z.norm(dim=1)
    g = (z @ z.T) / (norms[:, None] * norms[None, :]) / TAU
    cols = torch.cat([C_IDS, C_HAT])
    total = 0.0
    for r in range(2 * B):
        k = r % B
        keep = [j for j in range(2 * B) if j not in (r, (r + B) % (2 * B)) and cols[j] != C_IDS[k]]
        total += float(-a[k] + torch.logsumexp(torch.cat([a[k:k + 1], g[r, keep]]), 0))
    assert float(loss.detach()) == pytest.approx(total / (2 * B), rel=1e-5)


def _struct_by_bits(s, t2, masks):
    """(popcount(m) - 2 popcount((s XOR t') AND m)) / popcount(m), 0 for an empty m."""
    vals = []
    for k in range(B):
        m = masks[k].bool()
        n = int(m.sum())
        vals.append(0.0 if n == 0 else (n - 2 * int(((s[k] != t2[k]) & m).sum())) / n)
    return sum(vals) / B


@pytest.mark.parametrize("variant", list(ABLATIONS))
def test_diagnostics_equal_hand_counts(data, recorder, variant):
    s, _, _, t2, _ = data
    loss, _, b = _run(data, recorder, variant)
    p = b.parts
    assert set(p) == {"brcd_ind_pos", "brcd_struct_pos", "brcd_offset", "brcd_fn_removed"}
    assert all(type(v) is float for v in p.values())
    assert p["brcd_ind_pos"] == pytest.approx(17 / 24)  # mean of (1, .75, .5, 1, .75, .25)
    offset = {"no-offset": 0.0}.get(variant, 2 / 6)  # k = 1 and k = 5
    assert p["brcd_offset"] == pytest.approx(offset)
    # no-offset: ĉ = c, so each row removes (2 - 1) + (2 - 1) = 2; no-false-negative: none
    fn = {"no-offset": 2.0, "no-false-negative": 0.0}.get(variant, sum(FN_REMOVED) / B)
    assert p["brcd_fn_removed"] == pytest.approx(fn)
    table = {"no-mask": torch.ones(3, L), "opposite-mask": 1 - AGREE,
             "zero-mask": torch.zeros(3, L)}.get(variant, AGREE)
    assert p["brcd_struct_pos"] == pytest.approx(_struct_by_bits(s, t2, table[C_IDS]))
    # by hand (see the full-batch test): 8 bits unmasked: 1, 0, 1/2, 3/4, 3/4, 1/4; opposite
    # masks {4,5}, {6,7}, {3,5}: 1, 0, 1, 0, 1, 0; zero masks: 0
    hand = {"no-mask": 13 / 24, "opposite-mask": 0.5, "zero-mask": 0.0}.get(variant, 5 / 9)
    assert p["brcd_struct_pos"] == pytest.approx(hand)
    loss.backward()  # the diagnostics take nothing from the graph
    assert torch.isfinite(b.s1.logits.grad).all() and b.s1.logits.grad.abs().sum() > 0


def test_diagnostics_by_hand_on_the_full_batch(data, recorder):
    _, _, b = _run(data, recorder, "full")
    # s_k XOR t'_k, k = 0..5: {}, {1,5,6,7}, {0,1}, {7}, {0}, {0,4,5}; under the 6-bit masks
    # M[c_k] ({0,1,2,3,6,7} twice, {0..5} twice, {0,1,2,4,6,7} twice) 0, 3, 2, 0, 1, 2 differ:
    # (6 - 2 d) / 6 = 1, 0, 1/3, 1, 2/3, 1/3 -> mean 5/9
    assert b.parts["brcd_struct_pos"] == pytest.approx(5 / 9)
    assert b.parts["brcd_ind_pos"] == pytest.approx(17 / 24)
    assert b.parts["brcd_offset"] == pytest.approx(1 / 3)
    assert b.parts["brcd_fn_removed"] == pytest.approx(14 / 6)  # (2+3+3+3+1+2) / 6


def test_symmetric_parts_average_both_directions(data, recorder):
    s, s2, t, t2, _ = data
    loss, _, b = _run(data, recorder, "full", **{"distill.symmetric": True})
    d1 = brcd_diagnostics(s, t, t2, AGREE, C_IDS, assign_clusters(t2, CENTROIDS))
    d2 = brcd_diagnostics(s2, t2, t, AGREE, C_IDS, assign_clusters(t, CENTROIDS))
    for k in d1:
        assert b.parts[k] == pytest.approx(0.5 * (d1[k] + d2[k]))
    assert d1 != d2  # the two directions differ, so the average is a real check
    one = float(METHODS["brcd"].kd_loss(_batch(data, _options("full"))).detach())
    assert float(loss.detach()) != pytest.approx(one)


def test_kdbatch_parts_default_is_a_fresh_dict(data):
    b1, b2 = _batch(data, _options("full")), _batch(data, _options("full"))
    assert b1.parts == {} and b1.parts is not b2.parts


def test_training_mask_table_and_zero_convention():
    masks = ClusterMasks(CENTROIDS, AGREE.clone(), C_IDS, torch.arange(B), 0.5, "agree", {})
    assert training_mask_table(masks, None) is masks.mask_table
    assert torch.equal(training_mask_table(masks, "agree"), AGREE)
    assert torch.equal(training_mask_table(masks, "redundant"), 1 - AGREE)
    assert torch.equal(training_mask_table(masks, "none"), torch.ones(3, L))
    zero = training_mask_table(masks, "zero")
    assert zero.dtype == torch.float32 and zero.shape == (3, L) and not zero.any()
    assert "zero" in CONVENTIONS
    # the stored table wins over the centroids when convention is None (here it disagrees)
    other = ClusterMasks(CENTROIDS, 1 - AGREE, C_IDS, torch.arange(B), 0.5, "redundant", {})
    assert torch.equal(training_mask_table(other, None), 1 - AGREE)
    assert torch.equal(training_mask_table(other, "agree"), AGREE)
    with pytest.raises(ValueError, match="convention must be None .* got 'odd'"):
        training_mask_table(masks, "odd")


def test_config_validates_distill_mask_convention():
    assert load_config(None).distill.mask_convention is None
    for conv in CONVENTIONS:
        assert load_config(None, {"distill.mask_convention": conv}).distill.mask_convention == conv
    valid = r"\['agree', 'redundant', 'none', 'zero'\]"
    with pytest.raises(ValueError, match=rf"distill\.mask_convention must be null .*{valid}, "
                                         r"got 'odd'"):
        load_config(None, {"distill.mask_convention": "odd"})
    with pytest.raises(ValueError, match=r"distill\.mask_convention .* got 3"):
        load_config(None, {"distill.mask_convention": 3})
    with pytest.raises(ValueError, match=r"distill\.mask_convention .* got \['agree'\]"):
        load_config(None, {"distill.mask_convention": ["agree"]})


def _cli_overrides(*argv):
    args = cli.build_parser().parse_args(["distill", *argv])
    return cli._overrides(args, "student")


@pytest.mark.parametrize("variant", list(ABLATIONS))
def test_cli_ablation_flag_applies_the_registry(variant):
    assert _cli_overrides("--ablation", variant) == ABLATIONS[variant]
    cfg = load_config("digits", _cli_overrides("--ablation", variant))
    for key, value in ABLATIONS[variant].items():
        assert getattr(cfg.distill, key.split(".")[1]) == value


def test_cli_ablation_conflicts_and_mask_convention_flag(capsys):
    assert _cli_overrides("--distill-mask-convention", "zero") == {
        "distill.mask_convention": "zero"}
    assert _cli_overrides("--ablation", "no-mask", "--no-mask") == {"distill.use_mask": False}
    assert _cli_overrides("--ablation", "alpha-1", "--alpha", "1.0") == {"distill.alpha": 1.0}
    with pytest.raises(ValueError, match=r"--ablation alpha-1 sets distill\.alpha=1\.0"):
        _cli_overrides("--ablation", "alpha-1", "--alpha", "0.5")
    with pytest.raises(ValueError, match="distill.mask_convention='redundant'"):
        _cli_overrides("--ablation", "opposite-mask", "--distill-mask-convention", "agree")
    with pytest.raises(ValueError, match="needs distill.method brcd"):
        _cli_overrides("--ablation", "no-mask", "--method", "sp")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["distill", "--ablation", "bogus"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["distill", "--distill-mask-convention", "bogus"])
    capsys.readouterr()
    # a conflict is a one-line user error before anything runs
    assert cli.main(["distill", "--ablation", "alpha-1", "--set", "distill.alpha=0.5"]) == 2
    assert "--ablation alpha-1" in capsys.readouterr().err
