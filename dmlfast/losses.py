"""Loss modules that own their proxies, with pytorch-metric-learning's constructor signatures.

``loss_fn = Loss(num_classes, embedding_size, ...)``; ``loss = loss_fn(embeddings, labels)``:

- ``embeddings``: (B, D) float32, bfloat16, float16 or float64 (a model's output, under autocast
  too; normalised inside);
- ``labels``: (B,) class indices in [0, num_classes), any integer dtype (int64, int32, int16, int8,
  uint8; converted to int64 once), on the embeddings' device;
- returns a 0-dim tensor, float32 (float64 for float64 inputs), whose backward reaches the
  embeddings and the proxies.

The proxies are ``loss_fn.proxies``, an ``nn.Parameter`` (num_classes, embedding_size) kept in
float32 (the fused ops take bf16/fp16 embeddings with float32 proxies as they are, nothing is cast).
Give them their own optimizer parameter group: the published recipes train them with a larger
learning rate (e.g. x100 for Proxy-Anchor). Bad input is a ``ValueError``/``TypeError`` naming the
argument (labels out of range, NaN/Inf, mismatched shapes or devices), never a NaN loss.
:data:`LOSSES` maps the trainer's names to the classes; :func:`loss_class` looks a name up.
"""
import math

import torch
from torch import nn

from . import functional
from .margin_losses import ArcFaceLoss, CosFaceLoss, SoftTripleLoss, SubCenterArcFaceLoss
from .checks import (anchor_hyperparameters, as_int64_labels, canonical_name, check_loss_inputs, one_of, require_int, require_number,
                     softmax_hyperparameters)


# Initial proxies, drawn in place into ``proxies``: the whole (num_classes, D) table, or a block of its
# rows (a shard of :mod:`dmlfast.sharded`, which passes its own generator).

def kaiming_normal_fan_out_(proxies, num_classes, generator=None):
    """N(0, 2/num_classes) per entry: ``kaiming_normal_(mode='fan_out')`` of the whole table (Proxy-Anchor's)."""
    std = nn.init.calculate_gain("leaky_relu", 0) / math.sqrt(num_classes)
    with torch.no_grad():
        return proxies.normal_(0, std, generator=generator)


def normal_over_8_(proxies, num_classes=None, generator=None):
    """N(0, 1/64) per entry: ``randn / 8`` (ProxyNCA's and ProxyNCA++'s)."""
    with torch.no_grad():
        return proxies.normal_(generator=generator).div_(8.0)


def kaiming_uniform_sqrt5_(proxies, num_classes=None, generator=None):
    """U(-1/√D, 1/√D) per entry: ``kaiming_uniform_(a=√5)`` (the Proxy Synthesis code's, for Norm-SoftMax)."""
    return nn.init.kaiming_uniform_(proxies, a=math.sqrt(5), generator=generator)


class _ProxyLoss(nn.Module):
    #: ``init_proxies_(proxies, num_classes, generator=None)``: this loss's initial proxies.
    init_proxies_ = staticmethod(kaiming_normal_fan_out_)

    def __init__(self, num_classes, embedding_size):
        super().__init__()
        owner = type(self).__name__
        num_classes = require_int(owner, "num_classes", num_classes)
        embedding_size = require_int(owner, "embedding_size", embedding_size)
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size, dtype=torch.float32))

    def forward(self, embeddings, labels):
        """``loss_fn(embeddings, labels) -> loss``: embeddings (B, D) float32/bfloat16/float16/float64,
        labels (B,) any integer dtype in [0, num_classes); returns the batch's loss, a 0-dim float32
        tensor (float64 for float64 inputs) whose backward reaches the embeddings and ``proxies``."""
        return self.loss_with_proxies(embeddings, self.proxies, labels)

    def loss_with_proxies(self, embeddings, proxies, labels):
        """This loss with its hyperparameters on other proxies (Proxy Synthesis extends the set)."""
        raise NotImplementedError

    @property
    def num_classes(self):
        return self.proxies.shape[0]

    @property
    def embedding_size(self):
        return self.proxies.shape[1]


