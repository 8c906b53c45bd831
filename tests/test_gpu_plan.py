"""The GPU's tile plan, value checks and backward, run on the CPU (docs/losses.md §7).

The CUDA kernels are the thread functions of csrc/proxy_loss_math.h; the CPU walks the same launch
grids. On the GPU the drivers choose another plan than on the CPU (row-major tiles, 32-row groups,
32-column softmax slices merged 32 at a time, low-precision GEMMs under autocast). Forcing that
plan here (dmlfast._C._override_tile_plan, with small sizes so that every boundary is crossed)
runs the GPU's index arithmetic and epilogues in CI, against the float64 reference.
"""
import pytest
import torch

import dmlfast
from dmlfast import _ops, functional, reference
from conftest import relative_error

# Small plans that cross every boundary at B = 37, C = 50: several tiles, a partial last tile and
# group, softmax slices merged over two tree levels.
SMALL_GPU_PLAN = {"tile_columns": 7, "rows_per_group": 5, "slice_columns": 3, "merge_fan_in": 2, "column_major": 0,
                  "finish_chunk": 4, "keep_exponentials": 0, "classes_per_thread": 1}
# The GPU's own parameters (csrc/tiles.cpp), tiles shrunk so that C = 3000 spans several.
GPU_PLAN = {"tile_columns": 1024, "rows_per_group": 32, "slice_columns": 32, "merge_fan_in": 32, "column_major": 0,
            "finish_chunk": 4, "keep_exponentials": 0, "classes_per_thread": 1}


@pytest.fixture
def tile_plan():
    """Set the op's tile plan for one test: tile_plan(**fields); restored afterwards."""
    def override(**fields):
        _ops._C._override_tile_plan(**fields)

    yield override
    _ops._C._override_tile_plan()


def isa_kwargs(num_classes, dtype):
    gen = torch.Generator().manual_seed(5)
    return {
        "class_center": (0.2 * torch.rand(num_classes, generator=gen)).to(dtype),
        "class_threshold": (-0.2 * torch.rand(num_classes, generator=gen)).to(dtype),
        "class_weight": torch.full((num_classes,), 0.18, dtype=dtype),
        "easy_negative_weight": torch.full((num_classes,), 0.01, dtype=dtype),
    }


CASES = {
    "proxy_anchor": lambda C: (functional.proxy_anchor_loss, reference.proxy_anchor_loss, {}),
    "proxy_isa": lambda C: (functional.proxy_isa_loss, reference.proxy_isa_loss, isa_kwargs(C, torch.float32)),
    "proxy_nca": lambda C: (functional.proxy_nca_loss, reference.proxy_nca_loss, {}),
    "nca_smoothing": lambda C: (functional.proxy_nca_loss, reference.proxy_nca_loss, {"smoothing": 0.1}),
    "nca_classic": lambda C: (functional.proxy_nca_loss, reference.proxy_nca_loss, {"exclude_positive": True}),
}


