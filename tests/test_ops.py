"""Operator registration: opcheck, fake tensors, autocast, torch.compile, build info."""
import pytest
import torch

import dmlfast
from dmlfast import functional

OPS = {
    "proxy_anchor_loss": (torch.ops.dmlfast.proxy_anchor_loss, (0.1, 32.0)),
    "proxy_nca_loss": (torch.ops.dmlfast.proxy_nca_loss, (18.0, 0.1, False)),
}


def sample_args(dtype=torch.float32, batch=10, num_classes=6, dim=7):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, dim, generator=gen).to(dtype).requires_grad_()
    p = torch.randn(num_classes, dim, generator=gen).to(dtype).requires_grad_()
    return x, p, torch.randint(0, num_classes, (batch,), generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPS))
def test_opcheck(name, dtype):
    op, scalars = OPS[name]
    torch.library.opcheck(op, (*sample_args(dtype), *scalars))


def test_build_info_fields():
    info = dmlfast.build_info()
    assert info["version"] == dmlfast.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_kernels"], bool) and isinstance(info["openmp"], bool)
    assert isinstance(info["cpu_vector_exp"], bool)
    assert isinstance(info["cuda_arch_list"], list)
    assert info["cuda_kernels"] == bool(info["cuda_arch_list"])


@pytest.mark.parametrize("name", list(OPS))
def test_fake_tensor_shapes_and_dtypes(name):
    op, scalars = OPS[name]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 3, dtype=torch.bfloat16)
        p = torch.empty(4, 3)
        labels = torch.zeros(5, dtype=torch.long)
        loss, grad_x, grad_p, flags = op(x, p, labels, *scalars)
    assert loss.shape == () and loss.dtype == torch.float32
    assert flags.shape == (4,) and flags.dtype == torch.int32
    assert grad_x.shape == (5, 3) and grad_x.dtype == torch.bfloat16
    assert grad_p.shape == (4, 3) and grad_p.dtype == torch.float32


def test_autocast_leaves_inputs_alone():
    """Under autocast a bf16 embedding and float32 proxies reach the op as they are."""
    x, p, labels = sample_args()
    linear = torch.nn.Linear(7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = linear(x)
        assert embeddings.dtype == torch.bfloat16
        loss = functional.proxy_anchor_loss(embeddings, p, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    assert p.grad.dtype == torch.float32 and linear.weight.grad.dtype == torch.float32
    expected = functional.proxy_anchor_loss(embeddings.detach(), p.detach(), labels)
    assert torch.equal(loss.detach(), expected)


@pytest.mark.parametrize("loss_name", ["ProxyAnchorLoss", "ProxyNCALoss", "NormSoftmaxLoss", "ArcFaceLoss",
                                       "SoftTripleLoss"])
def test_torch_compile_fullgraph_training_step(loss_name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    loss_fn = getattr(dmlfast, loss_name)(num_classes=5, embedding_size=8)
    images, labels = torch.randn(20, 12), torch.randint(0, 5, (20,))

    def step(inputs, targets):
        return loss_fn(model(inputs), targets)

    eager = step(images, labels)
    eager.backward()
    eager_grads = [t.grad.clone() for t in (model[0].weight, loss_fn.proxies)]
    model.zero_grad()
    loss_fn.zero_grad()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(images, labels)
    loss.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(model[0].weight.grad, eager_grads[0])
    torch.testing.assert_close(loss_fn.proxies.grad, eager_grads[1])


def test_run_exponential_is_within_one_ulp_and_keeps_the_edges():
    """The CPU kernels' runs of exponentials (AVX2 lanes where the processor has them, see
    build_info()["cpu_vector_exp"], the C library otherwise): within 1 ulp of e^x over the whole float
    range, subnormals included, and exact at the edges (NaN, ±inf, overflow, underflow), in runs of
    every length (the lanes' tail)."""
    from dmlfast import _ops

    x = torch.linspace(-110.0, 90.0, 2_000_001)
    got = _ops._C._exp_run(x).double()
    exact = torch.exp(x.double())
    rounded = exact.float()
    ulp = (torch.nextafter(rounded, torch.tensor(float("inf"))) - rounded).double()
    normal = torch.isfinite(rounded) & (rounded >= torch.finfo(torch.float32).tiny)
    assert ((got - exact).abs() / ulp)[normal].max() < 1.0
    subnormal = (rounded > 0) & (rounded < torch.finfo(torch.float32).tiny)
    assert ((got - exact).abs()[subnormal] <= 1.5e-45).all()
    assert torch.equal(got[~torch.isfinite(rounded)], exact.float().double()[~torch.isfinite(rounded)])
    edges = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 89.0, 1e30, -104.5, -1e30])
    for length in range(1, 20):
        values = edges.repeat(3)[:length]
        torch.testing.assert_close(_ops._C._exp_run(values), torch.exp(values), equal_nan=True, rtol=0, atol=0)
    wide = torch.linspace(-50, 50, 1001, dtype=torch.float64)
    torch.testing.assert_close(_ops._C._exp_run(wide), torch.exp(wide), rtol=4e-16, atol=0)  # the C library's exp
