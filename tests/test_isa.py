"""Proxy-ISA through the fused anchor kernel (docs/losses.md §3.1, §3.3, §7.4) against the float64 reference."""
import pytest
import torch

from dmlfast import functional, reference
from conftest import relative_error


def isa_inputs(batch, num_classes, dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    p = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    # Few classes and correlated embeddings, so that every band (easy, informative, outlier) is hit.
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    x = x + 0.3 * p[labels]
    center = 0.1 + 0.4 * torch.rand(num_classes, generator=gen, dtype=torch.float64)
    threshold = center - 0.2 - 0.5 * torch.rand(num_classes, generator=gen, dtype=torch.float64)
    weight = 0.2 + 0.8 * torch.rand(num_classes, generator=gen, dtype=torch.float64)
    easy = 1 / (1 + 99 * torch.rand(num_classes, generator=gen, dtype=torch.float64))
    return x.to(dtype), p.to(dtype), labels, (center, threshold, weight, easy)


def run(fn, x, p, labels, params, **kwargs):
    x = x.detach().requires_grad_()
    p = p.detach().requires_grad_()
    loss = fn(x, p, labels, *params, **kwargs)
    return (loss, *torch.autograd.grad(loss, (x, p)))


@pytest.mark.parametrize("filter_positives", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(64, 10, 16), (40, 3000, 24), (1, 1, 5)])
def test_isa_matches_reference(shape, dtype, tol, filter_positives):
    x, p, labels, params = isa_inputs(*shape, dtype=dtype)
    sim = reference.cosine(x.double(), p.double())
    fused = run(functional.proxy_isa_loss, x, p, labels, [v.to(dtype if dtype != torch.bfloat16 else torch.float32) for v in params],
                filter_positives=filter_positives)
    expected = run(reference.proxy_isa_loss, x.double(), p.double(), labels, params, filter_positives=filter_positives)
    if shape[1] == 10:  # the bands are all exercised
        pos = sim[torch.arange(shape[0]), labels]
        center, threshold = params[0][labels], params[1][labels]
        assert ((pos > center).any() and ((pos <= center) & (pos >= threshold)).any() and (pos < threshold).any())
        assert (sim < params[1]).any() and (sim >= params[1]).any()
    for got, want in zip(fused, expected):
        assert relative_error(got, want) <= tol


def test_isa_with_unit_multipliers_is_proxy_anchor():
    """M ≡ 1 (no positive filter, no easy negatives) gives Proxy-Anchor exactly, docs/losses.md §3.1."""
    x, p, labels, _ = isa_inputs(48, 12, 16)
    ones, low = torch.ones(12, dtype=torch.float64), torch.full((12,), -2.0, dtype=torch.float64)
    isa = run(functional.proxy_isa_loss, x, p, labels, (ones, low, ones, ones), filter_positives=False)
    anchor = run(lambda a, b, y, *_: functional.proxy_anchor_loss(a, b, y), x, p, labels, ())
    for got, want in zip(isa, anchor):
        assert relative_error(got, want) <= 1e-14


def test_isa_gradcheck():
    x, p, labels, params = isa_inputs(7, 4, 5)
    x.requires_grad_()
    p.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: functional.proxy_isa_loss(a, b, labels, *params), (x, p))


def test_isa_opcheck():
    x, p, labels, params = isa_inputs(9, 5, 6, dtype=torch.float32)
    torch.library.opcheck(
        torch.ops.dmlfast.proxy_anchor_loss,
        (x.requires_grad_(), p.requires_grad_(), labels, 0.1, 32.0, torch.stack(params).float(), True),
    )


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (lambda ps: (ps[0][:-1], *ps[1:]), ValueError, r"class_center must have shape \(num_classes,\) = \(5,\), got \(4,\)"),
        (lambda ps: (ps[0], ps[1].numpy(), *ps[2:]), TypeError, "class_threshold must be a torch.Tensor"),
        (lambda ps: (*ps[:3], ps[3].to("meta")), ValueError, "easy_negative_weight must be on cpu"),
    ],
)
def test_isa_bad_class_vectors(change, error, pattern):
    x, p, labels, params = isa_inputs(9, 5, 6)
    with pytest.raises(error, match=pattern):
        functional.proxy_isa_loss(x, p, labels, *change(params))
