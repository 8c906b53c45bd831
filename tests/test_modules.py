"""Loss modules: proxies, initialisation, dtype handling, drop-in parity with pytorch-metric-learning."""
import math

import pytest
import torch

import dmlfast
from conftest import requires_cuda
from dmlfast import reference


def test_proxy_anchor_module_holds_float32_proxies_initialised_kaiming_fan_out():
    torch.manual_seed(0)
    loss_fn = dmlfast.ProxyAnchorLoss(num_classes=2000, embedding_size=64)
    assert isinstance(loss_fn.proxies, torch.nn.Parameter)
    assert loss_fn.proxies.shape == (2000, 64) and loss_fn.proxies.dtype == torch.float32
    assert loss_fn.proxies.std().item() == pytest.approx(math.sqrt(2 / 2000), rel=0.02)
    assert (loss_fn.margin, loss_fn.alpha) == (0.1, 32.0)


def test_proxy_nca_module_initialised_randn_over_8():
    torch.manual_seed(0)
    loss_fn = dmlfast.ProxyNCALoss(num_classes=500, embedding_size=64)
    assert loss_fn.proxies.std().item() == pytest.approx(1 / 8, rel=0.02)
    assert (loss_fn.scale, loss_fn.smoothing, loss_fn.exclude_positive) == (18.0, 0.0, False)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (200, 64)])
@pytest.mark.parametrize("loss_name, init", [
    ("ProxyAnchorLoss", lambda p: torch.nn.init.kaiming_normal_(p, mode="fan_out")),
    ("ProxyNCALoss", lambda p: p.normal_().div_(8.0)),
    ("NormSoftmaxLoss", lambda p: torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))),
    ("ProxyISALoss", lambda p: torch.nn.init.kaiming_normal_(p, mode="fan_out")),
    ("IntrospectiveProxyAnchorLoss", lambda p: torch.nn.init.kaiming_normal_(p, mode="fan_out")),
])
def test_initial_proxies_are_the_published_initialisations(loss_name, init, shape):
    """Bitwise the torch.nn.init call of the published code, from the same seed (the function that
    draws them, ``init_proxies_``, also draws the shards of :mod:`dmlfast.sharded`)."""
    torch.manual_seed(3)
    expected = init(torch.empty(*shape))
    torch.manual_seed(3)
    assert torch.equal(getattr(dmlfast, loss_name)(*shape).proxies.detach(), expected)


def test_norm_softmax_module_matches_reference():
    loss_fn = dmlfast.NormSoftmaxLoss(num_classes=30, embedding_size=16)
    x, y = torch.randn(40, 16, dtype=torch.float64), torch.randint(0, 30, (40,))
    expected = reference.proxy_nca_loss(x, loss_fn.proxies.detach().double(), y, scale=23.0)
    torch.testing.assert_close(loss_fn(x.float(), y).double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("loss_name", ["ProxyAnchorLoss", "ProxyNCALoss", "NormSoftmaxLoss"])
def test_bf16_embeddings_keep_float32_proxies_and_reach_both(loss_name):
    loss_fn = getattr(dmlfast, loss_name)(num_classes=10, embedding_size=8)
    x = torch.randn(16, 8, dtype=torch.bfloat16, requires_grad=True)
    loss = loss_fn(x, torch.randint(0, 10, (16,)))
    loss.backward()
    assert loss_fn.proxies.dtype == torch.float32 and loss_fn.proxies.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0
    assert loss_fn.proxies.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "args, pattern",
    [
        ((0, 8), "num_classes must be a positive integer, got 0"),
        ((10, 2.5), "embedding_size must be a positive integer, got 2.5"),
        ((10, True), "embedding_size must be a positive integer, got True"),
    ],
)
def test_module_constructor_errors(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        dmlfast.ProxyAnchorLoss(*args)


pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="pytorch-metric-learning is a test extra")


