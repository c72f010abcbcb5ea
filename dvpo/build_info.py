"""What this installation of dvpo is: what the build made and why, and what it runs with.

setup.py writes `dvpo/_build_info.py` (the CUDA decision, its reason, the toolchain it found, the
torch it compiled against) because pip hides build output; this module reads it for `dvpo info`,
`dvpo check`, the backend status lines and the one warning at import when a CUDA GPU is visible but
the CUDA extension was not built.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
import warnings
from typing import Dict, List

import torch

_warned = False


def build() -> Dict:
    """The build record, or a stand-in saying there is none (dvpo imported from a source tree)."""
    try:
        from ._build_info import BUILD
    except ImportError:
        return {"cuda_built": False, "cuda_mode": "unknown", "torch": None,
                "cuda_reason": "no build record (dvpo/_build_info.py is written by "
                               "`pip install --no-build-isolation -e .`)"}
    return dict(BUILD)


def cuda_not_built_reason() -> str:
    """Why `dvpo._cuda_C` is missing, in the words of the build (for backend status lines)."""
    info = build()
    if info.get("cuda_built"):
        return ("the build made it, but it does not import here "
                "(rebuild after changing torch: pip install --no-build-isolation -e .)")
    return info.get("cuda_reason") or "unknown"


def warn_if_cuda_unbuilt() -> None:
    """Once per process: a CUDA GPU is visible but dvpo runs its GPU ops on Triton or the reference."""
    global _warned
    if _warned or torch.version.cuda is None:
        return
    _warned = True
    try:
        if not torch.cuda.is_available():
            return
    except Exception:  # noqa: BLE001 - a broken driver is torch's business, not an import error here
        return
    if importlib.util.find_spec("dvpo._cuda_C") is not None:
        return
    warnings.warn(f"dvpo: a CUDA GPU is visible but dvpo's CUDA extension was not built "
                  f"({cuda_not_built_reason()}); GPU ops run on Triton or the reference. "
                  f"`dvpo info` says more.", RuntimeWarning, stacklevel=3)


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001
        return f"not available ({type(exc).__name__})"


def report() -> List[str]:
    """The lines `dvpo info` prints."""
    from . import __version__, dispatch

    info = build()
    lines = [f"dvpo {__version__} (Python {platform.python_version()}, {platform.machine()})",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'}), "
             f"triton {_version('triton')}, transformers {_version('transformers')}"]
    try:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        gpus = 0
    lines.append("GPU: " + (", ".join(torch.cuda.get_device_name(i) for i in range(gpus)) if gpus else "none visible"))
    built_torch = info.get("torch")
    if built_torch and built_torch != torch.__version__:
        lines.append(f"WARNING: built against torch {built_torch}, running torch {torch.__version__}: "
                     f"rebuild (pip install --no-build-isolation -e .)")
    mode = info.get("cuda_mode")
    lines.append(f"build: CUDA extension {'built' if info.get('cuda_built') else 'not built'} "
                 f"(mode {mode}{', DVPO_BUILD_CUDA' if mode in ('on', 'off') else ''}): {info.get('cuda_reason')}")
    chain = info.get("toolchain") or {}
    if chain.get("nvcc"):
        lines.append(f"  toolchain: nvcc {chain.get('nvcc')} (CUDA {chain.get('nvcc_major')}.x, "
                     f"toolkit {chain.get('cuda_home')}), headers {chain.get('include')}, "
                     f"runtime {chain.get('libdir')}")
    if info.get("cuda_archs"):
        lines.append(f"  CUDA targets: {info['cuda_archs']}")
    try:
        from .backends import cpp
        lines.append(f"CPU ISA in use: {cpp.isa()} (detected: {cpp.isa(detected=True)})")
    except Exception as exc:  # noqa: BLE001
        lines.append(f"CPU ISA: unknown ({type(exc).__name__}: {exc})")
    lines.append("backends:")
    for name, status in dispatch.backends().items():
        lines.append(f"  {name:<10} {status}")
    return lines


def add_arguments(parser):  # `dvpo info` takes no options
    return parser


def run(args) -> int:
    print("\n".join(report()))
    sys.stdout.flush()
    return 0
