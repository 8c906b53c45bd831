"""What the fallback's ops share: constants, the C++ ops' input and value checks worded as theirs
(the metadata checks are :func:`dmlfast.checks.check_op_metadata`), the tiling and the normalization."""
import functools
import math

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
# Input checks: the messages of csrc/checks.cpp and the families' checks.

def class_shard(op, proxies, class_offset, num_classes, centers=1):
    """``(offset, local, total)``: the ``local`` classes of ``proxies`` (``centers`` rows each) are
    classes offset.. of total (num_classes < 0: all of them)."""
    local = proxies.shape[0] // centers
    total = local if num_classes < 0 else num_classes
    if not (class_offset >= 0 and class_offset + local <= total):
        raise ValueError(f"{op}: the proxies ({local} rows) must be classes [class_offset, class_offset + {local}) "
                         f"of num_classes = {total}, got class_offset {class_offset}")
    return class_offset, local, total


def check_anchor_params(op, margin, alpha):
    if not abs(margin) < float("inf"):
        raise ValueError(f"{op}: margin must be finite, got {margin:g}")
    if not (abs(alpha) < float("inf") and alpha > 0):
        raise ValueError(f"{op}: alpha must be a finite number > 0, got {alpha:g}")


def classes_of(op, proxies, centers):
    """The classes of ``proxies``, ``centers`` rows each (csrc/softmax_family.cpp classes_of)."""
    if centers < 1:
        raise ValueError(f"{op}: centers_per_class must be >= 1, got {centers}")
    if proxies.shape[0] % centers:
        raise ValueError(f"{op}: proxies must have num_classes * centers_per_class rows, got {proxies.shape[0]} "
                         f"rows for {centers} centers per class")


def check_class_logits(op, logits):
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


def check_softmax_params(op, scale, smoothing, exclude_positive, num_classes):
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


def check_mode(op, value_checks, deferrable=True):
    """The ops' ``value_checks`` argument: 0 off, 1 immediate, 2 deferred (csrc/checks.h)."""
    if value_checks not in (0, 1, 2):
        raise ValueError(f"{op}: value_checks must be 0 (off), 1 (immediate) or 2 (deferred), got {value_checks}")
    if value_checks == 2 and not deferrable:
        raise ValueError(f"{op}: value_checks must be 0 or 1 (the second pass checks the same inputs), got 2")
    return value_checks


class ValueChecks:
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
            from .._ops import _C

            _C.raise_for_value_flags(self.op, flags, embeddings, proxies, self.labels, uncertainty, self.num_classes)
        return flags


# ---------------------------------------------------------------------------------------------
# Shared pieces.

def accumulation_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def normalize(rows):
    """``(rows / n, n)`` with n = sqrt(Σ rows² + 1e-12) per row (docs/losses.md §0)."""
    norm = (rows.square().sum(1) + NORM_EPS).sqrt()
    return rows / norm[:, None], norm


def normalize_embeddings(x, acc):
    """:func:`normalize` of the embeddings in ``acc``, their squared norms summed in float64 (as the
    kernels do: a row of 1e30 normalizes)."""
    norm = (x.to(torch.float64).square().sum(1) + NORM_EPS).sqrt().to(acc)
    return x.to(acc) / norm[:, None], norm


def project(grad, unit, norm):
    """Backward of the normalization, row by row: (g − ⟨û, g⟩ û) / n (docs/losses.md §7.1)."""
    return (grad - (grad * unit).sum(1, keepdim=True) * unit) / norm[:, None]


def lse0(shift, total):
    """LSE0(u) = log(1 + Σ e^u) from shift = max(0, max u) and total = Σ e^{u − shift}; log1p
    when shift = 0 keeps the digits of small sums (docs/losses.md §7.6)."""
    return torch.where(shift == 0, torch.log1p(total), shift + torch.log(torch.exp(-shift) + total))


def shard_labels(labels, offset, local, total):
    """``(kernel, row, owned)``: labels as local class indices (compared with columns), a valid
    proxy row per sample (for gathers), and where the sample's class is in this shard (None when
    unsharded, where both label tensors are the labels clamped to [0, C); out-of-range labels
    raise before any result is returned)."""
    if offset == 0 and local == total:
        safe = labels.clamp(0, local - 1)
        return safe, safe, None
    kernel = labels - offset
    return kernel, kernel.clamp(0, local - 1), (kernel >= 0) & (kernel < local)


def tiles(num_classes, tile_columns):
    for first in range(0, num_classes, tile_columns):
        yield first, min(tile_columns, num_classes - first)


def positives_in_tile(kernel_labels, first, cols):
    """[B, cols] bool: sample b's class is column c of the tile."""
    return kernel_labels[:, None] == torch.arange(first, first + cols, device=kernel_labels.device)[None, :]


def eager(fn):
    """Runs ``fn`` without autograd recording and without autocast: the dtypes are chosen here."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next(a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with torch.no_grad(), torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return run