class ProxyAnchorLoss(_ProxyLoss):
    """Proxy-Anchor (Kim et al., CVPR 2020; docs/losses.md §1.1), one fused op for loss and gradients::

        loss_fn = dmlfast.ProxyAnchorLoss(num_classes=100, embedding_size=512, margin=0.1, alpha=32.0)
        loss = loss_fn(embeddings, labels)   # (B, 512) float32/bf16/fp16/float64, (B,) integers in [0, 100)
        loss.backward()                      # gradients reach the model (through embeddings) and loss_fn.proxies

    L = 1/|P⁺| Σ_{c∈P⁺} log(1 + Σ_{b: y_b=c} e^{-α(S_bc-δ)}) + 1/C Σ_c log(1 + Σ_{b: y_b≠c} e^{α(S_bc+δ)})
    on cosines S (δ = ``margin``, α = ``alpha`` > 0, P⁺ the classes with an embedding in the batch);
    returns a 0-dim float32 tensor (float64 for float64 inputs). ``proxies``: (num_classes,
    embedding_size) float32 ``nn.Parameter``, initialised as in the official code,
    kaiming_normal_(mode='fan_out'), i.e. N(0, 2/num_classes) per entry.
    :func:`dmlfast.functional.proxy_anchor_loss` is the same loss on proxies of your own.
    """

    op = "proxy_anchor_loss"  # the fused op it calls, whose input checks and messages ProxySynthesis repeats

    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32.0):
        """C = ``num_classes`` >= 1 proxies of ``embedding_size`` D >= 1; margin δ finite, alpha α > 0."""
        super().__init__(num_classes, embedding_size)
        self.margin, self.alpha = anchor_hyperparameters(type(self).__name__, margin, alpha)
        self.init_proxies_(self.proxies, num_classes)

    def loss_with_proxies(self, embeddings, proxies, labels):
        return functional.proxy_anchor_loss(embeddings, proxies, labels, self.margin, self.alpha)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, alpha={self.alpha}"


class ProxyNCALoss(_ProxyLoss):
    """ProxyNCA / ProxyNCA++ (docs/losses.md §2), one fused op for loss and gradients::

        loss_fn = dmlfast.ProxyNCALoss(num_classes=100, embedding_size=512, scale=18.0, smoothing=0.0)
        loss = loss_fn(embeddings, labels)   # (B, 512) float32/bf16/fp16/float64, (B,) integers in [0, 100)
        loss.backward()

    Mean over the batch of the cross-entropy of softmax(z), z = ``scale`` · cos(x, p) over all
    proxies, against targets smoothed to 1-ε on the label and ε/(C-1) elsewhere (ε = ``smoothing``);
    ``exclude_positive=True`` is the paper's classic form -z_y + log Σ_{c≠y} e^{z_c}. Returns a 0-dim
    float32 tensor (float64 for float64 inputs). The default scale 18 is ProxyNCA++'s (and
    dichotomies' s_x = s_p = 3); pytorch-metric-learning's ``softmax_scale`` s is ``scale=2*s``.
    ``proxies``: (num_classes, embedding_size) float32 ``nn.Parameter``, initialised randn / 8 as in
    the ProxyNCA and ProxyNCA++ reference code (:func:`dmlfast.functional.proxy_nca_loss` on your own).
    """

    op = "proxy_nca_loss"  # the fused op it calls, whose input checks and messages ProxySynthesis repeats
    init_proxies_ = staticmethod(normal_over_8_)

    def __init__(self, num_classes, embedding_size, scale=18.0, smoothing=0.0, exclude_positive=False):
        """C = ``num_classes`` >= 1 proxies of ``embedding_size`` D >= 1; scale > 0, smoothing in [0, 1), exclude_positive a bool."""
        super().__init__(num_classes, embedding_size)
        self.scale, self.smoothing, self.exclude_positive = softmax_hyperparameters(
            type(self).__name__, scale, smoothing, exclude_positive)
        self.init_proxies_(self.proxies, num_classes)

    def loss_with_proxies(self, embeddings, proxies, labels):
        return functional.proxy_nca_loss(embeddings, proxies, labels, self.scale, self.smoothing, self.exclude_positive)

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, scale={self.scale}, "
            f"smoothing={self.smoothing}, exclude_positive={self.exclude_positive}"
        )


