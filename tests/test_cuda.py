"""CUDA kernels against the CPU op on the same inputs. Skipped with a reason when no GPU is visible."""
import pytest
import torch

import dmlfast
from dmlfast import _ops, functional
from conftest import relative_error, requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

CASES = [
    (functional.proxy_anchor_loss, {}),
    (functional.proxy_nca_loss, {}),
    (functional.proxy_nca_loss, {"smoothing": 0.1}),
    (functional.proxy_nca_loss, {"exclude_positive": True}),
]


def run(fn, x, p, labels, kwargs):
    x = x.detach().requires_grad_()
    p = p.detach().requires_grad_()
    loss = fn(x, p, labels, **kwargs)
    return (loss, *torch.autograd.grad(loss, (x, p)))


def assert_gpu_matches_cpu(on_cpu, on_gpu, dtype):
    """Each GPU output is on CUDA, has the CPU output's dtype and matches it to the dtype's tolerance."""
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for cpu_value, gpu_value in zip(on_cpu, on_gpu):
        assert gpu_value.device.type == "cuda" and gpu_value.dtype == cpu_value.dtype
        assert relative_error(gpu_value.cpu(), cpu_value) <= tol


def test_cuda_kernels_were_built():
    assert dmlfast.build_info()["cuda_kernels"], "a GPU is visible but dmlfast was built without CUDA kernels"


