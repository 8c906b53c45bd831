"""Shared pytest fixtures and markers for dmlfast's tests."""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")


def relative_error(actual, expected):
    """‖actual − expected‖ / ‖expected‖ in float64 (absolute error when expected is 0)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff
