"""Dataset readers on tiny datasets written in each true layout."""
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dmlfast.data as D

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def _jpeg(path: Path, seed: int, size=(24, 20), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path, "JPEG")


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


@pytest.fixture
def cub(tmp_path):
    images = tmp_path / "CUB_200_2011" / "images"
    for c in range(200):
        folder = images / f"{c + 1:03d}.Bird_{c}"
        for k in range(1 + (c % 2)):
            _jpeg(folder / f"img_{k}.jpg", c * 10 + k, size=(8, 8))
    (images / "001.Bird_0" / "._img_0.jpg").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    return tmp_path


def test_cub_splits_and_labels(cub):
    with pytest.warns(UserWarning, match=r"CUB: counts differ.*train: 150 images, published 5,864"):
        s = D.load_dataset("CUB", cub)
    assert (len(s.train), len(s.test)) == (150, 150)
    assert s.train.num_classes == s.test.num_classes == 100
    assert set(s.train.labels.tolist()) == set(range(100)) == set(s.test.labels.tolist())
    assert s.train.class_ids[0] == "001.Bird_0" and s.test.class_ids[0] == "101.Bird_100"
    assert not any(Path(p).name.startswith("._") for p in s.train.paths)
    assert s.test.paths[s.test.labels.tolist().index(0)].endswith("101.Bird_100/img_0.jpg")


def test_cub_missing_images_folder(tmp_path):
    with pytest.raises(D.DatasetLayoutError, match=r"missing folder .*images(.|\n)*expected layout(.|\n)*caltech"):
        D.load_dataset("CUB", tmp_path)


@pytest.mark.filterwarnings("ignore:CUB. counts differ")
def test_corrupt_jpeg_skipped_or_strict(cub):
    bad = cub / "CUB_200_2011" / "images" / "150.Bird_149" / "img_1.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.warns(UserWarning, match=r"skipping 1 corrupt(.|\n)*img_1.jpg: truncated JPEG"):
        s = D.load_dataset("CUB", cub)
    assert len(s.test) == 149 and str(bad) not in s.test.paths
    with pytest.raises(D.CorruptImageError, match="img_1.jpg"):
        _quiet(D.load_dataset, "CUB", cub, strict=True)


def _write_cars(root: Path, classes, test_flags):
    from scipy.io import savemat

    rows = []
    for i, (c, t) in enumerate(zip(classes, test_flags)):
        rel = f"car_ims/{i + 1:06d}.jpg"
        _jpeg(root / rel, i, size=(10, 8))
        rows.append((rel, 1, 2, 9, 7, c, t))
    dtype = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("test", "O")]
    annos = np.array([tuple(np.array([[v]]) if not isinstance(v, str) else np.array([v]) for v in r) for r in rows], dtype=dtype)
    savemat(root / "cars_annos.mat", {"annotations": annos.reshape(1, -1), "class_names": np.array(["a"], dtype=object)})


def test_cars196_mat(tmp_path):
    classes = [1, 1, 98, 99, 150, 196, 196, 50]
    _write_cars(tmp_path, classes, [0, 1, 0, 1, 0, 1, 0, 0])
    s = _quiet(D.load_dataset, "Cars196", tmp_path)
    assert len(s.train) == 4 and len(s.test) == 4
    assert s.train.class_ids == ["1", "50", "98"] and s.test.class_ids == ["99", "150", "196"]
    assert s.train.labels.tolist() == [0, 0, 2, 1] and s.test.labels.tolist() == [0, 1, 2, 2]
    assert s.test.paths[0].endswith("car_ims/000004.jpg")


def test_cars196_missing_mat(tmp_path):
    (tmp_path / "car_ims").mkdir()
    with pytest.raises(D.DatasetLayoutError, match=r"missing file .*cars_annos.mat(.|\n)*stanford"):
        D.load_dataset("Cars196", tmp_path)


def test_cars196_missing_listed_image(tmp_path):
    _write_cars(tmp_path, [1, 99], [0, 1])
    (tmp_path / "car_ims" / "000002.jpg").unlink()
    with pytest.raises(D.DatasetLayoutError, match=r"000002.jpg(.|\n)*1 of 2 listed images are missing"):
        D.load_dataset("Cars196", tmp_path)


