"""Loads the compiled kernels (dmlfast._C) and registers how their ops behave in PyTorch.

Each op ``torch.ops.dmlfast.<name>(embeddings, proxies, labels, ..., value_checks=1, ...)`` returns
``(loss, grad_embeddings, grad_proxies, value_flags)`` (IDML: ``(loss, grad_embeddings,
grad_uncertainty, grad_proxies, value_flags)``); the class-sharded softmax's first pass,
``proxy_nca_shard_row_stats``, returns its row statistics and has no gradient. This module registers:

- a fake (meta) kernel, so torch.compile and FakeTensor tracing know the output shapes;
- autograd: the forward already computed the gradients, so backward only scales them by the
  upstream gradient (in place, on the device, skipped when it is 1; see _make_autograd);
- autocast: the ops read float32, bfloat16 and float16 inputs natively and accumulate in float32,
  so autocast is told to leave their inputs alone (a fallthrough for AutocastCPU/AutocastCUDA):
  bf16 embeddings from an autocast model meet float32 proxies without either being cast;
- the value checks (labels in range, finite inputs), see :func:`value_check_mode`.

When the extension was built without its CUDA kernels, dmlfast.fallback (the same tiled algorithm
on PyTorch ops) is registered as the ops' CUDA kernels, so all of the above applies to it too.
"""
import contextlib
from pathlib import Path

import torch

from ._version import __version__

#: Each op and how many of its leading tensor inputs get a gradient (its outputs: the loss, those
#: gradients, then the value flags).
DIFFERENTIABLE_INPUTS = {"proxy_anchor_loss": 2, "proxy_nca_loss": 2, "idml_proxy_anchor_loss": 3,
                         "proxy_nca_shard_loss_and_grads": 2}
OP_NAMES = (*DIFFERENTIABLE_INPUTS, "proxy_nca_shard_row_stats")

#: The ops' ``value_checks`` argument.
CHECKS_OFF, CHECKS_IMMEDIATE, CHECKS_DEFERRED = 0, 1, 2
#: Devices on which checks of a call that will be backpropagated are deferred to its backward.
_DEFERRED_DEVICES = ("cuda",)
_checks_enabled = True


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


def set_value_checks(enabled):
    """Turn the fused losses' value checks on (the default) or off, for every later call.

    On, bad labels and NaN/Inf embeddings or proxies raise a clear ``ValueError``. On the CPU the
    op raises at once. On CUDA the op never waits for the GPU in its forward: when the loss will be
    backpropagated, its flags are read (one 16-byte device-to-host read, which waits for the loss's
    own kernels) at the start of its backward, which raises before any gradient leaves it; a loss
    computed without gradients, or under torch.compile, reads them at the end of the op. A loss
    computed with gradients enabled but never backpropagated is not checked.

    Off, nothing is read back: the loss can be captured in a CUDA graph (``torch.cuda.graphs``,
    ``torch.compile(mode="reduce-overhead")``). Shapes, dtypes and devices are still checked; an
    out-of-range label then gives meaningless numbers (never an out-of-bounds access), and NaN or
    Inf inputs give NaN results.
    """
    global _checks_enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_value_checks: enabled must be a bool, got {type(enabled).__name__}")
    _checks_enabled = enabled


def value_checks_enabled():
    """Whether the fused losses check label ranges and finiteness (see :func:`set_value_checks`)."""
    return _checks_enabled


@contextlib.contextmanager
def value_checks(enabled):
    """``with dmlfast.value_checks(False): ...``: :func:`set_value_checks` for a block."""
    previous = _checks_enabled
    set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def value_check_mode(embeddings, *differentiable):
    """The ``value_checks`` argument for a call on ``embeddings`` whose gradient may flow to
    ``embeddings`` and ``differentiable``: off, immediate, or deferred to the backward (on CUDA when
    the call will be backpropagated eagerly; see :func:`set_value_checks`)."""
    if not _checks_enabled:
        return CHECKS_OFF
    if torch.compiler.is_compiling():
        return CHECKS_IMMEDIATE
    if (embeddings.device.type in _DEFERRED_DEVICES and torch.is_grad_enabled()
            and any(t.requires_grad for t in (embeddings, *differentiable))):
        return CHECKS_DEFERRED
    return CHECKS_IMMEDIATE


