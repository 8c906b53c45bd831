"""Backbones and the embedding head of dmlfast's training (``build_model``).

Backbones (``BACKBONES``): ``resnet50``, ``resnet18``, ``googlenet`` (torchvision), ``bn_inception``
(written here, :mod:`dmlfast.models.bn_inception`) and ``smallcnn``, a 4-layer CNN for small images
that trains from scratch in minutes on a CPU (the glyph default); and ``timm:NAME``, any model of
timm, CNN or transformer (:mod:`dmlfast.models.timm_backbone`; ``pip install timm``).

Input (:func:`input_spec`): each backbone's default image size and normalization: 224 px and
ImageNet's mean/std for the torchvision backbones, BN-Inception's BGR 0-255 convention, 64 px for
``smallcnn``, and a timm model's pretrained configuration (``input_size``, ``mean``, ``std``).

Pretrained weights (``weights=``):

* ``"imagenet"`` (or ``"pretrained"``): torchvision's download/cache (``~/.cache/torch/hub/checkpoints``).
  ResNet-50 uses ``IMAGENET1K_V1``, the weights the metric-learning papers used (not torchvision's V2
  default). BN-Inception's weights are not in torchvision: download ``bn_inception-52deb4733.pth`` from
  https://github.com/Cadene/pretrained-models.pytorch (``bninception``) and pass its path. A timm
  model takes its default pretrained tag from the local Hugging Face / torch hub cache, never downloaded.
* a path: a local state dict (:mod:`dmlfast.models.weights`: ``.pth``/``.bin`` read without running
  code, or ``.safetensors``; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and a ``module.``
  prefix are accepted; classifier keys such as ``fc.*``/``last_linear.*``/``head.*`` are ignored).
* ``"none"``: random initialisation.

When pretrained weights are asked for and cannot be had, ``WeightsUnavailableError`` says so and how to
pass a local file; the model never falls back to random weights silently.

Head (``EmbeddingModel``): backbone feature map -> pooling (``"avg+max"``: global average + global
max, summed; or ``"avg"``/``"max"``; ``"backbone"`` for a backbone that pools itself, such as a ViT's
class token) -> optional LayerNorm without affine -> Linear (kaiming_normal fan_out, zero bias) ->
L2-normalised embedding. ``freeze_bn=True`` keeps every BatchNorm in eval mode with its affine
parameters frozen; ``frozen_layers`` freezes the backbone's parameters under the given state-dict
prefixes for the whole run (e.g. a ViT's ``patch_embed``). ``uncertainty_head=True`` adds IDML's second
Linear (docs/losses.md §6) on the same pooled feature, read by ``forward_with_uncertainty``; ``forward``
(evaluation) returns the semantic embedding only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .bn_inception import BNInception
from .timm_backbone import (TIMM_INSTALL_HINT, TIMM_PREFIX, BackboneUnavailableError, TimmBackbone, build_timm_backbone,
                            is_timm_name, timm_spec)
from .weights import WeightsUnavailableError, asks_for_pretrained, read_state_dict, require_matching_keys

BACKBONES = ("resnet50", "resnet18", "googlenet", "bn_inception", "smallcnn")
#: Poolings of a feature map, and ``"backbone"``: the backbone's own pooled feature (timm transformers).
POOLINGS = ("avg+max", "avg", "max", "backbone")

#: torchvision weight enum member used for ``weights="imagenet"``.
_TORCHVISION_WEIGHTS = {"resnet50": "ResNet50_Weights.IMAGENET1K_V1", "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
                        "googlenet": "GoogLeNet_Weights.IMAGENET1K_V1"}
#: input normalisation each backbone's weights expect (``make_loader(normalization=...)``).
NORMALIZATION = {"resnet50": "imagenet", "resnet18": "imagenet", "googlenet": "imagenet",
                 "bn_inception": "bn_inception", "smallcnn": "imagenet"}
#: default input size (px) of each backbone; timm models: their pretrained configuration's.
INPUT_SIZE = {"resnet50": 224, "resnet18": 224, "googlenet": 224, "bn_inception": 224, "smallcnn": 64}
_IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BN_INCEPTION_WEIGHTS_HINT = ("BN-Inception's ImageNet weights are not in torchvision: download bn_inception-52deb4733.pth "
                             "(Cadene's pretrained-models.pytorch, 'bninception') and pass --weights PATH")
_CLASSIFIER_PREFIXES = ("fc.", "last_linear.", "aux1.", "aux2.", "classifier.")


class BackboneInput(NamedTuple):
    """A backbone's default ``image_size`` (px), its ``normalization`` (a name of
    :data:`dmlfast.data.NORMALIZATIONS` or ``{"mean": [r, g, b], "std": [r, g, b]}`` on the 0-1 scale),
    and whether it ``pools_itself`` (then the head's pooling is ``"backbone"``)."""

    image_size: int
    normalization: Any
    pools_itself: bool


def is_backbone_name(name) -> bool:
    """Whether ``name`` is one of ``BACKBONES`` or a ``timm:NAME``."""
    return name in BACKBONES or is_timm_name(name)


def input_spec(name: str) -> BackboneInput:
    """The :class:`BackboneInput` of backbone ``name`` (a timm model's from its pretrained configuration)."""
    if is_timm_name(name):
        spec = timm_spec(name)
        normalization = "imagenet" if (spec.mean, spec.std) == _IMAGENET_MEAN_STD else {"mean": list(spec.mean), "std": list(spec.std)}
        return BackboneInput(spec.image_size, normalization, spec.pools_itself)
    if name not in BACKBONES:
        raise ValueError(f"input_spec: unknown model {name!r}; choose one of {', '.join(BACKBONES)} or timm:NAME")
    return BackboneInput(INPUT_SIZE[name], NORMALIZATION[name], False)


class SmallCNN(nn.Module):
    """A stride-2 3x3 conv stem, then three 3x3 conv-BN-ReLU layers of ``width``, 2x, 4x channels with
    2x2 max pooling between them: ``forward(x [N,3,H,W]) -> [N, 4*width, H/8, W/8]``.

    About 5 MFLOPs per 32 px image, so it trains from scratch in minutes on a CPU; ``out_channels``
    is ``4 * width``."""

    def __init__(self, width: int = 32):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"SmallCNN: width must be a positive int, got {width!r}")
        layers = [nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            if stage:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.out_channels = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.features(x)


class _TorchvisionFeatures(nn.Module):
    """A torchvision classifier cut before its global pooling: returns the last feature map."""

    def __init__(self, net: nn.Module, names, out_channels: int, transform_input: bool = False):
        super().__init__()
        self.net = net
        self.names = list(names)
        self.out_channels = out_channels
        self.transform_input = transform_input

    def forward(self, x):
        if self.transform_input:
            x = self.net._transform_input(x)
        for name in self.names:
            x = getattr(self.net, name)(x)
        return x


def _torchvision_backbone(name: str) -> nn.Module:
    import torchvision

    if name in ("resnet50", "resnet18"):
        net = getattr(torchvision.models, name)(weights=None)
        net.fc = nn.Identity()
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        return _TorchvisionFeatures(net, names, 2048 if name == "resnet50" else 512)
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True, transform_input=False)
    net.fc = nn.Identity()
    names = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
             "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4", "inception5a", "inception5b")
    return _TorchvisionFeatures(net, names, 1024)