class NormSoftmaxLoss(_ProxyLoss):
    """Norm-SoftMax (docs/losses.md §4.2): softmax cross-entropy on ``scale`` · cos(x, p) over all proxies::

        loss_fn = dmlfast.NormSoftmaxLoss(num_classes=100, embedding_size=512, scale=23.0)
        loss = loss_fn(embeddings, labels)   # (B, 512) float32/bf16/fp16/float64, (B,) integers in [0, 100)

    Returns a 0-dim float32 tensor (float64 for float64 inputs) whose backward reaches the embeddings
    and ``proxies``, a (num_classes, embedding_size) float32 ``nn.Parameter`` initialised
    kaiming_uniform_(a=√5) as in the Proxy Synthesis code.
    """

    op = "proxy_nca_loss"  # the fused op it calls, whose input checks and messages ProxySynthesis repeats
    init_proxies_ = staticmethod(kaiming_uniform_sqrt5_)

    def __init__(self, num_classes, embedding_size, scale=23.0):
        """C = ``num_classes`` >= 1 proxies of ``embedding_size`` D >= 1; scale > 0."""
        super().__init__(num_classes, embedding_size)
        self.scale = require_number(type(self).__name__, "scale", scale, low=0.0, low_inclusive=False)
        self.init_proxies_(self.proxies, num_classes)

    def loss_with_proxies(self, embeddings, proxies, labels):
        return functional.proxy_nca_loss(embeddings, proxies, labels, self.scale)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, scale={self.scale}"


