"""The anchor family on PyTorch ops: Proxy-Anchor, Proxy-ISA and IDML (csrc/anchor_family.cpp, csrc/idml.cpp)."""
import torch

from ..checks import check_op_metadata, describe_tensor
from .common import (IDML_MAX_EXPONENT, NORM_EPS, ValueChecks, accumulation_dtype, check_anchor_params, check_mode,
                     class_shard, default_tile_columns, eager, lse0, normalize,
                     normalize_embeddings, positives_in_tile, project, shard_labels, tiles)


def _anchor_positive_terms(pos_sim, kernel_labels, owned, margin, alpha, weight):
    """The B positive pairs, sparse: per class of the batch l⁺_c = LSE0({u_b : y_b = c}) with
    u_b = −α M_b (s_b − δ); returns the loss Σ_c l⁺_c / W⁺ (this shard's classes) and
    g_b = ∂L/∂s_b = −(α M_b / W⁺) e^{u_b − l⁺_{y_b}}, W⁺ = Σ_c mean of M over c's positives
    (|P⁺| when M = 1; every class of the batch counts, also other shards')."""
    classes, group = torch.unique(kernel_labels, return_inverse=True)
    zeros = pos_sim.new_zeros(classes.numel())
    u = -alpha * weight * (pos_sim - margin)
    shift = zeros.scatter_reduce(0, group, u, "amax")  # includes the zero: max(0, max u)
    class_lse = lse0(shift, zeros.index_add(0, group, torch.exp(u - shift[group])))
    class_mean_weight = zeros.index_add(0, group, weight) / zeros.index_add(0, group, torch.ones_like(weight))
    normalizer = class_mean_weight.sum().clamp_min(1e-30)
    grad = -alpha * weight * torch.exp(u - class_lse[group]) / normalizer
    if owned is not None:
        class_lse = class_lse * zeros.scatter(0, group, owned.to(zeros.dtype))
        grad = grad * owned
    return class_lse.sum() / normalizer, grad


def _anchor_negative_tile(sim, positive, alpha, margin, neg_scale, weight=None):
    """One tile of negative pairs: per column l⁻_c = LSE0({v_bc : y_b ≠ c}), v = α M (S + δ),
    and G = ∂L/∂S = neg_scale · M e^{v − l⁻_c} (0 at positives). Returns (G, l⁻, mean of M over
    the column's negatives, 0 if none)."""
    weight = torch.ones_like(sim) if weight is None else weight
    v = (alpha * weight * (sim + margin)).masked_fill(positive, float("-inf"))
    shift = v.amax(0).clamp_min(0)
    exp = torch.exp(v - shift)
    total = exp.sum(0)
    negative = (~positive).to(sim.dtype)
    count = negative.sum(0)
    mean_weight = torch.where(count > 0, (weight * negative).sum(0) / count.clamp_min(1), 0)
    grad = neg_scale * weight * exp / (torch.exp(-shift) + total)
    return grad, lse0(shift, total), mean_weight