def make_backbone(name: str, image_size: Optional[int] = None) -> nn.Module:
    """A randomly initialised backbone ``name`` (one of ``BACKBONES`` or ``timm:NAME``) with an
    ``out_channels`` attribute; ``image_size`` sizes a timm transformer's position embedding."""
    if is_timm_name(name):
        return build_timm_backbone(name, "none", image_size)
    if name not in BACKBONES:
        raise ValueError(f"make_backbone: unknown model {name!r}; choose one of {', '.join(BACKBONES)} or timm:NAME")
    if name == "bn_inception":
        return BNInception()
    if name == "smallcnn":
        return SmallCNN()
    return _torchvision_backbone(name)


def _backbone_state_target(backbone: nn.Module) -> nn.Module:
    """The module whose state dict has the published key names (torchvision's or timm's model)."""
    return backbone.net if isinstance(backbone, (_TorchvisionFeatures, TimmBackbone)) else backbone


def _imagenet_state_dict(name: str) -> Dict[str, torch.Tensor]:
    if name not in _TORCHVISION_WEIGHTS:
        hint = BN_INCEPTION_WEIGHTS_HINT if name == "bn_inception" else "use --weights none (it trains from scratch) or --weights PATH"
        raise WeightsUnavailableError(f"--weights imagenet: there are no ImageNet weights for {name!r} in torchvision; {hint}")
    import torchvision

    enum_name, member = _TORCHVISION_WEIGHTS[name].split(".")
    weights = getattr(getattr(torchvision.models, enum_name), member)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=True, check_hash=False)
    except Exception as error:  # urllib/http/ssl/socket errors differ by platform and Python version
        raise WeightsUnavailableError(
            f"--weights imagenet: cannot get {name} ImageNet weights ({_TORCHVISION_WEIGHTS[name]}): the download of "
            f"{weights.url} failed ({type(error).__name__}: {error}) and there is no cached copy at {cache}; download "
            f"that file on a machine with internet access and pass --weights PATH (or copy it to {cache})"
        ) from error