class ProxyISALoss(_ProxyLoss):
    """Proxy-ISA (Li et al., MMAsia 2022; docs/losses.md §3): Proxy-Anchor whose exponents are scaled by
    per-pair multipliers M from a per-class schedule, computed inside the fused anchor kernel
    (:func:`dmlfast.functional.proxy_isa_loss`)::

        loss_fn = dmlfast.ProxyISALoss(num_classes=100, embedding_size=512, k=0.9)
        for epoch in range(epochs):
            loss_fn.set_epoch(epoch)                 # 0-indexed: the memory and the filter start by it
            loss = loss_fn(embeddings, labels)       # (B, 512) float, (B,) integers -> 0-dim float32 tensor

    Per-class state (buffers, so they move with ``.to()`` and live in ``state_dict()``), as in the
    published code (rioyokotalab/ProxyISA):

    - ``counter`` c: samples of the class seen (outliers excluded); effective number
      n = (1 - βᶜ)/(1 - β), β = (V - 1)/V; w_base = 1/(1 + log(1 + n));
      w = 1 + (1 + e^{-τ})(w_base - 1)/(1 + e^{V - τ - n}), a gate that stays ≈ 1 until n ≈ V - 5;
    - ``learned_sim`` s̄ (1 until the memory starts), then h · mean over the class's memory
      entries of ⟨p̂_c, f_m⟩; band η = (1 + k(1 - s̄)) w_base + λ and threshold θ = s̄ - η;
    - a cross-batch FIFO memory of ``memory_size`` detached unit embeddings and labels, used only
      to estimate s̄. As published, a batch that does not fit before the end is written into the
      last slots and the write position restarts at 0 (not a true ring buffer).

    Positives: M = 1 + w inside [θ, s̄], w outside (from ``filter_start_epoch`` on; M = 1 before);
    a positive below θ is an outlier and is neither counted nor stored. Negatives (always): M =
    1/max(1, n) below θ, else 1. Each training-mode forward updates the state after computing the
    loss (mask from the old state → loss → store → count, docs/losses.md §3.4); call :meth:`set_epoch` at
    the start of every epoch. The state update has data-dependent shapes, so a training step with
    this loss compiles with graph breaks, not with fullgraph=True. The defaults are the loss class's (k = 1.0 there; the published
    train.py uses k = 0.9, Cars 0.4, In-shop 0.1); h = 0.15 and τ = 1.5 are not on its CLI.
    """

    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32.0, k=1.0, V=100, lam=0.1,
                 memory_size=55000, memory_start_epoch=2, filter_start_epoch=3, hardness_scale=0.15, tau=1.5):
        """C = ``num_classes`` proxies of ``embedding_size``; the schedule's constants as in the class docstring."""
        super().__init__(num_classes, embedding_size)
        owner = type(self).__name__
        number = require_number
        self.margin, self.alpha = anchor_hyperparameters(owner, margin, alpha)
        self.k = number(owner, "k", k, low=0.0)
        self.V = number(owner, "V", V, low=1.0, low_inclusive=False)
        self.lam = number(owner, "lam", lam)
        self.hardness_scale = number(owner, "hardness_scale", hardness_scale)
        self.tau = number(owner, "tau", tau)
        self.memory_start_epoch = require_int(owner, "memory_start_epoch", memory_start_epoch, minimum=0)
        self.filter_start_epoch = require_int(owner, "filter_start_epoch", filter_start_epoch, minimum=0)
        memory_size = require_int(owner, "memory_size", memory_size)
        self.init_proxies_(self.proxies, num_classes)
        # int64, so that module casts (.float(), .half()) leave the counts exact
        self.register_buffer("counter", torch.zeros(num_classes, dtype=torch.int64))
        self.register_buffer("learned_sim", torch.ones(num_classes))
        self.register_buffer("memory_embeddings", torch.zeros(memory_size, embedding_size))
        self.register_buffer("memory_labels", torch.full((memory_size,), -1, dtype=torch.long))
        self.register_buffer("memory_position", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))

    def set_epoch(self, epoch):
        """Tell the loss the (0-indexed) epoch: the memory and the positive filter start by it."""
        self.epoch.fill_(require_int(f"{type(self).__name__}.set_epoch", "epoch", epoch, minimum=0))

    def class_schedule(self):
        """The per-class vectors (s̄, θ, w, easy-negative weight) the next step uses, float32."""
        beta = (self.V - 1) / self.V
        effective = (1 - beta ** self.counter.double()) / (1 - beta)
        base = 1 / (1 + torch.log1p(effective))
        gate = 1 + torch.exp(self.V - self.tau - effective)
        weight = 1 + (1 + math.exp(-self.tau)) * (base - 1) / gate
        center = self.learned_sim.double()
        threshold = center - ((1 + self.k * (1 - center)) * base + self.lam)
        easy_negative = 1 / effective.clamp_min(1)
        return tuple(v.float() for v in (center, threshold, weight, easy_negative))

    def forward(self, embeddings, labels):
        """``loss_fn(embeddings, labels) -> loss`` as :class:`ProxyAnchorLoss`'s (same shapes and
        dtypes, a 0-dim float32 tensor, float64 for float64 inputs); in training mode it then
        updates the per-class state from this batch."""
        labels = as_int64_labels(type(self).__name__, labels)
        center, threshold, weight, easy_negative = self.class_schedule()
        filter_positives = int(self.epoch) >= self.filter_start_epoch
        loss = functional.proxy_isa_loss(
            embeddings, self.proxies, labels, center, threshold, weight, easy_negative,
            filter_positives=filter_positives, margin=self.margin, alpha=self.alpha,
        )
        if self.training:
            self._update_state(embeddings.detach(), labels, threshold, filter_positives)
        return loss

    @torch.no_grad()
    def _update_state(self, embeddings, labels, threshold, filter_positives):
        """After the loss: drop outliers, count the rest, store them, re-estimate s̄ (docs/losses.md §3.4)."""
        normalize = torch.nn.functional.normalize
        unit = normalize(embeddings.float(), dim=1)
        keep = torch.ones_like(labels, dtype=torch.bool)
        if filter_positives:
            keep = (unit * normalize(self.proxies.detach()[labels].float(), dim=1)).sum(1) >= threshold[labels]
        unit, kept_labels = unit[keep], labels[keep]
        self.counter.index_add_(0, kept_labels, torch.ones_like(kept_labels))
        if int(self.epoch) < self.memory_start_epoch or len(kept_labels) == 0:
            return
        size, position = self.memory_labels.shape[0], int(self.memory_position)
        count = min(len(kept_labels), size)
        unit, kept_labels = unit[-count:], kept_labels[-count:]
        start = position if position + count <= size else size - count
        self.memory_embeddings[start:start + count] = unit
        self.memory_labels[start:start + count] = kept_labels
        self.memory_position.fill_(0 if position + count > size else position + count)
        classes = torch.unique(kept_labels)
        stored = torch.isin(self.memory_labels, classes)
        work = torch.promote_types(self.memory_embeddings.dtype, torch.float32)  # the module may be cast to half
        sums = torch.zeros(len(classes), unit.shape[1], device=unit.device, dtype=work)
        slot_class = torch.searchsorted(classes, self.memory_labels[stored])
        sums.index_add_(0, slot_class, self.memory_embeddings[stored].to(work))
        counts = torch.bincount(slot_class, minlength=len(classes)).clamp_min(1)
        class_proxies = normalize(self.proxies.detach()[classes].to(work), dim=1)
        self.learned_sim[classes] = (self.hardness_scale * (class_proxies * sums).sum(1) / counts).to(self.learned_sim.dtype)

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
            f"alpha={self.alpha}, k={self.k}, V={self.V}, lam={self.lam}, memory_size={self.memory_labels.shape[0]}"
        )


