"""CosFace, ArcFace, Sub-center ArcFace and SoftTriple (docs/losses.md §9, §10): the fused softmax op
with K centers per class and a target margin, against the float64 reference, pytorch-metric-learning's
modules, on the GPU's tile plan, through gradcheck and opcheck (torch.compile: tests/test_ops.py), and class-sharded
(shards' ops summed, and 2 and 3 gloo processes) against the unsharded loss."""
import math

import pytest
import torch

import dmlfast
from conftest import relative_error, spawn_gloo_ranks
from dmlfast import _ops, functional, reference, sharded

ops = torch.ops.dmlfast
# float32: these losses scale cosines by 20-64, so a logit's rounding error is ~64 · 6e-8.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}
SMALL_GPU_PLAN = {"tile_columns": 7, "rows_per_group": 5, "slice_columns": 2, "merge_fan_in": 2, "column_major": 0,
                  "finish_chunk": 4, "keep_exponentials": 0, "classes_per_thread": 1}


def case(name):
    """(fused function, float64 reference, their keyword arguments, K)."""
    return {
        "cosface": (functional.cosface_loss, reference.cosface_loss, {}, {}, 1),
        "arcface": (functional.arcface_loss, reference.arcface_loss, {}, {"margin": math.radians(28.6)}, 1),
        "subcenter": (functional.arcface_loss, reference.arcface_loss, {"sub_centers": 3},
                      {"margin": math.radians(28.6), "sub_centers": 3}, 3),
        "softtriple": (functional.soft_triple_loss, reference.soft_triple_loss, {"centers_per_class": 4, "tau": 0.2},
                       {"centers_per_class": 4, "tau": 0.2}, 4),
        "softtriple_k1": (functional.soft_triple_loss, reference.soft_triple_loss, {"centers_per_class": 1},
                          {"centers_per_class": 1}, 1),
    }[name]


CASES = ["cosface", "arcface", "subcenter", "softtriple", "softtriple_k1"]


