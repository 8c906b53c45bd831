"""Loads the compiled kernels (dmlfast._C) and registers how their ops behave in PyTorch.

For each op ``torch.ops.dmlfast.<name>(embeddings, proxies, labels, ...) -> (loss, grad_embeddings,
grad_proxies)``, and ``idml_proxy_anchor_loss(embeddings, uncertainty, proxies, labels, ...) -> (loss,
grad_embeddings, grad_uncertainty, grad_proxies)``, this module registers (the class-sharded
softmax's first pass, ``proxy_nca_shard_row_stats``, has no gradient: only its fake and autocast):

- a fake (meta) kernel, so torch.compile and FakeTensor tracing know the output shapes;
- autograd: the forward already computed both gradients, so backward only scales them by the
  upstream gradient (in place, no recomputation, no host sync; see _make_autograd);
- autocast: the ops read float32, bfloat16 and float16 inputs natively and accumulate in float32,
  so autocast is told to leave their inputs alone (a fallthrough for AutocastCPU/AutocastCUDA):
  bf16 embeddings from an autocast model meet float32 proxies without either being cast.

When the extension was built without its CUDA kernels, dmlfast.fallback (the same tiled algorithm
on PyTorch ops) is registered as the ops' CUDA kernels, so all of the above applies to it too.
"""
from pathlib import Path

import torch

from ._version import __version__

#: Each op and how many of its leading tensor inputs get a gradient (its outputs: loss, then those gradients).
DIFFERENTIABLE_INPUTS = {"proxy_anchor_loss": 2, "proxy_nca_loss": 2, "idml_proxy_anchor_loss": 3,
                         "proxy_nca_shard_loss_and_grads": 2}
OP_NAMES = (*DIFFERENTIABLE_INPUTS, "proxy_nca_shard_row_stats")


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
def _proxy_anchor_loss_fake(embeddings, proxies, labels, margin, alpha, isa_class_params=None, isa_filter_positives=False,
                            class_offset=0, num_classes=-1):
    return _fake_outputs(embeddings, proxies)


@torch.library.register_fake("dmlfast::proxy_nca_loss")
def _proxy_nca_loss_fake(embeddings, proxies, labels, scale, smoothing, exclude_positive):
    return _fake_outputs(embeddings, proxies)


@torch.library.register_fake("dmlfast::proxy_nca_shard_row_stats")
def _proxy_nca_shard_row_stats_fake(embeddings, proxies, labels, scale, exclude_positive, class_offset, num_classes):
    return embeddings.new_empty((4, embeddings.shape[0]), dtype=torch.float64)


@torch.library.register_fake("dmlfast::proxy_nca_shard_loss_and_grads")
def _proxy_nca_shard_loss_and_grads_fake(embeddings, proxies, labels, row_stats, scale, smoothing, exclude_positive,
                                         class_offset, num_classes):
    return _fake_outputs(embeddings, proxies)


@torch.library.register_fake("dmlfast::idml_proxy_anchor_loss")
def _idml_proxy_anchor_loss_fake(embeddings, uncertainty, proxies, labels, margin, alpha, class_offset=0, num_classes=-1):
    loss, grad_embeddings, grad_proxies = _fake_outputs(embeddings, proxies)
    if uncertainty.dtype == torch.float64:
        loss = loss.to(torch.float64)
    return loss, grad_embeddings, torch.empty_like(uncertainty, memory_format=torch.contiguous_format), grad_proxies


def _is_plain(tensor):
    """True for an ordinary eager tensor; False under tracing (fake, functional, proxy subclasses)."""
    return type(tensor) is torch.Tensor


def _make_autograd(op, num_differentiable):
    """setup_context and backward for ``op``, whose forward already returned the gradients of its
    first ``num_differentiable`` inputs (after the loss).

    Backward scales those gradients by the upstream gradient. Eagerly this happens in place, so
    no second tensor the size of the proxies is made (2 GiB at a million classes); the gradients
    are handed over once, and a further backward through the same graph (retain_graph=True,
    gradcheck) recomputes them from the saved inputs. Under tracing (torch.compile, opcheck)
    the saved gradients are scaled out of place, which the compiler is free to optimise.
    """

    def setup_context(ctx, inputs, output):
        differentiable, (labels, *scalars) = inputs[:num_differentiable], inputs[num_differentiable:]
        gradients = output[1:]
        ctx.mark_non_differentiable(*gradients)
        # The gradient outputs get no upstream gradient: don't materialize zeros for them.
        ctx.set_materialize_grads(False)
        ctx.num_scalar_args = len(scalars) + 1
        ctx.in_place = all(_is_plain(gradient) for gradient in gradients)
        if ctx.in_place:
            ctx.scalars = scalars
            ctx.unused_gradients = gradients
            ctx.save_for_backward(*differentiable, labels)
        else:
            ctx.save_for_backward(*gradients)

    def backward(ctx, grad_loss, *_grads_of_gradients):
        nones = (None,) * ctx.num_scalar_args
        if grad_loss is None:  # no gradient flows into the loss
            return (None,) * num_differentiable + nones
        if not ctx.in_place:
            return (*((grad_loss * g).to(g.dtype) for g in ctx.saved_tensors), *nones)
        if ctx.unused_gradients is None:
            *differentiable, labels = ctx.saved_tensors
            gradients = op(*(t.detach() for t in differentiable), labels, *ctx.scalars)[1:]
        else:
            gradients = ctx.unused_gradients
            ctx.unused_gradients = None
        return (*(g.mul_(grad_loss) for g in gradients), *nones)

    return setup_context, backward


_autocast_library = torch.library.Library("dmlfast", "IMPL")
for _name, _count in DIFFERENTIABLE_INPUTS.items():
    _setup_context, _backward = _make_autograd(getattr(torch.ops.dmlfast, _name).default, _count)
    torch.library.register_autograd(f"dmlfast::{_name}", _backward, setup_context=_setup_context)
for _name in OP_NAMES:
    for _key in ("AutocastCPU", "AutocastCUDA"):
        _autocast_library.impl(_name, torch.library.fallthrough_kernel, _key)


if not _C.build_info()["cuda_kernels"]:
    from . import fallback

    fallback.register_cuda_kernels()


def build_info():
    """How dmlfast._C was built: version, torch, cuda_kernels, cuda_arch_list, openmp, and
    cuda_path: what runs the losses on CUDA tensors ("kernels": dmlfast's CUDA kernels;
    "fallback": dmlfast.fallback on PyTorch ops, the extension having no CUDA kernels; "none":
    torch is a CPU-only build)."""
    info = dict(_C.build_info())
    arch_list = info.pop("cuda_arch_list")
    cuda_kernels = bool(info["cuda_kernels"])
    return {
        "version": __version__,
        "torch": info["torch"],
        "cuda_kernels": cuda_kernels,
        "cuda_arch_list": [arch for arch in arch_list.split(";") if arch],
        "openmp": bool(info["openmp"]),
        "cuda_path": "kernels" if cuda_kernels else "fallback" if torch.backends.cuda.is_built() else "none",
    }
