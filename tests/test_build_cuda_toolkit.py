"""The build's CUDA compiler discovery and PyPI fallback (build_tools/cuda_toolkit.py), with its
inputs faked: environment variables, PATH, toolkit folders in tmp_path, the installed torch. The
real fetch-and-build runs in CI (.ci/run-pypi-nvcc)."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cuda_toolkit", ROOT / "build_tools" / "cuda_toolkit.py")
cuda_toolkit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_toolkit)


def make_toolkit(home, version="13.0", wheel_layout=False):
    """bin/nvcc, include/cuda_runtime.h and cuda_runtime_api.h of ``version``, lib/libcudart.so.13
    (plus libcudart.so unless laid out as NVIDIA's wheels)."""
    major, minor = map(int, version.split("."))
    for folder in ("bin", "include", "lib"):
        (home / folder).mkdir(parents=True, exist_ok=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (home / "bin" / "nvcc").chmod(0o755)
    (home / "include" / "cuda_runtime.h").write_text("")
    (home / "include" / "cuda_runtime_api.h").write_text(f"#define CUDART_VERSION  {major * 1000 + minor * 10}\n")
    (home / "lib" / f"libcudart.so.{major}").write_text("")
    if not wheel_layout:
        (home / "lib" / "libcudart.so").symlink_to(f"libcudart.so.{major}")
    return home


def make_torch(site, version="2.14.1+cu130", cuda="'13.0'"):
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "version.py").write_text(
        f"from typing import Optional\n__version__ = '{version}'\ndebug = False\ncuda: Optional[str] = {cuda}\n"
        "hip: Optional[str] = None\n")
    return site


def find(environ, torch_cuda="13.0", dirs=(), usual=()):
    return cuda_toolkit.find_cuda_home(environ, torch_cuda, list(dirs), locations=list(usual))


def test_named_toolkit_wins_whatever_its_version(tmp_path):
    named = make_toolkit(tmp_path / "named", version="12.4")
    other = make_toolkit(tmp_path / "other")
    assert find({"CUDA_HOME": str(named)}, usual=[other]) == str(named)
    assert find({"CUDA_HOME": str(tmp_path / "missing"), "CUDA_PATH": str(named)}, usual=[other]) == str(named)


def test_nvcc_on_path_then_usual_locations(tmp_path):
    on_path = make_toolkit(tmp_path / "on_path")
    usual = make_toolkit(tmp_path / "usual")
    assert find({"PATH": f"/nonexistent:{on_path / 'bin'}"}, usual=[usual]) == str(on_path)
    # A wrapper script on PATH whose folder is no toolkit (/usr/local/bin/nvcc): the usual location.
    wrapper = tmp_path / "wrapper" / "bin"
    wrapper.mkdir(parents=True)
    (wrapper / "nvcc").write_text("#!/bin/sh\n")
    (wrapper / "nvcc").chmod(0o755)
    assert find({"PATH": str(wrapper)}, usual=[tmp_path / "missing", usual]) == str(usual)
    assert find({"PATH": ""}, usual=[tmp_path / "missing"]) is None


def test_usual_locations_prefer_torchs_version():
    assert cuda_toolkit.usual_locations("13.0", "/usr/local") == ["/usr/local/cuda-13.0", "/usr/local/cuda"]
    assert cuda_toolkit.usual_locations(None, "/opt") == ["/opt/cuda"]


def test_found_toolkits_of_another_major_are_skipped(tmp_path):
    old = make_toolkit(tmp_path / "cuda-12.4", version="12.4")
    newer_minor = make_toolkit(tmp_path / "cuda-13.1", version="13.1")
    assert find({"PATH": str(old / "bin")}, usual=[newer_minor]) == str(newer_minor)
    assert find({"PATH": str(old / "bin")}, torch_cuda="12.8", usual=[newer_minor]) == str(old)


def test_nvcc_wheels_in_the_environment(tmp_path):
    site = tmp_path / "site-packages"
    wheels = make_toolkit(site / "nvidia" / "cu13", wheel_layout=True)
    assert find({"PATH": ""}, dirs=[tmp_path / "empty", site]) == str(wheels)
    assert find({"PATH": ""}, torch_cuda="12.8", dirs=[site]) is None  # nvidia/cu12 is not there
    assert find({"PATH": ""}, torch_cuda=None, dirs=[site]) is None


def test_ignoring_the_system_toolkit(tmp_path):
    system = make_toolkit(tmp_path / "system")
    site = tmp_path / "site"
    wheels = make_toolkit(site / "nvidia" / "cu13", wheel_layout=True)
    ignore = {"DMLFAST_IGNORE_SYSTEM_CUDA": "1", "PATH": str(system / "bin")}
    assert find(ignore, dirs=[site], usual=[system]) == str(wheels)
    assert find(ignore, usual=[system]) is None
    assert find({**ignore, "CUDA_HOME": str(system)}, usual=[system]) == str(system)


def test_installed_torch_is_read_not_run(tmp_path):
    cuda_site = make_torch(tmp_path / "a")
    cpu_site = make_torch(tmp_path / "b", version="2.14.1+cpu", cuda="None")
    (cpu_site / "torch" / "__init__.py").write_text("raise SystemExit('torch must not be imported')\n")
    assert cuda_toolkit.installed_torch([tmp_path / "none", cuda_site, cpu_site]) == ("2.14.1+cu130", "13.0")
    assert cuda_toolkit.installed_torch([cpu_site]) == ("2.14.1+cpu", None)
    assert cuda_toolkit.installed_torch([tmp_path / "none"]) is None


def test_cudart_library_for_wheels(tmp_path):
    assert cuda_toolkit.cudart_library(make_toolkit(tmp_path / "toolkit")) == "cudart"
    assert cuda_toolkit.cudart_library(make_toolkit(tmp_path / "wheels", wheel_layout=True)) == ":libcudart.so.13"


def test_toolkit_version(tmp_path):
    assert cuda_toolkit.toolkit_version(make_toolkit(tmp_path / "t", version="12.8")) == "12.8"
    assert cuda_toolkit.toolkit_version(tmp_path / "missing") is None


# ---------------------------------------------------------------------------------------------
# compiler_for_build: what the wheel build does with what it found.

class Recorder:
    """A fake fetch: makes a wheel-layout toolkit in the target folder, or fails with ``error``."""

    def __init__(self, error=None):
        self.error, self.calls = error, []

    def __call__(self, torch_cuda, target, environ, dirs):
        self.calls.append(torch_cuda)
        if self.error:
            raise cuda_toolkit.FetchError(self.error)
        return str(make_toolkit(Path(target) / "nvidia" / f"cu{torch_cuda.split('.')[0]}", wheel_layout=True))


def run_build(environ, dirs, fetch):
    """Runs compiler_for_build; returns (log lines, CUDA_HOME seen inside)."""
    lines = []
    with cuda_toolkit.compiler_for_build(environ, dirs, locations=[], fetch=fetch, log=lines.append):
        inside = environ.get("CUDA_HOME")
    return lines, inside


@pytest.fixture
def cuda_torch(tmp_path):
    """Search folders holding a CUDA 13.0 torch and no toolkit."""
    return [make_torch(tmp_path / "site")]


def test_no_toolkit_fetches_nvcc_for_the_build(cuda_torch):
    environ, fetch = {"PATH": ""}, Recorder()
    lines, inside = run_build(environ, cuda_torch, fetch)
    assert fetch.calls == ["13.0"]
    assert inside.endswith(os.path.join("nvidia", "cu13")) and "dmlfast-nvcc-" in inside
    assert "CUDA_HOME" not in environ and not Path(inside).exists()  # restored, temporary folder removed
    assert lines[-1] == f"dmlfast: building the CUDA kernels with nvcc 13.0 from PyPI at {inside}"


def test_a_found_toolkit_is_used_without_fetching(cuda_torch, tmp_path):
    toolkit = make_toolkit(tmp_path / "toolkit")
    fetch = Recorder()
    lines, inside = run_build({"PATH": "", "CUDA_HOME": str(toolkit)}, cuda_torch, fetch)
    assert fetch.calls == [] and inside == str(toolkit)
    assert lines == [f"dmlfast: building the CUDA kernels with the CUDA toolkit at {toolkit}"]


def test_no_fetch_with_dmlfast_cuda_0_or_a_cpu_torch(cuda_torch, tmp_path):
    fetch = Recorder()
    assert run_build({"PATH": "", "DMLFAST_CUDA": "0"}, cuda_torch, fetch) == ([], None)
    cpu_torch = [make_torch(tmp_path / "cpu", version="2.14.1+cpu", cuda="None")]
    lines, _ = run_build({"PATH": ""}, cpu_torch, fetch)
    assert lines == ["dmlfast: torch 2.14.1+cpu is a CPU-only build: building the CPU kernels only"]
    assert fetch.calls == []


def test_failed_fetch_builds_cpu_kernels_with_one_line_saying_why(cuda_torch):
    reason = "No matching distribution found for nvidia-cuda-nvcc==13.0.*"
    lines, inside = run_build({"PATH": ""}, cuda_torch, Recorder(reason))
    assert inside is None
    message = lines[-1]
    assert message == cuda_toolkit.no_compiler_message(cuda_toolkit.TorchBuild("2.14.1+cu130", "13.0"), reason)
    assert "\n" not in message and message.startswith("dmlfast: building WITHOUT the CUDA kernels")
    for part in ("torch 2.14.1+cu130 needs nvcc 13.0", reason, "CUDA_HOME", "pip install -v --force-reinstall --no-deps .",
                 *(f'"{name}==13.0.*"' for name in cuda_toolkit.PYPI_PACKAGES)):
        assert part in message


def test_failed_fetch_stops_the_build_when_cuda_is_required(cuda_torch):
    with pytest.raises(SystemExit, match=r"DMLFAST_CUDA=1 but the CUDA kernels cannot be built: .*offline"):
        run_build({"PATH": "", "DMLFAST_CUDA": "1"}, cuda_torch, Recorder("offline"))


def test_real_pip_failures_give_their_reason(tmp_path):
    """pip itself (nothing is downloaded): with no index and an empty wheel folder, and with an
    index that refuses connections; a FetchError carrying pip's reason."""
    environ = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    with pytest.raises(cuda_toolkit.FetchError, match=r"^Could not find a version that satisfies the requirement "
                                                      r"nvidia-cuda-nvcc==13\.0\.\*"):
        cuda_toolkit.fetch_from_pypi("13.0", tmp_path / "target", environ, sys.path)
    unreachable = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                   "PIP_FIND_LINKS": "", "PIP_RETRIES": "1"}
    with pytest.raises(cuda_toolkit.FetchError, match=r"^the package index could not be reached \(Could not find"):
        cuda_toolkit.fetch_from_pypi("13.0", tmp_path / "target", unreachable, sys.path)
    with pytest.raises(cuda_toolkit.FetchError, match="no pip to fetch it with"):
        cuda_toolkit.fetch_from_pypi("13.0", tmp_path / "target", environ, [])
