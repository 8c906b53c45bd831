"""Any timm model as a backbone: ``build_model("timm:NAME", ...)`` / ``--model timm:NAME``.

``NAME`` is what ``timm.create_model`` takes, with or without a pretrained tag
(``vit_small_patch16_224``, ``vit_small_patch16_224.dino``, ``resnet50.a1_in1k``). The model is
created without its classifier (``num_classes=0``), and its features come through timm's own API:

* a model whose head is a plain global pooling of its last feature map (ResNets, EfficientNets,
  RegNets, ...) gives that feature map (``forward_features``) to dmlfast's pooling (``pooling=
  "avg+max"``/``"avg"``/``"max"``);
* any other model pools itself (``pooling="backbone"``): ``forward_head(forward_features(x),
  pre_logits=True)``, which is a ViT's class token (or its token average, as the model says), a
  ConvNeXt's pooled and normalised feature, a MobileNetV3's pooled 1x1-conv feature.

A transformer whose position embedding depends on the image size is created for the run's image
size (``img_size``); pretrained weights made at another size are resampled by timm's own
checkpoint filter.

Weights (``weights=``):

* ``"imagenet"`` / ``"pretrained"``: timm's default pretrained tag for ``NAME`` (or the tag it
  names), read from the local Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``,
  ``~/.cache/huggingface/hub``) or torch's hub cache, never downloaded (the Hugging Face hub is
  put offline for the call). When the file is not there, ``WeightsUnavailableError`` says how to
  get it or pass a local file.
* a path: a state dict in timm's format (``.pth``/``.bin`` read with ``torch.load(weights_only=True)``,
  or ``.safetensors``; :mod:`dmlfast.models.weights`). Classifier keys are ignored; any other missing
  or unexpected key is an error naming the first few.
* ``"none"``: timm's random initialisation.

timm is an optional dependency (``pip install timm``, or ``pip install ".[timm]"``); without it a
``timm:`` name is a :class:`BackboneUnavailableError` naming that command.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from dmlfast.checks import InputError

from .weights import RANDOM, WeightsUnavailableError, asks_for_pretrained, read_state_dict, require_matching_keys, without_prefixes

TIMM_PREFIX = "timm:"
TIMM_INSTALL_HINT = 'pip install timm (or pip install ".[timm]" in a dmlfast checkout)'
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class BackboneUnavailableError(InputError, ImportError):
    """A backbone needs a package that is not installed, or names a model that package does not have."""


def is_timm_name(name) -> bool:
    """Whether ``name`` is a ``timm:NAME`` backbone."""
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


def import_timm(model: str = "timm:NAME"):
    """The ``timm`` module; :class:`BackboneUnavailableError` naming the pip command when it is missing."""
    try:
        import timm
    except ImportError as error:
        raise BackboneUnavailableError(f"--model {model} needs the timm package, which is not installed: "
                                       f"{TIMM_INSTALL_HINT}") from error
    return timm


@dataclass(frozen=True)
class TimmSpec:
    """What dmlfast needs to know of a timm model before building it: its input (pretrained config's
    ``input_size``, ``mean``, ``std``, on the 0-1 scale), whether it pools itself, whether its
    position embedding fixes the image size, its feature width, classifier prefixes and state-dict keys."""

    model: str
    name: str
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    pools_itself: bool
    transformer: bool
    num_features: int
    classifier: Tuple[str, ...]
    keys: Tuple[str, ...]
    pretrained_cfg: Dict[str, Any]

    @property
    def tagged_name(self) -> str:
        """``architecture.tag`` of the pretrained weights this name selects."""
        tag = self.pretrained_cfg.get("tag")
        architecture = self.pretrained_cfg.get("architecture") or self.name.split(".")[0]
        return f"{architecture}.{tag}" if tag else architecture


def timm_spec(model: str) -> TimmSpec:
    """The :class:`TimmSpec` of ``model`` (``"timm:NAME"``): built once on the meta device (no memory, no
    weights). ``BackboneUnavailableError`` without timm or for a name timm does not know."""
    if not is_timm_name(model):
        raise ValueError(f"timm_spec: model must be 'timm:NAME', got {model!r}")
    timm = import_timm(model)
    name = model[len(TIMM_PREFIX):]
    if not name or not timm.is_model(name):
        base = name.split(".")[0]
        similar = (timm.list_models(f"*{base}*") or difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6))[:5] \
            if base else []
        hint = f" (similar: {', '.join(similar)})" if similar else " (timm.list_models() lists them)"
        raise BackboneUnavailableError(f"--model {model}: timm has no model {name!r}{hint}")
    return _spec(model)


@functools.lru_cache(maxsize=64)
def _spec(model: str) -> TimmSpec:
    from timm.layers import SelectAdaptivePool2d

    name = model[len(TIMM_PREFIX):]
    net = _create(name, dict(num_classes=0), device="meta")
    cfg = dict(net.pretrained_cfg)
    features = int(net.num_features)
    plain_pooling = isinstance(getattr(net, "global_pool", None), SelectAdaptivePool2d)
    pools_itself = not (plain_pooling and int(getattr(net, "head_hidden_size", features) or features) == features)
    classifier = cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return TimmSpec(model=model, name=name, image_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
                    mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
                    std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))), pools_itself=pools_itself,
                    transformer=hasattr(net, "patch_embed"), num_features=features,
                    classifier=tuple(f"{c}." for c in classifier), keys=tuple(net.state_dict()), pretrained_cfg=cfg)


def _create(name: str, kwargs: Dict[str, Any], device: Optional[str] = None) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` (on ``device``; a model that cannot be built on the meta
    device is built on the CPU); ``InputError`` when timm rejects the name or its tag."""
    timm = import_timm()
    try:
        if device == "meta":
            try:
                with torch.device("meta"):
                    return timm.create_model(name, **kwargs)
            except (RuntimeError, NotImplementedError, ValueError) as error:
                if "pretrained tag" in str(error) or "Unknown model" in str(error):
                    raise
        return timm.create_model(name, **kwargs)
    except RuntimeError as error:
        if "pretrained tag" in str(error) or "Unknown model" in str(error):
            raise BackboneUnavailableError(f"--model timm:{name}: {error}") from error
        raise


