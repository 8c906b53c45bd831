"""ProxyISALoss: the per-class schedule, the memory and the state (docs/losses.md §3.2–§3.5)."""
import math

import pytest
import torch

import dmlfast
from dmlfast import functional


def test_thresholds_at_saturation_match_the_spec_examples():
    """docs/losses.md §3.2: V = 100, s̄ = 0.1 at saturation gives θ ≈ -0.32 (k=0.9), -0.24 (0.4), -0.19 (0.1)."""
    for k, expected in ((0.9, -0.32), (0.4, -0.24), (0.1, -0.19)):
        loss_fn = dmlfast.ProxyISALoss(num_classes=3, embedding_size=4, k=k)
        loss_fn.counter.fill_(1e6)  # n -> V
        loss_fn.learned_sim.fill_(0.1)
        center, threshold, weight, easy = loss_fn.class_schedule()
        assert threshold[0].item() == pytest.approx(expected, abs=0.006)
        base = 1 / (1 + math.log1p(100))
        assert base == pytest.approx(0.178, abs=1e-3)
        assert weight[0].item() == pytest.approx(base, rel=1e-4)  # the gate has closed
        assert easy[0].item() == pytest.approx(0.01, rel=1e-4)


def test_weight_stays_one_until_about_300_samples():
    loss_fn = dmlfast.ProxyISALoss(num_classes=4, embedding_size=4)
    loss_fn.counter.copy_(torch.tensor([0.0, 100.0, 300.0, 700.0], dtype=torch.float64))
    _, _, weight, _ = loss_fn.class_schedule()
    assert weight[0].item() == pytest.approx(1.0, abs=1e-6)
    assert weight[1].item() == pytest.approx(1.0, abs=1e-6)  # n = 63
    assert 0.18 < weight[3].item() < 0.25  # n = 99.9: gated down to w_base


def test_fresh_state_equals_proxy_anchor():
    """Before anything is counted every M is 1, so the loss is Proxy-Anchor (all classes have negatives)."""
    torch.manual_seed(0)
    loss_fn = dmlfast.ProxyISALoss(num_classes=10, embedding_size=16).eval()
    x, labels = torch.randn(40, 16), torch.randint(0, 10, (40,))
    expected = functional.proxy_anchor_loss(x, loss_fn.proxies, labels)
    torch.testing.assert_close(loss_fn(x, labels), expected, rtol=1e-6, atol=0)


def test_training_updates_counter_memory_and_learned_similarity():
    torch.manual_seed(0)
    loss_fn = dmlfast.ProxyISALoss(num_classes=6, embedding_size=8, memory_size=10, memory_start_epoch=1)
    x, labels = torch.randn(4, 8), torch.tensor([0, 0, 1, 5])
    loss_fn(x, labels)
    assert loss_fn.counter.tolist() == [2, 1, 0, 0, 0, 1]
    assert (loss_fn.memory_labels == -1).all() and (loss_fn.learned_sim == 1).all()  # memory off in epoch 0
    loss_fn.set_epoch(1)
    loss_fn(x, labels)
    assert loss_fn.memory_labels[:4].tolist() == [0, 0, 1, 5] and int(loss_fn.memory_position) == 4
    unit = torch.nn.functional.normalize(x, dim=1)
    proxy = torch.nn.functional.normalize(loss_fn.proxies.detach(), dim=1)
    expected = 0.15 * (proxy[0] @ (unit[0] + unit[1])) / 2
    assert loss_fn.learned_sim[0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss_fn.learned_sim[2].item() == 1.0  # no sample of class 2 yet
    loss_fn(x, labels)  # 4 more fit (8 of 10) ...
    loss_fn(x, labels)  # ... these 4 do not: written into the last 4 slots, position back to 0
    assert int(loss_fn.memory_position) == 0
    assert loss_fn.memory_labels[6:].tolist() == [0, 0, 1, 5]


def test_outliers_are_not_counted_once_the_filter_is_on():
    torch.manual_seed(0)
    loss_fn = dmlfast.ProxyISALoss(num_classes=2, embedding_size=8, filter_start_epoch=0)
    proxy = loss_fn.proxies.detach()[0]
    x = torch.stack([proxy, -proxy])  # cosine +1 (kept) and -1 (an outlier below any θ >= -1)
    loss_fn(x, torch.tensor([0, 0]))
    assert loss_fn.counter.tolist() == [1, 0]


def test_state_round_trips_through_state_dict():
    torch.manual_seed(0)
    first = dmlfast.ProxyISALoss(num_classes=5, embedding_size=8, memory_size=16, memory_start_epoch=0)
    first.set_epoch(3)
    x, labels = torch.randn(12, 8), torch.randint(0, 5, (12,))
    first(x, labels)
    second = dmlfast.ProxyISALoss(num_classes=5, embedding_size=8, memory_size=16)
    second.load_state_dict(first.state_dict())
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    y = torch.randn(12, 8)
    torch.testing.assert_close(first(y, labels), second(y, labels))


def test_backward_reaches_embeddings_and_proxies():
    loss_fn = dmlfast.ProxyISALoss(num_classes=5, embedding_size=8)
    x = torch.randn(10, 8, requires_grad=True)
    loss_fn(x, torch.randint(0, 5, (10,))).backward()
    assert x.grad.abs().sum() > 0 and loss_fn.proxies.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, pattern",
    [({"memory_size": 0}, "memory_size must be a positive integer"), ({"memory_start_epoch": -1}, "memory_start_epoch must be an integer >= 0"),
     ({"V": 1}, r"V must be > 1.0"), ({"k": -0.5}, r"k must be >= 0.0")],
)
def test_constructor_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        dmlfast.ProxyISALoss(num_classes=3, embedding_size=4, **kwargs)
