"""Which CUDA compiler builds dmlfast's CUDA kernels: a local toolkit, or nvcc from PyPI.

build_backend.py calls :func:`compiler_for_build` around the build (it fetches NVIDIA's nvcc
wheels of torch's CUDA version when no toolkit is found); setup.py calls :func:`find_cuda_home`
and :func:`cudart_library` to build with what is there. Nothing here imports torch: the torch
being built against is read from its ``torch/version.py``, parsed, never run. Every function
takes its inputs (environment variables, search folders) as arguments, so tests can fake them.
"""
import ast
import contextlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

#: NVIDIA's wheels that make a CUDA toolkit for compiling: nvcc, its headers (crt, runtime, cccl)
#: and its device compiler (nvvm). Fetched at torch's CUDA major.minor (CUDA 13 and later; PyPI's
#: CUDA 12 nvcc wheels carry ptxas only). They unpack under nvidia/cu<major>/.
PYPI_PACKAGES = ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-runtime", "nvidia-cuda-cccl")


class TorchBuild(NamedTuple):
    version: str         # e.g. "2.14.1+cu130"
    cuda: Optional[str]  # e.g. "13.0"; None for a CPU-only torch


def search_dirs():
    """Where the build finds torch and installed nvcc wheels: this process's sys.path (pip's build
    environment) and the site-packages of the environment being installed into."""
    target = [sysconfig.get_paths()[key] for key in ("platlib", "purelib")]
    return list(dict.fromkeys([*sys.path, *target]))


def installed_torch(dirs):
    """The first torch found in ``dirs`` (its version.py parsed), or None."""
    for folder in dirs:
        path = Path(folder or ".", "torch", "version.py")
        if path.is_file():
            values = {}
            for node in ast.parse(path.read_text()).body:
                target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
                if isinstance(target, ast.Name) and isinstance(node.value, ast.Constant):
                    values[target.id] = node.value.value
            return TorchBuild(values.get("__version__", "unknown"), values.get("cuda"))
    return None


def is_toolkit(home):
    """A folder with bin/nvcc and include/cuda_runtime.h."""
    return bool(home) and Path(home, "bin", "nvcc").is_file() and Path(home, "include", "cuda_runtime.h").is_file()


def toolkit_version(home):
    """``"major.minor"`` from the toolkit's include/cuda_runtime_api.h, or None."""
    try:
        text = Path(home, "include", "cuda_runtime_api.h").read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"^#define\s+CUDART_VERSION\s+(\d+)", text, re.MULTILINE)
    return f"{int(match[1]) // 1000}.{int(match[1]) % 1000 // 10}" if match else None


def _same_major(version, torch_cuda):
    return version is None or torch_cuda is None or version.split(".")[0] == torch_cuda.split(".")[0]


def usual_locations(torch_cuda, root="/usr/local"):
    """Where CUDA toolkits are installed: the folder of torch's version first, then the default."""
    return ([f"{root}/cuda-{torch_cuda}"] if torch_cuda else []) + [f"{root}/cuda"]


def find_cuda_home(environ, torch_cuda, dirs, locations=None):
    """The CUDA toolkit to build with (a folder with bin/nvcc and include/cuda_runtime.h), or None.

    In order: ``$CUDA_HOME`` and ``$CUDA_PATH`` as given; then, unless
    ``DMLFAST_IGNORE_SYSTEM_CUDA=1``, the folder above the nvcc on ``$PATH`` and ``locations``
    (default: :func:`usual_locations`); then nvcc wheels installed
    in ``dirs`` (nvidia/cu<major>/). Found (not named) toolkits of another CUDA major than torch's
    ``torch_cuda`` are skipped: torch refuses to build with them.
    """
    for home in (environ.get("CUDA_HOME"), environ.get("CUDA_PATH")):
        if is_toolkit(home):
            return str(home)
    found = []
    if environ.get("DMLFAST_IGNORE_SYSTEM_CUDA", "").strip() != "1":
        nvcc = shutil.which("nvcc", path=environ.get("PATH", ""))
        if nvcc:
            found.append(os.path.dirname(os.path.dirname(nvcc)))
        found += usual_locations(torch_cuda) if locations is None else locations
    if torch_cuda:
        found += [os.path.join(folder, "nvidia", f"cu{torch_cuda.split('.')[0]}") for folder in dirs if folder]
    for home in found:
        if is_toolkit(home) and _same_major(toolkit_version(home), torch_cuda):
            return str(home)
    return None


def cudart_library(home):
    """The name to link the CUDA runtime by: ``cudart``, or ``:libcudart.so.<N>`` where the
    toolkit has only the versioned file (NVIDIA's wheels), which ``-lcudart`` does not find."""
    for lib in ("lib64", "lib"):
        if Path(home, lib, "libcudart.so").exists():
            return "cudart"
    versioned = sorted(Path(home, "lib").glob("libcudart.so.*"))
    return f":{versioned[0].name}" if versioned else "cudart"


class FetchError(Exception):
    """nvcc could not be had from PyPI; the message says why."""