@eager
def proxy_anchor_loss(embeddings, proxies, labels, margin, alpha, isa_class_params=None, isa_filter_positives=False,
                      class_offset=0, num_classes=-1, value_checks=1, *, tile_columns=None):
    """Proxy-Anchor (docs/losses.md §7.2), Proxy-ISA with ``isa_class_params`` [4, C] (s̄, θ, w, easy-negative
    weight per class; docs/losses.md §7.4):

    L = Σ_{c∈P⁺} LSE0(−α M (S_·c − δ) over positives) / W⁺ + Σ_c LSE0(α M (S_·c + δ) over negatives) / W⁻

    with S = x̂ p̂ᵀ, M = 1, W⁺ = |P⁺| and W⁻ = C for Proxy-Anchor. Class-sharded: this shard's share.
    Returns (loss, ∂L/∂embeddings, ∂L/∂proxies, value flags).
    """
    op = "proxy_anchor_loss"
    x, p = embeddings, proxies
    check_op_metadata(op, x, p, labels)
    offset, local, total = class_shard(op, p, class_offset, num_classes)
    check_anchor_params(op, margin, alpha)
    isa = isa_class_params
    if isa is not None:
        if not isa.dtype.is_floating_point:
            raise TypeError(f"{op}: isa_class_params must be a floating tensor, got {describe_tensor(isa)}")
        if not (isa.dim() == 2 and isa.shape[0] == 4 and isa.shape[1] == local):
            raise ValueError(f"{op}: isa_class_params must have shape (4, num_classes) = (4, {local}), "
                             f"got {describe_tensor(isa)}")
        if isa.device != x.device:
            raise ValueError(f"{op}: isa_class_params must be on {x.device}, got {isa.device}")
        if not (offset == 0 and local == total):
            raise ValueError(f"{op}: isa_class_params cannot be combined with a class shard "
                             "(Proxy-ISA's normalizers are sums over all classes' multipliers)")
    acc = accumulation_dtype(x, p)
    tile_columns = tile_columns or default_tile_columns(x, local)
    checks = ValueChecks(op, labels, total, check_mode(op, value_checks))
    kernel_labels, row_labels, owned = shard_labels(labels, offset, local, total)
    if isa is not None:
        center, threshold, class_weight, easy_negative = isa.to(acc)

    x_hat, x_norm = normalize_embeddings(x, acc)
    checks.add_norms("embeddings", x_norm)
    p_hat_y, p_norm_y = normalize(p.index_select(0, row_labels).to(acc))
    pos_sim = (x_hat * p_hat_y).sum(1)
    pos_weight = torch.ones_like(pos_sim)
    if isa is not None and isa_filter_positives:
        y = row_labels
        informative = (pos_sim >= threshold[y]) & (pos_sim <= center[y])
        pos_weight = torch.where(informative, 1 + class_weight[y], class_weight[y])
    pos_loss, pos_grad = _anchor_positive_terms(pos_sim, kernel_labels, owned, margin, alpha, pos_weight)

    grad_x_neg = torch.zeros_like(x_hat)
    grad_p = torch.empty(p.shape, dtype=acc, device=p.device)
    neg_lse, neg_mean_weight = [], []
    neg_scale = alpha if isa is not None else alpha / total
    for first, cols in tiles(local, tile_columns):
        p_hat, p_norm = normalize(p[first:first + cols].to(acc))
        checks.add_norms("proxies", p_norm)
        sim = x_hat @ p_hat.T
        weight = None
        if isa is not None:
            tile = slice(first, first + cols)
            weight = torch.where(sim < threshold[tile], easy_negative[tile], 1)
        grad, lse, mean_weight = _anchor_negative_tile(sim, positives_in_tile(kernel_labels, first, cols), alpha,
                                                       margin, neg_scale, weight)
        neg_lse.append(lse)
        neg_mean_weight.append(mean_weight)
        grad_x_neg += grad @ p_hat
        grad_p[first:first + cols] = project(grad.T @ x_hat, p_hat, p_norm)
    if isa is None:
        neg_loss = torch.cat(neg_lse).sum() / total
    else:  # W⁻ is known only now: rescale the negatives' share of the gradients
        neg_normalizer = torch.cat(neg_mean_weight).sum().clamp_min(1e-30)
        neg_loss = torch.cat(neg_lse).sum() / neg_normalizer
        grad_x_neg /= neg_normalizer
        grad_p /= neg_normalizer

    # Positive pairs: ∂L/∂p_c += (1/m_c) Σ_{b: y_b = c} g_b (x̂_b − s_b p̂_c), ∂L/∂x̂_b += g_b p̂_{y_b}.
    grad_p.index_add_(0, row_labels, (pos_grad[:, None] * (x_hat - pos_sim[:, None] * p_hat_y)) / p_norm_y[:, None])
    grad_x = project(grad_x_neg + pos_grad[:, None] * p_hat_y, x_hat, x_norm)
    return pos_loss + neg_loss, grad_x.to(x.dtype), grad_p.to(p.dtype), checks.finish(x, p)


def _introspective_pairs(dot, x_sq, x_norm, p_sq, p_norm, certainty):
    """IDML's S' = 1 − (1 − S) g, g = e^{−(a + 4)/(5 d)} (0 where d ≤ 0 or the exponent passes 80),
    from the raw dot products x·p, d = ‖x‖² + ‖p‖² − 2 x·p and a = ‖v‖² (docs/losses.md §6, §7.5). Returns
    (S', S, g, ∂S'/∂d, ∂S'/∂a): ∂S'/∂S = g, ∂S'/∂a = (1 − S) g / (5d), ∂S'/∂d = −∂S'/∂a (a + 4)/d."""
    dist = x_sq + p_sq - 2 * dot
    exponent = (certainty + 4) / (5 * dist)
    gate = torch.where((dist > 0) & (exponent < IDML_MAX_EXPONENT), torch.exp(-exponent), 0)
    cosine = dot / (x_norm * p_norm)
    by_certainty = torch.where(gate > 0, (1 - cosine) * gate / (5 * dist), 0)
    by_distance = torch.where(gate > 0, -by_certainty * (certainty + 4) / dist, 0)
    return 1 - (1 - cosine) * gate, cosine, gate, by_distance, by_certainty


