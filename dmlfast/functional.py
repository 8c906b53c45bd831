"""Fused proxy losses as functions of (embeddings, proxies, labels).

Each returns a scalar (float32; float64 for float64 inputs) whose backward reaches both ``embeddings`` and ``proxies``; loss and
gradients are computed together by one fused op (C++ on the CPU, CUDA on the GPU). Inputs:
embeddings (B, D) and proxies (C, D) in float32, bfloat16, float16 or float64 (math in float32,
float64 for float64 inputs; gradients in each input's dtype); labels (B,) of any integer dtype
(converted to int64 once, here) in [0, C).
Bad input raises ValueError/TypeError naming the argument; NaN/Inf inputs are an error, never a
NaN loss (on CUDA raised by the backward when the loss is backpropagated; see
:func:`dmlfast.set_value_checks`).
"""
import math

import torch

from . import reference
from ._ops import value_check_mode  # (importing _ops loads the kernels and registers autograd/fake/autocast)
from .checks import (anchor_hyperparameters, as_int64_labels, require_int, require_number, require_tensors,
                     softmax_hyperparameters)


def proxy_anchor_loss(embeddings, proxies, labels, margin=0.1, alpha=32.0):
    """Proxy-Anchor loss (Kim et al., CVPR 2020; docs/losses.md §1.1), on cosines S = x̂ p̂ᵀ:

    L = 1/|P⁺| Σ_{c∈P⁺} log(1 + Σ_{b: y_b=c} e^{-α(S_bc-δ)}) + 1/C Σ_c log(1 + Σ_{b: y_b≠c} e^{α(S_bc+δ)})

    with δ = ``margin``, α = ``alpha`` and P⁺ the proxies with a positive in the batch.
    """
    op = "proxy_anchor_loss"
    require_tensors(op, embeddings=embeddings, proxies=proxies, labels=labels)
    labels = as_int64_labels(op, labels)
    margin, alpha = anchor_hyperparameters(op, margin, alpha)
    checks = value_check_mode(embeddings, proxies)
    return torch.ops.dmlfast.proxy_anchor_loss(embeddings, proxies, labels, margin, alpha, value_checks=checks)[0]


def proxy_nca_loss(embeddings, proxies, labels, scale=18.0, smoothing=0.0, exclude_positive=False):
    """ProxyNCA / ProxyNCA++ / Norm-SoftMax loss (docs/losses.md §2, §7.3) on logits z = scale · cos(x, p).

    Default: mean over the batch of the cross-entropy of softmax(z) against targets smoothed to
    1-ε on the label and ε/(C-1) elsewhere (ε = ``smoothing``). ``exclude_positive=True`` is the
    paper's classic form -z_y + log Σ_{c≠y} e^{z_c} (the target left out of the denominator).
    Scales: dichotomies' s_x = s_p = 3 is 18; pytorch-metric-learning's softmax_scale s is 2s.
    """
    op = "proxy_nca_loss"
    require_tensors(op, embeddings=embeddings, proxies=proxies, labels=labels)
    labels = as_int64_labels(op, labels)
    scale, smoothing, exclude_positive = softmax_hyperparameters(op, scale, smoothing, exclude_positive)
    checks = value_check_mode(embeddings, proxies)
    return torch.ops.dmlfast.proxy_nca_loss(embeddings, proxies, labels, scale, smoothing, exclude_positive,
                                            value_checks=checks)[0]


