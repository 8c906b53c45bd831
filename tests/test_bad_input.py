"""Bad input gets a clear error that names the argument and the problem, never a NaN loss."""
import pytest
import torch

from dmlfast import functional

FUNCTIONS = [functional.proxy_anchor_loss, functional.proxy_nca_loss]


def good_inputs(batch=8, num_classes=5, dim=4):
    return torch.randn(batch, dim), torch.randn(num_classes, dim), torch.randint(0, num_classes, (batch,))


@pytest.fixture(params=FUNCTIONS, ids=lambda f: f.__name__)
def loss_fn(request):
    return request.param


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda x, p, y: (x, p, y + 5), ValueError, r"labels must be in \[0, 5\).*max"),
        (lambda x, p, y: (x, p, y - 9), ValueError, r"labels must be in \[0, 5\).*min -"),
        (lambda x, p, y: (x, p, y.float()), TypeError, r"labels must be an integer tensor \(int64, int32, int16, int8 or uint8\), got a Float"),
        (lambda x, p, y: (x, p, y.bool()), TypeError, r"labels must be an integer tensor"),
        (lambda x, p, y: (x, p, y[:-1]), ValueError, r"one entry per embedding: embeddings has 8 rows, labels has 7"),
        (lambda x, p, y: (x, p[:, :3], y), ValueError, r"embeddings are 4-d, proxies are 3-d"),
        (lambda x, p, y: (x[:0], p, y[:0]), ValueError, r"batch is empty"),
        (lambda x, p, y: (x[0], p, y), ValueError, r"embeddings must be 2-D"),
        (lambda x, p, y: (x, p[0], y), ValueError, r"proxies must be 2-D"),
        (lambda x, p, y: (x, p, y[:, None]), ValueError, r"labels must be 1-D"),
        (lambda x, p, y: (x.long(), p, y), TypeError, r"embeddings must be float32"),
        (lambda x, p, y: (x.numpy(), p, y), TypeError, r"embeddings must be a torch.Tensor, got ndarray"),
        (lambda x, p, y: (x, p.to("meta"), y), ValueError, r"one device"),
    ],
)
def test_invalid_tensors(loss_fn, mutate, error, pattern):
    with pytest.raises(error, match=pattern):
        loss_fn(*mutate(*good_inputs()))


@pytest.mark.parametrize("which", ["embeddings", "proxies"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_errors(loss_fn, which, bad):
    x, p, y = good_inputs()
    (x if which == "embeddings" else p)[2, 1] = bad
    with pytest.raises(ValueError, match=rf"{which} contain NaN or Inf \(first bad row: 2\)"):
        loss_fn(x, p, y)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"alpha": 0.0}, ValueError, "alpha must be > 0.0"),
        ({"alpha": float("inf")}, ValueError, "alpha must be > 0.0"),
        ({"margin": float("nan")}, ValueError, "margin must be finite"),
        ({"margin": "0.1"}, TypeError, "margin must be a real number, got str"),
    ],
)
def test_proxy_anchor_hyperparameters(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        functional.proxy_anchor_loss(*good_inputs(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"scale": -1.0}, ValueError, "scale must be > 0.0"),
        ({"smoothing": 1.0}, ValueError, r"smoothing must be in \[0.0, 1.0\)"),
        ({"exclude_positive": 1}, TypeError, "exclude_positive must be a bool"),
        ({"exclude_positive": True, "smoothing": 0.1}, ValueError, "use smoothing=0 with exclude_positive=True"),
    ],
)
def test_proxy_nca_hyperparameters(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        functional.proxy_nca_loss(*good_inputs(), **kwargs)


def test_single_class_cannot_exclude_the_positive():
    x, p, y = good_inputs(num_classes=1)
    with pytest.raises(ValueError, match="exclude_positive=True needs at least 2 proxies"):
        functional.proxy_nca_loss(x, p, y, exclude_positive=True)
    with pytest.raises(ValueError, match="label smoothing needs at least 2 proxies"):
        functional.proxy_nca_loss(x, p, y, smoothing=0.1)


def test_raw_op_validates_too():
    x, p, y = good_inputs()
    with pytest.raises(ValueError, match="labels must be in"):
        torch.ops.dmlfast.proxy_anchor_loss(x, p, y + 100, 0.1, 32.0)
