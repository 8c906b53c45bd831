"""Builds dmlfast._C with torch's C++ extension machinery and ninja.

The CPU kernels are always compiled; the CUDA kernels whenever nvcc and a CUDA build of torch
are present, even with no GPU visible. Environment knobs:

- ``DMLFAST_CUDA=0|1``: skip or require the CUDA kernels (default: build them when possible).
- ``CUDA_HOME``: the CUDA toolkit (default: found from nvcc on PATH or /usr/local/cuda).
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures, e.g. ``"9.0"``. Default: the visible GPUs, or
  ``"8.0;9.0"`` when none can be queried.
- ``MAX_JOBS``: parallel compile jobs (ninja).

The extension is compiled against the torch that will import it: when pip builds in an isolated
environment, the backend in build_backend.py points this script at the target environment's torch
instead of letting pip install a second, possibly different one (see README, "Build options").
"""
import glob
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

DEFAULT_ARCH_LIST = "8.0;9.0"


def import_target_torch():
    """Import the torch of the environment being installed into, also from pip's isolated build."""
    try:
        import torch  # noqa: F401
    except ImportError:
        for key in ("platlib", "purelib"):
            path = sysconfig.get_paths()[key]
            if path not in sys.path:
                sys.path.append(path)
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit(
                "dmlfast compiles against the torch it will run with, and none was found.\n"
                "Install torch first (CPU or CUDA build, see https://pytorch.org), then run\n"
                "  pip install .\nagain."
            )
    import torch

    return torch


def find_cuda_home():
    """The CUDA toolkit to build with: the first of $CUDA_HOME, $CUDA_PATH, the folder above the
    nvcc on PATH and /usr/local/cuda that has both bin/nvcc and include/cuda_runtime.h.

    torch guesses the folder above nvcc, which is wrong when nvcc on PATH is a wrapper script
    (e.g. /usr/local/bin/nvcc calling /usr/local/cuda-13.0/bin/nvcc); exporting the checked
    folder as CUDA_HOME before torch.utils.cpp_extension is imported fixes its guess.
    """
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(nvcc)) if nvcc else None, "/usr/local/cuda"]
    for home in filter(None, candidates):
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return home
    return None


def want_cuda(torch, cuda_home):
    choice = os.environ.get("DMLFAST_CUDA", "").strip()
    if choice not in ("", "0", "1"):
        sys.exit(f"DMLFAST_CUDA must be 0 or 1, got {choice!r}")
    possible = torch.version.cuda is not None and cuda_home is not None
    if choice == "1" and not possible:
        reason = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit with nvcc and headers was found (set CUDA_HOME)"
        sys.exit(f"DMLFAST_CUDA=1 but the CUDA kernels cannot be built: {reason}.")
    return possible if choice == "" else choice == "1"


def cuda_arch_list(torch):
    """The architectures to compile for, also exported for torch's own flag logic."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not arch_list:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            arch_list = ";".join(f"{major}.{minor}" for major, minor in caps)
        else:
            arch_list = DEFAULT_ARCH_LIST
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    return arch_list


def sources(with_cuda):
    """The one rule for which files make up the extension (CMakeLists.txt applies the same)."""
    files = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    files += sorted(glob.glob("csrc/cuda/*.cu")) if with_cuda else sorted(glob.glob("csrc/no_cuda/*.cpp"))
    return files


def extensions():
    torch = import_target_torch()
    cuda_home = find_cuda_home()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = want_cuda(torch, cuda_home)
    arch_list = cuda_arch_list(torch) if with_cuda else ""
    defines = [
        f'-DDMLFAST_TORCH_VERSION="{torch.__version__}"',
        f'-DDMLFAST_CUDA_ARCH_LIST="{arch_list}"',
    ]
    cxx = ["-O3", "-fopenmp"] + defines
    # Name the shared libstdc++ (the one torch loads) before the compiler's own -lstdc++. A g++
    # that links libstdc++ statically (seen: the /opt/gcc of a GPU image) otherwise embeds a
    # second copy whose locale facets do not match the process's: formatting a number into an
    # error message then prints nothing or segfaults. With an ordinary g++ this changes nothing.
    link = ["-fopenmp"] + (["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else [])
    if with_cuda:
        nvcc = ["-O3", "-DDMLFAST_WITH_CUDA"] + defines
        ext = CUDAExtension(
            "dmlfast._C",
            sources(True),
            extra_compile_args={"cxx": cxx + ["-DDMLFAST_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("dmlfast._C", sources(False), extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="dmlfast",
    packages=find_packages(include=["dmlfast", "dmlfast.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
