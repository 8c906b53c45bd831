"""setuptools' PEP 517 backend, made to build against the torch that will import dmlfast.

pip normally builds in an isolated environment with the build requirements installed fresh; a
torch installed there could differ from the user's (another version, or CPU instead of CUDA), and
an extension compiled against it fails to load, or worse. This backend asks for torch in the build
environment only when the target environment has none; otherwise setup.py imports the target's
own torch (its site-packages are still reachable through sysconfig).
"""
import importlib.metadata
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the rest of the PEP 517 interface)


def _target_has_torch():
    paths = [sysconfig.get_paths()[key] for key in ("platlib", "purelib")]
    return any(True for _ in importlib.metadata.distributions(name="torch", path=paths))


def _extra_requirements():
    return [] if _target_has_torch() else ["torch"]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _extra_requirements()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _extra_requirements()
