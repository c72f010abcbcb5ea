"""Pieces shared by the Triton kernels of dvpo (installed as `dvpo.kernels._common`).

Host side: interpreter detection, autotune config lists (a single config under
`TRITON_INTERPRET=1`, so CPU tests stay fast), pruning, launch helpers.

Device side (`@triton.jit` helpers; every kernel works on a block of BLOCK_T tokens, so per-token
quantities are [BLOCK_T] vectors and rows are [BLOCK_T, n] tiles reduced along axis 1):

* order keys: the float -> signed-int map whose integer order is the float order (after -0 -> +0,
  so that -0.0 and +0.0 tie, as they compare equal). The upper tail uses `-1 - key` (= ~key), which
  reverses the order and keeps ties. Padding lanes get the largest key.
* `kth_key` / `kth_key2`: the exact bisection select of the sorting-free CVaR. The k-th smallest key
  is the largest t with #{key < t} <= k - 1; it is built bit by bit from the top (one count, i.e.
  one block reduction, per key bit: 32 for fp32, 64 for fp64), never sorting. `kth_key2` runs the
  lower- and the upper-tail select of one row at once, both counts packed in one int32 sum.
* `tail_stats`: CVaR, the VaR atom (the threshold value) and the c-weighted tail variance (or the
  second moment about the VaR atom) from the threshold, in closed form: with L = #{key < t} and
  a_n = level * n, the atoms below the threshold have c = 1/a_n and the atoms tied at it share the
  remaining weight (a_n - L)/a_n in total (how it is split among them by index does not change the
  value).
* `tail_coef`: the per-atom coefficients c_i = clamp(a_n - rank_i, 0, 1)/a_n of a tile, with
  rank_i = L + #{k < i: x_k tied at the threshold} from an exclusive cumsum plus a carry across
  tiles: exactly the index tie-break of docs/math.md, "3. Sorting-free CVaR"
  (rank_i = #{x_k < x_i} + #{k < i: x_k == x_i}).

Reductions and scans are written `tl.reduce(x, axis, SUM)` / `tl.associative_scan(x, axis, SUM)`
with Triton's own sum combiner: the same code as `tl.sum`/`tl.cumsum` on the GPU, and the Triton
interpreter runs them vectorized without re-entering a jit function (each nested jit call costs the
interpreter milliseconds). For the same reason the helpers are few and coarse.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Rows of at most this many atoms (padded) select their CVaR threshold by rank counting (an
# [n, n] comparison, one reduction); longer rows by the bisection select (one reduction per key bit).
RANK_SELECT_MAX = 32

# Longest row (N or M, padded to a power of two) that the row-in-registers kernels (CVaR, the
# fused critic loss) accept; the backend falls back to the PyTorch implementation beyond it.
MAX_ROW = 8192

SUM = getattr(getattr(tl, "standard", None), "_sum_combine", None)
if SUM is None:  # pragma: no cover - older/newer Triton without the private combiner
    @triton.jit
    def SUM(a, b):
        return a + b


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def configs(gpu: list, interpreter: list) -> list:
    """Autotune configs: the full GPU list, or the interpreter's single config."""
    return interpreter if interpreting() else gpu


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def use_rank(select: str, n: int) -> bool:
    """Whether a row of n atoms selects its CVaR threshold by rank counting (see RANK_SELECT_MAX)."""
    if select == "auto":
        return pow2(n) <= RANK_SELECT_MAX
    if select not in ("rank", "bisect"):
        raise ValueError(f"select must be 'auto', 'rank' or 'bisect', got {select!r}")
    return select == "rank"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def mask_arg(mask: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """A per-token mask as the kernels read it (token_block): bool as it comes (one byte a token, no
    conversion pass), any other dtype as weights in the accumulation dtype; contiguous."""
    return (mask if mask.dtype == torch.bool else mask.to(acc)).contiguous()


def device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def tile_config(bt, bn, bm, warps, stages=None):
    kw = {"BLOCK_T": bt, "BLOCK_N": bn, "BLOCK_M": bm}
    return triton.Config(kw, num_warps=warps) if stages is None else \
        triton.Config(kw, num_warps=warps, num_stages=stages)


def prune_tiles(configs_, named_args, row_regs: bool = False, rank_row: int = 0):
    """Keep the tile configs that fit the problem: tiles no larger than (N, M) padded, several
    tokens per block only for small rows, and (for the row-in-registers kernels, `row_regs`) at
    most 32 row elements per thread, and at most 32 elements of the [n, n] rank comparison per
    thread for a row of `rank_row` (padded) atoms selected by rank counting. Never empty."""
    n, m = pow2(named_args["N"]), pow2(named_args["M"])
    row = max(n, m)

    def fits(c):
        bt, bn, bm = c.kwargs["BLOCK_T"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]
        threads = 32 * c.num_warps
        if bn > max(16, n) or bm > max(16, m):
            return False
        if bt > 1 and (row > 64 or bt * row > 256):  # several tokens per program: short rows only
            return False
        if row_regs and bt * row > 32 * threads:
            return False
        if bt * rank_row * rank_row > 32 * threads:
            return False
        return True

    keep = [c for c in configs_ if fits(c)]
    if not keep:  # huge rows: the config with the most threads
        keep = [max(configs_, key=lambda c: (c.num_warps, -c.kwargs["BLOCK_T"]))]
    return keep


# ------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------

@triton.jit
def row_keys2(x, valid, IS_F64: tl.constexpr):
    """(lower-tail keys, upper-tail keys) of x, padding lanes the largest key in both."""
    if IS_F64:
        bits = x.to(tl.int64, bitcast=True)
        bits = tl.where(bits == -9223372036854775807 - 1, 0, bits)
        key = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
        lo = tl.where(valid, key, 0x7FFFFFFFFFFFFFFF)
        hi = tl.where(valid, -1 - key, 0x7FFFFFFFFFFFFFFF)
    else:
        bits = x.to(tl.int32, bitcast=True)
        bits = tl.where(bits == -2147483647 - 1, 0, bits)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        lo = tl.where(valid, key, 0x7FFFFFFF)
        hi = tl.where(valid, -1 - key, 0x7FFFFFFF)
    return lo, hi


@triton.jit
def row_keys(x, valid, UPPER: tl.constexpr, IS_F64: tl.constexpr):
    """Order keys of x (padding lanes: the largest key); reversed order (ranks from the top) when UPPER."""
    key, key_hi = row_keys2(x, valid, IS_F64)
    if UPPER:
        key = key_hi
    return key


@triton.jit
def token_block(mask_ptr, T, HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr):
    """(tok, tv, mw, keep) of this program's BLOCK_T tokens: indices, in range, the mask weights
    (0 past T; a bool mask, read as it comes, gives 0 or 1) and mw != 0 (masked tokens are never
    read)."""
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tv = tok < T
    if HAS_MASK:
        mw = tl.load(mask_ptr + tok, mask=tv, other=0.0).to(ACC)
    else:
        mw = tl.where(tv, 1.0, 0.0).to(ACC)
    return tok, tv, mw, mw != 0


@triton.jit
def _select_start(ROWS: tl.constexpr, IS_F64: tl.constexpr):
    """(1, the smallest key) in the key dtype, the latter [ROWS, 1]: where a bisection select starts."""
    if IS_F64:
        one = tl.full((), 1, tl.int64)
        t = tl.full([ROWS, 1], -9223372036854775807 - 1, tl.int64)
    else:
        one = tl.full((), 1, tl.int32)
        t = tl.full([ROWS, 1], -2147483647 - 1, tl.int32)
    return one, t


@triton.jit
def kth_key(key, k, IS_F64: tl.constexpr):
    """(t, L) per token: t the k-th smallest key of each row of `key` [BLOCK_T, n] (1 <= k <= real
    lanes; padding holds the largest key), L = #{key < t}. Exact bisection select.

    Greedy from the top bit: t is the largest value with #{key < t} <= k - 1: first the sign bit
    (candidate 0), then each value bit, kept when the count allows it (one row reduction per bit)."""
    NBITS: tl.constexpr = 32 + 32 * IS_F64
    one, t = _select_start(key.shape[0], IS_F64)
    cand = t ^ t
    cnt = tl.reduce(tl.where(key < cand, 1, 0), 1, SUM, keep_dims=True)
    t = tl.where(cnt < k, cand, t)
    for b in range(NBITS - 2, -1, -1):
        cand = t | (one << b)
        cnt = tl.reduce(tl.where(key < cand, 1, 0), 1, SUM, keep_dims=True)
        t = tl.where(cnt < k, cand, t)
    L = tl.reduce(tl.where(key < t, 1, 0), 1, SUM)
    return tl.reshape(t, [key.shape[0]]), L


@triton.jit
def kth_key2(key_a, k_a, key_b, k_b, IS_F64: tl.constexpr):
    """kth_key on two key tiles of the same rows at once (both counts in one int32: n < 32768)."""
    NBITS: tl.constexpr = 32 + 32 * IS_F64
    one, t0 = _select_start(key_a.shape[0], IS_F64)
    cand = t0 ^ t0
    cnt = tl.reduce(tl.where(key_a < cand, 1, 0) + tl.where(key_b < cand, 65536, 0), 1, SUM, keep_dims=True)
    t_a = tl.where((cnt & 65535) < k_a, cand, t0)
    t_b = tl.where((cnt >> 16) < k_b, cand, t0)
    for b in range(NBITS - 2, -1, -1):
        bit = one << b
        cand_a = t_a | bit
        cand_b = t_b | bit
        cnt = tl.reduce(tl.where(key_a < cand_a, 1, 0) + tl.where(key_b < cand_b, 65536, 0), 1, SUM,
                        keep_dims=True)
        t_a = tl.where((cnt & 65535) < k_a, cand_a, t_a)
        t_b = tl.where((cnt >> 16) < k_b, cand_b, t_b)
    cnt = tl.reduce(tl.where(key_a < t_a, 1, 0) + tl.where(key_b < t_b, 65536, 0), 1, SUM)
    return tl.reshape(t_a, [key_a.shape[0]]), cnt & 65535, tl.reshape(t_b, [key_b.shape[0]]), cnt >> 16


@triton.jit
def kth_key_rank(key, k):
    """kth_key by rank counting, for short rows (an [n, n] comparison per token, one reduction):
    rank_i = #{key_j < key_i} + #{j < i: key_j == key_i}; t = the key of rank k - 1."""
    idx = tl.arange(0, key.shape[1])
    ki = key[:, :, None]
    kj = key[:, None, :]
    before = (idx[None, :] < idx[:, None])[None, :, :]
    rank = tl.reduce(tl.where((kj < ki) | ((kj == ki) & before), 1, 0), 2, SUM)
    t = tl.reduce(tl.where(rank == k - 1, key, 0), 1, SUM)
    L = tl.reduce(tl.where(key < t[:, None], 1, 0), 1, SUM)
    return t, L


@triton.jit
def tail_select(x, valid, k_lo, k_hi, DO_LO: tl.constexpr, DO_HI: tl.constexpr, RANK: tl.constexpr,
                IS_F64: tl.constexpr):
    """Order keys and CVaR thresholds of rows x [BLOCK_T, n] (lanes `valid` [1, n]):
    (key_lo, t_lo, L_lo, key_hi, t_hi, L_hi) for the lower tail (k_lo-th smallest) and the upper
    tail (k_hi-th largest, index tie-break kept); a tail not asked for gets placeholders.
    RANK: rank counting (short rows), else the bisection select."""
    key_lo, key_hi = row_keys2(x, valid, IS_F64)
    t_lo = tl.full([x.shape[0]], 0, key_lo.dtype)
    t_hi = t_lo
    L_lo = tl.full([x.shape[0]], 0, tl.int32)
    L_hi = L_lo
    if RANK:
        if DO_LO:
            t_lo, L_lo = kth_key_rank(key_lo, k_lo)
        if DO_HI:
            t_hi, L_hi = kth_key_rank(key_hi, k_hi)
    else:
        if DO_LO and DO_HI:
            t_lo, L_lo, t_hi, L_hi = kth_key2(key_lo, k_lo, key_hi, k_hi, IS_F64)
        elif DO_LO:
            t_lo, L_lo = kth_key(key_lo, k_lo, IS_F64)
        elif DO_HI:
            t_hi, L_hi = kth_key(key_hi, k_hi, IS_F64)
    return key_lo, t_lo, L_lo, key_hi, t_hi, L_hi


@triton.jit
def tail_stats(x, key, t, L, a_n, UPPER: tl.constexpr, IS_F64: tl.constexpr, SPREAD: tl.constexpr):
    """(CVaR, VaR atom, spread) per row of x [BLOCK_T, n] given the threshold key t and L = #{key < t}:
    atoms below weigh 1/a_n, the atoms tied at the threshold value weigh (a_n - L)/a_n in total.
    The VaR atom is the threshold value itself (the tail's boundary atom: max of x over c > 0, min
    from the top). SPREAD: 0 none (0), 1 the tail variance sum_i c_i (x_i - CVaR)^2, 2 the second
    moment about the VaR atom sum_i c_i (x_i - VaR)^2 (the tied atoms add 0 to it)."""
    tk = t
    if UPPER:
        tk = -1 - t
    if IS_F64:
        x_at = (tk ^ ((tk >> 63) & 0x7FFFFFFFFFFFFFFF)).to(tl.float64, bitcast=True)
    else:
        x_at = (tk ^ ((tk >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    below = key < t[:, None]
    w_at = a_n - L.to(x.dtype)
    cv = (tl.reduce(tl.where(below, x, 0.0), 1, SUM) + w_at * x_at) / a_n
    spread = cv * 0.0
    if SPREAD == 1:
        d = tl.where(below, x - cv[:, None], 0.0)
        d_at = x_at - cv
        spread = (tl.reduce(d * d, 1, SUM) + w_at * d_at * d_at) / a_n
    elif SPREAD == 2:
        d = tl.where(below, x - x_at[:, None], 0.0)
        spread = tl.reduce(d * d, 1, SUM) / a_n
    return cv, x_at, spread


@triton.jit
def tail_coef(key, t, L, a_n, carry):
    """Per-atom CVaR coefficients c of a [BLOCK_T, BLOCK_N] tile of (padded) keys, and the tie carry.

    carry = #{atoms of earlier tiles tied at the threshold}: rank = L + carry + #{earlier in tile tied}."""
    tt = t[:, None]
    at = (key == tt).to(tl.int32)
    rank = (L + carry)[:, None] + tl.associative_scan(at, 1, SUM) - at
    c_at = tl.minimum(tl.maximum(a_n - rank.to(a_n.dtype), 0.0), 1.0) / a_n
    c = tl.where(key < tt, 1.0 / a_n, tl.where(at != 0, c_at, 0.0))
    return c, carry + tl.reduce(at, 1, SUM)


@triton.jit
def head_mean(base, offs, ok, H, s_h, s_n, ACC: tl.constexpr):
    """theta = mean over the H heads: base [BLOCK_T] row pointers, offs [n] atom offsets, ok the
    [BLOCK_T, n] load mask (0 elsewhere). Always the same order of operations, so every tile of
    the same atoms is bitwise identical (the rank keys of the threshold pass and of the gradient
    pass must agree)."""
    ptr = base[:, None] + offs[None, :].to(tl.int64) * s_n
    acc = tl.load(ptr, mask=ok, other=0.0).to(ACC)
    for _ in range(1, H):
        ptr += s_h
        acc += tl.load(ptr, mask=ok, other=0.0).to(ACC)
    return acc / H


@triton.jit
def curv_weights(offs, N, n_lo, n_hi, ACC: tl.constexpr):
    """d(lo)/d theta and d(hi)/d theta of the curvature term at atoms `offs` (telescoped sums):
    lo = mean of the first n_lo second differences = (D[n_lo] - D[0]) / n_lo, D[j] = theta[j+1] - theta[j];
    hi = -(mean of the last n_hi) = (D[a] - D[N-2]) / n_hi, a = N - 2 - n_hi."""
    a = N - 2 - n_hi
    w_lo = ((offs == n_lo + 1).to(ACC) - (offs == n_lo).to(ACC) - (offs == 1).to(ACC)
            + (offs == 0).to(ACC)) / n_lo
    w_hi = ((offs == a + 1).to(ACC) - (offs == a).to(ACC) - (offs == N - 1).to(ACC)
            + (offs == N - 2).to(ACC)) / n_hi
    return w_lo, w_hi
