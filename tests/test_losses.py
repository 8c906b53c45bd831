"""The fused losses against the float64 reference (docs/losses.md §1, §2, §7): values, gradients, edge cases."""
import math

import pytest
import torch

from dmlfast import functional, reference
from conftest import relative_error

LOSSES = {
    "proxy_anchor": (functional.proxy_anchor_loss, reference.proxy_anchor_loss, {}),
    "proxy_anchor_margin": (functional.proxy_anchor_loss, reference.proxy_anchor_loss, {"margin": -0.2, "alpha": 16.0}),
    "nca": (functional.proxy_nca_loss, reference.proxy_nca_loss, {}),
    "nca_smoothing": (functional.proxy_nca_loss, reference.proxy_nca_loss, {"smoothing": 0.1, "scale": 16.0}),
    "nca_classic": (functional.proxy_nca_loss, reference.proxy_nca_loss, {"exclude_positive": True}),
}

# (B, C, D, label pattern): B=1, C=1, absent classes, one class for all, D not a multiple of 8,
# a C large enough to span several class tiles, and a D over several positive-scatter chunks.
SHAPES = [
    (1, 1, 8, "random"),
    (1, 5, 3, "random"),
    (7, 1, 4, "random"),
    (12, 7, 5, "random"),
    (16, 40, 13, "absent"),
    (32, 10, 16, "one_class"),
    (96, 3000, 37, "random"),
    (40, 30, 200, "random"),  # D over two positive-scatter chunks of 128, the second partial
]


