"""IDML (docs/losses.md §6, §7.5): the introspective Proxy-Anchor op against the float64 reference, its limits,
errors, torch.compile, the two-headed model and a few training steps."""
import math

import pytest
import torch

import dmlfast
from conftest import relative_error
from dmlfast import functional, reference
from dmlfast.models import EmbeddingModel, SmallCNN
from dmlfast.training import mixup_loss


def idml_inputs(batch, num_classes, dim, dtype=torch.float64, uncertainty_dim=None, seed=0, unit=True):
    """Unit embeddings near their class's proxy (as a trained model emits), raw proxies of norm ~0.3-1.5
    and uncertainty embeddings of varied norm, so that g spans (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    p = p * (0.3 + 1.2 * torch.rand(num_classes, 1, generator=gen, dtype=torch.float64)) / math.sqrt(dim)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64) + 2 * math.sqrt(dim) * p[labels]
    if unit:
        x = torch.nn.functional.normalize(x, dim=1)
    v = torch.randn(batch, uncertainty_dim or dim, generator=gen, dtype=torch.float64)
    v = v * torch.rand(batch, 1, generator=gen, dtype=torch.float64) * 2 / math.sqrt(v.shape[1])
    return x.to(dtype), v.to(dtype), p.to(dtype), labels


def run(fn, x, v, p, labels, **kwargs):
    x, v, p = (t.detach().requires_grad_() for t in (x, v, p))
    loss = fn(x, v, p, labels, **kwargs)
    return (loss, *torch.autograd.grad(loss, (x, v, p)))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(64, 10, 16, 16), (40, 3000, 24, 8), (1, 3, 5, 3), (30, 7, 12, 12)])
def test_idml_matches_reference(shape, dtype, tol):
    batch, num_classes, dim, uncertainty_dim = shape
    x, v, p, labels = idml_inputs(batch, num_classes, dim, dtype, uncertainty_dim, unit=shape != (30, 7, 12, 12))
    fused = run(functional.idml_proxy_anchor_loss, x, v, p, labels, margin=0.1, alpha=32.0)
    expected = run(reference.idml_proxy_anchor_loss, x.double(), v.double(), p.double(), labels)
    assert fused[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for got, want, like in zip(fused, expected, (fused[0], x, v, p)):
        assert got.dtype == like.dtype
        assert relative_error(got, want) <= tol


def test_idml_inputs_span_the_gate():
    """The test inputs reach both ends of g = exp(-(a+4)/(5d)) and positive and negative cosines."""
    x, v, p, labels = idml_inputs(64, 10, 16)
    sim = reference.introspective_similarity(x, v, p)
    cosine = reference.cosine(x, p)
    gate = (1 - sim) / (1 - cosine)
    assert gate.min() < 0.05 and gate.max() > 0.5
    assert (cosine[torch.arange(64), labels] > 0.5).any() and (cosine < 0).any()


def test_idml_gradcheck():
    x, v, p, labels = idml_inputs(7, 4, 5, uncertainty_dim=3)
    args = tuple(t.requires_grad_() for t in (x, v, p))
    assert torch.autograd.gradcheck(lambda a, b, c: functional.idml_proxy_anchor_loss(a, b, c, labels), args)


def test_far_proxies_give_proxy_anchor():
    """d → ∞ gives g → 1 and S' → S: with proxies scaled by 1e6 (same directions) IDML is Proxy-Anchor,
    up to terms of order (a+4)/(5d) ~ 1e-12."""
    x, v, p, labels = idml_inputs(48, 12, 16)
    far = p * 1e6
    idml = run(functional.idml_proxy_anchor_loss, x, v, far, labels)
    anchor = run(lambda a, b, c, y: functional.proxy_anchor_loss(a, c, y) + 0 * b.sum(), x, v, far, labels)
    assert relative_error(idml[0], anchor[0]) <= 1e-9
    assert relative_error(idml[1], anchor[1]) <= 1e-9
    assert relative_error(idml[3], anchor[3]) <= 1e-9
    assert idml[2].abs().max() < 1e-9


def test_zero_distance_is_guarded():
    """A proxy equal to its embedding (d = 0) gives S' = 1 there and finite gradients, as the reference's limit."""
    x, v, p, labels = idml_inputs(12, 5, 8)
    p = p.clone()
    p[labels[0]] = x[0]
    loss, *grads = run(functional.idml_proxy_anchor_loss, x, v, p, labels)
    assert math.isfinite(loss.item()) and all(torch.isfinite(g).all() for g in grads)
    p_near = p.clone()
    p_near[labels[0]] = x[0] * (1 + 1e-4)  # d = 1e-8: g = e^{-(a+4)/5e-8} = 0 already
    expected = run(reference.idml_proxy_anchor_loss, x, v, p_near, labels)
    near = run(functional.idml_proxy_anchor_loss, x, v, p_near, labels)
    assert relative_error(loss, expected[0]) <= 1e-5  # the 1e-4 move changes the class's other d by ~1e-4
    for got, want in zip(near, expected):
        assert relative_error(got, want) <= 1e-10


def test_normalized_uncertainty_gets_no_gradient():
    """docs/losses.md §6 ⚠: with v = v_raw / ‖v_raw‖ (the released default) a ≡ 1, so v_raw's gradient is ~0."""
    x, v, p, labels = idml_inputs(32, 6, 10)
    raw = v.clone().requires_grad_()
    functional.idml_proxy_anchor_loss(x, torch.nn.functional.normalize(raw, dim=1), p, labels).backward()
    _, _, grad_v, _ = run(functional.idml_proxy_anchor_loss, x, v, p, labels)
    assert raw.grad.abs().max() < 1e-12 * grad_v.abs().max().clamp_min(1.0)
    assert grad_v.abs().max() > 1e-3