def inputs(batch, num_classes, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen)
    p = torch.randn(num_classes, dim, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    labels[:4] = torch.tensor([0, num_classes - 1, 6, 7]).clamp(max=num_classes - 1)  # targets at tile boundaries
    return x, p, labels


def value_and_grads(fn, tensors, labels, kwargs):
    tensors = [t.detach().requires_grad_() for t in tensors]
    loss = fn(*tensors, labels, **kwargs)
    return (loss, *torch.autograd.grad(loss, tensors))


def assert_matches_reference(name, x, p, labels, tol):
    fused, ref, kwargs = CASES[name](p.shape[0])
    got = value_and_grads(fused, (x, p), labels, kwargs)
    ref_kwargs = {k: v.double() for k, v in kwargs.items()} if name == "proxy_isa" else kwargs
    want = value_and_grads(ref, (x.double(), p.double()), labels, ref_kwargs)
    assert got[1].dtype == x.dtype and got[2].dtype == p.dtype
    for a, b in zip(got, want):
        assert relative_error(a, b) <= tol


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("plan", ["small", "gpu"])
def test_gpu_plan_matches_reference(tile_plan, name, plan):
    if plan == "small":
        tile_plan(**SMALL_GPU_PLAN)
        x, p, labels = inputs(37, 50, 19)
    else:
        tile_plan(**GPU_PLAN)
        x, p, labels = inputs(70, 3000, 24)
    assert_matches_reference(name, x, p, labels, 2e-6)


SOFTMAX_CASES = [name for name in CASES if name.startswith("nca") or name == "proxy_nca"]


@pytest.mark.parametrize("name", SOFTMAX_CASES)
@pytest.mark.parametrize("keep_exponentials", [0, 1])
@pytest.mark.parametrize("slice_columns", [0, 3])
@pytest.mark.parametrize("classes_per_thread", [1, 3])
@pytest.mark.parametrize("reuse_bytes", [-1, 0, 3000], ids=["all_kept", "none_kept", "some_kept"])
def test_softmax_plan_variants_match_reference(tile_plan, name, keep_exponentials, slice_columns, classes_per_thread,
                                               reuse_bytes):
    """Pass 1 keeping its exponentials (the CPU's plan) or not (the GPU's), over whole rows or strided
    slices; pass 2 one class per thread (the GPU) or runs of classes split around each row's target
    (the CPU, here 3 classes so that targets fall on runs' first, middle and last classes), reusing
    all of pass 1's 8 tiles of S, none, or the first 2 that 3000 bytes hold."""
    tile_plan(tile_columns=7, rows_per_group=5, slice_columns=slice_columns, merge_fan_in=2,
              keep_exponentials=keep_exponentials, classes_per_thread=classes_per_thread, reuse_bytes=reuse_bytes)
    x, p, labels = inputs(37, 50, 19)
    assert_matches_reference(name, x, p, labels, 2e-6)


ANCHOR_CASES = ["proxy_anchor", "proxy_isa"]


@pytest.mark.parametrize("name", ANCHOR_CASES + ["idml"])
@pytest.mark.parametrize("column_major", [0, 1])
@pytest.mark.parametrize("rows_per_group", [5, 150])
def test_anchor_plan_variants_match_reference(tile_plan, name, column_major, rows_per_group):
    """The anchor epilogue on tiles stored by row (the GPU's walk, strided) or by column (the CPU's:
    contiguous groups, exponentials in runs of 64), in groups of 5 rows or whole 150-row columns
    (runs of 64, 64 and 22 entries)."""
    tile_plan(tile_columns=7, rows_per_group=rows_per_group, column_major=column_major, finish_chunk=4)
    x, p, labels = inputs(150, 50, 19)
    if name != "idml":
        assert_matches_reference(name, x, p, labels, 2e-6)
        return
    x = torch.nn.functional.normalize(x, dim=1)
    v = torch.randn(150, 6, generator=torch.Generator().manual_seed(3))
    got = value_and_grads(functional.idml_proxy_anchor_loss, (x, v, p), labels, {})
    want = value_and_grads(reference.idml_proxy_anchor_loss, (x.double(), v.double(), p.double()), labels, {})
    for a, b in zip(got, want):
        assert relative_error(a, b) <= 2e-6


@pytest.mark.parametrize("name", list(CASES))
def test_low_precision_gemms_match_reference(tile_plan, name):
    """bf16 embeddings with float32 proxies, as under autocast: the GEMMs read bf16 (emulated on the
    CPU from the same rounded operands), the epilogues write G' in bf16, within bf16 tolerance."""
    tile_plan(**SMALL_GPU_PLAN, low_precision_gemm=1)
    x, p, labels = inputs(37, 50, 19)
    assert_matches_reference(name, x.to(torch.bfloat16), p, labels, 2e-2)


@pytest.mark.parametrize("low_precision", [0, 1])
def test_idml_on_gpu_plan(tile_plan, low_precision):
    tile_plan(**SMALL_GPU_PLAN, low_precision_gemm=low_precision)
    x, p, labels = inputs(37, 50, 19)
    x = torch.nn.functional.normalize(x, dim=1)
    v = torch.randn(37, 6, generator=torch.Generator().manual_seed(3))
    if low_precision:
        x = x.to(torch.bfloat16)
    got = value_and_grads(functional.idml_proxy_anchor_loss, (x, v, p), labels, {})
    want = value_and_grads(reference.idml_proxy_anchor_loss, (x.double(), v.double(), p.double()), labels, {})
    for a, b in zip(got, want):
        assert relative_error(a, b) <= (2e-2 if low_precision else 2e-6)


def test_sharded_softmax_on_gpu_plan(tile_plan):
    """Both softmax passes over two class shards add up to the unsharded loss and gradients."""
    tile_plan(**SMALL_GPU_PLAN)
    x, p, labels = inputs(37, 50, 19)
    x, p = x.double(), p.double()
    ops = torch.ops.dmlfast
    expected = ops.proxy_nca_loss(x, p, labels, 18.0, 0.1, False)
    shards = [(0, 23), (23, 27)]
    stats = [ops.proxy_nca_shard_row_stats(x, p[f:f + n], labels, 18.0, False, f, 50) for f, n in shards]
    stacked = torch.stack(stats)
    row_max = stacked[:, 0].max(0).values
    sums = (stacked[:, 1] * torch.exp(stacked[:, 0] - row_max)).sum(0)
    reduced = torch.stack([row_max, sums, stacked[:, 2].sum(0), stacked[:, 3].sum(0)])
    parts = [ops.proxy_nca_shard_loss_and_grads(x, p[f:f + n], labels, reduced, 18.0, 0.1, False, f, 50)
             for f, n in shards]
    assert relative_error(parts[0][0], expected[0]) <= 1e-12
    assert relative_error(parts[0][1] + parts[1][1], expected[1]) <= 1e-12
    assert relative_error(torch.cat([parts[0][2], parts[1][2]]), expected[2]) <= 1e-12


def test_plan_override_is_restored(tile_plan):
    """Default plan and a forced plan give the same float64 results (the plan changes only the work's cut)."""
    x, p, labels = inputs(37, 50, 19)
    x, p = x.double(), p.double()
    default = torch.ops.dmlfast.proxy_anchor_loss(x, p, labels, 0.1, 32.0)
    tile_plan(**SMALL_GPU_PLAN)
    forced = torch.ops.dmlfast.proxy_anchor_loss(x, p, labels, 0.1, 32.0)
    for a, b in zip(default[:3], forced[:3]):
        assert relative_error(a, b) <= 1e-12


# ---------------------------------------------------------------------------------------------
# Value checks: immediate on the CPU; deferred to the backward where _ops defers them (CUDA), here
# forced on the CPU; off.

@pytest.fixture
def deferred_on_cpu(monkeypatch):
    monkeypatch.setattr(_ops, "_DEFERRED_DEVICES", ("cpu",))


@pytest.mark.parametrize("fn", [functional.proxy_anchor_loss, functional.proxy_nca_loss])
def test_deferred_checks_raise_in_backward(deferred_on_cpu, fn):
    x, p, labels = inputs(8, 5, 4)
    x.requires_grad_()
    loss = fn(x, p, labels + 5)  # no error yet: the flags are not read in the forward
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\) \(num_classes = proxies.shape\[0\]\), got min 5"):
        loss.backward()
    assert x.grad is None


