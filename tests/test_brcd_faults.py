"""Files and the command line under faults: checkpoints never run code and damaged ones never
load, every CLI user error is one "error:" line with exit status 2, and a distill run killed
with SIGKILL resumes to bitwise the weights of an uninterrupted run."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from brcd_support import TINY

from brcd import cli, task
from brcd.config import config_to_dict, load_config
from brcd.files import MAGIC, file_digest, load_file, save_file
from brcd.trainer import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run: teacher, teacher_masks and a student; ``config.yaml`` holds its
    config for the CLI."""
    out = tmp_path_factory.mktemp("faults")
    cfg = load_config("digits", {**TINY, "out_dir": str(out / "run")})
    task.build_masks(cfg, teacher=task.train_teacher(cfg, progress=False), progress=False)
    task.distill(cfg, progress=False)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    return out


def _cli(capsys, *argv):
    """Run ``brcd.cli.main``; return (exit status, stderr lines)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err.splitlines()


def _one_error_line(rc, err, *needles):
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err


def _with_trailer(path: Path) -> None:
    """Append a valid brcd checksum trailer (what an attacker can compute too)."""
    data = path.read_bytes()
    path.write_bytes(data + MAGIC + hashlib.sha256(data).digest())


class _RunsCode:
    """Unpickling this calls os.system (a crafted checkpoint's payload)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------ 2: no code from files
@pytest.mark.parametrize("trailer", [False, True], ids=["plain-pickle", "valid-checksum"])
def test_checkpoint_that_would_run_code_is_refused(run, tmp_path, capsys, trailer):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "student", "bits": 16, "payload": _RunsCode(marker)}, evil)
    if trailer:
        _with_trailer(evil)
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(evil)
    assert not marker.exists()
    cfg = ["--config", run / "config.yaml", "--out", tmp_path / "out", "--quiet"]
    for argv in (["encode", *cfg, "--checkpoint", evil, "--output", tmp_path / "c.npy"],
                 ["evaluate", *cfg, "--student", evil],
                 ["build-masks", *cfg, "--teacher", evil],
                 ["distill", *cfg, "--teacher", evil],
                 ["distill", *cfg, "--teacher", run / "run" / "teacher_masks.pt",
                  "--resume", evil]):
        rc, err = _cli(capsys, *argv)
        _one_error_line(rc, err, "evil.pt")
        assert not marker.exists(), argv