class IntrospectiveProxyAnchorLoss(_ProxyLoss):
    """IDML's introspective Proxy-Anchor (Wang, Zheng et al., TPAMI 2023; docs/losses.md §6):
    :func:`dmlfast.functional.idml_proxy_anchor_loss`, i.e. Proxy-Anchor (α = ``alpha``,
    δ = ``margin``) on S'_bc = 1 - (1 - S_bc) · exp(-(‖v_b‖² + 4) / (5 ‖μ_b - p_c‖²)).

    ``forward(embeddings, uncertainty, labels)``: the semantic embeddings μ (B, D), the uncertainty
    embeddings v (B, K) of the model's second head
    (:meth:`dmlfast.models.EmbeddingModel.forward_with_uncertainty`), both float32, bfloat16, float16
    or float64, and the labels (B,), any integer dtype in [0, num_classes)::

        loss_fn = dmlfast.IntrospectiveProxyAnchorLoss(num_classes=100, embedding_size=512)
        mu, v = model.forward_with_uncertainty(images)
        loss = loss_fn(mu, v, labels)        # 0-dim float32 tensor; backward reaches mu, v and proxies

    Proxies are
    raw in the distance (as published) and initialised as Proxy-Anchor's,
    kaiming_normal_(mode='fan_out'); the proxies' own uncertainty is fixed at 0.

    ⚠ As released (``--l2-norm 1``, the default) v is L2-normalized, so a = ‖v‖² ≡ 1,
    g = exp(-1/d) and the uncertainty head gets ~zero gradient: the loss is then Proxy-Anchor on
    S' = 1 - (1 - S) e^{-1/‖μ - p‖²}. The model head keeps that default
    (``normalize_uncertainty=True``, trainer flag ``--uncertainty-l2-norm on``); turn it off to let
    ‖v‖ carry the uncertainty the paper describes. The paper's equation has not been checked
    against the code (docs/losses.md §8).
    """

    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32.0):
        """C = ``num_classes`` >= 1 raw proxies of ``embedding_size`` D (= μ's); margin δ finite, alpha α > 0."""
        super().__init__(num_classes, embedding_size)
        self.margin, self.alpha = anchor_hyperparameters(type(self).__name__, margin, alpha)
        self.init_proxies_(self.proxies, num_classes)

    def forward(self, embeddings, uncertainty, labels):
        """``loss_fn(embeddings, uncertainty, labels) -> loss``: μ (B, D), v (B, K), labels (B,) any integer
        dtype in [0, num_classes); a 0-dim float32 tensor (float64 for float64 inputs)."""
        return functional.idml_proxy_anchor_loss(embeddings, uncertainty, self.proxies, labels, self.margin, self.alpha)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, alpha={self.alpha}"


#: The losses :class:`ProxySynthesis` can wrap: it extends their proxies and classes per batch.
SYNTHESIS_BASES = (ProxyAnchorLoss, ProxyNCALoss, NormSoftmaxLoss)