def _same_proxies(ours, theirs):
    with torch.no_grad():
        theirs.proxies.copy_(ours.proxies)


def test_proxy_anchor_equals_pytorch_metric_learning():
    torch.manual_seed(1)
    ours = dmlfast.ProxyAnchorLoss(num_classes=50, embedding_size=32)
    theirs = pml_losses.ProxyAnchorLoss(num_classes=50, embedding_size=32)
    _same_proxies(ours, theirs)
    x = torch.randn(64, 32, requires_grad=True)
    labels = torch.randint(0, 50, (64,))
    ours_loss = ours(x, labels)
    ours_grads = torch.autograd.grad(ours_loss, (x, ours.proxies))
    theirs_loss = theirs(x, labels)
    theirs_grads = torch.autograd.grad(theirs_loss, (x, theirs.proxies))
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-5, atol=1e-6)
    # Two float32 computations of one function: each lies up to ~3e-7 from the float64 value here
    # (the fused op forms dL/dp as G'^T X_hat - kappa p, PML through autograd's projection).
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=6e-7)


def test_proxy_nca_scale_is_twice_pml_softmax_scale():
    torch.manual_seed(2)
    softmax_scale = 4.0
    ours = dmlfast.ProxyNCALoss(num_classes=20, embedding_size=16, scale=2 * softmax_scale)
    theirs = pml_losses.ProxyNCALoss(num_classes=20, embedding_size=16, softmax_scale=softmax_scale)
    _same_proxies(ours, theirs)
    x = torch.randn(48, 16, requires_grad=True)
    labels = torch.randint(0, 20, (48,))
    ours_loss = ours(x, labels)
    theirs_loss = theirs(x, labels)
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(ours_loss, x)[0], torch.autograd.grad(theirs_loss, x)[0], rtol=1e-4, atol=1e-7
    )


def _every_loss(num_classes=6, dim=8):
    """One module of every loss, ISA with its memory and positive filter active from the first step."""
    return {
        "ProxyAnchorLoss": dmlfast.ProxyAnchorLoss(num_classes, dim),
        "ProxyNCALoss": dmlfast.ProxyNCALoss(num_classes, dim),
        "NormSoftmaxLoss": dmlfast.NormSoftmaxLoss(num_classes, dim),
        "ProxyISALoss": dmlfast.ProxyISALoss(num_classes, dim, memory_size=16, memory_start_epoch=0, filter_start_epoch=0),
        "MovingProxyLoss": dmlfast.MovingProxyLoss(num_classes, dim),
        "IntrospectiveProxyAnchorLoss": dmlfast.IntrospectiveProxyAnchorLoss(num_classes, dim),
        "ProxySynthesis": dmlfast.ProxySynthesis(dmlfast.ProxyAnchorLoss(num_classes, dim)),
    }


CASTS = {"float": (lambda m: m.float(), torch.float32), "double": (lambda m: m.double(), torch.float64),
         "half": (lambda m: m.half(), torch.float16), "bfloat16": (lambda m: m.to(torch.bfloat16), torch.bfloat16)}


def _train_steps(loss_fn, dtype, device="cpu", steps=3, label_dtype=torch.int64):
    """``steps`` forward + backward (and moving update) calls on embeddings of ``dtype`` and labels of
    ``label_dtype``; the losses."""
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x = torch.randn(12, 8, generator=generator).to(device, dtype).requires_grad_()
        y = torch.arange(12).remainder(6).to(device, label_dtype)
        inputs = (x, torch.rand(12, 4, generator=generator).to(device, dtype), y) if isinstance(
            loss_fn, dmlfast.IntrospectiveProxyAnchorLoss) else (x, y)
        loss = loss_fn(*inputs)
        loss.backward()
        if isinstance(loss_fn, dmlfast.MovingProxyLoss):
            loss_fn.update_proxies(x.detach(), y)
        assert x.grad is not None and torch.isfinite(x.grad).all()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize("name", list(_every_loss()))
