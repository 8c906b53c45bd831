"""dmlfast.models: backbones' shapes, the embedding head, frozen BatchNorm and the weights options."""
import urllib.error

import pytest
import torch
from torch import nn

from dmlfast.models import (BACKBONES, BNInception, EmbeddingModel, SmallCNN, WeightsUnavailableError, build_model,
                            load_backbone_weights, make_backbone)


@pytest.mark.parametrize("name, size, channels", [("smallcnn", 32, 128), ("resnet18", 64, 512), ("resnet50", 64, 2048),
                                                  ("googlenet", 64, 1024), ("bn_inception", 64, 1024)])
def test_backbone_feature_maps(name, size, channels):
    backbone = make_backbone(name).eval()
    assert backbone.out_channels == channels
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, size, size))
    assert features.shape[:2] == (2, channels)


def test_bn_inception_matches_the_caffe_port():
    model = BNInception()
    assert sum(p.numel() for p in model.parameters()) == 10_270_240  # Cadene's bninception without last_linear
    keys = model.state_dict().keys()
    for key in ("conv1_7x7_s2.weight", "inception_3c_double_3x3_2_bn.running_var", "inception_4e_double_3x3_reduce.weight",
                "inception_5b_pool_proj.bias"):
        assert key in keys
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1024, 7, 7)


def test_head_outputs_unit_vectors_and_is_initialised_as_specified():
    torch.manual_seed(0)
    model = build_model("smallcnn", 24)
    assert torch.count_nonzero(model.embedding.bias) == 0
    assert model.embedding.weight.std().item() == pytest.approx((2 / 24) ** 0.5, rel=0.15)  # kaiming fan_out
    out = model(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 24)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    backbone = model.backbone.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = backbone(x)
        expected = nn.functional.normalize(model.embedding(f.mean((2, 3)) + f.amax((2, 3))), dim=1)
        torch.testing.assert_close(model.eval()(x), expected)


def test_layer_norm_and_max_pooling_head():
    model = build_model("smallcnn", 8, pooling="max", layer_norm=True)
    assert isinstance(model.layer_norm, nn.LayerNorm) and not model.layer_norm.elementwise_affine
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 8)


def test_freeze_bn_keeps_statistics_and_affine_fixed():
    model = build_model("smallcnn", 8, freeze_bn=True).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    assert all(p.requires_grad for p in model.backbone_parameters())
    before = bns[0].running_mean.clone()
    model(torch.randn(4, 3, 16, 16) * 5 + 3)
    torch.testing.assert_close(bns[0].running_mean, before)
    trained = build_model("smallcnn", 8).train()
    assert all(m.training for m in trained.modules() if isinstance(m, nn.BatchNorm2d))


def test_local_weights_round_trip_with_prefix_and_classifier(tmp_path):
    source = make_backbone("resnet18")
    state = {f"module.{k}": v for k, v in source.net.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(1000, 512)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": state}, path)
    target = make_backbone("resnet18")
    load_backbone_weights("resnet18", target, str(path))
    for key, value in source.net.state_dict().items():
        torch.testing.assert_close(target.net.state_dict()[key], value)


def test_bn_inception_loads_a_cadene_style_file(tmp_path):
    source = BNInception()
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["last_linear.weight"] = torch.zeros(1000, 1024)
    torch.save(state, tmp_path / "bn_inception-52deb4733.pth")
    model = build_model("bn_inception", 16, weights=tmp_path / "bn_inception-52deb4733.pth")
    torch.testing.assert_close(model.backbone.conv1_7x7_s2.weight, source.conv1_7x7_s2.weight)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save(make_backbone("resnet18").net.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsUnavailableError, match="does not fit resnet50"):
        build_model("resnet50", 8, weights=tmp_path / "r18.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="cannot read"):
        build_model("resnet18", 8, weights=tmp_path / "junk.pth")


def test_imagenet_weights_offline_say_how_to_pass_a_file(monkeypatch):
    import torchvision

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsUnavailableError, match=r"resnet50-0676ba61\.pth failed .* pass --weights PATH"):
        build_model("resnet50", 8, weights="imagenet")
    with pytest.raises(WeightsUnavailableError, match="not in torchvision"):
        build_model("bn_inception", 8, weights="imagenet")
    with pytest.raises(WeightsUnavailableError, match="no ImageNet weights"):
        build_model("smallcnn", 8, weights="imagenet")


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        make_backbone("vgg")
    with pytest.raises(ValueError, match="embedding_size"):
        EmbeddingModel(SmallCNN(), 0)
    with pytest.raises(ValueError, match="pooling"):
        EmbeddingModel(SmallCNN(), 8, pooling="mean")
    with pytest.raises(ValueError, match="width"):
        SmallCNN(0)
    assert set(BACKBONES) == {"resnet50", "resnet18", "googlenet", "bn_inception", "smallcnn"}
