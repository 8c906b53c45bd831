"""Using a trained model: ``dmlfast.load`` and ``embed``, ``python -m dmlfast.embed`` (read back by
``evaluate``), ``python -m dmlfast.export`` (ONNX / TorchScript against the PyTorch model) and the
gallery index (``python -m dmlfast.index``), on a tiny checkpoint trained on a generated folder."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dmlfast
from conftest import train_tiny_folder_run
from dmlfast import embed, evaluate, export, index
from dmlfast.evaluation import retrieval_metrics
from dmlfast.inference import GalleryIndex
from dmlfast.training.gallery import gallery_from_folder

HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data root: 8 classes x 4 images, best.pt of a 1-epoch smallcnn run with 16-d embeddings)."""
    return train_tiny_folder_run(tmp_path_factory.mktemp("inference"), seed=0, test_classes="0.5")


@pytest.fixture(scope="module")
def model(tiny):
    return dmlfast.load(tiny[1], device="cpu")


def test_load_holds_model_transform_and_configuration(model, tiny):
    assert not model.model.training and model.device == torch.device("cpu") and model.dtype is None
    assert model.config["model"] == "smallcnn" and model.embedding_size == 16 == model.config["embedding_size"]
    assert (model.transform.image_size, model.transform.normalization) == (16, "imagenet")
    assert model.checkpoint_sha256 == model.checkpoint_sha256 and len(model.checkpoint_sha256) == 64