def test_sop_lists(tmp_path):
    header = "image_id class_id super_class_id path\n"
    train = [(1, 1, 1, "bicycle_final/111_0.JPG"), (2, 1, 1, "bicycle_final/111_1.JPG"), (3, 11318, 12, "toaster_final/222_0.JPG")]
    test = [(4, 11319, 1, "bicycle_final/333_0.JPG"), (5, 22634, 12, "toaster_final/444_0.JPG"), (6, 22634, 12, "toaster_final/444_1.JPG")]
    for name, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        (tmp_path / name).write_text(header + "".join(" ".join(map(str, r)) + "\n" for r in rows))
        for k, r in enumerate(rows):
            _jpeg(tmp_path / r[3], r[0], mode="L" if k == 0 else "RGB")
    s = _quiet(D.load_dataset, "SOP", tmp_path)
    assert s.train.labels.tolist() == [0, 0, 1] and s.train.class_ids == ["1", "11318"]
    assert s.test.labels.tolist() == [0, 1, 1] and s.test.class_ids == ["11319", "22634"]
    assert s.train.paths[0].endswith("bicycle_final/111_0.JPG")
    (tmp_path / "Ebay_test.txt").unlink()
    with pytest.raises(D.DatasetLayoutError, match=r"Ebay_test.txt(.|\n)*Ebay_train.txt, <root>/Ebay_test.txt"):
        D.load_dataset("SOP", tmp_path)


def test_inshop_query_gallery_share_mapping(tmp_path):
    rows = [("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
            ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
            ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "train"),
            ("img/WOMEN/Skirts/id_00000001/02_1_front.jpg", "id_00000001", "query"),
            ("img/WOMEN/Skirts/id_00000007/02_1_front.jpg", "id_00000007", "query"),
            ("img/WOMEN/Skirts/id_00000001/02_2_side.jpg", "id_00000001", "gallery"),
            ("img/WOMEN/Skirts/id_00000009/02_2_side.jpg", "id_00000009", "gallery")]
    (tmp_path / "Eval").mkdir()
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(f"{a}   {b}  {c}\n" for a, b, c in rows)
    (tmp_path / "Eval" / "list_eval_partition.txt").write_text(text)
    for i, (p, _, _) in enumerate(rows):
        _jpeg(tmp_path / p, i)
    s = _quiet(D.load_dataset, "In-shop", tmp_path)
    assert s.test is None
    assert s.train.labels.tolist() == [0, 0, 1] and s.train.class_ids == ["id_00000002", "id_00000080"]
    assert s.query.class_ids == s.gallery.class_ids == ["id_00000001", "id_00000007", "id_00000009"]
    assert s.query.labels.tolist() == [0, 1] and s.gallery.labels.tolist() == [0, 2]
    assert s.query.num_classes == s.gallery.num_classes == 3
    (tmp_path / "Eval" / "list_eval_partition.txt").unlink()
    with pytest.raises(D.DatasetLayoutError, match=r"list_eval_partition.txt(.|\n)*DeepFashion"):
        D.load_dataset("In-shop", tmp_path)


def test_omniglot_official_layout(tmp_path):
    for split, alphabet, n_chars in (("images_background", "Latin", 3), ("images_evaluation", "Oriya", 2)):
        for c in range(n_chars):
            for d in range(2):
                p = tmp_path / split / alphabet / f"character{c + 1:02d}" / f"{c:02d}{d:02d}_{d + 1:02d}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.eye(12, dtype=bool)).save(p)
    with pytest.warns(UserWarning, match="Omniglot: counts differ"):
        s = D.load_dataset("Omniglot", tmp_path)
    assert s.train.num_classes == 3 and s.test.num_classes == 2 and len(s.train) == 6
    assert s.train.class_ids[0] == "Latin/character01" and s.test.class_ids == ["Oriya/character01", "Oriya/character02"]


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"Omniglot small sets not found at {OMNIGLOT}")
def test_omniglot_small_sets(tmp_path):
    for z in sorted(OMNIGLOT.glob("images_background_small*.zip")):
        with zipfile.ZipFile(z) as f:
            f.extractall(tmp_path)
    s = D.load_dataset("Omniglot", tmp_path)
    train, test = set(s.train.class_ids), set(s.test.class_ids)
    assert not train & test
    assert len(train) + len(test) == 242  # 288 character folders, 46 Greek/Latin ones present in both zips
    assert len(s.train) + len(s.test) == 20 * 242
    assert all(np.bincount(lst.labels).tolist() == [20] * lst.num_classes for lst in (s.train, s.test))
    with Image.open(s.test.paths[0]) as im:
        assert im.size == (105, 105)


def test_load_dataset_validates_arguments():
    with pytest.raises(ValueError, match="unknown dataset 'cub'"):
        D.load_dataset("cub", "/x")
    with pytest.raises(ValueError, match="needs root"):
        D.load_dataset("SOP")
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        D.ImageList(["a", "b"], np.array([0, 2]), ["x", "y"])
    assert D.remap_labels([7, 3, 7])[0].tolist() == [1, 0, 1]