def make_inputs(batch, num_classes, dim, pattern, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    p = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    if pattern == "one_class":
        labels = torch.full((batch,), num_classes - 1, dtype=torch.long)
    elif pattern == "absent":
        labels = torch.randint(0, max(1, num_classes // 4), (batch,), generator=gen)
    else:
        labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return x.to(dtype), p.to(dtype), labels


def applicable(name, num_classes):
    kwargs = LOSSES[name][2]
    return num_classes > 1 or not (kwargs.get("smoothing") or kwargs.get("exclude_positive"))


def value_and_grads(fn, x, p, labels, **kwargs):
    x = x.detach().requires_grad_()
    p = p.detach().requires_grad_()
    loss = fn(x, p, labels, **kwargs)
    grad_x, grad_p = torch.autograd.grad(loss, (x, p))
    return loss, grad_x, grad_p


def check_against_reference(name, x, p, labels, tol):
    fused, ref, kwargs = LOSSES[name]
    loss, grad_x, grad_p = value_and_grads(fused, x, p, labels, **kwargs)
    # The reference sees exactly the values the fused op saw, promoted to float64.
    ref_loss, ref_x, ref_p = value_and_grads(ref, x.double(), p.double(), labels, **kwargs)
    assert torch.isfinite(loss)
    assert grad_x.dtype == x.dtype and grad_p.dtype == p.dtype
    assert relative_error(loss, ref_loss) <= tol, (loss.item(), ref_loss.item())
    assert relative_error(grad_x, ref_x) <= tol
    assert relative_error(grad_p, ref_p) <= tol


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(LOSSES))
def test_float32_matches_float64_reference(name, shape):
    if not applicable(name, shape[1]):
        pytest.skip("smoothing / exclude_positive need at least 2 classes (an error, tested below)")
    x, p, labels = make_inputs(*shape)
    check_against_reference(name, x, p, labels, tol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(LOSSES))
def test_float64_matches_reference_to_rounding(name, shape):
    if not applicable(name, shape[1]):
        pytest.skip("smoothing / exclude_positive need at least 2 classes")
    x, p, labels = make_inputs(*shape, dtype=torch.float64)
    check_against_reference(name, x, p, labels, tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(LOSSES))
def test_half_precision_embeddings_and_proxies(name, dtype):
    x, p, labels = make_inputs(64, 500, 24, "random", dtype=dtype)
    check_against_reference(name, x, p, labels, tol=2e-2)


@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_embeddings_with_float32_proxies(name):
    """The autocast situation: bf16 embeddings meet float32 proxies; neither is cast."""
    x, p, labels = make_inputs(48, 200, 32, "random")
    check_against_reference(name, x.to(torch.bfloat16), p, labels, tol=2e-2)


@pytest.mark.parametrize("alpha", [256.0, 4096.0])
def test_very_large_alpha_stays_finite_and_exact(alpha):
    """The official raw-exp formula overflows here (e^{α(1+δ)}); the log-space kernel does not."""
    x, p, labels = make_inputs(40, 30, 16, "random", dtype=torch.float64)
    official_negative_sum = torch.exp(alpha * (reference.cosine(x, p).float() + 0.1)).sum()  # float32, as run
    assert math.isinf(official_negative_sum.item())
    fused, ref, _ = LOSSES["proxy_anchor"]
    loss, grad_x, grad_p = value_and_grads(fused, x, p, labels, alpha=alpha)
    ref_loss, ref_x, ref_p = value_and_grads(ref, x, p, labels, alpha=alpha)
    assert relative_error(loss, ref_loss) <= 1e-12
    assert relative_error(grad_x, ref_x) <= 1e-10 and relative_error(grad_p, ref_p) <= 1e-10
    # In float32 the cosines carry ~1e-7 error, which α multiplies in the exponent: the error
    # bound scales with α, and everything stays finite.
    loss32, grad_x32, grad_p32 = value_and_grads(fused, x.float(), p.float(), labels, alpha=alpha)
    assert torch.isfinite(loss32) and torch.isfinite(grad_x32).all() and torch.isfinite(grad_p32).all()
    assert relative_error(grad_p32, ref_p) <= alpha * 1e-7


def test_float16_does_not_overflow_where_the_official_formula_does():
    x, p, labels = make_inputs(64, 50, 32, "random", dtype=torch.float16)
    official = torch.exp(32.0 * (reference.cosine(x, p) + 0.1)).sum(dim=0)  # the raw-exp sums, in fp16
    assert torch.isinf(official).any()
    loss = functional.proxy_anchor_loss(x, p, labels)
    assert torch.isfinite(loss)
    assert relative_error(loss, reference.proxy_anchor_loss(x.double(), p.double(), labels)) <= 2e-2


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck_float64(name):
    fused, _, kwargs = LOSSES[name]
    x, p, labels = make_inputs(6, 4, 5, "random", dtype=torch.float64)
    x.requires_grad_()
    p.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fused(a, b, labels, **kwargs), (x, p))


def test_upstream_gradient_scales_the_saved_gradients():
    x, p, labels = make_inputs(10, 6, 8, "random")
    _, grad_x, grad_p = value_and_grads(functional.proxy_anchor_loss, x, p, labels)
    x2, p2 = x.clone().requires_grad_(), p.clone().requires_grad_()
    (2.5 * functional.proxy_anchor_loss(x2, p2, labels)).backward()
    torch.testing.assert_close(x2.grad, 2.5 * grad_x)
    torch.testing.assert_close(p2.grad, 2.5 * grad_p)


@pytest.mark.parametrize("name", list(LOSSES))
def test_deterministic_run_to_run(name):
    fused, _, kwargs = LOSSES[name]
    x, p, labels = make_inputs(64, 2500, 48, "random")
    first = value_and_grads(fused, x, p, labels, **kwargs)
    second = value_and_grads(fused, x, p, labels, **kwargs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_softmax_without_tile_reuse_matches_reference():
    """Enough classes that pass 2 recomputes the tiles instead of keeping them (> 64 MiB)."""
    x, p, labels = make_inputs(24, 200_000, 64, "random")
    for name in ("nca", "nca_smoothing"):
        check_against_reference(name, x, p, labels, tol=1e-6)


@pytest.mark.parametrize("num_classes", [255, 256, 257, 513, 700])
@pytest.mark.parametrize("name", ["nca", "nca_smoothing", "nca_classic"])
def test_softmax_chunk_edges_match_reference(name, num_classes):
    """Softmax rows are reduced in chunks of columns (256 on the CPU): a last chunk of one
    column, chunk and tile boundaries, and targets on them, the excluded target alone in its chunk."""
    x, p, labels = make_inputs(20, num_classes, 9, "random", seed=num_classes)
    labels[:4] = torch.tensor([0, 255, 256, num_classes - 1]).clamp(max=num_classes - 1)
    check_against_reference(name, x, p, labels, tol=1e-6)


def test_proxy_anchor_many_classes_matches_reference():
    x, p, labels = make_inputs(24, 200_000, 64, "random")
    check_against_reference("proxy_anchor", x, p, labels, tol=1e-6)


def test_zero_embedding_row_gives_finite_loss_and_gradient():
    x, p, labels = make_inputs(8, 5, 6, "random")
    x[3] = 0
    check_against_reference("proxy_anchor", x, p, labels, tol=1e-6)


def test_repeated_backward_through_one_graph_gives_the_same_gradients():
    """The first backward hands over the forward's gradients in place; later ones recompute."""
    x, p, labels = make_inputs(12, 9, 6, "random")
    x.requires_grad_()
    p.requires_grad_()
    loss = functional.proxy_nca_loss(x, p, labels, smoothing=0.1)
    first = torch.autograd.grad(loss, (x, p), retain_graph=True)
    second = torch.autograd.grad(3.0 * loss, (x, p))
    torch.testing.assert_close(second[0], 3.0 * first[0])
    torch.testing.assert_close(second[1], 3.0 * first[1])


@pytest.mark.parametrize("seed", range(10))
def test_random_shapes_match_reference(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    batch, num_classes, dim = (int(torch.randint(low, high, (1,), generator=gen)) for low, high in ((1, 97), (1, 400), (2, 70)))
    x, p, labels = make_inputs(batch, num_classes, dim, "random", seed=seed)
    for name in LOSSES:
        if applicable(name, num_classes):
            check_against_reference(name, x, p, labels, tol=1e-6)
