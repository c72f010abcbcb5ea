"""Build dvpo: the C++ CPU extension always, the CUDA extension when the toolchain allows.

Install with `pip install --no-build-isolation -e .` (torch must already be installed: the
extensions compile against it). The CUDA build is decided by the toolchain, never by whether a GPU
is present: a CUDA build of torch plus an nvcc of the same major version builds `dvpo._cuda_C`
on a GPU-less box too. DVPO_BUILD_CUDA=0|1 forces the decision (1 fails loudly when it cannot);
DVPO_CUDA_ARCHS (default "80;90a") lists the SASS targets, plus PTX of the lowest for newer GPUs.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "dvpo: PyTorch must be installed before building dvpo, and the build must see it:\n"
        "    pip install torch            (CPU machines: pip install torch==2.13.0)\n"
        "    pip install --no-build-isolation -e .\n"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _compiler_supports(flag):
    cxx = os.environ.get("CXX", "c++")
    try:
        probe = subprocess.run([cxx, flag, "-x", "c++", "-E", "-", "-o", os.devnull], input=b"",
                               capture_output=True, timeout=60)
        return probe.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _nvcc_path():
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def _nvcc_major(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


def cuda_build_reason():
    """None when the CUDA extension can be built, else why not."""
    if torch.version.cuda is None:
        return "this torch is a CPU build (torch.version.cuda is None)"
    nvcc = _nvcc_path()
    if nvcc is None:
        return "no nvcc found (set CUDA_HOME or put nvcc on PATH)"
    major = _nvcc_major(nvcc)
    if major != int(torch.version.cuda.split(".")[0]):
        return f"nvcc {major}.x does not match torch's CUDA {torch.version.cuda}"
    if not glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")):
        return "no CUDA sources under csrc/cuda"
    return None


def want_cuda():
    forced = os.environ.get("DVPO_BUILD_CUDA", "").strip()
    if forced == "0":
        print("dvpo: DVPO_BUILD_CUDA=0: building the CPU extension only")
        return False
    reason = cuda_build_reason()
    if reason is None:
        return True
    if forced == "1":
        sys.exit(f"dvpo: DVPO_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"dvpo: building without CUDA: {reason}")
    return False


def gencode_flags():
    archs = [a.strip() for a in os.environ.get("DVPO_CUDA_ARCHS", "80;90a").split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # PTX of the lowest target, without an arch-specific suffix ("90a" PTX would not JIT on newer GPUs).
    lowest = min(int(re.sub(r"\D", "", a)) for a in archs)
    return flags + [f"-gencode=arch=compute_{lowest},code=compute_{lowest}"]


def extensions():
    openmp = ["-fopenmp"] if _compiler_supports("-fopenmp") else []
    # No -march: the wheel must run on any x86-64/arm64; -fno-math-errno/-fno-trapping-math let the
    # compiler vectorize the select-based pair loops without changing any IEEE result.
    cxx = ["-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math"] + openmp
    exts = [CppExtension(
        "dvpo._C",
        sources=_rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=openmp,
    )]
    if want_cuda():
        exts.append(CUDAExtension(
            "dvpo._cuda_C",
            sources=_rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
                         + glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp"))),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + gencode_flags()},
        ))
    return exts


def _default_max_jobs():
    # Each nvcc/c++ job of a torch extension peaks near 2-4 GB: size the parallel build to memory.
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 4))))


os.environ.setdefault("MAX_JOBS", _default_max_jobs())


def packages():
    found = ["dvpo"]
    for root, _dirs, files in os.walk(os.path.join(HERE, "dvpo")):
        if "__init__.py" in files and root != os.path.join(HERE, "dvpo"):
            found.append(os.path.relpath(root, HERE).replace(os.sep, "."))
    for name, folder in (("dvpo.kernels", "kernels"), ("dvpo.bench", "bench")):
        if os.path.exists(os.path.join(HERE, folder, "__init__.py")):
            found.append(name)
    return sorted(found)


setup(
    packages=packages(),
    package_dir={"dvpo": "dvpo", "dvpo.kernels": "kernels", "dvpo.bench": "bench"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
