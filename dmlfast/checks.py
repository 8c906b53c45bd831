"""Argument checks in one place.

- :class:`InputError`, the one error type of a user's mistake: the commands (``python -m
  dmlfast.train`` and the others) print it as one ``PROG: error: ...`` line and exit with status 2
  (:func:`dmlfast._cli.run_command`); the library raises it wherever the user's input is wrong (a
  flag, a file, a checkpoint, a missing package). :func:`require_at_least` checks a flag's value.
- The checks of a library call's arguments (``require_tensors``, ``require_number``,
  ``require_int`` and the loss families' hyperparameters), which raise ``ValueError``/``TypeError``
  naming the function, the argument, what was expected and what was given.
- :func:`as_int64_labels`, the losses' label conversion: any integer dtype in, int64 out, once.
- :func:`check_loss_inputs`, the fused ops' own input checks repeated in Python for code that
  computes on the inputs before an op sees them (Proxy Synthesis).
- :func:`canonical_name`, a name looked up case-insensitively among choices, with a "did you mean"
  suggestion when it is not one of them.
"""
from __future__ import annotations

import difflib
import math
import numbers
from pathlib import Path
from typing import Optional

import torch


class InputError(Exception):
    """A problem with the user's input (a flag, a file, a checkpoint): printed as one line, exit status 2."""


def one_of(names) -> str:
    """``"a, b or c"``: the choices of a message."""
    names = [str(n) for n in names]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def canonical_name(what: str, name, choices) -> str:
    """The entry of ``choices`` that ``name`` spells, compared without regard to case (``"proxyanchor"``
    -> ``"ProxyAnchor"``); ``ValueError`` ``"unknown {what} 'x'; did you mean Y? (choose one of ...)"``
    otherwise, the suggestion being the closest choice when one is close."""
    choices = [str(c) for c in choices]
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a name (one of {one_of(choices)}), got {type(name).__name__}")
    if name in choices:
        return name
    folded = {c.casefold(): c for c in choices}
    if name.casefold() in folded:
        return folded[name.casefold()]
    close = difflib.get_close_matches(name.casefold(), list(folded), n=1, cutoff=0.7)
    hint = f"; did you mean {folded[close[0]]}?" if close else ""
    raise ValueError(f"unknown {what} {name!r}{hint} (choose one of {one_of(choices)})")


def require_at_least(flag: str, value, minimum: int):
    """``value``, or ``InputError`` ``"{flag} must be at least {minimum}, got {value}"`` (``">= 0"`` for 0)."""
    if value < minimum:
        bound = ">= 0" if minimum == 0 else f"at least {minimum}"
        raise InputError(f"{flag} must be {bound}, got {value}")
    return value


def require_new_files(flag: str, *paths: Optional[Path], overwrite: bool) -> None:
    """``InputError`` naming ``flag`` when a file about to be written exists and ``overwrite`` is
    false: no earlier result is replaced unasked. Called before the work."""
    existing = [str(path) for path in paths if path is not None and (Path(path).exists() or Path(path).is_symlink())]
    if existing and not overwrite:
        which = f"{existing[0]} exists" if len(existing) == 1 else f"{', '.join(existing)} exist"
        raise InputError(f"{flag}: {which}; pass --overwrite to replace, or choose another path")


# --------------------------------------------------------------------------------- library arguments
# Programming errors of a library call: ValueError/TypeError naming the function and the argument.

def require_tensors(op: str, **tensors) -> None:
    """``TypeError`` unless every value is a ``torch.Tensor``; ``ValueError`` unless they share one device."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    devices = {name: value.device for name, value in tensors.items()}
    if len(set(devices.values())) > 1:
        *others, last = devices
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{op}: {', '.join(others)} and {last} must be on one device, got {listed}")


def require_number(op: str, name: str, value, *, low=-math.inf, low_inclusive=True, high=math.inf, high_inclusive=False):
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


def require_int(op: str, name: str, value, minimum: int = 1) -> int:
    """``value`` as an int after checking it is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{op}: {name} must be {kind}, got {value!r}")
    return int(value)


def anchor_hyperparameters(op: str, margin, alpha):
    """``(margin, alpha)`` checked for the anchor family: margin finite, alpha > 0."""
    return require_number(op, "margin", margin), require_number(op, "alpha", alpha, low=0.0, low_inclusive=False)


def softmax_hyperparameters(op: str, scale, smoothing, exclude_positive):
    """``(scale, smoothing, exclude_positive)`` checked for the softmax family: scale > 0,
    smoothing in [0, 1), exclude_positive a bool."""
    scale = require_number(op, "scale", scale, low=0.0, low_inclusive=False)
    smoothing = require_number(op, "smoothing", smoothing, low=0.0, high=1.0)
    if not isinstance(exclude_positive, bool):
        raise TypeError(f"{op}: exclude_positive must be a bool, got {type(exclude_positive).__name__}")
    return scale, smoothing, exclude_positive


# ------------------------------------------------------------------------------ the fused ops' inputs

