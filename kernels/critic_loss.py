"""The fused DVPO critic loss (docs/math.md, "10. The fused critic loss"): the eight per-token terms,
the weighted total and the gradient w.r.t. every head, in one kernel launch.

Grid: one program per block of BLOCK_T tokens (BLOCK_T = 1 for large rows). Targets are detached,
so the gradient is computed here, in the forward pass; the autograd backward only scales it.

Two tail-term modes (params' tail_mode entry, the TAIL_MODE constexpr: each mode is its own
specialization): recipe (0: the targets' own tails, docs/math.md, "The recipe's forms") and
consistent (1: dvpo.reference's consistent_tail_terms / expectile_shift_per_token: targets about
theta's own VaR atoms, built from one pass over the target row, no target selection).

Phase A (row statistics, rows in registers: theta = mean of the heads [BLOCK_T, N_PAD], targets
[BLOCK_T, M_PAD]):
  * tail thresholds of theta (and, in recipe mode, of the targets), sorting-free: rank counting on
    an [n, n] tile for short rows (padded n <= RANK_SELECT_MAX), else the exact bisection select
    (`kth_key2`: the lower- and upper-tail selects of a row share one reduction per key bit);
    CVaR_alpha, CVaR+_beta, the VaR atoms v (the threshold values) and the tail spreads in closed
    form from the thresholds (`tail_stats`);
  * terms 4 (cvar), 5 (gain), 7 (shape) and their per-atom gradient factors
    dT/dtheta_i = c_lo_i (A_lo + B_lo (theta_i - ctr_lo)) + c_hi_i (A_hi + B_hi (theta_i - ctr_hi)),
    ctr = CVaR (recipe: the tail variances) or v (consistent: the second moments about v; v and
    the targets y = v + scale E[min(z - v, 0)] / level, s = scale^2 E[min(z - v, 0)^2] / level
    (max for the upper tail) are constants of the gradient, a semi-gradient);
  * term 6 (shift: recipe relu(mean z - mean theta); consistent 2 omega d^2, omega = tau_s or
    1 - tau_s by the sign of d = mean z - mean theta) and term 8 (curvature: each tail mean of second
    differences telescopes to four atoms, so its value and gradient weights are per-index constants).
Phase B (tiles of BLOCK_N quantiles; theta re-derived from the heads bitwise identically):
  * terms 1-2: the quantile Huber pair loop over the targets in tiles of BLOCK_M (the same sums
    serve qh and risk: risk = sum_i w_i S_i), never an [N, M] buffer;
  * the CVaR coefficients c_lo, c_hi of the tile (ties broken by index through a cumsum and a carry
    across tiles), the shift and curvature gradients;
  * term 9 (consistency) and the per-head gradient d total / d head_h = g_theta / H
    + w_consist 4/(H-1) (head_h - theta), written once per head.
A weight of 0 removes its term's code at compile time (constexpr flags) and reports the term as 0.
Masked tokens read nothing (NaN there cannot leak) and get exact zeros; a block with no real token
skips all work. No atomics: every output element has one writer.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dvpo.config import PARAM_NAMES, TERM_NAMES
from dvpo.reference import curvature_counts

from . import _common
from ._common import (SUM, acc_dtype, configs, curv_weights, device_guard, head_mean, mask_arg, pow2,
                      prune_tiles, row_keys2, tail_coef, tail_select, tail_stats, tile_config, tl_acc,
                      token_block)
from .quantile_huber import qh_rows

# The term order is dvpo.config's TERM_NAMES (the one source of truth; csrc/terms.h is generated from
# it): the kernel writes each term at its TERM_NAMES index and takes the weights by name.
N_TERMS = len(TERM_NAMES)
N_PARAMS = len(PARAM_NAMES)  # the op's `params`: the term weights, tail_mode, lo_scale, hi_scale, shift_expectile
_N_TERMS = tl.constexpr(N_TERMS)
_QH, _RISK, _CVAR, _GAIN, _SHIFT, _SHAPE, _CURV, _CONSIST = (  # each term's index, looked up by name
    tl.constexpr(TERM_NAMES.index(name))
    for name in ("qh", "risk", "cvar", "gain", "shift", "shape", "curv", "consist"))
_TAIL_MODE, _LO_SCALE, _HI_SCALE, _SHIFT_EXPECTILE = (
    PARAM_NAMES.index(name) for name in ("tail_mode", "lo_scale", "hi_scale", "shift_expectile"))

# (BLOCK_T, BLOCK_N, BLOCK_M, num_warps); the pruning keeps those that fit the rows (see prune_tiles).
_GPU_CONFIGS = [tile_config(*c) for c in [
    (1, 16, 64, 2), (1, 32, 32, 2), (1, 32, 64, 4), (1, 64, 32, 4), (1, 64, 64, 8), (1, 32, 128, 4),
    (1, 64, 64, 16), (2, 16, 32, 2), (4, 16, 16, 2), (4, 16, 32, 4), (8, 16, 16, 4),
]]
_INTERP_CONFIGS = [tile_config(8, 16, 32, 1)]


def _prune(configs_, named_args, **kwargs):
    rank_row = max(pow2(named_args["N"]) if kwargs.get("RANK_N") else 0,
                   pow2(named_args["M"]) if kwargs.get("RANK_M") else 0)
    return prune_tiles(configs_, named_args, row_regs=True, rank_row=rank_row)


@triton.jit
def _consistent_tail(theta, key, t, L, a_n, UPPER: tl.constexpr, z, vm, y_k, s_k, w_align, w_shape,
                     DO_ALIGN: tl.constexpr, DO_SHAPE: tl.constexpr, IS_F64: tl.constexpr, SPREAD: tl.constexpr):
    """One consistent-mode tail: (CVaR C, VaR v, alignment term, its gradient factor A, shape part,
    its factor B), with the target's excess e = min(z - v, 0) (max above) over the real lanes `vm`:
    alignment (C - (v + y_k sum e))^2, A = 2 w_align (C - ...); shape (S - s_k sum e^2)^2,
    B = 4 w_shape (S - ...). y_k, s_k fold scale / (level M) and scale^2 / (level M)."""
    cv, v, S = tail_stats(theta, key, t, L, a_n, UPPER, IS_F64, SPREAD)
    if UPPER:
        dz = tl.where(vm[None, :], tl.maximum(z - v[:, None], 0.0), 0.0)
    else:
        dz = tl.where(vm[None, :], tl.minimum(z - v[:, None], 0.0), 0.0)
    zero = cv * 0.0
    align_t = zero
    A = zero
    shape_t = zero
    B = zero
    if DO_ALIGN:
        d = cv - (v + y_k * tl.reduce(dz, 1, SUM))
        align_t = d * d
        A = 2.0 * w_align * d
    if DO_SHAPE:
        e = S - s_k * tl.reduce(dz * dz, 1, SUM)
        shape_t = e * e
        B = 4.0 * w_shape * e
    return cv, v, align_t, A, shape_t, B


@triton.autotune(configs=configs(_GPU_CONFIGS, _INTERP_CONFIGS),
                 key=["N", "M", "H", "RANK_N", "RANK_M", "TAIL_MODE"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _critic_loss_kernel(
        heads_ptr, target_ptr, taus_ptr, riskw_ptr, mask_ptr, total_ptr, terms_ptr, grad_ptr,
        T, H, N, M, s_ht, s_hh, s_hn, s_zt, s_zm,
        k_lo_n, k_hi_n, k_lo_m, k_hi_m, n_lo, n_hi,
        kappa_: tl.float64, qh_scale_: tl.float64,
        a_lo_n_: tl.float64, a_hi_n_: tl.float64, a_lo_m_: tl.float64, a_hi_m_: tl.float64,
        w_qh_: tl.float64, w_risk_: tl.float64, w_cvar_: tl.float64, w_gain_: tl.float64,
        w_shift_: tl.float64, w_shape_: tl.float64, w_curv_: tl.float64, w_consist_: tl.float64,
        y_lo_k_: tl.float64, s_lo_k_: tl.float64, y_hi_k_: tl.float64, s_hi_k_: tl.float64,
        tau_s_: tl.float64, TAIL_MODE: tl.constexpr,
        HAS_MASK: tl.constexpr, DO_QH: tl.constexpr, DO_RISK: tl.constexpr, DO_CVAR: tl.constexpr,
        DO_GAIN: tl.constexpr, DO_SHIFT: tl.constexpr, DO_SHAPE: tl.constexpr, DO_CURV: tl.constexpr,
        DO_CONSIST: tl.constexpr, DO_LO: tl.constexpr, DO_HI: tl.constexpr,
        RANK_N: tl.constexpr, RANK_M: tl.constexpr, IS_F64: tl.constexpr, ACC: tl.constexpr,
        N_PAD: tl.constexpr, M_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    tok, tv, mw, keep = token_block(mask_ptr, T, HAS_MASK, ACC, BLOCK_T)
    h_base = heads_ptr + tok * s_ht
    z_base = target_ptr + tok * s_zt
    g_row = (grad_ptr + tok * (H * N))[:, None]
    o_base = terms_ptr + tok * _N_TERMS
    rows = tl.arange(0, BLOCK_N)
    zero = tl.full([BLOCK_T], 0, ACC)
    if tl.reduce(keep.to(tl.int32), 0, SUM) > 0:
        kappa = tl.full((), kappa_, ACC)
        qh_scale = tl.full((), qh_scale_, ACC)
        w_qh = tl.full((), w_qh_, ACC)
        w_risk = tl.full((), w_risk_, ACC)
        w_cvar = tl.full((), w_cvar_, ACC)
        w_gain = tl.full((), w_gain_, ACC)
        w_shift = tl.full((), w_shift_, ACC)
        w_shape = tl.full((), w_shape_, ACC)
        w_curv = tl.full((), w_curv_, ACC)
        w_consist = tl.full((), w_consist_, ACC)
        keep2 = keep[:, None]

        # ---------------- Phase A: row statistics (rows in registers) ----------------
        offs_n = tl.arange(0, N_PAD)
        vn = offs_n < N
        theta = head_mean(h_base, offs_n, keep2 & vn[None, :], H, s_hh, s_hn, ACC)
        offs_m = tl.arange(0, M_PAD)
        vm = offs_m < M
        z = tl.load(z_base[:, None] + offs_m[None, :].to(tl.int64) * s_zm, mask=keep2 & vm[None, :], other=0.0).to(ACC)

        cvar_t = zero
        gain_t = zero
        shift_t = zero
        shape_t = zero
        curv_t = zero
        A_lo = zero
        B_lo = zero
        cv_lo = zero
        A_hi = zero
        B_hi = zero
        cv_hi = zero
        if DO_LO:
            a_lo_n = tl.full((), a_lo_n_, ACC)
            a_lo_m = tl.full((), a_lo_m_, ACC)
        if DO_HI:
            a_hi_n = tl.full((), a_hi_n_, ACC)
            a_hi_m = tl.full((), a_hi_m_, ACC)
        SPREAD: tl.constexpr = DO_SHAPE * (TAIL_MODE + 1)  # 0 none, 1 variance (recipe), 2 about v
        kt_lo, t_lo, L_lo, kt_hi, t_hi, L_hi = tail_select(theta, vn[None, :], k_lo_n, k_hi_n, DO_LO, DO_HI,
                                                           RANK_N, IS_F64)
        g_shift = zero
        if TAIL_MODE == 0:
            # recipe: the target's own CVaR / tail variance (a selection over the target row)
            kz_lo, u_lo, Lu_lo, kz_hi, u_hi, Lu_hi = tail_select(z, vm[None, :], k_lo_m, k_hi_m, DO_LO, DO_HI,
                                                                 RANK_M, IS_F64)
            if DO_LO:
                cv_lo, vt_lo, var_t_lo = tail_stats(theta, kt_lo, t_lo, L_lo, a_lo_n, False, IS_F64, SPREAD)
                cz_lo, vz_lo, var_z_lo = tail_stats(z, kz_lo, u_lo, Lu_lo, a_lo_m, False, IS_F64, SPREAD)
            if DO_HI:
                cv_hi, vt_hi, var_t_hi = tail_stats(theta, kt_hi, t_hi, L_hi, a_hi_n, True, IS_F64, SPREAD)
                cz_hi, vz_hi, var_z_hi = tail_stats(z, kz_hi, u_hi, Lu_hi, a_hi_m, True, IS_F64, SPREAD)
            ctr_lo = cv_lo  # the gradient factors' centres: d var / d theta_i = 2 c_i (theta_i - CVaR)
            ctr_hi = cv_hi
            if DO_CVAR:
                d_lo = cv_lo - cz_lo
                cvar_t = d_lo * d_lo
                A_lo = 2.0 * w_cvar * d_lo
            if DO_GAIN:
                d_hi = cv_hi - cz_hi
                gain_t = d_hi * d_hi
                A_hi = 2.0 * w_gain * d_hi
            if DO_SHAPE:
                v_lo = var_t_lo - var_z_lo  # the lower tail may not be wider than the target's
                v_hi = var_z_hi - var_t_hi  # the upper tail may not be narrower
                shape_t = tl.maximum(v_lo, 0.0) + tl.maximum(v_hi, 0.0)
                B_lo = tl.where(v_lo > 0, 2.0 * w_shape, 0.0)
                B_hi = tl.where(v_hi > 0, -2.0 * w_shape, 0.0)
            if DO_SHIFT:
                gap = tl.reduce(z, 1, SUM) / M - tl.reduce(theta, 1, SUM) / N
                shift_t = tl.maximum(gap, 0.0)
                g_shift = tl.where(gap > 0, -w_shift / N, 0.0)
        else:
            # consistent: targets about theta's own VaR atoms v (constants in the gradient), one pass
            # over the target row per tail, no selection of the target
            ctr_lo = zero
            ctr_hi = zero
            if DO_LO:
                cv_lo, ctr_lo, cvar_t, A_lo, sh_lo, B_lo = _consistent_tail(
                    theta, kt_lo, t_lo, L_lo, a_lo_n, False, z, vm, tl.full((), y_lo_k_, ACC),
                    tl.full((), s_lo_k_, ACC), w_cvar, w_shape, DO_CVAR, DO_SHAPE, IS_F64, SPREAD)
                shape_t += sh_lo
            if DO_HI:
                cv_hi, ctr_hi, gain_t, A_hi, sh_hi, B_hi = _consistent_tail(
                    theta, kt_hi, t_hi, L_hi, a_hi_n, True, z, vm, tl.full((), y_hi_k_, ACC),
                    tl.full((), s_hi_k_, ACC), w_gain, w_shape, DO_GAIN, DO_SHAPE, IS_F64, SPREAD)
                shape_t += sh_hi
            if DO_SHIFT:
                tau_s = tl.full((), tau_s_, ACC)
                gap = tl.reduce(z, 1, SUM) / M - tl.reduce(theta, 1, SUM) / N
                om = tl.where(gap > 0, tau_s, 1.0 - tau_s)
                shift_t = 2.0 * om * gap * gap
                g_shift = -4.0 * w_shift * om * gap / N
        f_lo = zero
        f_hi = zero
        if DO_CURV:
            wl, wh = curv_weights(offs_n, N, n_lo, n_hi, ACC)
            c_lo = tl.reduce(theta * wl[None, :], 1, SUM)
            c_hi = tl.reduce(theta * wh[None, :], 1, SUM)
            curv_t = tl.maximum(c_lo, 0.0) + tl.maximum(c_hi, 0.0)
            f_lo = tl.where(c_lo > 0, w_curv, 0.0)
            f_hi = tl.where(c_hi > 0, w_curv, 0.0)

        # ---------------- Phase B: tiles of quantiles: pair loop, gradient ----------------
        s_qh = zero
        s_risk = zero
        s_cons = zero
        carry_lo = tl.full([BLOCK_T], 0, tl.int32)
        carry_hi = tl.full([BLOCK_T], 0, tl.int32)
        cons_coef = w_consist * 0.0
        if DO_CONSIST:
            cons_coef = w_consist * 4.0 / (H - 1)
        g_out = mw[:, None] / H
        for n0 in range(0, N, BLOCK_N):
            offs = n0 + rows
            valid = offs < N
            ok = keep2 & valid[None, :]
            th = head_mean(h_base, offs, ok, H, s_hh, s_hn, ACC)
            g = tl.full([BLOCK_T, BLOCK_N], 0, ACC)
            if DO_QH or DO_RISK:
                tau = tl.load(taus_ptr + offs, mask=valid, other=0.0).to(ACC)
                S, G = qh_rows(th, tau, z_base, s_zm, M, kappa, keep, BLOCK_M, ACC)
                S = tl.where(valid[None, :], S, 0.0)
                coef = tl.full([BLOCK_N], 0, ACC)
                if DO_QH:
                    s_qh += tl.reduce(S, 1, SUM)
                    coef += w_qh
                if DO_RISK:
                    rw = tl.load(riskw_ptr + offs, mask=valid, other=0.0).to(ACC)
                    s_risk += tl.reduce(S * rw[None, :], 1, SUM)
                    coef += w_risk * rw
                g -= (qh_scale * coef)[None, :] * G
            if DO_LO or DO_HI:
                k_lo, k_hi = row_keys2(th, valid[None, :], IS_F64)
            if DO_LO:
                c, carry_lo = tail_coef(k_lo, t_lo, L_lo, a_lo_n, carry_lo)
                g += c * (A_lo[:, None] + B_lo[:, None] * (th - ctr_lo[:, None]))
            if DO_HI:
                c, carry_hi = tail_coef(k_hi, t_hi, L_hi, a_hi_n, carry_hi)
                g += c * (A_hi[:, None] + B_hi[:, None] * (th - ctr_hi[:, None]))
            if DO_SHIFT:
                g += g_shift[:, None]
            if DO_CURV:
                cw_lo, cw_hi = curv_weights(offs, N, n_lo, n_hi, ACC)
                g += f_lo[:, None] * cw_lo[None, :] + f_hi[:, None] * cw_hi[None, :]
            g = g * g_out  # d theta / d head = 1/H, times the mask weight
            st_ok = tv[:, None] & valid[None, :]
            h_ptr = h_base[:, None] + offs[None, :].to(tl.int64) * s_hn
            g_ptr = g_row + offs[None, :]
            for _ in range(H):
                gh = g
                if DO_CONSIST:
                    d = tl.load(h_ptr, mask=ok, other=0.0).to(ACC) - th
                    s_cons += tl.reduce(d * d, 1, SUM)
                    gh = g + (cons_coef * mw)[:, None] * d
                tl.store(g_ptr, tl.where(keep2, gh, 0.0).to(grad_ptr.dtype.element_ty), mask=st_ok)
                h_ptr += s_hh
                g_ptr += N

        qh_t = s_qh * qh_scale
        risk_t = s_risk * qh_scale
        cons_t = zero
        if DO_CONSIST:
            cons_t = s_cons * (2.0 / (H - 1))
        total = (w_qh * qh_t + w_risk * risk_t + w_cvar * cvar_t + w_gain * gain_t + w_shift * shift_t
                 + w_shape * shape_t + w_curv * curv_t + w_consist * cons_t)
        tl.store(total_ptr + tok, tl.where(keep, total * mw, 0.0), mask=tv)
        tl.store(o_base + _QH, tl.where(keep, qh_t * mw, 0.0), mask=tv)
        tl.store(o_base + _RISK, tl.where(keep, risk_t * mw, 0.0), mask=tv)
        tl.store(o_base + _CVAR, tl.where(keep, cvar_t * mw, 0.0), mask=tv)
        tl.store(o_base + _GAIN, tl.where(keep, gain_t * mw, 0.0), mask=tv)
        tl.store(o_base + _SHIFT, tl.where(keep, shift_t * mw, 0.0), mask=tv)
        tl.store(o_base + _SHAPE, tl.where(keep, shape_t * mw, 0.0), mask=tv)
        tl.store(o_base + _CURV, tl.where(keep, curv_t * mw, 0.0), mask=tv)
        tl.store(o_base + _CONSIST, tl.where(keep, cons_t * mw, 0.0), mask=tv)
    else:
        for n0 in range(0, N, BLOCK_N):
            offs = n0 + rows
            st_ok = tv[:, None] & (offs < N)[None, :]
            g_ptr = g_row + offs[None, :]
            for _ in range(H):
                tl.store(g_ptr, tl.full([BLOCK_T, BLOCK_N], 0, grad_ptr.dtype.element_ty), mask=st_ok)
                g_ptr += N
        tl.store(total_ptr + tok, zero, mask=tv)
        for k in range(_N_TERMS):
            tl.store(o_base + k, zero, mask=tv)


# The kernel's w_<name>_ arguments, in its signature's order (the launcher passes the weights by name).
KERNEL_WEIGHT_ORDER = tuple(a[len("w_"):-1] for a in _critic_loss_kernel.arg_names if a.startswith("w_"))


def critic_loss(heads, target, taus, risk_w, mask, kappa, alpha, beta, normalize_kappa, params, select="auto"):
    """Launch: heads [T, H, N], target [T, M] (any strides; fp16/bf16/fp32/fp64), taus [N], risk_w [N],
    mask [T] (bool, or float weights) or None, params: the 12 kernel parameters (dvpo.config.PARAM_NAMES: the
    8 term weights in TERM_NAMES order, tail_mode 0 recipe / 1 consistent, lo_scale, hi_scale,
    shift_expectile) -> (total [T], terms [T, 8]) in fp32 (fp64 for fp64 inputs), grad [T, H, N] in heads' dtype.

    `select`: how the CVaR thresholds are found: "rank" (rank counting), "bisect" (bisection
    select) or "auto" (rank counting for rows of at most RANK_SELECT_MAX padded atoms)."""
    T, H, N = heads.shape
    M = target.shape[1]
    if max(pow2(N), pow2(M)) > _common.MAX_ROW:
        raise ValueError(f"the fused Triton critic loss holds a token's rows in registers: N and M must be "
                         f"<= {_common.MAX_ROW}, got N={N}, M={M}")
    p = [float(x) for x in params]
    if len(p) != N_PARAMS:
        raise ValueError(f"params must hold the {N_PARAMS} kernel parameters ({N_TERMS} term weights, tail_mode, "
                         f"lo_scale, hi_scale, shift_expectile), got {len(p)}")
    consistent = p[_TAIL_MODE] != 0  # tail_mode: 0 recipe, 1 (any other value, as the reference) consistent
    w = dict(zip(TERM_NAMES, p[:N_TERMS]))
    lo_scale, hi_scale, tau_s = p[_LO_SCALE], p[_HI_SCALE], p[_SHIFT_EXPECTILE]
    acc = acc_dtype(heads.dtype)
    total = heads.new_empty((T,), dtype=acc)
    terms = heads.new_empty((T, N_TERMS), dtype=acc)
    grad = heads.new_empty((T, H, N))  # in heads' dtype: the stores round once
    if T == 0:
        return total, terms, grad
    do = {name: w[name] != 0 for name in TERM_NAMES}
    do["curv"] = do["curv"] and N >= 3
    do["consist"] = do["consist"] and H > 1
    n_lo, n_hi = curvature_counts(N, alpha, beta) if N >= 3 else (1, 1)  # on the host, in double
    taus = taus.to(acc).contiguous()
    risk_w = risk_w.to(acc).contiguous()
    mk = None if mask is None else mask_arg(mask, acc)
    a_lo_n, a_hi_n, a_lo_m, a_hi_m = alpha * N, beta * N, alpha * M, beta * M
    qh_scale = 1.0 / (N * M) / (kappa if normalize_kappa else 1.0)
    # consistent mode's target factors (host, double): y = v + scale sum_j part_j / (level M),
    # s = scale^2 sum_j part_j^2 / (level M)
    tails = (lo_scale / a_lo_m, lo_scale * lo_scale / a_lo_m, hi_scale / a_hi_m, hi_scale * hi_scale / a_hi_m)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]),)

    with device_guard(heads):
        _critic_loss_kernel[grid](
            heads, target, taus, risk_w, taus if mk is None else mk, total, terms, grad,
            T, H, N, M, heads.stride(0), heads.stride(1), heads.stride(2), target.stride(0), target.stride(1),
            max(1, math.ceil(a_lo_n)), max(1, math.ceil(a_hi_n)), max(1, math.ceil(a_lo_m)),
            max(1, math.ceil(a_hi_m)), n_lo, n_hi,
            float(kappa), float(qh_scale), a_lo_n, a_hi_n, a_lo_m, a_hi_m,
            *(w[name] for name in KERNEL_WEIGHT_ORDER), *tails, tau_s,
            TAIL_MODE=int(consistent), HAS_MASK=mk is not None, DO_QH=do["qh"], DO_RISK=do["risk"],
            DO_CVAR=do["cvar"], DO_GAIN=do["gain"], DO_SHIFT=do["shift"], DO_SHAPE=do["shape"],
            DO_CURV=do["curv"], DO_CONSIST=do["consist"], DO_LO=do["cvar"] or do["shape"],
            DO_HI=do["gain"] or do["shape"], RANK_N=_common.use_rank(select, N),
            RANK_M=not consistent and _common.use_rank(select, M),  # consistent mode selects nothing in z
            IS_F64=acc == torch.float64, ACC=tl_acc(heads.dtype), N_PAD=pow2(N), M_PAD=pow2(M))
    return total, terms, grad
