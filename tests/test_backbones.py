"""timm backbones (``--model timm:NAME``): training end to end, local weights, the offline cache, the
errors, the input that follows the backbone, and their recipes. Tiny timm models (``test_vit``,
``test_resnet``: random init, well under a million parameters) on 16-32 px images; nothing is downloaded."""
import json
import re
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import write_colour_block_classes
from dmlfast import train
from dmlfast.models import BackboneUnavailableError, WeightsUnavailableError, build_model, freeze_layers, input_spec
from dmlfast.training.setup import make_model

timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm)")

RUN = ["--epochs", "1", "--batch-size", "8", "--embedding-size", "16", "--workers", "0", "--loader", "torch",
       "--no-progress", "--warmup-epochs", "0"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """8 classes of 4 colour-block JPEGs, 4 held out."""
    return write_colour_block_classes(tmp_path_factory.mktemp("photos"), suffix=".jpg")


def _folder(photos, *args):
    return ["--dataset", "folder", "--data-root", str(photos), "--test-classes", "4", *args]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("python -m dmlfast.train: error: ")
    return err


@pytest.mark.parametrize("model, pooling", [("timm:test_vit", "backbone"), ("timm:test_resnet", "avg+max")])
def test_tiny_timm_model_trains_end_to_end(photos, tmp_path, model, pooling):
    out = tmp_path / "run"
    assert train.main([*_folder(photos, "--model", model, "--weights", "none", "--image-size", "32"), *RUN,
                       "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert (config["model"], config["pooling"], config["image_size"]) == (model, pooling, 32)
    assert np.isfinite(summary["history"][1]["loss"]) and 0 <= summary["after"]["recall@1"] <= 1
    checkpoint = torch.load(out / "last.pt", weights_only=False)
    trained = make_model(dict(config, weights="none"))
    trained.load_state_dict(checkpoint["model"])  # the saved state is the timm model's, restored by the same config
    initial = make_model(dict(config, weights="none"))
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), initial.state_dict().values()))


