"""The brcd pipeline on tiny digits runs end to end and learns: a teacher epoch and a BRCD
distillation epoch lower their losses, resuming reproduces the next-step loss exactly, a frozen
backbone stays bit-identical, baselines run, and bad settings fail with clear errors."""

import json

import numpy as np
import pytest
import torch
from brcd_support import TINY

from brcd import augment as A
from brcd import cli, stages, task
from brcd import data as D
from brcd.config import load_config
from brcd.files import load_file
from brcd.losses import brcd_distill_loss, cibhash_loss
from brcd.masks import ClusterMasks, assign_clusters
from brcd.stages import views as V
from brcd.trainer import load_checkpoint, seed_everything


def _cfg(tmp, **kw):
    return load_config("digits", {**TINY, "out_dir": str(tmp), **kw})


def _records(path):
    return [json.loads(line) for line in open(path)]


def _fixed_views(cfg, n=64):
    sp = D.make_splits(cfg.data, cfg.seed)
    base = D.base_images(sp.train, cfg.data.view_size)[:n]
    keys = np.arange(n)
    return sp, base, (A.augment(base, A.view_keys(99, 0, keys, 0)),
                      A.augment(base, A.view_keys(99, 0, keys, 1)))


@torch.no_grad()
def _own_loss(model, cfg, views, size):
    model.eval()
    o1, o2 = (model(D.prepare_batch(v, size)) for v in views)
    return float(cibhash_loss(o1, o2, cfg.temperature, cfg.kl_weight)[0])


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    cfg = _cfg(tmp)
    seed_everything(cfg.seed)
    init = stages.build_model(cfg.teacher.model, cfg.bits)
    path = task.train_teacher(cfg, progress=False)
    return tmp, cfg, init, path


def test_teacher_epoch_lowers_loss(teacher_run):
    tmp, cfg, init, path = teacher_run
    _, _, views = _fixed_views(cfg)
    trained, _ = task.load_model(path)
    assert _own_loss(trained, cfg, views, 16) < _own_loss(init, cfg, views, 16) - 0.05
    rec = _records(tmp / "teacher_metrics.jsonl")[-1]
    assert rec["images_per_s"] > 0 and 0 <= rec["val_teacher"] <= 1
    assert len(rec["step_losses"]) == 6


