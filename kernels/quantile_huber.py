"""Quantile Huber loss (docs/math.md, "1-2. Quantile Huber and its risk-weighted form"): per-token
loss and gradient in one pass.

Grid: one program per block of BLOCK_T tokens (BLOCK_T = 1 for large rows). The program walks the
N quantiles in tiles of BLOCK_N (theta and tau in registers) and, for each, streams the M targets
in tiles of BLOCK_M, accumulating the pair loss `|tau - 1{u<0}| L_k(u)` and the pair gradient
`|tau - 1{u<0}| clamp(u, -k, k)` in two [BLOCK_T, BLOCK_N, BLOCK_M] register accumulators, reduced
over M once per N tile. The `[tokens, N, M]` pair tensor never exists in memory. Full M tiles run
without column masks; the ragged last tile zeroes its padding columns through the asymmetry weight.
The Huber value uses c = clamp(u, -k, k): L_k(u) = c (u - c/2), so a pair costs ~9 flops.

Masked tokens (mask weight 0) load nothing (their inputs read as 0, so NaN there cannot leak) and
write exact zeros; a block with no real token skips the pair loop. Real tokens' loss and gradient
are multiplied by their mask weight. No atomics: every output element has one writer.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (SUM, acc_dtype, configs, device_guard, mask_arg, prune_tiles, tile_config, tl_acc,
                      token_block)

# (BLOCK_T, BLOCK_N, BLOCK_M, num_warps): several tokens per program only for small rows.
_GPU_CONFIGS = [tile_config(*c) for c in [
    (1, 16, 64, 2), (1, 32, 32, 2), (1, 32, 64, 4), (1, 64, 32, 4), (1, 64, 64, 4), (1, 64, 64, 8),
    (1, 32, 128, 4), (1, 128, 64, 8), (2, 16, 32, 2), (4, 16, 16, 2), (4, 16, 32, 4), (8, 16, 16, 4),
]]
_INTERP_CONFIGS = [tile_config(8, 16, 32, 1)]


@triton.jit
def _huber_clamp(u, kappa):
    """clamp(u, -kappa, kappa), NaN for a NaN u (a NaN target or atom must reach the gradient; the
    default min/max return the other operand)."""
    return tl.minimum(tl.maximum(u, -kappa, propagate_nan=tl.PropagateNan.ALL), kappa,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def qh_rows(theta, tau, z_base, s_zm, M, kappa, tok_ok, BLOCK_M: tl.constexpr, ACC: tl.constexpr):
    """For a [BLOCK_T, BLOCK_N] tile of quantiles (taus `tau` [BLOCK_N]) against each token's M
    targets (row pointers z_base [BLOCK_T], loaded where tok_ok): the per-quantile sums
    S = sum_j |tau - 1{u<0}| L_k(u) and G = sum_j |tau - 1{u<0}| clamp(u, -k, k), u = z_j - theta."""
    th = theta[:, :, None]
    t_hi = tau[None, :, None]
    t_lo = 1.0 - t_hi
    acc_l = tl.full([theta.shape[0], theta.shape[1], BLOCK_M], 0, ACC)
    acc_g = tl.full([theta.shape[0], theta.shape[1], BLOCK_M], 0, ACC)
    cols = tl.arange(0, BLOCK_M)
    z_row = z_base[:, None]
    row_ok = tok_ok[:, None]
    m_full = (M // BLOCK_M) * BLOCK_M
    for m0 in range(0, m_full, BLOCK_M):
        z = tl.load(z_row + (m0 + cols)[None, :].to(tl.int64) * s_zm, mask=row_ok, other=0.0).to(ACC)
        u = z[:, None, :] - th
        c = _huber_clamp(u, kappa)
        asym = tl.where(u < 0, t_lo, t_hi)
        acc_l += asym * (c * (u - 0.5 * c))
        acc_g += asym * c
    if m_full < M:  # the ragged last tile: padding columns weigh 0
        col_ok = (m_full + cols) < M
        z = tl.load(z_row + (m_full + cols)[None, :].to(tl.int64) * s_zm, mask=row_ok & col_ok[None, :],
                    other=0.0).to(ACC)
        u = z[:, None, :] - th
        c = _huber_clamp(u, kappa)
        asym = tl.where(col_ok[None, None, :], tl.where(u < 0, t_lo, t_hi), 0.0)
        acc_l += asym * (c * (u - 0.5 * c))
        acc_g += asym * c
    return tl.reduce(acc_l, 2, SUM), tl.reduce(acc_g, 2, SUM)


def _prune(configs_, named_args, **kwargs):
    return prune_tiles(configs_, named_args)


@triton.autotune(configs=configs(_GPU_CONFIGS, _INTERP_CONFIGS), key=["N", "M"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _quantile_huber_kernel(pred_ptr, target_ptr, taus_ptr, w_ptr, mask_ptr, loss_ptr, grad_ptr,
                           T, N, M, s_pt, s_pn, s_zt, s_zm,
                           kappa_: tl.float64, scale_: tl.float64,
                           HAS_W: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    tok, tv, mw, keep = token_block(mask_ptr, T, HAS_MASK, ACC, BLOCK_T)
    kappa = tl.full((), kappa_, ACC)
    scale = tl.full((), scale_, ACC)
    p_base = pred_ptr + tok * s_pt
    z_base = target_ptr + tok * s_zt
    g_row = (grad_ptr + tok * N)[:, None]
    rows = tl.arange(0, BLOCK_N)
    if tl.reduce(keep.to(tl.int32), 0, SUM) > 0:
        total = tl.full([BLOCK_T], 0, ACC)
        g_scale = (scale * mw)[:, None]
        for n0 in range(0, N, BLOCK_N):
            offs = n0 + rows
            valid = offs < N
            theta = tl.load(p_base[:, None] + offs[None, :].to(tl.int64) * s_pn,
                            mask=keep[:, None] & valid[None, :], other=0.0).to(ACC)
            tau = tl.load(taus_ptr + offs, mask=valid, other=0.0).to(ACC)
            S, G = qh_rows(theta, tau, z_base, s_zm, M, kappa, keep, BLOCK_M, ACC)
            if HAS_W:
                w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(ACC)
            else:
                w = tl.where(valid, 1.0, 0.0).to(ACC)
            total += tl.reduce(S * w[None, :], 1, SUM)
            g = tl.where(keep[:, None], -(G * w[None, :]) * g_scale, 0.0)
            tl.store(g_row + offs[None, :], g.to(grad_ptr.dtype.element_ty), mask=tv[:, None] & valid[None, :])
        tl.store(loss_ptr + tok, tl.where(keep, total * scale * mw, 0.0), mask=tv)
    else:
        for n0 in range(0, N, BLOCK_N):
            offs = n0 + rows
            tl.store(g_row + offs[None, :], tl.full([BLOCK_T, BLOCK_N], 0, grad_ptr.dtype.element_ty),
                     mask=tv[:, None] & (offs < N)[None, :])
        tl.store(loss_ptr + tok, tl.full([BLOCK_T], 0, ACC), mask=tv)


def quantile_huber(pred, target, taus, weights, mask, kappa, normalize_kappa):
    """Launch: pred [T, N], target [T, M] (any strides; fp16/bf16/fp32/fp64), taus [N], weights [N]
    or None, mask [T] (bool, or float weights) or None -> (loss [T] in fp32 (fp64 for fp64), grad [T, N] in
    pred's dtype)."""
    T, N = pred.shape
    M = target.shape[1]
    acc = acc_dtype(pred.dtype)
    loss = pred.new_empty((T,), dtype=acc)
    grad = pred.new_empty((T, N))  # in pred's dtype: the stores round once
    if T == 0:
        return loss, grad
    taus = taus.to(acc).contiguous()
    w = None if weights is None else weights.to(acc).contiguous()
    mk = None if mask is None else mask_arg(mask, acc)
    scale = 1.0 / (N * M) / (kappa if normalize_kappa else 1.0)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]),)

    with device_guard(pred):
        _quantile_huber_kernel[grid](
            pred, target, taus, taus if w is None else w, taus if mk is None else mk, loss, grad,
            T, N, M, pred.stride(0), pred.stride(1), target.stride(0), target.stride(1),
            float(kappa), float(scale),
            HAS_W=w is not None, HAS_MASK=mk is not None, ACC=tl_acc(pred.dtype))
    return loss, grad
