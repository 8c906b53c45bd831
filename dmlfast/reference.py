"""The executable spec: eager versions of every loss, straight from docs/losses.md.

They compute in the dtype they are given: the tests give float64 (the reference the fused ops are
checked against), the benchmarks float32 (the eager baseline). They build B x C tensors and are
meant for checking and comparing, not for training at scale.
"""
import math

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12


def normalize(x):
    """Rows divided by sqrt(Σx² + 1e-12), the official normalization (docs/losses.md §0)."""
    return x / torch.sqrt((x * x).sum(dim=1, keepdim=True) + NORM_EPS)


def cosine(embeddings, proxies):
    """S = x̂ p̂ᵀ, B x C."""
    return normalize(embeddings) @ normalize(proxies).T


def lse0(values, mask, dim):
    """log(1 + Σ_{mask} e^{values}) along ``dim``: a logsumexp with an extra zero logit (docs/losses.md §0)."""
    masked = values.masked_fill(~mask, float("-inf"))
    zero = torch.zeros_like(masked.narrow(dim, 0, 1))
    return torch.logsumexp(torch.cat([masked, zero], dim=dim), dim=dim)


def proxy_anchor_loss(embeddings, proxies, labels, margin=0.1, alpha=32.0):
    """docs/losses.md §1.1: positive terms averaged over proxies with positives, negatives over all C."""
    sim = cosine(embeddings, proxies)
    positive = F.one_hot(labels, proxies.shape[0]).bool()
    pos_terms = lse0(-alpha * (sim - margin), positive, dim=0)
    neg_terms = lse0(alpha * (sim + margin), ~positive, dim=0)
    with_positives = positive.any(dim=0)
    return pos_terms[with_positives].sum() / with_positives.sum() + neg_terms.sum() / proxies.shape[0]