def test_embed_a_folder_paths_and_pil_images_alike(model, tiny):
    root, _ = tiny
    gallery, _ = gallery_from_folder(root)
    from_folder = model.embed(root, batch_size=5)
    assert from_folder.shape == (32, 16) and from_folder.dtype == torch.float32 and not from_folder.requires_grad
    torch.testing.assert_close(from_folder.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(model.embed(gallery.paths[::-1], batch_size=7), from_folder.flip(0), rtol=0, atol=1e-6)
    # files read here (workers=0) or by the training's loader in a worker process: the same rows
    torch.testing.assert_close(model.embed(root, batch_size=5, workers=1), from_folder, rtol=0, atol=1e-6)
    pictures = [Image.open(p) for p in gallery.paths[:6]]
    torch.testing.assert_close(model.embed(pictures, batch_size=4), from_folder[:6], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.embed(pictures[0]), from_folder[:1], rtol=0, atol=1e-6)
    with torch.no_grad():  # the transform is the one the model was evaluated with
        direct = torch.nn.functional.normalize(model.model(torch.stack([model.transform(p) for p in pictures])), dim=1)
    torch.testing.assert_close(direct, from_folder[:6], rtol=0, atol=1e-6)


def test_embed_input_errors_name_the_problem(model, tiny, tmp_path):
    root, _ = tiny
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="no such file"):
        model.embed([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="broken.png: not a decodable image"):
        model.embed([tmp_path / "broken.png"])
    with pytest.raises(TypeError, match="all PIL images or all paths"):
        model.embed([Image.new("RGB", (8, 8)), str(root / "class_0" / "0.png")])
    with pytest.raises(TypeError, match="got int"):
        model.embed(3)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        model.embed(root, batch_size=0)


def test_embed_command_output_is_read_as_it_is_by_evaluate(model, tiny, tmp_path, capsys):
    root, checkpoint = tiny
    out = tmp_path / "emb.npy"
    assert embed.main(["--checkpoint", str(checkpoint), "--images", str(root), "--out", str(out), "--workers", "0",
                       "--no-progress", "--device", "cpu"]) == 0
    vectors, labels = np.load(out), np.load(tmp_path / "emb.labels.npy")
    paths = (tmp_path / "emb.paths.txt").read_text().splitlines()
    assert vectors.dtype == np.float32 and vectors.shape == (32, 16) and labels.tolist() == [p.split("/")[-2] for p in paths]
    np.testing.assert_allclose(vectors, model.embed(paths).numpy(), atol=1e-6)
    assert evaluate.main(["--embeddings", str(out), "--labels", str(tmp_path / "emb.labels.npy"), "--ks", "1", "2",
                          "--metrics", "recall", "map@r", "--json", str(tmp_path / "m.json"), "--no-progress"]) == 0
    expected = retrieval_metrics(torch.from_numpy(vectors), labels, ks=(1, 2), metrics=("recall", "map@r"))
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(expected)
    capsys.readouterr()
    assert embed.main(["--checkpoint", str(checkpoint), "--images", str(root), "--out", str(out)]) == 2  # never replaced unasked
    assert "pass --overwrite" in capsys.readouterr().err


def test_embed_command_reads_a_csv_list_and_its_split(tiny, tmp_path):
    root, checkpoint = tiny
    rows = [f"class_{c}/{i}.png,item{c},{'test' if c < 2 else 'train'}" for c in range(4) for i in range(4)]
    (tmp_path / "list.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    out = tmp_path / "test.npy"
    assert embed.main(["--checkpoint", str(checkpoint), "--list", str(tmp_path / "list.csv"), "--data-root", str(root), "--split",
                       "test", "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    assert np.load(out).shape == (8, 16) and np.load(tmp_path / "test.labels.npy").tolist() == ["item0"] * 4 + ["item1"] * 4


def test_embed_command_without_labels_for_loose_images(tiny, tmp_path, capsys):
    root, checkpoint = tiny
    folder = tmp_path / "loose"
    folder.mkdir()
    Image.open(root / "class_0" / "0.png").save(folder / "a.png")
    Image.open(root / "class_1" / "0.png").save(folder / "b.png")
    assert embed.main(["--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(tmp_path / "e.npy"),
                       "--workers", "0", "--no-progress"]) == 0
    assert np.load(tmp_path / "e.npy").shape == (2, 16) and not (tmp_path / "e.labels.npy").exists()
    assert "have no label" in capsys.readouterr().out
    assert embed.main(["--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(tmp_path / "e.txt")]) == 2


@pytest.mark.parametrize("export_format", [
    "torchscript",
    pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="needs onnx, onnxscript and onnxruntime "
                                                                        "(pip install onnx onnxscript onnxruntime)")),
])
def test_exported_model_gives_the_pytorch_embeddings_for_any_batch(model, tiny, tmp_path, capsys, export_format):
    root, checkpoint = tiny
    out = tmp_path / f"model.{export_format}"
    assert export.main(["--checkpoint", str(checkpoint), "--format", export_format, "--out", str(out), "--device", "cpu"]) == 0
    assert "input  images: uint8 [batch, 3, 16, 16] RGB" in capsys.readouterr().out
    gallery, _ = gallery_from_folder(root)
    pictures = [Image.open(p) for p in gallery.paths[:5]]
    images = torch.stack([model.transform.to_uint8(p) for p in pictures])
    expected = model.embed(pictures).numpy()
    for batch in (1, 5):  # the batch dimension is free (the export traced batch 2)
        if export_format == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = session.run(["embeddings"], {"images": images[:batch].numpy()})[0]
            metadata = json.loads(session.get_modelmeta().custom_metadata_map["dmlfast"])
        else:
            files = {"dmlfast.json": ""}
            with pytest.warns(FutureWarning):  # torch.jit.load is deprecated in torch 2.14
                scripted = torch.jit.load(str(out), _extra_files=files)
            got = scripted(images[:batch]).detach().numpy()
            metadata = json.loads(files["dmlfast.json"])
        assert got.dtype == np.float32 and got.shape == (batch, 16)
        np.testing.assert_allclose(got, expected[:batch], rtol=0, atol=1e-5)
    assert metadata["input"]["size"] == 16 and metadata["checkpoint_sha256"] == model.checkpoint_sha256
    assert export.main(["--checkpoint", str(checkpoint), "--format", export_format, "--out", str(out)]) == 2
    assert f"{out} exists; pass --overwrite" in capsys.readouterr().err


def test_index_build_and_query_leave_the_query_out_and_rank_exactly(model, tiny, tmp_path, capsys):
    root, checkpoint = tiny
    folder = tmp_path / "catalogue.index"
    assert index.main(["build", "--checkpoint", str(checkpoint), "--gallery", str(root), "--out", str(folder), "--workers", "0",
                       "--no-progress", "--no-cache", "--device", "cpu"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["gallery.json", "index.faiss"]
    queries = [root / "class_2" / "1.png", root / "class_5" / "3.png"]
    assert index.main(["query", str(folder), "--image", *map(str, queries), "--top", "5", "--json", str(tmp_path / "r.json"),
                       "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    vectors = model.embed(root)
    gallery, labels = gallery_from_folder(root)
    for query, result in zip(queries, results):
        own = gallery.paths.index(str(query))
        similarities = vectors @ vectors[own]
        similarities[own] = -2  # left out
        best = similarities.topk(5).indices.tolist()
        assert result["left_out"] == own and [r[0] for r in result["results"]] == [gallery.paths[i] for i in best]
        assert [r[1] for r in result["results"]] == [labels[i] for i in best]
        np.testing.assert_allclose([r[2] for r in result["results"]], similarities[best].numpy(), atol=1e-5)
    assert "left out of its results" in capsys.readouterr().out
    query_again = ["query", str(folder), "--image", str(queries[0]), "--top", "2", "--json", str(tmp_path / "r.json"), "--device", "cpu"]
    assert index.main(query_again) == 2  # --json is never replaced unasked, and refused before any work
    assert "--json" in capsys.readouterr().err and json.loads((tmp_path / "r.json").read_text()) == results
    assert index.main([*query_again, "--overwrite"]) == 0 and len(json.loads((tmp_path / "r.json").read_text())) == 1
    assert index.main(["build", "--checkpoint", str(checkpoint), "--gallery", str(root), "--out", str(folder)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_an_index_refuses_another_model_and_a_damaged_description(model, tiny, tmp_path, capsys):
    root, checkpoint = tiny
    gallery, labels = gallery_from_folder(root)
    built, _ = GalleryIndex.from_gallery(model, gallery, labels, use_cache=False, progress=False)
    built.save(tmp_path / "g")
    other = tmp_path / "other.pt"
    other.write_bytes(checkpoint.read_bytes() + b"\0")  # another file: another SHA-256
    assert index.main(["query", str(tmp_path / "g"), "--image", str(root / "class_0" / "0.png"), "--checkpoint", str(other)]) == 2
    assert "is not the checkpoint this index was built with" in capsys.readouterr().err
    meta = json.loads((tmp_path / "g" / "gallery.json").read_text())
    (tmp_path / "g" / "gallery.json").write_text(json.dumps({**meta, "paths": meta["paths"][:-1], "labels": meta["labels"][:-1]}))
    assert index.main(["query", str(tmp_path / "g"), "--image", str(root / "class_0" / "0.png")]) == 2
    assert "index.faiss holds 32 vectors of dimension 16, gallery.json describes 31" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_exact_neighbours_when_searched_widely(kind, tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 24))
    vectors = (centres[rng.integers(0, 20, 2000)] + 0.3 * rng.normal(size=(2000, 24))).astype(np.float32)
    paths = [f"/gallery/{i}.png" for i in range(2000)]
    exact = GalleryIndex.build(vectors, paths)
    approximate = GalleryIndex.build(vectors, paths, kind=kind, nlist=16)
    approximate.save(tmp_path / kind)
    loaded = GalleryIndex.load(tmp_path / kind)
    queries = vectors[:50]
    _, expected = exact.search(queries, 10, exclude=list(range(50)))
    wide = {"nprobe": 16} if kind == "ivf" else {"ef_search": 2000}
    similarities, found = loaded.search(queries, 10, exclude=list(range(50)), **wide)
    assert (found == expected).mean() > 0.99 and not (found == np.arange(50)[:, None]).any()
    assert np.all(np.diff(similarities, axis=1) <= 1e-6)
    with pytest.raises(ValueError, match="applies to an"):
        loaded.search(queries, 10, **({"ef_search": 5} if kind == "ivf" else {"nprobe": 5}))
