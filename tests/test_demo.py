"""The demo's option defaults, its paired BRCD-vs-baseline sentences, and a tiny end-to-end run
on scikit-learn digits that writes the report, the metrics JSON and the plots, which
``--report-only`` renders again from the metrics alone; rerun, it reuses every saved student
result and retrains one whose teacher changed."""

import argparse
import json

import pytest

from brcd import analysis, demo, report
from brcd.files import load_file, save_file
from brcd.losses import ABLATIONS
from brcd.stages import students


def parse(argv):
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    return demo._defaults(p.parse_args(argv))


def test_defaults_full_and_quick():
    default = parse([])
    assert default.out == "runs/demo" and default.bits == [32] and default.seeds == 3
    assert default.students == ["tiny-cnn", "paper-student"] and not default.no_ablation
    full = parse(["--full"])
    assert full.bits == [16, 32, 64] and full.seeds == 3 and full.main_bits == 32
    assert full.methods == list(demo.METHODS)
    quick = parse(["--quick"])
    assert quick.bits == [32] and quick.seeds == 1
    assert quick.student_epochs < full.student_epochs and quick.views < full.views
    with pytest.raises(ValueError, match="--methods"):
        parse(["--methods", "brcd,magic"])
    with pytest.raises(ValueError, match="--views"):
        parse(["--views", "1"])
    with pytest.raises(ValueError, match="--students"):
        parse(["--students", "resnet"])


def test_paired_sentences_say_when_brcd_loses():
    # SSHP: BRCD - SP per seed -0.04, -0.03, -0.05 (mean -0.04, std 0.01, 2 SE 0.012): a loss;
    # ASHP: +0.02, -0.02, +0.03 (mean 0.01, std 0.0265, 2 SE 0.031): a tie, not a win
    table = {"32": {"none": {"sshp": [0.50] * 3, "ashp": [0.10] * 3},
                    "sp": {"sshp": [0.65, 0.65, 0.66], "ashp": [0.20, 0.22, 0.20]},
                    "brcd": {"sshp": [0.61, 0.62, 0.61], "ashp": [0.22, 0.20, 0.23]}}}
    t = analysis.paired_table(table, ["none", "sp", "brcd"])["32"]
    lines = [report.paired_sentence(32, par, "tiny-cnn", t[par]) for par in ("sshp", "ashp")]
    assert lines[0].startswith("32 bits SSHP, tiny-cnn: BRCD vs SP -0.040 ± 0.010 over 3 "
                               "paired seeds: loss (2·SE = 0.012)")
    assert lines[1].startswith("32 bits ASHP, tiny-cnn: BRCD vs SP +0.010 ± 0.026 over 3 "
                               "paired seeds: tie (2·SE = 0.031)")


@pytest.mark.slow
def test_demo_smoke_on_digits(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    argv = [
        "--dataset", "digits", "--out", str(out), "--bits", "8", "--methods", "none,brcd",
        "--teacher-epochs", "1", "--student-epochs", "2", "--views", "2", "--workers", "1",
        "--threads", "1", "--seeds", "2", "--train-images", "128", "--n-val", "64",
        "--n-query", "40", "--n-database", "256", "--topk", "50", "--search-gallery", "0",
        "--no-faiss", "--speed-batches", "1,8", "--main-bits", "8", "--paper-epochs", "1",
        "--paper-size", "32",
    ]
    assert demo.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "digits" and m["bits"] == [8]
    for key in ("map", "map_paper_student"):  # both students, 2 paired seeds per method
        for meth in ("none", "brcd"):
            for par in ("sshp", "ashp"):
                assert len(m[key]["8"][meth][par]) == 2
                assert all(0.0 < v <= 1.0 for v in m[key]["8"][meth][par])
    assert list(m["ablation"]["8"]) == list(ABLATIONS)
    assert m["ablation"]["8"]["full"] == m["map_paper_student"]["8"]["brcd"]
    for st in ("tiny-cnn", "paper-student"):
        for par in ("sshp", "ashp"):
            p = m["paired"][st]["8"][par]
            assert p["best_baseline"] == "none" and p["n"] == 2
            assert p["verdict"] in ("win", "loss", "tie")
            key = "map" if st == "tiny-cnn" else "map_paper_student"
            brcd, base = (m[key]["8"][k][par] for k in ("brcd", "none"))
            assert p["diff_mean"] == pytest.approx(sum(brcd) / 2 - sum(base) / 2)
        assert m["students"][st]["speedup"]["8"] > 0
        assert "brcd_fn_removed" in m["diagnosis"][st]["8"]["loss_terms"]["brcd"]["last"]
    assert m["students"]["paper-student"]["trainable_params"] < \
        m["students"]["paper-student"]["params"]
    assert 0.0 <= m["clusters"]["8"]["offset_share"] <= 1.0
    assert m["clusters"]["8"]["fn_removed_per_row"] >= 0
    assert m["speed"]["encode"]["speedup_bs8"] > 0
    report = (out / "report.md").read_text()
    for text in ("teacher/teacher", "BRCD", "student, no KD", "speed-up", "offset-positive",
                 "Ablation", "paired seeds"):
        assert text in report
    speed = report.split("## Encode speed")[1].split("\n## ")[0]  # a row per student
    assert all(m["students"][st]["label"] in speed for st in ("tiny-cnn", "paper-student"))
    for png in ("pr_curves.png", "map_vs_bits.png", "mask_heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        (out / png).unlink()
    (out / "report.md").unlink()
    # the report and its figures come from metrics.json alone
    assert demo.main(["--out", str(out), "--report-only"]) == 0
    assert (out / "report.md").read_text() == report
    for png in ("pr_curves.png", "map_vs_bits.png", "mask_heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # Rerun: the teachers come out the same, so every student run is read back, not trained
    def no_training(*a, **k):
        raise AssertionError("a saved student run was trained again")
    monkeypatch.setattr(students, "distill", no_training)
    assert demo.main(argv) == 0
    again = json.loads((out / "metrics.json").read_text())
    for key in ("map", "map_paper_student", "ablation", "paired"):
        assert again[key] == m[key]
    # a changed input (another teacher checkpoint payload) makes its runs train again
    run = out / "work" / "b8" / "tiny-cnn" / "none-s0"
    job = students.StudentJob(**load_file(run / students.RESULT)["key"]["job"])
    assert students.student_job(job)["reused"]
    save_file({**load_file(job.teacher), "note": "changed"}, job.teacher)
    with pytest.raises(AssertionError, match="trained again"):
        students.student_job(job)
