"""Builds dmlfast._C with torch's C++ extension machinery and ninja.

The CPU kernels are always compiled; the CUDA kernels whenever nvcc and a CUDA build of torch
are present, even with no GPU visible. Environment knobs:

- ``DMLFAST_CUDA=0|1``: skip or require the CUDA kernels (default: build them when possible).
- ``CUDA_HOME``: the CUDA toolkit (default: found from nvcc on PATH, /usr/local/cuda or nvcc wheels
  installed in the environment; build_backend.py fetches those from PyPI when none is found).
- ``DMLFAST_IGNORE_SYSTEM_CUDA=1``: do not look on PATH and in /usr/local (CI uses it to check the
  PyPI compiler on a machine with a toolkit).
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures, e.g. ``"9.0"``. Default: the visible GPUs, or
  ``"8.0;9.0"`` when none can be queried.
- ``MAX_JOBS``: parallel compile jobs (ninja); default: the cores this process may use.

Objects are compiled into ``build/dmlfast-<python>-torch<version>-<cpu|cuda>``, kept between
installs (pip's editable builds would otherwise compile in a fresh temporary folder every time):
ninja compiles again only what changed, so reinstalling, e.g. ``pip install -e ".[test]"`` after
``pip install -e .``, relinks in seconds. The build prints what it compiles and with how many jobs
(pip shows it with ``-v``).

The extension is compiled against the torch that will import it: when pip builds in an isolated
environment, the backend in build_backend.py points this script at the target environment's torch
instead of letting pip install a second, possibly different one (see README, "Build options").
"""
import glob
import os
import sys
import sysconfig

from setuptools import find_packages, setup

from build_tools import cuda_toolkit

DEFAULT_ARCH_LIST = "8.0;9.0"
HERE = os.path.dirname(os.path.abspath(__file__))


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


def find_cuda_home(torch):
    """The CUDA toolkit to build with (build_tools/cuda_toolkit.py: $CUDA_HOME, $CUDA_PATH, nvcc on
    PATH, /usr/local/cuda, nvcc wheels), exported as CUDA_HOME for torch.utils.cpp_extension.

    torch guesses the folder above nvcc, which is wrong when nvcc on PATH is a wrapper script
    (e.g. /usr/local/bin/nvcc calling /usr/local/cuda-13.0/bin/nvcc); exporting the checked
    folder as CUDA_HOME before torch.utils.cpp_extension is imported fixes its guess.
    """
    home = cuda_toolkit.find_cuda_home(os.environ, torch.version.cuda, cuda_toolkit.search_dirs())
    if home is not None:
        os.environ["CUDA_HOME"] = home
    return home


def want_cuda(torch, cuda_home):
    """``(build the CUDA kernels?, why they cannot be although DMLFAST_CUDA=1 asks for them, or None)``."""
    choice = os.environ.get("DMLFAST_CUDA", "").strip()
    if choice not in ("", "0", "1"):
        sys.exit(f"DMLFAST_CUDA must be 0 or 1, got {choice!r}")
    possible = torch.version.cuda is not None and cuda_home is not None
    if choice == "1" and not possible:
        reason = ("torch is a CPU-only build" if torch.version.cuda is None else
                  "no CUDA toolkit with nvcc and headers was found (set CUDA_HOME; see README, 'Build options')")
        return False, f"DMLFAST_CUDA=1 but the CUDA kernels cannot be built: {reason}."
    return (possible if choice == "" else choice == "1"), None


def refusing_build_ext(build_ext, message):
    """``build_ext`` that stops with ``message`` when it runs. The other PEP 517 hooks (build
    requirements, metadata) still succeed: only build_backend.py's wheel build may fetch nvcc."""

    class RefusingBuildExt(build_ext):
        def run(self):
            sys.exit(message)

    return RefusingBuildExt


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


def parallel_jobs():
    """``MAX_JOBS``, set to the cores this process may use when the environment does not say."""
    jobs = os.environ.get("MAX_JOBS", "").strip()
    if not jobs:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        jobs = os.environ["MAX_JOBS"] = str(cores)
    return jobs


def kept_build_ext(build_ext, folder, announcement):
    """``build_ext`` that compiles into ``folder`` (kept between installs, so that ninja recompiles only
    what changed) and prints ``announcement`` before it starts."""

    class KeptBuildExt(build_ext):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = folder

        def run(self):
            print(announcement, flush=True)
            super().run()

    return KeptBuildExt


def describe_sources(files, arch_list):
    """``"8 C++ files and 1 CUDA file for sm_80, sm_90"``: what the build compiles."""
    cuda = [f for f in files if f.endswith(".cu")]
    if not cuda:
        return f"{len(files)} C++ files (the CPU kernels)"
    targets = ", ".join(f"sm_{arch.replace('.', '')}" for arch in arch_list.split(";") if arch)
    return f"{len(files) - len(cuda)} C++ files and {len(cuda)} CUDA file(s) for {targets}"


def sources(with_cuda):
    """The one rule for which files make up the extension (CMakeLists.txt applies the same)."""
    files = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    files += sorted(glob.glob("csrc/cuda/*.cu")) if with_cuda else sorted(glob.glob("csrc/no_cuda/*.cpp"))
    return files


def extensions():
    torch = import_target_torch()
    cuda_home = find_cuda_home(torch)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda, cannot_build = want_cuda(torch, cuda_home)
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
        # NVIDIA's wheels ship libcudart.so.<N> only, which torch's -lcudart does not find.
        cudart = cuda_toolkit.cudart_library(cuda_home)
        ext.libraries = [cudart if library == "cudart" else library for library in ext.libraries]
    else:
        ext = CppExtension("dmlfast._C", sources(False), extra_compile_args={"cxx": cxx}, extra_link_args=link)
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    folder = os.path.join(HERE, "build", f"dmlfast-{python}-torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}")
    announcement = (f"dmlfast: compiling {describe_sources(ext.sources, arch_list)} with {parallel_jobs()} parallel jobs "
                    f"(MAX_JOBS) in {folder}; what was compiled there before with the same flags is not compiled again")
    build_ext = kept_build_ext(BuildExtension.with_options(use_ninja=True), folder, announcement)
    return [ext], {"build_ext": refusing_build_ext(build_ext, cannot_build) if cannot_build else build_ext}


ext_modules, cmdclass = extensions()

setup(
    name="dmlfast",
    packages=find_packages(include=["dmlfast", "dmlfast.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
