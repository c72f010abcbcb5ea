"""The `cpp` backend: the C++ CPU kernels of the `dvpo._C` extension (csrc/cpu), exposed with the
kernel interface documented in dvpo/backends/reference.py. Only the ops defined here run on it;
the others fall through to the next backend (dvpo.dispatch)."""

import torch

from .. import _C  # noqa: F401  (registers torch.ops.dvpo_C)

_ops = torch.ops.dvpo_C


def quantile_huber(pred, target, taus, weights, mask, kappa, normalize_kappa, algorithm="auto"):
    return _ops.quantile_huber(pred, target, taus, weights, mask, kappa, normalize_kappa, algorithm)
