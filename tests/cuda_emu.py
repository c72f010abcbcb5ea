"""The host emulation of the CUDA kernels (csrc/cuda/emu): build it, and plug it into dvpo.dispatch
as the `cuda` backend so that the op contract tests run the kernels' logic on CPU tensors.

The unmodified kernel sources are built with g++ against an emulation of the CUDA execution model
(one fiber per CUDA thread, warp collectives as barriers) and the binding is compiled against stub
c10/cuda headers, registered as `torch.ops.dvpo_emu` for CPU tensors. This checks the kernels'
logic (indexing, warp-cooperative selects, tie ranks, reductions, scratch layouts, the fallbacks,
the chunked GAE scan) without a GPU; it cannot check timing, memory ordering across real concurrent
warps, or nvcc's code generation. Needs the CUDA headers, g++ and ninja; DVPO_SKIP_CUDA_EMU=1 skips
it (the first build takes a few minutes; it is cached in /tmp/dvpo_cuda_emu_<digest>).
"""

import functools
import hashlib
import os
import pathlib
import re
import shutil
import tempfile
import types

import torch

from dvpo import opspec as spec

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
SMEM_STATIC, SMEM_OPTIN = 48 * 1024, 227 * 1024  # the launchers' real limits (the emulation can lower them)


def skip_reason():
    """Why the emulation cannot be built here (None when it can)."""
    if os.environ.get("DVPO_SKIP_CUDA_EMU", "0") not in ("", "0"):
        return "DVPO_SKIP_CUDA_EMU is set"
    if not hasattr(os, "fork") or os.name != "posix":
        return "the emulation needs POSIX ucontext"
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if not (pathlib.Path(cuda_home) / "include" / "cuda_runtime.h").exists():
        return f"no CUDA headers under {cuda_home}/include"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler"
    from torch.utils import cpp_extension
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed"
    return None


def _transform(text):
    """The two constructs a host compiler cannot parse, and the 48 KB limit as a test setting."""
    text = re.sub(r"extern\s+__shared__\s+__align__\(\d+\)\s+char\s+(\w+)\[\];",
                  r"char* \1 = ::dvpo_emu::dynamic_smem();", text)
    text = re.sub(r"([\w:]+<[^<>;()]*>)\s*<<<(.*?)>>>\s*\(", r"::dvpo_emu::launch(\1, \2, ", text, flags=re.S)
    text = re.sub(r"constexpr size_t kStaticSmemLimit = [^;]*;",
                  "static const size_t& kStaticSmemLimit = ::dvpo_emu::emu().static_smem;", text)
    return text


def _write(path, text):
    """Write only what changed: a rewritten source is newer than its object file, so ninja would
    recompile everything on every run."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


@functools.lru_cache(maxsize=None)
def build():
    """torch.ops.dvpo_emu: the kernel interface of the emulated CUDA kernels (once per process)."""
    from torch.utils import cpp_extension
    name = "dvpo_cuda_emu"
    inputs = sorted(CUDA_SRC.glob("*")) + sorted((CUDA_SRC / "emu").rglob("*.*")) + [
        ROOT / "csrc" / "dvpo_math.h", ROOT / "csrc" / "terms.h", ROOT / "csrc/cpu/bindings.cpp"]
    # one build per source state and torch (an emulator built against another torch must not be reused)
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in inputs if p.is_file())
                          + f"{torch.__version__} {torch.version.cuda}".encode()).hexdigest()[:12]
    build_dir = pathlib.Path(tempfile.gettempdir()) / f"dvpo_cuda_emu_{digest}"
    src = build_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    sources = []
    for f in sorted(CUDA_SRC.iterdir()):
        if f.suffix in (".cuh", ".h"):
            _write(src / f.name, _transform(f.read_text()))
        elif f.suffix == ".cu":
            _write(src / f"{f.stem}_emu.cpp", '#include "emu_runtime.h"\n' + _transform(f.read_text()))
            sources.append(str(src / f"{f.stem}_emu.cpp"))
    schemas = re.search(r"TORCH_LIBRARY\(dvpo_C, m\) \{.*?\n\}", (ROOT / "csrc/cpu/bindings.cpp").read_text(), re.S)
    binding = (CUDA_SRC / "bindings.cpp").read_text()
    binding = binding.replace("PyInit__cuda_C", f"PyInit_{name}").replace('"_cuda_C"', f'"{name}"')
    binding = binding.replace(".is_cuda()", ".is_cpu()").replace(
        "TORCH_LIBRARY_IMPL(dvpo_C, CUDA, m)",
        schemas.group(0).replace("dvpo_C", "dvpo_emu") + "\n\nTORCH_LIBRARY_IMPL(dvpo_emu, CPU, m)")
    binding += """
void dvpo_emu_set_smem_limits(long long static_bytes, long long optin_bytes);
TORCH_LIBRARY_FRAGMENT(dvpo_emu, m) {
  m.def("set_smem_limits(int static_bytes, int optin_bytes) -> ()",
        [](int64_t s, int64_t o) { dvpo_emu_set_smem_limits(s, o); });
}
"""
    _write(src / "bindings_emu.cpp", binding)
    sources += [str(src / "bindings_emu.cpp"), str(CUDA_SRC / "emu" / "emu_api.cpp")]
    cuda_inc = pathlib.Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda") / "include"
    cpp_extension.load(name, sources, build_directory=str(build_dir),
                       extra_include_paths=[str(CUDA_SRC / "emu" / "stubs"), str(src), str(CUDA_SRC / "emu"),
                                            str(ROOT / "csrc"), str(cuda_inc)],
                       # no -std: torch adds the one its headers need (c++20 since 2.13). -Bsymbolic:
                       # under a CUDA build of torch the real libcudart is loaded first and would
                       # otherwise interpose on the emulated runtime's functions of the same names.
                       extra_cflags=["-O2", "-Wno-attributes"], extra_ldflags=["-Wl,-Bsymbolic"])
    ops = torch.ops.dvpo_emu
    ops.set_smem_limits(SMEM_STATIC, SMEM_OPTIN)
    return ops


def backend_module(ops):
    """The emulated kernels with the kernel interface of dvpo/opspec.py (as dvpo/backends/cuda.py)."""
    return types.SimpleNamespace(**{name: spec.forwarder(op, getattr(ops, name)) for name, op in spec.OPS.items()})


def as_cuda_backend():
    """Inside the block, dvpo.dispatch's `cuda` backend is the emulation and runs CPU tensors
    (everything else goes through dvpo.ops as usual)."""
    from dvpo import dispatch
    return dispatch.substitute("cuda", backend_module(build()), devices=("cpu",))
