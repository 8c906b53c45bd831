"""setuptools' PEP 517 backend, made to build against the torch that will import dmlfast, with
a CUDA compiler whenever torch is a CUDA build.

pip normally builds in an isolated environment with the build requirements installed fresh; a
torch installed there could differ from the user's (another version, or CPU instead of CUDA), and
an extension compiled against it fails to load, or worse. This backend asks for torch in the build
environment only when the target environment has none; otherwise setup.py imports the target's
own torch (its site-packages are still reachable through sysconfig).

Most CUDA builds of torch come without nvcc. When no CUDA toolkit is found, the wheel build
fetches NVIDIA's nvcc wheels of torch's CUDA version from PyPI into a temporary folder for the
build (build_tools/cuda_toolkit.py); where none can be had it builds the CPU kernels and says why.
"""
import importlib.metadata
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the rest of the PEP 517 interface)

from build_tools.cuda_toolkit import compiler_for_build


def _target_has_torch():
    paths = [sysconfig.get_paths()[key] for key in ("platlib", "purelib")]
    return any(True for _ in importlib.metadata.distributions(name="torch", path=paths))


def _extra_requirements():
    return [] if _target_has_torch() else ["torch"]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _extra_requirements()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _extra_requirements()


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with compiler_for_build():
        return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    with compiler_for_build():
        return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
