"""The built-in glyph set: counts, disjoint splits, deterministic rendering, confusable removal."""
import json

import numpy as np
import pytest
from PIL import Image

import dmlfast.data as D
from dmlfast.data import glyphs


@pytest.fixture(scope="session")
def glyph_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("glyph_cache")
    D.load_dataset("glyphs", root)  # renders once (about 15 s on 2 cores)
    return root


def _manifest(root):
    return json.loads((glyphs.glyph_dir(root) / "manifest.json").read_text())


def test_counts_and_disjoint_splits(glyph_root):
    s = D.load_dataset("glyphs", glyph_root)
    m = _manifest(glyph_root)
    n_classes = len(m["classes"])
    assert n_classes >= 300 and s.train.num_classes + s.test.num_classes == n_classes
    assert min(len(c["faces"]) for c in m["classes"]) >= 12
    per_class = np.bincount(s.train.labels)
    assert per_class.min() >= 12 * glyphs.VARIANTS and len(s.train) + len(s.test) == len(m["images"])
    assert not set(s.train.class_ids) & set(s.test.class_ids)
    assert min(s.train.num_classes, s.test.num_classes) > 0.4 * n_classes
    with Image.open(s.test.paths[0]) as im:
        assert im.size == (glyphs.CANVAS, glyphs.CANVAS) and im.mode == "L"
        px = np.asarray(im)
    assert px[0, 0] == 255 and px.min() < 64  # dark glyph on white


def test_confusables_and_notdef_dropped(glyph_root):
    chars = {c["char"] for c in _manifest(glyph_root)["classes"]}
    assert {"A", "B", "a", "x", "Q", "O", "ж", "Ω", "∑"} <= chars
    assert not {"Α", "А", "В", "х", "Ε", "К"} & chars  # Greek Alpha, Cyrillic A/Ve/ha, Greek Epsilon, Cyrillic Ka
    # Computer Modern faces cover ASCII letters, never a TeX-encoded slot such as cmr10's U+00A1 ("Gamma")
    by_char = {c["char"]: c["faces"] for c in _manifest(glyph_root)["classes"]}
    assert "cmr10" in by_char["A"] and "cmr10" not in by_char["¡"]


def test_renders_identically_twice(glyph_root, tmp_path):
    m = _manifest(glyph_root)
    some = [c["codepoint"] for c in m["classes"][::40]]
    again = glyphs.render_glyphs(tmp_path, codepoints=some, progress=False)
    first = {im["path"]: im["sha256"] for im in m["images"] if im["codepoint"] in set(some)}
    assert {im["path"]: im["sha256"] for im in again["images"]} == first and len(first) >= 12 * len(some)
    with pytest.raises(ValueError, match="not in the glyph set"):
        glyphs.render_glyphs(tmp_path, codepoints=[ord("Α")], progress=False)


def test_loader_defaults_for_glyphs(glyph_root):
    s = D.load_dataset("glyphs", glyph_root)
    x, y = next(iter(D.make_loader(s.train, train=True, batch_size=32, samples_per_class=4, loader="torch", num_workers=0)))
    assert x.shape == (32, 3, 32, 32) and np.unique(y.numpy(), return_counts=True)[1].tolist() == [4] * 8
    assert D.DATASET_DEFAULTS["glyphs"].image_size == 32 and not D.DATASET_DEFAULTS["glyphs"].hflip
