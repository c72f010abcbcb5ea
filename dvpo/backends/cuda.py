"""The `cuda` backend: the hand-written CUDA C++ kernels of the `dvpo._cuda_C` extension (csrc/cuda),
exposed with the kernel interface of dvpo/opspec.py (each op forwards to its kernel).

Importing this module fails (and dispatch falls back to Triton / the reference) unless the CUDA
extension was built: `dvpo._C` defines the `dvpo_C` operator schemas, `dvpo._cuda_C` registers their
CUDA implementations, so `_C` is imported first. The tensors passed here are CUDA tensors (dispatch
only picks this backend for them). Per-token values and gradients come back in the accumulation
dtype (fp64 for fp64 inputs, else fp32), computed in one pass, deterministic (no atomics).

`algorithm`: "sorted" runs the quantile Huber op and the critic loss's Huber terms with the targets
sorted once per token (csrc/cuda/sorted.cuh); "pairwise" and "auto" run the pairwise kernels (no
GPU crossover has been measured yet, so "auto" does not pick sorted).
"""

import torch

from .. import _C  # noqa: F401  (defines the torch.ops.dvpo_C schemas)
from .. import _cuda_C  # noqa: F401  (registers their CUDA kernels)
from .. import opspec as _spec

_ops = torch.ops.dvpo_C


for _name, _op in _spec.OPS.items():
    globals()[_name] = _spec.forwarder(_op, getattr(_ops, _name))
del _name, _op
