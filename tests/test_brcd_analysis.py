"""The report's statistics on hand-computed numbers (paired-seed verdicts, best baseline,
ablation deltas, false-negative removals, checked against fasthash.reference too) and the
report's new sections rendered from a metrics dict, with and without the new keys."""

import copy
import math

import numpy as np
import pytest
import torch

from brcd import analysis, report
from fasthash.reference import brcd_loss_ref

# ---------------------------------------------------------------- paired verdicts

def test_paired_win_hand_computed():
    # diffs 0.01, 0.02, 0.03: mean 0.02, std 0.01, SE 0.01 / sqrt(3) = 0.005774, 2 SE = 0.01155
    r = analysis.paired_verdict([0.51, 0.62, 0.73], [0.50, 0.60, 0.70])
    assert r["n"] == 3
    assert r["diff_mean"] == pytest.approx(0.02, abs=1e-12)
    assert r["diff_std"] == pytest.approx(0.01, abs=1e-12)
    assert r["se"] == pytest.approx(0.0057735, abs=1e-7)
    assert r["verdict"] == "win"


def test_paired_loss_hand_computed():
    r = analysis.paired_verdict([0.50, 0.60, 0.70], [0.51, 0.62, 0.73])
    assert r["diff_mean"] == pytest.approx(-0.02, abs=1e-12)
    assert r["diff_std"] == pytest.approx(0.01, abs=1e-12)
    assert r["verdict"] == "loss"


def test_paired_tie_hand_computed():
    # diffs 0.01, -0.01, 0.03: mean 0.01, std sqrt((0 + 0.0004 + 0.0004) / 2) = 0.02,
    # SE 0.011547, 2 SE 0.023094 > 0.01
    r = analysis.paired_verdict([0.61, 0.59, 0.63], [0.60, 0.60, 0.60])
    assert r["diff_mean"] == pytest.approx(0.01, abs=1e-12)
    assert r["diff_std"] == pytest.approx(0.02, abs=1e-12)
    assert r["se"] == pytest.approx(0.011547, abs=1e-6)
    assert r["verdict"] == "tie"


def test_paired_rule_is_two_standard_errors_not_one():
    # diffs 0.02, 0.04, 0.00: mean 0.02 > SE 0.011547 but < 2 SE 0.023094
    r = analysis.paired_verdict([0.62, 0.64, 0.60], [0.60, 0.60, 0.60])
    assert r["se"] < r["diff_mean"] < 2 * r["se"]
    assert r["verdict"] == "tie"


def test_paired_identical_diffs_and_single_seed():
    r = analysis.paired_verdict([0.75, 0.5], [0.5, 0.25])  # exact in binary: std 0
    assert r == {"diff_mean": 0.25, "diff_std": 0.0, "se": 0.0, "n": 2, "verdict": "win"}
    r = analysis.paired_verdict([0.7], [0.6])
    assert r["n"] == 1 and r["verdict"] == "n/a"
    assert r["diff_std"] is None and r["se"] is None
    assert r["diff_mean"] == pytest.approx(0.1)