def proxy_nca_loss(embeddings, proxies, labels, scale=18.0, smoothing=0.0, exclude_positive=False):
    """docs/losses.md §2 and §7.3 on logits z = scale · S.

    Softmax over all proxies with targets 1-ε / ε/(C-1), or with ``exclude_positive`` the classic
    -z_y + log Σ_{c≠y} e^{z_c}; mean over the batch.
    """
    logits = scale * cosine(embeddings, proxies)
    num_classes = proxies.shape[0]
    target = F.one_hot(labels, num_classes).bool()
    if exclude_positive:
        others = torch.logsumexp(logits.masked_fill(target, float("-inf")), dim=1)
        return (others - logits[target]).mean()
    other_weight = smoothing / (num_classes - 1) if num_classes > 1 else 0.0
    weights = torch.full_like(logits, other_weight).masked_fill(target, 1.0 - smoothing)
    return -(weights * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def proxy_isa_loss(embeddings, proxies, labels, class_center, class_threshold, class_weight, easy_negative_weight,
                   filter_positives=True, margin=0.1, alpha=32.0):
    """docs/losses.md §3.1 and §3.3: Proxy-Anchor with detached multipliers M from per-class bands.

    Positives: M = 1 + w in [θ, s̄], w outside (when ``filter_positives``, else 1); negatives:
    M = easy_negative_weight below θ, else 1. Normalizers: sums over classes of the mean M of their
    positives (W⁺) and of their negatives (W⁻).
    """
    sim = cosine(embeddings, proxies)
    positive = F.one_hot(labels, proxies.shape[0]).bool()
    with torch.no_grad():
        informative = (sim >= class_threshold) & (sim <= class_center)
        pos_weight = torch.where(informative, 1 + class_weight, class_weight) if filter_positives else torch.ones_like(sim)
        neg_weight = torch.where(sim < class_threshold, easy_negative_weight, torch.ones_like(sim))
        weight = torch.where(positive, pos_weight, neg_weight)
        pos_count, neg_count = positive.sum(0), (~positive).sum(0)
        pos_normalizer = ((weight * positive).sum(0)[pos_count > 0] / pos_count[pos_count > 0]).sum()
        neg_normalizer = ((weight * ~positive).sum(0)[neg_count > 0] / neg_count[neg_count > 0]).sum()
    pos_terms = lse0(-alpha * weight * (sim - margin), positive, dim=0)
    neg_terms = lse0(alpha * weight * (sim + margin), ~positive, dim=0)
    # A batch without any negative (one class, C = 1) has W⁻ = 0 and an empty sum: its term is 0.
    tiny = torch.finfo(sim.dtype).tiny
    return pos_terms.sum() / pos_normalizer.clamp_min(tiny) + neg_terms.sum() / neg_normalizer.clamp_min(tiny)


def introspective_similarity(embeddings, uncertainty, proxies):
    """docs/losses.md §6: S' = 1 - (1 - S) · exp(-(‖v_b‖² + 4) / (5 ‖x_b - p_c‖²)), B x C (x as given, p raw)."""
    distance = (embeddings * embeddings).sum(1, keepdim=True) + (proxies * proxies).sum(1) - 2 * embeddings @ proxies.T
    certainty = (uncertainty * uncertainty).sum(dim=1, keepdim=True)
    gate = torch.exp(-(certainty + 4) / (5 * distance))
    return 1 - (1 - cosine(embeddings, proxies)) * gate


def idml_proxy_anchor_loss(embeddings, uncertainty, proxies, labels, margin=0.1, alpha=32.0):
    """docs/losses.md §6: Proxy-Anchor (§1.1) with S replaced by the introspective similarity S'."""
    sim = introspective_similarity(embeddings, uncertainty, proxies)
    positive = F.one_hot(labels, proxies.shape[0]).bool()
    pos_terms = lse0(-alpha * (sim - margin), positive, dim=0)
    neg_terms = lse0(alpha * (sim + margin), ~positive, dim=0)
    with_positives = positive.any(dim=0)
    return pos_terms[with_positives].sum() / with_positives.sum() + neg_terms.sum() / proxies.shape[0]


# ---------------------------------------------------------------------------------------------
# Margin softmaxes (docs/losses.md §9) and SoftTriple (§10), written as the papers' official code
# computes them. The proxies are K rows per class ("centers"), class c's at rows c·K .. c·K + K − 1.

ARCFACE_MIN_SINE2 = 1e-12


def class_cosines(embeddings, proxies, centers_per_class):
    """cos(x̂_b, p̂_{c,k}) as B × C × K."""
    return cosine(embeddings, proxies).unflatten(1, (-1, centers_per_class))


def cosface_loss(embeddings, proxies, labels, margin=0.35, scale=64.0):
    """CosFace (Wang et al., CVPR 2018; docs/losses.md §9.1): cross-entropy of s · (cos − m·[c = y])."""
    cos = cosine(embeddings, proxies)
    target = F.one_hot(labels, proxies.shape[0]).to(cos.dtype)
    return F.cross_entropy(scale * (cos - margin * target), labels)


def arcface_logit(cos, margin):
    """cos(θ + m) written as InsightFace's margin head computes it: cos·cos m − sin·sin m with
    sin = sqrt(1 − cos²) (floored at 1e-12 so that its derivative stays finite at cos = ±1), and
    cos − m·sin m where cos ≤ cos(π − m), which keeps the logit decreasing in θ (docs/losses.md §9.2)."""
    sine = (1 - cos * cos).clamp_min(ARCFACE_MIN_SINE2).sqrt()
    phi = cos * math.cos(margin) - sine * math.sin(margin)
    return torch.where(cos > math.cos(math.pi - margin), phi, cos - margin * math.sin(margin))


def arcface_loss(embeddings, proxies, labels, margin=0.5, scale=64.0, sub_centers=1):
    """ArcFace (Deng et al., CVPR 2019), and with ``sub_centers`` K > 1 Sub-center ArcFace (Deng et
    al., ECCV 2020): each class's cosine is the max over its K centers; cross-entropy of
    s · cos(θ_y + m) at the target and s · cos elsewhere. ``margin`` in radians."""
    cos = class_cosines(embeddings, proxies, sub_centers).amax(dim=2)
    target = F.one_hot(labels, cos.shape[1]).bool()
    return F.cross_entropy(scale * torch.where(target, arcface_logit(cos, margin), cos), labels)


def soft_triple_loss(embeddings, proxies, labels, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01, tau=0.0):
    """SoftTriple (Qian et al., ICCV 2019; official idstcv/SoftTriple; docs/losses.md §10): class
    similarity S_c = Σ_k softmax_k(cos_{c,k}/γ) cos_{c,k}, cross-entropy of λ(S − δ·[c = y]), plus
    τ · :func:`soft_triple_regularizer`."""
    cos = class_cosines(embeddings, proxies, centers_per_class)
    similarity = (F.softmax(cos / gamma, dim=2) * cos).sum(dim=2)
    target = F.one_hot(labels, similarity.shape[1]).to(cos.dtype)
    loss = F.cross_entropy(la * (similarity - margin * target), labels)
    if tau > 0 and centers_per_class > 1:
        loss = loss + tau * soft_triple_regularizer(proxies, centers_per_class)
    return loss


def soft_triple_regularizer(proxies, centers_per_class, epsilon=1e-5):
    """The official code's centre regulariser: Σ_c Σ_{k < k'} sqrt(2 + ε − 2 p̂_{c,k}·p̂_{c,k'}) / (C K (K − 1))."""
    k = centers_per_class
    centers = normalize(proxies).unflatten(0, (-1, k))
    gram = centers @ centers.transpose(1, 2)
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=proxies.device), diagonal=1)
    return torch.sqrt(2 + epsilon - 2 * gram[:, upper]).sum() / (centers.shape[0] * k * (k - 1))
