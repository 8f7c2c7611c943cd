"""brcd.stages.suite.score_suite on fabricated runs: several code lengths with the ablation at
the main one (what ``python -m brcd demo --full`` scores)."""

import torch

from brcd.losses import ABLATIONS
from brcd.stages.suite import Suite, score_suite


def _codes(n, bits, g):
    return (torch.randint(0, 2, (n, bits), generator=g) * 2 - 1).to(torch.int8)


def test_score_suite_ablation_uses_main_length_runs_only():
    g = torch.Generator().manual_seed(0)
    nq, ndb = 23, 61
    ql, dl = torch.randint(0, 3, (nq,), generator=g), torch.randint(0, 3, (ndb,), generator=g)
    suite = Suite(students=["paper-student"], bits=[16, 32], methods=["kd-codes", "brcd"],
                  seeds=2, main_bits=32)
    t_codes = {b: {"query": _codes(nq, b, g).float(), "database": _codes(ndb, b, g).float()}
               for b in suite.bits}
    results = []
    for b in suite.bits:
        for meth, var in suite.variants("paper-student", b):
            for seed in range(suite.seeds):
                results.append({
                    "job": {"bits": b, "method": meth, "seed": seed, "student": "paper-student",
                            "variant": var},
                    "sshp_query": _codes(nq, b, g), "sshp_database": _codes(ndb, b, g),
                    "ashp_query": _codes(nq, b, g), "train_s": 1.0, "eval_s": 0.1,
                    "sshp_epoch": 0, "ashp_epoch": 0, "history": [], "sshp_val": 0.5,
                    "ashp_val": 0.5})
    out = score_suite(suite, results, t_codes, ql.numpy(), dl.numpy(), topk=10,
                      log=lambda s: None)
    assert set(out["ablation"]) == {"32"}
    assert set(out["ablation"]["32"]) == set(ABLATIONS)
    assert all(len(v[p]) == 2 for v in out["ablation"]["32"].values() for p in ("sshp", "ashp"))
    assert set(out["map_paper_student"]) == {"16", "32"}
    assert len(out["map_paper_student"]["16"]["brcd"]["sshp"]) == 2
