"""dvpo: fused kernels for distributional value learning (DVPO, arXiv 2512.03847).

    import dvpo
    from dvpo import ops
    out = ops.critic_loss(heads, returns, mask=response_mask)   # heads [B, T, H, N], returns [B, T, M]
    out.loss.backward()
"""

from __future__ import annotations

import torch as _torch

from . import ops
from .config import CriticLossConfig, CriticLossOutput, TERM_NAMES
from .reference import taus as _reference_taus

__version__ = "0.1.0"
__all__ = ["ops", "taus", "CriticLossConfig", "CriticLossOutput", "TERM_NAMES", "__version__"]


from .build_info import warn_if_cuda_unbuilt as _warn_if_cuda_unbuilt

_warn_if_cuda_unbuilt()


def taus(n: int, kind: str = "midpoint", *, device=None, dtype=_torch.float32) -> _torch.Tensor:
    """Quantile levels of N equally weighted atoms, a `[n]` tensor.

    kind="midpoint" (default): (2i-1)/(2n); "paper": i/n, i = 1..n. `device` and `dtype` as for any
    tensor (fp32 by default). Pass the result as `taus` to the ops (they use the midpoints when
    `taus` is None). Example: `dvpo.taus(4)` -> tensor([0.1250, 0.3750, 0.6250, 0.8750]).
    """
    return _reference_taus(n, kind, device=device, dtype=dtype)