def proxy_isa_loss(
    embeddings,
    proxies,
    labels,
    class_center,
    class_threshold,
    class_weight,
    easy_negative_weight,
    filter_positives=True,
    margin=0.1,
    alpha=32.0,
):
    """Proxy-ISA loss (Li et al., MMAsia 2022; docs/losses.md §3.1, §3.3), the fused Proxy-Anchor kernel with
    a multiplier M in every exponent: u = α M (δ - S) for positives, v = α M (S + δ) for negatives,

    L = Σ_c LSE0(u_{·c}) / W⁺ + Σ_c LSE0(v_{·c}) / W⁻,

    W⁺ (W⁻) = the sum over classes with positives (negatives) of the class's mean M over them.
    Per class c (each argument a (num_classes,) tensor), with s̄ = ``class_center``,
    θ = ``class_threshold``, w = ``class_weight``:

    - positives, when ``filter_positives``: M = 1 + w inside [θ, s̄] (informative), w outside
      (easy above s̄, outlier below θ); otherwise M = 1;
    - negatives: M = ``easy_negative_weight`` (1/max(1, n_c)) below θ (easy), 1 otherwise.

    M takes no gradient. As in the published code, the official schedule of s̄, θ, w and n lives
    outside the loss (the per-class state of the ISA module). Embeddings are normalized inside,
    which changes nothing for the unit-norm embeddings the published model emits.
    """
    op = "proxy_isa_loss"
    require_tensors(op, embeddings=embeddings, proxies=proxies, labels=labels)
    labels = as_int64_labels(op, labels)
    vectors = {
        "class_center": class_center,
        "class_threshold": class_threshold,
        "class_weight": class_weight,
        "easy_negative_weight": easy_negative_weight,
    }
    for name, value in vectors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if value.shape != (proxies.shape[0],):
            raise ValueError(f"{op}: {name} must have shape (num_classes,) = ({proxies.shape[0]},), got {tuple(value.shape)}")
        if value.device != proxies.device:
            raise ValueError(f"{op}: {name} must be on {proxies.device}, got {value.device}")
    if not isinstance(filter_positives, bool):
        raise TypeError(f"{op}: filter_positives must be a bool, got {type(filter_positives).__name__}")
    margin, alpha = anchor_hyperparameters(op, margin, alpha)
    # The op accumulates in float64 when either input is float64 (float32 otherwise): hand it the
    # class vectors in that dtype, so none is rounded on the way.
    wide = torch.float64 in (embeddings.dtype, proxies.dtype)
    params = torch.stack([v.detach().to(torch.float64 if wide else torch.float32) for v in vectors.values()])
    checks = value_check_mode(embeddings, proxies)
    return torch.ops.dmlfast.proxy_anchor_loss(embeddings, proxies, labels, margin, alpha, params, filter_positives,
                                               value_checks=checks)[0]


def idml_proxy_anchor_loss(embeddings, uncertainty, proxies, labels, margin=0.1, alpha=32.0):
    """IDML's introspective Proxy-Anchor loss (Wang, Zheng et al., TPAMI 2023; docs/losses.md §6): the
    Proxy-Anchor loss of :func:`proxy_anchor_loss` on the introspective similarity

    S'_bc = 1 - (1 - S_bc) · g_bc,   g_bc = exp(-(a_b + 4) / (5 d_bc)),

    with S the cosine, d_bc = ‖x_b - p_c‖² between the embedding as given (the model's unit μ_b)
    and the raw, unnormalized proxy, and a_b = ‖v_b‖² from ``uncertainty`` v (B, K). g ∈ (0, 1], so
    S' ≥ S: more uncertainty pulls S' towards 1 and shrinks the penalty. The constants 4 and 5 are
    the published code's. Where d is ~0, g is 0 (S' = 1) with no gradient. Returns a scalar whose
    backward reaches embeddings, uncertainty and proxies. If v is L2-normalized, as the released
    IDML model does by default, a ≡ 1 and v gets ~zero gradient (see
    :class:`dmlfast.losses.IntrospectiveProxyAnchorLoss`).
    """
    op = "idml_proxy_anchor_loss"
    require_tensors(op, embeddings=embeddings, uncertainty=uncertainty, proxies=proxies, labels=labels)
    labels = as_int64_labels(op, labels)
    margin, alpha = anchor_hyperparameters(op, margin, alpha)
    checks = value_check_mode(embeddings, uncertainty, proxies)
    return torch.ops.dmlfast.idml_proxy_anchor_loss(embeddings, uncertainty, proxies, labels, margin, alpha,
                                                    value_checks=checks)[0]


# ---------------------------------------------------------------------------------------------
# The margin softmaxes (docs/losses.md §9) and SoftTriple (§10): the softmax family's op on classes
# of K proxy rows ("centers", class c's at rows c·K .. c·K + K − 1) with a margin on the target.

def _class_softmax_loss(op, embeddings, proxies, labels, scale, centers, aggregation, gamma, margin_type, margin):
    require_tensors(op, embeddings=embeddings, proxies=proxies, labels=labels)
    labels = as_int64_labels(op, labels)
    if proxies.dim() == 2 and proxies.shape[0] % centers:
        raise ValueError(f"{op}: proxies must have num_classes * {centers} rows ({centers} centers per class), "
                         f"got {proxies.shape[0]} rows")
    checks = value_check_mode(embeddings, proxies)
    return torch.ops.dmlfast.proxy_nca_loss(embeddings, proxies, labels, scale, 0.0, False, checks, centers,
                                            aggregation, gamma, margin_type, margin)[0]