def test_idml_opcheck():
    x, v, p, labels = idml_inputs(9, 5, 6, dtype=torch.float32, uncertainty_dim=4)
    torch.library.opcheck(
        torch.ops.dmlfast.idml_proxy_anchor_loss,
        (x.requires_grad_(), v.requires_grad_(), p.requires_grad_(), labels, 0.1, 32.0),
    )


def test_idml_fake_tensor_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, v, p = torch.empty(5, 3, dtype=torch.bfloat16), torch.empty(5, 2, dtype=torch.float16), torch.empty(4, 3)
        loss, grad_x, grad_v, grad_p, flags = torch.ops.dmlfast.idml_proxy_anchor_loss(x, v, p, torch.zeros(5, dtype=torch.long), 0.1, 32.0)
    assert loss.shape == () and loss.dtype == torch.float32
    assert (grad_x.shape, grad_x.dtype) == ((5, 3), torch.bfloat16)
    assert (grad_v.shape, grad_v.dtype) == ((5, 2), torch.float16)
    assert (grad_p.shape, grad_p.dtype) == ((4, 3), torch.float32)


def test_mixed_input_dtypes():
    """bf16 embeddings, fp16 uncertainty and float32 proxies (as under autocast) go in as they are."""
    x, v, p, labels = idml_inputs(20, 6, 8)
    fused = run(functional.idml_proxy_anchor_loss, x.bfloat16(), v.half(), p.float(), labels)
    expected = run(reference.idml_proxy_anchor_loss, x.bfloat16().double(), v.half().double(), p.float().double(), labels)
    assert [g.dtype for g in fused[1:]] == [torch.bfloat16, torch.float16, torch.float32]
    for got, want in zip(fused, expected):
        assert relative_error(got, want) <= 2e-2


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (lambda x, v, p, y: (x, v[:-1], p, y), ValueError, "uncertainty must have one row per embedding"),
        (lambda x, v, p, y: (x, v[0], p, y), ValueError, r"uncertainty must be 2-D \(batch, uncertainty_dim\)"),
        (lambda x, v, p, y: (x, v.long(), p, y), TypeError, "uncertainty must be float32"),
        (lambda x, v, p, y: (x, v.numpy(), p, y), TypeError, "uncertainty must be a torch.Tensor"),
        (lambda x, v, p, y: (x, v.to("meta"), p, y), ValueError, "embeddings, uncertainty, proxies and labels must be on one device"),
        (lambda x, v, p, y: (x, v, p[:, :-1], y), ValueError, "embedding dimension and proxy dimension differ"),
        (lambda x, v, p, y: (x, v, p, y + 10), ValueError, r"labels must be in \[0, 5\)"),
        (lambda x, v, p, y: (x, v, p, y.double()), TypeError, "labels must be an integer tensor"),
    ],
)
def test_bad_input_errors(change, error, pattern):
    x, v, p, labels = idml_inputs(8, 5, 6, dtype=torch.float32, uncertainty_dim=4)
    with pytest.raises(error, match=pattern):
        functional.idml_proxy_anchor_loss(*change(x, v, p, labels))


