"""The softmax family on PyTorch ops: ProxyNCA(++), Norm-SoftMax, the margin softmaxes and SoftTriple
(csrc/softmax_family.cpp)."""
import math

import torch

from ..checks import check_op_metadata, describe_tensor
from .common import (ARCFACE_MIN_SINE2, ValueChecks, accumulation_dtype, check_class_logits, check_mode,
                     check_softmax_params, class_shard, classes_of, default_tile_columns,
                     eager, normalize, normalize_embeddings, positives_in_tile, project,
                     shard_labels, tiles)


class _ClassLogits:
    """A class's logit from the cosines of its K centers (K adjacent proxy rows), as csrc's
    ClassLogit: z = scale · s, and scale · f(s) at the target, s the cosine (K = 1), the max over the
    centers (``aggregation`` 0) or their mean weighted by softmax(gamma · cos) (1); f(s) = s, s − m
    (CosFace) or cos(acos(s) + m), s − m sin m at or below cos(π − m) (ArcFace) (docs/losses.md §9, §10)."""

    def __init__(self, scale, exclude_positive, centers, aggregation, gamma, margin_type, margin):
        self.scale, self.exclude_positive, self.centers = scale, exclude_positive, centers
        self.aggregation, self.gamma, self.margin_type, self.margin = aggregation, gamma, margin_type, margin

    def similarity(self, cos):
        """``(s, parts)`` for cos [B, K·n]: s [B, n] and what :meth:`center_grads` needs."""
        by_class = cos.unflatten(1, (-1, self.centers))
        if self.centers == 1:
            return by_class[..., 0], None
        if self.aggregation == 0:
            s, argmax = by_class.max(2)  # the first maximal center
            return s, argmax
        weights = torch.softmax(self.gamma * by_class, dim=2)
        return (weights * by_class).sum(2), weights

    def _sine(self, s):
        return (1 - s * s).clamp_min(ARCFACE_MIN_SINE2).sqrt()

    def target(self, s):
        if self.margin_type == 1:
            return s - self.margin
        if self.margin_type == 2:
            arc = s * math.cos(self.margin) - self._sine(s) * math.sin(self.margin)
            return torch.where(s <= math.cos(math.pi - self.margin), s - self.margin * math.sin(self.margin), arc)
        return s

    def target_slope(self, s):
        if self.margin_type != 2:
            return torch.ones_like(s)
        slope = math.cos(self.margin) + s * math.sin(self.margin) / self._sine(s)
        return torch.where(s <= math.cos(math.pi - self.margin), 1.0, slope)

    def logits(self, cos, is_target):
        """z [B, n] and (s, parts) from cos [B, K·n] and the [B, n] target mask."""
        s, parts = self.similarity(cos)
        return self.scale * torch.where(is_target, self.target(s), s), s, parts

    def center_grads(self, grad, s, parts, is_target, cos):
        """∂L/∂cos [B, K·n] from ∂L/∂s' [B, n] (s' = f(s) at the target, s elsewhere)."""
        grad = grad * torch.where(is_target, self.target_slope(s), 1.0)
        if self.centers == 1:
            return grad
        if self.aggregation == 0:
            out = torch.zeros(*grad.shape, self.centers, dtype=grad.dtype, device=grad.device)
            return out.scatter_(2, parts[..., None], grad[..., None]).flatten(1)
        by_class = cos.unflatten(1, (-1, self.centers))
        return (grad[..., None] * parts * (1 + self.gamma * (by_class - s[..., None]))).flatten(1)


