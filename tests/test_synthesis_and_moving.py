"""Proxy Synthesis (docs/losses.md §4) and moving proxies (docs/losses.md §5) against direct float64 computations."""
import pytest
import torch

import dmlfast
from dmlfast import reference

BASES = {
    "NormSoftmaxLoss": (lambda: dmlfast.NormSoftmaxLoss(12, 16), lambda x, p, y: reference.proxy_nca_loss(x, p, y, scale=23.0)),
    "ProxyNCALoss": (lambda: dmlfast.ProxyNCALoss(12, 16, scale=24.0), lambda x, p, y: reference.proxy_nca_loss(x, p, y, scale=24.0)),
    "ProxyAnchorLoss": (lambda: dmlfast.ProxyAnchorLoss(12, 16), reference.proxy_anchor_loss),
}


@pytest.mark.parametrize("name", list(BASES))
def test_mu_zero_is_the_base_loss(name):
    torch.manual_seed(0)
    base = BASES[name][0]()
    x, y = torch.randn(20, 16), torch.randint(0, 12, (20,))
    assert torch.equal(dmlfast.ProxySynthesis(base, alpha=0.4, mu=0.0)(x, y), base(x, y))


@pytest.mark.parametrize("mu", [0.5, 1.0])
@pytest.mark.parametrize("name", list(BASES))
def test_synthesis_matches_a_float64_construction(name, mu):
    torch.manual_seed(0)
    make, ref = BASES[name]
    base = make()
    x = torch.randn(20, 16, requires_grad=True)
    y = torch.randint(0, 12, (20,))
    torch.manual_seed(7)
    loss = dmlfast.ProxySynthesis(base, alpha=0.4, mu=mu)(x, y)
    grads = torch.autograd.grad(loss, (x, base.proxies))
    torch.manual_seed(7)
    lam = torch.distributions.Beta(0.4, 0.4).sample().double()
    x64, p64 = x.detach().double().requires_grad_(), base.proxies.detach().double().requires_grad_()
    unit, unit_p = reference.normalize(x64), reference.normalize(p64)
    count = int(mu * 20)
    mixed = (lam * unit + (1 - lam) * unit.roll(1, 0))[:count]
    mixed_p = (lam * unit_p[y] + (1 - lam) * unit_p[y].roll(1, 0))[:count]
    expected = ref(torch.cat([unit, mixed]), torch.cat([unit_p, mixed_p]), torch.cat([y, 12 + torch.arange(count)]))
    expected_grads = torch.autograd.grad(expected, (x64, p64))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_synthesis_is_reproducible_under_a_seed():
    base = dmlfast.NormSoftmaxLoss(12, 16)
    x, y = torch.randn(20, 16), torch.randint(0, 12, (20,))
    synthesis = dmlfast.ProxySynthesis(base)
    torch.manual_seed(3)
    first = synthesis(x, y)
    torch.manual_seed(3)
    assert torch.equal(synthesis(x, y), first)


def test_synthesis_rejects_other_bases():
    with pytest.raises(TypeError, match="base_loss must be a ProxyAnchorLoss, ProxyNCALoss or NormSoftmaxLoss"):
        dmlfast.ProxySynthesis(torch.nn.MSELoss())
    with pytest.raises(ValueError, match=r"mu must be in \[0.0, 1.0\]"):
        dmlfast.ProxySynthesis(dmlfast.NormSoftmaxLoss(3, 4), mu=1.5)


def test_moving_proxy_loss_and_update():
    torch.manual_seed(0)
    loss_fn = dmlfast.MovingProxyLoss(num_classes=6, embedding_size=8, temperature=0.05, momentum=0.5)
    assert "proxies" in dict(loss_fn.named_buffers()) and not list(loss_fn.parameters())
    x = torch.nn.functional.normalize(torch.randn(5, 8), dim=1).requires_grad_()
    y = torch.tensor([1, 1, 3, 4, 1])
    loss = loss_fn(x, y)
    expected = reference.proxy_nca_loss(x.detach().double(), loss_fn.proxies.double(), y, scale=20.0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    loss.backward()
    assert x.grad.abs().sum() > 0
    before = loss_fn.proxies.clone()
    loss_fn.update_proxies(x.detach(), y)
    unit = torch.nn.functional.normalize(before, dim=1)
    torch.testing.assert_close(loss_fn.proxies[1], 0.5 * unit[1] + 0.5 * (x[0] + x[1] + x[4]).detach())
    torch.testing.assert_close(loss_fn.proxies[3], 0.5 * unit[3] + 0.5 * x[2].detach())
    assert torch.equal(loss_fn.proxies[0], before[0]) and torch.equal(loss_fn.proxies[5], before[5])


def test_learnable_moving_proxies_are_trained_not_moved():
    loss_fn = dmlfast.MovingProxyLoss(num_classes=6, embedding_size=8, learnable=True)
    x = torch.randn(5, 8)
    loss_fn(x, torch.tensor([0, 1, 2, 3, 4])).backward()
    assert loss_fn.proxies.grad is not None and loss_fn.proxies.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="not moved"):
        loss_fn.update_proxies(x, torch.tensor([0, 1, 2, 3, 4]))