def cosface_loss(embeddings, proxies, labels, margin=0.35, scale=64.0):
    """CosFace (Wang et al., CVPR 2018; docs/losses.md §9.1): mean cross-entropy of the logits
    s · (cos(x, p_c) − m·[c = y]), with m = ``margin`` and s = ``scale`` (pytorch-metric-learning's
    CosFaceLoss defaults)."""
    op = "cosface_loss"
    margin = require_number(op, "margin", margin)
    scale = require_number(op, "scale", scale, low=0.0, low_inclusive=False)
    return _class_softmax_loss(op, embeddings, proxies, labels, scale, 1, 0, 1.0, 1, margin)


def arcface_loss(embeddings, proxies, labels, margin=28.6, scale=64.0, sub_centers=1):
    """ArcFace (Deng et al., CVPR 2019; docs/losses.md §9.2): mean cross-entropy of s · cos(θ_y + m) at the
    target and s · cos θ elsewhere, with θ the angle between x and the proxy; where θ_y + m would
    pass π the target logit is cos θ_y − m sin m (InsightFace's). ``margin`` m in **degrees**, as
    pytorch-metric-learning's ArcFaceLoss (28.6° ≈ 0.5 rad, the paper's). With ``sub_centers`` K > 1,
    Sub-center ArcFace (Deng et al., ECCV 2020; §9.3): ``proxies`` holds K rows per class and a
    class's cosine is the largest of its K."""
    op = "arcface_loss"
    margin = require_number(op, "margin", margin, low=0.0, high=180.0)
    scale = require_number(op, "scale", scale, low=0.0, low_inclusive=False)
    sub_centers = require_int(op, "sub_centers", sub_centers)
    return _class_softmax_loss(op, embeddings, proxies, labels, scale, sub_centers, 0, 1.0, 2, math.radians(margin))


def soft_triple_loss(embeddings, proxies, labels, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01, tau=0.2):
    """SoftTriple (Qian et al., ICCV 2019; docs/losses.md §10), with pytorch-metric-learning's
    names: ``proxies`` holds K = ``centers_per_class`` rows per class; a class's similarity is
    S_c = Σ_k softmax_k(cos_{c,k} / γ) cos_{c,k}; the loss is the mean cross-entropy of
    λ (S − δ·[c = y]) (λ = ``la``, γ = ``gamma``, δ = ``margin``) plus τ times the centre regulariser
    of the official code (:func:`soft_triple_regularizer`; ``tau=0`` leaves it out, as
    pytorch-metric-learning's SoftTripleLoss does)."""
    op = "soft_triple_loss"
    centers_per_class = require_int(op, "centers_per_class", centers_per_class)
    la = require_number(op, "la", la, low=0.0, low_inclusive=False)
    gamma = require_number(op, "gamma", gamma, low=0.0, low_inclusive=False)
    margin = require_number(op, "margin", margin)
    tau = require_number(op, "tau", tau, low=0.0)
    loss = _class_softmax_loss(op, embeddings, proxies, labels, la, centers_per_class, 1, 1.0 / gamma, 1, margin)
    if tau > 0 and centers_per_class > 1:
        loss = loss + tau * soft_triple_regularizer(proxies, centers_per_class).to(loss.dtype)
    return loss


def soft_triple_regularizer(proxies, centers_per_class, epsilon=1e-5):
    """SoftTriple's centre regulariser (docs/losses.md §10): Σ_c Σ_{k < k'} sqrt(2 + ε − 2 p̂_{c,k}·p̂_{c,k'})
    / (C K (K − 1)) over each class's K centres, as the official code computes it (an eager
    C × K × K computation: ``reference.soft_triple_regularizer``), in float32 or float64."""
    op = "soft_triple_regularizer"
    require_tensors(op, proxies=proxies)
    centers_per_class = require_int(op, "centers_per_class", centers_per_class, minimum=2)
    epsilon = require_number(op, "epsilon", epsilon, low=0.0)
    if proxies.dim() != 2 or proxies.shape[0] % centers_per_class:
        raise ValueError(f"{op}: proxies must be 2-D with num_classes * {centers_per_class} rows, "
                         f"got shape {tuple(proxies.shape)}")
    wide = torch.float64 if proxies.dtype == torch.float64 else torch.float32
    return reference.soft_triple_regularizer(proxies.to(wide), centers_per_class, epsilon)