def test_vit_pools_with_its_class_token_and_cnn_feeds_dmlfast_pooling():
    vit = build_model("timm:test_vit", 8, image_size=32).eval()
    cnn = build_model("timm:test_resnet", 8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.backbone.net.forward_features(x)
        torch.testing.assert_close(vit.backbone(x), vit.backbone.net.forward_head(tokens, pre_logits=True))
        assert tokens.shape[1] == 1 + (32 // 16) ** 2  # class token + 2x2 patches: sized for 32 px
        feature_map = cnn.backbone(x)
        assert feature_map.dim() == 4 and feature_map.shape[1] == cnn.backbone.out_channels
        expected = F.normalize(cnn.embedding(feature_map.mean((2, 3)) + feature_map.amax((2, 3))), dim=1)
        torch.testing.assert_close(cnn(x), expected)
    with pytest.raises(ValueError, match="pools its features itself"):
        build_model("timm:test_vit", 8, pooling="avg")
    with pytest.raises(ValueError, match="returns a feature map"):
        build_model("timm:test_resnet", 8, pooling="backbone")


@pytest.mark.parametrize("suffix, wrap", [(".pth", lambda sd: sd), (".bin", lambda sd: {"model": sd}),
                                          (".safetensors", lambda sd: {f"module.{k}": v for k, v in sd.items()})])
def test_weights_path_round_trip(photos, tmp_path, suffix, wrap):
    """A timm model's own state dict (classifier included) in each accepted form: the run's backbone
    gives exactly that model's pre-logits output, and it trains from there."""
    torch.manual_seed(3)
    source = timm.create_model("test_vit").eval()
    path = tmp_path / f"weights{suffix}"
    state = wrap(source.state_dict())
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    args = [*_folder(photos, "--model", "timm:test_vit", "--weights", str(path)), *RUN]
    config = train.make_config(train.build_parser().parse_args([*args, "--output", str(tmp_path / "run")]))
    assert config["image_size"] == 160  # test_vit's pretrained input size: the input follows the backbone
    model = make_model(config).eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        expected_features = source.forward_head(source.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.backbone(x), expected_features, rtol=0, atol=0)
        torch.testing.assert_close(model(x), F.normalize(model.embedding(expected_features), dim=1))
    assert train.main([*args, "--image-size", "32", "--output", str(tmp_path / "run")]) == 0  # position embedding resampled
    assert np.isfinite(json.loads((tmp_path / "run" / "summary.json").read_text())["history"][1]["loss"])


def test_weights_errors_are_one_line(photos, tmp_path, capsys):
    base = [*_folder(photos, "--model", "timm:test_vit"), *RUN, "--output", str(tmp_path / "run")]
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "garbage.safetensors").write_bytes(b"not safetensors")
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.pth")
    changed = timm.create_model("test_vit").state_dict()
    changed["blocks.0.attn.qkv.weight"] = changed["blocks.0.attn.qkv.weight"][:, :8].clone()
    torch.save(changed, tmp_path / "shape.pth")
    torch.save({"epoch": 3}, tmp_path / "dict.pth")
    cases = [("garbage.pth", "cannot read"), ("garbage.safetensors", "cannot read .* as a safetensors file"),
             ("dict.pth", "does not hold a state dict"),
             ("resnet.pth", r"does not fit timm:test_vit: \d+ missing keys \(e.g. \['blocks\.0\.attn\.proj\.bias'"),
             ("shape.pth", "the tensors do not fit timm:test_vit: size mismatch for blocks.0.attn.qkv.weight"),
             ("missing.pth", "no such file")]
    for name, says in cases:
        assert train.main([*base, "--weights", str(tmp_path / name)]) == 2, name
        assert re.search(says, _error_line(capsys)), name


def test_pretrained_comes_from_the_local_cache_only(tmp_path, monkeypatch):
    """``--weights pretrained``: timm's default tag read from a Hugging Face cache laid out as the hub
    writes it; with the cache empty, one error that says how to pass a local file. No network."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailableError, match=r"test_vit\.r160_in1k are not in the Hugging Face cache .*"
                                                      r"does not download.*pass --weights PATH"):
        build_model("timm:test_vit", 8, weights="pretrained")
    torch.manual_seed(5)
    source = timm.create_model("test_vit").eval()
    snapshot = tmp_path / "hub" / "models--timm--test_vit.r160_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--timm--test_vit.r160_in1k" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--test_vit.r160_in1k" / "refs" / "main").write_text("0123abcd")
    from safetensors.torch import save_file

    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    model = build_model("timm:test_vit", 8, weights="imagenet").eval()
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), source.forward_head(source.forward_features(x), pre_logits=True))


def test_missing_timm_is_one_error_line(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    assert train.main([*_folder(photos, "--model", "timm:test_vit"), *RUN, "--output", str(tmp_path / "run")]) == 2
    assert 'needs the timm package, which is not installed: pip install timm (or pip install ".[timm]"' in _error_line(capsys)
    with pytest.raises(BackboneUnavailableError, match="pip install timm"):
        build_model("timm:test_resnet", 8)


def test_unknown_timm_name_and_wrong_pooling_are_one_error_line(photos, tmp_path, capsys):
    out = ["--output", str(tmp_path / "run")]
    assert train.main([*_folder(photos, "--model", "timm:test_vitt"), *RUN, *out]) == 2
    assert "timm has no model 'test_vitt' (similar: test_vit" in _error_line(capsys)
    assert train.main([*_folder(photos, "--model", "timm:test_vit.no_such_tag"), *RUN, *out]) == 2
    assert "no_such_tag" in _error_line(capsys)
    assert train.main([*_folder(photos, "--model", "timm:test_vit", "--pooling", "avg"), *RUN, *out]) == 2
    assert "--pooling avg: timm:test_vit pools its features itself" in _error_line(capsys)
    assert train.main([*_folder(photos, "--model", "timm:test_resnet", "--pooling", "backbone"), *RUN, *out]) == 2
    assert "returns a feature map" in _error_line(capsys)


def test_input_follows_the_backbone(tmp_path):
    """Image size and normalization: the backbone's on real datasets and folder/csv, the dataset's own on
    glyphs/Omniglot, the published recipes' explicit sizes kept, --image-size first."""
    def config(*args):
        return train.make_config(train.build_parser().parse_args([*args, "--data-root", str(tmp_path)]))

    assert config("--dataset", "folder", "--model", "smallcnn")["image_size"] == 64  # not 224
    assert config("--dataset", "csv", "--list", "l.csv", "--model", "smallcnn")["image_size"] == 64
    assert config("--dataset", "folder")["image_size"] is None  # resnet50: the dataset's 224 already
    assert config("--dataset", "folder", "--model", "smallcnn", "--image-size", "48")["image_size"] == 48
    assert config("--dataset", "CUB", "--model", "timm:test_resnet")["image_size"] == 160
    assert config("--dataset", "CUB", "--loss", "ProxyNCA", "--model", "timm:test_resnet")["image_size"] == 256  # recipe
    assert config("--dataset", "Omniglot", "--model", "timm:test_vit")["image_size"] == 32  # the recipe's 32 px
    assert config("--dataset", "glyphs", "--model", "timm:test_vit")["image_size"] is None  # glyphs: 32 px
    assert input_spec("timm:test_vit").normalization == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert input_spec("timm:test_efficientnet").normalization == "imagenet"
    assert input_spec("smallcnn") == (64, "imagenet", False) and input_spec("bn_inception").normalization == "bn_inception"


def test_recipes_for_timm_backbones(tmp_path):
    def config(*args):
        return train.make_config(train.build_parser().parse_args([*args, "--data-root", str(tmp_path)]))

    cnn = config("--dataset", "CUB", "--model", "timm:test_resnet")  # ResNet-50's generic fine-tuning rows
    r50 = config("--dataset", "CUB", "--model", "resnet50")
    keys = ("weights", "batch_size", "warmup_epochs", "freeze_bn", "lr", "lr_step", "proxy_lr_mult", "optimizer")
    assert [cnn[k] for k in keys] == [r50[k] for k in keys] == ["imagenet", 120, 5, True, 1e-4, 5, 100.0, "adamw"]
    vit = config("--dataset", "CUB", "--model", "timm:vit_small_patch16_224")  # HIER's ViT-S/16 row
    assert (vit["embedding_size"], vit["pooling"], vit["layer_norm"], vit["frozen_layers"]) == (128, "backbone", True, ["patch_embed"])
    assert (vit["lr"], vit["adam_eps"], vit["proxy_lr_mult"], vit["weight_decay"], vit["lr_step"]) == (1e-5, 1e-4, 1e4, 1e-2, 0)
    assert (vit["batch_size"], vit["samples_per_class"], vit["warmup_epochs"], vit["epochs"], vit["crop_scale"]) == (180, 2, 1, 100, [0.2, 1.0])
    assert config("--dataset", "CUB", "--model", "timm:vit_small_patch16_224.dino")["lr"] == 5e-6
    sop = config("--dataset", "SOP", "--model", "timm:vit_small_patch16_224.dino")
    assert (sop["lr"], sop["weight_decay"], sop["warmup_epochs"], sop["epochs"], sop["embedding_lr_mult"]) == (5e-6, 1e-4, 5, 150, 100.0)


def test_frozen_layers_stay_frozen():
    model = build_model("timm:test_vit", 8, image_size=32, frozen_layers=("patch_embed",))
    frozen = {id(p) for p in model.backbone.net.patch_embed.parameters()}
    assert frozen and all(not p.requires_grad for p in model.backbone.net.patch_embed.parameters())
    assert not frozen & {id(p) for p in model.backbone_parameters()}  # the warm-up never unfreezes them
    assert model.backbone.net.cls_token.requires_grad
    with pytest.raises(ValueError, match="no backbone parameter is named 'stem'"):
        freeze_layers(model.backbone, ("stem",))