def inputs(batch, num_classes, dim, centers, pattern="random", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    p = torch.randn(num_classes * centers, dim, generator=gen, dtype=torch.float64)
    if pattern == "absent":
        labels = torch.randint(0, max(1, num_classes // 3), (batch,), generator=gen)
    else:
        labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return x.to(dtype), p, labels


def value_and_grads(fn, x, p, labels, **kwargs):
    x, p = x.detach().requires_grad_(), p.detach().requires_grad_()
    loss = fn(x, p, labels, **kwargs)
    return (loss, *torch.autograd.grad(loss, (x, p)))


def assert_matches_reference(name, x, p, labels, tol):
    fused, ref, kwargs, ref_kwargs, _ = case(name)
    got = value_and_grads(fused, x, p, labels, **kwargs)
    want = value_and_grads(ref, x.double(), p.double(), labels, **ref_kwargs)
    assert got[1].dtype == x.dtype and got[2].dtype == p.dtype
    for a, b in zip(got, want):
        assert relative_error(a, b) <= tol


@pytest.fixture
def tile_plan():
    yield _ops._C._override_tile_plan
    _ops._C._override_tile_plan()


# (B, C, D, label pattern): one sample, one class, absent classes, D not a multiple of 8, several CPU tiles.
SHAPES = [(1, 4, 8, "random"), (9, 1, 5, "random"), (24, 30, 13, "absent"), (64, 700, 24, "random")]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", CASES)
def test_matches_the_float64_reference(name, dtype, shape):
    batch, classes, dim, pattern = shape
    x, p, labels = inputs(batch, classes, dim, case(name)[4], pattern, dtype)
    assert_matches_reference(name, x, p.to(dtype), labels, TOL[dtype])


@pytest.mark.parametrize("name", CASES)
def test_bf16_embeddings_with_float32_proxies(name):
    x, p, labels = inputs(48, 40, 32, case(name)[4], dtype=torch.bfloat16)
    assert_matches_reference(name, x, p.float(), labels, TOL[torch.bfloat16])


@pytest.mark.parametrize("low_precision", [0, 1])
@pytest.mark.parametrize("name", CASES)
def test_gpu_plan_on_the_cpu(tile_plan, name, low_precision):
    """The GPU's plan with tiles of whole classes (7 columns rounded down to a multiple of K), slices
    merged over two levels, groups of 5 rows, low-precision GEMMs emulated."""
    tile_plan(**SMALL_GPU_PLAN, low_precision_gemm=low_precision)
    x, p, labels = inputs(37, 23, 19, case(name)[4], dtype=torch.bfloat16 if low_precision else torch.float32)
    assert_matches_reference(name, x, p.float(), labels, 2e-2 if low_precision else TOL[torch.float32])


@pytest.mark.parametrize("reuse_bytes", [-1, 0, 6000], ids=["all_kept", "none_kept", "some_kept"])
@pytest.mark.parametrize("keep_exponentials", [0, 1])
@pytest.mark.parametrize("classes_per_thread", [1, 2])
@pytest.mark.parametrize("name", CASES)
def test_cpu_plan_variants(tile_plan, name, keep_exponentials, classes_per_thread, reuse_bytes):
    """Pass 1 keeping e^{z - shift} or not, pass 2 one class per thread or runs of classes, with
    tiles of whole classes (7 columns rounded down to a multiple of K) and one slice per row; pass 2
    reusing every tile of S with its exponentials, none, or the tiles of S alone that a 6000-byte
    budget holds (all 4 for K = 1, 6 of 12 for K = 3, 10 of 23 for K = 4) and recomputing the rest."""
    tile_plan(tile_columns=7, rows_per_group=5, slice_columns=0, keep_exponentials=keep_exponentials,
              classes_per_thread=classes_per_thread, reuse_bytes=reuse_bytes)
    x, p, labels = inputs(37, 23, 19, case(name)[4], dtype=torch.float32)
    assert_matches_reference(name, x, p, labels, TOL[torch.float32])


@pytest.mark.parametrize("kept", ["all", "none", "some"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("centers", [2, 7, 513])
def test_soft_triple_center_counts(tile_plan, centers, dtype, kept):
    """The CPU's runs of soft-weighted centers: K = 2 and K = 7 (runs of 256 and 73 classes, so that
    pass 2's runs of 128 classes cross them), and K = 513, beyond a run's 512 centers (one
    exponential at a time); tiles of 600 columns rounded down to whole classes, with pass 2 reusing
    every tile of S, none, or those that 80 % of S's bytes hold (S alone: 1 of 2 tiles for K = 2,
    3 of 5 for K = 7, 2 of 3 for K = 513)."""
    batch, classes, dim = 21, (3 if centers > 512 else 400), 11
    some = batch * classes * centers * (8 if dtype == torch.float64 else 4) * 4 // 5
    tile_plan(tile_columns=max(600, centers), reuse_bytes={"all": -1, "none": 0, "some": some}[kept])
    x, p, labels = inputs(batch, classes, dim, centers, dtype=dtype)
    kwargs = {"centers_per_class": centers, "tau": 0.2}
    got = value_and_grads(functional.soft_triple_loss, x, p.to(dtype), labels, **kwargs)
    want = value_and_grads(reference.soft_triple_loss, x.double(), p, labels, **kwargs)
    for a, b in zip(got, want):
        assert relative_error(a, b) <= TOL[dtype]


@pytest.mark.parametrize("kept", ["all", "none"])
@pytest.mark.parametrize("aggregation", [0, 1], ids=["max", "soft"])
def test_excluded_target_with_centers_matches_the_gpu_plan(tile_plan, aggregation, kept):
    """The op's classic ProxyNCA form (target out of the denominator) with K = 3 centers per class:
    the CPU's runs (probabilities kept, or recomputed in one run with the target's set to 0) against
    the GPU plan's one class per thread, two separate implementations of the same formulas."""
    x, p, labels = inputs(29, 150, 16, 3, dtype=torch.float32)
    args = (x, p.float(), labels, 16.0, 0.0, True, 1, 3, aggregation, 10.0, 0, 0.0)
    tile_plan(tile_columns=96, reuse_bytes=-1 if kept == "all" else 0)
    runs = ops.proxy_nca_loss(*args)[:3]
    tile_plan(**SMALL_GPU_PLAN)
    per_thread = ops.proxy_nca_loss(*args)[:3]
    for a, b in zip(runs, per_thread):
        assert relative_error(a, b) <= 1e-5


def test_special_cases_reduce_to_the_plain_losses():
    """K = 1 sub-centers is ArcFace; SoftTriple with K = 1 is CosFace with scale λ and margin δ; a
    zero CosFace margin is Norm-SoftMax (ProxyNCA's softmax over all proxies)."""
    x, p, labels = inputs(20, 9, 12, 1, dtype=torch.float64)
    pairs = [
        (value_and_grads(functional.arcface_loss, x, p, labels, sub_centers=1),
         value_and_grads(functional.arcface_loss, x, p, labels)),
        (value_and_grads(functional.soft_triple_loss, x, p, labels, centers_per_class=1, la=20.0, margin=0.01),
         value_and_grads(functional.cosface_loss, x, p, labels, margin=0.01, scale=20.0)),
        (value_and_grads(functional.cosface_loss, x, p, labels, margin=0.0, scale=23.0),
         value_and_grads(functional.proxy_nca_loss, x, p, labels, scale=23.0)),
    ]
    for got, want in pairs:
        for a, b in zip(got, want):
            assert relative_error(a, b) <= 1e-12


def test_soft_triple_regularizer_equals_the_official_full_gram_form():
    """The regulariser over each class's K×K block equals the official code's mask over the whole
    (C·K) × (C·K) Gram matrix (its ``self.weight``: pairs k < k' of one class)."""
    gen = torch.Generator().manual_seed(4)
    classes, k = 6, 4
    p = torch.randn(classes * k, 10, generator=gen, dtype=torch.float64)
    centers = torch.nn.functional.normalize(p, dim=1)
    mask = torch.zeros(classes * k, classes * k, dtype=torch.bool)
    for c in range(classes):
        for j in range(k):
            mask[c * k + j, c * k + j + 1:(c + 1) * k] = True
    official = torch.sqrt(2.0 + 1e-5 - 2.0 * (centers @ centers.T)[mask]).sum() / (classes * k * (k - 1))
    assert relative_error(functional.soft_triple_regularizer(p, k), official) <= 1e-12


@pytest.mark.parametrize("name", CASES)
def test_gradcheck(name):
    fused, _, kwargs, _, centers = case(name)
    x, p, labels = inputs(6, 4, 5, centers, dtype=torch.float64, seed=3)
    # scale 64 makes the softmax nearly one-hot; a smaller one keeps finite differences informative
    kwargs = dict(kwargs, **({"la": 4.0} if "softtriple" in name else {"scale": 4.0}))
    assert torch.autograd.gradcheck(lambda a, b: fused(a, b, labels, **kwargs),
                                    (x.requires_grad_(), p.requires_grad_()))


@pytest.mark.parametrize("args", [(3, 0, 1.0, 2, 0.5), (4, 1, 10.0, 1, 0.01)], ids=["subcenter", "softtriple"])
def test_opcheck(args):
    x, p, labels = inputs(10, 5, 7, args[0], dtype=torch.float32)
    torch.library.opcheck(ops.proxy_nca_loss, (x.requires_grad_(), p.float().requires_grad_(), labels, 64.0, 0.0,
                                               False, 1, *args))


# ------------------------------------------------------------------------------------------
# pytorch-metric-learning: the same loss and gradients on the same weights (its W is our proxiesᵀ).

def pml_pairs():
    from pytorch_metric_learning import losses as pml

    return [
        ("CosFace", dmlfast.CosFaceLoss(30, 16), pml.CosFaceLoss(num_classes=30, embedding_size=16)),
        ("ArcFace", dmlfast.ArcFaceLoss(30, 16), pml.ArcFaceLoss(num_classes=30, embedding_size=16)),
        ("SubCenterArcFace", dmlfast.SubCenterArcFaceLoss(30, 16),
         pml.SubCenterArcFaceLoss(num_classes=30, embedding_size=16)),
        ("SoftTriple", dmlfast.SoftTripleLoss(30, 16, tau=0.0),  # PML has no centre regulariser
         pml.SoftTripleLoss(num_classes=30, embedding_size=16)),
    ]


@pytest.mark.parametrize("index", range(4), ids=["CosFace", "ArcFace", "SubCenterArcFace", "SoftTriple"])
def test_equals_pytorch_metric_learning(index):
    torch.manual_seed(index)
    _, ours, theirs = pml_pairs()[index]
    weights = theirs.fc if hasattr(theirs, "fc") else theirs.W
    with torch.no_grad():
        weights.copy_(ours.proxies.T)
    x = torch.randn(64, 16, requires_grad=True)
    labels = torch.randint(0, 30, (64,))
    ours_loss = ours(x, labels)
    ours_grads = torch.autograd.grad(ours_loss, (x, ours.proxies))
    theirs_loss = theirs(x, labels)
    theirs_grads = torch.autograd.grad(theirs_loss, (x, weights))
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_grads[0], theirs_grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_grads[1], theirs_grads[1].T, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Class shards.

CLASSES, DIM, K_SHARDED = 7, 5, 3
SHARD_CASES = {  # (K, op class-logit arguments after scale: K, aggregation, gamma, margin type, margin)
    "cosface": (1, (64.0, 1, 0, 1.0, 1, 0.35)),
    "subcenter": (K_SHARDED, (64.0, K_SHARDED, 0, 1.0, 2, 0.5)),
    "softtriple": (K_SHARDED, (20.0, K_SHARDED, 1, 10.0, 1, 0.01)),
}


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("name", list(SHARD_CASES))
def test_shards_with_reduced_row_stats_equal_the_unsharded_op(name, world):
    centers, (scale, *logits) = SHARD_CASES[name]
    x, p, labels = inputs(12, CLASSES, DIM, centers, dtype=torch.float64)
    expected = ops.proxy_nca_loss(x, p, labels, scale, 0.0, False, 1, *logits)
    ranges = [sharded.shard_range(CLASSES, rank, world) for rank in range(world)]
    rows = [p[first * centers:(first + count) * centers] for first, count in ranges]
    stats = torch.stack([ops.proxy_nca_shard_row_stats(x, q, labels, scale, False, first, CLASSES, 1, *logits)
                         for q, (first, _) in zip(rows, ranges)])
    row_max = stats[:, 0].max(0).values
    reduced = torch.stack([row_max, (stats[:, 1] * torch.exp(stats[:, 0] - row_max)).sum(0), stats[:, 2].sum(0),
                           stats[:, 3].sum(0)])
    parts = [ops.proxy_nca_shard_loss_and_grads(x, q, labels, reduced, scale, 0.0, False, first, CLASSES, 1, *logits)
             for q, (first, _) in zip(rows, ranges)]
    assert relative_error(parts[0][0], expected[0]) <= 1e-12
    assert relative_error(sum(part[1] for part in parts), expected[1]) <= 1e-12
    assert relative_error(torch.cat([part[2] for part in parts]), expected[2]) <= 1e-12


def sharded_modules():
    """(name, sharded module, unsharded module) with the same hyperparameters and proxies."""
    pairs = [
        ("CosFace", sharded.ShardedCosFaceLoss(CLASSES, DIM, margin=0.3, scale=8.0),
         dmlfast.CosFaceLoss(CLASSES, DIM, margin=0.3, scale=8.0)),
        ("ArcFace", sharded.ShardedArcFaceLoss(CLASSES, DIM, scale=8.0), dmlfast.ArcFaceLoss(CLASSES, DIM, scale=8.0)),
        ("SubCenterArcFace", sharded.ShardedSubCenterArcFaceLoss(CLASSES, DIM, scale=8.0),
         dmlfast.SubCenterArcFaceLoss(CLASSES, DIM, scale=8.0)),
        ("SoftTriple", sharded.ShardedSoftTripleLoss(CLASSES, DIM, centers_per_class=K_SHARDED, la=6.0),
         dmlfast.SoftTripleLoss(CLASSES, DIM, centers_per_class=K_SHARDED, la=6.0)),
    ]
    for index, (_, module, unsharded) in enumerate(pairs):
        module.double()
        unsharded.double()
        proxies = torch.randn(unsharded.proxies.shape, generator=torch.Generator().manual_seed(20 + index),
                              dtype=torch.float64)
        with torch.no_grad():
            unsharded.proxies.copy_(proxies)
        module.load_full_proxies(proxies)
    return pairs


RANK_BATCHES = {2: (5, 3), 3: (4, 2, 3)}
LABELS = torch.tensor([0, 6, 1, 0, 6, 2, 4, 5, 6])


def global_batch(world):
    sizes = RANK_BATCHES[world]
    return torch.randn(sum(sizes), DIM, generator=torch.Generator().manual_seed(9), dtype=torch.float64), LABELS[:sum(sizes)]


def _rank_worker(rank, world, out_dir):
    sizes = RANK_BATCHES[world]
    x_all, labels_all = global_batch(world)
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    results = {}
    for name, module, _ in sharded_modules():
        x = x_all[rows].clone().requires_grad_()
        loss = module(x, labels_all[rows])
        loss.backward()
        results[name] = {"loss": loss.detach(), "grad_x": x.grad, "grad_p": module.proxies.grad,
                         "rows": (module.class_offset * module.centers_per_class, module.proxies.shape[0])}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_processes_equal_the_unsharded_modules(world, tmp_path):
    spawn_gloo_ranks(_rank_worker, world, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    sizes = RANK_BATCHES[world]
    x_all, labels = global_batch(world)
    for name, _, unsharded in sharded_modules():
        x = x_all.clone().requires_grad_()
        expected = unsharded(x, labels)
        expected.backward()
        for rank, result in enumerate(results):
            got, first = result[name], sum(sizes[:rank])
            offset, count = got["rows"]
            assert torch.allclose(got["loss"], expected.detach(), rtol=1e-12, atol=0), (name, rank)
            assert torch.allclose(got["grad_x"], x.grad[first:first + sizes[rank]], rtol=0, atol=1e-12), (name, rank)
            assert torch.allclose(got["grad_p"], unsharded.proxies.grad[offset:offset + count], rtol=0,
                                  atol=1e-12), (name, rank)


# ------------------------------------------------------------------------------------------
# Errors.

def test_bad_arguments_are_clear_errors():
    x, p, labels = inputs(6, 4, 5, 3)
    with pytest.raises(ValueError, match=r"arcface_loss: proxies must have num_classes \* 2 rows \(2 centers per "
                                         r"class\), got 11 rows"):
        functional.arcface_loss(x, p[:11].float(), labels, sub_centers=2)
    with pytest.raises(ValueError, match=r"arcface_loss: margin must be in \[0.0, 180.0\), got 200.0"):
        functional.arcface_loss(x, p.float(), labels, margin=200.0, sub_centers=3)
    with pytest.raises(ValueError, match=r"soft_triple_loss: gamma must be > 0.0, got 0.0"):
        functional.soft_triple_loss(x, p.float(), labels, centers_per_class=3, gamma=0.0)
    with pytest.raises(ValueError, match=r"proxy_nca_loss: center_aggregation must be 0 \(max\) or 1"):
        ops.proxy_nca_loss(x, p.float(), labels, 8.0, 0.0, False, 1, 3, 5, 1.0, 0, 0.0)
    with pytest.raises(ValueError, match=r"proxy_nca_loss: exclude_positive=True \(the classic ProxyNCA form\) takes "
                                         r"no margin"):
        ops.proxy_nca_loss(x, p.float(), labels, 8.0, 0.0, True, 1, 3, 0, 1.0, 1, 0.1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        dmlfast.SubCenterArcFaceLoss(4, 5)(x, labels + 4)
    with pytest.raises(ValueError, match=r"SoftTripleLoss: tau must be >= 0.0, got -1.0"):
        dmlfast.SoftTripleLoss(4, 5, tau=-1.0)