def pypi_requirements(torch_cuda):
    return [f"{name}=={torch_cuda}.*" for name in PYPI_PACKAGES]


def _pip_command(dirs):
    """How to run pip: the first pip package in ``dirs`` (sys.path, then the target environment's,
    which pip's isolated build hides from sys.path), run as a folder; None when there is none.
    Looked up on disk: importlib's find_spec("pip") would make setuptools drop its distutils."""
    for folder in dirs:
        if folder and Path(folder, "pip", "__main__.py").is_file():
            return [sys.executable, str(Path(folder, "pip"))]
    return None


def fetch_from_pypi(torch_cuda, target, environ, dirs):
    """Installs the nvcc wheels of CUDA ``torch_cuda`` (major.minor) into the folder ``target`` with
    pip (its configuration: index, mirrors, proxies, cache) and returns the toolkit folder in it;
    raises FetchError with pip's reason."""
    pip = _pip_command(dirs)
    if pip is None:
        raise FetchError("no pip to fetch it with")
    command = [*pip, "install", "--target", str(target), "--no-deps", "--only-binary", ":all:", "--no-input",
               "--disable-pip-version-check", *pypi_requirements(torch_cuda)]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(environ))
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR")]
        reason = (errors or lines[-1:] or [f"pip exited with {result.returncode}"])[0]
        if any("Failed to establish a new connection" in line or "connection broken" in line for line in lines):
            reason = f"the package index could not be reached ({reason})"
        raise FetchError(reason)
    home = Path(target, "nvidia", f"cu{torch_cuda.split('.')[0]}")
    if not is_toolkit(home):
        raise FetchError(f"the installed wheels have no bin/nvcc and include/cuda_runtime.h under {home}")
    return str(home)


def why_and_what_to_do(torch_build, reason):
    """Why no CUDA compiler could be had (``reason``: the fetch's), and how to get one."""
    cuda = torch_build.cuda
    wheels = " ".join(f'"{requirement}"' for requirement in pypi_requirements(cuda))
    return (f"torch {torch_build.version} needs nvcc {cuda}, no CUDA {cuda.split('.')[0]} toolkit was found (CUDA_HOME, "
            f"PATH, /usr/local/cuda) and fetching nvcc from PyPI failed: {reason}. To build them, reinstall where PyPI "
            f"(or your pip index) is reachable, or first `pip install {wheels}` or install a CUDA {cuda} toolkit and "
            "set CUDA_HOME; then `pip install -v --force-reinstall --no-deps .`")


def no_compiler_message(torch_build, reason):
    """The one line the build prints when it goes on with the CPU kernels only."""
    return ("dmlfast: building WITHOUT the CUDA kernels (CUDA tensors will run the slower PyTorch fallback): "
            + why_and_what_to_do(torch_build, reason))


@contextlib.contextmanager
def compiler_for_build(environ=os.environ, dirs=None, locations=None, fetch=fetch_from_pypi, log=print):
    """Around the build: when torch is a CUDA build and no toolkit is found, fetches nvcc from PyPI
    into a temporary folder and points ``CUDA_HOME`` at it until the build ends. Logs one line on
    what the build uses. Where nothing can be had the build goes on with the CPU kernels (one
    line saying why and what to do), or stops with that reason under ``DMLFAST_CUDA=1``. Does
    nothing with ``DMLFAST_CUDA=0``. ``dirs`` and ``locations``: see :func:`find_cuda_home`."""
    dirs = search_dirs() if dirs is None else dirs
    choice = environ.get("DMLFAST_CUDA", "").strip()
    torch_build = installed_torch(dirs)
    if choice == "0" or torch_build is None or torch_build.cuda is None:
        if choice != "0" and torch_build is not None:
            log(f"dmlfast: torch {torch_build.version} is a CPU-only build: building the CPU kernels only")
        yield
        return
    home = find_cuda_home(environ, torch_build.cuda, dirs, locations)
    if home is not None:
        log(f"dmlfast: building the CUDA kernels with the CUDA toolkit at {home}")
        yield
        return
    with tempfile.TemporaryDirectory(prefix="dmlfast-nvcc-") as target:
        log(f"dmlfast: no CUDA {torch_build.cuda} toolkit found; fetching nvcc {torch_build.cuda} from PyPI "
            f"({', '.join(PYPI_PACKAGES)}) into {target}")
        try:
            home = fetch(torch_build.cuda, target, environ, dirs)
        except FetchError as error:
            if choice == "1":
                raise SystemExit("DMLFAST_CUDA=1 but the CUDA kernels cannot be built: "
                                 + why_and_what_to_do(torch_build, error)) from None
            log(no_compiler_message(torch_build, error))
            yield
            return
        log(f"dmlfast: building the CUDA kernels with nvcc {toolkit_version(home)} from PyPI at {home}")
        previous = environ.get("CUDA_HOME")
        environ["CUDA_HOME"] = home
        try:
            yield
        finally:
            if previous is None:
                environ.pop("CUDA_HOME", None)
            else:
                environ["CUDA_HOME"] = previous
