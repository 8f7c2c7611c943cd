"""``torchrun -m brcd``: 2 ranks on CPU (gloo) train as one process on the same global batch.

One torchrun launch (tests/dist_train_worker.py, 2 ranks) runs a few command lines: a BRCD
distill step from scratch, one resumed from a single-process checkpoint, a teacher step on the
view cache, and one step of the in-batch KD baselines (SP, RKD: gathered rows) and of BRCD
without false-negative removal and masks (global per-sample ids), then ``evaluate`` and
``encode`` of the first student (each rank encodes a shard); pytest compares each with the same
run in one process (this process).
The launch costs ~15-25 s of rank start-up (brcd's imports), the rest a few seconds.

Tolerance: float32 weights after Adam steps within ``atol=2e-5`` (a 2-rank step sums the loss
and BatchNorm statistics in another order than one process; Adam's first step moves every
weight by ~lr · sign(grad), so weights agree to the float32 noise of the gradients). The
exception is a weight whose gradient is itself near Adam's eps (1e-8): its step lr·g/(|g| + eps)
is a noise-sensitive fraction of lr. At most 1 in 10^4 weights of a tensor may differ by more,
and none by more than 2·lr (a Sapphire Rapids VM had 1 of 73,728 off by 3.7e-5 in the RKD run);
a wrong gather or reduction would move most of them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from brcd_support import TINY

from brcd import cli, task
from brcd.config import load_config
from brcd.trainer import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ATOL = 2e-5
NEAR_EPS_SHARE, LR = 1e-4, TINY["student.train.lr"]  # see the module docstring
ONE_STEP = {"student.train.steps_per_epoch": 1, "teacher.train.steps_per_epoch": 1}
CACHED_TEACHER = {"teacher.model.freeze_backbone": True, "teacher.train.cache_views": 3}
NO_EVAL = {"student.train.eval_every": 0}
SMALL_DB = {"data.n_database": 300}
VARIANTS = {  # one-step distill runs beyond the default BRCD one
    "sp": {"distill.method": "sp"},
    "rkd": {"distill.method": "rkd"},
    "brcd-plain": {"distill.false_negative": False, "distill.use_mask": False,
                   "distill.symmetric": True},
}


def _sets(over: dict) -> list[str]:
    out = []
    for k, v in over.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


def _cfg(out, **over):
    return load_config("digits", {**TINY, **ONE_STEP, "out_dir": str(out), **over})


def _argv(cmd: str, out, *extra: str, **over) -> list[str]:
    return [cmd, "--config", "digits", *_sets({**TINY, **ONE_STEP, **over}), "--out", str(out),
            *extra]


def _weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert list(wa) == list(wb)  # no "module." prefixes: the unwrapped model's state dict
    for k in wa:
        if wa[k].is_floating_point():
            d = (wa[k] - wb[k]).abs()
            off = int((d > ATOL).sum())
            assert off <= NEAR_EPS_SHARE * d.numel() and float(d.max()) <= 2 * LR, (
                f"{k}: {off} of {d.numel()} weights differ by more than {ATOL}, "
                f"the largest by {float(d.max()):.3g}")
        else:
            assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references here, then the torchrun launch of the same runs."""
    tmp = tmp_path_factory.mktemp("dist")
    base = tmp / "base"
    cfg = _cfg(base)
    task.train_teacher(cfg, progress=False)
    masks = task.build_masks(cfg, progress=False)
    # reference student: two one-step epochs, every epoch kept
    ref = tmp / "ref"
    task.distill(_cfg(ref, **{"student.train.epochs": 2, "student.train.keep_epochs": True}),
                 teacher=masks, progress=False)
    task.train_teacher(_cfg(tmp / "ref_teacher", **CACHED_TEACHER), progress=False)
    for name, over in VARIANTS.items():
        task.distill(_cfg(tmp / f"ref_{name}", **over, **NO_EVAL), teacher=masks, progress=False)
    job = [
        _argv("distill", tmp / "fresh", "--teacher", str(masks)),
        _argv("distill", tmp / "resumed", "--teacher", str(masks), "--resume",
              str(ref / "student_epoch0.pt"), **{"student.train.epochs": 2}),
        _argv("train-teacher", tmp / "teacher", **CACHED_TEACHER),
        *(_argv("distill", tmp / name, "--teacher", str(masks), **over, **NO_EVAL)
          for name, over in VARIANTS.items()),
        _argv("evaluate", tmp / "eval_dist", "--student", str(tmp / "fresh" / "student_last.pt"),
              "--json", str(tmp / "eval_dist" / "res.json"), **SMALL_DB),
        _argv("encode", tmp / "enc_dist", "--checkpoint", str(tmp / "fresh" / "student_last.pt"),
              "--output", str(tmp / "enc_dist" / "q.npy")),
    ]
    (tmp / "job.json").write_text(json.dumps(job))
    logs = tmp / "logs"
    logs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "dist_train_worker.py"), str(tmp / "job.json"), str(logs)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    ranks = [json.loads((logs / f"rank{r}.json").read_text()) if (logs / f"rank{r}.json")
             .is_file() else None for r in range(2)]
    out = {r: ((logs / f"rank{r}.out").read_text(), (logs / f"rank{r}.err").read_text())
           for r in range(2)}
    ok = [0] * (5 + len(VARIANTS))
    assert proc.returncode == 0 and ranks[0] and ranks[0]["codes"] == ok, (
        proc.stderr[-3000:], out[0][1][-3000:], out[1][1][-3000:])
    return tmp, masks, ranks, out