def test_deferred_nan_raises_before_any_gradient(deferred_on_cpu):
    x, p, labels = inputs(8, 5, 4)
    p[3, 1] = float("nan")
    p.requires_grad_()
    loss = functional.proxy_nca_loss(x, p, labels)
    with pytest.raises(ValueError, match=r"proxies contain NaN or Inf \(first bad row: 3\)"):
        loss.backward()
    assert p.grad is None


def test_deferred_idml_uncertainty(deferred_on_cpu):
    x, p, labels = inputs(8, 5, 4)
    v = torch.randn(8, 3)
    v[6, 0] = float("inf")
    v.requires_grad_()
    loss = functional.idml_proxy_anchor_loss(x, v, p, labels)
    with pytest.raises(ValueError, match=r"uncertainty contains NaN or Inf \(first bad row: 6\)"):
        loss.backward()


def test_deferred_checks_without_gradients_are_immediate(deferred_on_cpu):
    x, p, labels = inputs(8, 5, 4)
    with pytest.raises(ValueError, match="labels must be in"):
        functional.proxy_anchor_loss(x, p, labels + 5)
    x.requires_grad_()
    with torch.no_grad(), pytest.raises(ValueError, match="labels must be in"):
        functional.proxy_anchor_loss(x, p, labels - 1)


