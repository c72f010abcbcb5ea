"""Backend dispatch: which implementation runs an op, per call, by device and by what was built.

Order: CUDA C++ (`dvpo._cuda_C`) -> Triton (`dvpo.kernels`) -> C++ CPU (`dvpo._C`) -> PyTorch
reference. `DVPO_BACKEND=cuda|triton|cpp|reference` forces one; a forced backend that cannot run
the call raises a RuntimeError that says what is missing. A backend that does not implement an op
(a module without that function) is skipped in automatic mode.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Dict, Optional

import torch

BACKENDS = ("cuda", "triton", "cpp", "reference")
ENV_VAR = "DVPO_BACKEND"

_MODULES = {
    "cuda": "dvpo.backends.cuda",
    "triton": "dvpo.backends.triton",
    "cpp": "dvpo.backends.cpp",
    "reference": "dvpo.backends.reference",
}
_loaded: Dict[str, object] = {}
_load_errors: Dict[str, str] = {}
_substitutes: Dict[str, tuple] = {}  # name -> (module, device types it runs), see substitute()


def _load(name: str):
    """The backend's module, or None with the reason recorded in _load_errors."""
    if name in _substitutes:
        return _substitutes[name][0]
    if name not in _loaded and name not in _load_errors:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except Exception as exc:  # a missing build or package is a reason, not a crash
            if name == "cuda" and "_cuda_C" in str(exc):
                from .build_info import cuda_not_built_reason
                _load_errors[name] = f"not built: {cuda_not_built_reason()}"
            else:
                _load_errors[name] = f"{type(exc).__name__}: {exc}"
    return _loaded.get(name)


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend `name` cannot run on `device` (None when it can)."""
    kind = device.type
    if name in _substitutes:
        devices = _substitutes[name][1]
        return None if kind in devices else f"the substitute {name} backend runs {', '.join(devices)} tensors, not {kind}"
    if name == "reference":
        return None
    if name == "cpp":
        return None if kind == "cpu" else f"the C++ backend runs on CPU tensors, not {kind}"
    if name == "cuda":
        return None if kind == "cuda" else f"the CUDA backend runs on CUDA tensors, not {kind}"
    if name == "triton":
        if kind == "cuda" or (kind == "cpu" and triton_interpreter()):
            return None
        return f"Triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {kind}"
    raise ValueError(f"{ENV_VAR} must be one of {', '.join(BACKENDS)}; got {name!r}")


def backends(device: Optional[torch.device] = None) -> Dict[str, str]:
    """Every backend with 'available' or the reason it is not (for `device`, when given)."""
    out = {}
    for name in BACKENDS:
        module = _load(name)
        if module is None:
            err = _load_errors[name]
            out[name] = err if err.startswith("not built") else f"not available: {err}"
        elif device is not None and _device_reason(name, torch.device(device)):
            out[name] = f"not for {device}: {_device_reason(name, torch.device(device))}"
        else:
            out[name] = "available"
    return out


def forced() -> Optional[str]:
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def substitute(name: str, module, devices=("cpu",)):
    """Inside the block, backend `name` is `module` (functions of the kernel interface,
    dvpo/opspec.py) running tensors of the given device types; e.g. the tests run the CUDA kernels'
    host emulation as `cuda` on CPU tensors. Restored on exit."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    old = _substitutes.get(name)
    _substitutes[name] = (module, tuple(devices))
    try:
        yield module
    finally:
        if old is None:
            _substitutes.pop(name, None)
        else:
            _substitutes[name] = old


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Force backend `name` for every dvpo op called inside the block (None: automatic choice).

    It sets DVPO_BACKEND, which `select` reads on every call, and restores the previous value on
    exit, so blocks nest and an exception inside one leaves the process as it was. Tests and the
    benchmarks use this one helper.
    """
    if name is not None:
        name = name.strip().lower()
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    old = os.environ.get(ENV_VAR)
    if name is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def select(op: str, device: torch.device):
    """The backend module that runs `op` on `device` for this call."""
    name = forced()
    if name is not None:
        module = _load(name)
        if module is None:
            raise RuntimeError(f"{ENV_VAR}={name} but the {name} backend is not available: {_load_errors[name]}")
        reason = _device_reason(name, device)
        if reason:
            raise RuntimeError(f"{ENV_VAR}={name} cannot run dvpo.{op}: {reason}")
        if not hasattr(module, op):
            raise RuntimeError(f"{ENV_VAR}={name}: the {name} backend does not implement dvpo.{op} yet")
        return module
    for name in BACKENDS:
        if name == "triton" and device.type == "cpu":
            continue  # the interpreter is for tests: on CPU tensors Triton runs only when forced
        module = _load(name)
        if module is not None and hasattr(module, op) and _device_reason(name, device) is None:
            return module
    raise RuntimeError(f"no backend can run dvpo.{op} on {device}")  # unreachable: reference runs anywhere


def selected_name(op: str, device) -> str:
    """The name of the backend `select` would pick (for logs, the demo and benchmarks)."""
    module = select(op, torch.device(device))
    mods = {**_loaded, **{n: m for n, (m, _) in _substitutes.items()}}
    return next(name for name, mod in mods.items() if mod is module)
