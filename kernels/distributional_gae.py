"""Distributional GAE (docs/math.md, "11. Distributional GAE") as a reverse scan.

Grid: (blocks of BLOCK_B sequences, blocks of BLOCK_M quantiles). Each program walks its sequences
backwards in time, carrying per quantile the value and the advantage of the next real token in
registers: delta = r + gamma V_next - V, A = delta + gamma lam A_next. Padding tokens are skipped
(their value is not read, the carry passes through them, and R, A are 0 there), so the recursion
links consecutive real tokens, as verl does with its response mask. The time loop is sequential,
but the loads of step t do not depend on the carry, so the compiler pipelines them.

Outputs: R = V + A [B, T, M] and the scalar advantage mean_j A [B, T]; the latter is written as one
partial mean per quantile block and summed over the (few) blocks on the host (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SUM, acc_dtype, configs, device_guard, interpreting, pow2, tl_acc

_GPU_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (1, 2, 4) for s in (1, 3)]
_INTERP_CONFIGS = [triton.Config({}, num_warps=1)]


@triton.autotune(configs=configs(_GPU_CONFIGS, _INTERP_CONFIGS), key=["M", "BLOCK_M"])
@triton.jit
def _gae_kernel(r_ptr, v_ptr, mask_ptr, adv_ptr, ret_ptr, B, T, M,
                s_rb, s_rt, s_vb, s_vt, s_vm, s_mb, s_mt,
                gamma_: tl.float64, gamma_lam_: tl.float64,
                ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    pm = tl.program_id(1)
    offs = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    sv = seq < B
    vm = offs < M
    ok = sv[:, None] & vm[None, :]
    gamma = tl.full((), gamma_, ACC)
    gamma_lam = tl.full((), gamma_lam_, ACC)
    inv_m = tl.full((), 1.0, ACC) / M
    # Pointers at the last time step, walked backwards (64-bit pointer arithmetic, no overflow).
    last = tl.full((), T - 1, tl.int64)
    v_p = v_ptr + seq[:, None] * s_vb + offs[None, :].to(tl.int64) * s_vm + last * s_vt
    r_p = r_ptr + seq * s_rb + last * s_rt
    m_p = mask_ptr + seq * s_mb + last * s_mt
    ret_p = ret_ptr + (seq[:, None] * T + last) * M + offs[None, :]
    adv_p = adv_ptr + (pm * B + seq) * T + last
    next_v = tl.full([BLOCK_B, BLOCK_M], 0, ACC)
    next_a = tl.full([BLOCK_B, BLOCK_M], 0, ACC)
    for _ in range(T):
        here = tl.load(m_p, mask=sv, other=0.0) != 0
        here2 = here[:, None]
        r = tl.load(r_p, mask=sv & here, other=0.0).to(ACC)
        v = tl.load(v_p, mask=ok & here2, other=0.0).to(ACC)
        a = tl.where(here2, r[:, None] + gamma * next_v - v + gamma_lam * next_a, 0.0)
        tl.store(ret_p, tl.where(here2, v + a, 0.0), mask=ok)
        tl.store(adv_p, tl.reduce(tl.where(vm[None, :], a, 0.0), 1, SUM) * inv_m, mask=sv)
        next_v = tl.where(here2, v, next_v)
        next_a = tl.where(here2, a, next_a)
        v_p -= s_vt
        r_p -= s_rt
        m_p -= s_mt
        ret_p -= M
        adv_p -= 1


def distributional_gae(rewards, values, mask, gamma, lam):
    """Launch: rewards [B, T], values [B, T, M], mask [B, T] (any strides and float dtypes)
    -> (advantages [B, T], returns [B, T, M]) in fp32 (fp64 for fp64 values)."""
    B, T, M = values.shape
    acc = acc_dtype(values.dtype)
    ret = values.new_empty((B, T, M), dtype=acc)
    if B == 0 or T == 0:
        return values.new_zeros((B, T), dtype=acc), ret
    block_m = min(pow2(M), 16 if interpreting() else 32)
    block_b = 4 if interpreting() else 1
    n_mb = triton.cdiv(M, block_m)
    adv = values.new_empty((n_mb, B, T), dtype=acc)
    if not (mask.is_floating_point() or mask.dtype == torch.bool):  # bool is read as it comes
        mask = mask.to(acc)
    with device_guard(values):
        _gae_kernel[(triton.cdiv(B, block_b), n_mb)](
            rewards, values, mask, adv, ret, B, T, M,
            rewards.stride(0), rewards.stride(1), values.stride(0), values.stride(1), values.stride(2),
            mask.stride(0), mask.stride(1), float(gamma), float(gamma) * float(lam),
            ACC=tl_acc(values.dtype), BLOCK_B=block_b, BLOCK_M=block_m)
    return (adv[0] if n_mb == 1 else adv.sum(0)), ret
