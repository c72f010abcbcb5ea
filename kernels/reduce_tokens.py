"""Token reduction (docs/math.md, "Reductions"): per-token values [R, S] (a row per sequence), already
0 at masked tokens, and an optional bool/float mask to one number and its gradient, the weight of
every token (1 / W for token-mean; per row 1 / (w_r V) or 1 / V for the sequence reductions, 0 in a
row without a real token; a zero denominator counts as 1).

One program: tiles of BLOCK_R rows x BLOCK_S tokens, sums in fp64, in a fixed order (no atomics), so
the result is the same at every call. A second sweep writes the weights (re-reading only the mask).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dvpo.config import TOKEN_REDUCTIONS

from ._common import acc_dtype, device_guard, interpreting, mask_arg

# A reduction's id in the kernel is its place in dvpo.config.TOKEN_REDUCTIONS (as csrc/terms.h's).
REDUCTIONS = {name: i for i, name in enumerate(TOKEN_REDUCTIONS)}
_TOKEN_MEAN = tl.constexpr(REDUCTIONS["token-mean"])
_SEQ_MEAN_TOKEN_MEAN = tl.constexpr(REDUCTIONS["seq-mean-token-mean"])


@triton.jit
def _row_sums(v_ptr, m_ptr, rows, S, HAS_MASK: tl.constexpr, WANT_VALUES: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, R):
    """Sums of the values and of the mask weights of BLOCK_R rows, in fp64."""
    rs = tl.zeros([BLOCK_R], dtype=tl.float64)
    rw = tl.zeros([BLOCK_R], dtype=tl.float64)
    for s0 in range(0, S, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S)
        ok = (rows[:, None] < R) & (cols[None, :] < S)
        off = rows[:, None].to(tl.int64) * S + cols[None, :]
        if WANT_VALUES:
            rs += tl.sum(tl.load(v_ptr + off, mask=ok, other=0).to(tl.float64), axis=1)
        if HAS_MASK:
            rw += tl.sum(tl.load(m_ptr + off, mask=ok, other=0).to(tl.float64), axis=1)
        else:
            rw += tl.sum(ok.to(tl.float64), axis=1)
    return rs, rw


@triton.jit
def _reduce_tokens_kernel(v_ptr, m_ptr, loss_ptr, w_ptr, R, S, HAS_MASK: tl.constexpr, RED: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    num = tl.zeros([BLOCK_R], dtype=tl.float64)
    den = tl.zeros([BLOCK_R], dtype=tl.float64)  # W (token-mean) or V, per lane, summed at the end
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rs, rw = _row_sums(v_ptr, m_ptr, rows, S, HAS_MASK, True, BLOCK_R, BLOCK_S, R)
        if RED == _TOKEN_MEAN:
            num += rs
            den += rw
        else:
            real = rw > 0
            if RED == _SEQ_MEAN_TOKEN_MEAN:
                num += tl.where(real, rs / tl.where(real, rw, 1.0), 0.0)
            else:
                num += tl.where(real, rs, 0.0)
            den += real.to(tl.float64)
    total_den = tl.sum(den, axis=0)
    safe = tl.where(total_den > 0, total_den, 1.0)
    tl.store(loss_ptr, (tl.sum(num, axis=0) / safe).to(loss_ptr.dtype.element_ty))
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        if RED == _TOKEN_MEAN:
            g = tl.zeros([BLOCK_R], dtype=tl.float64) + 1.0 / safe
        else:
            _, rw = _row_sums(v_ptr, m_ptr, rows, S, HAS_MASK, False, BLOCK_R, BLOCK_S, R)
            real = rw > 0
            if RED == _SEQ_MEAN_TOKEN_MEAN:
                g = tl.where(real, 1.0 / tl.where(real, rw, 1.0), 0.0) / safe
            else:
                g = tl.where(real, 1.0, 0.0) / safe
        for s0 in range(0, S, BLOCK_S):
            cols = s0 + tl.arange(0, BLOCK_S)
            ok = (rows[:, None] < R) & (cols[None, :] < S)
            off = rows[:, None].to(tl.int64) * S + cols[None, :]
            tile = tl.zeros([BLOCK_R, BLOCK_S], dtype=tl.float64) + g[:, None]
            tl.store(w_ptr + off, tile.to(w_ptr.dtype.element_ty), mask=ok)


def reduce_tokens(values, mask, reduction):
    """Launch: values [R, S], mask None or [R, S] (bool or float) -> (loss [], weights [R, S]) in fp32
    (fp64 for fp64 values)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    R, S = values.shape
    acc = acc_dtype(values.dtype)
    v = values.contiguous()
    m = None if mask is None else mask_arg(mask, acc)
    loss = v.new_empty((), dtype=acc)
    weights = v.new_empty((R, S), dtype=acc)
    if R * S == 0:
        loss.zero_()
        return loss, weights
    small = interpreting()
    with device_guard(v):
        _reduce_tokens_kernel[(1,)](v, v if m is None else m, loss, weights, R, S, HAS_MASK=m is not None,
                                    RED=REDUCTIONS[reduction], BLOCK_R=4 if small else 16,
                                    BLOCK_S=64 if small else 256, num_warps=8)
    return loss, weights
