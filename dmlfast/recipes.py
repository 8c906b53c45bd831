"""The training recipes: one table (``RULES``) per dataset x loss x backbone, and ``resolve_recipe``.

A recipe is built by applying, in order, every rule of ``RULES`` whose dataset, loss and model
patterns match (shell-style: ``"*"`` matches anything, ``"timm:*"`` any timm backbone; later rules
override earlier ones), on top of ``Recipe()``'s defaults. The model comes first: the one given (``--model``) or the ``model`` that the
matching rules name for the dataset and loss. Command-line flags then override the result
(``dmlfast.train``). Sources: docs/losses.md §1.2 (Proxy-Anchor, official train.py and README),
§2.3 (ProxyNCA++), §4.4 (Norm-SoftMax, Proxy Synthesis recipe), §6 (IDML), §9 (CosFace, ArcFace,
Sub-center ArcFace: the papers' margins and scales, dmlfast's own optimisation), §10 (SoftTriple, the
official train.py). The glyph and Omniglot rows are
dmlfast's own: a small CNN trained from scratch, sized to finish in minutes on a CPU. The user's own
data (``folder``, ``csv``) gets each loss's generic recipe on ResNet-50 (ImageNet weights from torchvision).
A pretrained timm backbone (``timm:NAME``) gets the generic fine-tuning recipe of ResNet-50 (frozen
BatchNorm, warm-up epochs that train only the embedding and the proxies); ViT-S/16 with Proxy-Anchor
has its own row, from HIER (Kim et al., CVPR 2023; official code tjddus9597/HIER-CVPR23).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from dmlfast.losses import LOSSES as _LOSS_CLASSES

#: The loss names of :data:`dmlfast.losses.LOSSES`, the registry.
LOSSES = tuple(_LOSS_CLASSES)
OPTIMIZERS = ("adamw", "adam", "sgd")
#: Per-epoch learning-rate schedules (:mod:`dmlfast.training.schedule`).
LR_SCHEDULES = ("step", "multistep", "plateau")


@dataclass(frozen=True)
class Recipe:
    """Every hyper-parameter of a training run (CLI flags of the same name override them).

    ``proxy_lr_mult``/``embedding_lr_mult``: learning-rate multipliers of the proxies' and the
    embedding Linear's parameter groups. ``warmup_epochs``: first epochs in which only the embedding
    and the proxies train. ``lr_schedule``: ``"step"`` (StepLR every ``lr_step`` epochs by ``lr_gamma``;
    ``lr_step=0``: constant lr), ``"multistep"`` (x ``lr_gamma`` from each epoch of ``lr_milestones``)
    or ``"plateau"`` (ProxyNCA++'s: x ``lr_gamma`` after ``lr_patience`` + 1 epochs without a better
    validation Recall@1 on a held-out half of the training classes; :mod:`dmlfast.training.schedule`).
    ``grad_clip``: ``clip_grad_value_`` bound (0: off), applied to the proxies too when
    ``clip_proxies``. ``image_size``/``resize_size``: ``None`` takes the dataset's loader defaults
    (for a real dataset, the backbone's input size). ``crop_scale``: RandomResizedCrop's area range
    (``None``: the dataset's). ``frozen_layers``: backbone parameter prefixes never trained.
    ``loss_kwargs``: passed to the loss constructor. ``proxy_synthesis``: (alpha, mu) of Proxy
    Synthesis around the loss, ``None`` for none. ``mixup``: image-level mixup each step
    (:mod:`dmlfast.training.mixup`). ``normalize_uncertainty``: IDML only, L2-normalize the
    uncertainty head's output (the released default, which leaves that head inert; docs/losses.md §6 ⚠)."""

    model: str = "bn_inception"
    weights: str = "imagenet"
    embedding_size: int = 512
    pooling: str = "avg+max"
    layer_norm: bool = False
    freeze_bn: bool = True
    batch_size: int = 180
    samples_per_class: Optional[int] = None
    epochs: int = 60
    optimizer: str = "adamw"
    lr: float = 1e-4
    embedding_lr_mult: float = 1.0
    proxy_lr_mult: float = 100.0
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    warmup_epochs: int = 1
    lr_schedule: str = "step"
    lr_step: int = 10
    lr_gamma: float = 0.5
    lr_milestones: Tuple[int, ...] = ()
    lr_patience: int = 4
    grad_clip: float = 10.0
    clip_proxies: bool = True
    image_size: Optional[int] = None
    resize_size: Optional[int] = None
    crop_scale: Optional[Tuple[float, float]] = None
    frozen_layers: Tuple[str, ...] = ()
    loss_kwargs: Dict[str, Any] = field(default_factory=dict)
    proxy_synthesis: Optional[Tuple[float, float]] = None
    mixup: bool = False
    normalize_uncertainty: bool = True

    def replace(self, **changes) -> "Recipe":
        """A copy with ``changes`` applied (unknown names raise ``ValueError``)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"Recipe.replace: unknown fields {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# (dataset pattern, loss pattern, model pattern, overrides), applied in order. A pattern is "*", a
# name, or a tuple of names.
RULES: Tuple[Tuple[Any, Any, Any, Dict[str, Any]], ...] = (
    # Proxy-Anchor, official train.py defaults + README (docs/losses.md §1.2).
    ("*", "ProxyAnchor", "*", dict(model="bn_inception", embedding_size=512, batch_size=180, epochs=60, optimizer="adamw",
                                    lr=1e-4, proxy_lr_mult=100.0, weight_decay=1e-4, warmup_epochs=1, freeze_bn=True,
                                    lr_step=10, lr_gamma=0.5, grad_clip=10.0, pooling="avg+max",
                                    loss_kwargs=dict(margin=0.1, alpha=32.0))),
    # ResNet-50's rows are the generic fine-tuning recipe of a pretrained CNN: timm backbones take them too.
    ("*", "ProxyAnchor", ("resnet50", "timm:*"), dict(batch_size=120, warmup_epochs=5)),
    ("*", "ProxyAnchor", ("googlenet", "resnet18"), dict(batch_size=150)),
    (("SOP", "In-shop"), "ProxyAnchor", "*", dict(lr=6e-4, lr_step=20, lr_gamma=0.25, freeze_bn=False)),
    ("Cars196", "ProxyAnchor", "bn_inception", dict(lr_step=20)),
    ("CUB", "ProxyAnchor", ("resnet50", "timm:*"), dict(lr_step=5)),
    ("Cars196", "ProxyAnchor", ("resnet50", "timm:*"), dict(lr_step=10)),
    # ViT-S/16 with Proxy-Anchor: HIER's released scripts (Kim et al., CVPR 2023, tjddus9597/HIER-CVPR23,
    # scripts/ViT and scripts/DINO, hier/train.py, hier/models/model.py; its HIER regularizer not included):
    # class token, LayerNorm without affine before the Linear, embedding 128, patch embedding frozen (the one
    # layer-wise setting of the source), AdamW eps 1e-4, lr 1e-5 (DINO weights 5e-6) constant, proxies x1e4,
    # wd 1e-2, 2 images per class in batches of 180, 1 warm-up epoch with the backbone at lr 0, 100 epochs,
    # gradient values clipped at 10 (proxies included), crops of scale (0.2, 1) at 224, resize 256.
    ("*", "ProxyAnchor", "timm:vit_small_patch16_224*", dict(
        embedding_size=128, pooling="backbone", layer_norm=True, frozen_layers=("patch_embed",), optimizer="adamw",
        adam_eps=1e-4, lr=1e-5, embedding_lr_mult=1.0, proxy_lr_mult=1e4, weight_decay=1e-2, batch_size=180,
        samples_per_class=2, warmup_epochs=1, epochs=100, lr_schedule="step", lr_step=0, grad_clip=10.0,
        clip_proxies=True, crop_scale=(0.2, 1.0), loss_kwargs=dict(margin=0.1, alpha=32.0))),
    ("*", "ProxyAnchor", "timm:vit_small_patch16_224.dino", dict(lr=5e-6)),
    (("SOP", "In-shop"), "ProxyAnchor", "timm:vit_small_patch16_224*", dict(weight_decay=1e-4, warmup_epochs=5,
                                                                           epochs=150, embedding_lr_mult=100.0)),
    # ProxyNCA++ (docs/losses.md §2.3), with its schedule: 5 warm-up epochs, then ReduceLROnPlateau (x0.1,
    # patience 4) on the Recall@1 of the second half of the training classes, trained on the first half.
    # The published second run trains on all training classes with --lr-schedule multistep at the epochs
    # the first one recorded (the run's summary prints that command).
    ("*", "ProxyNCA", "*", dict(model="resnet50", embedding_size=2048, pooling="max", layer_norm=True, freeze_bn=True,
                                 optimizer="adam", adam_eps=1.0, weight_decay=0.0, lr=4e-3, proxy_lr_mult=1e5,
                                 batch_size=32, samples_per_class=4, warmup_epochs=5, epochs=45, lr_schedule="plateau",
                                 lr_gamma=0.1, lr_patience=4, grad_clip=10.0, clip_proxies=False, image_size=256,
                                 resize_size=288, loss_kwargs=dict(scale=18.0))),
    (("SOP", "In-shop"), "ProxyNCA", "*", dict(lr=2.4e-2, batch_size=192, samples_per_class=3, epochs=85)),
    ("SOP", "ProxyNCA", "*", dict(proxy_lr_mult=1e4)),
    # Norm-SoftMax with the Proxy Synthesis repository's recipe (docs/losses.md §4.4).
    ("*", "NormSoftmax", "*", dict(model="bn_inception", embedding_size=512, pooling="avg", freeze_bn=True,
                                    optimizer="adam", adam_eps=0.01, lr=1e-4, proxy_lr_mult=100.0, weight_decay=1e-4,
                                    batch_size=128, epochs=130, lr_step=50, lr_gamma=0.1, warmup_epochs=0,
                                    grad_clip=10.0, image_size=224, loss_kwargs=dict(scale=23.0))),
    # Proxy-ISA, the published train.py + README (docs/losses.md §3.5); the backbone is Proxy-Anchor's.
    ("*", "ProxyISA", "*", dict(model="bn_inception", embedding_size=512, batch_size=128, epochs=100, optimizer="adam",
                                 lr=1e-4, proxy_lr_mult=100.0, weight_decay=1e-4, warmup_epochs=1, freeze_bn=True,
                                 lr_step=10, lr_gamma=0.5, grad_clip=10.0, pooling="avg+max",
                                 loss_kwargs=dict(margin=0.1, alpha=32.0, k=0.9, V=100, lam=0.1, memory_size=55000,
                                                  memory_start_epoch=2, filter_start_epoch=3))),
    (("CUB", "Cars196"), "ProxyISA", "*", dict(warmup_epochs=0)),
    ("Cars196", "ProxyISA", "*", dict(loss_kwargs=dict(margin=0.1, alpha=32.0, k=0.4, V=100, lam=0.1, memory_size=55000,
                                                         memory_start_epoch=2, filter_start_epoch=3))),
    (("SOP", "In-shop"), "ProxyISA", "*", dict(optimizer="adamw", lr=6e-4)),
    ("In-shop", "ProxyISA", "*", dict(loss_kwargs=dict(margin=0.1, alpha=32.0, k=0.1, V=100, lam=0.1, memory_size=55000,
                                                         memory_start_epoch=2, filter_start_epoch=3))),
    # Asymptotic moving proxies (docs/losses.md §5): GMP + LayerNorm, proxies moved, not trained. The
    # published model's backbone is not known; ResNet-50 here. StepLR at half the epochs.
    ("*", "Moving", "*", dict(model="resnet50", embedding_size=512, pooling="max", layer_norm=True, freeze_bn=True,
                               optimizer="adam", lr=1e-4, weight_decay=0.0, warmup_epochs=0, batch_size=128, epochs=30,
                               lr_step=15, lr_gamma=0.1, grad_clip=0.0, image_size=256, resize_size=292,
                               loss_kwargs=dict(temperature=0.03, momentum=0.5))),
    (("SOP", "In-shop"), "Moving", "*", dict(lr=4e-5, loss_kwargs=dict(temperature=0.05, momentum=0.95))),
    # IDML (docs/losses.md §6): ResNet-50, two heads, Proxy-Anchor on the introspective similarity, mixup
    # every step. The published recipe has no epoch count: Proxy-Anchor's 60. In-shop: the base row.
    ("*", "IDML", "*", dict(model="resnet50", embedding_size=512, batch_size=120, epochs=60, optimizer="adamw", lr=6e-4,
                             proxy_lr_mult=100.0, weight_decay=1e-4, warmup_epochs=5, freeze_bn=True, lr_step=5,
                             lr_gamma=0.5, grad_clip=10.0, pooling="avg+max", mixup=True,
                             loss_kwargs=dict(margin=0.1, alpha=32.0))),
    ("Cars196", "IDML", "*", dict(lr=2.5e-4, lr_step=10)),
    ("SOP", "IDML", "*", dict(lr_step=10, lr_gamma=0.25)),
    # SoftTriple, the official train.py (idstcv/SoftTriple; docs/losses.md §10): BN-Inception with a 64-d
    # embedding, batch 32, Adam (eps 0.01) lr 1e-4 and centers at 1e-2, weight decay 1e-4, lr x0.1 every 20
    # epochs (the official decay falls one epoch earlier), 50 epochs, frozen BN, no warm-up or clipping,
    # 224 px; la 20, gamma 0.1, tau 0.2, margin 0.01, K = 10.
    ("*", "SoftTriple", "*", dict(model="bn_inception", embedding_size=64, pooling="avg", freeze_bn=True,
                                   optimizer="adam", adam_eps=0.01, lr=1e-4, proxy_lr_mult=100.0, weight_decay=1e-4,
                                   batch_size=32, epochs=50, lr_step=20, lr_gamma=0.1, warmup_epochs=0, grad_clip=0.0,
                                   image_size=224,
                                   loss_kwargs=dict(centers_per_class=10, la=20.0, gamma=0.1, margin=0.01, tau=0.2))),
    # dmlfast's own choice for SOP / In-shop (few images per class): 512-d, K = 2.
    (("SOP", "In-shop"), "SoftTriple", "*", dict(embedding_size=512, loss_kwargs=dict(
        centers_per_class=2, la=20.0, gamma=0.1, margin=0.01, tau=0.2))),
    # CosFace, ArcFace and Sub-center ArcFace: the papers' margins and scales (CosFace m 0.35, s 64; ArcFace
    # m 0.5 rad = 28.6 deg, s 64; K = 3 sub-centers). Their published training is face recognition's; the
    # rest of these rows is dmlfast's own choice, SoftTriple's optimisation on a 512-d BN-Inception.
    ("*", ("CosFace", "ArcFace", "SubCenterArcFace"), "*", dict(
        model="bn_inception", embedding_size=512, pooling="avg", freeze_bn=True, optimizer="adam", adam_eps=0.01,
        lr=1e-4, proxy_lr_mult=100.0, weight_decay=1e-4, batch_size=32, epochs=50, lr_step=20, lr_gamma=0.1,
        warmup_epochs=0, grad_clip=0.0, image_size=224)),
    ("*", "CosFace", "*", dict(loss_kwargs=dict(margin=0.35, scale=64.0))),
    ("*", "ArcFace", "*", dict(loss_kwargs=dict(margin=28.6, scale=64.0))),
    ("*", "SubCenterArcFace", "*", dict(loss_kwargs=dict(margin=28.6, scale=64.0, sub_centers=3))),
    # dmlfast's small-image rows: a small CNN from scratch, any loss (its own loss_kwargs kept).
    (("glyphs", "Omniglot"), "*", "*", dict(model="smallcnn", weights="none", embedding_size=128, pooling="avg+max",
                                              layer_norm=False, freeze_bn=False, optimizer="adamw", adam_eps=1e-8,
                                              lr=2e-3, proxy_lr_mult=100.0, weight_decay=1e-4, warmup_epochs=0,
                                              batch_size=128, samples_per_class=None, epochs=8, lr_schedule="step",
                                              lr_step=4, lr_gamma=0.3, grad_clip=10.0, clip_proxies=True,
                                              image_size=None, resize_size=None, crop_scale=None, frozen_layers=())),
    ("Omniglot", "*", "*", dict(epochs=10, lr_step=5, image_size=32, resize_size=32)),
    # Small-image runs with an ImageNet backbone: its weights, the dataset's own image size.
    (("glyphs", "Omniglot"), "*", ("resnet50", "resnet18", "googlenet", "bn_inception", "timm:*"),
     dict(weights="imagenet", lr=1e-4, warmup_epochs=1)),
    # The user's own data (folder/csv): the loss's recipe on ResNet-50 with torchvision's ImageNet weights
    # (downloaded on first use; BN-Inception's need a manual download), 224 px crops.
    (("folder", "csv"), "*", "*", dict(model="resnet50")),
    # smallcnn from scratch: the glyph row's optimisation (BatchNorm trained, lr 2e-3, no warm-up)
    (("folder", "csv"), "*", "smallcnn", dict(weights="none", warmup_epochs=0, freeze_bn=False, lr=2e-3)),
)


def _matches(pattern, value) -> bool:
    """Whether ``value`` matches ``pattern``: a shell-style pattern or a tuple of them."""
    patterns = pattern if isinstance(pattern, tuple) else (pattern,)
    return any(fnmatch.fnmatchcase(str(value), p) for p in patterns)


def default_model(dataset: str, loss: str) -> str:
    """The backbone the recipe table names for ``dataset`` and ``loss``."""
    return resolve_recipe(dataset, loss).model


def resolve_recipe(dataset: str, loss: str, model: Optional[str] = None) -> Recipe:
    """The recipe for ``dataset`` x ``loss`` x ``model`` (``model=None``: the table's backbone for them;
    ``"timm:NAME"`` for a timm backbone)."""
    from dmlfast.data import DATASETS
    from dmlfast.models import BACKBONES, is_backbone_name

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if model is not None and not is_backbone_name(model):
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(BACKBONES)} or timm:NAME (any timm model)")
    if model is None:
        model = _apply(dataset, loss, None).model
    return _apply(dataset, loss, model).replace(model=model)


def _apply(dataset: str, loss: str, model: Optional[str]) -> Recipe:
    values: Dict[str, Any] = {}
    for data_pattern, loss_pattern, model_pattern, overrides in RULES:
        if _matches(data_pattern, dataset) and _matches(loss_pattern, loss) and (model is None and model_pattern == "*" or model is not None and _matches(model_pattern, model)):
            values.update(overrides)
    return Recipe(**values)