def load_backbone_weights(name: str, backbone: nn.Module, weights) -> None:
    """Load ``weights`` (``"imagenet"``/``"pretrained"``, ``"none"`` or a path) into ``backbone`` (from
    ``make_backbone(name)``, one of ``BACKBONES``; a timm backbone gets its weights when built:
    ``build_model("timm:NAME", ..., weights=...)``).

    Raises ``WeightsUnavailableError`` when the weights cannot be had or do not fit the backbone."""
    if name not in BACKBONES:
        raise ValueError(f"load_backbone_weights: unknown model {name!r}; choose one of {', '.join(BACKBONES)} "
                         "(timm backbones load their weights in build_model)")
    if weights is None or weights == "none":
        return
    if not isinstance(weights, (str, Path)):
        raise ValueError(f"load_backbone_weights: weights must be 'imagenet', 'none' or a path, got {weights!r}")
    state = _imagenet_state_dict(name) if asks_for_pretrained(weights) else read_state_dict(weights)
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    target = _backbone_state_target(backbone)
    require_matching_keys(state, (k for k in target.state_dict() if not k.startswith(_CLASSIFIER_PREFIXES)), weights, name)
    try:
        target.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise WeightsUnavailableError(f"--weights {weights}: the tensors do not fit {name}: {error}") from error


def freeze_layers(backbone: nn.Module, prefixes: Sequence[str]) -> None:
    """Freeze (``requires_grad=False``) the backbone's parameters whose published state-dict name starts
    with one of ``prefixes`` (e.g. ``"patch_embed"``); ``ValueError`` for a prefix that matches none."""
    named = dict(_backbone_state_target(backbone).named_parameters())
    for prefix in prefixes:
        matched = [p for name, p in named.items() if name == prefix or name.startswith(prefix + ".")]
        if not matched:
            raise ValueError(f"frozen_layers: no backbone parameter is named {prefix!r} or {prefix}.*; "
                             f"the backbone's first parameters are {list(named)[:4]}")
        for p in matched:
            p.requires_grad_(False)