def _flags_fake(embeddings):
    return embeddings.new_empty((4,), dtype=torch.int32)


def _fake_outputs(embeddings, proxies):
    wide = torch.float64 in (embeddings.dtype, proxies.dtype)
    return (
        embeddings.new_empty((), dtype=torch.float64 if wide else torch.float32),
        torch.empty_like(embeddings, memory_format=torch.contiguous_format),
        torch.empty_like(proxies, memory_format=torch.contiguous_format),
        _flags_fake(embeddings),
    )


@torch.library.register_fake("dmlfast::proxy_anchor_loss")
def _proxy_anchor_loss_fake(embeddings, proxies, labels, margin, alpha, isa_class_params=None, isa_filter_positives=False,
                            class_offset=0, num_classes=-1, value_checks=CHECKS_IMMEDIATE):
    return _fake_outputs(embeddings, proxies)


@torch.library.register_fake("dmlfast::proxy_nca_loss")
def _proxy_nca_loss_fake(embeddings, proxies, labels, scale, smoothing, exclude_positive, value_checks=CHECKS_IMMEDIATE,
                         centers_per_class=1, center_aggregation=0, center_gamma=1.0, margin_type=0, margin=0.0):
    return _fake_outputs(embeddings, proxies)


@torch.library.register_fake("dmlfast::proxy_nca_shard_row_stats")
def _proxy_nca_shard_row_stats_fake(embeddings, proxies, labels, scale, exclude_positive, class_offset, num_classes,
                                    value_checks=CHECKS_IMMEDIATE, centers_per_class=1, center_aggregation=0,
                                    center_gamma=1.0, margin_type=0, margin=0.0):
    return embeddings.new_empty((4, embeddings.shape[0]), dtype=torch.float64)


@torch.library.register_fake("dmlfast::proxy_nca_shard_loss_and_grads")
def _proxy_nca_shard_loss_and_grads_fake(embeddings, proxies, labels, row_stats, scale, smoothing, exclude_positive,
                                         class_offset, num_classes, value_checks=CHECKS_IMMEDIATE, centers_per_class=1,
                                         center_aggregation=0, center_gamma=1.0, margin_type=0, margin=0.0):
    return _fake_outputs(embeddings, proxies)


@torch.library.register_fake("dmlfast::idml_proxy_anchor_loss")
def _idml_proxy_anchor_loss_fake(embeddings, uncertainty, proxies, labels, margin, alpha, class_offset=0, num_classes=-1,
                                 value_checks=CHECKS_IMMEDIATE):
    loss, grad_embeddings, grad_proxies, flags = _fake_outputs(embeddings, proxies)
    if uncertainty.dtype == torch.float64:
        loss = loss.to(torch.float64)
    grad_uncertainty = torch.empty_like(uncertainty, memory_format=torch.contiguous_format)
    return loss, grad_embeddings, grad_uncertainty, grad_proxies, flags


def _is_plain(tensor):
    """True for an ordinary eager tensor; False under tracing (fake, functional, proxy subclasses)."""
    return type(tensor) is torch.Tensor


def _raise_deferred(name, ctx, differentiable, labels):
    """Raise the value-check error of a deferred call (reads its flags: the one host read)."""
    embeddings, *_, proxies = differentiable
    uncertainty = differentiable[1] if len(differentiable) == 3 else None
    num_classes = ctx.arguments.get("num_classes", -1)
    if num_classes < 0:
        num_classes = proxies.shape[0] // ctx.arguments.get("centers_per_class", 1)
    _C.raise_for_value_flags(name, ctx.value_flags, embeddings, proxies, labels, uncertainty, num_classes)