@pytest.mark.parametrize("name, row", [("embeddings", 2), ("uncertainty", 3), ("proxies", 1)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_errors(name, row, bad):
    tensors = dict(zip(("embeddings", "uncertainty", "proxies"), idml_inputs(8, 5, 6, dtype=torch.float32)[:3]))
    labels = idml_inputs(8, 5, 6)[3]
    tensors[name] = tensors[name].clone()
    tensors[name][row, 1] = bad
    verb = "contains" if name == "uncertainty" else "contain"
    with pytest.raises(ValueError, match=rf"{name} {verb} NaN or Inf \(first bad row: {row}\)"):
        functional.idml_proxy_anchor_loss(tensors["embeddings"], tensors["uncertainty"], tensors["proxies"], labels)


@pytest.mark.parametrize("name, value, pattern", [("margin", float("nan"), "margin must be finite"),
                                                  ("alpha", 0.0, r"alpha must be > 0.0"),
                                                  ("alpha", "32", "alpha must be a real number")])
def test_bad_hyperparameters(name, value, pattern):
    x, v, p, labels = idml_inputs(8, 5, 6, dtype=torch.float32)
    with pytest.raises((ValueError, TypeError), match=pattern):
        functional.idml_proxy_anchor_loss(x, v, p, labels, **{name: value})
    with pytest.raises((ValueError, TypeError), match=pattern):
        dmlfast.IntrospectiveProxyAnchorLoss(5, 6, **{name: value})


def test_module_matches_functional_and_exports():
    loss_fn = dmlfast.IntrospectiveProxyAnchorLoss(5, 6, margin=0.2, alpha=16.0)
    assert loss_fn.proxies.shape == (5, 6) and "margin=0.2" in repr(loss_fn)
    x, v, _, labels = idml_inputs(8, 5, 6, dtype=torch.float32)
    expected = functional.idml_proxy_anchor_loss(x, v, loss_fn.proxies, labels, margin=0.2, alpha=16.0)
    assert torch.equal(loss_fn(x, v, labels), expected)
    assert "IntrospectiveProxyAnchorLoss" in dmlfast.__all__
    with pytest.raises(TypeError, match="base_loss must be"):
        dmlfast.ProxySynthesis(loss_fn)


def test_torch_compile_fullgraph_training_step():
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU())
    semantic, uncertainty = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    loss_fn = dmlfast.IntrospectiveProxyAnchorLoss(num_classes=5, embedding_size=8)
    images, labels = torch.randn(20, 12), torch.randint(0, 5, (20,))

    def step(inputs, targets):
        h = trunk(inputs)
        return loss_fn(torch.nn.functional.normalize(semantic(h), dim=1), uncertainty(h), targets)

    params = (trunk[0].weight, uncertainty.weight, loss_fn.proxies)
    eager = step(images, labels)
    eager.backward()
    eager_grads = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    loss = torch.compile(step, fullgraph=True)(images, labels)
    loss.backward()
    torch.testing.assert_close(loss, eager)
    for t, want in zip(params, eager_grads):
        torch.testing.assert_close(t.grad, want)


@pytest.mark.parametrize("normalize", [True, False])
def test_uncertainty_head(normalize):
    model = EmbeddingModel(SmallCNN(width=4), 8, uncertainty_head=True, normalize_uncertainty=normalize)
    images = torch.randn(6, 3, 16, 16)
    mu, v = model.forward_with_uncertainty(images)
    torch.testing.assert_close(mu, model(images))  # evaluation reads μ only
    assert torch.allclose(v.norm(dim=1), torch.ones(6)) == normalize
    head = set(map(id, model.uncertainty.parameters()))
    assert head <= set(map(id, model.backbone_parameters()))  # backbone group: base lr, frozen in warm-up
    with pytest.raises(RuntimeError, match="no uncertainty head"):
        EmbeddingModel(SmallCNN(width=4), 8).forward_with_uncertainty(images)


@pytest.mark.parametrize("normalize", [True, False])
def test_training_steps_lower_the_loss(normalize):
    """A few AdamW steps with mixup on class-patterned images; the uncertainty head learns only
    when its output is not normalized (docs/losses.md §6 ⚠)."""
    torch.manual_seed(0)
    classes, per_class = 6, 6
    patterns = torch.rand(classes, 3, 16, 16)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = patterns[labels] + 0.3 * torch.randn(len(labels), 3, 16, 16)
    model = EmbeddingModel(SmallCNN(width=4), 8, uncertainty_head=True, normalize_uncertainty=normalize)
    loss_fn = dmlfast.IntrospectiveProxyAnchorLoss(classes, 8)
    optimizer = torch.optim.AdamW([{"params": model.parameters()}, {"params": loss_fn.parameters(), "lr": 1e-1}], lr=1e-2)
    head_before = model.uncertainty.weight.detach().clone()
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = loss_fn(*model.forward_with_uncertainty(images), labels)
        losses.append(loss.item())
        (loss + mixup_loss(model.forward_with_uncertainty, loss_fn, images, labels)).backward()
        head_grad = model.uncertainty.weight.grad.abs().max().item()
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0]
    if normalize:
        assert head_grad < 1e-6
    else:
        assert head_grad > 1e-4 and not torch.equal(model.uncertainty.weight, head_before)


def test_mixup_is_seeded_and_mixes_both_label_sets():
    images, labels = torch.randn(8, 3), torch.arange(8)
    seen = []

    def loss_fn(outputs, targets):
        seen.append(targets.clone())
        return outputs.sum() * 0 + targets.float().sum()

    torch.manual_seed(5)
    first = mixup_loss(lambda x: (x,), loss_fn, images, labels)
    torch.manual_seed(5)
    assert torch.equal(mixup_loss(lambda x: (x,), loss_fn, images, labels), first)
    assert torch.equal(seen[0], labels) and sorted(seen[1].tolist()) == labels.tolist()
    assert first.item() == pytest.approx(labels.sum().item())  # λ·Σy + (1-λ)·Σy_π with Σy_π = Σy
    with pytest.raises(ValueError, match="differ in batch size"):
        mixup_loss(lambda x: (x,), loss_fn, images, labels[:-1])
