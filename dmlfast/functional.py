"""Fused proxy losses as functions of (embeddings, proxies, labels).

Each returns a scalar (float32; float64 for float64 inputs) whose backward reaches both ``embeddings`` and ``proxies``; loss and
gradients are computed together by one fused op (C++ on the CPU, CUDA on the GPU). Inputs:
embeddings (B, D) and proxies (C, D) in float32, bfloat16, float16 or float64 (math in float32,
float64 for float64 inputs; gradients in each input's dtype); labels (B,) int64 in [0, C).
Bad input raises ValueError/TypeError naming the argument; NaN/Inf inputs are an error, never a
NaN loss, and so are finite rows whose norm overflows (e.g. 1e30 in float32), named as such.
"""
import math
import numbers

import torch

from . import _ops  # noqa: F401  (loads the kernels and registers autograd/fake/autocast)


def _require_tensors(op, **tensors):
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    devices = {name: value.device for name, value in tensors.items()}
    if len(set(devices.values())) > 1:
        *others, last = devices
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{op}: {', '.join(others)} and {last} must be on one device, got {listed}")


def _require_number(op, name, value, *, low=-math.inf, low_inclusive=True, high=math.inf, high_inclusive=False):
    """``value`` as a float after checking it is a real number in range.

    While torch.compile traces, hyperparameters may be symbolic floats; they are passed through
    unchecked there, since the compiled op checks the same ranges again when it runs.
    """
    if torch.compiler.is_compiling():
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    above_low = value >= low if low_inclusive else value > low
    below_high = value <= high if high_inclusive else value < high
    if not (math.isfinite(value) and above_low and below_high):
        if high < math.inf:
            bound = f"in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        elif low > -math.inf:
            bound = f"{'>=' if low_inclusive else '>'} {low}"
        else:
            bound = "finite"
        raise ValueError(f"{op}: {name} must be {bound}, got {value}")
    return value


def _dtype_name(tensor):
    """The dtype as the op's messages spell it (c10's names: Float, Half, BFloat16, Long, Byte)."""
    return tensor.type().split(".")[-1][: -len("Tensor")]


def _describe(tensor):
    return f"{_dtype_name(tensor)} tensor of shape {list(tensor.shape)} on {tensor.device}"


def _accumulation_dtype(embeddings, proxies):
    """The dtype the op computes row norms in: float64 when an input is float64, else float32."""
    return torch.float64 if torch.float64 in (embeddings.dtype, proxies.dtype) else torch.float32


def _overflow_message(op, name, rows, accumulation):
    """The message for ``rows`` whose values are finite but whose norm overflows ``accumulation``;
    ``None`` when every row's norm is finite or a value is NaN/Inf (then the op's own message is right)."""
    if not bool(torch.isfinite(rows).all()):
        return None
    bad = ~torch.isfinite(rows.to(accumulation).square().sum(1))
    if not bool(bad.any()):
        return None
    row = int(bad.nonzero()[0, 0])
    largest = float(rows[row].abs().max())
    dtype = str(accumulation).replace("torch.", "")
    return (f"{op}: {name} row {row} is finite, but its norm overflows {dtype} (largest |value| {largest:.3g}); "
            f"values this large usually mean a diverging model: lower the learning rate or clip gradients")


def _run_checked(op, call, embeddings, proxies, **others):
    """``call()``, the fused op; the op reports a row whose norm is not finite as "NaN or Inf", so when
    that row's values are all finite its ``ValueError`` is replaced by one naming the overflow. The
    diagnosis runs only after the op has failed: no cost, and no device read, on success."""
    if torch.compiler.is_compiling():
        return call()
    try:
        return call()
    except ValueError as error:
        accumulation = _accumulation_dtype(embeddings, proxies)
        for name, rows in {"embeddings": embeddings, "proxies": proxies, **others}.items():
            if f"{name} contain" in str(error):
                message = _overflow_message(op, name, rows.detach(), accumulation)
                if message is not None:
                    raise ValueError(message) from None
        raise


def check_loss_inputs(op, embeddings, proxies, labels):
    """The input checks of the fused op ``op`` (same order, same messages), in Python, for wrappers
    that compute on the inputs before they reach the op (:class:`dmlfast.losses.ProxySynthesis`):
    types, shapes, dtypes and devices, then the values (labels in [0, C), embeddings and proxies
    finite with finite row norms) with one device-to-host read."""
    _require_tensors(op, embeddings=embeddings, proxies=proxies, labels=labels)
    for name, tensor, shape in (("embeddings", embeddings, "(batch, dim)"), ("proxies", proxies, "(num_classes, dim)")):
        if tensor.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D {shape}, got a {_describe(tensor)}")
    if labels.dim() != 1:
        raise ValueError(f"{op}: labels must be 1-D (batch,), got a {_describe(labels)}")
    for name, tensor in (("embeddings", embeddings), ("proxies", proxies)):
        if not tensor.is_floating_point():
            raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {_describe(tensor)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{op}: labels must be int64, got {_describe(labels)}")
    if embeddings.shape[0] == 0:
        raise ValueError(f"{op}: the batch is empty (embeddings has 0 rows)")
    if proxies.shape[0] == 0:
        raise ValueError(f"{op}: proxies has 0 rows (num_classes must be >= 1)")
    if embeddings.shape[1] == 0:
        raise ValueError(f"{op}: embeddings have dimension 0")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{op}: labels must have one entry per embedding: embeddings has {embeddings.shape[0]} rows, "
                         f"labels has {labels.shape[0]}")
    if proxies.shape[1] != embeddings.shape[1]:
        raise ValueError(f"{op}: embedding dimension and proxy dimension differ: embeddings are {embeddings.shape[1]}-d, "
                         f"proxies are {proxies.shape[1]}-d")
    if torch.compiler.is_compiling():
        return
    accumulation = _accumulation_dtype(embeddings, proxies)
    x, p = embeddings.detach(), proxies.detach()
    low, high = torch.aminmax(labels)
    flags = torch.stack([low.double(), high.double(), torch.isfinite(x.to(accumulation).square().sum(1)).all().double(),
                         torch.isfinite(p.to(accumulation).square().sum(1)).all().double()]).cpu().tolist()
    num_classes = proxies.shape[0]
    if flags[0] < 0 or flags[1] >= num_classes:
        raise ValueError(f"{op}: labels must be in [0, {num_classes}) (num_classes = proxies.shape[0]), got min "
                         f"{int(flags[0])} and max {int(flags[1])}")
    for name, rows, finite in (("embeddings", x, flags[2]), ("proxies", p, flags[3])):
        if not finite:
            message = _overflow_message(op, name, rows, accumulation)
            if message is None:
                first = int((~torch.isfinite(rows).all(1)).nonzero()[0, 0])
                message = f"{op}: {name} contain NaN or Inf (first bad row: {first})"
            raise ValueError(message)


def _anchor_hyperparameters(op, margin, alpha):
    """``(margin, alpha)`` checked for the anchor family: margin finite, alpha > 0."""
    return _require_number(op, "margin", margin), _require_number(op, "alpha", alpha, low=0.0, low_inclusive=False)


def _softmax_hyperparameters(op, scale, smoothing, exclude_positive):
    """``(scale, smoothing, exclude_positive)`` checked for the softmax family: scale > 0,
    smoothing in [0, 1), exclude_positive a bool."""
    scale = _require_number(op, "scale", scale, low=0.0, low_inclusive=False)
    smoothing = _require_number(op, "smoothing", smoothing, low=0.0, high=1.0)
    if not isinstance(exclude_positive, bool):
        raise TypeError(f"{op}: exclude_positive must be a bool, got {type(exclude_positive).__name__}")
    return scale, smoothing, exclude_positive


def proxy_anchor_loss(embeddings, proxies, labels, margin=0.1, alpha=32.0):
    """Proxy-Anchor loss (Kim et al., CVPR 2020; SPEC §1.1), on cosines S = x̂ p̂ᵀ:

    L = 1/|P⁺| Σ_{c∈P⁺} log(1 + Σ_{b: y_b=c} e^{-α(S_bc-δ)}) + 1/C Σ_c log(1 + Σ_{b: y_b≠c} e^{α(S_bc+δ)})

    with δ = ``margin``, α = ``alpha`` and P⁺ the proxies with a positive in the batch.
    """
    op = "proxy_anchor_loss"
    _require_tensors(op, embeddings=embeddings, proxies=proxies, labels=labels)
    margin, alpha = _anchor_hyperparameters(op, margin, alpha)
    return _run_checked(op, lambda: torch.ops.dmlfast.proxy_anchor_loss(embeddings, proxies, labels, margin, alpha)[0],
                        embeddings, proxies)


def proxy_nca_loss(embeddings, proxies, labels, scale=18.0, smoothing=0.0, exclude_positive=False):
    """ProxyNCA / ProxyNCA++ / Norm-SoftMax loss (SPEC §2, §7.3) on logits z = scale · cos(x, p).

    Default: mean over the batch of the cross-entropy of softmax(z) against targets smoothed to
    1-ε on the label and ε/(C-1) elsewhere (ε = ``smoothing``). ``exclude_positive=True`` is the
    paper's classic form -z_y + log Σ_{c≠y} e^{z_c} (the target left out of the denominator).
    Scales: dichotomies' s_x = s_p = 3 is 18; pytorch-metric-learning's softmax_scale s is 2s.
    """
    op = "proxy_nca_loss"
    _require_tensors(op, embeddings=embeddings, proxies=proxies, labels=labels)
    scale, smoothing, exclude_positive = _softmax_hyperparameters(op, scale, smoothing, exclude_positive)
    return _run_checked(op, lambda: torch.ops.dmlfast.proxy_nca_loss(embeddings, proxies, labels, scale, smoothing,
                                                                      exclude_positive)[0], embeddings, proxies)


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
    """Proxy-ISA loss (Li et al., MMAsia 2022; SPEC §3.1, §3.3), the fused Proxy-Anchor kernel with
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
    _require_tensors(op, embeddings=embeddings, proxies=proxies, labels=labels)
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
    margin, alpha = _anchor_hyperparameters(op, margin, alpha)
    # The op accumulates in float64 when either input is float64 (float32 otherwise): hand it the
    # class vectors in that dtype, so none is rounded on the way.
    wide = torch.float64 in (embeddings.dtype, proxies.dtype)
    params = torch.stack([v.detach().to(torch.float64 if wide else torch.float32) for v in vectors.values()])
    return _run_checked(op, lambda: torch.ops.dmlfast.proxy_anchor_loss(embeddings, proxies, labels, margin, alpha, params,
                                                                         filter_positives)[0], embeddings, proxies)


def idml_proxy_anchor_loss(embeddings, uncertainty, proxies, labels, margin=0.1, alpha=32.0):
    """IDML's introspective Proxy-Anchor loss (Wang, Zheng et al., TPAMI 2023; SPEC §6): the
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
    _require_tensors(op, embeddings=embeddings, uncertainty=uncertainty, proxies=proxies, labels=labels)
    margin, alpha = _anchor_hyperparameters(op, margin, alpha)
    return _run_checked(op, lambda: torch.ops.dmlfast.idml_proxy_anchor_loss(embeddings, uncertainty, proxies, labels, margin,
                                                                              alpha)[0], embeddings, proxies)
