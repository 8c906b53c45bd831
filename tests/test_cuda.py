"""CUDA kernels against the CPU op on the same inputs. Skipped with a reason when no GPU is visible."""
import pytest
import torch

import dmlfast
from dmlfast import functional
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
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for cpu_value, gpu_value in zip(on_cpu, on_gpu):
        assert gpu_value.device.type == "cuda" and gpu_value.dtype == cpu_value.dtype
        assert relative_error(gpu_value.cpu(), cpu_value) <= tol


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
