"""``python -m dmlfast.plot`` (t-SNE map of a tiny checkpoint's test embeddings) and the training curves PNG."""

import numpy as np
import pytest
from PIL import Image

from conftest import train_tiny_folder_run
from dmlfast import plot
from dmlfast.training import plot_curves


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return train_tiny_folder_run(tmp_path_factory.mktemp("plot"), seed=1, test_classes="4")[1]


def test_tsne_png_of_the_test_classes(checkpoint, capsys):
    assert plot.main(["--checkpoint", str(checkpoint), "--method", "tsne", "--classes", "3", "--workers", "0", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "tsne: 12 images of 3 classes of folder test" in text
    png = checkpoint.parent / "embeddings.png"
    assert f"wrote {png}" in text
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (880, 715)  # 8 x 6.5 in at 110 dpi
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    # three class colours of the tab10 palette are on the canvas (blue, orange, green), not just axes and text
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        assert (np.abs(pixels.astype(int) - colour).sum(axis=1) < 30).sum() > 20, colour
    drawn = png.read_bytes()  # a second map is never drawn over the first unasked
    assert plot.main(["--checkpoint", str(checkpoint), "--method", "tsne", "--classes", "2", "--workers", "0", "--no-progress"]) == 2
    assert f"--out: {png}" in capsys.readouterr().err and png.read_bytes() == drawn


def test_projection_keeps_classes_together():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    x = np.concatenate([c + rng.normal(size=(10, 16)) * 0.3 for c in centres])
    labels = np.repeat(np.arange(3), 10)
    points = plot.project(x, "tsne", seed=0)
    assert points.shape == (30, 2)
    d = ((points[:, None] - points[None]) ** 2).sum(-1) + np.eye(30) * 1e9
    assert (labels[d.argmin(1)] == labels).all()


def test_pick_classes_is_seeded():
    labels = np.repeat(np.arange(10), 3)
    assert plot.pick_classes(labels, 4, 0) == plot.pick_classes(labels, 4, 0)
    assert len(plot.pick_classes(labels, 4, 0)) == 4 and plot.pick_classes(labels, 50, 0) == list(range(10))
    with pytest.raises(ValueError, match="count must be an int >= 1"):
        plot.pick_classes(labels, 0, 0)


def test_missing_packages_name_the_pip_package(monkeypatch, checkpoint, capsys):
    monkeypatch.setattr(plot, "_installed", lambda module: False)
    for method, package in (("umap", "umap-learn"), ("tsne", "scikit-learn"), ("auto", "scikit-learn")):
        assert plot.main(["--checkpoint", str(checkpoint), "--method", method]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("python -m dmlfast.plot: error: ") and f"pip install {package}" in err


def test_input_errors(checkpoint, tmp_path, capsys):
    for extra, message in ((["--classes", "0"], "--classes must be at least 1"),
                           (["--dataset", "CUB"], "needs --data-root"),
                           (["--split", "gallery"], "has no gallery split")):
        assert plot.main(["--checkpoint", str(checkpoint), "--method", "tsne", "--out", str(tmp_path / "x.png"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err


def test_curves_png_draws_map_and_binary_metrics(tmp_path):
    plain = [{"epoch": 0, "loss": None, "recall@1": 0.3, "map@r": 0.1}, {"epoch": 1, "loss": 2.0, "recall@1": 0.5, "map@r": 0.2}]
    binary = [dict(h, **{"binary_recall@1": h["recall@1"] - 0.1, "binary_map@r": h["map@r"] - 0.05}) for h in plain]
    a, b = plot_curves(plain, tmp_path / "a.png"), plot_curves(binary, tmp_path / "b.png")
    with Image.open(a) as ia, Image.open(b) as ib:
        pa, pb = np.asarray(ia.convert("RGB")), np.asarray(ib.convert("RGB"))
    assert pa.shape == pb.shape == (350, 900, 3)
    # MAP@R is the second default colour (orange); the binary curves add green and red
    orange, green, red = (255, 127, 14), (44, 160, 44), (214, 39, 40)
    count = lambda p, c: int((np.abs(p.astype(int) - c).sum(-1) < 30).sum())
    assert count(pa, orange) > 50 and count(pa, green) == 0 and count(pa, red) == 0
    assert count(pb, green) > 50 and count(pb, red) > 50


def test_out_must_be_a_png_and_is_checked_before_any_work(checkpoint, tmp_path, capsys):
    """``--out x.html`` used to embed and project, then die in matplotlib's savefig with a traceback."""
    assert plot.main(["--checkpoint", str(checkpoint), "--method", "tsne", "--out", str(tmp_path / "x.html"), "--workers", "0",
                      "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and err.startswith("python -m dmlfast.plot: error: --out must name a .png file"), err
    assert "x.html" in err and "tsne:" not in captured.out  # nothing was embedded
    assert not list(tmp_path.iterdir())