def test_deferred_valid_inputs_match_immediate(deferred_on_cpu):
    x, p, labels = inputs(37, 50, 19)
    deferred = value_and_grads(functional.proxy_anchor_loss, (x, p), labels, {})
    with torch.no_grad():
        immediate = torch.ops.dmlfast.proxy_anchor_loss(x, p, labels, 0.1, 32.0)
    for a, b in zip(deferred, immediate[:3]):
        assert torch.equal(a, b)


def test_checks_off_reads_nothing_and_never_reads_out_of_bounds():
    x, p, labels = inputs(8, 5, 4)
    assert dmlfast.value_checks_enabled()
    with dmlfast.value_checks(False):
        assert not dmlfast.value_checks_enabled()
        loss = functional.proxy_anchor_loss(x, p, labels + 1000)  # clamped gathers, no error
        assert loss.shape == ()
        x_nan = x.clone()
        x_nan[0, 0] = float("nan")
        assert torch.isnan(functional.proxy_nca_loss(x_nan, p, labels))
        with pytest.raises(ValueError, match="one device|must be 2-D|one entry per embedding"):
            functional.proxy_anchor_loss(x, p, labels[:3])  # metadata checks stay
    assert dmlfast.value_checks_enabled()
    with pytest.raises(TypeError, match="enabled must be a bool, got int"):
        dmlfast.set_value_checks(1)


def test_value_checks_argument_is_checked():
    x, p, labels = inputs(8, 5, 4)
    with pytest.raises(ValueError, match=r"value_checks must be 0 \(off\), 1 \(immediate\) or 2 \(deferred\), got 3"):
        torch.ops.dmlfast.proxy_anchor_loss(x, p, labels, 0.1, 32.0, value_checks=3)
    with pytest.raises(ValueError, match="value_checks must be 0 or 1"):
        torch.ops.dmlfast.proxy_nca_shard_row_stats(x, p, labels, 18.0, False, 0, 5, 2)


def test_huge_finite_embeddings_are_normalized():
    """Norms are summed in float64: rows of 1e30 normalize like any other row."""
    x, p, labels = inputs(8, 5, 4)
    scaled = x.clone()
    scaled[2] *= 1e30
    assert torch.allclose(functional.proxy_anchor_loss(scaled, p, labels), functional.proxy_anchor_loss(x, p, labels))


def test_overflowing_norm_is_not_called_nan():
    x, p, labels = inputs(8, 5, 4)
    x[2] = 3e38
    with pytest.raises(ValueError, match=r"embeddings are finite, but the norm of row 2 overflows float32 "
                                         r"\(its largest entry is 3e\+38 in magnitude\)"):
        functional.proxy_anchor_loss(x, p, labels)
    p[1] = 1e20
    with pytest.raises(ValueError, match=r"proxies are finite, but the norm of row 1 overflows float32"):
        functional.proxy_nca_loss(x[:2], p, labels[:2])


# ---------------------------------------------------------------------------------------------
# The backward's scaling by the upstream gradient.

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_scale_unless_one(dtype):
    values = torch.randn(1000).to(dtype)
    kept = values.clone()
    _ops._C.scale_unless_one_(values, torch.tensor(1.0))
    assert torch.equal(values, kept)
    _ops._C.scale_unless_one_(values, torch.tensor(-2.5, dtype=torch.float64))
    assert torch.equal(values, (kept.double() * -2.5).to(dtype))


@pytest.mark.parametrize("name", ["proxy_anchor", "proxy_nca"])
def test_upstream_gradient_scales_the_gradients(name):
    fused = CASES[name](5)[0]
    x, p, labels = inputs(8, 5, 4)
    plain = value_and_grads(fused, (x, p), labels, {})
    x, p = x.requires_grad_(), p.requires_grad_()
    (fused(x, p, labels) * -3.0).backward()
    assert torch.allclose(x.grad, -3.0 * plain[1], rtol=1e-6, atol=0)
    assert torch.allclose(p.grad, -3.0 * plain[2], rtol=1e-6, atol=0)