def test_masks_in_checkpoint_and_brcd_distillation(teacher_run):
    tmp, cfg, _, _ = teacher_run
    mpath = task.build_masks(cfg, progress=False)
    ck = load_checkpoint(mpath)
    assert ck["kind"] == "teacher" and ck["masks"] is not None and "model" in ck
    masks = ClusterMasks.from_dict(ck["masks"])
    assert masks.mask_table.shape == (4, 16) and len(masks.train_cluster_ids) == 192
    assert not list(tmp.glob("*.npy")) and not list(tmp.glob("*cluster*"))  # no side files

    sp, _, views = _fixed_views(cfg)
    teacher, _ = task.load_model(mpath)
    seed_everything(cfg.seed)
    init = stages.build_model(cfg.student.model, cfg.bits)

    @torch.no_grad()
    def objective(student):
        student.eval()
        s1, s2 = (student(D.prepare_batch(v, 16)) for v in views)
        t1, t2 = (teacher(D.prepare_batch(v, 16)).codes for v in views)
        c = masks.train_cluster_ids[:64]
        kd = brcd_distill_loss(s1.codes, t1, t2, masks.mask_table, c,
                               assign_clusters(t2, masks.centroids))
        return float(cibhash_loss(s1, s2)[0] + kd)

    spath = task.distill(cfg, progress=False)
    student, _ = task.load_model(spath)
    assert objective(student) < objective(init) - 0.05
    sck = load_checkpoint(tmp / "student_last.pt")
    assert sck["masks"] is not None and sck["method"] == "brcd"
    rec = _records(tmp / "student_metrics.jsonl")[-1]
    assert {"val_sshp", "val_ashp", "kd", "own"} <= set(rec)

    res = task.evaluate(cfg, student=spath, progress=False)
    assert set(res) == {"sshp", "ashp", "teacher"} and all(0 < v <= 1 for v in res.values())
    codes = task.encode(spath, sp.query, 16, "cpu")
    assert codes.shape == (64, 16) and set(codes.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("method", ["none", "kd-codes", "sp", "rkd", "brcd-symmetric"])
def test_baselines_run(teacher_run, tmp_path, method):
    tmp, cfg, _, _ = teacher_run
    if not (tmp / "teacher_masks.pt").is_file():
        task.build_masks(cfg, progress=False)
    c2 = _cfg(tmp_path, **{"distill.method": method.removesuffix("-symmetric"),
                           "distill.symmetric": method.endswith("-symmetric"),
                           "student.train.steps_per_epoch": 2, "student.train.eval_every": 0})
    path = task.distill(c2, teacher=tmp / "teacher_masks.pt", progress=False)
    rec = _records(tmp_path / "student_metrics.jsonl")[-1]
    assert path.is_file() and np.isfinite(rec["loss"])
    assert ("kd" in rec) == (method != "none")


def test_resume_gives_same_next_step_loss(tmp_path):
    over = {"teacher.train.epochs": 2, "teacher.train.steps_per_epoch": 3,
            "teacher.train.cosine": True, "teacher.train.eval_every": 0,
            "teacher.train.keep_epochs": True}
    task.train_teacher(_cfg(tmp_path / "a", **over), progress=False)
    # an "interrupted" run: continue from the epoch-0 checkpoint in a fresh folder
    task.train_teacher(_cfg(tmp_path / "b", **over),
                       resume=tmp_path / "a" / "teacher_epoch0.pt", progress=False)
    a = _records(tmp_path / "a" / "teacher_metrics.jsonl")
    b = _records(tmp_path / "b" / "teacher_metrics.jsonl")
    assert [r["epoch"] for r in a] == [0, 1] and [r["epoch"] for r in b] == [1]
    assert b[0]["step_losses"][0] == pytest.approx(a[1]["step_losses"][0], rel=1e-6, abs=1e-6)
    assert b[0]["step_losses"] == pytest.approx(a[1]["step_losses"], rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="16-bit codes, this run uses bits=8"):
        task.train_teacher(_cfg(tmp_path / "c", **{**over, "bits": 8}),
                           resume=tmp_path / "a" / "teacher_last.pt", progress=False)


@pytest.mark.parametrize("cache", [0, 4], ids=["images", "cached-views"])
def test_frozen_backbone_bit_identical(tmp_path, cache):
    cfg = _cfg(tmp_path, **{"teacher.model.freeze_backbone": True,
                            "teacher.train.cache_views": cache, "teacher.train.eval_every": 0,
                            "teacher.train.steps_per_epoch": 3})
    seed_everything(cfg.seed)
    init = stages.build_model(cfg.teacher.model, 16)
    before = {k: v.clone() for k, v in init.state_dict().items()}
    path = task.train_teacher(cfg, progress=False)
    after = load_checkpoint(path)["model"]
    bb = [k for k in before if k.startswith("backbone.")]
    assert bb and all(torch.equal(before[k], after[k]) for k in bb)  # incl. BN running stats
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("head."))


def test_bad_settings(teacher_run, tmp_path, capsys):
    tmp, cfg, _, tpath = teacher_run
    with pytest.raises(ValueError, match="bits must be a positive integer"):
        _cfg(tmp_path, bits=0)
    with pytest.raises(ValueError, match="same bit length"):
        task.distill(_cfg(tmp_path, bits=8), teacher=tpath, progress=False)
    with pytest.raises(ValueError, match="16-bit codes but bits=32"):
        task.load_model(tpath, bits=32)
    with pytest.raises(ValueError, match="unknown config key"):
        _cfg(tmp_path, **{"teacher.train.epoch": 3})
    with pytest.raises(ValueError, match="needs clusters and masks"):
        task.distill(cfg, teacher=tpath, progress=False)
    assert cli.main(["train-teacher", "--config", "digits", "--model", "resnet-tiny",
                     "--out", str(tmp_path)]) == 2
    assert "unknown model 'resnet-tiny'" in capsys.readouterr().err
    assert cli.main(["train-teacher", "--config", "digits", "--dataset", "mnist",
                     "--out", str(tmp_path)]) == 2
    assert "valid names: ['fashion-mnist', 'digits', 'cifar10', 'imagefolder']" in (
        capsys.readouterr().err)


