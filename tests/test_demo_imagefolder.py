"""``python -m brcd demo --dataset imagefolder``: the demo's protocol scaled to a class-per-folder
tree (:func:`brcd.data.demo_protocol`), images of any mode and size in one 3-channel pipeline,
unreadable files skipped and counted, and a tiny end-to-end demo run on a generated tree."""

import io
import json
import warnings

import numpy as np
import pytest
import torch

from brcd import data as D
from brcd import demo
from brcd.config import load_config

Image = pytest.importorskip("PIL.Image")

SIZES = [(20, 31), (64, 64), (90, 40), (7, 120)]  # (width, height)


def _image(rng, mode: str, size: tuple[int, int]):
    """Random pixels of ``mode`` (L, LA, RGB, RGBA, P) at ``size = (width, height)``."""
    w, h = size
    if mode == "P":
        return _image(rng, "RGB", size).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    shape = (h, w) if mode == "L" else (h, w, len(mode))
    im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    assert im.mode == mode
    return im


def make_tree(root, counts: dict[str, int], *, corrupt: int = 0, seed: int = 0):
    """``counts[c]`` readable images per class folder, cycling through grey / RGB / RGBA /
    palette modes, PNG and JPEG, and several sizes; ``corrupt`` broken files in the first class."""
    rng = np.random.default_rng(seed)
    kinds = [("L", "png"), ("RGB", "jpg"), ("RGBA", "png"), ("P", "png"), ("L", "jpeg"),
             ("RGB", "png")]
    for ci, (cname, n) in enumerate(counts.items()):
        (root / cname).mkdir(parents=True)
        for i in range(n):
            mode, ext = kinds[(i + ci) % len(kinds)]
            _image(rng, mode, SIZES[(i + 2 * ci) % len(SIZES)]).save(root / cname / f"{i}.{ext}")
    first = root / next(iter(counts))
    for j in range(corrupt):
        (first / f"broken{j}.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


def protocol(root, quick=False, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the skipped-files warning
        return D.demo_protocol("imagefolder", str(root), quick=quick, **kw)


def splits_for(o):
    """make_splits exactly as the demo builds its config (demo._base_config)."""
    cfg = load_config("fashion-mnist", o)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return D.make_splits(cfg.data, cfg.seed)


def check_constraints(o, n_readable: int, test_fraction: float = 0.2):
    n_test = max(1, round(test_fraction * n_readable))
    n_pool = n_readable - n_test
    tpc, n_train = o["data.train_per_class"], o["data.n_train"]
    sp = splits_for(o)
    n_tr = len(sp.train)
    if tpc is not None:
        assert n_train is None and np.all(np.bincount(sp.train.labels) == tpc)
    else:
        assert n_tr == n_train
    assert 64 <= n_tr <= n_pool  # one batch of the preset
    assert 1 <= o["data.n_val"] <= n_pool - n_tr
    assert n_tr <= o["data.n_database"] <= n_pool
    assert 1 <= o["data.n_query"] <= n_test
    assert (len(sp.query), len(sp.database), len(sp.val)) == (
        o["data.n_query"], o["data.n_database"], o["data.n_val"])
    return sp


def test_protocol_on_an_unequal_mixed_tree(tmp_path):
    root = make_tree(tmp_path / "tree", {"ant": 70, "bee": 45, "cow": 52}, corrupt=1)
    o = protocol(root)
    # hand-computed: 167 readable, 33 held out (round(0.2 * 167)), a pool of 134; the smallest
    # class keeps about 36 of its 45 -> 4/5 of that per class; val = the rest of the pool (< 500);
    # database = the whole pool (< 14,000); queries = the whole test pool (< 1,000)
    assert o["data.name"] == "imagefolder" and o["data.root"] == str(root)
    assert o["data.test_fraction"] == 0.2
    assert o["data.n_database"] == 134 and o["data.n_query"] == 33
    tpc = o["data.train_per_class"]
    assert o["data.n_val"] == 134 - 3 * tpc
    sp = check_constraints(o, 167)
    assert sp.skipped == 1 and "1 unreadable file(s) skipped" in sp.summary()
    assert sp.num_classes == 3
    # the database is the whole pool, so it shows the per-class pool counts make_splits drew:
    # the smallest (bee, about 36 of 45) limits the per-class count to 4/5 of it, floored
    pool_counts = np.bincount(sp.database.labels)
    assert pool_counts.sum() == 134 and pool_counts.argmin() == 1
    assert tpc == pool_counts.min() * 4 // 5
    # quick targets are the same here: the folder, not the protocol, is the limit
    assert protocol(root, quick=True) == o


def test_protocol_caps_at_the_fashion_targets():
    # a folder bigger than the quick protocol: quick keeps its targets exactly
    pool = D.ImageSet(np.arange(4000) % 4, list("abcd"),
                      images=torch.zeros(4000, 1, 4, 4, dtype=torch.uint8))
    D.register_dataset("four-k")(lambda root: (pool, None))
    try:
        o = D.demo_protocol("four-k", None, quick=True)
        assert (o["data.train_per_class"], o["data.n_query"], o["data.n_database"],
                o["data.n_val"]) == (100, 300, 3000, 200)
        full = D.demo_protocol("four-k", None, quick=False)
        # pool 3,200 (about 800 per class): 500 per class, database = the pool, val 500 of the
        # 1,200 left, queries = the 800 held out
        assert (full["data.train_per_class"], full["data.n_query"], full["data.n_database"],
                full["data.n_val"]) == (500, 800, 3200, 500)
    finally:
        D.DATASETS.pop("four-k")


def test_one_tiny_class_switches_to_random_training_images(tmp_path):
    root = make_tree(tmp_path / "tree", {"big": 150, "tiny": 4})
    o = protocol(root)
    # balanced would give at most 3 x 2 images; a random draw: 4/5 of the 123-image pool = 98
    assert o["data.train_per_class"] is None and o["data.n_train"] == 98
    assert o["data.n_val"] == 123 - 98 and o["data.n_database"] == 123
    assert o["data.n_query"] == 31
    check_constraints(o, 154)


def test_smallest_folder_that_splits(tmp_path):
    # 100 readable images: 20 test queries, an 80-image pool, 64 training images (one batch)
    root = make_tree(tmp_path / "ok", {"a": 50, "b": 50})
    o = protocol(root)
    assert o["data.n_query"] == 20 and o["data.n_database"] == 80
    assert o["data.n_val"] == 80 - 64
    check_constraints(o, 100)
    small = make_tree(tmp_path / "small", {"a": 50, "b": 49}, corrupt=3)
    with pytest.raises(ValueError, match=r"--data-root .*too small to split: 99 readable "
                       r"image\(s\) in 2 classes \(3 unreadable skipped\); the demo needs at "
                       r"least 100"):
        protocol(small)


def test_errors_name_data_root(tmp_path):
    with pytest.raises(ValueError, match="--data-root is required for --dataset imagefolder"):
        D.demo_protocol("imagefolder", None, quick=False)
    with pytest.raises(ValueError, match="--data-root .*missing.* is not a directory"):
        protocol(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="--data-root .*file.png.* is not a directory"):
        protocol(tmp_path / "file.png")
    one = make_tree(tmp_path / "one", {"only": 120})
    (one / "empty").mkdir()
    (one / ".ipynb_checkpoints").mkdir()
    with pytest.raises(ValueError, match=r"--data-root .* in 1 class folder\(s\); the demo "
                       r"needs at least 2"):
        protocol(one)
    (tmp_path / "none" / "a").mkdir(parents=True)
    (tmp_path / "none" / "a" / "x.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="--data-root .*no readable images"):
        protocol(tmp_path / "none")
    with pytest.raises(ValueError, match="unknown dataset"):
        D.demo_protocol("nope", None, quick=False)


def test_every_mode_and_size_gives_the_same_three_channel_views(tmp_path):
    root = tmp_path / "modes" / "c"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for mode, made_from in (("L", "L"), ("RGB", "RGB"), ("RGBA", "RGBA"), ("P", "P"),
                            ("LA", "LA"), ("1", "L"), ("CMYK", "RGB")):
        ext = "jpg" if mode == "CMYK" else "png"
        _image(rng, made_from, (33, 17)).convert(mode).save(root / f"{mode}.{ext}")
        with Image.open(root / f"{mode}.{ext}") as im:
            assert im.mode == mode
    # a 16-bit greyscale PNG: PIL's convert("RGB") alone would clip it to white
    Image.fromarray(np.full((10, 12), 32896, np.uint16)).save(root / "deep.png")
    # fully transparent red over nothing: composited onto white, not the hidden red
    Image.fromarray(np.dstack([np.full((9, 9, 1), 255, np.uint8),
                               np.zeros((9, 9, 3), np.uint8)])).save(root / "clear.png")
    pool, _ = D.load_pool("imagefolder", tmp_path / "modes")
    assert pool.skipped == 0 and len(pool) == 9
    by_name = {p.name: i for i, p in enumerate(pool.paths)}
    for name, i in by_name.items():
        img = pool.get(i)
        assert img.dtype == torch.uint8 and img.shape[0] == 3, name
    assert pool.get(by_name["RGB.png"]).shape == (3, 17, 33)
    grey = pool.get(by_name["L.png"])
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert torch.equal(pool.get(by_name["deep.png"]), torch.full((3, 10, 12), 128))
    assert torch.equal(pool.get(by_name["clear.png"]), torch.full((3, 9, 9), 255))
    base = D.base_images(pool, 28)
    assert base.shape == (9, 3, 28, 28) and base.dtype == torch.uint8
    (batch,) = list(D.eval_views(pool, 16, batch_size=16))
    assert batch.shape == (9, 3, 16, 16)


def test_rescan_reuses_the_first_scan_until_the_tree_changes(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tree", {"a": 3, "b": 3}, corrupt=1)
    calls = []
    real = D._readable
    monkeypatch.setattr(D, "_readable", lambda f: calls.append(f) or real(f))
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        first, _ = D.load_pool("imagefolder", root)
    assert len(calls) == 7
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        again, _ = D.load_pool("imagefolder", root)
    assert len(calls) == 7 and again.paths == first.paths and again.skipped == 1
    again.paths.clear()  # a caller's list is its own
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert len(D.load_pool("imagefolder", root)[0]) == 6
    buf = io.BytesIO()
    Image.new("RGB", (5, 5)).save(buf, "PNG")
    (root / "a" / "broken0.jpg").write_bytes(buf.getvalue())  # the broken file is fixed
    pool, _ = D.load_pool("imagefolder", root)
    assert len(calls) == 14 and len(pool) == 7 and pool.skipped == 0


@pytest.mark.slow
def test_demo_end_to_end_on_an_image_folder(tmp_path):
    root = make_tree(tmp_path / "tree", {"ant": 45, "bee": 40, "cow": 42}, corrupt=2)
    out = tmp_path / "demo"
    # no size flags: the protocol sizes the splits to the folder
    rc = demo.main([
        "--dataset", "imagefolder", "--data-root", str(root), "--out", str(out),
        "--bits", "8", "--methods", "none,brcd", "--teacher-epochs", "1",
        "--student-epochs", "2", "--views", "2", "--workers", "1", "--threads", "1",
        "--seeds", "1", "--topk", "50", "--search-gallery", "0", "--no-faiss",
        "--speed-batches", "1,8", "--main-bits", "8", "--no-ablation", "--paper-epochs", "1",
        "--paper-size", "32",
    ])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "imagefolder" and m["bits"] == [8]
    assert "2 unreadable file(s) skipped" in m["splits"]
    for key in ("map", "map_paper_student"):  # both students ran on the folder
        for meth in ("none", "brcd"):
            for par in ("sshp", "ashp"):
                (v,) = m[key]["8"][meth][par]
                assert 0.0 < v <= 1.0
    assert "imagefolder" in (out / "report.md").read_text()