def test_paired_rejects_unpaired_input():
    with pytest.raises(ValueError, match="a and b must have the same length"):
        analysis.paired_verdict([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="at least one seed"):
        analysis.paired_verdict([], [])


def test_best_baseline_highest_mean_ties_by_order():
    col = {"none": [0.5, 0.5], "kd-codes": [0.5, 0.75], "sp": [0.625], "rkd": [],
           "brcd": [0.9]}
    assert analysis.best_baseline(col) == "kd-codes"  # 0.625 = 0.625: the earlier one
    assert analysis.best_baseline({k: col[k] for k in ("sp", "kd-codes", "brcd")}) == "sp"
    assert analysis.best_baseline({"none": [0.1], "sp": [0.3, 0.1], "brcd": [0.9]}) == "sp"
    assert analysis.best_baseline({"brcd": [0.9], "rkd": []}) is None


def _map_table():
    return {
        "32": {"none": {"sshp": [0.50, 0.50, 0.50], "ashp": [0.10, 0.10, 0.10]},
               "kd-codes": {"sshp": [0.60, 0.60, 0.60], "ashp": [0.70, 0.72, 0.74]},
               "brcd": {"sshp": [0.61, 0.59, 0.63], "ashp": [0.69, 0.70, 0.71]}},
        "16": {"none": {"sshp": [0.40], "ashp": [0.20]},
               "kd-codes": {"sshp": [0.45], "ashp": [0.30]},
               "brcd": {"sshp": [0.47], "ashp": []}},
    }


def test_paired_table_columns():
    t = analysis.paired_table(_map_table(), ["none", "kd-codes", "sp", "brcd"])
    s32, a32 = t["32"]["sshp"], t["32"]["ashp"]
    assert s32["best_baseline"] == "kd-codes" and s32["verdict"] == "tie"
    assert s32["diff_mean"] == pytest.approx(0.01) and s32["diff_std"] == pytest.approx(0.02)
    # ASHP diffs -0.01, -0.02, -0.03: mean -0.02, std 0.01 -> loss
    assert a32["best_baseline"] == "kd-codes" and a32["verdict"] == "loss"
    assert a32["diff_mean"] == pytest.approx(-0.02) and a32["diff_std"] == pytest.approx(0.01)
    assert t["16"]["sshp"]["verdict"] == "n/a" and t["16"]["sshp"]["n"] == 1
    assert "ashp" not in t["16"]  # BRCD has no ASHP value at 16 bits


def test_paired_table_pairs_the_seeds_both_ran():
    t = analysis.paired_table({"8": {"sp": {"sshp": [0.5, 0.6]},
                                     "brcd": {"sshp": [0.75, 0.85, 0.0]}}})
    r = t["8"]["sshp"]
    assert r["n"] == 2 and r["diff_mean"] == pytest.approx(0.25)


def test_ablation_paired_against_full():
    abl = {"32": {"full": {"sshp": [0.60, 0.62, 0.64], "ashp": [0.70, 0.70, 0.70]},
                  "no-mask": {"sshp": [0.59, 0.60, 0.61], "ashp": [0.71, 0.69, 0.73]},
                  "zero-mask": {"sshp": [], "ashp": [0.70, 0.70, 0.70]}}}
    r = analysis.ablation_paired(abl)["32"]
    assert set(r) == {"no-mask", "zero-mask"}
    nm = r["no-mask"]
    assert nm["sshp"]["reference"] == "full"
    # SSHP diffs -0.01, -0.02, -0.03 -> loss; ASHP diffs 0.01, -0.01, 0.03 -> tie
    assert nm["sshp"]["diff_mean"] == pytest.approx(-0.02) and nm["sshp"]["verdict"] == "loss"
    assert nm["ashp"]["diff_std"] == pytest.approx(0.02) and nm["ashp"]["verdict"] == "tie"
    assert set(r["zero-mask"]) == {"ashp"}
    assert r["zero-mask"]["ashp"]["diff_mean"] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- false negatives

def test_false_negative_counts_hand_example():
    # columns: student c = [0, 0, 1, 1], teacher ĉ = [0, 1, 1, 1]; row 1 (cluster 0, self col 1,
    # partner col 5) keeps cols 0 and 4 of cluster 0 among its 6 negatives -> 2 removed
    counts = analysis.false_negative_counts([0, 0, 1, 1], [0, 1, 1, 1])
    assert counts.tolist() == [1, 2, 3, 3, 1, 2, 3, 3]
    with pytest.raises(ValueError, match="cluster_ids and aug_cluster_ids"):
        analysis.false_negative_counts([0, 1], [0, 1, 1])


def test_false_negative_counts_match_the_reference_loss():
    # identical codes make every logit 1/tau, so a row's reference loss is log(1 + kept)
    rng = np.random.default_rng(3)
    bsz, length = 6, 8
    for _ in range(5):
        c = rng.integers(0, 3, size=bsz)
        c_aug = rng.integers(0, 3, size=bsz)
        codes = torch.ones(bsz, length, dtype=torch.float64)
        rows = brcd_loss_ref(codes, codes, codes, torch.ones(3, length), torch.as_tensor(c),
                             torch.as_tensor(c_aug), reduction="none")
        kept = torch.expm1(rows).round().long().numpy()
        removed = 2 * bsz - 2 - kept
        assert analysis.false_negative_counts(c, c_aug).tolist() == removed.tolist()


def test_false_negative_removals_hand_examples():
    # every view of an image has the same ĉ, and B = N: the draw cannot matter (2.25 per row)
    views = [[0, 0], [1, 1], [1, 1], [1, 1]]
    r = analysis.false_negative_removals([0, 0, 1, 1], views, batch_size=4, n_batches=3)
    assert r["per_row"] == pytest.approx(2.25) and r["share"] == pytest.approx(2.25 / 6)
    # c = [0, 0], ĉ of view 0 is 0 and of view 1 is 1: each row removes its other student column
    # and, with probability 1/2 (view 2 = view 0), the other teacher column: 1.5 of 2 expected
    r = analysis.false_negative_removals([0, 0], [[0, 1], [0, 1]], 2, 4000, seed=1)
    assert r["per_row"] == pytest.approx(1.5, abs=0.03)
    assert r["share"] == pytest.approx(0.75, abs=0.015)


def test_false_negative_removals_rejects_bad_arguments():
    with pytest.raises(ValueError, match="view_cluster_ids"):
        analysis.false_negative_removals([0, 1], [[0], [1]], 2, 1)
    with pytest.raises(ValueError, match="batch_size"):
        analysis.false_negative_removals([0, 1], [[0, 0], [1, 1]], 3, 1)
    with pytest.raises(ValueError, match="n_batches"):
        analysis.false_negative_removals([0, 1], [[0, 0], [1, 1]], 2, 0)


# ---------------------------------------------------------------- report rendering

def _old_metrics():
    return {
        "command": "python -m brcd demo", "dataset": "digits", "splits": "small", "wall_s": 60.0,
        "machine": "test", "threads": 1, "precision": "fp32", "student_params": 170000,
        "note": "", "topk": 50, "main_bits": 32, "seeds": 3, "bits": [16, 32],
        "methods": ["none", "kd-codes", "brcd"], "map": _map_table(),
        "options": {"workers": 1, "teacher_epochs": 1, "views": 2, "student_epochs": 2},
        "teacher": {"16": {"map": [0.5]}, "32": {"map": [0.8]}},
        "details": {"32": []}, "pr": {},
        "speed": {"encode": {"threads": 1, "batches": [1],
                             "teacher_bs1": {"ms_per_batch": 10, "images_per_s": 100},
                             "student_bs1": {"ms_per_batch": 1, "images_per_s": 1000},
                             "speedup_bs1": 10.0},
                  "search": {"bits": 32, "engine": "scan", "cases": []}},
        "clusters": {"16": {"n_clusters": 2, "bits_kept": [16, 16], "offset_share": 0.1},
                     "32": {"n_clusters": 2, "bits_kept": [20, 24], "offset_share": 0.25}},
        "phases": {"train": 1.0},
    }


def _new_metrics():
    m = _old_metrics()
    m["map_paper_student"] = copy.deepcopy(_map_table())
    m["students"] = {
        "tiny-cnn": {"label": "tiny-cnn (0.17M, 28 px, trained from scratch)", "params": 170000,
                     "speedup": {"1": 30.0, "32": 12.5, "256": 9.0}},
        "paper-student": {"label": "frozen Lite0 + MLP head (48 px)", "params": 3500000,
                          "trainable_params": 400000, "speedup": {"1": 2.5, "32": 1.8}}}
    m["ablation"] = {"32": {
        "full": m["map_paper_student"]["32"]["brcd"],
        "no-mask": {"sshp": [0.60, 0.57, 0.60], "ashp": [0.70, 0.71, 0.72]},
        "zero-mask": {"sshp": [0.61, 0.59, 0.63], "ashp": [0.69, 0.70, 0.71]}}}
    m["paired"] = {s: analysis.paired_table(m[k], m["methods"])
                   for s, k in analysis.STUDENT_MAPS.items()}
    m["ablation_paired"] = analysis.ablation_paired(m["ablation"])
    diag = {"32": {"isd": {"kd-codes": 0.10, "brcd": 0.15},
                   "nra": {"kd-codes": {"10": 0.5, "100": 0.6, "1000": 0.7},
                           "brcd": {"10": 0.4, "100": 0.45, "1000": 0.6}},
                   "loss_terms": {"brcd": {"first": {"ntxent": 4.9, "kd": 4.8,
                                                     "brcd_fn_removed": 11.0},
                                           "last": {"ntxent": 4.1, "kd": 3.2,
                                                    "brcd_fn_removed": 12.5}}}}}
    m["diagnosis"] = {"tiny-cnn": diag, "paper-student": copy.deepcopy(diag),
                      "clusters": {"32": {"offset_share": 0.25, "bits_kept": [20, 24],
                                          "fn_removed_per_row": 12.6,
                                          "fn_removed_share": 0.1}}}
    return m


def test_report_renders_the_new_sections(tmp_path):
    m = _new_metrics()
    text = report.write_report(tmp_path, m).read_text()
    # the verdict of every column, in words, with its numbers (tie: 0.01 ± 0.02, 2 SE 0.023)
    assert ("32 bits SSHP, paper-student: BRCD vs KD codes +0.010 ± 0.020 over 3 paired seeds: "
            "tie (2·SE = 0.023)") in text
    assert ("32 bits ASHP, tiny-cnn: BRCD vs KD codes -0.020 ± 0.010 over 3 paired seeds: "
            "loss (2·SE = 0.012)") in text
    assert "16 bits SSHP, tiny-cnn: BRCD vs KD codes +0.020 over 1 seed: n/a" in text
    assert "does NOT beat" not in text and "no clear win" not in text
    # students table with both speed-ups
    assert "| frozen Lite0 + MLP head (48 px) | 3.50M | 0.40M | **2.5x** | **1.8x** | – |" in text
    assert "| tiny-cnn (0.17M, 28 px, trained from scratch) | 0.17M | 0.17M | **30.0x**" in text
    assert "### Student frozen Lite0 + MLP head (48 px)" in text
    # ablation: no-mask SSHP diffs -0.01, -0.02, -0.03: mean -0.02, std 0.01 -> loss
    assert "| no bit mask | 0.590 ± 0.017 | -0.020 ± 0.010 | loss |" in text
    assert "| full BRCD | 0.610 ± 0.020 | – | – |" in text
    # diagnosis tables and paragraph, from the numbers
    assert "| BRCD | 0.150 | 0.400 | 0.450 | 0.600 |" in text
    assert "| BRCD | ntxent | 4.9000 | 4.1000 |" in text
    assert "| 32 | 25.0% | 22.0 (20–24) | 12.60 | 10.0% |" in text
    para = [p for p in analysis.diagnosis_text(m) if p.startswith("paper-student")][0]
    assert para in text
    for said in ("wins 0, ties 1 and loses 1 of 2 columns", "ISD 0.150 vs 0.100",
                 "NRA@100 0.450 vs 0.600", "farther from the teacher's than those of KD codes",
                 "25.0% of the augmented views", "removes 12.60 negatives per row (10.0%",
                 "keep 22.0 of 32 bits", "ntxent 4.900 → 4.100",
                 "brcd_fn_removed 11.000 → 12.500",
                 "no bit mask SSHP -0.020 ± 0.010 (worse than full)"):
        assert said in para, said
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    # without the precomputed "paired" keys the report computes the same verdicts
    m2 = copy.deepcopy(m)
    del m2["paired"], m2["ablation_paired"]
    assert report.write_report(tmp_path / "b", m2).read_text() == text


def test_diagnosis_leaves_out_sentences_without_numbers():
    m = _new_metrics()
    del m["diagnosis"]["paper-student"]["32"]["loss_terms"]
    del m["diagnosis"]["clusters"]["32"]["fn_removed_per_row"]
    para = [p for p in analysis.diagnosis_text(m) if p.startswith("paper-student")][0]
    assert "loss parts" not in para and "negatives per row" not in para
    assert "25.0% of the augmented views" in para  # the rest is still said
    # all ablations tie and BRCD wins everywhere: the words follow the numbers
    m["map_paper_student"]["32"]["brcd"] = {"sshp": [0.70, 0.71, 0.72],
                                            "ashp": [0.80, 0.82, 0.84]}
    m["ablation"]["32"] = {"full": {"sshp": [0.6, 0.6, 0.6]},
                           "no-mask": {"sshp": [0.61, 0.59, 0.60]}}
    del m["paired"], m["ablation_paired"]
    para = [p for p in analysis.diagnosis_text(m) if p.startswith("paper-student")][0]
    assert "wins 2, ties 0 and loses 0" in para and "does not win" not in para
    assert "every variant tested (1) ties with full BRCD" in para


def test_report_renders_old_metrics(tmp_path):
    text = report.write_report(tmp_path, _old_metrics()).read_text()
    for gone in ("## Students", "## Ablation", "## Diagnosis", "### Student frozen"):
        assert gone not in text
    assert "### Student tiny-cnn" in text and "## BRCD against the best baseline" in text
    assert "32 bits SSHP, tiny-cnn: BRCD vs KD codes +0.010 ± 0.020 over 3 paired seeds" in text
    assert "paper-student" not in text
    assert not (tmp_path / "ablation.png").exists()


def test_se_matches_its_definition():
    r = analysis.paired_verdict([0.3, 0.5, 0.4, 0.9], [0.2, 0.2, 0.2, 0.2])
    d = np.array([0.1, 0.3, 0.2, 0.7])
    assert r["se"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(4))


def test_map_is_tiny_cnn_only_when_it_ran():
    m = _new_metrics()
    assert analysis.student_map(m, "tiny-cnn") is m["map"]
    del m["students"]["tiny-cnn"], m["paired"]  # a paper-student-only run: "map" is its table
    assert analysis.student_map(m, "tiny-cnn") == {}
    assert analysis.paired_for(m, "tiny-cnn") == {}
    assert analysis.student_map(_old_metrics(), "tiny-cnn") == _map_table()


def test_false_negative_removals_takes_tensors():
    views = torch.tensor([[0, 0], [1, 1], [1, 1], [1, 1]])
    r = analysis.false_negative_removals(torch.tensor([0, 0, 1, 1]), views, 4, 2)
    assert r["per_row"] == pytest.approx(2.25)


def test_alignment_within_display_precision_is_about_as_close():
    m = _new_metrics()
    m["diagnosis"]["paper-student"]["32"]["isd"] = {"kd-codes": 0.1519, "brcd": 0.1523}
    para = [p for p in analysis.diagnosis_text(m) if p.startswith("paper-student")][0]
    assert "about as close to the teacher's as those of KD codes" in para
    assert "less closely" not in para
