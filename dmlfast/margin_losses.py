"""The margin softmaxes of face and product recognition as fused loss modules (docs/losses.md §9,
§10): CosFace, ArcFace, Sub-center ArcFace and SoftTriple, with pytorch-metric-learning's
constructor names and defaults.

``loss = ArcFaceLoss(num_classes, embedding_size)``; ``loss(embeddings, labels)`` with embeddings
(B, embedding_size) in float32/bfloat16/float16/float64 and labels (B,) of any integer dtype
(converted to int64 once) in [0, num_classes)
returns the mean loss over the batch as a 0-dim float32 tensor (float64 for float64 inputs), whose
backward reaches the embeddings and ``loss.proxies``. Each class has K proxies ("centers"; K = 1
for CosFace and ArcFace): ``proxies`` is an ``nn.Parameter`` of shape (num_classes · K,
embedding_size), class c's centers in rows c·K .. c·K + K − 1 (pytorch-metric-learning's ``W``
is its transpose). Like the other losses they run tiled over classes in one fused op, never forming
a B × C tensor, and shard over processes (:mod:`dmlfast.sharded`).
"""
import math

import torch
from torch import nn

from . import functional
from .checks import require_int, require_number


def normal_(proxies, num_rows=None, generator=None):
    """N(0, 1) per entry: pytorch-metric-learning's initial ``W`` for its margin softmaxes."""
    with torch.no_grad():
        return proxies.normal_(generator=generator)


def kaiming_uniform_rows_(proxies, num_rows, generator=None):
    """U(-1/√R, 1/√R) per entry with R = ``num_rows`` = C·K of the whole table: ``kaiming_uniform_(a=√5)``
    of the official (D, C·K) matrix, the SoftTriple code's (and pytorch-metric-learning's) initial
    centers. A shard draws its rows with the whole table's R."""
    bound = 1.0 / math.sqrt(num_rows)
    with torch.no_grad():
        return proxies.uniform_(-bound, bound, generator=generator)


def cosface_hyperparameters(owner, margin, scale):
    """``(margin, scale)`` checked: margin finite, scale > 0."""
    return require_number(owner, "margin", margin), require_number(owner, "scale", scale, low=0.0, low_inclusive=False)


def arcface_hyperparameters(owner, margin, scale):
    """``(margin, scale)`` checked: margin in [0, 180) degrees, scale > 0."""
    return (require_number(owner, "margin", margin, low=0.0, high=180.0),
            require_number(owner, "scale", scale, low=0.0, low_inclusive=False))


def soft_triple_hyperparameters(owner, la, gamma, margin, tau):
    """``(la, gamma, margin, tau)`` checked: la, gamma > 0, margin finite, tau >= 0."""
    return (require_number(owner, "la", la, low=0.0, low_inclusive=False),
            require_number(owner, "gamma", gamma, low=0.0, low_inclusive=False),
            require_number(owner, "margin", margin), require_number(owner, "tau", tau, low=0.0))


class _CenterSoftmaxLoss(nn.Module):
    """Holds the (num_classes · K, embedding_size) float32 proxies of a class-center softmax loss."""

    #: ``init_proxies_(proxies, num_rows, generator=None)``: initial proxies for a table of ``num_rows``
    #: = num_classes · K rows (or a shard of it).
    init_proxies_ = staticmethod(normal_)

    def __init__(self, num_classes, embedding_size, centers_per_class=1):
        super().__init__()
        owner = type(self).__name__
        num_classes = require_int(owner, "num_classes", num_classes)
        embedding_size = require_int(owner, "embedding_size", embedding_size)
        self.centers_per_class = require_int(owner, "centers_per_class", centers_per_class)
        self.proxies = nn.Parameter(torch.empty(num_classes * self.centers_per_class, embedding_size))
        self.init_proxies_(self.proxies, num_classes * self.centers_per_class)

    @property
    def num_classes(self):
        return self.proxies.shape[0] // self.centers_per_class

    @property
    def embedding_size(self):
        return self.proxies.shape[1]

    def forward(self, embeddings, labels):
        """``loss_fn(embeddings, labels) -> loss``: embeddings (B, embedding_size) float32/bfloat16/float16/
        float64, labels (B,) any integer dtype in [0, num_classes); the batch's mean loss, a 0-dim float32
        tensor (float64 for float64 inputs) whose backward reaches the embeddings and ``proxies``."""
        return self.loss_with_proxies(embeddings, self.proxies, labels)

    def loss_with_proxies(self, embeddings, proxies, labels):
        raise NotImplementedError


