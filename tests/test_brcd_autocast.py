"""``<stage>.train.autocast`` and ``channels_last``: bad values fail naming the option, a bf16
digits distillation runs on CPU with bf16 convolutions and float32 features, and the view-cache
feature extraction honours the teacher's autocast and channels-last settings."""

from contextlib import contextmanager

import pytest
import torch
from torch import nn

from brcd import task
from brcd.config import load_config
from brcd.models import create_model
from brcd.trainer import load_checkpoint

SMALL = {
    "bits": 16, "device": "cpu", "threads": 1,
    "data.n_train": 64, "data.n_query": 32, "data.n_val": 32,
    "student.train.batch_size": 16, "student.train.steps_per_epoch": 2,
    "student.train.epochs": 1, "student.train.eval_every": 0,
}



@contextmanager
def conv_spy():
    """Record (input is channels-last, output dtype) of every Conv2d call and the input dtype
    of every Linear call, process-wide, while active."""
    rec = {"conv": [], "linear": []}

    def hook(mod, args, out):
        x = args[0]
        if isinstance(mod, nn.Conv2d):
            rec["conv"].append((x.is_contiguous(memory_format=torch.channels_last)
                                and not x.is_contiguous(), out.dtype))
        elif isinstance(mod, nn.Linear):
            rec["linear"].append(x.dtype)

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield rec
    finally:
        handle.remove()


def test_autocast_option_is_validated():
    assert load_config("digits").student.train.autocast == "none"
    cfg = load_config("digits", {"teacher.train.autocast": "bf16"})
    assert cfg.teacher.train.autocast == "bf16"
    with pytest.raises(ValueError, match=r"student\.train\.autocast.*'fp16'"):
        load_config("digits", {"student.train.autocast": "fp16"})
    with pytest.raises(ValueError, match=r"teacher\.train\.autocast"):
        load_config("digits", {"teacher.train.autocast": True})
    with pytest.raises(ValueError, match="autocast"):
        create_model("tiny-cnn", 16).set_autocast("float16")


def test_bf16_features_are_float32_and_close_to_fp32():
    torch.manual_seed(0)
    m = create_model("tiny-cnn", 16).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        ref = m.features(x)
        with conv_spy() as rec:
            out = m.set_autocast("bf16").features(x)
            codes = m(x).codes
    assert out.dtype == torch.float32 and codes.dtype == torch.float32
    assert rec["conv"] and all(dt == torch.bfloat16 for _, dt in rec["conv"])
    assert all(dt == torch.float32 for dt in rec["linear"])  # the head stays float32
    assert not torch.equal(out, ref)  # bf16 really ran ...
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)  # ... and stays close
    assert m.state_dict().keys() == create_model("tiny-cnn", 16).state_dict().keys()
    with torch.no_grad():
        assert torch.equal(m.set_autocast("none").features(x), ref)


def test_bf16_distill_step_on_cpu(tmp_path):
    cfg = load_config("digits", {**SMALL, "out_dir": str(tmp_path), "distill.method": "none",
                                 "student.train.autocast": "bf16",
                                 "student.train.channels_last": True})
    with conv_spy() as rec:
        path = task.distill(cfg, progress=False)
    assert rec["conv"] and all(dt == torch.bfloat16 for _, dt in rec["conv"])
    assert all(cl for cl, _ in rec["conv"][:1])  # channels-last inputs
    assert rec["linear"] and all(dt == torch.float32 for dt in rec["linear"])
    ckpt = load_checkpoint(path)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    student, _ = task.load_model(ckpt)
    assert student.autocast == "none"  # a precision setting, not part of the checkpoint


def test_view_cache_extraction_respects_options(tmp_path):
    feats = {}
    for autocast, cl in (("none", False), ("bf16", True)):
        cfg = load_config("digits", {
            **SMALL, "out_dir": str(tmp_path / autocast), "teacher.model.freeze_backbone": True,
            "teacher.train.cache_views": 2, "teacher.train.autocast": autocast,
            "teacher.train.channels_last": cl})
        torch.manual_seed(0)  # the same random (not pretrained) tiny backbone both times
        with conv_spy() as rec:
            cache = task.view_cache(cfg, log=lambda *a: None)
        want = torch.bfloat16 if autocast == "bf16" else torch.float32
        assert rec["conv"] and all(dt == want for _, dt in rec["conv"])
        assert rec["conv"][0][0] == cl  # the model input's memory format
        assert cache.feats.dtype == torch.float16 and cache.feats.shape == (64, 2, 128)
        feats[autocast] = (cache.views, cache.feats)
        with conv_spy() as rec:  # second call: loads the file, extracts nothing
            again = task.view_cache(cfg, log=lambda *a: None)
        assert not rec["conv"] and torch.equal(again.feats, cache.feats)
    assert torch.equal(feats["none"][0], feats["bf16"][0])  # same bank views
    f32, b16 = feats["none"][1].float(), feats["bf16"][1].float()
    assert not torch.equal(f32, b16)
    # bf16 keeps ~3 significant digits: small errors relative to the feature scale
    assert (b16 - f32).abs().max() <= 0.05 * f32.abs().max()
    bad = load_config("digits", {**SMALL, "out_dir": str(tmp_path / "x")})
    with pytest.raises(ValueError, match="cache_views"):
        task.view_cache(bad)