def test_everything_brcd_writes_is_plain_data(run, tmp_path):
    files = sorted((run / "run").glob("*.pt"))
    assert {"teacher_last.pt", "teacher_masks.pt", "student_last.pt"} <= {f.name for f in files}
    for f in files:
        assert isinstance(load_file(f), dict)
        torch.load(f, map_location="cpu", weights_only=True)  # other tools can read it too
    with pytest.raises(TypeError, match=r"payload\['a'\] is a ndarray"):
        save_checkpoint({"kind": "teacher", "a": np.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(TypeError, match=r"payload\['p'\]\[0\] is a PosixPath"):
        save_checkpoint({"p": [tmp_path]}, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())  # nothing written, no temporary left behind
    with pytest.raises(ValueError, match="config key 'data.root' must be a string"):
        load_config("digits", {"data.root": yaml.safe_load("2024-01-01")})


# ------------------------------------------------------------------ 4: damage is detected
def test_flipped_bytes_are_always_detected(run, tmp_path):
    good = run / "run" / "student_last.pt"
    ref = load_checkpoint(good)["model"]
    data = good.read_bytes()
    n = len(data)
    rng = np.random.default_rng(0)
    offsets = sorted({0, n // 2, n - 49, n - 48, n - 33, n - 32, n - 1,
                      *rng.integers(0, n, 40).tolist()})
    bad = tmp_path / "bad.pt"
    for off in offsets:
        b = bytearray(data)
        b[off] ^= int(rng.integers(1, 256))
        bad.write_bytes(bytes(b))
        with pytest.raises(ValueError, match="bad.pt"):
            load_checkpoint(bad)
    for cut in (0, 1, n // 3, n - 48, n - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="bad.pt.*not a checksummed brcd file"):
            load_checkpoint(bad)
    # a checkpoint without a checksum (older brcd, or not brcd) is refused, not trusted
    torch.save(torch.load(good, weights_only=True), bad)
    with pytest.raises(ValueError, match="not a checksummed brcd file"):
        load_checkpoint(bad)
    save_file(torch.load(bad, weights_only=True), bad)  # adopting a trusted file, as documented
    assert all(torch.equal(ref[k], v) for k, v in load_checkpoint(bad)["model"].items())


def test_file_digest_is_the_payload_checksum(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"  # the same payload under two names: same bytes
    save_file({"x": torch.arange(5)}, a)
    save_file({"x": torch.arange(5)}, b)
    data = a.read_bytes()
    assert file_digest(a) == hashlib.sha256(data[:-48]).hexdigest() == file_digest(b)
    save_file({"x": torch.arange(6)}, b)
    assert file_digest(b) != file_digest(a)
    for bad in (data[:-48], data[:10], b""):  # no trailer: refused, naming the file
        b.write_bytes(bad)
        with pytest.raises(ValueError, match=r"input '.*b\.pt' is not a checksummed brcd file"):
            file_digest(b, "input")
    with pytest.raises(ValueError, match="missing.pt' does not exist"):
        file_digest(tmp_path / "missing.pt")


def test_damaged_checkpoint_fails_evaluate_and_encode(run, tmp_path, capsys):
    good = run / "run" / "student_last.pt"
    b = bytearray(good.read_bytes())
    b[len(b) // 2] ^= 0x01  # one bit, inside the tensor data
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(b))
    cfg = ["--config", run / "config.yaml", "--quiet"]
    _one_error_line(*_cli(capsys, "evaluate", *cfg, "--student", bad), "bad.pt", "damaged")
    _one_error_line(*_cli(capsys, "encode", *cfg, "--checkpoint", bad, "--output",
                          tmp_path / "c.npy"), "bad.pt", "damaged")
    assert not (tmp_path / "c.npy").exists()


def test_damaged_view_cache_is_rebuilt_or_refused(tmp_path):
    cfg = load_config("digits", {**TINY, "out_dir": str(tmp_path), "teacher.train.eval_every": 0,
                                 "teacher.model.freeze_backbone": True,
                                 "teacher.train.cache_views": 2,
                                 "teacher.train.steps_per_epoch": 2})
    task.train_teacher(cfg, progress=False)
    (cache,) = (tmp_path / "cache").glob("views_*.pt")
    good = load_file(cache)
    b = bytearray(cache.read_bytes())
    b[len(b) // 3] ^= 0x10
    cache.write_bytes(bytes(b))
    with pytest.raises(ValueError, match="views_.*damaged.*delete it to rebuild"):
        task.view_cache(cfg)  # no model at hand to rebuild it with
    task.train_teacher(cfg, progress=False)  # the teacher's backbone rebuilds it
    assert all(torch.equal(good[k], v) for k, v in load_file(cache).items())


# ------------------------------------------------------------------ 8: one-line CLI errors
def _case(name, run, tmp):
    """(argv, text the error line names) of each user-error case."""
    cfg = ["--config", run / "config.yaml", "--quiet"]
    teacher = run / "run" / "teacher_last.pt"
    (tmp / "a_file").write_text("x")
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "text.pt").write_text("just some text\n")
    (tmp / "trunc.pt").write_bytes(teacher.read_bytes()[:1000])
    (tmp / "bad.yaml").write_text("teacher: {train: [1, \n")
    (tmp / "dir.npy").mkdir(exist_ok=True)
    enc = ["encode", *cfg, "--checkpoint", run / "run" / "student_last.pt", "--output"]
    return {
        "truncated-checkpoint": (["encode", *cfg, "--checkpoint", tmp / "trunc.pt",
                                  "--output", tmp / "c.npy"], "trunc.pt"),
        "empty-checkpoint": (["evaluate", *cfg, "--student", tmp / "empty.pt"], "empty.pt"),
        "text-checkpoint": (["build-masks", *cfg, "--teacher", tmp / "text.pt"], "text.pt"),
        "bad-device": (["train-teacher", *cfg, "--out", tmp / "o", "--device", "gpu0"],
                       "gpu0"),
        "absent-cuda-device": (["evaluate", *cfg, "--student", run / "run" / "student_last.pt",
                                "--device", "cuda:99"], "cuda:99"),
        "invalid-yaml-config": (["train-teacher", "--config", tmp / "bad.yaml", "--quiet"],
                                "bad.yaml"),
        "invalid-yaml-set": (["train-teacher", *cfg, "--set", "teacher.train.epochs=[1,"],
                             "--set"),
        "out-is-a-file": (["train-teacher", *cfg, "--out", tmp / "a_file"], "a_file"),
        "out-below-a-file": (["distill", *cfg, "--out", tmp / "a_file" / "sub"], "a_file"),
        "output-below-a-file": ([*enc, tmp / "a_file" / "c.npy"], "a_file"),
        "output-is-a-folder": ([*enc, tmp / "dir.npy"], "dir.npy"),
        "json-is-a-folder": (["evaluate", *cfg, "--student", run / "run" / "student_last.pt",
                              "--json", tmp / "dir.npy"], "dir.npy"),
        "resume-finished-run-into-fresh-out": (["train-teacher", *cfg, "--out", tmp / "fresh",
                                                "--resume", teacher], "nothing is left"),
        "negative-threads": (["train-teacher", *cfg, "--out", tmp / "o", "--threads", "-1"],
                             "threads must be an integer >= 0"),
    }[name]


CASES = ["truncated-checkpoint", "empty-checkpoint", "text-checkpoint", "bad-device",
         "absent-cuda-device", "invalid-yaml-config", "invalid-yaml-set", "out-is-a-file",
         "out-below-a-file", "output-below-a-file", "output-is-a-folder", "json-is-a-folder",
         "resume-finished-run-into-fresh-out", "negative-threads"]


@pytest.mark.parametrize("name", CASES)
def test_cli_user_error_is_one_line(run, tmp_path, capsys, name):
    if name == "absent-cuda-device" and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    argv, needle = _case(name, run, tmp_path)
    _one_error_line(*_cli(capsys, *argv), needle)
    assert not (tmp_path / "fresh").exists() or not any((tmp_path / "fresh").iterdir())
    with pytest.raises((ValueError, TypeError, OSError)):  # --debug shows the traceback
        cli.main([str(a) for a in argv] + ["--debug"])


def test_cli_parse_errors_and_unexpected_exceptions(run, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        cli.main(["train-teacher", "--threads", "many"])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: argument --threads")

    def boom(*a, **k):
        raise RuntimeError("a bug, not a user error")
    monkeypatch.setattr(task, "train_teacher", boom)
    with pytest.raises(RuntimeError, match="a bug"):  # bugs are not hidden behind "error:"
        cli.main(["train-teacher", "--config", str(run / "config.yaml"), "--quiet"])


# ------------------------------------------------------------------ kill -9 and --resume
KILL_RUN = {"student.train.epochs": 3, "student.train.keep_epochs": True,
            "student.train.steps_per_epoch": 15}


def test_sigkill_during_distill_then_resume_is_bitwise_an_uninterrupted_run(run, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    cfg = load_config(run / "config.yaml", {**KILL_RUN, "out_dir": str(ref)})
    task.distill(cfg, teacher=run / "run" / "teacher_masks.pt", progress=False)
    cmd = [sys.executable, "-m", "brcd", "distill", "--config", str(run / "config.yaml"),
           "--teacher", str(run / "run" / "teacher_masks.pt"), "--out", str(cut), "--quiet",
           *(f"--set={k}={str(v).lower()}" for k, v in KILL_RUN.items())]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (cut / "student_epoch0.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before epoch 1"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (cut / "student_epoch2.pt").exists()  # killed before its end
    assert load_checkpoint(cut / "student_last.pt")["epoch"] in (0, 1)
    # the resumed run: what `python -m brcd distill ... --resume <out>/student_last.pt` calls
    task.distill(load_config(run / "config.yaml", {**KILL_RUN, "out_dir": str(cut)}),
                 teacher=run / "run" / "teacher_masks.pt", resume=cut / "student_last.pt",
                 progress=False)
    a, b = load_checkpoint(ref / "student_last.pt"), load_checkpoint(cut / "student_last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