class ProxySynthesis(nn.Module):
    """Proxy Synthesis (Gu, Ko, Kim, AAAI 2021; docs/losses.md §4) around a proxy loss module.

    Per batch one λ ~ Beta(alpha, alpha) (drawn from torch's generator, so ``torch.manual_seed``
    makes runs reproducible); synthetic embeddings x̃_b = λ x̂_b + (1-λ) x̂_{b-1} (b-1 cyclic) and
    synthetic proxies p̃_b = λ p̂_{y_b} + (1-λ) p̂_{y_{b-1}}, one new class C + b each, of which the
    first ⌊mu·B⌋ are appended to the batch and to the proxies; the base loss (which re-normalizes)
    runs on the extended set, and gradients flow through the mixing into embeddings and proxies.
    With Proxy-Anchor (no official code, docs/losses.md §4.3) the normalizers simply count the synthetic
    classes: |P⁺| + ⌊mu·B⌋ and C + ⌊mu·B⌋. ``mu = 0`` is the base loss. The published recipe uses
    alpha = 0.4, mu = 1.0; the proxies stay ``base_loss.proxies``::

        loss_fn = dmlfast.ProxySynthesis(dmlfast.NormSoftmaxLoss(100, 512), alpha=0.4, mu=1.0)
        loss = loss_fn(embeddings, labels)   # (B, 512) float, (B,) integers in [0, 100) -> 0-dim float32 tensor
    """

    def __init__(self, base_loss, alpha=0.4, mu=1.0):
        """Wrap ``base_loss`` (one of ``SYNTHESIS_BASES``); λ ~ Beta(alpha, alpha), alpha > 0; mu in [0, 1]."""
        super().__init__()
        owner = type(self).__name__
        if not isinstance(base_loss, SYNTHESIS_BASES):
            raise TypeError(f"{owner}: base_loss must be a {one_of([c.__name__ for c in SYNTHESIS_BASES])}, "
                            f"got {type(base_loss).__name__}")
        self.base_loss = base_loss
        self.alpha = require_number(owner, "alpha", alpha, low=0.0, low_inclusive=False)
        self.mu = require_number(owner, "mu", mu, low=0.0, high=1.0, high_inclusive=True)

    @property
    def proxies(self):
        return self.base_loss.proxies

    def forward(self, embeddings, labels):
        """``loss_fn(embeddings, labels) -> loss``: the base loss on the batch extended by the synthetic
        embeddings and proxies (shapes and dtypes as the base loss's; a 0-dim tensor)."""
        labels = as_int64_labels(self.base_loss.op, labels)
        check_loss_inputs(self.base_loss.op, embeddings, self.proxies, labels)  # before any arithmetic on them
        count = int(self.mu * embeddings.shape[0])
        if count == 0:
            return self.base_loss(embeddings, labels)
        mix = torch.distributions.Beta(self.alpha, self.alpha).sample().to(embeddings.device)
        unit = torch.nn.functional.normalize(embeddings, dim=1)
        unit_proxies = torch.nn.functional.normalize(self.proxies, dim=1)
        label_proxies = unit_proxies[labels]
        mixed = (mix * unit + (1 - mix) * torch.roll(unit, 1, dims=0))[:count]
        mixed_proxies = (mix * label_proxies + (1 - mix) * torch.roll(label_proxies, 1, dims=0))[:count]
        new_labels = torch.arange(self.base_loss.num_classes, self.base_loss.num_classes + count, device=labels.device)
        return self.base_loss.loss_with_proxies(
            torch.cat([unit, mixed.to(unit.dtype)]),
            torch.cat([unit_proxies, mixed_proxies]),
            torch.cat([labels, new_labels]),
        )