@pytest.mark.parametrize(
    "embeddings, labels, pattern",
    [
        (torch.randn(5, 7), torch.zeros(5, dtype=torch.long), r"embeddings must be a \(batch, 8\) tensor"),
        (torch.randn(5, 8), torch.zeros(4, dtype=torch.long), r"labels must be an integer tensor of shape \(5,\)"),
        (torch.randn(5, 8), torch.zeros(4, dtype=torch.int32), r"labels must be an integer tensor of shape \(5,\)"),
        (torch.randn(5, 8), torch.full((5,), 6), r"labels must be in \[0, 6\), got min 6 and max 6"),
    ],
)
def test_moving_update_validates_its_inputs(embeddings, labels, pattern):
    with pytest.raises(ValueError, match=pattern):
        dmlfast.MovingProxyLoss(num_classes=6, embedding_size=8).update_proxies(embeddings, labels)


def _bad_inputs():
    """(name, embeddings, labels) the fused ops refuse: 4 classes, dimension 8."""
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    nan = x.clone()
    nan[2, 5] = float("nan")
    return [
        ("norm overflow", x.sign() * 3e38, y),
        ("NaN", nan, y),
        ("float labels", x, y.float()),
        ("label == C", x, torch.tensor([0, 1, 2, 3, 0, 4])),
        ("negative label", x, torch.tensor([0, 1, -1, 3, 0, 1])),
        ("labels too short", x, y[:5]),
        ("1-D embeddings", x[0], y[:1]),
        ("int embeddings", x.long(), y),
    ]


@pytest.mark.parametrize("base", ["ProxyAnchorLoss", "ProxyNCALoss", "NormSoftmaxLoss"])
@pytest.mark.parametrize("case", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_synthesis_checks_its_inputs_as_the_loss_it_wraps(base, case):
    """The same error type and message as the wrapped loss, before any arithmetic (×1e30 used to give a
    finite loss with an all-zero gradient; label == C an IndexError)."""
    _, embeddings, labels = case
    base_loss = getattr(dmlfast, base)(4, 8)
    with pytest.raises((ValueError, TypeError)) as expected:
        base_loss(embeddings, labels)
    torch.manual_seed(0)
    with pytest.raises(type(expected.value)) as got:
        dmlfast.ProxySynthesis(base_loss)(embeddings.requires_grad_() if embeddings.is_floating_point() else embeddings, labels)
    assert str(got.value) == str(expected.value)


def test_a_finite_embedding_whose_norm_overflows_is_named_as_such():
    x = torch.randn(4, 8)
    x[2] = 3e38  # finite in float32; its norm is not (squared norms of embeddings are summed in float64)
    with pytest.raises(ValueError, match=r"proxy_anchor_loss: embeddings are finite, but the norm of row 2 overflows "
                                         r"float32") as error:
        dmlfast.ProxyAnchorLoss(4, 8)(x, torch.arange(4))
    assert "NaN or Inf" not in str(error.value)
    proxies = torch.randn(4, 8, dtype=torch.float64)
    proxies[3] = 1e200
    with pytest.raises(ValueError, match=r"proxy_nca_loss: proxies are finite, but the norm of row 3 overflows float64"):
        dmlfast.functional.proxy_nca_loss(torch.randn(4, 8, dtype=torch.float64), proxies, torch.arange(4))
    from dmlfast.sharded import ShardedProxyAnchorLoss, ShardedProxyNCALoss  # one process: the whole table

    for sharded, op in ((ShardedProxyAnchorLoss, "proxy_anchor_loss"),
                        (ShardedProxyNCALoss, "proxy_nca_shard_loss_and_grads")):
        with pytest.raises(ValueError, match=rf"{op}: embeddings are finite, but the norm of row 2 overflows float32"):
            sharded(4, 8)(x, torch.arange(4))
    nan = torch.randn(4, 8)
    nan[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"embeddings contain NaN or Inf \(first bad row: 1\)"):  # a real Inf stays one
        dmlfast.ProxyAnchorLoss(4, 8)(nan, torch.arange(4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_moving_update_refuses_nan_or_inf_and_leaves_the_proxies(bad):
    loss_fn = dmlfast.MovingProxyLoss(num_classes=6, embedding_size=8)
    before = loss_fn.proxies.clone()
    x = torch.randn(5, 8)
    x[3, 2] = bad
    with pytest.raises(ValueError, match=r"MovingProxyLoss.update_proxies: embeddings contain NaN or Inf \(first bad row: 3\)"):
        loss_fn.update_proxies(x, torch.tensor([0, 1, 2, 3, 4]))
    assert torch.equal(loss_fn.proxies, before)
