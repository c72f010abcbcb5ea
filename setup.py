"""Build dvpo: the C++ CPU extension always, the CUDA extension when the toolchain allows.

Install with `pip install --no-build-isolation -e .` (torch must already be installed: the
extensions compile against it). Works with any torch from 2.4 on: the C++ standard is the one the
installed torch's extension builder asks for (c++17 up to 2.12-ish, c++20 since), never forced here.

The CUDA build is decided by the toolchain, never by whether a GPU is present. Automatic mode builds
`dvpo._cuda_C` when torch is a CUDA build, an nvcc of the same major version is found, and the CUDA
headers and runtime library are found where a toolkit or torch's CUDA wheels put them; a CUDA build
that then fails falls back to the CPU build. DVPO_BUILD_CUDA=1 forces it (and fails loudly),
DVPO_BUILD_CUDA=0 skips it. DVPO_CUDA_ARCHS (default "80;90a") lists the SASS targets, plus PTX of
the lowest for newer GPUs. What was built and why is written to dvpo/_build_info.py (`dvpo info`).
"""

import glob
import pprint
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

try:
    import torch
except ImportError:
    sys.exit(
        "dvpo: PyTorch must be installed before building dvpo, and the build must see it:\n"
        "    pip install torch\n"
        "    pip install --no-build-isolation -e .\n"
        "(without --no-build-isolation pip builds in an empty environment that has no torch)"
    )

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(HERE, "dvpo", "_build_info.py")


def say(msg):
    # pip hides build output unless -v; stderr lines still reach its log, and _build_info.py keeps it
    print(f"dvpo: {msg}", file=sys.stderr, flush=True)


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


# ---------------------------------------------------------------------------------------------
# The CUDA toolchain, found by checking rather than assuming
# ---------------------------------------------------------------------------------------------

def _run(cmd, **kw):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    except (OSError, subprocess.SubprocessError):
        return None


def _nvcc_candidates():
    """nvcc executables in order of preference: $CUDA_HOME/$CUDA_PATH, PATH, the usual install dirs."""
    seen = []
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home:
            seen.append(os.path.join(home, "bin", "nvcc"))
    seen.append(shutil.which("nvcc"))
    seen += sorted(glob.glob("/usr/local/cuda/bin/nvcc")) + sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"),
                                                                 reverse=True)
    out = []
    for path in seen:
        if path and os.path.isfile(path) and os.access(path, os.X_OK) and path not in out:
            out.append(path)
    return out


def _nvcc_major(nvcc):
    res = _run([nvcc, "--version"])
    match = re.search(r"release (\d+)\.", res.stdout if res else "")
    return int(match.group(1)) if match else None


