"""The fused ops of ``torch.ops.dmlfast`` on PyTorch tensor ops: what CUDA tensors run when
dmlfast._C was built without its CUDA kernels (no nvcc at install time).

Each function takes the op's arguments (csrc/ops.cpp) and returns the same outputs: the loss in
the accumulation dtype (float64 when an input is float64, else float32) and the gradients in their
inputs' dtypes. It follows the tiled algorithm of csrc/tiles.h (docs/losses.md §7): proxies are
walked in tiles of ``tile_columns`` classes, so memory is O(B·D + C·D + B·tile) and no B × C
tensor exists. The input checks raise the C++ ops' errors, word for word. The functions run on
any device; the tests call them on CPU tensors (forcing several tiles) against the C++ op and the
float64 reference. :func:`register_cuda_kernels` (called by dmlfast._ops only when the extension
has no CUDA kernels) makes them the ops' CUDA implementation, so autograd, fake tensors and
autocast (dmlfast/_ops.py) work unchanged. Adding an optional trailing argument to an op's schema
means adding the same parameter, with its default, to its function here.
"""
import warnings

import torch

from .anchor import idml_proxy_anchor_loss, proxy_anchor_loss
from .common import default_tile_columns
from .softmax import proxy_nca_loss, proxy_nca_shard_loss_and_grads, proxy_nca_shard_row_stats

__all__ = ["OPS", "default_tile_columns", "idml_proxy_anchor_loss", "proxy_anchor_loss", "proxy_nca_loss",
           "proxy_nca_shard_loss_and_grads", "proxy_nca_shard_row_stats", "register_cuda_kernels"]

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
