"""Samplers and the DALI (CPU mode) / torchvision loaders: same batch contract and transforms."""
import numpy as np
import pytest
import torch
from PIL import Image

import dmlfast.data as D

needs_dali = pytest.mark.skipif(not D.dali_available(), reason="nvidia-dali is not installed")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """24 JPEGs/PNGs of 6 classes, mixed sizes, some grayscale."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(24):
        h, w = (48, 64) if i % 2 else (70, 52)
        base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
        if i % 5 == 0:
            im = im.convert("L")
        p = root / f"{i:02d}.{'png' if i % 3 == 0 else 'jpg'}"
        im.save(p, quality=95) if p.suffix == ".jpg" else im.save(p)
        paths.append(str(p))
        labels.append(i % 6)
    return D.ImageList(paths, np.array(labels), dataset=None, split="train")


def _collect(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_random_sampler_deterministic_and_sharded():
    labels = np.repeat(np.arange(10), 7)
    s = D.RandomBatchSampler(labels, 8, seed=3)
    s.set_epoch(1)
    a = list(s)
    s.set_epoch(1)
    assert list(s) == a and len(a) == len(s) == 8
    s.set_epoch(2)
    assert list(s) != a
    assert len({i for b in a for i in b}) == 64
    shards = [D.RandomBatchSampler(labels, 8, seed=3, shard_id=k, num_shards=3) for k in range(3)]
    for sh in shards:
        sh.set_epoch(1)
    got = [list(sh) for sh in shards]
    assert [len(g) for g in got] == [2, 2, 2]
    assert got[1] == a[1::3][:2]
    ev = D.RandomBatchSampler(labels, 8, shuffle=False, drop_last=False)
    assert [i for b in ev for i in b] == list(range(70)) and len(ev) == 9


def test_m_per_class_sampler():
    labels = np.concatenate([np.repeat(np.arange(12), 6), [12, 13]])  # two classes with a single image
    s = D.MPerClassSampler(labels, 16, 4, seed=1)
    s.set_epoch(5)
    batches = list(s)
    assert len(batches) == len(s) == len(labels) // 16
    for b in batches:
        counts = np.unique(labels[b], return_counts=True)[1]
        assert len(b) == 16 and counts.tolist() == [4, 4, 4, 4]
    s.set_epoch(5)
    assert list(s) == batches
    with pytest.raises(ValueError, match="must be a positive int dividing batch_size=16"):
        D.MPerClassSampler(labels, 16, 5)
    with pytest.raises(ValueError, match="needs 8 classes per batch"):
        D.MPerClassSampler(np.repeat([0, 1], 10), 16, 2)


def test_make_loader_validates():
    lst = D.ImageList(["a.jpg"], np.array([0]))
    with pytest.raises(ValueError, match="loader must be one of"):
        D.make_loader(lst, train=False, batch_size=1, loader="pil")
    with pytest.raises(ValueError, match="normalization must be one of"):
        D.make_loader(lst, train=False, batch_size=1, loader="torch", normalization="caffe")
    with pytest.raises(ValueError, match="resize_size .* must be >= image_size"):
        D.make_loader(lst, train=False, batch_size=1, loader="torch", image_size=64, resize_size=32)
    with pytest.raises(ValueError, match="fewer than one batch"):
        D.make_loader(lst, train=True, batch_size=4, loader="torch")


def test_dali_missing_is_a_clear_error(images, monkeypatch):
    monkeypatch.setattr(D, "dali_available", lambda: False)
    with pytest.raises(ImportError, match="pip install nvidia-dali"):
        D.make_loader(images, train=False, batch_size=4, loader="dali")
    assert D.make_loader(images, train=False, batch_size=4, loader="auto", num_workers=0).backend == "torch"


@needs_dali
@pytest.mark.parametrize("normalization", ["imagenet", "bn_inception"])
def test_dali_and_torch_eval_agree(images, normalization):
    kw = dict(train=False, batch_size=5, image_size=32, resize_size=40, normalization=normalization)
    dali = D.make_loader(images, loader="dali", num_workers=2, **kw)
    tv = D.make_loader(images, loader="torch", num_workers=0, **kw)
    assert (dali.backend, tv.backend) == ("dali", "torch") and len(dali) == len(tv) == 5
    xd, yd = _collect(dali)
    xt, yt = _collect(tv)
    assert xd.shape == xt.shape == (24, 3, 32, 32) and xd.dtype == xt.dtype == torch.float32
    assert yd.dtype == yt.dtype == torch.int64 and torch.equal(yd, yt) and torch.equal(yd, torch.from_numpy(images.labels))
    scale = 1.0 if normalization == "bn_inception" else 1 / (0.226 * 255)  # one grey level in output units
    diff = (xd - xt).abs()
    assert diff.mean() < 1.5 * scale and diff.max() < 12 * scale
    assert float(xd.std()) > 10 * scale  # real content, not a constant
    if normalization == "bn_inception":  # BGR, 0-255 minus the mean: channel 0 is blue
        raw = np.asarray(Image.open(images.paths[1]).convert("RGB").resize((40, 40)), dtype=np.float32)
        assert abs(float(xd[1, 0].mean()) + 104 - raw[..., 2].mean()) < 6


@needs_dali
@pytest.mark.parametrize("m", [None, 2])
def test_dali_and_torch_train_batches(images, m):
    kw = dict(train=True, batch_size=8, image_size=24, samples_per_class=m, seed=7)
    outs = {}
    for backend in ("dali", "torch"):
        ld = D.make_loader(images, loader=backend, num_workers=0 if backend == "torch" else 1, **kw)
        ld.set_epoch(3)
        xs, ys = _collect(ld)
        assert xs.shape == (24, 3, 24, 24) and xs.dtype == torch.float32 and ys.dtype == torch.int64
        outs[backend] = ys
        ld.set_epoch(3)
        assert torch.equal(_collect(ld)[1], ys)
    assert torch.equal(outs["dali"], outs["torch"])  # the same sampler drives both
    if m is None:
        assert sorted(outs["torch"].tolist()) == sorted(images.labels.tolist())


def test_torch_train_augmentation_reproducible(images):
    ld = D.make_loader(images, train=True, batch_size=6, image_size=24, loader="torch", num_workers=2, seed=1)
    ld.set_epoch(0)
    a, _ = _collect(ld)
    ld.set_epoch(0)
    b, _ = _collect(ld)
    ld.set_epoch(1)
    c, _ = _collect(ld)
    assert torch.equal(a, b) and not torch.equal(a, c)


@needs_dali
def test_dali_early_break_then_full_epoch(images):
    ld = D.make_loader(images, train=False, batch_size=5, image_size=16, loader="dali", num_workers=1)
    for _ in ld:
        break
    xs, ys = _collect(ld)
    assert len(ys) == 24 and torch.equal(ys, torch.from_numpy(images.labels))


@needs_dali
def test_corrupt_image_reaches_no_loader(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (20, 20), (200, 10, 10)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:100])
    from dmlfast.data._common import check_images

    lst = D.ImageList([str(good), str(bad)], np.array([0, 1]), dataset="test", split="x")
    with pytest.warns(UserWarning, match="bad.jpg"):
        kept = check_images(lst, strict=False)
    x, y = next(iter(D.make_loader(kept, train=False, batch_size=2, image_size=8, loader="dali")))
    assert x.shape == (1, 3, 8, 8) and y.tolist() == [0]
