"""The `cpp` backend: the C++ CPU kernels of the `dvpo._C` extension (csrc/cpu), exposed with the
kernel interface of dvpo/opspec.py (same functions, same arguments).

The kernels take flattened tensors (tokens first) of any float dtype and layout (bf16/fp16 and
strided inputs are converted once to contiguous fp32; fp64 stays fp64) and return per-token values
and the gradient w.r.t. the prediction in the accumulation dtype. `algorithm` is "pairwise",
"sorted" or "auto" (picked per shape from measured crossovers, see csrc/cpu/kernels.h).
The kernels are compiled for several instruction sets and pick one per call from the CPU
(`isa()`); DVPO_CPU_ISA=baseline|avx2|avx512 caps the choice (for tests and benchmarks).

An op whose CPU kernel the loaded extension lacks (a build older than these sources) is not
defined here, so dispatch falls through to the next backend instead of failing.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (registers torch.ops.dvpo_C)
from .. import opspec as _spec

_ops = torch.ops.dvpo_C


def _has_cpu_kernel(op: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"dvpo_C::{op}", "CPU"))
    except Exception:  # an older torch without the query: trust the build
        return hasattr(_ops, op)


# Each op forwards to its dvpo_C kernel with the interface of dvpo/opspec.py. An op whose CPU kernel
# the loaded extension lacks (a build older than these sources) is left undefined here.
OPS = tuple(op for op in _spec.OPS if _has_cpu_kernel(op))
for _op in OPS:
    globals()[_op] = _spec.forwarder(_spec.OPS[_op], getattr(_ops, _op))
del _op


def isa(detected: bool = False) -> str:
    """The instruction-set variant the kernels run now ("avx512", "avx2" or "baseline", capped by
    DVPO_CPU_ISA); with `detected`, the widest one this CPU supports ("unknown" for an older build)."""
    if not hasattr(_ops, "cpu_isa"):
        return "unknown"
    return _ops.cpu_isa(bool(detected))


def auto_sorted(n: int, m: int) -> bool:
    """Whether algorithm="auto" runs the sorted quantile Huber for N atoms and M targets."""
    return bool(_ops.cpu_auto_sorted(int(n), int(m)))
