"""dmlfast.fallback, the ops on PyTorch tensor ops that CUDA tensors run when dmlfast._C has no CUDA
kernels: against the C++ op and the float64 reference, forced on CPU tensors over several tiles
(values, both gradients, float32/bfloat16/float64, sharded and unsharded), the same errors, its
registration; on a GPU (marker ``cuda``) the same comparisons on CUDA tensors."""
import warnings

import pytest
import torch

import dmlfast
from conftest import relative_error, requires_cuda
from dmlfast import _ops, fallback, reference
from test_idml import idml_inputs
from test_isa import isa_inputs

ops = torch.ops.dmlfast
#: Relative error allowed against the float64 reference (as tests/test_losses.py) and against the C++ op.
REFERENCE_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}
CPU_OP_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}
DTYPES = list(REFERENCE_TOL)
BATCH, CLASSES, DIM = 24, 23, 13  # 23 classes in tiles of 5: four full tiles and a partial one
TILES = [5, None]  # None: the default tile size, one tile at this size


def softmax_inputs(dtype):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64).to(dtype)
    p = torch.randn(CLASSES, DIM, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, CLASSES // 2, (BATCH,), generator=gen)  # repeated and absent classes
    return x, p, labels


def case(name, dtype):
    """``(op name, op args, reference loss function, its differentiable inputs, its other args)``."""
    if name.startswith("proxy_isa"):
        x, p, labels, params = isa_inputs(BATCH, CLASSES, DIM, dtype=dtype)
        filter_positives = name == "proxy_isa_filter"
        stacked = torch.stack(params).to(torch.float64 if dtype == torch.float64 else torch.float32)
        return ("proxy_anchor_loss", (x, p, labels, 0.1, 32.0, stacked, filter_positives), reference.proxy_isa_loss,
                (x, p), (labels, *params, filter_positives))
    if name == "idml":
        x, v, p, labels = idml_inputs(BATCH, CLASSES, DIM, dtype, uncertainty_dim=7)
        return "idml_proxy_anchor_loss", (x, v, p, labels, 0.1, 32.0), reference.idml_proxy_anchor_loss, (x, v, p), (labels,)
    x, p, labels = softmax_inputs(dtype)
    if name in ("subcenter_arcface", "soft_triple"):  # K = 3 centers per class, scale 8 (docs/losses.md §9, §10)
        p = torch.randn(CLASSES * 3, DIM, generator=torch.Generator().manual_seed(12), dtype=torch.float64).to(dtype)
        if name == "subcenter_arcface":
            return ("proxy_nca_loss", (x, p, labels, 8.0, 0.0, False, 1, 3, 0, 1.0, 2, 0.5), reference.arcface_loss,
                    (x, p), (labels, 0.5, 8.0, 3))
        return ("proxy_nca_loss", (x, p, labels, 8.0, 0.0, False, 1, 3, 1, 10.0, 1, 0.01), reference.soft_triple_loss,
                (x, p), (labels, 3, 8.0, 0.1, 0.01))
    if name == "proxy_anchor":
        return "proxy_anchor_loss", (x, p, labels, 0.1, 32.0), reference.proxy_anchor_loss, (x, p), (labels, 0.1, 32.0)
    scale, smoothing, exclude = {"nca": (18.0, 0.0, False), "nca_smoothing": (9.0, 0.1, False),
                                 "nca_exclude_positive": (18.0, 0.0, True)}[name]
    return ("proxy_nca_loss", (x, p, labels, scale, smoothing, exclude), reference.proxy_nca_loss, (x, p),
            (labels, scale, smoothing, exclude))


CASES = ["proxy_anchor", "proxy_isa", "proxy_isa_filter", "idml", "nca", "nca_smoothing", "nca_exclude_positive",
         "subcenter_arcface", "soft_triple"]


def reference_outputs(fn, inputs, others):
    """The float64 reference's loss and gradients, on the inputs promoted to float64."""
    inputs = [t.detach().double().requires_grad_() for t in inputs]
    loss = fn(*inputs, *others)
    return (loss, *torch.autograd.grad(loss, inputs))


def assert_close(got, want, tol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tol


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"tile{t}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_fallback_matches_cpu_op_and_reference(name, dtype, tile):
    op, args, ref_fn, inputs, others = case(name, dtype)
    got = fallback.OPS[op](*args, tile_columns=tile)
    expected = getattr(ops, op)(*args)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape and g.is_contiguous()
    assert_close(got, expected, CPU_OP_TOL[dtype])  # the value flags too
    assert_close(got[:-1], reference_outputs(ref_fn, inputs, others), REFERENCE_TOL[dtype])


def shard_ranges(world):
    """Uneven contiguous shards of the classes, as dmlfast.sharded.shard_range."""
    sizes = [CLASSES // world + (rank < CLASSES % world) for rank in range(world)]
    return [(sum(sizes[:rank]), sizes[rank]) for rank in range(world)]


def reduce_row_stats(stats):
    """The shards' [4, B] softmax row statistics combined as dmlfast.sharded.reduce_softmax_row_stats."""
    stats = torch.stack(stats)
    row_max = stats[:, 0].max(0).values
    return torch.stack([row_max, (stats[:, 1] * torch.exp(stats[:, 0] - row_max)).sum(0), stats[:, 2].sum(0),
                        stats[:, 3].sum(0)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["proxy_anchor", "idml", "nca_smoothing", "nca_exclude_positive"])
def test_sharded_fallback_matches_cpu_op_and_reference(name, dtype):
    """Three uneven class shards in tiles of 3: each shard equals the C++ op's, and the shards
    together give the unsharded reference's loss and gradients."""
    op, args, ref_fn, inputs, others = case(name, dtype)
    shards = shard_ranges(3)
    if op == "proxy_nca_loss":
        x, p, labels, scale, smoothing, exclude = args
        stats = [fallback.proxy_nca_shard_row_stats(x, p[first:first + n], labels, scale, exclude, first, CLASSES,
                                                    tile_columns=3) for first, n in shards]
        for (first, n), part in zip(shards, stats):
            expected = ops.proxy_nca_shard_row_stats(x, p[first:first + n], labels, scale, exclude, first, CLASSES)
            assert_close([part], [expected], CPU_OP_TOL[dtype])
        reduced = reduce_row_stats(stats)
        shard_args = [(x, p[first:first + n], labels, reduced, scale, smoothing, exclude, first, CLASSES)
                      for first, n in shards]
        op = "proxy_nca_shard_loss_and_grads"
    elif op == "proxy_anchor_loss":
        x, p, labels, margin, alpha = args
        shard_args = [(x, p[first:first + n], labels, margin, alpha, None, False, first, CLASSES) for first, n in shards]
    else:
        x, v, p, labels, margin, alpha = args
        shard_args = [(x, v, p[first:first + n], labels, margin, alpha, first, CLASSES) for first, n in shards]
    parts = [fallback.OPS[op](*a, tile_columns=3) for a in shard_args]
    expected_parts = [getattr(ops, op)(*a) for a in shard_args]
    # Anchor family: each shard returns its share of the loss; softmax: every shard the whole loss.
    loss = parts[0][0] if op == "proxy_nca_shard_loss_and_grads" else sum(part[0] for part in parts)
    for part, expected in zip(parts, expected_parts):
        assert_close(part, expected, CPU_OP_TOL[dtype])
    *per_sample, grad_p = zip(*(part[1:-1] for part in parts))  # without the value flags
    combined = (loss, *(sum(grads) for grads in per_sample), torch.cat(grad_p))
    assert_close(combined, reference_outputs(ref_fn, inputs, others), REFERENCE_TOL[dtype])


def test_fallback_ignores_autocast_and_grad_mode():
    """Under autocast and with inputs that require grad, the fallback computes as without (float32
    math, no graph), as the C++ op excludes autocast inside."""
    x, p, labels = softmax_inputs(torch.float32)
    plain = fallback.proxy_anchor_loss(x, p, labels, 0.1, 32.0, tile_columns=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = fallback.proxy_anchor_loss(x.requires_grad_(), p, labels, 0.1, 32.0, tile_columns=5)
    for a, b in zip(plain, under_autocast):
        assert torch.equal(a, b) and not b.requires_grad


def _bad_inputs():
    """(op name, args) the C++ ops reject, one per check of csrc/fused_losses.cpp."""
    gen = torch.Generator().manual_seed(2)
    x, p, y = torch.randn(8, 4, generator=gen), torch.randn(5, 4, generator=gen), torch.randint(0, 5, (8,), generator=gen)
    v, stats = torch.randn(8, 3, generator=gen), torch.zeros(4, 8, dtype=torch.float64)
    nan_x, inf_p, nan_v = x.clone(), p.clone(), v.clone()
    nan_x[2, 1], inf_p[3, 0], nan_v[5, 2] = float("nan"), float("inf"), float("nan")
    anchor, idml, nca = "proxy_anchor_loss", "idml_proxy_anchor_loss", "proxy_nca_loss"
    stats_op, grads_op = "proxy_nca_shard_row_stats", "proxy_nca_shard_loss_and_grads"
    return [
        (anchor, (x, p, y + 5, 0.1, 32.0)), (anchor, (x, p, y - 9, 0.1, 32.0)), (anchor, (x, p, y.float(), 0.1, 32.0)),
        (anchor, (x, p, y[:-1], 0.1, 32.0)), (anchor, (x, p[:, :3], y, 0.1, 32.0)), (anchor, (x[:0], p, y[:0], 0.1, 32.0)),
        (anchor, (x[0], p, y, 0.1, 32.0)), (anchor, (x, p[0], y, 0.1, 32.0)), (anchor, (x, p, y[:, None], 0.1, 32.0)),
        (anchor, (x.long(), p, y, 0.1, 32.0)), (anchor, (x, p.int(), y, 0.1, 32.0)), (anchor, (x, p[:0], y, 0.1, 32.0)),
        (anchor, (x[:, :0], p[:, :0], y, 0.1, 32.0)), (anchor, (nan_x, p, y, 0.1, 32.0)), (anchor, (x, inf_p, y, 0.1, 32.0)),
        (anchor, (nan_x, inf_p, y + 1, 0.1, 32.0)),
        (anchor, (x, p, y, float("nan"), 32.0)), (anchor, (x, p, y, 0.1, 0.0)), (anchor, (x, p, y, 0.1, float("inf"))),
        (anchor, (x, p, y, 0.1, 32.0, torch.zeros(4, 5, dtype=torch.long))), (anchor, (x, p, y, 0.1, 32.0, torch.zeros(3, 5))),
        (anchor, (x, p[:3], y, 0.1, 32.0, torch.zeros(4, 3), False, 0, 5)),
        (anchor, (x, p, y, 0.1, 32.0, None, False, 3, 6)), (anchor, (x, p, y, 0.1, 32.0, None, False, -1, 6)),
        (anchor, (x, p, y + 3, 0.1, 32.0, None, False, 0, 7)),
        (idml, (x, v[0], p, y, 0.1, 32.0)), (idml, (x, v.long(), p, y, 0.1, 32.0)), (idml, (x, v[:5], p, y, 0.1, 32.0)),
        (idml, (x, v[:, :0], p, y, 0.1, 32.0)), (idml, (x, nan_v, p, y, 0.1, 32.0)), (idml, (x, v, inf_p, y, 0.1, 32.0)),
        (idml, (x, v, p, y, -float("inf"), 32.0)), (idml, (x, v, p[:2], y, 0.1, 32.0, 4, 5)),
        (nca, (x, p, y, -1.0, 0.0, False)), (nca, (x, p, y, float("inf"), 0.0, False)), (nca, (x, p, y, 18.0, 1.0, False)),
        (nca, (x, p, y, 18.0, float("nan"), False)), (nca, (x, p, y, 18.0, 0.1, True)), (nca, (x, p[:1], y * 0, 18.0, 0.0, True)),
        (nca, (x, p[:1], y * 0, 18.0, 0.1, False)), (nca, (x, inf_p, y, 18.0, 0.0, False)), (nca, (x, p, y + 1, 18.0, 0.0, False)),
        (stats_op, (x, p, y, 18.0, False, 1, 5)), (stats_op, (x, p, y + 2, 18.0, False, 0, 6)),
        (stats_op, (nan_x, p, y, 18.0, False, 0, 6)), (stats_op, (x, p[:1], y * 0, 18.0, True, 0, 1)),
        (grads_op, (x, p, y, stats.float(), 18.0, 0.0, False, 0, 6)), (grads_op, (x, p, y, stats[:, :3], 18.0, 0.0, False, 0, 6)),
        (grads_op, (x, p, y, stats, 18.0, 0.0, True, 0, 1)), (grads_op, (x, p, y + 4, stats + 1, 18.0, 0.0, False, 0, 6)),
        (grads_op, (nan_x, p, y, stats + 1, 18.0, 0.1, False, 0, 6)),
    ]


def _raised(fn, args):
    with pytest.raises((ValueError, TypeError)) as error:
        fn(*args)
    return type(error.value), str(error.value)


@pytest.mark.parametrize("index", range(len(_bad_inputs())))
def test_fallback_raises_the_cpu_ops_errors(index):
    name, args = _bad_inputs()[index]
    assert _raised(fallback.OPS[name], args) == _raised(getattr(ops, name), args)


def test_device_mismatch_errors():
    """The device checks (unreachable with CPU tensors through the dispatcher) word the C++ ones."""
    x, p, labels = softmax_inputs(torch.float32)
    other = torch.device("meta")
    with pytest.raises(ValueError, match=r"proxy_nca_loss: embeddings, proxies and labels must be on one device, "
                                         r"got cpu, meta and cpu"):
        fallback.proxy_nca_loss(x, p.to(other), labels, 18.0, 0.0, False)
    with pytest.raises(ValueError, match=r"proxy_anchor_loss: isa_class_params must be on cpu, got meta"):
        fallback.proxy_anchor_loss(x, p, labels, 0.1, 32.0, torch.zeros(4, CLASSES, device=other))
    with pytest.raises(ValueError, match=r"uncertainty must be on the embeddings' device cpu, got meta"):
        fallback.idml_proxy_anchor_loss(x, x.to(other), p, labels, 0.1, 32.0)


@pytest.mark.parametrize("name", _ops.OP_NAMES)
def test_every_op_has_a_fallback_with_its_schema(name):
    """Each op's fallback takes the schema's arguments, in order, with its defaults (a new schema
    argument fails here until the fallback has it too)."""
    import inspect

    schema = getattr(ops, name).default._schema
    parameters = [param for param in inspect.signature(fallback.OPS[name]).parameters.values()
                  if param.kind is param.POSITIONAL_OR_KEYWORD]
    assert [param.name for param in parameters] == [arg.name for arg in schema.arguments]
    for param, arg in zip(parameters, schema.arguments):
        assert (param.default is param.empty) == (not arg.has_default_value())
        if arg.has_default_value():
            assert param.default == arg.default_value
    assert set(fallback.OPS) == set(_ops.OP_NAMES)


def test_every_op_has_a_cuda_kernel():
    """The compiled kernels or, without them, the registered fallback: CUDA tensors never meet a missing kernel."""
    for name in _ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dmlfast::{name}", "CUDA")


def test_build_info_says_which_cuda_path_runs():
    info = dmlfast.build_info()
    expected = "kernels" if info["cuda_kernels"] else "fallback" if torch.backends.cuda.is_built() else "none"
    assert info["cuda_path"] == expected


def test_registered_kernel_warns_once_naming_the_fix(monkeypatch):
    monkeypatch.setattr(fallback, "_warned", False)
    kernel = fallback._as_cuda_kernel(fallback.proxy_nca_loss)
    x, p, labels = softmax_inputs(torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = kernel(x, p, labels, 18.0, 0.0, False)
        second = kernel(x, p, labels, 18.0, 0.0, False)
    assert len(caught) == 1
    assert "built without its CUDA kernels" in str(caught[0].message)
    assert "pip install -v --force-reinstall --no-deps ." in str(caught[0].message)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------------------------------------
# On a GPU: the fallback on CUDA tensors, and the ops as users call them.

@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_cuda_fallback_matches_cpu_op(name, dtype):
    op, args, ref_fn, inputs, others = case(name, dtype)
    on_gpu = fallback.OPS[op](*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args), tile_columns=5)
    expected = getattr(ops, op)(*args)
    for g, e in zip(on_gpu, expected):
        assert g.device.type == "cuda" and g.dtype == e.dtype
    assert_close([g.cpu() for g in on_gpu], expected, CPU_OP_TOL[dtype])


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_fallback_at_scale_matches_cpu_op(dtype):
    """SOP-like rows over several default GPU tiles (tile = 2^24 / (B + D) = 21,845 columns)."""
    gen = torch.Generator().manual_seed(3)
    x, p = torch.randn(256, 512, generator=gen).to(dtype), torch.randn(50_000, 512, generator=gen).to(dtype)
    labels = torch.randint(0, 50_000, (256,), generator=gen)
    for op, extra in (("proxy_anchor_loss", (0.1, 32.0)), ("proxy_nca_loss", (18.0, 0.1, False))):
        on_gpu = fallback.OPS[op](x.cuda(), p.cuda(), labels.cuda(), *extra)
        assert_close([g.cpu() for g in on_gpu], getattr(ops, op)(x, p, labels, *extra), CPU_OP_TOL[dtype])


@pytest.mark.cuda
@requires_cuda
def test_cuda_ops_without_kernels_run_the_fallback_with_autograd():
    """Only for a build without CUDA kernels: the ops on CUDA tensors warn once and train."""
    if dmlfast.build_info()["cuda_path"] != "fallback":
        pytest.skip("dmlfast was built with its CUDA kernels")
    loss_fn = dmlfast.ProxyNCALoss(num_classes=50, embedding_size=16).cuda()
    x = torch.randn(32, 16, device="cuda", requires_grad=True)
    labels = torch.randint(0, 50, (32,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(x.bfloat16(), labels)
    loss.backward()
    cpu_x = x.detach().cpu().bfloat16().requires_grad_()
    cpu_loss = dmlfast.functional.proxy_nca_loss(cpu_x, loss_fn.proxies.detach().cpu(), labels.cpu())
    assert relative_error(loss.cpu(), cpu_loss) <= 2e-2
    assert x.grad is not None and loss_fn.proxies.grad is not None


def test_fallback_value_check_modes():
    """As the C++ op: deferred returns the flags unread (label flag 0 here), off reads nothing,
    immediate raises the C++ op's message; the row statistics refuse deferral."""
    x, p, labels = softmax_inputs(torch.float32)
    bad = labels + CLASSES
    deferred = fallback.proxy_anchor_loss(x, p, bad, 0.1, 32.0, None, False, 0, -1, 2)
    assert deferred[-1].tolist() == [0, 1, 1, 1]
    assert fallback.proxy_nca_loss(x, p, bad, 18.0, 0.0, False, 0)[-1].dtype == torch.int32
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {CLASSES}\)"):
        fallback.proxy_nca_loss(x, p, bad, 18.0, 0.0, False, 1)
    with pytest.raises(ValueError, match="value_checks must be 0 or 1"):
        fallback.proxy_nca_shard_row_stats(x, p, labels, 18.0, False, 0, CLASSES, 2)
