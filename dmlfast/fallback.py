"""The fused ops of ``torch.ops.dmlfast`` on PyTorch tensor ops: what CUDA tensors run when
dmlfast._C was built without its CUDA kernels (no nvcc at install time).

Each function takes the op's arguments (csrc/ops.cpp) and returns the same outputs: the loss in
the accumulation dtype (float64 when an input is float64, else float32) and the gradients in their
inputs' dtypes. It follows the tiled algorithm of csrc/fused_losses.cpp (docs/losses.md §7): proxies are
walked in tiles of ``tile_columns`` classes, so memory is O(B·D + C·D + B·tile) and no B × C
tensor exists. The input checks raise the C++ ops' errors, word for word. The functions run on
any device; the tests call them on CPU tensors (forcing several tiles) against the C++ op and the
float64 reference. :func:`register_cuda_kernels` (called by dmlfast._ops only when the extension
has no CUDA kernels) makes them the ops' CUDA implementation, so autograd, fake tensors and
autocast (dmlfast/_ops.py) work unchanged. Adding an optional trailing argument to an op's schema
means adding the same parameter, with its default, to its function here.
"""
import functools
import math
import warnings

import torch

#: Below this, 1 − s² is taken as it: ArcFace's slope stays finite on its target centre (csrc ClassLogit).
ARCFACE_MIN_SINE2 = 1e-12
NORM_EPS = 1e-12
#: Exponents of IDML's gate beyond this give g = 0 with no gradient (proxy_loss_math.h).
IDML_MAX_EXPONENT = 80.0


