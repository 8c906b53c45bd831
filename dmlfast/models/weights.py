"""Reading backbone weights from local files, without running code from them, and checking that a
state dict fits a model.

* ``.pth``/``.pt``/``.bin`` (and any other suffix): :func:`dmlfast.safe_load.load_torch_file`
  (``torch.load(weights_only=True)``: tensors and plain containers only; anything else is refused unread);
* ``.safetensors``: ``safetensors.torch.load_file`` (a header and raw tensor bytes).

A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and a ``module.`` prefix (DataParallel) are
accepted. :func:`require_matching_keys` names the first missing and unexpected keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable

import torch

from dmlfast.checks import InputError

#: ``weights=`` values that ask for the backbone's published pretrained weights.
PRETRAINED = ("imagenet", "pretrained")
#: ``weights=`` value of a random initialisation.
RANDOM = "none"
SAFETENSORS_HINT = "pip install safetensors"


class WeightsUnavailableError(InputError, RuntimeError):
    """Pretrained weights were asked for and cannot be had (offline, no cache, bad file)."""


def asks_for_pretrained(weights) -> bool:
    """Whether ``weights`` names the published pretrained weights (``"imagenet"`` or ``"pretrained"``)."""
    return isinstance(weights, str) and weights in PRETRAINED


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """The tensors of the local weights file ``path`` (see the module docstring); ``WeightsUnavailableError``
    when it is missing, unreadable or not a mapping of names to tensors."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"--weights: no such file: {path} (give 'imagenet', 'none' or the path of a state dict)")
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
    else:
        from dmlfast.safe_load import UnreadableFileError, load_torch_file

        try:
            state = load_torch_file(path, "state dict")
        except UnreadableFileError as error:
            raise WeightsUnavailableError(f"--weights: {error}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"--weights: {path} does not hold a state dict (a mapping of names to tensors)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as error:
        raise WeightsUnavailableError(f"--weights: reading {path} needs the safetensors package, which is not installed: "
                                      f"{SAFETENSORS_HINT}") from error
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsUnavailableError(f"--weights: cannot read {path} as a safetensors file ({error})") from error


def without_prefixes(state: Dict[str, torch.Tensor], prefixes: Iterable[str]) -> Dict[str, torch.Tensor]:
    """``state`` without the keys that start with one of ``prefixes`` (classifier layers)."""
    prefixes = tuple(prefixes)
    return {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}


def require_matching_keys(state: Dict[str, torch.Tensor], expected: Iterable[str], weights, what: str) -> None:
    """``WeightsUnavailableError`` naming the first missing and unexpected keys unless the keys of
    ``state`` are ``expected`` (BatchNorm's ``num_batches_tracked`` may be missing)."""
    expected = set(expected)
    missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"--weights {weights}: the state dict does not fit {what}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