def test_cli_help_and_run(tmp_path, capsys):
    for cmd in ("train-teacher", "build-masks", "distill", "evaluate", "encode"):
        with pytest.raises(SystemExit) as e:
            cli.main([cmd, "--help"])
        assert e.value.code == 0 and "--config" in capsys.readouterr().out
    args = ["--config", "digits", "--out", str(tmp_path), "--device", "cpu", "--quiet",
            "--threads", "1",
            "--set", "data.n_train=96", "--set", "data.n_val=0"]
    assert cli.main(["train-teacher", *args, "--epochs", "1", "--batch-size", "32"]) == 0
    assert cli.main(["build-masks", *args, "--clusters", "3"]) == 0
    assert cli.main(["distill", *args, "--epochs", "1", "--batch-size", "32", "--no-mask",
                     "--alpha", "0.5"]) == 0
    out = tmp_path / "q.npy"
    assert cli.main(["encode", *args, "--checkpoint", str(tmp_path / "student_last.pt"),
                     "--output", str(out)]) == 0
    assert np.load(out).shape == (300, 16)
    assert load_checkpoint(tmp_path / "student_last.pt")["config"]["distill"]["alpha"] == 0.5


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # 2-step teacher
def test_cached_views_student_sees_the_views_the_teacher_coded(tmp_path):
    cfg = _cfg(tmp_path, **{"teacher.model.freeze_backbone": True,
                            "teacher.train.cache_views": 3, "student.train.cache_views": 3,
                            "teacher.train.eval_every": 0, "student.train.eval_every": 0,
                            "teacher.train.steps_per_epoch": 2,
                            "student.train.steps_per_epoch": 2})
    task.build_masks(cfg, teacher=task.train_teacher(cfg, progress=False), progress=False)
    (cache_file,) = (tmp_path / "cache").glob("views_*.pt")
    stamp = cache_file.stat().st_mtime_ns
    teacher, _ = task.load_model(tmp_path / "teacher_masks.pt")
    seen = []
    orig = V.index_batches

    def spy(*args, **kwargs):
        for idx, v1, v2 in orig(*args, **kwargs):
            seen.append((idx, v1, v2))
            yield idx, v1, v2

    V.index_batches = spy
    try:
        task.distill(cfg, progress=False)
    finally:
        V.index_batches = orig
    assert cache_file.stat().st_mtime_ns == stamp  # the features were extracted only once
    cache = load_file(cache_file, "view cache")
    idx, v1, v2 = seen[0]
    assert torch.all(v1 != v2) and cache["views"].shape[1] == 3
    # the teacher codes used in training (head on cached features) are the teacher's codes of
    # exactly the bank images fed to the student
    with torch.no_grad():
        full = teacher(D.prepare_batch(cache["views"][idx, v1], 16)).codes
        cached = teacher.head_forward(cache["feats"][idx, v1].float()).codes
    assert (full == cached).float().mean() > 0.98  # float16 feature storage may flip a bit


def _toy_trainer(out, save_every, fail_at=None):
    """A 3-epoch Trainer on a linear model; ``fail_at``: the global step that raises."""
    from brcd.config import TrainConfig
    from brcd.trainer import Trainer

    seed_everything(0)
    model = torch.nn.Linear(5, 3)
    x = torch.randn(4, 6, 5)  # 4 steps per epoch of 6 rows
    seen = []

    def step(batch):
        seen.append(1)
        if fail_at is not None and len(seen) == fail_at:
            raise KeyboardInterrupt  # the run is killed mid-epoch
        return (model(batch) ** 2).mean(), {}

    cfg = TrainConfig(epochs=3, eval_every=0, save_every=save_every, cosine=True)
    return Trainer(model, cfg, device=torch.device("cpu"), out_dir=out, tag="toy", step_fn=step,
                   batches=lambda e: iter(x), steps_per_epoch=4, batch_images=6,
                   validate=None, progress=False, extra={"kind": "teacher", "bits": 3, "spec": {
                       k: 0 for k in ("name", "bits", "head", "hidden", "freeze_backbone",
                                      "image_size")}})


def test_save_every_writes_last_and_log_together_and_resumes_exactly(tmp_path):
    ref = _toy_trainer(tmp_path / "ref", 2)
    ref.fit()
    assert load_checkpoint(tmp_path / "ref" / "toy_last.pt")["epoch"] == 2
    assert [r["epoch"] for r in _records(tmp_path / "ref" / "toy_metrics.jsonl")] == [0, 1, 2]
    cut = _toy_trainer(tmp_path / "cut", 2, fail_at=4 * 2 + 2)  # killed in the third epoch
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    # the last checkpoint is epoch 1's (epoch 0 wrote none) and the log holds exactly its epochs
    assert load_checkpoint(tmp_path / "cut" / "toy_last.pt")["epoch"] == 1
    assert [r["epoch"] for r in _records(tmp_path / "cut" / "toy_metrics.jsonl")] == [0, 1]
    again = _toy_trainer(tmp_path / "cut", 2)
    again.resume(tmp_path / "cut" / "toy_last.pt")
    again.fit()
    a = load_checkpoint(tmp_path / "ref" / "toy_last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "toy_last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in _records(tmp_path / "cut" / "toy_metrics.jsonl")] == [0, 1, 2]
    with pytest.raises(ValueError, match="save_every"):
        _cfg(tmp_path, **{"student.train.save_every": -1})