class TimmBackbone(nn.Module):
    """A timm model without its classifier: ``forward(x)`` is its last feature map ``[N, C, H, W]``
    (for dmlfast's pooling) or, when ``pools_itself``, timm's pooled pre-logits feature ``[N, C]``.
    ``out_channels`` = C; ``net`` is the timm model (its state dict is timm's)."""

    def __init__(self, net: nn.Module, spec: TimmSpec):
        super().__init__()
        self.net = net
        self.out_channels = spec.num_features
        self.pools_itself = spec.pools_itself
        self.prefers_channels_last = not spec.transformer

    def forward(self, x):
        features = self.net.forward_features(x)
        return self.net.forward_head(features, pre_logits=True) if self.pools_itself else features


def build_timm_backbone(model: str, weights=RANDOM, image_size: Optional[int] = None) -> TimmBackbone:
    """The backbone ``model`` (``"timm:NAME"``) for ``image_size`` px inputs, with ``weights`` (see the
    module docstring). ``WeightsUnavailableError`` when the weights cannot be had or do not fit."""
    spec = timm_spec(model)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"build_timm_backbone: image_size must be a positive int or None, got {image_size!r}")
    kwargs: Dict[str, Any] = {"num_classes": 0}
    if spec.transformer and image_size is not None and image_size != spec.image_size:
        kwargs["img_size"] = image_size
    state = _weights_state(spec, weights)
    if state is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(state_dict=state))
    try:
        with _hub_offline():
            net = _create(spec.name, kwargs)
    except RuntimeError as error:  # load_state_dict: tensors of the wrong shape
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line] or [str(error).splitlines()[0]]
        raise WeightsUnavailableError(f"--weights {weights}: the tensors do not fit {model}: {'; '.join(lines[:3])}") from error
    return TimmBackbone(net, spec)


def _weights_state(spec: TimmSpec, weights) -> Optional[Dict[str, torch.Tensor]]:
    """The checked state dict (classifier keys removed) that ``weights`` names, ``None`` for random weights."""
    if weights is None or weights == RANDOM:
        return None
    if asks_for_pretrained(weights):
        path = cached_pretrained_file(spec, weights)
    elif isinstance(weights, (str, Path)):
        path = Path(weights)
    else:
        raise ValueError(f"build_timm_backbone: weights must be 'imagenet', 'pretrained', 'none' or a path, got {weights!r}")
    state = without_prefixes(read_state_dict(path), spec.classifier)
    require_matching_keys(state, spec.keys, weights, spec.model)
    return state


def cached_pretrained_file(spec: TimmSpec, weights: str = "pretrained") -> Path:
    """The local file of ``spec``'s pretrained weights: the Hugging Face cache entry of its
    ``hf_hub_id`` or torch's hub-cache copy of its ``url``. Never downloads; ``WeightsUnavailableError``
    saying where it looked and how to pass a local file when neither is there."""
    cfg = spec.pretrained_cfg
    looked = []
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        filenames = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        cache = hf_cache_dir()
        found = _hf_cached(hub_id, filenames, cache)
        if found is not None:
            return found
        looked.append(f"the Hugging Face cache {cache} ({hub_id}: {' or '.join(filenames)})")
    url = cfg.get("url") or ""
    if url.endswith(_WEIGHT_SUFFIXES):
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if path.is_file():
            return path
        looked.append(f"torch's hub cache {path}")
    if not looked:
        raise WeightsUnavailableError(f"--weights {weights}: timm publishes no weights file for {spec.tagged_name}; "
                                      "pass --weights PATH (a state dict) or --weights none")
    raise WeightsUnavailableError(
        f"--weights {weights}: the pretrained weights of {spec.tagged_name} are not in {' nor '.join(looked)}, and dmlfast "
        f"does not download; on a machine with internet access run python -c \"import timm; timm.create_model("
        f"'{spec.tagged_name}', pretrained=True)\" (it fills that cache), or save that model's state_dict() to a .pth or "
        ".safetensors file and pass --weights PATH")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, as the environment says now (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    try:
        from huggingface_hub import constants
    except ImportError:
        return Path("~/.cache/huggingface/hub").expanduser()
    return Path(constants.HF_HUB_CACHE)


def _hf_cached(repo_id: str, filenames, cache: Path) -> Optional[Path]:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    with _hub_offline():
        for filename in filenames:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache))
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    return None


@contextlib.contextmanager
def _hub_offline():
    """The Hugging Face hub offline (environment and the already-imported constant) for the duration."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None
    constant = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before
        if constants is not None:
            constants.HF_HUB_OFFLINE = constant


__all__ = ["BackboneUnavailableError", "TIMM_INSTALL_HINT", "TIMM_PREFIX", "TimmBackbone", "TimmSpec", "build_timm_backbone",
           "cached_pretrained_file", "hf_cache_dir", "import_timm", "is_timm_name", "timm_spec"]