def _targets_in_tile(kernel_labels, first, cols, centers):
    """[B, cols / centers] bool: sample b's class is class j of the tile (columns first + j·K ..)."""
    return positives_in_tile(kernel_labels, first // centers, cols // centers)


def _softmax_row_stats(x_hat, p, kernel_labels, logits_of, tile_columns, checks):
    """Pass 1 over this shard's proxies, [4, B] float64 per row: max and Σ e^{z − max} over the
    denominator's class logits z (max −inf where none is here), Σ_c z_bc, and the target logit
    z_{b,y_b} (0 where the target is not here)."""
    acc, wide = x_hat.dtype, dict(dtype=torch.float64)
    row_max = torch.full(x_hat.shape[:1], float("-inf"), device=x_hat.device, **wide)
    row_sum, logit_sum, target = torch.zeros_like(row_max), torch.zeros_like(row_max), torch.zeros_like(row_max)
    for first, cols in tiles(p.shape[0], tile_columns):
        p_hat, p_norm = normalize(p[first:first + cols].to(acc))
        checks.add_norms("proxies", p_norm)
        is_target = _targets_in_tile(kernel_labels, first, cols, logits_of.centers)
        logits = logits_of.logits(x_hat @ p_hat.T, is_target)[0]
        logit_sum += logits.sum(1, **wide)
        target += torch.where(is_target, logits, 0).sum(1, **wide)
        if logits_of.exclude_positive:
            logits = logits.masked_fill(is_target, float("-inf"))
        tile_max = logits.amax(1)
        tile_sum = torch.exp(logits - tile_max.nan_to_num(neginf=0)[:, None]).sum(1, **wide)
        new_max = torch.maximum(row_max, tile_max.double())
        shift = new_max.nan_to_num(neginf=0)
        row_sum = row_sum * torch.exp(row_max - shift) + tile_sum * torch.exp(tile_max.double() - shift)
        row_max = new_max
    return torch.stack([row_max, row_sum, logit_sum, target])


def _softmax_loss_and_grads(x, p, x_hat, x_norm, kernel_labels, row_stats, logits_of, smoothing, num_classes,
                            tile_columns, checks):
    """Pass 2 from complete row statistics: L = (1/B) Σ_b [Λ_b − (1 − ε) z_{b,y_b} − ε/(C − 1)
    (Σ_c z_bc − z_{b,y_b})] with Λ_b = max + log Σ, and per tile ∂L/∂s' = (scale/B)(softmax(z) − T),
    T = 1 − ε at the target and ε/(C − 1) elsewhere (docs/losses.md §7.3; softmax 0 at an excluded
    target), taken to the centers' cosines by :meth:`_ClassLogits.center_grads`."""
    acc = x_hat.dtype
    row_max, row_sum, logit_sum, target = row_stats
    other_weight = smoothing / (num_classes - 1) if num_classes > 1 else 0.0
    row_lse = row_max + torch.log(row_sum)
    loss = (row_lse - (1 - smoothing) * target - other_weight * (logit_sum - target)).mean().to(acc)
    row_lse = row_lse.to(acc)
    grad_x = torch.zeros_like(x_hat)
    grad_p = torch.empty(p.shape, dtype=acc, device=p.device)
    for first, cols in tiles(p.shape[0], tile_columns):
        p_hat, p_norm = normalize(p[first:first + cols].to(acc))
        checks.add_norms("proxies", p_norm)
        is_target = _targets_in_tile(kernel_labels, first, cols, logits_of.centers)
        cos = x_hat @ p_hat.T
        logits, s, parts = logits_of.logits(cos, is_target)
        prob = torch.exp(logits - row_lse[:, None])
        if logits_of.exclude_positive:
            prob = prob.masked_fill(is_target, 0)
        targets = other_weight + (1 - smoothing - other_weight) * is_target.to(acc)
        grad = logits_of.center_grads(logits_of.scale / x.shape[0] * (prob - targets), s, parts, is_target, cos)
        grad_x += grad @ p_hat
        grad_p[first:first + cols] = project(grad.T @ x_hat, p_hat, p_norm)
    return loss, project(grad_x, x_hat, x_norm).to(x.dtype), grad_p.to(p.dtype)


def _softmax_setup(op, x, p, labels, logits_of, smoothing, class_offset, num_classes, tile_columns, value_checks,
                   deferrable=True):
    """The checks every softmax op starts with; returns what its passes share (tiles hold whole classes)."""
    check_op_metadata(op, x, p, labels)
    classes_of(op, p, logits_of.centers)
    offset, local, total = class_shard(op, p, class_offset, num_classes, logits_of.centers)
    mode = check_mode(op, value_checks, deferrable)
    check_softmax_params(op, logits_of.scale, smoothing, logits_of.exclude_positive, total)
    check_class_logits(op, logits_of)
    checks = ValueChecks(op, labels, total, mode)
    x_hat, x_norm = normalize_embeddings(x, accumulation_dtype(x, p))
    checks.add_norms("embeddings", x_norm)
    kernel_labels = shard_labels(labels, offset, local, total)[0]
    centers = logits_of.centers
    tile_columns = max(centers, (tile_columns or default_tile_columns(x, p.shape[0])) // centers * centers)
    return x_hat, x_norm, kernel_labels, total, tile_columns, checks


@eager
def proxy_nca_loss(embeddings, proxies, labels, scale, smoothing, exclude_positive, value_checks=1,
                   centers_per_class=1, center_aggregation=0, center_gamma=1.0, margin_type=0, margin=0.0, *,
                   tile_columns=None):
    """The softmax family (docs/losses.md §7.3, §9, §10): softmax cross-entropy on the class logits of
    :class:`_ClassLogits` with targets 1 − ε / ε/(C − 1), or with ``exclude_positive``
    L_b = −z_{b,y_b} + log Σ_{c≠y_b} e^{z_bc}; mean over the batch. Returns (loss, ∂L/∂embeddings,
    ∂L/∂proxies, value flags)."""
    op = "proxy_nca_loss"
    logits_of = _ClassLogits(scale, exclude_positive, centers_per_class, center_aggregation, center_gamma,
                             margin_type, margin)
    x_hat, x_norm, kernel_labels, total, tile_columns, checks = _softmax_setup(
        op, embeddings, proxies, labels, logits_of, smoothing, 0, -1, tile_columns, value_checks)
    stats = _softmax_row_stats(x_hat, proxies, kernel_labels, logits_of, tile_columns, checks)
    result = _softmax_loss_and_grads(embeddings, proxies, x_hat, x_norm, kernel_labels, stats, logits_of, smoothing,
                                     total, tile_columns, checks)
    return (*result, checks.finish(embeddings, proxies))


@eager
def proxy_nca_shard_row_stats(embeddings, proxies, labels, scale, exclude_positive, class_offset, num_classes,
                              value_checks=1, centers_per_class=1, center_aggregation=0, center_gamma=1.0,
                              margin_type=0, margin=0.0, *, tile_columns=None):
    """Class-sharded softmax, pass 1: this shard's [4, B] float64 row statistics (max, Σ e^{z − max},
    Σ_c z, target logit), to be reduced over the shards (dmlfast.sharded.reduce_softmax_row_stats)."""
    op = "proxy_nca_shard_row_stats"
    logits_of = _ClassLogits(scale, exclude_positive, centers_per_class, center_aggregation, center_gamma,
                             margin_type, margin)
    x_hat, _, kernel_labels, _, tile_columns, checks = _softmax_setup(
        op, embeddings, proxies, labels, logits_of, 0.0, class_offset, num_classes, tile_columns, value_checks,
        deferrable=False)
    stats = _softmax_row_stats(x_hat, proxies, kernel_labels, logits_of, tile_columns, checks)
    checks.finish(embeddings, proxies)
    return stats


@eager
def proxy_nca_shard_loss_and_grads(embeddings, proxies, labels, row_stats, scale, smoothing, exclude_positive,
                                   class_offset, num_classes, value_checks=1, centers_per_class=1,
                                   center_aggregation=0, center_gamma=1.0, margin_type=0, margin=0.0, *,
                                   tile_columns=None):
    """Class-sharded softmax, pass 2: the whole loss from the reduced ``row_stats`` and this shard's
    gradients (see :func:`proxy_nca_loss`)."""
    op = "proxy_nca_shard_loss_and_grads"
    x, stats = embeddings, row_stats
    logits_of = _ClassLogits(scale, exclude_positive, centers_per_class, center_aggregation, center_gamma,
                             margin_type, margin)
    x_hat, x_norm, kernel_labels, total, tile_columns, checks = _softmax_setup(
        op, x, proxies, labels, logits_of, smoothing, class_offset, num_classes, tile_columns, value_checks)
    if not (stats.dtype == torch.float64 and stats.dim() == 2 and tuple(stats.shape) == (4, x.shape[0])
            and stats.device == x.device):
        raise ValueError(f"{op}: row_stats must be a float64 tensor of shape (4, {x.shape[0]}) on {x.device} "
                         f"(the reduced proxy_nca_shard_row_stats), got a {describe_tensor(stats)}")
    result = _softmax_loss_and_grads(x, proxies, x_hat, x_norm, kernel_labels, stats, logits_of, smoothing, total,
                                     tile_columns, checks)
    return (*result, checks.finish(x, proxies))


