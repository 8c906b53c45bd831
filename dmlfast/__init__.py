"""dmlfast: fused proxy losses, fast data loading and exact retrieval evaluation for deep metric learning.

The losses and ``build_info`` load the compiled extension (dmlfast._C) on first use, so that
``dmlfast.data`` and ``dmlfast.evaluation`` import without it. ``dmlfast.load(checkpoint)`` gives a
trained model ready to embed images (:mod:`dmlfast.inference`).
"""
import importlib

from ._version import __version__

_LAZY = {
    "ProxyAnchorLoss": "dmlfast.losses",
    "ProxyNCALoss": "dmlfast.losses",
    "NormSoftmaxLoss": "dmlfast.losses",
    "ProxyISALoss": "dmlfast.losses",
    "ProxySynthesis": "dmlfast.losses",
    "MovingProxyLoss": "dmlfast.losses",
    "IntrospectiveProxyAnchorLoss": "dmlfast.losses",
    "CosFaceLoss": "dmlfast.margin_losses",
    "ArcFaceLoss": "dmlfast.margin_losses",
    "SubCenterArcFaceLoss": "dmlfast.margin_losses",
    "SoftTripleLoss": "dmlfast.margin_losses",
    "build_info": "dmlfast._ops",
    "set_value_checks": "dmlfast._ops",
    "value_checks": "dmlfast._ops",
    "value_checks_enabled": "dmlfast._ops",
    "load": "dmlfast.inference",
    "functional": "dmlfast.functional",
    "reference": "dmlfast.reference",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'dmlfast' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"dmlfast.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