def describe_tensor(tensor):
    """A tensor as the fused ops' messages describe it: ``Float tensor of shape [6, 4] on cpu``
    (c10's dtype names: Float, Half, BFloat16, Long, Byte)."""
    dtype_name = tensor.new_empty(0, device="cpu").type().removeprefix("torch.").removesuffix("Tensor")
    return f"{dtype_name} tensor of shape [{', '.join(map(str, tensor.shape))}] on {tensor.device}"


def check_op_metadata(op, embeddings, proxies, labels):
    """The fused ops' metadata checks (shapes, dtypes, devices; csrc/checks.cpp check_metadata), in
    the same order and words; no device reads."""
    x, p = embeddings, proxies
    if x.dim() != 2:
        raise ValueError(f"{op}: embeddings must be 2-D (batch, dim), got a {describe_tensor(x)}")
    if p.dim() != 2:
        raise ValueError(f"{op}: proxies must be 2-D (num_classes, dim), got a {describe_tensor(p)}")
    if labels.dim() != 1:
        raise ValueError(f"{op}: labels must be 1-D (batch,), got a {describe_tensor(labels)}")
    for name, tensor in (("embeddings", x), ("proxies", p)):
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {describe_tensor(tensor)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{op}: labels must be int64, got {describe_tensor(labels)}")
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


def accumulation_dtype(embeddings, proxies):
    """The dtype the op computes row norms in: float64 when an input is float64, else float32."""
    return torch.float64 if torch.float64 in (embeddings.dtype, proxies.dtype) else torch.float32


def overflow_message(op, name, rows, accumulation):
    """The fused ops' message for ``rows`` whose values are finite but whose norm overflows
    ``accumulation`` (csrc/checks.cpp words it the same; embeddings' squared norms are summed in
    float64 there, the proxies' in ``accumulation``); ``None`` when every row's norm is finite or a
    value is NaN/Inf (then the NaN/Inf message is right)."""
    if not bool(torch.isfinite(rows).all()):
        return None
    if name == "embeddings":
        norms = rows.to(torch.float64).square().sum(1).sqrt().to(accumulation)
    else:
        norms = rows.to(accumulation).square().sum(1)
    bad = ~torch.isfinite(norms)
    if not bool(bad.any()):
        return None
    row = int(bad.nonzero()[0, 0])
    largest = float(rows[row].abs().max())
    dtype = str(accumulation).replace("torch.", "")
    return (f"{op}: {name} are finite, but the norm of row {row} overflows {dtype} (its largest entry is {largest:g} "
            f"in magnitude); values this large usually mean a diverging model: lower the learning rate or clip "
            f"gradients")


def as_int64_labels(op: str, labels):
    """``labels`` as int64, the dtype the fused ops index with: an integer tensor of any width
    (int8 to int64, uint8) is converted once, its values kept (their range is checked where the
    classes are known); ``TypeError`` naming ``op`` for a float, bool or complex tensor. Anything
    that is not a tensor passes through, for :func:`require_tensors`' message."""
    if not isinstance(labels, torch.Tensor) or labels.dtype == torch.int64:
        return labels
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{op}: labels must be an integer tensor (int64, int32, int16, int8 or uint8), got a {describe_tensor(labels)}")
    return labels.long()


def check_loss_inputs(op, embeddings, proxies, labels):
    """The input checks of the fused op ``op`` (same order, same messages), in Python, for wrappers
    that compute on the inputs before they reach the op (:class:`dmlfast.losses.ProxySynthesis`):
    types, shapes, dtypes and devices, then the values (labels in [0, C), embeddings and proxies
    finite with finite row norms) with one device-to-host read."""
    require_tensors(op, embeddings=embeddings, proxies=proxies, labels=labels)
    check_op_metadata(op, embeddings, proxies, labels)
    if torch.compiler.is_compiling():
        return
    accumulation = accumulation_dtype(embeddings, proxies)
    x, p = embeddings.detach(), proxies.detach()
    low, high = torch.aminmax(labels)
    x_norms = x.to(torch.float64).square().sum(1).sqrt().to(accumulation)
    flags = torch.stack([low.double(), high.double(), torch.isfinite(x_norms).all().double(),
                         torch.isfinite(p.to(accumulation).square().sum(1)).all().double()]).cpu().tolist()
    num_classes = proxies.shape[0]
    if flags[0] < 0 or flags[1] >= num_classes:
        raise ValueError(f"{op}: labels must be in [0, {num_classes}) (num_classes = proxies.shape[0]), got min "
                         f"{int(flags[0])} and max {int(flags[1])}")
    for name, rows, finite in (("embeddings", x, flags[2]), ("proxies", p, flags[3])):
        if not finite:
            message = overflow_message(op, name, rows, accumulation)
            if message is None:
                first = int((~torch.isfinite(rows).all(1)).nonzero()[0, 0])
                message = f"{op}: {name} contain NaN or Inf (first bad row: {first})"
            raise ValueError(message)
