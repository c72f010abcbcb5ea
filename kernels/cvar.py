"""Sorting-free CVaR (docs/math.md, "3. Sorting-free CVaR"): value and coefficients (= gradient) per token.

Grid: one program per block of BLOCK_T tokens, each row of N atoms in registers (padded to N_PAD, a
power of two). The threshold is found without sorting: by rank counting on an [N, N] comparison
tile for short rows (padded N <= RANK_SELECT_MAX: one reduction), else by an exact bisection select
on order keys (`kth_key`: one block-wide count per key bit); then, with a_n = level N, K = ceil(a_n),
x_(K) the K-th smallest atom and L = #{x < x_(K)}:

    value = (sum_{x < x_(K)} x + (a_n - L) x_(K)) / a_n
    c_i   = 1/a_n below the threshold, clamp(a_n - L - #{k < i tied}, 0, 1)/a_n tied at it, else 0,

which is exactly c_i = clamp(a_n - rank_i, 0, 1)/a_n with rank_i = #{x_k < x_i} + #{k < i: x_k == x_i}
(the tie prefix is an exclusive cumsum). The upper tail uses the reversed keys (-1 - key), i.e. the
ranks from the top with the same index tie-break: CVaR+_b(x) = -CVaR_b(-x).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (acc_dtype, configs, device_guard, kth_key, kth_key_rank, pow2, row_keys,
                      tail_coef, tail_stats, tl_acc, use_rank)

_GPU_CONFIGS = [triton.Config({"BLOCK_T": bt}, num_warps=w)
                for bt, w in [(1, 1), (1, 2), (1, 4), (1, 8), (1, 16), (4, 1), (4, 2), (4, 4), (16, 4)]]
_INTERP_CONFIGS = [triton.Config({"BLOCK_T": 8}, num_warps=1)]


def _prune(configs_, named_args, **kwargs):
    n = pow2(named_args["N"])
    work = n * n if kwargs.get("RANK") else n  # register elements per token: the rank comparison or the row
    keep = [c for c in configs_
            if c.kwargs["BLOCK_T"] * work <= 32 * 32 * c.num_warps and (c.kwargs["BLOCK_T"] == 1 or n <= 128)]
    return keep or [max(configs_, key=lambda c: (c.num_warps, -c.kwargs["BLOCK_T"]))]


@triton.autotune(configs=configs(_GPU_CONFIGS, _INTERP_CONFIGS), key=["N", "RANK"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _cvar_kernel(x_ptr, value_ptr, coef_ptr, T, N, K, s_t, s_n, a_n_: tl.float64,
                 UPPER: tl.constexpr, RANK: tl.constexpr, IS_F64: tl.constexpr, ACC: tl.constexpr,
                 N_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tv = tok < T
    offs = tl.arange(0, N_PAD)
    valid = offs < N
    ok = tv[:, None] & valid[None, :]
    x = tl.load(x_ptr + tok[:, None] * s_t + offs[None, :].to(tl.int64) * s_n, mask=ok, other=0.0).to(ACC)
    a_n = tl.full((), a_n_, ACC)
    key = row_keys(x, valid[None, :], UPPER, IS_F64)
    if RANK:
        t, L = kth_key_rank(key, K)
    else:
        t, L = kth_key(key, K, IS_F64)
    value, _, _ = tail_stats(x, key, t, L, a_n, UPPER, IS_F64, 0)
    c, _ = tail_coef(key, t, L, a_n, L * 0)
    tl.store(value_ptr + tok, value, mask=tv)
    tl.store(coef_ptr + tok[:, None] * N + offs[None, :], c.to(coef_ptr.dtype.element_ty), mask=ok)


def cvar(x, level, upper, select="auto"):
    """Launch: x [T, N] (any strides) -> (value [T] in fp32 (fp64 for fp64 x), coef [T, N] in x's dtype).

    `select`: "rank" (rank counting), "bisect" (bisection select) or "auto" (rank counting for rows
    of at most RANK_SELECT_MAX padded atoms, which is also the faster choice on the GPU there)."""
    T, N = x.shape
    if pow2(N) > _common.MAX_ROW:
        raise ValueError(f"the Triton CVaR kernel holds a row in registers: N must be <= {_common.MAX_ROW}, got {N}")
    acc = acc_dtype(x.dtype)
    value = x.new_empty((T,), dtype=acc)
    coef = x.new_empty((T, N))  # in x's dtype: the store rounds once
    if T == 0:
        return value, coef
    a_n = float(level) * N

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]),)

    with device_guard(x):
        _cvar_kernel[grid](x, value, coef, T, N, max(1, math.ceil(a_n)), x.stride(0), x.stride(1), a_n,
                           UPPER=bool(upper), RANK=use_rank(select, N), IS_F64=acc == torch.float64,
                           ACC=tl_acc(x.dtype), N_PAD=pow2(N))
    return value, coef