def default_tile_columns(embeddings, num_classes):
    """Proxies per tile, as the C++ driver: about 2^24 (GPU) or 2^19 (CPU) floats of B × tile and
    tile × D, at least 256 columns."""
    budget = 1 << 24 if embeddings.is_cuda else 1 << 19
    batch, dim = embeddings.shape
    return min(max(256, budget // max(batch + dim, 1)), num_classes)


# ---------------------------------------------------------------------------------------------
# Input checks: the messages of csrc/fused_losses.cpp.

def _describe(tensor):
    dtype_name = tensor.new_empty(0, device="cpu").type().removeprefix("torch.").removesuffix("Tensor")
    return f"{dtype_name} tensor of shape [{', '.join(map(str, tensor.shape))}] on {tensor.device}"


def _check_metadata(op, x, p, labels):
    """Shapes, dtypes and devices (check_metadata in C++); no device reads."""
    if x.dim() != 2:
        raise ValueError(f"{op}: embeddings must be 2-D (batch, dim), got a {_describe(x)}")
    if p.dim() != 2:
        raise ValueError(f"{op}: proxies must be 2-D (num_classes, dim), got a {_describe(p)}")
    if labels.dim() != 1:
        raise ValueError(f"{op}: labels must be 1-D (batch,), got a {_describe(labels)}")
    for name, tensor in (("embeddings", x), ("proxies", p)):
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {_describe(tensor)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{op}: labels must be int64, got {_describe(labels)}")
    if x.shape[0] == 0:
        raise ValueError(f"{op}: the batch is empty (embeddings has 0 rows)")
    if p.shape[0] == 0:
        raise ValueError(f"{op}: proxies has 0 rows (num_classes must be >= 1)")
    if x.shape[1] == 0:
        raise ValueError(f"{op}: embeddings have dimension 0")
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: labels must have one entry per embedding: embeddings has {x.shape[0]} rows, "
                         f"labels has {labels.shape[0]}")
    if p.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: embedding dimension and proxy dimension differ: embeddings are {x.shape[1]}-d, "
                         f"proxies are {p.shape[1]}-d")
    if not x.device == p.device == labels.device:
        raise ValueError(f"{op}: embeddings, proxies and labels must be on one device, got {x.device}, {p.device} "
                         f"and {labels.device}")


def _class_shard(op, proxies, class_offset, num_classes, centers=1):
    """``(offset, local, total)``: the ``local`` classes of ``proxies`` (``centers`` rows each) are
    classes offset.. of total (num_classes < 0: all of them)."""
    local = proxies.shape[0] // centers
    total = local if num_classes < 0 else num_classes
    if not (class_offset >= 0 and class_offset + local <= total):
        raise ValueError(f"{op}: the proxies ({local} rows) must be classes [class_offset, class_offset + {local}) "
                         f"of num_classes = {total}, got class_offset {class_offset}")
    return class_offset, local, total


def _check_anchor_params(op, margin, alpha):
    if not abs(margin) < float("inf"):
        raise ValueError(f"{op}: margin must be finite, got {margin:g}")
    if not (abs(alpha) < float("inf") and alpha > 0):
        raise ValueError(f"{op}: alpha must be a finite number > 0, got {alpha:g}")


def _classes_of(op, proxies, centers):
    """The classes of ``proxies``, ``centers`` rows each (csrc/softmax_family.cpp classes_of)."""
    if centers < 1:
        raise ValueError(f"{op}: centers_per_class must be >= 1, got {centers}")
    if proxies.shape[0] % centers:
        raise ValueError(f"{op}: proxies must have num_classes * centers_per_class rows, got {proxies.shape[0]} "
                         f"rows for {centers} centers per class")


def _check_class_logits(op, logits):
    """The class-logit arguments' checks, worded as the C++ op's."""
    if logits.aggregation not in (0, 1):
        raise ValueError(f"{op}: center_aggregation must be 0 (max) or 1 (softmax-weighted), got {logits.aggregation}")
    if not (abs(logits.gamma) < float("inf") and logits.gamma > 0):
        raise ValueError(f"{op}: center_gamma must be a finite number > 0, got {logits.gamma:g}")
    if logits.margin_type not in (0, 1, 2):
        raise ValueError(f"{op}: margin_type must be 0 (none), 1 (CosFace) or 2 (ArcFace), got {logits.margin_type}")
    if not abs(logits.margin) < float("inf"):
        raise ValueError(f"{op}: margin must be finite, got {logits.margin:g}")
    if logits.margin_type == 2 and not 0 <= logits.margin < math.pi:
        raise ValueError(f"{op}: an ArcFace margin must be in [0, pi) radians, got {logits.margin:g}")
    if logits.exclude_positive and logits.margin_type != 0:
        raise ValueError(f"{op}: exclude_positive=True (the classic ProxyNCA form) takes no margin")


def _check_softmax_params(op, scale, smoothing, exclude_positive, num_classes):
    if not (abs(scale) < float("inf") and scale > 0):
        raise ValueError(f"{op}: scale must be a finite number > 0, got {scale:g}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"{op}: smoothing must be in [0, 1), got {smoothing:g}")
    if exclude_positive and smoothing > 0:
        raise ValueError(f"{op}: smoothing is defined for the softmax over all proxies; "
                         "use smoothing=0 with exclude_positive=True")
    if exclude_positive and num_classes < 2:
        raise ValueError(f"{op}: exclude_positive=True needs at least 2 proxies "
                         f"(the denominator sums over the other classes), got {num_classes}")
    if smoothing > 0 and num_classes < 2:
        raise ValueError(f"{op}: label smoothing needs at least 2 proxies, got {num_classes}")


def _check_mode(op, value_checks, deferrable=True):
    """The ops' ``value_checks`` argument: 0 off, 1 immediate, 2 deferred (csrc/checks.h)."""
    if value_checks not in (0, 1, 2):
        raise ValueError(f"{op}: value_checks must be 0 (off), 1 (immediate) or 2 (deferred), got {value_checks}")
    if value_checks == 2 and not deferrable:
        raise ValueError(f"{op}: value_checks must be 0 or 1 (the second pass checks the same inputs), got 2")
    return value_checks


class _ValueChecks:
    """Labels in [0, num_classes) and finite inputs, kept on the device while the op runs (ValueChecks
    in C++): :meth:`finish` returns them as the ops' int32 [4] flags (csrc/proxy_loss_math.h's
    ValueFlag order), after raising the C++ op's error on them when the checks are immediate."""

    NAMES = ("embeddings", "proxies", "uncertainty")

    def __init__(self, op, labels, num_classes, mode):
        self.op, self.labels, self.num_classes, self.mode = op, labels, num_classes, mode
        low, high = torch.aminmax(labels)
        self.labels_ok = (low >= 0) & (high < num_classes)
        self.finite = {}

    def add_norms(self, name, norms):
        """Rows with a NaN or Inf entry (or a norm that overflows) have a non-finite norm."""
        flag = torch.isfinite(norms).all()
        self.finite[name] = flag if name not in self.finite else self.finite[name] & flag

    def finish(self, embeddings, proxies, uncertainty=None):
        ok = torch.ones((), dtype=torch.bool, device=self.labels_ok.device)
        flags = torch.stack([self.labels_ok, *(self.finite.get(name, ok) for name in self.NAMES)]).to(torch.int32)
        if self.mode == 1:
            from ._ops import _C

            _C.raise_for_value_flags(self.op, flags, embeddings, proxies, self.labels, uncertainty, self.num_classes)
        return flags


# ---------------------------------------------------------------------------------------------
# Shared pieces.

def _accumulation_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _normalize(rows):
    """``(rows / n, n)`` with n = sqrt(Σ rows² + 1e-12) per row (docs/losses.md §0)."""
    norm = (rows.square().sum(1) + NORM_EPS).sqrt()
    return rows / norm[:, None], norm


def _normalize_embeddings(x, acc):
    """:func:`_normalize` of the embeddings in ``acc``, their squared norms summed in float64 (as the
    kernels do: a row of 1e30 normalizes)."""
    norm = (x.to(torch.float64).square().sum(1) + NORM_EPS).sqrt().to(acc)
    return x.to(acc) / norm[:, None], norm


def _project(grad, unit, norm):
    """Backward of the normalization, row by row: (g − ⟨û, g⟩ û) / n (docs/losses.md §7.1)."""
    return (grad - (grad * unit).sum(1, keepdim=True) * unit) / norm[:, None]


def _lse0(shift, total):
    """LSE0(u) = log(1 + Σ e^u) from shift = max(0, max u) and total = Σ e^{u − shift}; log1p
    when shift = 0 keeps the digits of small sums (docs/losses.md §7.6)."""
    return torch.where(shift == 0, torch.log1p(total), shift + torch.log(torch.exp(-shift) + total))


def _shard_labels(labels, offset, local, total):
    """``(kernel, row, owned)``: labels as local class indices (compared with columns), a valid
    proxy row per sample (for gathers), and where the sample's class is in this shard (None when
    unsharded, where both label tensors are the labels clamped to [0, C); out-of-range labels
    raise before any result is returned)."""
    if offset == 0 and local == total:
        safe = labels.clamp(0, local - 1)
        return safe, safe, None
    kernel = labels - offset
    return kernel, kernel.clamp(0, local - 1), (kernel >= 0) & (kernel < local)


def _tiles(num_classes, tile_columns):
    for first in range(0, num_classes, tile_columns):
        yield first, min(tile_columns, num_classes - first)


def _positives_in_tile(kernel_labels, first, cols):
    """[B, cols] bool: sample b's class is column c of the tile."""
    return kernel_labels[:, None] == torch.arange(first, first + cols, device=kernel_labels.device)[None, :]


def _eager(fn):
    """Runs ``fn`` without autograd recording and without autocast: the dtypes are chosen here."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next(a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with torch.no_grad(), torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return run


# ---------------------------------------------------------------------------------------------
# Anchor family: Proxy-Anchor, Proxy-ISA and IDML.

def _anchor_positive_terms(pos_sim, kernel_labels, owned, margin, alpha, weight):
    """The B positive pairs, sparse: per class of the batch l⁺_c = LSE0({u_b : y_b = c}) with
    u_b = −α M_b (s_b − δ); returns the loss Σ_c l⁺_c / W⁺ (this shard's classes) and
    g_b = ∂L/∂s_b = −(α M_b / W⁺) e^{u_b − l⁺_{y_b}}, W⁺ = Σ_c mean of M over c's positives
    (|P⁺| when M = 1; every class of the batch counts, also other shards')."""
    classes, group = torch.unique(kernel_labels, return_inverse=True)
    zeros = pos_sim.new_zeros(classes.numel())
    u = -alpha * weight * (pos_sim - margin)
    shift = zeros.scatter_reduce(0, group, u, "amax")  # includes the zero: max(0, max u)
    class_lse = _lse0(shift, zeros.index_add(0, group, torch.exp(u - shift[group])))
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
    return grad, _lse0(shift, total), mean_weight


@_eager
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
    _check_metadata(op, x, p, labels)
    offset, local, total = _class_shard(op, p, class_offset, num_classes)
    _check_anchor_params(op, margin, alpha)
    isa = isa_class_params
    if isa is not None:
        if not isa.dtype.is_floating_point:
            raise TypeError(f"{op}: isa_class_params must be a floating tensor, got {_describe(isa)}")
        if not (isa.dim() == 2 and isa.shape[0] == 4 and isa.shape[1] == local):
            raise ValueError(f"{op}: isa_class_params must have shape (4, num_classes) = (4, {local}), "
                             f"got {_describe(isa)}")
        if isa.device != x.device:
            raise ValueError(f"{op}: isa_class_params must be on {x.device}, got {isa.device}")
        if not (offset == 0 and local == total):
            raise ValueError(f"{op}: isa_class_params cannot be combined with a class shard "
                             "(Proxy-ISA's normalizers are sums over all classes' multipliers)")
    acc = _accumulation_dtype(x, p)
    tile_columns = tile_columns or default_tile_columns(x, local)
    checks = _ValueChecks(op, labels, total, _check_mode(op, value_checks))
    kernel_labels, row_labels, owned = _shard_labels(labels, offset, local, total)
    if isa is not None:
        center, threshold, class_weight, easy_negative = isa.to(acc)

    x_hat, x_norm = _normalize_embeddings(x, acc)
    checks.add_norms("embeddings", x_norm)
    p_hat_y, p_norm_y = _normalize(p.index_select(0, row_labels).to(acc))
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
    for first, cols in _tiles(local, tile_columns):
        p_hat, p_norm = _normalize(p[first:first + cols].to(acc))
        checks.add_norms("proxies", p_norm)
        sim = x_hat @ p_hat.T
        weight = None
        if isa is not None:
            tile = slice(first, first + cols)
            weight = torch.where(sim < threshold[tile], easy_negative[tile], 1)
        grad, lse, mean_weight = _anchor_negative_tile(sim, _positives_in_tile(kernel_labels, first, cols), alpha,
                                                       margin, neg_scale, weight)
        neg_lse.append(lse)
        neg_mean_weight.append(mean_weight)
        grad_x_neg += grad @ p_hat
        grad_p[first:first + cols] = _project(grad.T @ x_hat, p_hat, p_norm)
    if isa is None:
        neg_loss = torch.cat(neg_lse).sum() / total
    else:  # W⁻ is known only now: rescale the negatives' share of the gradients
        neg_normalizer = torch.cat(neg_mean_weight).sum().clamp_min(1e-30)
        neg_loss = torch.cat(neg_lse).sum() / neg_normalizer
        grad_x_neg /= neg_normalizer
        grad_p /= neg_normalizer

    # Positive pairs: ∂L/∂p_c += (1/m_c) Σ_{b: y_b = c} g_b (x̂_b − s_b p̂_c), ∂L/∂x̂_b += g_b p̂_{y_b}.
    grad_p.index_add_(0, row_labels, (pos_grad[:, None] * (x_hat - pos_sim[:, None] * p_hat_y)) / p_norm_y[:, None])
    grad_x = _project(grad_x_neg + pos_grad[:, None] * p_hat_y, x_hat, x_norm)
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


@_eager
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
    _check_metadata(op, x, p, labels)
    offset, local, total = _class_shard(op, p, class_offset, num_classes)
    if v.dim() != 2:
        raise ValueError(f"{op}: uncertainty must be 2-D (batch, uncertainty_dim), got a {_describe(v)}")
    if not v.dtype.is_floating_point:
        raise TypeError(f"{op}: uncertainty must be float32, bfloat16, float16 or float64, got {_describe(v)}")
    if v.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: uncertainty must have one row per embedding: embeddings has {x.shape[0]} rows, "
                         f"uncertainty has {v.shape[0]}")
    if v.shape[1] == 0:
        raise ValueError(f"{op}: uncertainty has dimension 0")
    if v.device != x.device:
        raise ValueError(f"{op}: uncertainty must be on the embeddings' device {x.device}, got {v.device}")
    _check_anchor_params(op, margin, alpha)
    acc = _accumulation_dtype(x, p, v)
    tile_columns = tile_columns or default_tile_columns(x, local)
    checks = _ValueChecks(op, labels, total, _check_mode(op, value_checks))
    kernel_labels, row_labels, owned = _shard_labels(labels, offset, local, total)

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
    for first, cols in _tiles(local, tile_columns):
        p_tile = p[first:first + cols].to(acc)
        p_sq = p_tile.square().sum(1)
        p_norm = (p_sq + NORM_EPS).sqrt()
        checks.add_norms("proxies", p_norm)
        dot = xa @ p_tile.T
        sim, cosine, gate, by_distance, by_certainty = _introspective_pairs(
            dot, x_sq[:, None], x_norm[:, None], p_sq, p_norm, certainty[:, None])
        positive = _positives_in_tile(kernel_labels, first, cols)
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


# ---------------------------------------------------------------------------------------------
# Softmax family: ProxyNCA, ProxyNCA++, Norm-SoftMax, moving proxies.

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
    return _positives_in_tile(kernel_labels, first // centers, cols // centers)


def _softmax_row_stats(x_hat, p, kernel_labels, logits_of, tile_columns, checks):
    """Pass 1 over this shard's proxies, [4, B] float64 per row: max and Σ e^{z − max} over the
    denominator's class logits z (max −inf where none is here), Σ_c z_bc, and the target logit
    z_{b,y_b} (0 where the target is not here)."""
    acc, wide = x_hat.dtype, dict(dtype=torch.float64)
    row_max = torch.full(x_hat.shape[:1], float("-inf"), device=x_hat.device, **wide)
    row_sum, logit_sum, target = torch.zeros_like(row_max), torch.zeros_like(row_max), torch.zeros_like(row_max)
    for first, cols in _tiles(p.shape[0], tile_columns):
        p_hat, p_norm = _normalize(p[first:first + cols].to(acc))
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
    for first, cols in _tiles(p.shape[0], tile_columns):
        p_hat, p_norm = _normalize(p[first:first + cols].to(acc))
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
        grad_p[first:first + cols] = _project(grad.T @ x_hat, p_hat, p_norm)
    return loss, _project(grad_x, x_hat, x_norm).to(x.dtype), grad_p.to(p.dtype)


def _softmax_setup(op, x, p, labels, logits_of, smoothing, class_offset, num_classes, tile_columns, value_checks,
                   deferrable=True):
    """The checks every softmax op starts with; returns what its passes share (tiles hold whole classes)."""
    _check_metadata(op, x, p, labels)
    _classes_of(op, p, logits_of.centers)
    offset, local, total = _class_shard(op, p, class_offset, num_classes, logits_of.centers)
    mode = _check_mode(op, value_checks, deferrable)
    _check_softmax_params(op, logits_of.scale, smoothing, logits_of.exclude_positive, total)
    _check_class_logits(op, logits_of)
    checks = _ValueChecks(op, labels, total, mode)
    x_hat, x_norm = _normalize_embeddings(x, _accumulation_dtype(x, p))
    checks.add_norms("embeddings", x_norm)
    kernel_labels = _shard_labels(labels, offset, local, total)[0]
    centers = logits_of.centers
    tile_columns = max(centers, (tile_columns or default_tile_columns(x, p.shape[0])) // centers * centers)
    return x_hat, x_norm, kernel_labels, total, tile_columns, checks


@_eager
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


@_eager
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


@_eager
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
                         f"(the reduced proxy_nca_shard_row_stats), got a {_describe(stats)}")
    result = _softmax_loss_and_grads(x, proxies, x_hat, x_norm, kernel_labels, stats, logits_of, smoothing, total,
                                     tile_columns, checks)
    return (*result, checks.finish(x, proxies))


OPS = {fn.__name__: fn for fn in (proxy_anchor_loss, idml_proxy_anchor_loss, proxy_nca_loss,
                                  proxy_nca_shard_row_stats, proxy_nca_shard_loss_and_grads)}

MISSING_KERNELS_WARNING = (
    "dmlfast was built without its CUDA kernels, so its losses on CUDA tensors run dmlfast.fallback: the same "
    "tiled algorithm on PyTorch ops, correct but slower. To build the kernels, reinstall dmlfast from its source "
    "where PyPI is reachable (it provides a matching nvcc) or with a CUDA toolkit: "
    "`pip install -v --force-reinstall --no-deps .`; its output says which compiler it used or why none "
    "(README, 'Build options')."
)
_warned = False


def _as_cuda_kernel(fn):
    def kernel(*args, **kwargs):
        global _warned
        if not _warned:
            _warned = True
            warnings.warn(MISSING_KERNELS_WARNING, stacklevel=2)
        return fn(*args, **kwargs)
    return kernel


def register_cuda_kernels():
    """Makes these functions the CUDA implementation of every ``torch.ops.dmlfast`` op (for an
    extension built without CUDA kernels); the first call on CUDA tensors warns once."""
    for name, fn in OPS.items():
        torch.library.register_kernel(f"dmlfast::{name}", "cuda", _as_cuda_kernel(fn))
