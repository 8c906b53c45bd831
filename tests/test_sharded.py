"""Class-sharded proxies (dmlfast.sharded): the shards' ops summed, and 2- and 3-process gloo runs,
equal the unsharded loss and gradients in float64."""
import pytest
import torch

from conftest import spawn_gloo_ranks
from dmlfast import functional, sharded

ops = torch.ops.dmlfast
CLASSES, DIM, UNCERTAINTY_DIM = 7, 5, 3
SOFTMAX_CASES = {"nca": (18.0, 0.0, False), "nca++ smoothing": (9.0, 0.1, False), "nca exclude positive": (18.0, 0.0, True)}


def make_problem(batch, seed=0):
    """Embeddings, uncertainty, full proxies and labels in float64; classes 0 and 6 repeat, class 3 is absent."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, UNCERTAINTY_DIM, generator=gen, dtype=torch.float64)
    p = torch.randn(CLASSES, DIM, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 6, 1, 0, 6, 2, 4, 5, 6, 0, 1, 2][:batch])
    return x, v, p, labels


def reduce_stats_in_one_process(stats):
    """reduce_softmax_row_stats over a stacked [shards, 4, B] tensor, without processes."""
    row_max = stats[:, 0].max(0).values
    return torch.stack([row_max, (stats[:, 1] * torch.exp(stats[:, 0] - row_max)).sum(0), stats[:, 2].sum(0), stats[:, 3].sum(0)])


def shards(world):
    return [sharded.shard_range(CLASSES, rank, world) for rank in range(world)]


def test_shard_range_covers_the_classes_once_with_uneven_shards():
    for classes, world in ((7, 3), (10, 4), (5, 5), (1_000_000, 3)):
        ranges = [sharded.shard_range(classes, rank, world) for rank in range(world)]
        assert [first for first, _ in ranges] == [sum(n for _, n in ranges[:r]) for r in range(world)]
        assert sum(n for _, n in ranges) == classes
        assert max(n for _, n in ranges) - min(n for _, n in ranges) <= 1
    assert sharded.shard_range(7, 0, 3) == (0, 3) and sharded.shard_range(7, 2, 3) == (5, 2)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_anchor_shards_sum_to_the_unsharded_op(world):
    x, v, p, labels = make_problem(12)
    expected = ops.proxy_anchor_loss(x, p, labels, 0.1, 32.0)
    parts = [ops.proxy_anchor_loss(x, p[first:first + n], labels, 0.1, 32.0, None, False, first, CLASSES) for first, n in shards(world)]
    assert torch.allclose(sum(part[0] for part in parts), expected[0], rtol=1e-12, atol=0)
    assert torch.allclose(sum(part[1] for part in parts), expected[1], rtol=0, atol=1e-12)
    assert torch.allclose(torch.cat([part[2] for part in parts]), expected[2], rtol=0, atol=1e-12)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_idml_shards_sum_to_the_unsharded_op(world):
    x, v, p, labels = make_problem(12)
    expected = ops.idml_proxy_anchor_loss(x, v, p, labels, 0.1, 32.0)
    parts = [ops.idml_proxy_anchor_loss(x, v, p[first:first + n], labels, 0.1, 32.0, first, CLASSES) for first, n in shards(world)]
    assert torch.allclose(sum(part[0] for part in parts), expected[0], rtol=1e-12, atol=0)
    for index in (1, 2):
        assert torch.allclose(sum(part[index] for part in parts), expected[index], rtol=0, atol=1e-12)
    assert torch.allclose(torch.cat([part[3] for part in parts]), expected[3], rtol=0, atol=1e-12)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("case", list(SOFTMAX_CASES))
def test_softmax_shards_with_reduced_row_stats_equal_the_unsharded_op(case, world):
    scale, smoothing, exclude = SOFTMAX_CASES[case]
    x, v, p, labels = make_problem(12)
    expected = ops.proxy_nca_loss(x, p, labels, scale, smoothing, exclude)
    stats = torch.stack([ops.proxy_nca_shard_row_stats(x, p[first:first + n], labels, scale, exclude, first, CLASSES)
                         for first, n in shards(world)])
    reduced = reduce_stats_in_one_process(stats)
    parts = [ops.proxy_nca_shard_loss_and_grads(x, p[first:first + n], labels, reduced, scale, smoothing, exclude, first, CLASSES)
             for first, n in shards(world)]
    for part in parts:
        assert torch.allclose(part[0], expected[0], rtol=1e-12, atol=0)  # every shard returns the whole loss
    assert torch.allclose(sum(part[1] for part in parts), expected[1], rtol=0, atol=1e-12)
    assert torch.allclose(torch.cat([part[2] for part in parts]), expected[2], rtol=0, atol=1e-12)


def test_a_shard_holding_only_a_row_target_has_no_denominator_logit_there():
    x, v, p, labels = make_problem(4)
    stats = ops.proxy_nca_shard_row_stats(x, p[1:2], labels, 18.0, True, 1, CLASSES)  # class 1 alone; labels[2] == 1
    assert stats[0, 2] == float("-inf") and stats[1, 2] == 0
    assert torch.isfinite(stats[0, [0, 1, 3]]).all() and (stats[1, [0, 1, 3]] > 0).all()
    assert stats[3, 2] != 0 and (stats[3, [0, 1, 3]] == 0).all()  # the target logit only where the target is here


def test_one_process_modules_equal_the_unsharded_functions():
    x, v, p, labels = make_problem(12)
    cases = [
        (sharded.ShardedProxyAnchorLoss(CLASSES, DIM), lambda e, q: functional.proxy_anchor_loss(e, q, labels)),
        (sharded.ShardedProxyNCALoss(CLASSES, DIM, smoothing=0.1), lambda e, q: functional.proxy_nca_loss(e, q, labels, 18.0, 0.1)),
        (sharded.ShardedNormSoftmaxLoss(CLASSES, DIM), lambda e, q: functional.proxy_nca_loss(e, q, labels, 23.0)),
    ]
    for module, unsharded in cases:
        module.double().load_full_proxies(p)
        assert (module.class_offset, module.proxies.shape[0], module.world_size) == (0, CLASSES, 1)
        assert torch.allclose(module(x, labels), unsharded(x, p), rtol=1e-12, atol=0)
    idml = sharded.ShardedIntrospectiveProxyAnchorLoss(CLASSES, DIM).double()
    idml.load_full_proxies(p)
    assert torch.allclose(idml(x, v, labels), functional.idml_proxy_anchor_loss(x, v, p, labels), rtol=1e-12, atol=0)


def test_initial_proxies_follow_the_unsharded_modules_distributions():
    torch.manual_seed(0)
    anchor = sharded.ShardedProxyAnchorLoss(2000, 64)
    assert abs(anchor.proxies.std().item() - (2 / 2000) ** 0.5) < 0.01 * (2 / 2000) ** 0.5 * 5
    assert abs(sharded.ShardedProxyNCALoss(2000, 64).proxies.std().item() - 1 / 8) < 0.005
    bound = 1 / 64 ** 0.5
    norm_softmax = sharded.ShardedNormSoftmaxLoss(2000, 64).proxies
    assert norm_softmax.abs().max().item() <= bound and norm_softmax.abs().max().item() > 0.99 * bound


# ------------------------------------------------------------------------------------------
# Real processes: each rank holds its own batch (uneven sizes) and its own shard of the proxies.

RANK_BATCHES = {2: (5, 3), 3: (4, 2, 3)}


def module_cases():
    """(name, sharded module factory, unsharded loss of (embeddings, uncertainty, proxies, labels))."""
    return [
        ("ProxyAnchor", lambda: sharded.ShardedProxyAnchorLoss(CLASSES, DIM),
         lambda x, v, p, y: functional.proxy_anchor_loss(x, p, y)),
        ("ProxyNCA smoothing", lambda: sharded.ShardedProxyNCALoss(CLASSES, DIM, scale=9.0, smoothing=0.1),
         lambda x, v, p, y: functional.proxy_nca_loss(x, p, y, 9.0, 0.1)),
        ("ProxyNCA exclude positive", lambda: sharded.ShardedProxyNCALoss(CLASSES, DIM, exclude_positive=True),
         lambda x, v, p, y: functional.proxy_nca_loss(x, p, y, 18.0, 0.0, True)),
        ("NormSoftmax", lambda: sharded.ShardedNormSoftmaxLoss(CLASSES, DIM),
         lambda x, v, p, y: functional.proxy_nca_loss(x, p, y, 23.0)),
        ("IDML", lambda: sharded.ShardedIntrospectiveProxyAnchorLoss(CLASSES, DIM),
         lambda x, v, p, y: functional.idml_proxy_anchor_loss(x, v, p, y)),
    ]


def _rank_worker(rank, world, out_dir):
    """One rank: its rows of the problem, each sharded loss's value and gradients, and a DDP
    backbone (a Linear layer) trained through the sharded Proxy-Anchor with the summing hook."""
    sizes = RANK_BATCHES[world]
    x_all, v_all, p, labels_all = make_problem(sum(sizes))
    first = sum(sizes[:rank])
    rows = slice(first, first + sizes[rank])
    results = {}
    for name, factory, _ in module_cases():
        module = factory().double()
        module.load_full_proxies(p)
        x = x_all[rows].clone().requires_grad_()
        v = v_all[rows].clone().requires_grad_()
        loss = module(x, v, labels_all[rows]) if name == "IDML" else module(x, labels_all[rows])
        loss.backward()
        results[name] = {"loss": loss.detach(), "grad_x": x.grad, "grad_v": v.grad, "grad_p": module.proxies.grad,
                         "shard": (module.class_offset, module.proxies.shape[0])}
    torch.manual_seed(0)
    backbone = torch.nn.Linear(4, DIM).double()
    features = torch.randn(sum(sizes), 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ddp = torch.nn.parallel.DistributedDataParallel(backbone)
    ddp.register_comm_hook(None, sharded.allreduce_sum_hook)
    loss_module = sharded.ShardedProxyAnchorLoss(CLASSES, DIM).double()
    loss_module.load_full_proxies(p)
    loss_module(ddp(features[rows]), labels_all[rows]).backward()
    results["backbone"] = {"grad_weight": backbone.weight.grad, "grad_bias": backbone.bias.grad}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_processes_equal_the_unsharded_loss_and_gradients(world, tmp_path):
    spawn_gloo_ranks(_rank_worker, world, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    sizes = RANK_BATCHES[world]
    x_all, v_all, p, labels = make_problem(sum(sizes))
    for name, _, unsharded in module_cases():
        x, v, q = (t.clone().requires_grad_() for t in (x_all, v_all, p))
        expected = unsharded(x, v, q, labels)
        expected.backward()
        for rank, result in enumerate(results):
            got = result[name]
            first = sum(sizes[:rank])
            offset, count = got["shard"]
            assert (offset, count) == sharded.shard_range(CLASSES, rank, world)
            assert torch.allclose(got["loss"], expected.detach(), rtol=1e-12, atol=0), (name, rank)
            assert torch.allclose(got["grad_x"], x.grad[first:first + sizes[rank]], rtol=0, atol=1e-12), (name, rank)
            assert torch.allclose(got["grad_p"], q.grad[offset:offset + count], rtol=0, atol=1e-12), (name, rank)
            if name == "IDML":
                assert torch.allclose(got["grad_v"], v.grad[first:first + sizes[rank]], rtol=0, atol=1e-12), rank
    torch.manual_seed(0)
    backbone = torch.nn.Linear(4, DIM).double()
    features = torch.randn(sum(sizes), 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    functional.proxy_anchor_loss(backbone(features), p, labels).backward()
    for result in results:  # the summing hook gives every rank the gradient of the global-batch loss
        assert torch.allclose(result["backbone"]["grad_weight"], backbone.weight.grad, rtol=0, atol=1e-12)
        assert torch.allclose(result["backbone"]["grad_bias"], backbone.bias.grad, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Errors.

def test_bad_shards_and_arguments_are_clear_errors():
    x, v, p, labels = make_problem(6)
    with pytest.raises(ValueError, match=r"classes \[class_offset, class_offset \+ 3\) of num_classes = 7, got class_offset 5"):
        ops.proxy_anchor_loss(x, p[:3], labels, 0.1, 32.0, None, False, 5, CLASSES)
    with pytest.raises(ValueError, match="labels must be in \\[0, 7\\)"):
        ops.proxy_anchor_loss(x, p[:3], labels + 4, 0.1, 32.0, None, False, 0, CLASSES)
    with pytest.raises(ValueError, match="isa_class_params cannot be combined with a class shard"):
        ops.proxy_anchor_loss(x, p[:3], labels, 0.1, 32.0, torch.zeros(4, 3, dtype=torch.float64), False, 0, CLASSES)
    with pytest.raises(ValueError, match=r"row_stats must be a float64 tensor of shape \(4, 6\)"):
        ops.proxy_nca_shard_loss_and_grads(x, p[:3], labels, torch.zeros(4, 5, dtype=torch.float64), 18.0, 0.0, False, 0, CLASSES)
    with pytest.raises(ValueError, match="exclude_positive=True needs at least 2 proxies"):
        ops.proxy_nca_shard_row_stats(x, p[:1], labels.clamp(max=0), 18.0, True, 0, 1)
    with pytest.raises(ValueError, match="rank must be in \\[0, 2\\), got 2"):
        sharded.shard_range(7, 2, 2)
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        sharded.ShardedProxyAnchorLoss(0, DIM)
    module = sharded.ShardedProxyAnchorLoss(CLASSES, DIM)
    with pytest.raises(ValueError, match=r"proxies must have shape \(7, 5\), got \(6, 5\)"):
        module.load_full_proxies(p[:6])
    with pytest.raises(ValueError, match=r"embeddings must have shape \(batch, 5\), got \(6, 4\)"):
        module(x[:, :4].float(), labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\), got torch.int64 of shape \(5,\)"):
        module(x.float(), labels[:5])
    with pytest.raises(TypeError, match=r"labels must be an integer tensor .* got a Float"):
        module(x.float(), labels.float())
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        module(x.float(), labels.tolist())
    with pytest.raises(ValueError, match="class-sharded proxies exist for ProxyAnchor, ProxyNCA, NormSoftmax, IDML, CosFace, ArcFace, "
                                         "SubCenterArcFace, SoftTriple, not 'ProxyISA'"):
        sharded.make_sharded_loss("ProxyISA", CLASSES, DIM)
