"""The user's own data: ``folder`` and ``csv`` readers on generated trees, and their command-line wiring."""
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dmlfast.data as D
from dmlfast import evaluate, train
from dmlfast.data.custom import parse_test_classes, split_classes
from dmlfast.recipes import resolve_recipe


def _png(path: Path, seed: int, size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _tree(root: Path, classes=8, per_class=3) -> Path:
    for c in range(classes):
        for i in range(per_class):
            _png(root / f"class_{c}" / f"{i}.png", c * 100 + i)
    return root


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def test_folder_class_split_is_disjoint_and_deterministic(tmp_path):
    root = _tree(tmp_path / "data", classes=10)
    (root / "class_0" / "notes.txt").write_text("not an image")
    (root / "class_0" / "._0.png").write_bytes(b"mac resource fork")
    a = D.load_dataset("folder", root, test_classes=0.3, seed=1)
    b = D.load_dataset("folder", root, test_classes=3, seed=1)
    c = D.load_dataset("folder", root, test_classes=3, seed=2)
    assert a.train.num_classes == 7 and a.test.num_classes == 3
    assert set(a.train.class_ids).isdisjoint(a.test.class_ids)
    assert sorted(a.train.class_ids + a.test.class_ids) == [f"class_{i}" for i in range(10)]
    assert a.test.class_ids == b.test.class_ids  # 0.3 of 10 classes = 3, same seed, same classes
    assert c.test.class_ids != a.test.class_ids  # another seed, another split (fixed for these seeds)
    assert len(a.train) == 21 and len(a.test) == 9 and not any(p.endswith(".txt") or "._" in p for p in a.train.paths)
    for lst in (a.train, a.test):
        assert sorted(set(lst.labels.tolist())) == list(range(lst.num_classes))
        for path, label in zip(lst.paths, lst.labels):
            assert Path(path).parent.name == lst.class_ids[label]


def _real_files(splits):
    return {split: [os.path.realpath(p) for p in lst.paths] for split, lst in splits.splits().items()}


def test_folder_links_never_read_a_folder_twice(tmp_path):
    """``ln -s .. class_0/loop`` used to read the whole tree again under class_0 about 40 times
    (relabelled, leaking training images into the test split); links to another class, to the
    root, or a second link to one outside folder are skipped too, with one warning naming them."""
    root = _tree(tmp_path / "data", classes=6)
    outside = tmp_path / "more"
    _png(outside / "m.png", 999)
    (root / "class_0" / "loop").symlink_to("..")
    (root / "class_1" / "other_class").symlink_to(root / "class_2")
    (root / "class_3" / "extra").symlink_to(outside)  # a folder outside the tree: read, once
    (root / "class_4" / "extra_again").symlink_to(outside)
    with pytest.warns(UserWarning, match=r"skipped 3 folder link\(s\).*class_0/loop -> \.\.") as caught:
        splits = D.load_dataset("folder", root, test_classes=0.5, seed=0)
    message = str(caught[0].message)
    assert "class_1/other_class" in message and "class_4/extra_again" in message
    files = _real_files(splits)
    every = files["train"] + files["test"]
    assert len(every) == len(set(every)) == 6 * 3 + 1  # each real image once
    assert not set(files["train"]) & set(files["test"])
    extra = os.path.realpath(outside / "m.png")
    lst = splits.train if extra in files["train"] else splits.test
    assert lst.class_ids[lst.labels[lst.paths.index(str(root / "class_3" / "extra" / "m.png"))]] == "class_3"


def test_presplit_folder_link_into_the_other_split_is_skipped(tmp_path):
    root = tmp_path / "data"
    _tree(root / "train", classes=2)
    _tree(root / "test", classes=2)
    (root / "train" / "class_0" / "leak").symlink_to(root / "test")
    (root / "test" / "class_1" / "up").symlink_to(root)
    with pytest.warns(UserWarning, match=r"skipped 2 folder link"):
        splits = _quiet_class_overlap(D.load_dataset, "folder", root)
    files = _real_files(splits)
    assert len(files["train"]) == len(files["test"]) == 6 and not set(files["train"]) & set(files["test"])


def _quiet_class_overlap(fn, *args, **kw):
    """``fn`` with the warning about class names in both splits silenced (the other warnings pass)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*are in both")
        return fn(*args, **kw)


def test_imagefolder_reader_link_loop(tmp_path):
    from dmlfast.data.readers import _image_folder

    images = _tree(tmp_path / "images", classes=3)
    (images / "class_2" / "loop").symlink_to(images)
    with pytest.warns(UserWarning, match="skipped 1 folder link"):
        classes, paths, labels = _image_folder(images)
    assert classes == ["class_0", "class_1", "class_2"] and len(paths) == len(set(paths)) == 9
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_split_classes_bounds():
    names = [f"c{i}" for i in range(5)]
    assert len(split_classes(names, 0.01, 0)[1]) == 1 and len(split_classes(names, 0.99, 0)[1]) == 4
    with pytest.raises(ValueError, match="leaves no training class"):
        split_classes(names, 5, 0)
    assert parse_test_classes("50") == 50 and parse_test_classes("0.25") == 0.25
    for bad in ("0", "1.0", "-2", "half"):
        with pytest.raises(ValueError, match="fraction"):
            parse_test_classes(bad)


def test_folder_presplit_single_image_classes_and_corrupt_images(tmp_path):
    root = tmp_path / "data"
    _tree(root / "train", classes=3)
    _tree(root / "test", classes=2)
    _png(root / "test" / "lonely" / "only.png", 7)
    (root / "test" / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.warns(UserWarning) as record:
        splits = D.load_dataset("folder", root)
    messages = "\n".join(str(w.message) for w in record)
    assert "1 class(es) have a single image and cannot be queried" in messages and "lonely" in messages
    assert "skipping 1 corrupt or truncated image(s)" in messages and "broken.png" in messages
    assert "are in both" in messages and "class_0" in messages  # train/ and test/ share class names
    assert splits.train.num_classes == 3 and len(splits.test) == 7 and splits.test.num_classes == 3
    with pytest.raises(D.CorruptImageError, match="broken.png"):
        _quiet(D.load_dataset, "folder", root, strict=True)
    with pytest.raises(D.DatasetLayoutError, match="split already"):
        D.load_dataset("folder", root, test_classes=2)


def test_folder_layout_errors(tmp_path):
    with pytest.raises(D.DatasetLayoutError, match="--test-classes"):
        D.load_dataset("folder", _tree(tmp_path / "a", classes=3))
    (tmp_path / "b" / "only").mkdir(parents=True)
    _png(tmp_path / "b" / "only" / "x.png", 0)
    with pytest.raises(D.DatasetLayoutError, match="found 1 class folder"):
        D.load_dataset("folder", tmp_path / "b", test_classes=1)
    with pytest.raises(ValueError, match="takes options"):
        D.load_dataset("CUB", tmp_path, test_classes=1)
    with pytest.raises(ValueError, match="takes options"):
        D.load_dataset("folder", tmp_path, list_file="x.csv")


def _csv_tree(root: Path, rows) -> Path:
    for path, label, *_ in rows:
        if path != "path":
            _png(root / path, zlib.crc32(path.encode()) % 1000)
    (root / "list.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    return root / "list.csv"


def test_csv_with_query_gallery_shares_one_mapping(tmp_path):
    rows = [("path", "label", "split")]
    rows += [(f"tr/{c}_{i}.png", f"item{c}", "train") for c in range(3) for i in range(2)]
    rows += [(f"ev/{c}_q.png", f"sku{c}", "query") for c in range(3)]
    rows += [(f"ev/{c}_g{i}.png", f"sku{c}", "gallery") for c in range(1, 4) for i in range(2)]
    listing = _csv_tree(tmp_path / "root", rows)
    with pytest.warns(UserWarning, match=r"csv query: 1 class\(es\) have no image in the gallery split.*sku0"):
        splits = D.load_dataset("csv", tmp_path / "root", list_file=listing)
    assert splits.test is None and splits.train.num_classes == 3
    assert splits.query.class_ids == splits.gallery.class_ids == ["sku0", "sku1", "sku2", "sku3"]
    q = dict(zip(splits.query.paths, splits.query.labels))
    g = dict(zip(splits.gallery.paths, splits.gallery.labels))
    assert q[str(tmp_path / "root" / "ev/1_q.png")] == g[str(tmp_path / "root" / "ev/1_g0.png")] == 1
    # the list file may also be given relative to the root
    assert len(_quiet(D.load_dataset, "csv", tmp_path / "root", list_file="list.csv").gallery) == 6


def test_csv_without_split_column_splits_classes(tmp_path):
    rows = [(f"img/{c}/{i}.png", f"label {c}") for c in range(6) for i in range(2)]
    listing = _csv_tree(tmp_path, rows)
    splits = D.load_dataset("csv", tmp_path, list_file=listing, test_classes=2, seed=3)
    assert splits.test.num_classes == 2 and splits.train.num_classes == 4
    assert set(splits.train.class_ids).isdisjoint(splits.test.class_ids)
    with pytest.raises(D.DatasetLayoutError, match="no split column"):
        D.load_dataset("csv", tmp_path, list_file=listing)


def test_csv_bad_rows_are_listed_with_line_numbers(tmp_path):
    rows = [("path", "label", "split"), ("a.png", "1", "train"), ("b.png", "", "train"), ("c.png", "2", "validation"),
            ("/abs/d.png", "2", "test"), ("e.png", "3"), ("f.png", "3", "test")]
    listing = _csv_tree(tmp_path, [r for r in rows if not r[0].startswith("/")])
    listing.write_text("\n".join(",".join(r) for r in rows) + "\n")
    with pytest.raises(D.DatasetLayoutError) as info:
        D.load_dataset("csv", tmp_path, list_file=listing)
    message = str(info.value)
    assert "4 bad row(s)" in message and "\n" not in message
    for expected in ("line 3: empty label", "line 4: split must be one of train|test|query|gallery, got 'validation'",
                     "line 5: path '/abs/d.png' is absolute", "line 6: has 2 columns where line 2 has 3"):
        assert expected in message


def test_csv_missing_files_first_few_and_count(tmp_path):
    rows = [(f"{i}.png", str(i % 2), "train" if i < 4 else "test") for i in range(12)]
    listing = _csv_tree(tmp_path, rows[:4])
    listing.write_text("\n".join(",".join(r) for r in rows) + "\n")
    with pytest.raises(D.DatasetLayoutError) as info:
        D.load_dataset("csv", tmp_path, list_file=listing)
    message = str(info.value)
    assert "8 of 12 images listed in" in message and "are missing" in message
    assert str(tmp_path / "4.png") in message and "and 3 more" in message and str(tmp_path / "11.png") not in message


def test_csv_split_values_and_duplicates(tmp_path):
    listing = _csv_tree(tmp_path, [("a.png", "1", "train"), ("b.png", "1", "query")])
    with pytest.raises(D.DatasetLayoutError, match="train and test, or train, query and gallery; found query, train"):
        D.load_dataset("csv", tmp_path, list_file=listing)
    listing.write_text("a.png,1,train\nb.png,1,test\na.png,2,test\n")
    with pytest.raises(D.DatasetLayoutError, match="listed twice: line 3: a.png"):
        D.load_dataset("csv", tmp_path, list_file=listing)
    with pytest.raises(D.DatasetLayoutError, match="no such list file"):
        D.load_dataset("csv", tmp_path, list_file="nope.csv")


def test_csv_paths_that_escape_the_root_or_alias_another_row_are_errors(tmp_path):
    """``../x.png`` read files outside --data-root, and ``./a.png`` next to ``a.png`` (or a link to
    it) listed one image twice, possibly under two labels; both used to pass."""
    root = tmp_path / "root"
    _png(root / "a.png", 1)
    _png(root / "b.png", 2)
    _png(root / "sub" / "c.png", 3)
    _png(tmp_path / "outside.png", 4)
    (root / "also_a.png").symlink_to(root / "a.png")
    listing = root / "list.csv"
    listing.write_text("a.png,1,train\nb.png,1,train\n../outside.png,2,test\nsub/../../outside.png,2,test\nsub/c.png,2,test\n")
    with pytest.raises(D.DatasetLayoutError, match=r"2 bad row\(s\): line 3: path '../outside.png' leads outside the data root.*"
                                                   r"line 4: path 'sub/../../outside.png' leads outside"):
        D.load_dataset("csv", root, list_file=listing)
    listing.write_text("a.png,1,train\nb.png,1,train\n./a.png,2,test\nsub/c.png,2,test\nsub/./c.png,2,test\n")
    with pytest.raises(D.DatasetLayoutError, match=r"2 path\(s\) listed twice: line 3: ./a.png \(a.png, first on line 1\), "
                                                   r"line 5: sub/./c.png \(sub/c.png, first on line 4\)"):
        D.load_dataset("csv", root, list_file=listing)
    listing.write_text("a.png,1,train\nb.png,1,train\nalso_a.png,2,test\nsub/c.png,2,test\n")
    with pytest.raises(D.DatasetLayoutError, match=r"1 file\(s\) listed twice under other names: line 3: also_a.png is "
                                                   r"a.png \(line 1\)"):
        D.load_dataset("csv", root, list_file=listing)


def test_custom_recipe_uses_resnet50_with_torchvision_weights():
    for dataset in ("folder", "csv"):
        recipe = resolve_recipe(dataset, "ProxyAnchor")
        assert recipe.model == "resnet50" and recipe.weights == "imagenet" and recipe.batch_size == 120
        small = resolve_recipe(dataset, "ProxyAnchor", "smallcnn")
        assert (small.model, small.weights, small.freeze_bn, small.lr, small.warmup_epochs) == ("smallcnn", "none", False, 2e-3, 0)


def _one_error_line(capsys, prog):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"python -m dmlfast.{prog}: error: "), err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "csv", "--data-root", "."], "--dataset csv needs --list FILE.csv"),
    (["--dataset", "folder", "--data-root", ".", "--list", "x.csv"], "--list applies to --dataset csv"),
    (["--dataset", "CUB", "--data-root", ".", "--test-classes", "3"], "--test-classes applies to --dataset folder or csv"),
    (["--dataset", "folder", "--data-root", "DATA", "--model", "smallcnn"], "--test-classes N|FRACTION"),
    (["--dataset", "csv", "--data-root", "DATA", "--list", "DATA/bad.csv", "--model", "smallcnn"], "line 1: empty label"),
])
def test_train_cli_errors_for_custom_data(extra, message, tmp_path, capsys):
    _tree(tmp_path / "data", classes=3)
    (tmp_path / "data" / "bad.csv").write_text("class_0/0.png,\n")
    extra = [a.replace("DATA", str(tmp_path / "data")) for a in extra]
    assert train.main([*extra, "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert message in _one_error_line(capsys, "train")


def test_train_and_evaluate_on_a_folder(tmp_path, capsys):
    root = _tree(tmp_path / "data", classes=8, per_class=4)
    out = tmp_path / "run"
    args = ["--dataset", "folder", "--data-root", str(root), "--test-classes", "0.5", "--model", "smallcnn", "--epochs", "1",
            "--batch-size", "8", "--image-size", "16", "--embedding-size", "16", "--workers", "0", "--loader", "torch",
            "--no-progress", "--output", str(out)]
    assert train.main(args) == 0
    config = (out / "config.json").read_text()
    assert '"test_classes": 0.5' in config and '"dataset": "folder"' in config
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(out / "best.pt"), "--no-progress", "--device", "cpu", "--workers", "0"]) == 0
    assert "recall@1" in capsys.readouterr().out
    # the held-out classes of the run are reproduced from its seed: another --test-classes is another split
    assert evaluate.main(["--checkpoint", str(out / "best.pt"), "--no-progress", "--device", "cpu", "--workers", "0",
                          "--test-classes", "7"]) == 0
    assert evaluate.main(["--checkpoint", str(out / "best.pt"), "--dataset", "csv", "--data-root", str(root)]) == 2
    assert "--list" in _one_error_line(capsys, "evaluate")


def _corrupt_middle_jpeg(path: Path) -> Path:
    """A JPEG with both end markers whose entropy-coded middle is overwritten with 0xFF bytes:
    it passes a marker check, and decoding it raises ``OSError: broken data stream``."""
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 400] = b"\xff" * 400
    path.write_bytes(bytes(data))
    return path


def _bomb_png(path: Path, side: int = 65000) -> Path:
    """A 100-byte PNG whose header claims ``side`` x ``side`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_undecodable_images_and_bombs_are_skipped_at_load_time_and_never_reach_a_loader(tmp_path, capsys):
    """Both used to pass the marker check, then kill a DataLoader worker (training, evaluation, retrieve)."""
    root = _tree(tmp_path / "data", classes=4, per_class=4)
    broken = _corrupt_middle_jpeg(root / "class_0" / "broken.jpg")
    bomb = _bomb_png(root / "class_3" / "bomb.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = D.load_dataset("folder", root, test_classes=2, seed=0)
    for lst in (splits.train, splits.test):
        for train_mode in (True, False):
            loader = D.make_loader(lst, train=train_mode, batch_size=4, image_size=16, loader="torch", num_workers=0)
            assert sum(len(y) for _, y in loader) == (len(lst) // 4 * 4 if train_mode else len(lst))
    message = " ".join(str(w.message) for w in caught)
    assert str(broken) in message and "broken data stream" in message
    assert str(bomb) in message and "decompression bomb: its header claims 4,225,000,000 pixels" in message
    assert len(splits.train) + len(splits.test) == 16
    with pytest.raises(D.CorruptImageError, match="broken.jpg"):
        D.load_dataset("folder", root, strict=True, test_classes=2, seed=0)
    status = _quiet(train.main, ["--dataset", "folder", "--data-root", str(root), "--test-classes", "2", "--model", "smallcnn",
                                 "--epochs", "1", "--batch-size", "4", "--image-size", "16", "--embedding-size", "8",
                                 "--workers", "0", "--loader", "torch", "--no-progress", "--output", str(tmp_path / "run")])
    assert status == 0, capsys.readouterr().err