class EmbeddingModel(nn.Module):
    """``backbone`` + pooling + optional LayerNorm + Linear embedding, L2-normalised output.

    ``forward(images [N,3,H,W]) -> [N, embedding_size]`` unit vectors (in the autocast dtype under
    autocast). ``backbone_parameters()`` and ``embedding_parameters()`` split the parameters for the
    optimizer groups. With ``freeze_bn`` every BatchNorm stays in eval mode (``train()`` included)
    and its affine parameters do not train. ``pooling="backbone"`` is for, and only for, a backbone
    that pools itself (``backbone.pools_itself``: it returns ``[N, C]`` features)."""

    def __init__(self, backbone: nn.Module, embedding_size: int, pooling: str = "avg+max", layer_norm: bool = False,
                 freeze_bn: bool = False, uncertainty_head: bool = False, normalize_uncertainty: bool = True):
        super().__init__()
        for name, flag in (("uncertainty_head", uncertainty_head), ("normalize_uncertainty", normalize_uncertainty)):
            if not isinstance(flag, bool):
                raise ValueError(f"EmbeddingModel: {name} must be a bool, got {flag!r}")
        if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
            raise ValueError(f"EmbeddingModel: embedding_size must be a positive int, got {embedding_size!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"EmbeddingModel: pooling must be one of {POOLINGS}, got {pooling!r}")
        features = getattr(backbone, "out_channels", None)
        if not isinstance(features, int):
            raise ValueError("EmbeddingModel: backbone must have an int out_channels attribute")
        if (pooling == "backbone") != bool(getattr(backbone, "pools_itself", False)):
            what = "pools its features itself: use pooling='backbone'" if pooling != "backbone" else \
                "returns a feature map: use pooling 'avg+max', 'avg' or 'max'"
            raise ValueError(f"EmbeddingModel: pooling={pooling!r} does not fit the backbone, which {what}")
        self.backbone = backbone
        self.pooling = pooling
        self.freeze_bn = bool(freeze_bn)
        self.layer_norm = nn.LayerNorm(features, elementwise_affine=False) if layer_norm else None
        self.embedding = nn.Linear(features, embedding_size)
        nn.init.kaiming_normal_(self.embedding.weight, mode="fan_out")
        nn.init.zeros_(self.embedding.bias)
        # IDML's uncertainty head keeps nn.Linear's default initialisation, as published.
        self.uncertainty = nn.Linear(features, embedding_size) if uncertainty_head else None
        self.normalize_uncertainty = normalize_uncertainty
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def backbone_parameters(self):
        """Trainable backbone parameters (frozen BatchNorm affine parameters excluded), and the
        uncertainty head's: as published, it trains at the backbone's learning rate and is frozen
        with the backbone during warm-up."""
        head = [] if self.uncertainty is None else list(self.uncertainty.parameters())
        return [p for p in self.backbone.parameters() if p.requires_grad] + head

    def embedding_parameters(self):
        """The embedding Linear's weight and bias."""
        return list(self.embedding.parameters())

    def forward(self, images):
        return self._embed(self._pooled(images))

    def forward_with_uncertainty(self, images):
        """(semantic embedding μ, uncertainty embedding v) from one pass, v L2-normalised when
        ``normalize_uncertainty`` (IDML's released default: then ‖v‖ ≡ 1 and v carries no
        uncertainty, see :class:`dmlfast.losses.IntrospectiveProxyAnchorLoss`)."""
        if self.uncertainty is None:
            raise RuntimeError("EmbeddingModel.forward_with_uncertainty: the model has no uncertainty head "
                               "(build it with uncertainty_head=True)")
        pooled = self._pooled(images)
        uncertainty = self.uncertainty(pooled)
        if self.normalize_uncertainty:
            uncertainty = F.normalize(uncertainty, dim=1)
        return self._embed(pooled), uncertainty

    def _embed(self, pooled):
        return F.normalize(self.embedding(pooled), dim=1)

    def _pooled(self, images):
        x = self.backbone(images)
        if self.pooling == "backbone":
            pass
        elif self.pooling == "avg+max":
            x = F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)
        elif self.pooling == "avg":
            x = F.adaptive_avg_pool2d(x, 1)
        else:
            x = F.adaptive_max_pool2d(x, 1)
        x = x.flatten(1)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x


def build_model(name: str, embedding_size: int, *, weights="none", pooling: Optional[str] = None, layer_norm: bool = False,
                freeze_bn: bool = False, uncertainty_head: bool = False, normalize_uncertainty: bool = True,
                image_size: Optional[int] = None, frozen_layers: Sequence[str] = ()) -> EmbeddingModel:
    """Backbone ``name`` (``BACKBONES`` or ``timm:NAME``) with ``weights`` (see the module docstring)
    under the embedding head (and IDML's uncertainty head when ``uncertainty_head``). ``pooling``
    defaults to ``"backbone"`` for a backbone that pools itself and ``"avg+max"`` otherwise;
    ``image_size`` sizes a timm transformer's position embedding; ``frozen_layers``: see :func:`freeze_layers`."""
    if is_timm_name(name):
        backbone = build_timm_backbone(name, weights, image_size)
    else:
        backbone = make_backbone(name)
        load_backbone_weights(name, backbone, weights)
    freeze_layers(backbone, frozen_layers)
    if pooling is None:
        pooling = "backbone" if getattr(backbone, "pools_itself", False) else "avg+max"
    return EmbeddingModel(backbone, embedding_size, pooling=pooling, layer_norm=layer_norm, freeze_bn=freeze_bn,
                          uncertainty_head=uncertainty_head, normalize_uncertainty=normalize_uncertainty)


__all__ = ["BACKBONES", "BN_INCEPTION_WEIGHTS_HINT", "INPUT_SIZE", "NORMALIZATION", "POOLINGS", "TIMM_INSTALL_HINT",
           "TIMM_PREFIX", "BNInception", "BackboneInput", "BackboneUnavailableError", "EmbeddingModel", "SmallCNN",
           "TimmBackbone", "WeightsUnavailableError", "build_model", "freeze_layers", "input_spec", "is_backbone_name",
           "is_timm_name", "load_backbone_weights", "make_backbone", "timm_spec"]