class CosFaceLoss(_CenterSoftmaxLoss):
    """CosFace (Wang et al., CVPR 2018): :func:`dmlfast.functional.cosface_loss` with its proxies.

    ``CosFaceLoss(num_classes, embedding_size, margin=0.35, scale=64.0)``: the logits are
    scale · (cos(x, p_c) − margin·[c = y]). Proxies N(0, 1), as pytorch-metric-learning's::

        loss = CosFaceLoss(100, 512)(embeddings, labels)   # (B, 512) float, (B,) integers -> 0-dim float32 tensor
    """

    def __init__(self, num_classes, embedding_size, margin=0.35, scale=64.0):
        super().__init__(num_classes, embedding_size)
        self.margin, self.scale = cosface_hyperparameters(type(self).__name__, margin, scale)

    def loss_with_proxies(self, embeddings, proxies, labels):
        return functional.cosface_loss(embeddings, proxies, labels, self.margin, self.scale)

    def logit_arguments(self):
        """The softmax op's class-logit arguments (scale, K, aggregation, gamma, margin type, margin)."""
        return self.scale, 1, 0, 1.0, 1, self.margin

    def extra_repr(self):
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, scale={self.scale}"


class ArcFaceLoss(_CenterSoftmaxLoss):
    """ArcFace (Deng et al., CVPR 2019): :func:`dmlfast.functional.arcface_loss` with its proxies.

    ``ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64.0)``: the target's logit is
    scale · cos(θ + margin), ``margin`` in **degrees** as in pytorch-metric-learning (28.6° ≈ 0.5 rad,
    the paper's m); beyond θ + m = π it is scale · (cos θ − m sin m), InsightFace's choice (no
    "easy margin"). Proxies N(0, 1), as pytorch-metric-learning's::

        loss = ArcFaceLoss(100, 512)(embeddings, labels)   # (B, 512) float, (B,) integers -> 0-dim float32 tensor
    """

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64.0, centers_per_class=1):
        super().__init__(num_classes, embedding_size, centers_per_class)
        self.margin, self.scale = arcface_hyperparameters(type(self).__name__, margin, scale)

    def loss_with_proxies(self, embeddings, proxies, labels):
        return functional.arcface_loss(embeddings, proxies, labels, self.margin, self.scale, self.centers_per_class)

    def logit_arguments(self):
        return self.scale, self.centers_per_class, 0, 1.0, 2, math.radians(self.margin)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
                f"scale={self.scale}")


class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-center ArcFace (Deng et al., ECCV 2020): ArcFace with ``sub_centers`` K proxies per class,
    a class's cosine the largest of its K (docs/losses.md §9.3).

    ``SubCenterArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64.0, sub_centers=3)``;
    ``proxies`` has num_classes · K rows. pytorch-metric-learning's ``get_outliers`` (dropping
    samples far from their dominant sub-center) is not part of the loss and is not provided::

        loss = SubCenterArcFaceLoss(100, 512)(embeddings, labels)   # (B, 512) float, (B,) integers -> 0-dim tensor
    """

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64.0, sub_centers=3):
        super().__init__(num_classes, embedding_size, margin, scale, centers_per_class=sub_centers)

    @property
    def sub_centers(self):
        return self.centers_per_class

    def extra_repr(self):
        return super().extra_repr() + f", sub_centers={self.sub_centers}"


class SoftTripleLoss(_CenterSoftmaxLoss):
    """SoftTriple (Qian et al., ICCV 2019): :func:`dmlfast.functional.soft_triple_loss` with its centers.

    ``SoftTripleLoss(num_classes, embedding_size, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01,
    tau=0.2)``: K = ``centers_per_class`` centers per class, class similarity the softmax(cos/γ)-weighted
    mean of their cosines, cross-entropy of λ(S − δ·[c = y]), plus τ × the official code's centre
    regulariser. pytorch-metric-learning's SoftTripleLoss has no regulariser: ``tau=0`` matches it.
    Centers U(±1/√(C·K)) (``kaiming_uniform_(a=√5)`` of the official (D, C·K) matrix)::

        loss = SoftTripleLoss(100, 512)(embeddings, labels)   # (B, 512) float, (B,) integers -> 0-dim float32 tensor
    """

    init_proxies_ = staticmethod(kaiming_uniform_rows_)

    def __init__(self, num_classes, embedding_size, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01, tau=0.2):
        super().__init__(num_classes, embedding_size, centers_per_class)
        self.la, self.gamma, self.margin, self.tau = soft_triple_hyperparameters(
            type(self).__name__, la, gamma, margin, tau)

    def loss_with_proxies(self, embeddings, proxies, labels):
        return functional.soft_triple_loss(embeddings, proxies, labels, self.centers_per_class, self.la, self.gamma,
                                           self.margin, self.tau)

    def logit_arguments(self):
        return self.la, self.centers_per_class, 1, 1.0 / self.gamma, 1, self.margin

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, margin={self.margin}, "
                f"tau={self.tau}")
