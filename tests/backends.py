"""The backends every op contract test (tests/test_<op>.py) runs on, and how each is forced.

`reference`, `cpp`, `triton`, `cuda-emu` and `cuda`: `cuda-emu` is the CUDA kernels built against
the host emulation (tests/cuda_emu.py) and plugged into dispatch as `cuda`; `triton` runs on CUDA
with a GPU, else on CPU tensors in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET).
A backend that cannot run here is skipped with the reason. The interpreter and the emulation are
slow, so they get the `small` case lists (still with every odd size of tests/utils.py's SIZES
somewhere, sorted inputs, ties, crossing quantiles).
"""

import contextlib
import dataclasses
import os
from typing import Tuple

import pytest
import torch

from dvpo import dispatch
from dvpo.dispatch import use_backend

from . import cuda_emu

HAS_CUDA = torch.cuda.is_available()
NAMES = ("reference", "cpp", "triton", "cuda-emu", "cuda")
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    device: str
    small: bool  # interpreter or emulation: small cases only
    algorithms: Tuple[str, ...] = ("auto",)  # the quantile Huber pair algorithms it implements
    # torch.compile backend of the compile checks: inductor where it generates code around the op
    # (GPU; the C++ backend on CPU), aot_eager elsewhere (the same fake tracing, no code generation)
    compile_backend: str = "aot_eager"

    def __str__(self):
        return self.name

    def kernels(self):
        """The backend's kernel-interface module (dvpo/backends/<name>.py or the emulation's)."""
        return dispatch.select("critic_loss", torch.device(self.device))


BACKENDS = {
    "reference": Backend("reference", "cpu", small=False),
    "cpp": Backend("cpp", "cpu", small=False, algorithms=("pairwise", "sorted"), compile_backend="inductor"),
    "triton": Backend("triton", "cuda" if HAS_CUDA else "cpu", small=not HAS_CUDA,
                      compile_backend="inductor" if HAS_CUDA else "aot_eager"),
    "cuda-emu": Backend("cuda-emu", "cpu", small=True, algorithms=("pairwise", "sorted")),
    "cuda": Backend("cuda", "cuda", small=False, algorithms=("pairwise", "sorted"), compile_backend="inductor"),
}


def skip_reason(name):
    """Why backend `name` cannot run on this machine (None when it can)."""
    if name == "cuda-emu":
        reason = cuda_emu.skip_reason()
        return None if reason is None else f"CUDA kernel emulation: {reason}"
    if name == "cuda" and not HAS_CUDA:
        return "needs a CUDA GPU (none on this machine)"
    if name == "triton" and not HAS_CUDA and not dispatch.triton_interpreter():
        return "no GPU and TRITON_INTERPRET is not set: Triton cannot run here"
    status = dispatch.backends(BACKENDS[name].device)[name]
    if status != "available":
        if name == "cuda" and os.environ.get("DVPO_REQUIRE_CUDA_BACKEND", "0") not in ("", "0"):
            pytest.fail(f"the CUDA backend is not available: {status}")
        return f"the {name} backend: {status}"
    return None


@contextlib.contextmanager
def forced(name):
    """Every dvpo op inside the block runs on backend `name`."""
    if name == "cuda-emu":
        with cuda_emu.as_cuda_backend(), use_backend("cuda"):
            yield
    else:
        with use_backend(name):
            yield


def cases(full, small=None, names=NAMES, *, interpreter=None, only=None):
    """pytest params (backend name, case) for parametrize("backend,case", ..., indirect=["backend"]):
    every case of `full` on the full backends, of `small` (default: `full`) on the small ones, of
    `interpreter` (default: `small`) on Triton's interpreter, the slowest; `only` maps a backend name
    to its own list."""
    out = []
    for name in names:
        marks = [pytest.mark.gpu] if BACKENDS[name].device == "cuda" else []
        chosen = full
        if BACKENDS[name].small and small is not None:
            chosen = small
        if name == "triton" and BACKENDS[name].small and interpreter is not None:
            chosen = interpreter
        chosen = (only or {}).get(name, chosen)
        for case in chosen:
            out.append(pytest.param(name, case, marks=marks, id=f"{name}-{_case_id(case)}"))
    return out


def params(names=NAMES):
    """pytest params for parametrize("backend", ..., indirect=True): one per backend."""
    return [pytest.param(n, marks=[pytest.mark.gpu] if BACKENDS[n].device == "cuda" else [], id=n) for n in names]


def _case_id(case):
    if isinstance(case, (tuple, list)):
        return "-".join(_case_id(c) for c in case)
    if isinstance(case, torch.dtype):
        return str(case).replace("torch.", "")
    return str(case)
