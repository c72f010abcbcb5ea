"""Masked reductions over real tokens: means, moments and whitening, in one process or across ranks.

One implementation for the trainer (`dvpo.trainer`) and the framework adapters
(`dvpo.integrations`). `all_reduce` sums a tensor over the ranks (the trainer passes
`Dist.sum_tensor`, which returns its argument in one process): a world of one rank runs exactly
the single-process arithmetic, so one process and N processes share this code.

Masks are `[B, T]` (any dtype, nonzero = real token) and broadcast over trailing dims of `x`.
Masked-out entries contribute exactly nothing (a NaN or inf there cannot leak into the result), and
an all-masked input gives a mean of 0 instead of NaN.

Whitening variance: the population variance (divide by the token count n) is the default. It is
what standardising a fixed batch means (the whitened tokens have mean 0 and variance 1), it needs
no special case for one token, and it is the plain ratio of two sums, so per-rank partial sums add
up to the global value. `unbiased=True` multiplies by n / (n - 1) (Bessel): verl's and TRL's
`masked_whiten` do, and the verl adapter reproduces them with it.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]       # the sum over ranks of a tensor; None: one process


def _identity(t: Tensor) -> Tensor:
    return t


def safe_div(num: Tensor, den) -> Tensor:
    """num / den, with den = 0 read as 1 (an empty mask gives 0, not NaN)."""
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return num / torch.where(den != 0, den, torch.ones_like(den))


def _weights(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    if mask is None:
        return torch.ones_like(x)
    m = mask.to(x.dtype)
    while m.dim() < x.dim():
        m = m.unsqueeze(-1)
    return m.expand_as(x)


def masked_sum(x: Tensor, m: Tensor) -> Tensor:
    """sum(x * m) over every entry, with x = 0 wherever m = 0 (`m`: weights shaped like x)."""
    return (torch.where(m != 0, x, torch.zeros((), dtype=x.dtype, device=x.device)) * m).sum()


def masked_mean(x: Tensor, mask: Optional[Tensor] = None, *, denom: Optional[float] = None,
                all_reduce: Optional[AllReduce] = None) -> Tensor:
    """Mean of `x` over the real tokens (every entry when `mask` is None).

    `denom` replaces the token count as the divisor (no reduction over ranks then: the trainer's
    per-rank loss share, global tokens / world size). `all_reduce`: the mean over every rank's tokens."""
    m = _weights(x, mask)
    total = masked_sum(x, m)
    if denom is not None:
        return total / denom
    count = m.sum()
    if all_reduce is not None:
        total, count = all_reduce(torch.stack([total, count])).unbind()
    return safe_div(total, count)


def masked_moments(x: Tensor, mask: Optional[Tensor] = None, *, unbiased: bool = False,
                   all_reduce: Optional[AllReduce] = None) -> Tuple[Tensor, Tensor]:
    """(mean, variance) of `x` over the real tokens (of every rank with `all_reduce`); two passes
    (the mean first, then the squared deviations). Population variance unless `unbiased` (then
    times n / (n - 1); n = 1 leaves it as is)."""
    reduce = all_reduce or _identity
    m = _weights(x, mask)
    total, count = reduce(torch.stack([masked_sum(x, m), m.sum()])).unbind()
    mean = safe_div(total, count)
    var = safe_div(reduce(masked_sum((x - mean) ** 2, m)), count)
    if unbiased:
        var = var * safe_div(count, count - 1)
    return mean, var


def masked_whiten(x: Tensor, mask: Optional[Tensor] = None, *, unbiased: bool = False, shift_mean: bool = True,
                  eps: float = 1e-8, moments: Optional[Tuple[Tensor, Tensor]] = None,
                  all_reduce: Optional[AllReduce] = None) -> Tensor:
    """`(x - mean) / sqrt(var + eps)` with the masked moments (`moments`, if the caller already has
    them). Padding is not zeroed (callers mask as their framework does); `shift_mean=False` adds the
    mean back."""
    mean, var = moments if moments is not None else masked_moments(x, mask, unbiased=unbiased,
                                                                   all_reduce=all_reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean
