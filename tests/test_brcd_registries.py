"""The registries are the only place a method or a dataset is named: one decorated function
makes a new KD method or dataset usable by config validation, the CLI, and the stages."""

import json

import numpy as np
import pytest
import torch

from brcd import cli, stages
from brcd.config import load_config, override
from brcd.data import DATASETS, ImageSet, load_pool, make_splits, register_dataset
from brcd.losses import METHODS, register_method

SMALL = {
    "bits": 8, "device": "cpu", "threads": 1, "data.n_train": 64, "data.n_query": 16,
    "data.n_val": 16, "teacher.train.batch_size": 16, "teacher.train.steps_per_epoch": 2,
    "student.train.batch_size": 16, "student.train.steps_per_epoch": 2,
    "teacher.train.epochs": 1, "student.train.epochs": 1, "masks.n_clusters": 3,
    "masks.n_init": 2,
}


@pytest.fixture
def l2_method():
    @register_method("l2-codes", label="L2 codes", weight=0.5, shares_teacher_space=True,
                     help="squared error to the teacher's codes")
    def _l2(b):
        seen.append(b)
        return 0.5 * ((b.s1.codes - b.t1).pow(2).mean() + (b.s2.codes - b.t2).pow(2).mean())

    seen: list = []
    yield seen
    METHODS.pop("l2-codes")


@pytest.fixture
def squares_dataset():
    @register_dataset("squares", help="bright and dark squares (no root)")
    def _squares(root):
        rng = np.random.default_rng(0)
        labels = np.arange(120) % 2
        x = rng.integers(0, 80, size=(120, 1, 12, 12)).astype(np.uint8)
        x[labels == 1, :, 3:9, 3:9] = 250
        return ImageSet(labels, ["dark", "bright"], images=torch.from_numpy(x)), None

    yield
    DATASETS.pop("squares")


def test_unknown_names_are_rejected_with_the_registered_ones():
    with pytest.raises(ValueError, match=r"distill\.method must be one of \['none'"):
        load_config("digits", {"distill.method": "magic"})
    with pytest.raises(ValueError, match=r"masks\.convention must be one of \['agree'"):
        load_config("digits", {"masks.convention": "all"})
    with pytest.raises(ValueError, match=r"student\.model\.head must be one of \['linear'"):
        load_config("digits", {"student.model.head": "deep"})
    with pytest.raises(ValueError, match=r"valid names: \['fashion-mnist', 'digits'"):
        load_config("digits", {"data.name": "mnist"})
    with pytest.raises(ValueError, match="already registered"):
        register_method("brcd", label="x", shares_teacher_space=True, help="x")(None)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits")(lambda root: None)
    assert METHODS["brcd"].needs_masks and METHODS["kd-codes"].shares_teacher_space
    assert not METHODS["sp"].shares_teacher_space and not METHODS["none"].needs_teacher


def test_a_registered_method_runs_end_to_end(tmp_path, l2_method, capsys):
    cfg = load_config("digits", {**SMALL, "out_dir": str(tmp_path), "distill.method": "l2-codes"})
    ctx = stages.make_context(cfg, progress=False)
    teacher = stages.train_teacher(stages.TeacherInput.from_config(cfg), ctx)
    assert teacher.checkpoint.is_file() and len(teacher.history) == 1
    res = stages.distill(stages.DistillInput.from_config(cfg, teacher.checkpoint), ctx)
    assert res.checkpoint.is_file() and set(res.checkpoints) == {"best_ashp", "best_sshp", "last"}
    assert len(l2_method) == 2 and l2_method[0].t1.shape == (16, 8)  # called every step
    assert l2_method[0].mask_table is None  # it does not need masks, and none were built
    rec = json.loads((tmp_path / "student_metrics.jsonl").read_text().splitlines()[-1])
    assert {"own", "kd", "val_sshp", "val_ashp"} <= set(rec)
    assert rec["loss"] == pytest.approx(rec["own"] + 0.5 * rec["kd"], rel=1e-4)
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "l2-codes: squared error to the teacher's codes" in help_text
    # a method that needs masks refuses a teacher without them, naming the method
    with pytest.raises(ValueError, match="--method brcd needs clusters and masks"):
        stages.distill(stages.DistillInput.from_config(
            override(cfg, {"distill.method": "brcd"}), teacher.checkpoint), ctx)


def test_a_registered_dataset_splits_and_trains(tmp_path, squares_dataset):
    cfg = load_config("digits", {**SMALL, "out_dir": str(tmp_path), "data.name": "squares",
                                 "data.view_size": 12, "data.n_query": 10})
    pool, test = load_pool("squares")
    assert len(pool) == 120 and test is None
    sp = make_splits(cfg.data, cfg.seed)
    assert len(sp.train) == 64 and len(sp.query) == 10 and sp.name == "squares"
    ctx = stages.make_context(cfg, progress=False)
    teacher = stages.train_teacher(stages.TeacherInput.from_config(cfg), ctx)
    out = stages.evaluate(stages.EvalInput.from_config(cfg, teacher=teacher.checkpoint), ctx)
    assert set(out) == {"teacher"} and 0 < out["teacher"] <= 1