def test_every_loss_keeps_working_after_a_module_cast(name, cast):
    torch.manual_seed(0)
    loss_fn, reference_fn = _every_loss()[name], _every_loss()[name]
    reference_fn.load_state_dict(loss_fn.state_dict())
    to, dtype = CASTS[cast]
    loss_fn = to(loss_fn)
    assert loss_fn.proxies.dtype == dtype
    torch.manual_seed(1)  # Proxy Synthesis draws its mixing weights from torch's generator
    losses = _train_steps(loss_fn, dtype)
    assert all(math.isfinite(v) for v in losses)
    assert loss_fn.proxies.dtype == dtype  # the moving update writes back in the module's dtype
    if isinstance(loss_fn, dmlfast.ProxyISALoss):
        assert loss_fn.counter.dtype == torch.int64 and 0 < loss_fn.counter.sum().item() <= 3 * 12  # outliers are not counted
    if dtype in (torch.float32, torch.float64):  # the float32 module's numbers, to float32 rounding
        torch.manual_seed(1)
        assert losses == pytest.approx(_train_steps(reference_fn, torch.float32), rel=1e-4)
        for key, value in reference_fn.state_dict().items():
            torch.testing.assert_close(loss_fn.state_dict()[key].to(value.dtype), value, rtol=1e-4, atol=1e-5, msg=key)


@requires_cuda
@pytest.mark.parametrize("name", list(_every_loss()))
def test_every_loss_keeps_working_after_cuda(name):
    loss_fn = _every_loss()[name].cuda()
    assert loss_fn.proxies.is_cuda
    assert all(math.isfinite(v) for v in _train_steps(loss_fn, torch.float32, device="cuda"))


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
@pytest.mark.parametrize("name", list(_every_loss()))
def test_every_loss_takes_any_integer_labels(name, label_dtype):
    """Labels of any integer dtype give the int64 labels' losses, gradients and state (converted once)."""
    torch.manual_seed(0)
    loss_fn, reference_fn = _every_loss()[name], _every_loss()[name]
    reference_fn.load_state_dict(loss_fn.state_dict())
    torch.manual_seed(1)
    losses = _train_steps(loss_fn, torch.float32, label_dtype=label_dtype)
    torch.manual_seed(1)
    assert losses == _train_steps(reference_fn, torch.float32)
    for key, value in reference_fn.state_dict().items():
        torch.testing.assert_close(loss_fn.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_loss_names_are_looked_up_without_regard_to_case():
    from dmlfast.losses import loss_class

    assert loss_class("proxyanchor") is dmlfast.ProxyAnchorLoss and loss_class("PROXYNCA") is dmlfast.ProxyNCALoss
    with pytest.raises(ValueError, match=r"unknown loss 'ProxyAnchr'; did you mean ProxyAnchor\? \(choose one of ProxyAnchor, "):
        loss_class("ProxyAnchr")
    with pytest.raises(ValueError, match=r"unknown loss 'Contrastive' \(choose one of "):
        loss_class("Contrastive")


@pytest.mark.parametrize("name", ["CosFaceLoss", "ArcFaceLoss", "SubCenterArcFaceLoss", "SoftTripleLoss"])
def test_class_center_losses_take_any_integer_labels(name):
    from dmlfast import margin_losses

    torch.manual_seed(0)
    loss_fn = getattr(margin_losses, name)(6, 8)
    x = torch.randn(12, 8, requires_grad=True)
    labels = torch.arange(12).remainder(6)
    expected = loss_fn(x, labels)
    (expected_grad,) = torch.autograd.grad(expected, x)
    for dtype in (torch.int32, torch.uint8):
        got = loss_fn(x, labels.to(dtype))
        (grad,) = torch.autograd.grad(got, x)
        assert got.item() == expected.item() and torch.equal(grad, expected_grad)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        loss_fn(x, labels.float())