# (B, C, D): tiny, CUB, several GPU tiles (tile = 2^24 / (B + D) columns), D not a multiple of 8.
@pytest.mark.parametrize("shape", [(1, 1, 8), (128, 100, 512), (256, 50_000, 512), (33, 777, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cuda_matches_cpu(case, dtype, shape):
    fn, kwargs = CASES[case]
    batch, num_classes, dim = shape
    if num_classes < 2 and kwargs:
        pytest.skip("needs two classes")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(batch, dim, generator=gen).to(dtype)
    p = torch.randn(num_classes, dim, generator=gen).to(dtype)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    on_cpu = run(fn, x, p, labels, kwargs)
    on_gpu = run(fn, x.cuda(), p.cuda(), labels.cuda(), kwargs)
    assert_gpu_matches_cpu(on_cpu, on_gpu, dtype)


MARGIN_CASES = [
    (functional.cosface_loss, {}, 1),
    (functional.arcface_loss, {}, 1),
    (functional.arcface_loss, {"sub_centers": 3}, 3),
    (functional.soft_triple_loss, {"centers_per_class": 10}, 10),
]


@pytest.mark.parametrize("reuse_bytes", [-1, 0, 400_000], ids=["all_kept", "none_kept", "some_kept"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", range(len(MARGIN_CASES)))
def test_cuda_margin_losses_match_cpu(case, dtype, reuse_bytes):
    """CosFace, ArcFace, Sub-center ArcFace and SoftTriple over tiles of 600 columns (rounded down to
    whole classes: 5 to 50 tiles), pass 2 reusing every tile of S, none, or the first 1 or 2 that
    400,000 bytes hold; the CPU runs the same plan."""
    fn, kwargs, centers = MARGIN_CASES[case]
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(64, 96, generator=gen).to(dtype)
    p = torch.randn(3000 * centers, 96, generator=gen).to(dtype)
    labels = torch.randint(0, 3000, (64,), generator=gen)
    _ops._C._override_tile_plan(tile_columns=600, reuse_bytes=reuse_bytes)
    try:
        on_cpu = run(fn, x, p, labels, kwargs)
        on_gpu = run(fn, x.cuda(), p.cuda(), labels.cuda(), kwargs)
    finally:
        _ops._C._override_tile_plan()
    assert_gpu_matches_cpu(on_cpu, on_gpu, dtype)


def test_cuda_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=gen).cuda()
    p = torch.randn(30_000, 512, generator=gen).cuda()
    labels = torch.randint(0, 30_000, (256,), generator=gen).cuda()
    for fn, kwargs in CASES:
        first, second = run(fn, x, p, labels, kwargs), run(fn, x, p, labels, kwargs)
        assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_cuda_errors():
    x, p = torch.randn(8, 4, device="cuda"), torch.randn(5, 4, device="cuda")
    labels = torch.randint(0, 5, (8,), device="cuda")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        functional.proxy_anchor_loss(x, p, labels + 5)
    x[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"embeddings contain NaN or Inf \(first bad row: 1\)"):
        functional.proxy_nca_loss(x, p, labels)
    with pytest.raises(ValueError, match="one device"):
        functional.proxy_anchor_loss(x.cpu(), p, labels)


def test_cuda_compile_training_step():
    loss_fn = dmlfast.ProxyAnchorLoss(num_classes=100, embedding_size=64).cuda()
    model = torch.nn.Linear(32, 64).cuda()
    step = torch.compile(lambda inputs, targets: loss_fn(model(inputs), targets), fullgraph=True)
    inputs, targets = torch.randn(64, 32, device="cuda"), torch.randint(0, 100, (64,), device="cuda")
    loss = step(inputs, targets)
    loss.backward()
    expected = functional.proxy_anchor_loss(model(inputs).detach(), loss_fn.proxies.detach(), targets)
    torch.testing.assert_close(loss.detach(), expected)
    assert loss_fn.proxies.grad is not None and model.weight.grad is not None


def isa_class_vectors(num_classes, generator):
    """Per-class s̄, θ, w, easy-negative weight (proxy_isa_loss's keyword arguments) in the ranges
    a trained Proxy-ISA run produces."""
    center = 0.1 + 0.2 * torch.rand(num_classes, generator=generator)
    threshold = center - 0.4 * torch.rand(num_classes, generator=generator)
    weight = 0.1 + 0.2 * torch.rand(num_classes, generator=generator)
    easy = 1.0 / torch.randint(1, 50, (num_classes,), generator=generator).double()
    return {"class_center": center, "class_threshold": threshold, "class_weight": weight, "easy_negative_weight": easy}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_isa_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(1)
    x, p = torch.randn(128, 64, generator=gen, dtype=dtype), torch.randn(3_000, 64, generator=gen, dtype=dtype)
    labels = torch.randint(0, 3_000, (128,), generator=gen)
    params = isa_class_vectors(3_000, gen)
    on_cpu = run(functional.proxy_isa_loss, x, p, labels, params)
    gpu_params = {name: vector.cuda() for name, vector in params.items()}
    on_gpu = run(functional.proxy_isa_loss, x.cuda(), p.cuda(), labels.cuda(), gpu_params)
    assert_gpu_matches_cpu(on_cpu, on_gpu, dtype)


def idml_run(x, v, p, labels):
    x, v, p = (t.detach().requires_grad_() for t in (x, v, p))
    loss = functional.idml_proxy_anchor_loss(x, v, p, labels)
    return (loss, *torch.autograd.grad(loss, (x, v, p)))


def idml_case(batch, num_classes, dim, dtype, seed=4):
    """Unit embeddings, raw proxies of norm ~0.5 and uncertainty of varied norm (g spread over (0, 1))."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    p = 0.5 * torch.randn(num_classes, dim, generator=gen) / dim ** 0.5
    v = torch.randn(batch, dim, generator=gen) * torch.rand(batch, 1, generator=gen) / dim ** 0.5
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return x.to(dtype), v.to(dtype), p.to(dtype), labels


# (B, C, D): tiny, CUB, several GPU tiles, D not a multiple of 8.
@pytest.mark.parametrize("shape", [(1, 1, 8), (120, 100, 512), (256, 50_000, 512), (33, 777, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_idml_matches_cpu(dtype, shape):
    x, v, p, labels = idml_case(*shape, dtype)
    on_cpu = idml_run(x, v, p, labels)
    on_gpu = idml_run(x.cuda(), v.cuda(), p.cuda(), labels.cuda())
    assert_gpu_matches_cpu(on_cpu, on_gpu, dtype)


def test_cuda_idml_is_deterministic_and_checks_values():
    x, v, p, labels = (t.cuda() for t in idml_case(256, 30_000, 512, torch.float32))
    first, second = idml_run(x, v, p, labels), idml_run(x, v, p, labels)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    v[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"uncertainty contains NaN or Inf \(first bad row: 3\)"):
        functional.idml_proxy_anchor_loss(x, v, p, labels)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 30000\)"):
        functional.idml_proxy_anchor_loss(x, v.nan_to_num(posinf=1.0), p, labels + 30_000)


def test_cuda_runs_under_deterministic_algorithms():
    gen = torch.Generator().manual_seed(2)
    x, p = torch.randn(64, 32, generator=gen).cuda(), torch.randn(500, 32, generator=gen).cuda()
    labels = torch.randint(0, 500, (64,), generator=gen).cuda()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for fn, kwargs in CASES:
            first, second = run(fn, x, p, labels, kwargs), run(fn, x, p, labels, kwargs)
            assert all(torch.equal(a, b) for a, b in zip(first, second))
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("gallery", [False, True], ids=["self", "query-gallery"])
def test_cuda_evaluation_matches_cpu(gallery):
    from dmlfast.evaluation import retrieval_metrics

    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 40, (600,), generator=gen)
    embeddings = torch.randn(40, 16, generator=gen)[labels] + 0.8 * torch.randn(600, 16, generator=gen)
    kwargs = dict(ks=(1, 4, 16), backend="torch", metrics=("recall", "map@r", "r_precision"))
    if gallery:
        kwargs.update(reference=embeddings[300:], reference_labels=labels[300:])
        embeddings, labels = embeddings[:300], labels[:300]
    on_cpu = retrieval_metrics(embeddings, labels, **kwargs)
    if gallery:
        kwargs.update(reference=kwargs["reference"].cuda())
    on_gpu = retrieval_metrics(embeddings.cuda(), labels, **kwargs)
    assert on_gpu == on_cpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_class_shard_ops_match_cpu(dtype):
    """The sharded ops (a middle shard of 30,000 of 100,000 classes, spanning several GPU tiles)."""
    ops = torch.ops.dmlfast
    x, v, p, labels = idml_case(256, 30_000, 512, dtype)
    labels = torch.randint(0, 100_000, (256,), generator=torch.Generator().manual_seed(5))
    labels[:64] = 40_000 + labels[:64] % 30_000  # a quarter of the batch in this shard
    shard = (40_000, 100_000)

    def outputs(device):
        xs, vs, ps, ys = (t.to(device) for t in (x, v, p, labels))
        stats = ops.proxy_nca_shard_row_stats(xs, ps, ys, 18.0, False, *shard)
        stats[0] = stats[0].clamp_min(0.0)  # as if reduced with other shards: a finite max everywhere
        stats[1] = stats[1] + 1.0
        return (*ops.proxy_anchor_loss(xs, ps, ys, 0.1, 32.0, None, False, *shard),
                *ops.idml_proxy_anchor_loss(xs, vs, ps, ys, 0.1, 32.0, *shard),
                stats, *ops.proxy_nca_shard_loss_and_grads(xs, ps, ys, stats, 18.0, 0.1, False, *shard))

    assert_gpu_matches_cpu(outputs("cpu"), outputs("cuda"), dtype)


# ---------------------------------------------------------------------------------------------
# The GPU fast path (docs/losses.md §7.1): precision of the low-precision and TF32 GEMMs, value
# checks deferred to the backward, and a whole step captured in a CUDA graph.

def reference_run(fn, x, p, labels):
    x, p = x.double().detach().requires_grad_(), p.double().detach().requires_grad_()
    loss = fn(x, p, labels)
    return (loss, *torch.autograd.grad(loss, (x, p)))


@pytest.mark.parametrize("name", ["proxy_anchor_loss", "proxy_nca_loss"])
@pytest.mark.parametrize("classes", [100, 30_000])
def test_cuda_bf16_autocast_within_tolerance_of_float64(name, classes):
    """bf16 embeddings (autocast) and float32 proxies: bf16 tensor-core GEMMs, float32 accumulation."""
    gen = torch.Generator().manual_seed(11)
    x, p = torch.randn(256, 512, generator=gen), torch.randn(classes, 512, generator=gen)
    labels = torch.randint(0, classes, (256,), generator=gen)
    x_bf16 = x.to(torch.bfloat16)
    got = run(getattr(functional, name), x_bf16.cuda(), p.cuda(), labels.cuda(), {})
    want = reference_run(getattr(dmlfast.reference, name), x_bf16, p, labels)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for a, b in zip(got, want):
        assert relative_error(a.cpu(), b) <= 2e-2


@pytest.mark.parametrize("name", ["proxy_anchor_loss", "proxy_nca_loss"])
def test_cuda_float32_precisions(name):
    """float32 at "highest" matches float64 to 1e-6 (loss) / 2e-6 (gradients); TF32 ("high") to 2e-2."""
    gen = torch.Generator().manual_seed(12)
    x, p = torch.randn(256, 512, generator=gen), torch.randn(20_000, 512, generator=gen)
    labels = torch.randint(0, 20_000, (256,), generator=gen)
    want = reference_run(getattr(dmlfast.reference, name), x, p, labels)
    before = torch.get_float32_matmul_precision()
    try:
        for precision, tol in (("highest", 2e-6), ("high", 2e-2)):
            torch.set_float32_matmul_precision(precision)
            got = run(getattr(functional, name), x.cuda(), p.cuda(), labels.cuda(), {})
            for a, b in zip(got, want):
                assert relative_error(a.cpu(), b) <= tol, precision
    finally:
        torch.set_float32_matmul_precision(before)


def test_cuda_value_checks_are_deferred_to_the_backward():
    x = torch.randn(8, 4, device="cuda", requires_grad=True)
    p = torch.randn(5, 4, device="cuda", requires_grad=True)
    labels = torch.randint(0, 5, (8,), device="cuda")
    loss = functional.proxy_anchor_loss(x, p, labels + 5)  # the forward does not read the flags
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        loss.backward()
    assert x.grad is None and p.grad is None


@pytest.mark.parametrize("loss_name", ["ProxyAnchorLoss", "ProxyNCALoss"])
def test_cuda_graph_captures_forward_and_backward(loss_name):
    """With value checks off nothing reads the device back: a whole step is captured and replayed."""
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 64).cuda()
    loss_fn = getattr(dmlfast, loss_name)(num_classes=3_000, embedding_size=64).cuda()
    inputs = torch.randn(128, 32, device="cuda")
    labels = torch.randint(0, 3_000, (128,), device="cuda")
    params = [model.weight, model.bias, loss_fn.proxies]

    def step():
        loss = loss_fn(model(inputs), labels)
        loss.backward()
        return loss

    with dmlfast.value_checks(False):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                for t in params:
                    t.grad = None
                step()
        torch.cuda.current_stream().wait_stream(side)
        for t in params:
            t.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured_loss = step()
        inputs.copy_(torch.randn(128, 32, device="cuda"))
        labels.copy_(torch.randint(0, 3_000, (128,), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        replayed = [captured_loss.clone()] + [t.grad.clone() for t in params]
    for t in params:  # the same step eagerly (no optimizer step: the parameters are unchanged)
        t.grad = None
    expected = [step().detach()] + [t.grad for t in params]
    for a, b in zip(replayed, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
