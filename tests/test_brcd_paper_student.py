"""The paper-protocol student (frozen ImageNet Lite0 + MLP head, BRCD_SPEC §2): its backbone
stays frozen, bit-identical and in eval mode, only its head receives gradients, its features of
the teacher's bank views are extracted once, and training on them equals training on images."""

import importlib

import pytest
import torch
from brcd_support import TINY

from brcd import data as D
from brcd import stages, task
from brcd.config import load_config
from brcd.files import load_file
from brcd.models import create_model, pair_forward
from brcd.stages import views as V
from brcd.trainer import load_checkpoint

DS = importlib.import_module("brcd.stages.distill")  # the package re-exports a function named so
PAPER = {"student.model.name": "tf_efficientnet_lite0", "student.model.pretrained": True,
         "student.model.freeze_backbone": True, "student.model.head": "mlp",
         "student.model.hidden": 32, "student.model.image_size": 32}
BANK = {"teacher.model.freeze_backbone": True, "teacher.train.cache_views": 3,
        "student.train.cache_views": 3, "teacher.train.eval_every": 0,
        "teacher.train.steps_per_epoch": 2, "student.train.steps_per_epoch": 3}


def _cfg(tmp, **kw):
    return load_config("digits", {**TINY, "out_dir": str(tmp), **PAPER, **BANK, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One teacher + masks and one BRCD distillation of the paper student on digits."""
    tmp = tmp_path_factory.mktemp("paper")
    cfg = _cfg(tmp)
    task.build_masks(cfg, teacher=task.train_teacher(cfg, progress=False), progress=False)
    task.distill(cfg, progress=False)
    return cfg, tmp


def _pretrained():
    return create_model("tf_efficientnet_lite0", 16, pretrained=True, freeze_backbone=True)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_backbone_stays_pretrained_and_only_the_head_trains(run):
    cfg, tmp = run
    ckpt = load_checkpoint(tmp / "student_last.pt")
    assert ckpt["spec"]["freeze_backbone"] and ckpt["spec"]["name"] == "tf_efficientnet_lite0"
    ref = _pretrained().backbone.state_dict()
    got = {k.removeprefix("backbone."): v for k, v in ckpt["model"].items()
           if k.startswith("backbone.")}
    assert got.keys() == ref.keys()
    # weights AND BatchNorm running statistics: eval mode throughout, no drift
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    torch.manual_seed(0)  # the head of a fresh model of the run's seed 0 is the initial head
    init = stages.build_model(cfg.student.model, cfg.bits).head.state_dict()
    head = {k.removeprefix("head."): v for k, v in ckpt["model"].items() if k.startswith("head.")}
    assert any(not torch.equal(head[k], init[k]) for k in init)
    # Adam holds state for the head's parameters only (4 tensors of the MLP)
    assert len(ckpt["optimizer"]["state"]) == 4


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_feature_bank_is_the_backbone_on_the_teachers_bank_views(run):
    cfg, tmp = run
    (bank,) = (tmp / "cache").glob("feats_*.pt")
    (views,) = (tmp / "cache").glob("views_*.pt")
    stamp = bank.stat().st_mtime_ns
    task.distill(cfg, progress=False)  # a second run reuses the features
    assert bank.stat().st_mtime_ns == stamp
    fb, cache = load_file(bank, "bank"), load_file(views, "views")
    n, v = cache["views"].shape[:2]
    assert fb["feats"].shape[:2] == (n, v) and fb["det_feats"].shape[0] == n
    sp = D.make_splits(cfg.data, cfg.seed)
    assert fb["val_feats"].shape[0] == len(sp.val)
    model = _pretrained().eval()
    with torch.no_grad():
        want = model.features(D.prepare_batch(cache["views"][:5, 1], 32))
    torch.testing.assert_close(fb["feats"][:5, 1].float(), want, atol=2e-2, rtol=1e-2)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_head_on_features_equals_the_model_on_images(run):
    """The same step on the same bank views: features through the head (the fast path) give
    the loss and head gradients of the whole frozen model on the images."""
    cfg, tmp = run
    inp = stages.DistillInput.from_config(cfg)
    ctx = stages.make_context(cfg, progress=False)
    t = DS._teacher(inp, ctx)
    torch.manual_seed(0)
    student = stages.build_model(cfg.student.model, cfg.bits)
    batches, cache, fb = DS._batches(inp, ctx, t, 0, student)
    assert fb is not None
    idx, v1, v2 = next(iter(V.index_batches(len(ctx.splits.train), batch_size=32, epoch=0,
                                            seed=0, n_views=3, steps=1)))
    f1, f2, idx_b, t1, t2 = next(iter(batches(0)))
    assert torch.equal(idx_b, idx) and torch.equal(f1, fb.feats[idx, v1])
    img = (cache.views[idx, v1], cache.views[idx, v2], idx, t1, t2)
    losses, grads = [], []
    for batch, fwd, features in ((img, student, False), ((f1, f2, idx, t1, t2),
                                                         DS._Head(student), True)):
        student.zero_grad(set_to_none=True)
        student.train()
        assert not student.backbone.training  # train() keeps a frozen backbone in eval mode
        loss, _ = DS._step_fn(inp, ctx, fwd, t, features)(batch)
        loss.backward()
        assert all(p.grad is None for p in student.backbone.parameters())
        losses.append(float(loss.detach()))
        grads.append([p.grad.clone() for p in student.head.parameters()])
    assert losses[0] == pytest.approx(losses[1], rel=2e-2, abs=2e-2)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads[0]]),
                                                torch.cat([g.flatten() for g in grads[1]]),
                                                dim=0)
    assert cos > 0.9  # float16 features may flip a few sign-STE codes


def test_feature_bank_needs_a_frozen_backbone(tmp_path):
    cfg = _cfg(tmp_path)
    ctx = stages.make_context(cfg, progress=False)
    model = create_model("tiny-cnn", 16)
    with pytest.raises(ValueError, match="freeze_backbone"):
        V.student_feature_bank(ctx, None, tmp_path / "views_x.pt", model=model,
                               model_cfg=cfg.student.model, extract=cfg.student.train)


def test_pair_forward_equals_two_head_calls():
    torch.manual_seed(0)
    model = create_model("tiny-cnn", 12, head="mlp", hidden=20)
    f1, f2 = torch.randn(5, 128), torch.randn(3, 128)  # odd, unequal row counts
    w = torch.randn(8, 12)

    def run(outs):
        model.zero_grad()
        loss = (torch.cat([o.probs for o in outs]) * w).sum() + sum(
            (o.logits ** 2).mean() + o.codes.sum() for o in outs)
        loss.backward()
        return outs, {k: p.grad.clone() for k, p in model.head.named_parameters()}

    (a1, a2), ga = run([model.head_forward(f1), model.head_forward(f2)])
    (b1, b2), gb = run(list(pair_forward(model.head_forward, f1, f2)))
    for a, b in ((a1, b1), (a2, b2)):
        for f in ("logits", "probs", "codes"):
            assert torch.allclose(getattr(a, f), getattr(b, f), atol=1e-6)
    assert b1.codes.shape == (5, 12) and b2.codes.shape == (3, 12)
    assert all(torch.allclose(ga[k], gb[k], rtol=1e-5, atol=1e-6) for k in ga)