def _make_autograd(name, op, num_differentiable):
    """setup_context and backward for ``op``, whose forward already returned the gradients of its
    first ``num_differentiable`` inputs (after the loss), then its value flags.

    Backward scales those gradients by the upstream gradient. Eagerly this happens in place and on
    the device, skipped there when the upstream gradient is 1 (no host read), so no second tensor
    the size of the proxies is made (2 GiB at a million classes); the gradients are handed over
    once, and a further backward through the same graph (retain_graph=True, gradcheck) recomputes
    them from the saved inputs. Under tracing (torch.compile, opcheck) the saved gradients are
    scaled out of place, which the compiler is free to optimise. A call with deferred value checks
    raises its error here, before returning any gradient.
    """

    scalar_names = [argument.name for argument in op._schema.arguments][num_differentiable + 1:]

    def setup_context(ctx, inputs, output):
        differentiable, (labels, *scalars) = inputs[:num_differentiable], inputs[num_differentiable:]
        gradients, flags = output[1:-1], output[-1]
        ctx.mark_non_differentiable(*gradients, flags)
        # The gradient outputs get no upstream gradient: don't materialize zeros for them.
        ctx.set_materialize_grads(False)
        ctx.num_scalar_args = len(scalars) + 1
        ctx.in_place = all(_is_plain(gradient) for gradient in gradients)
        ctx.scalars = scalars
        ctx.arguments = dict(zip(scalar_names, scalars))
        ctx.value_flags = flags if ctx.arguments["value_checks"] == CHECKS_DEFERRED else None
        if ctx.in_place:
            ctx.unused_gradients = gradients
            ctx.save_for_backward(*differentiable, labels)
        else:
            if ctx.value_flags is not None:  # deferred checks are for eager calls: check them now
                _raise_deferred(name, ctx, differentiable, labels)
                ctx.value_flags = None
            ctx.save_for_backward(*gradients)

    def backward(ctx, grad_loss, *_grads_of_gradients):
        nones = (None,) * ctx.num_scalar_args
        if not ctx.in_place:
            if grad_loss is None:
                return (None,) * num_differentiable + nones
            return (*((grad_loss * g).to(g.dtype) for g in ctx.saved_tensors), *nones)
        *differentiable, labels = ctx.saved_tensors
        if ctx.value_flags is not None:
            _raise_deferred(name, ctx, differentiable, labels)
            ctx.value_flags = None
        if grad_loss is None:  # no gradient flows into the loss
            return (None,) * num_differentiable + nones
        if ctx.unused_gradients is None:
            scalars = [CHECKS_IMMEDIATE if name == "value_checks" else value
                       for name, value in zip(scalar_names, ctx.scalars)]
            gradients = op(*(t.detach() for t in differentiable), labels, *scalars)[1:-1]
        else:
            gradients = ctx.unused_gradients
            ctx.unused_gradients = None
        for gradient in gradients:
            _C.scale_unless_one_(gradient, grad_loss.detach())
        return (*gradients, *nones)

    return setup_context, backward


_autocast_library = torch.library.Library("dmlfast", "IMPL")
for _name, _count in DIFFERENTIABLE_INPUTS.items():
    _setup_context, _backward = _make_autograd(_name, getattr(torch.ops.dmlfast, _name).default, _count)
    torch.library.register_autograd(f"dmlfast::{_name}", _backward, setup_context=_setup_context)
for _name in OP_NAMES:
    for _key in ("AutocastCPU", "AutocastCUDA"):
        _autocast_library.impl(_name, torch.library.fallthrough_kernel, _key)


if not _C.build_info()["cuda_kernels"]:
    from . import fallback

    fallback.register_cuda_kernels()


def build_info():
    """How dmlfast._C was built: version, torch, cuda_kernels, cuda_arch_list, openmp,
    cpu_vector_exp (the CPU kernels' runs of exponentials use AVX2 on this processor), and
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
        "cpu_vector_exp": bool(info["cpu_vector_exp"]),
        "cuda_path": "kernels" if cuda_kernels else "fallback" if torch.backends.cuda.is_built() else "none",
    }
