"""Loss modules that own their proxies, with pytorch-metric-learning's constructor signatures.

``loss = Loss(num_classes, embedding_size, ...)``; ``loss(embeddings, labels)``; the proxies are
``loss.proxies``, an ``nn.Parameter`` of shape (num_classes, embedding_size) kept in float32 (the
fused ops take bf16/fp16 embeddings with float32 proxies as they are, nothing is cast). Give the
proxies their own optimizer parameter group: the published recipes train them with a larger
learning rate (e.g. x100 for Proxy-Anchor).
"""
import math
import numbers

import torch
from torch import nn

from . import functional


def _positive_int(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return int(value)


class _ProxyLoss(nn.Module):
    def __init__(self, num_classes, embedding_size):
        super().__init__()
        owner = type(self).__name__
        num_classes = _positive_int(owner, "num_classes", num_classes)
        embedding_size = _positive_int(owner, "embedding_size", embedding_size)
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size, dtype=torch.float32))

    @property
    def num_classes(self):
        return self.proxies.shape[0]

    @property
    def embedding_size(self):
        return self.proxies.shape[1]


class ProxyAnchorLoss(_ProxyLoss):
    """Proxy-Anchor (SPEC §1.1): see :func:`dmlfast.functional.proxy_anchor_loss`.

    Proxies are initialised as in the official code: kaiming_normal_(mode='fan_out'), i.e.
    N(0, 2/num_classes) per entry.
    """

    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32.0):
        super().__init__(num_classes, embedding_size)
        self.margin = functional._require_number(type(self).__name__, "margin", margin)
        self.alpha = functional._require_number(type(self).__name__, "alpha", alpha, low=0.0, low_inclusive=False)
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, embeddings, labels):
        return functional.proxy_anchor_loss(embeddings, self.proxies, labels, self.margin, self.alpha)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, alpha={self.alpha}"


class ProxyNCALoss(_ProxyLoss):
    """ProxyNCA / ProxyNCA++ (SPEC §2): see :func:`dmlfast.functional.proxy_nca_loss`.

    Proxies are initialised randn / 8 as in the ProxyNCA and ProxyNCA++ reference code. The default
    scale 18 is ProxyNCA++'s (and dichotomies' s_x = s_p = 3).
    """

    def __init__(self, num_classes, embedding_size, scale=18.0, smoothing=0.0, exclude_positive=False):
        super().__init__(num_classes, embedding_size)
        owner = type(self).__name__
        self.scale = functional._require_number(owner, "scale", scale, low=0.0, low_inclusive=False)
        self.smoothing = functional._require_number(owner, "smoothing", smoothing, low=0.0, high=1.0)
        if not isinstance(exclude_positive, bool):
            raise TypeError(f"{owner}: exclude_positive must be a bool, got {type(exclude_positive).__name__}")
        self.exclude_positive = exclude_positive
        with torch.no_grad():
            self.proxies.normal_().div_(8.0)

    def forward(self, embeddings, labels):
        return functional.proxy_nca_loss(
            embeddings, self.proxies, labels, self.scale, self.smoothing, self.exclude_positive
        )

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, scale={self.scale}, "
            f"smoothing={self.smoothing}, exclude_positive={self.exclude_positive}"
        )


class NormSoftmaxLoss(_ProxyLoss):
    """Norm-SoftMax (SPEC §4.2): softmax cross-entropy on scale · cos(x, p) over all proxies.

    Proxies are initialised kaiming_uniform_(a=√5) as in the Proxy Synthesis code.
    """

    def __init__(self, num_classes, embedding_size, scale=23.0):
        super().__init__(num_classes, embedding_size)
        self.scale = functional._require_number(type(self).__name__, "scale", scale, low=0.0, low_inclusive=False)
        nn.init.kaiming_uniform_(self.proxies, a=math.sqrt(5))

    def forward(self, embeddings, labels):
        return functional.proxy_nca_loss(embeddings, self.proxies, labels, self.scale)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, scale={self.scale}"
