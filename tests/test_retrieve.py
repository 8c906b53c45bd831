"""``python -m dmlfast.retrieve`` on a tiny checkpoint trained on a generated class-folder dataset."""
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import train_tiny_folder_run
from dmlfast import retrieve

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data root, checkpoint) of a 1-epoch smallcnn run on a 4 + 4 class folder dataset."""
    return train_tiny_folder_run(tmp_path_factory.mktemp("retrieve"), seed=0, test_classes="0.5")


def _ranked(stdout: str):
    """``[(rank, similarity, path)]`` of the printed list."""
    rows = []
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0].isdigit():
            rows.append((int(parts[0]), float(parts[1]), parts[-1]))
    return rows


def test_gallery_folder_query_is_left_out_of_its_results_and_grid_has_the_documented_size(tiny, tmp_path, capsys):
    root, checkpoint = tiny
    query = root / "class_3" / "1.png"
    out = tmp_path / "grid.png"
    args = ["--checkpoint", str(checkpoint), "--query", str(query), "--gallery", str(root), "--top", "10", "--out", str(out),
            "--workers", "0", "--no-progress"]
    assert retrieve.main(args) == 0
    text = capsys.readouterr().out
    ranked = _ranked(text)
    assert [r[0] for r in ranked] == list(range(1, 11))
    assert str(query) not in [r[2] for r in ranked] and len({r[2] for r in ranked}) == 10  # the query is a gallery image
    assert ranked[0][1] < 1.0 - 1e-4
    assert all(a[1] >= b[1] for a, b in zip(ranked, ranked[1:]))
    assert "query: " + str(query) + " (label class_3)" in text and "32 images embedded, cached in" in text
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == retrieve.grid_size(10) == (9 * retrieve.CELL_WIDTH, 2 * retrieve.CELL_HEIGHT)
        # the query's label is known (it is a gallery image): results framed green or red; the query blue
        assert image.getpixel((retrieve.CELL_WIDTH + 2, 2)) in (retrieve.COLOURS["correct"], retrieve.COLOURS["wrong"])
        assert image.getpixel((2, 2)) == retrieve.COLOURS["query"]
    cache = list(checkpoint.parent.glob("best.gallery-*.pt"))
    assert len(cache) >= 1
    # a second run never replaces the grid unasked; with --overwrite the gallery comes from the cache, same ranking
    grid = out.read_bytes()
    assert retrieve.main(args) == 2
    assert "--out" in capsys.readouterr().err and out.read_bytes() == grid
    assert retrieve.main([*args, "--overwrite"]) == 0
    again = capsys.readouterr().out
    assert "32 images cached in" in again and _ranked(again) == ranked


def test_dataset_split_gallery_and_unknown_query_label(tiny, tmp_path, capsys):
    root, checkpoint = tiny
    outside = tmp_path / "photo.png"
    Image.open(root / "class_0" / "0.png").save(outside)
    out = tmp_path / "g.png"
    assert retrieve.main(["--checkpoint", str(checkpoint), "--query", str(outside), "--top", "3", "--out", str(out),
                          "--workers", "0", "--no-progress", "--no-cache"]) == 0
    text = capsys.readouterr().out
    assert "16 images embedded;" in text  # the run's 4 held-out classes x 4 images, not cached
    assert len(_ranked(text)) == 3 and "(label" not in text
    with Image.open(out) as image:
        assert image.size == retrieve.grid_size(3) == (4 * retrieve.CELL_WIDTH, retrieve.CELL_HEIGHT)
        assert image.getpixel((retrieve.CELL_WIDTH + 2, 2)) == retrieve.COLOURS["unknown"]


@pytest.mark.parametrize("extra, message", [
    (["--query", "MISSING.png"], "--query: no such file"),
    (["--top", "0"], "--top must be at least 1"),
    (["--top", "40", "--gallery", "DATA"], "--top 40 is more than the gallery's 31 images besides the query itself"),
    (["--gallery", "DATA", "--dataset", "glyphs"], "cannot be combined"),
    (["--gallery", "DATA/nope"], "--gallery: no such folder"),
    (["--dataset", "csv", "--data-root", "DATA"], "--dataset csv needs --list"),
    (["--split", "query"], "--split: folder has no query split"),
])
def test_input_errors_are_one_line(tiny, extra, message, tmp_path, capsys):
    root, checkpoint = tiny
    extra = [a.replace("DATA", str(root)) for a in extra]
    args = ["--checkpoint", str(checkpoint), "--query", str(root / "class_0" / "0.png"), "--out", str(tmp_path / "x.png"),
            "--workers", "0", "--no-progress", "--no-cache", *extra]
    assert retrieve.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("python -m dmlfast.retrieve: error: ") and message in err, err


def test_not_a_checkpoint_has_no_traceback(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    Image.new("RGB", (8, 8)).save(tmp_path / "q.png")
    result = subprocess.run([sys.executable, "-m", "dmlfast.retrieve", "--checkpoint", str(tmp_path / "x.pt"), "--query",
                             str(tmp_path / "q.png")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("python -m dmlfast.retrieve: error: --checkpoint: cannot read")
    assert "Traceback" not in result.stderr and "\n" not in result.stderr.strip()


def test_empty_query_image_is_an_input_error(tiny, tmp_path, capsys):
    _, checkpoint = tiny
    (tmp_path / "q.png").write_bytes(b"")
    assert retrieve.main(["--checkpoint", str(checkpoint), "--query", str(tmp_path / "q.png")]) == 2
    err = capsys.readouterr().err
    assert "--query: " in err and "empty file" in err


def test_gallery_link_loop_reads_each_folder_once(tiny, tmp_path, capsys):
    """A link back up the gallery (``ln -s .. class_0/loop``) used to list every image ~40 times
    under class_0's label; it is skipped with a warning naming it."""
    root, checkpoint = tiny
    gallery = tmp_path / "gallery"
    for c in ("class_0", "class_1"):
        (gallery / c).mkdir(parents=True)
        for i in range(2):
            (gallery / c / f"{i}.png").symlink_to(root / c / f"{i}.png")
    (gallery / "class_0" / "loop").symlink_to("..")
    with pytest.warns(UserWarning, match=r"skipped 1 folder link.*class_0/loop -> \.\."):
        status = retrieve.main(["--checkpoint", str(checkpoint), "--query", str(root / "class_1" / "0.png"), "--gallery",
                                str(gallery), "--top", "3", "--out", str(tmp_path / "grid.png"), "--workers", "0",
                                "--no-progress", "--no-cache"])
    assert status == 0
    text = capsys.readouterr().out
    assert "4 images embedded" in text  # the query is one of them (through its link), left out of the results
    assert sorted(r[2].split("/gallery/")[1] for r in _ranked(text)) == ["class_0/0.png", "class_0/1.png", "class_1/1.png"]


def test_a_malicious_gallery_cache_is_refused_and_rebuilt(tiny, tmp_path, capsys):
    import torch

    from dmlfast.training.gallery import cache_key, gallery_from_folder
    from dmlfast.training.setup import load_model

    root, checkpoint = tiny
    copy = tmp_path / "best.pt"
    copy.write_bytes(checkpoint.read_bytes())
    gallery, _ = gallery_from_folder(root)
    _, config, _, dtype = load_model(copy, "cpu")
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    key = cache_key(copy, gallery.paths, config, dtype)
    torch.save({"key": key, "paths": list(gallery.paths), "embeddings": Payload()}, tmp_path / f"best.gallery-{key[:16]}.pt")
    with pytest.warns(UserWarning, match="ignoring it: refusing to load gallery cache"):
        status = retrieve.main(["--checkpoint", str(copy), "--query", str(root / "class_1" / "0.png"), "--gallery", str(root),
                                "--top", "2", "--out", str(tmp_path / "grid.png"), "--workers", "0", "--no-progress"])
    assert status == 0 and not marker.exists()
    assert "32 images embedded, cached in" in capsys.readouterr().out
