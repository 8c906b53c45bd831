"""Loads the compiled kernels (dmlfast._C) and registers how their ops behave in PyTorch.

For each op ``torch.ops.dmlfast.<name>(embeddings, proxies, labels, ...) -> (loss, grad_embeddings,
grad_proxies)`` this module registers:

- a fake (meta) kernel, so torch.compile and FakeTensor tracing know the output shapes;
- autograd: the forward already computed both gradients, so backward only scales them by the
  upstream gradient (in place, no recomputation, no host sync; see _make_autograd);
- autocast: the ops read float32, bfloat16 and float16 inputs natively and accumulate in float32,
  so autocast is told to leave their inputs alone (a fallthrough for AutocastCPU/AutocastCUDA):
  bf16 embeddings from an autocast model meet float32 proxies without either being cast.
"""
from pathlib import Path

import torch

from ._version import __version__

OP_NAMES = ("proxy_anchor_loss", "proxy_nca_loss")


def _load_extension():
    try:
        from . import _C
    except ImportError as error:
        package_dir = Path(__file__).resolve().parent
        if (package_dir.parent / "setup.py").exists() and not list(package_dir.glob("_C*.so")):
            hint = (
                f"you are importing dmlfast from its source folder {package_dir}, where the compiled "
                "extension has not been built. Build it in place with `pip install -e .` (from the "
                "repository root), or run from another directory so the installed copy is imported."
            )
        else:
            hint = (
                "the compiled extension dmlfast._C could not be loaded; it is usually compiled against "
                "another torch than the one installed. Rebuild it: `pip install --force-reinstall "
                "--no-deps .` from the dmlfast source."
            )
        raise ImportError(f"dmlfast: {hint} (original error: {error})") from error
    built_against = _C.build_info()["torch"]
    if built_against != torch.__version__:
        raise ImportError(
            f"dmlfast._C was compiled against torch {built_against}, but torch {torch.__version__} is "
            "imported. Rebuild it against this torch: `pip install --force-reinstall --no-deps .` "
            "from the dmlfast source."
        )
    return _C


_C = _load_extension()


def _fake_outputs(embeddings, proxies):
    wide = torch.float64 in (embeddings.dtype, proxies.dtype)
    return (
        embeddings.new_empty((), dtype=torch.float64 if wide else torch.float32),
        torch.empty_like(embeddings, memory_format=torch.contiguous_format),
        torch.empty_like(proxies, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("dmlfast::proxy_anchor_loss")
def _proxy_anchor_loss_fake(embeddings, proxies, labels, margin, alpha, isa_class_params=None, isa_filter_positives=False):
    return _fake_outputs(embeddings, proxies)


@torch.library.register_fake("dmlfast::proxy_nca_loss")
def _proxy_nca_loss_fake(embeddings, proxies, labels, scale, smoothing, exclude_positive):
    return _fake_outputs(embeddings, proxies)


def _is_plain(tensor):
    """True for an ordinary eager tensor; False under tracing (fake, functional, proxy subclasses)."""
    return type(tensor) is torch.Tensor


def _make_autograd(op):
    """setup_context and backward for ``op``, whose forward already returned both gradients.

    Backward scales those gradients by the upstream gradient. Eagerly this happens in place, so
    no second tensor the size of the proxies is made (2 GiB at a million classes); the gradients
    are handed over once, and a further backward through the same graph (retain_graph=True,
    gradcheck) recomputes them from the saved inputs. Under tracing (torch.compile, opcheck)
    the saved gradients are scaled out of place, which the compiler is free to optimise.
    """

    def setup_context(ctx, inputs, output):
        embeddings, proxies, labels, *scalars = inputs
        _, grad_embeddings, grad_proxies = output
        ctx.mark_non_differentiable(grad_embeddings, grad_proxies)
        # The gradient outputs get no upstream gradient: don't materialize zeros for them.
        ctx.set_materialize_grads(False)
        ctx.num_scalar_args = len(scalars) + 1
        ctx.in_place = _is_plain(grad_proxies) and _is_plain(grad_embeddings)
        if ctx.in_place:
            ctx.scalars = scalars
            ctx.unused_gradients = (grad_embeddings, grad_proxies)
            ctx.save_for_backward(embeddings, proxies, labels)
        else:
            ctx.save_for_backward(grad_embeddings, grad_proxies)

    def backward(ctx, grad_loss, _grad_of_grad_embeddings, _grad_of_grad_proxies):
        nones = (None,) * ctx.num_scalar_args
        if grad_loss is None:  # no gradient flows into the loss
            return None, None, *nones
        if not ctx.in_place:
            grad_embeddings, grad_proxies = ctx.saved_tensors
            return (grad_loss * grad_embeddings).to(grad_embeddings.dtype), (grad_loss * grad_proxies).to(grad_proxies.dtype), *nones
        if ctx.unused_gradients is None:
            embeddings, proxies, labels = ctx.saved_tensors
            _, grad_embeddings, grad_proxies = op(embeddings.detach(), proxies.detach(), labels, *ctx.scalars)
        else:
            grad_embeddings, grad_proxies = ctx.unused_gradients
            ctx.unused_gradients = None
        return grad_embeddings.mul_(grad_loss), grad_proxies.mul_(grad_loss), *nones

    return setup_context, backward


_autocast_library = torch.library.Library("dmlfast", "IMPL")
for _name in OP_NAMES:
    _setup_context, _backward = _make_autograd(getattr(torch.ops.dmlfast, _name).default)
    torch.library.register_autograd(f"dmlfast::{_name}", _backward, setup_context=_setup_context)
    for _key in ("AutocastCPU", "AutocastCUDA"):
        _autocast_library.impl(_name, torch.library.fallthrough_kernel, _key)


def build_info():
    """How dmlfast._C was built: version, torch, cuda_kernels, cuda_arch_list, openmp."""
    info = dict(_C.build_info())
    arch_list = info.pop("cuda_arch_list")
    return {
        "version": __version__,
        "torch": info["torch"],
        "cuda_kernels": bool(info["cuda_kernels"]),
        "cuda_arch_list": [arch for arch in arch_list.split(";") if arch],
        "openmp": bool(info["openmp"]),
    }