def test_one_distill_step_on_two_ranks_equals_one_process(runs):
    tmp, _, _, _ = runs
    _assert_same_weights(tmp / "fresh" / "student_last.pt", tmp / "ref" / "student_epoch0.pt")
    (rec,) = [json.loads(line) for line in open(tmp / "fresh" / "student_metrics.jsonl")]
    (ref,) = [json.loads(line) for line in open(tmp / "ref" / "student_metrics.jsonl")][:1]
    # the logged loss is the global batch's; validation (sharded encoding) gives the same mAP
    assert rec["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    for k in ("kd", "own", "ntxent", "kl", "val_sshp", "val_ashp"):
        assert rec[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k


def test_resume_under_torchrun_from_a_single_process_checkpoint(runs):
    tmp, _, _, _ = runs
    _assert_same_weights(tmp / "resumed" / "student_last.pt", tmp / "ref" / "student_last.pt")
    ck = load_checkpoint(tmp / "resumed" / "student_last.pt")
    assert ck["epoch"] == 1 and ck["method"] == "brcd"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kd_variants_on_two_ranks_equal_one_process(runs, name):
    tmp, _, _, _ = runs
    _assert_same_weights(tmp / name / "student_last.pt", tmp / f"ref_{name}" / "student_last.pt")
    rec = json.loads((tmp / name / "student_metrics.jsonl").read_text())
    ref = json.loads((tmp / f"ref_{name}" / "student_metrics.jsonl").read_text())
    assert rec["kd"] == pytest.approx(ref["kd"], rel=1e-5)


def test_teacher_step_on_the_view_cache_equals_one_process(runs):
    tmp, _, _, _ = runs
    _assert_same_weights(tmp / "teacher" / "teacher_last.pt",
                         tmp / "ref_teacher" / "teacher_last.pt")
    assert len(list((tmp / "teacher" / "cache").glob("views_*.pt"))) == 1


def test_rank0_alone_writes_and_shows_progress(runs):
    tmp, _, ranks, out = runs
    ours = [str(tmp / d) for d in ("fresh", "resumed", "teacher", "eval_dist", "enc_dist",
                                   *VARIANTS)]

    def written(r):
        return sorted({w for w in ranks[r]["writes"] if w.startswith(tuple(ours))})

    assert ranks[1] is not None and ranks[1]["codes"] == [0] * (5 + len(VARIANTS))
    assert written(1) == []
    names = {Path(w).name for w in written(0)}
    assert {"student_last.pt", "student_metrics.jsonl", "teacher_last.pt"} <= names
    assert any(n.startswith("views_") for n in names)  # the view cache, by rank 0
    # rank 0 prints each run's checkpoint and its epoch records; rank 1 prints nothing
    assert out[0][0].count(str(tmp / "fresh" / "student_best_")) == 1
    assert out[0][0].count('"stage": "student"') == 2 + len(VARIANTS)
    assert "student 1/1" in out[0][1] and "student" not in out[1][1]
    assert out[1][0] == ""


def test_torchrun_checkpoint_evaluates_in_one_process(runs, capsys):
    tmp, masks, _, _ = runs
    argv = _argv("evaluate", tmp / "eval", "--student", str(tmp / "fresh" / "student_last.pt"),
                 "--quiet", **SMALL_DB)
    assert cli.main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref = task.evaluate(_cfg(tmp / "eval", **SMALL_DB), student=tmp / "ref" / "student_epoch0.pt",
                        progress=False)
    assert set(res) == {"sshp", "ashp", "teacher"}
    assert res == pytest.approx(ref, abs=1e-6)
    # evaluate and encode under torchrun (sharded encoding) give the single-process answers
    assert json.loads((tmp / "eval_dist" / "res.json").read_text()) == pytest.approx(res, abs=1e-9)
    argv = _argv("encode", tmp / "enc", "--checkpoint", str(tmp / "fresh" / "student_last.pt"),
                 "--output", str(tmp / "enc" / "q.npy"))
    assert cli.main(argv) == 0
    for name in ("q.npy", "q.words.npy", "q.labels.npy"):
        assert np.array_equal(np.load(tmp / "enc_dist" / name), np.load(tmp / "enc" / name))


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    for k, v in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank}.items():
        monkeypatch.setenv(k, str(v))


@pytest.mark.parametrize("rank", [0, 1])
def test_batch_size_must_divide_by_world_size(monkeypatch, capsys, tmp_path, rank):
    """Checked before the process group starts: one line, from rank 0 only."""
    _as_rank(monkeypatch, rank, 3)
    argv = _argv("distill", tmp_path, **{"student.train.batch_size": 32})
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    if rank == 0:
        assert err.count("\n") == 1 and err.startswith("error: ")
        assert "student.train.batch_size=32" in err and "world size 3" in err
    else:
        assert err == ""
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("cmd", ["build-masks", "demo"])
def test_single_process_commands_refuse_torchrun(monkeypatch, capsys, tmp_path, cmd):
    _as_rank(monkeypatch, 0, 2)
    assert cli.main([cmd, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'python -m brcd {cmd}' does not run under torchrun" in err