class MovingProxyLoss(nn.Module):
    """Asymptotic ("moving") proxies (leftthomas/ProxyAnchor @4137a7d; docs/losses.md §5).

    Cross-entropy of softmax(cos(x, w) / temperature) through the fused softmax kernel. The proxies
    are a buffer (randn init) that gets no gradient; after each optimizer step the trainer calls
    :meth:`update_proxies` with the step's (unit) embeddings, which sets, for every class y in the
    batch, W_y ← (1 - m) ŵ_y + m Σ_{b: y_b = y} f_b — the *sum* of the class's embeddings, with m
    weighting the new features (the opposite of the MoCo convention), as published.
    ``learnable=True`` is the toy script's variant: the proxies are a Parameter trained by the
    optimizer and ``update_proxies`` is not used. Published: temperature 0.03 (0.05 for SOP /
    In-shop), momentum 0.5 (0.95 for SOP / In-shop)::

        loss_fn = dmlfast.MovingProxyLoss(num_classes=100, embedding_size=512)
        loss = loss_fn(embeddings, labels)   # (B, 512) float, (B,) integers in [0, 100) -> 0-dim float32 tensor
        loss.backward(); optimizer.step()
        loss_fn.update_proxies(embeddings.detach(), labels)
    """

    def __init__(self, num_classes, embedding_size, temperature=0.03, momentum=0.5, learnable=False):
        """C = ``num_classes`` proxies of ``embedding_size``; temperature > 0, momentum in [0, 1]; learnable a bool."""
        super().__init__()
        owner = type(self).__name__
        num_classes = require_int(owner, "num_classes", num_classes)
        embedding_size = require_int(owner, "embedding_size", embedding_size)
        self.temperature = require_number(owner, "temperature", temperature, low=0.0, low_inclusive=False)
        self.momentum = require_number(owner, "momentum", momentum, low=0.0, high=1.0, high_inclusive=True)
        if not isinstance(learnable, bool):
            raise TypeError(f"{owner}: learnable must be a bool, got {type(learnable).__name__}")
        self.learnable = learnable
        proxies = torch.randn(num_classes, embedding_size)
        if learnable:
            self.proxies = nn.Parameter(proxies)
        else:
            self.register_buffer("proxies", proxies)

    def forward(self, embeddings, labels):
        """``loss_fn(embeddings, labels) -> loss``: embeddings (B, D) float32/bfloat16/float16/float64, labels
        (B,) any integer dtype in [0, num_classes); a 0-dim float32 tensor (float64 for float64 inputs)."""
        return functional.proxy_nca_loss(embeddings, self.proxies, labels, scale=1.0 / self.temperature)

    @torch.no_grad()
    def update_proxies(self, embeddings, labels):
        """The moving update for the classes of this batch (call after the optimizer step): embeddings
        (B, D) float, labels (B,) any integer dtype in [0, num_classes)."""
        owner = f"{type(self).__name__}.update_proxies"
        labels = as_int64_labels(owner, labels)
        if self.learnable:
            raise RuntimeError(f"{owner}: learnable proxies are trained by the optimizer, not moved")
        num_classes, dim = self.proxies.shape
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != dim:
            raise ValueError(f"{owner}: embeddings must be a (batch, {dim}) tensor, got {getattr(embeddings, 'shape', type(embeddings).__name__)}")
        if not isinstance(labels, torch.Tensor) or labels.shape != (embeddings.shape[0],):
            raise ValueError(f"{owner}: labels must be an integer tensor of shape ({embeddings.shape[0]},), got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
        if len(labels):
            low, high = torch.aminmax(labels)
            low, high, finite = torch.stack([low.double(), high.double(), torch.isfinite(embeddings).all().double()]).tolist()
            if low < 0 or high >= num_classes:
                raise ValueError(f"{owner}: labels must be in [0, {num_classes}), got min {int(low)} and max {int(high)}")
            if not finite:
                first = int((~torch.isfinite(embeddings).all(1)).nonzero()[0, 0])
                raise ValueError(f"{owner}: embeddings contain NaN or Inf (first bad row: {first}); the proxies were not moved")
        classes, slot = torch.unique(labels, return_inverse=True)
        work = torch.promote_types(self.proxies.dtype, torch.float32)  # the module may be cast to half
        sums = torch.zeros(len(classes), self.proxies.shape[1], device=self.proxies.device, dtype=work)
        sums.index_add_(0, slot, embeddings.detach().to(work))
        current = torch.nn.functional.normalize(self.proxies[classes].to(work), dim=1)
        self.proxies[classes] = ((1 - self.momentum) * current + self.momentum * sums).to(self.proxies.dtype)

    def extra_repr(self):
        return (
            f"num_classes={self.proxies.shape[0]}, embedding_size={self.proxies.shape[1]}, "
            f"temperature={self.temperature}, momentum={self.momentum}, learnable={self.learnable}"
        )


#: Every loss by the name the trainer (``--loss NAME``), the recipes and :mod:`dmlfast.sharded` use.
LOSSES = {"ProxyAnchor": ProxyAnchorLoss, "ProxyNCA": ProxyNCALoss, "NormSoftmax": NormSoftmaxLoss,
          "ProxyISA": ProxyISALoss, "Moving": MovingProxyLoss, "IDML": IntrospectiveProxyAnchorLoss,
          "CosFace": CosFaceLoss, "ArcFace": ArcFaceLoss, "SubCenterArcFace": SubCenterArcFaceLoss,
          "SoftTriple": SoftTripleLoss}


def loss_class(name: str):
    """The loss class of :data:`LOSSES` that ``name`` spells, in any case (``"proxyanchor"`` ->
    :class:`ProxyAnchorLoss`); ``ValueError`` with the closest name as a suggestion otherwise."""
    return LOSSES[canonical_name("loss", name, LOSSES)]


#: The names of :data:`SYNTHESIS_BASES` (``--proxy-synthesis`` wraps these).
SYNTHESIS_LOSSES = tuple(name for name, loss in LOSSES.items() if loss in SYNTHESIS_BASES)