@eager
def idml_proxy_anchor_loss(embeddings, uncertainty, proxies, labels, margin, alpha, class_offset=0, num_classes=-1,
                           value_checks=1, *, tile_columns=None):
    """IDML (docs/losses.md §6, §7.5): Proxy-Anchor on S' = 1 − (1 − S) e^{−(‖v‖² + 4)/(5 ‖x − p‖²)}, x as
    given and p raw. With G = ∂L/∂S' and H = G g/(n m) − 2 G ∂S'/∂d, by the chain rule:

    ∂L/∂x_b = Σ_c H_bc p_c + x_b Σ_c (2 G ∂S'/∂d − G g S/n²)_bc,
    ∂L/∂p_c = Σ_b H_bc x_b + p_c Σ_b (2 G ∂S'/∂d − G g S/m²)_bc,   ∂L/∂v_b = 2 v_b Σ_c (G ∂S'/∂a)_bc.

    Returns (loss, ∂L/∂embeddings, ∂L/∂uncertainty, ∂L/∂proxies, value flags).
    """
    op = "idml_proxy_anchor_loss"
    x, v, p = embeddings, uncertainty, proxies
    check_op_metadata(op, x, p, labels)
    offset, local, total = class_shard(op, p, class_offset, num_classes)
    if v.dim() != 2:
        raise ValueError(f"{op}: uncertainty must be 2-D (batch, uncertainty_dim), got a {describe_tensor(v)}")
    if not v.dtype.is_floating_point:
        raise TypeError(f"{op}: uncertainty must be float32, bfloat16, float16 or float64, got {describe_tensor(v)}")
    if v.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: uncertainty must have one row per embedding: embeddings has {x.shape[0]} rows, "
                         f"uncertainty has {v.shape[0]}")
    if v.shape[1] == 0:
        raise ValueError(f"{op}: uncertainty has dimension 0")
    if v.device != x.device:
        raise ValueError(f"{op}: uncertainty must be on the embeddings' device {x.device}, got {v.device}")
    check_anchor_params(op, margin, alpha)
    acc = accumulation_dtype(x, p, v)
    tile_columns = tile_columns or default_tile_columns(x, local)
    checks = ValueChecks(op, labels, total, check_mode(op, value_checks))
    kernel_labels, row_labels, owned = shard_labels(labels, offset, local, total)

    xa, va = x.to(acc), v.to(acc)
    x_sq = x.to(torch.float64).square().sum(1).to(acc)
    x_norm = (x_sq + NORM_EPS).sqrt()
    checks.add_norms("embeddings", x_norm)
    certainty = va.square().sum(1)
    checks.add_norms("uncertainty", certainty)
    p_y = p.index_select(0, row_labels).to(acc)
    p_y_sq = p_y.square().sum(1)
    pos_sim = _introspective_pairs((xa * p_y).sum(1), x_sq, x_norm, p_y_sq, (p_y_sq + NORM_EPS).sqrt(), certainty)[0]
    pos_loss, pos_grad = _anchor_positive_terms(pos_sim, kernel_labels, owned, margin, alpha, torch.ones_like(pos_sim))

    grad_x = torch.zeros_like(xa)
    x_coef, grad_certainty = torch.zeros_like(x_sq), torch.zeros_like(x_sq)
    grad_p = torch.empty(p.shape, dtype=acc, device=p.device)
    neg_lse = []
    for first, cols in tiles(local, tile_columns):
        p_tile = p[first:first + cols].to(acc)
        p_sq = p_tile.square().sum(1)
        p_norm = (p_sq + NORM_EPS).sqrt()
        checks.add_norms("proxies", p_norm)
        dot = xa @ p_tile.T
        sim, cosine, gate, by_distance, by_certainty = _introspective_pairs(
            dot, x_sq[:, None], x_norm[:, None], p_sq, p_norm, certainty[:, None])
        positive = positives_in_tile(kernel_labels, first, cols)
        grad, lse, _ = _anchor_negative_tile(sim, positive, alpha, margin, alpha / total)
        neg_lse.append(lse)
        grad = torch.where(positive, pos_grad[:, None], grad)  # G = ∂L/∂S'
        grad_cosine, grad_distance2 = grad * gate, 2 * grad * by_distance
        chain = grad_cosine / (x_norm[:, None] * p_norm) - grad_distance2  # H
        grad_x += chain @ p_tile
        x_coef += (grad_distance2 - grad_cosine * cosine / x_norm.square()[:, None]).sum(1)
        grad_certainty += (grad * by_certainty).sum(1)
        col_coef = (grad_distance2 - grad_cosine * cosine / (p_norm * p_norm)).sum(0)
        grad_p[first:first + cols] = chain.T @ xa + p_tile * col_coef[:, None]
    neg_loss = torch.cat(neg_lse).sum() / total
    grad_x += xa * x_coef[:, None]
    return (pos_loss + neg_loss, grad_x.to(x.dtype), (2 * va * grad_certainty[:, None]).to(v.dtype),
            grad_p.to(p.dtype), checks.finish(x, p, v))


