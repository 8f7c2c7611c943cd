"""The demo's option defaults, its honest BRCD-vs-baseline sentences, and a tiny end-to-end run
on scikit-learn digits that writes the report, the metrics JSON and the plots, which
``--report-only`` renders again from the metrics alone."""

import argparse
import json

import pytest

from brcd import demo, report


def parse(argv):
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    return demo._defaults(p.parse_args(argv))


def test_defaults_full_and_quick():
    full = parse([])
    assert full.out == "runs/demo"
    assert full.bits == [16, 32, 64] and full.seeds == 3 and full.main_bits == 32
    assert full.methods == list(demo.METHODS)
    quick = parse(["--quick"])
    assert quick.bits == [32] and quick.seeds == 1
    assert quick.student_epochs < full.student_epochs and quick.views < full.views
    with pytest.raises(ValueError, match="--methods"):
        parse(["--methods", "brcd,magic"])
    with pytest.raises(ValueError, match="--views"):
        parse(["--views", "1"])


def test_comparisons_say_when_brcd_loses():
    table = {(32, "brcd", "sshp"): [0.60, 0.62], (32, "sp", "sshp"): [0.65],
             (32, "none", "sshp"): [0.50], (32, "brcd", "ashp"): [0.70],
             (32, "sp", "ashp"): [0.20], (32, "none", "ashp"): [0.10]}
    lines = report.comparisons(table, [32], ["none", "sp", "brcd"])
    assert any("SSHP" in x and "does NOT beat" in x and "SP 0.650" in x and "0.610" in x
               for x in lines)
    assert any("ASHP" in x and "beats every baseline by more than 0.005" in x
               and "+0.500" in x for x in lines)
    # a margin inside the seed spread is reported as a tie, not a win
    table = {(16, "brcd", "sshp"): [0.60, 0.64], (16, "sp", "sshp"): [0.61, 0.60]}
    lines = report.comparisons(table, [16], ["sp", "brcd"])
    assert len(lines) == 1 and "no clear win" in lines[0] and "SP 0.605" in lines[0]


@pytest.mark.slow
def test_demo_smoke_on_digits(tmp_path):
    out = tmp_path / "demo"
    rc = demo.main([
        "--dataset", "digits", "--out", str(out), "--bits", "8", "--methods", "none,brcd",
        "--teacher-epochs", "1", "--student-epochs", "2", "--views", "2", "--workers", "1",
        "--threads", "1", "--seeds", "1", "--train-images", "128", "--n-val", "64",
        "--n-query", "40", "--n-database", "256", "--topk", "50", "--search-gallery", "0",
        "--no-faiss", "--speed-batches", "1,8",
    ])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "digits" and m["bits"] == [8]
    for meth in ("none", "brcd"):
        for par in ("sshp", "ashp"):
            (v,) = m["map"]["8"][meth][par]
            assert 0.0 < v <= 1.0
    assert 0.0 <= m["clusters"]["8"]["offset_share"] <= 1.0
    assert m["speed"]["encode"]["speedup_bs8"] > 0
    report = (out / "report.md").read_text()
    for text in ("teacher/teacher", "BRCD", "student, no KD", "speed-up", "offset-positive"):
        assert text in report
    for png in ("pr_curves.png", "map_vs_bits.png", "mask_heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        (out / png).unlink()
    (out / "report.md").unlink()
    # the report and its figures come from metrics.json alone
    assert demo.main(["--out", str(out), "--report-only"]) == 0
    assert (out / "report.md").read_text() == report
    for png in ("pr_curves.png", "map_vs_bits.png", "mask_heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