def _toolkit_root(nvcc):
    """The toolkit directory an nvcc belongs to. nvcc on PATH may be a wrapper script outside the
    toolkit (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`), so ask nvcc itself: its dry run prints
    TOP=<toolkit>/bin/.. . Fall back to the resolved path's grandparent."""
    env = {k: v for k, v in os.environ.items() if k not in ("NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS")}
    res = _run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull, "-o", os.devnull], env=env)
    text = (res.stdout + res.stderr) if res else ""
    match = re.search(r"^#\$ TOP=(.+)$", text, re.M)
    if match:
        return os.path.realpath(match.group(1).strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _wheel_cuda_dirs(major):
    """Where torch's CUDA wheels (nvidia-*) put headers and libraries, e.g. site-packages/nvidia/cu13."""
    roots = []
    for key in ("purelib", "platlib"):
        base = os.path.join(sysconfig.get_paths()[key], "nvidia")
        roots += [os.path.join(base, f"cu{major}"), os.path.join(base, "cuda_runtime")]
    return [r for r in dict.fromkeys(roots) if os.path.isdir(r)]


def _first_with(dirs, pattern):
    for d in dirs:
        if glob.glob(os.path.join(d, pattern)):
            return d
    return None


def find_cuda():
    """(toolchain dict, None) when the CUDA extension can be built, else (partial dict, reason)."""
    info = {"torch_cuda": torch.version.cuda}
    if torch.version.cuda is None:
        return info, "this torch is a CPU build (torch.version.cuda is None)"
    want = int(torch.version.cuda.split(".")[0])
    nvccs = _nvcc_candidates()
    if not nvccs:
        return info, "no nvcc found ($CUDA_HOME/bin, PATH, /usr/local/cuda*/bin): install a CUDA toolkit"
    majors = {n: _nvcc_major(n) for n in nvccs}
    nvcc = next((n for n in nvccs if majors[n] == want), None)
    if nvcc is None:
        found = ", ".join(f"{n} ({majors[n]}.x)" for n in nvccs)
        return info, f"no nvcc of CUDA {want}.x (torch's CUDA is {torch.version.cuda}); found {found}"
    root = _toolkit_root(nvcc)
    info.update(nvcc=nvcc, nvcc_major=want, cuda_home=root)
    triple = f"targets/{os.uname().machine}-linux"
    inc_dirs = [os.path.join(root, "include"), os.path.join(root, triple, "include")]
    lib_dirs = [os.path.join(root, "lib64"), os.path.join(root, "lib"), os.path.join(root, triple, "lib")]
    wheels = _wheel_cuda_dirs(want)
    inc_dirs += [os.path.join(w, "include") for w in wheels]
    lib_dirs += [os.path.join(w, "lib") for w in wheels]
    include = _first_with(inc_dirs, "cuda_runtime.h")
    if include is None:
        return info, f"cuda_runtime.h not found (looked in {', '.join(inc_dirs)})"
    libdir = _first_with(lib_dirs, "libcudart.so*")
    if libdir is None:
        return info, f"libcudart.so not found (looked in {', '.join(lib_dirs)})"
    info.update(include=include, libdir=libdir)
    if not glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")):
        return info, "no CUDA sources under csrc/cuda"
    return info, None


def cuda_decision():
    """(build_cuda, mode, reason, toolchain)."""
    forced = os.environ.get("DVPO_BUILD_CUDA", "").strip()
    if forced not in ("", "0", "1"):
        sys.exit(f"dvpo: DVPO_BUILD_CUDA must be 0, 1 or unset, got {forced!r}")
    if forced == "0":
        return False, "off", "DVPO_BUILD_CUDA=0", {"torch_cuda": torch.version.cuda}
    toolchain, reason = find_cuda()
    if reason is None:
        return True, "on" if forced == "1" else "auto", "CUDA toolchain found", toolchain
    if forced == "1":
        sys.exit(f"dvpo: DVPO_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    return False, "auto", reason, toolchain


BUILD_CUDA, CUDA_MODE, CUDA_REASON, TOOLCHAIN = cuda_decision()
if BUILD_CUDA:
    # torch's extension builder reads CUDA_HOME once, at import, and would otherwise infer it from
    # the nvcc on PATH (wrong for a wrapper script): point it at the toolkit checked above.
    os.environ["CUDA_HOME"] = TOOLCHAIN["cuda_home"]

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def gencode_flags():
    archs = [a.strip() for a in os.environ.get("DVPO_CUDA_ARCHS", "80;90a").split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # PTX of the lowest target, without an arch-specific suffix ("90a" PTX would not JIT on newer GPUs).
    lowest = min(int(re.sub(r"\D", "", a)) for a in archs)
    return flags + [f"-gencode=arch=compute_{lowest},code=compute_{lowest}"]


def extensions():
    openmp = ["-fopenmp"] if _compiler_supports("-fopenmp") else []
    # No -std: torch's builder adds the standard its headers need (c++20 since torch 2.13/2.14).
    # No -march: the wheel must run on any x86-64/arm64; -fno-math-errno/-fno-trapping-math let the
    # compiler vectorize the select-based pair loops without changing any IEEE result.
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math"] + openmp
    exts = [CppExtension(
        "dvpo._C",
        sources=_rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=openmp,
    )]
    if BUILD_CUDA:
        include_dirs = [os.path.join(HERE, "csrc")]
        library_dirs = []
        if TOOLCHAIN["include"] != os.path.join(TOOLCHAIN["cuda_home"], "include"):
            include_dirs.append(TOOLCHAIN["include"])  # headers from torch's CUDA wheels
            library_dirs.append(TOOLCHAIN["libdir"])
        exts.append(CUDAExtension(
            "dvpo._cuda_C",
            sources=_rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
                         + glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp"))),
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            extra_compile_args={"cxx": ["-O3"],
                                "nvcc": ["-O3", "--use_fast_math", "-lineinfo"] + gencode_flags()},
        ))
    return exts


def write_build_info(cuda_built, reason, extra_dirs=()):
    """dvpo/_build_info.py: what this build made and why (read by `dvpo info` and `dvpo check`)."""
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_mode": CUDA_MODE,
        "cuda_built": bool(cuda_built),
        "cuda_reason": reason,
        "cuda_archs": os.environ.get("DVPO_CUDA_ARCHS", "80;90a") if cuda_built else None,
        "toolchain": TOOLCHAIN,
        "python": sys.version.split()[0],
    }
    text = ('"""Written by setup.py at build time: what was built and why. Not edited by hand."""\n\n'
            f"BUILD = {pprint.pformat(info, sort_dicts=True)}\n")
    for folder in (os.path.join(HERE, "dvpo"),) + tuple(extra_dirs):
        if os.path.isdir(folder):
            with open(os.path.join(folder, "_build_info.py"), "w") as f:
                f.write(text)


class Build(BuildExtension):
    """torch's builder, plus: in automatic mode a failing CUDA extension is dropped (the CPU build goes
    on and the reason is recorded); the outcome is written to dvpo/_build_info.py."""

    def build_extension(self, ext):
        if ext.name != "dvpo._cuda_C" or CUDA_MODE != "auto":
            return super().build_extension(ext)
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any toolchain failure: fall back, say why
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._cuda_failure = f"the CUDA build failed ({type(exc).__name__}: {first}); " \
                                 f"rerun with DVPO_BUILD_CUDA=1 pip install -v ... to see the compiler's log"
            say(f"WARNING: {self._cuda_failure}; continuing with the CPU extension only")

    def build_extensions(self):
        super().build_extensions()
        if self._cuda_failure:  # nothing to copy or package for the extension that failed
            self.extensions = [e for e in self.extensions if e.name != "dvpo._cuda_C"]

    def run(self):
        self._cuda_failure = None
        super().run()
        built = BUILD_CUDA and self._cuda_failure is None
        reason = self._cuda_failure or CUDA_REASON
        pkg_dir = os.path.join(self.build_lib, "dvpo")
        write_build_info(built, reason, extra_dirs=(pkg_dir,) if not self.inplace else ())


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


if __name__ == "__main__":  # pip runs setup.py as __main__; tests import the helpers above
    if BUILD_CUDA:
        say(f"building the CUDA extension: nvcc {TOOLCHAIN['nvcc']} (toolkit {TOOLCHAIN['cuda_home']}), "
            f"torch CUDA {torch.version.cuda}")
    else:
        say(f"building without CUDA: {CUDA_REASON}")
    # Written now when missing, so that the package never lacks the module; build_ext rewrites it with
    # the outcome (not here: a later metadata-only run of setup.py must not overwrite a real build's).
    if not os.path.exists(BUILD_INFO):
        write_build_info(False, "not built yet (setup.py ran without build_ext)" if BUILD_CUDA else CUDA_REASON)

setup(
    license="Apache-2.0",
    packages=packages(),
    package_dir={"dvpo": "dvpo", "dvpo.kernels": "kernels", "dvpo.bench": "bench"},
    ext_modules=extensions(),
    cmdclass={"build_ext": Build.with_options(use_ninja=shutil.which("ninja") is not None)},
)
