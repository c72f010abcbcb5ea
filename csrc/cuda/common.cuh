// Device helpers shared by the CUDA kernels (torch-free: CUDA toolkit + the project's math header).
//
// Conventions of every per-token kernel (quantile Huber, CVaR, critic loss):
//  * one warp per token; a block holds `warps` tokens; tokens are visited grid-stride, so a launch
//    with a bounded grid (the global-scratch fallback) covers any number of tokens;
//  * a token's rows are staged once, converted to acc_t, in a per-warp scratch area: shared memory
//    when it fits (dynamic shared memory, opt-in above 48 KB), else a global workspace slot per
//    resident warp (the fallback for very large N, M);
//  * every reduction is a warp shuffle butterfly or a fixed-order per-lane loop: no atomics, so
//    results are bitwise reproducible run to run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "dvpo_cuda.h"
#include "dvpo_math.h"

namespace dvpo {
namespace cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;                 // tokens per block in the usual case
constexpr size_t kStaticSmemLimit = 48 * 1024;    // dynamic shared memory without opt-in

// ------------------------------------------------------------------------------ conversions

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T dmin(T a, T b);
template <>
__device__ __forceinline__ float dmin(float a, float b) { return fminf(a, b); }
template <>
__device__ __forceinline__ double dmin(double a, double b) { return fmin(a, b); }
template <typename T>
__device__ __forceinline__ T dmax(T a, T b);
template <>
__device__ __forceinline__ float dmax(float a, float b) { return fmaxf(a, b); }
template <>
__device__ __forceinline__ double dmax(double a, double b) { return fmax(a, b); }

// a / b correctly rounded even under --use_fast_math (means are computed as torch does: a
// sequential sum divided by the count, so relu decisions at exact ties agree with the reference).
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

__device__ __forceinline__ float dabs(float x) { return fabsf(x); }
__device__ __forceinline__ double dabs(double x) { return fabs(x); }

// 16 bytes of raw input unpacked into 16 / sizeof(scalar_t) acc values.
template <typename scalar_t>
struct Vec16 {
  static constexpr int kN = 16 / sizeof(scalar_t);
};

__device__ __forceinline__ void unpack16(const uint4& raw, float* out, const float*) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}
__device__ __forceinline__ void unpack16(const uint4& raw, double* out, const double*) {
  out[0] = __hiloint2double(static_cast<int>(raw.y), static_cast<int>(raw.x));
  out[1] = __hiloint2double(static_cast<int>(raw.w), static_cast<int>(raw.z));
}
__device__ __forceinline__ void unpack16(const uint4& raw, float* out, const __half*) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    __half2 h2;
    memcpy(&h2, &w[k], sizeof(h2));
    const float2 f = __half22float2(h2);
    out[2 * k] = f.x;
    out[2 * k + 1] = f.y;
  }
}
__device__ __forceinline__ void unpack16(const uint4& raw, float* out, const __nv_bfloat16*) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    __nv_bfloat162 b2;
    memcpy(&b2, &w[k], sizeof(b2));
    const float2 f = __bfloat1622float2(b2);
    out[2 * k] = f.x;
    out[2 * k + 1] = f.y;
  }
}

// dst[e] = mean over `rows` rows of src[r * n + e] (rows = 1: a plain converted copy), e in [0, n),
// summed in row order and divided by `rows` (bitwise torch's mean over a small dim),
// lane-strided in 16-byte vectors when the rows allow it (every row 16-byte aligned), scalar
// otherwise. The rows' loads are issued back to back so `rows` loads are in flight per lane.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_rows_mean(const scalar_t* __restrict__ src, int rows, int n,
                                               acc_t* dst, int lane) {
  constexpr int V = Vec16<scalar_t>::kN;
  const bool vec_ok = (reinterpret_cast<uintptr_t>(src) % 16 == 0) && ((n * sizeof(scalar_t)) % 16 == 0);
  int done = 0;
  if (vec_ok) {
    const int nvec = n / V;
    for (int v = lane; v < nvec; v += 32) {
      acc_t sum[V];
      {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src) + v);
        unpack16(raw, sum, src);
      }
      for (int r = 1; r < rows; ++r) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src + static_cast<int64_t>(r) * n) + v);
        acc_t x[V];
        unpack16(raw, x, src);
#pragma unroll
        for (int k = 0; k < V; ++k) sum[k] += x[k];
      }
#pragma unroll
      for (int k = 0; k < V; ++k) dst[v * V + k] = rows == 1 ? sum[k] : div_rn(sum[k], acc_t(rows));
    }
    done = nvec * V;
  }
  for (int e = done + lane; e < n; e += 32) {
    acc_t sum = to_acc(src[e]);
    for (int r = 1; r < rows; ++r) sum += to_acc(src[static_cast<int64_t>(r) * n + e]);
    dst[e] = rows == 1 ? sum : div_rn(sum, acc_t(rows));
  }
}

// -------------------------------------------------------------------------------- warp reductions

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_min(T x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T y = __shfl_xor_sync(kFullMask, x, off);
    x = y < x ? y : x;
  }
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T y = __shfl_xor_sync(kFullMask, x, off);
    x = y > x ? y : x;
  }
  return x;
}

__device__ __forceinline__ int warp_count(int x) { return __reduce_add_sync(kFullMask, x); }

// ------------------------------------------------------------------- order-preserving keys (CVaR)
// An unsigned key per value with key(a) < key(b) iff a < b and key(a) == key(b) iff a == b
// (-0 and +0 map to the same key), so ranks and thresholds are integer comparisons.
template <typename acc_t>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
  static constexpr int kBits = 32;
};
template <>
struct KeyOf<double> {
  using type = unsigned long long;
  static constexpr int kBits = 64;
};

__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t b = __float_as_uint(x);
  b = (b << 1) == 0u ? 0u : b;  // -0 -> +0 (integer ops: safe under --use_fast_math)
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ unsigned long long order_key(double x) {
  unsigned long long b = static_cast<unsigned long long>(__double_as_longlong(x));
  b = (b << 1) == 0ull ? 0ull : b;
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}

__device__ __forceinline__ int highest_bit(uint32_t x) { return 31 - __clz(x); }
__device__ __forceinline__ int highest_bit(unsigned long long x) { return 63 - __clzll(static_cast<long long>(x)); }

// Exact selection, no sort: out[s] = the k[s]-th smallest key (0-based) of keys[0, n), for NS
// positions at once. Bisection over the key bits, most significant first: with `ans` the largest
// key prefix x such that #{key < x} <= k, try the next bit; each try is one warp-cooperative count
// (lane-strided compares + one __reduce_add_sync). Bits above the highest bit in which the warp's
// min and max keys differ are shared by every key and skipped.
template <typename key_t, int NS>
__device__ __forceinline__ void select_kth(const key_t* keys, int n, const int (&k)[NS], key_t (&out)[NS],
                                           int lane) {
  constexpr int kBits = sizeof(key_t) * 8;
  key_t lo = ~key_t(0), hi = 0;
  for (int e = lane; e < n; e += 32) {
    const key_t x = keys[e];
    lo = x < lo ? x : lo;
    hi = x > hi ? x : hi;
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  const key_t diff = lo ^ hi;
  if (diff == 0) {
#pragma unroll
    for (int s = 0; s < NS; ++s) out[s] = lo;
    return;
  }
  const int top = highest_bit(diff);
  const key_t low_mask = top == kBits - 1 ? ~key_t(0) : ((key_t(1) << (top + 1)) - 1);
  key_t ans[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) ans[s] = lo & ~low_mask;
  for (int b = top; b >= 0; --b) {
    const key_t bit = key_t(1) << b;
    key_t cand[NS];
    int cnt[NS];
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      cand[s] = ans[s] | bit;
      cnt[s] = 0;
    }
#pragma unroll 4
    for (int e = lane; e < n; e += 32) {
      const key_t x = keys[e];
#pragma unroll
      for (int s = 0; s < NS; ++s) cnt[s] += x < cand[s];
    }
#pragma unroll
    for (int s = 0; s < NS; ++s)
      if (warp_count(cnt[s]) <= k[s]) ans[s] = cand[s];
  }
#pragma unroll
  for (int s = 0; s < NS; ++s) out[s] = ans[s];
}

// One CVaR tail of an n-atom row: the threshold key (the value of the atom of tail rank K, the last
// one with a positive coefficient), how many atoms lie strictly inside the tail (beyond the
// threshold), and level * n in acc_t.
template <typename acc_t>
struct Tail {
  typename KeyOf<acc_t>::type thr;
  int inside;
  acc_t level_n;
  bool upper;
};

// The tail rank K of the last atom with c > 0: c_i > 0 iff rank_i < level_n, so K = ceil(level_n) - 1.
template <typename acc_t>
__host__ __device__ inline int tail_last_rank(acc_t level_n, int n) {
  int k = static_cast<int>(level_n);
  if (static_cast<acc_t>(k) < level_n) ++k;  // ceil for positive values
  k -= 1;
  return k < 0 ? 0 : (k > n - 1 ? n - 1 : k);
}

// Finds the lower tail (level_lo) and/or the upper tail (level_hi) of keys[0, n) in one bisection.
template <typename acc_t>
__device__ __forceinline__ void find_tails(const typename KeyOf<acc_t>::type* keys, int n, bool want_lo,
                                           acc_t level_n_lo, bool want_hi, acc_t level_n_hi, Tail<acc_t>& lo,
                                           Tail<acc_t>& hi, int lane) {
  using key_t = typename KeyOf<acc_t>::type;
  lo.thr = 0;
  hi.thr = 0;
  lo.level_n = level_n_lo;
  lo.upper = false;
  hi.level_n = level_n_hi;
  hi.upper = true;
  // The upper tail's atom of rank K from the top is the (n - 1 - K)-th smallest.
  const int k_lo = tail_last_rank(level_n_lo, n);
  const int k_hi = n - 1 - tail_last_rank(level_n_hi, n);
  if (want_lo && want_hi) {
    const int k[2] = {k_lo, k_hi};
    key_t t[2];
    select_kth<key_t, 2>(keys, n, k, t, lane);
    lo.thr = t[0];
    hi.thr = t[1];
  } else if (want_lo || want_hi) {
    const int k[1] = {want_lo ? k_lo : k_hi};
    key_t t[1];
    select_kth<key_t, 1>(keys, n, k, t, lane);
    if (want_lo)
      lo.thr = t[0];
    else
      hi.thr = t[0];
  }
  int in_lo = 0, in_hi = 0;
  for (int e = lane; e < n; e += 32) {
    const key_t x = keys[e];
    in_lo += x < lo.thr;
    in_hi += x > hi.thr;
  }
  lo.inside = want_lo ? warp_count(in_lo) : 0;
  hi.inside = want_hi ? warp_count(in_hi) : 0;
}

// Calls f(e, c_e) for every atom e in [0, n) (lane-strided: e = 32 r + lane, r ascending) with its
// CVaR coefficient c_e = clamp(level_n - rank_e, 0, 1) / level_n. Atoms strictly inside the tail
// have rank < inside <= K (so c = 1 / level_n), atoms strictly outside have rank > K (c = 0); the
// atoms equal to the threshold take ranks inside, inside + 1, ... in index order, counted by warp
// ballots. This is exactly rank_i = #{k: x_k < x_i} + #{k < i: x_k == x_i} (from the top for the
// upper tail), as the reference defines it. All lanes must call it (it uses warp votes).
template <typename acc_t, typename F>
__device__ __forceinline__ void for_each_coef(const typename KeyOf<acc_t>::type* keys, int n,
                                              const Tail<acc_t>& t, int lane, F&& f) {
  using key_t = typename KeyOf<acc_t>::type;
  const acc_t full = acc_t(1) / t.level_n;
  const unsigned lower_lanes = (1u << lane) - 1u;
  int ties = 0;
  const int rounds = (n + 31) / 32;
  for (int r = 0; r < rounds; ++r) {
    const int e = r * 32 + lane;
    const bool valid = e < n;
    const key_t x = valid ? keys[e] : key_t(0);
    const bool eq = valid && x == t.thr;
    const unsigned ballot = __ballot_sync(kFullMask, eq);
    if (valid) {
      const bool inside = t.upper ? x > t.thr : x < t.thr;
      acc_t c = acc_t(0);
      if (inside)
        c = full;
      else if (eq)
        c = math::cvar_coef<acc_t>(t.inside + ties + __popc(ballot & lower_lanes), t.level_n);
      f(e, c);
    }
    ties += __popc(ballot);
  }
}

// CVaR value sum_i c_i x_i and (optionally) the tail variance sum_i c_i (x_i - CVaR)^2 of vals.
template <typename acc_t>
struct TailStats {
  acc_t value = 0, var = 0;
};

template <typename acc_t>
__device__ __forceinline__ TailStats<acc_t> tail_stats(const acc_t* vals, const typename KeyOf<acc_t>::type* keys,
                                                       int n, const Tail<acc_t>& t, bool want_var, int lane) {
  TailStats<acc_t> s;
  acc_t part = 0;
  for_each_coef<acc_t>(keys, n, t, lane, [&](int e, acc_t c) { part += c * vals[e]; });
  s.value = warp_sum(part);
  if (want_var) {
    acc_t vpart = 0;
    for_each_coef<acc_t>(keys, n, t, lane, [&](int e, acc_t c) {
      const acc_t d = vals[e] - s.value;
      vpart += c * d * d;
    });
    s.var = warp_sum(vpart);
  }
  return s;
}

// The consistent-mode statistics of one tail of theta: the CVaR value C = sum_i c_i x_i, the VaR
// v = max (lower tail) / min (upper tail) of x over the atoms with c_i > 0 (the atom of tail rank
// K, i.e. the threshold's value) and, optionally, the second moment about the VaR
// S = sum_i c_i (x_i - v)^2. Two coefficient passes (one without want_s).
template <typename acc_t>
struct VarTailStats {
  acc_t value = 0, var_at = 0, s = 0;
};

template <typename acc_t>
__device__ __forceinline__ VarTailStats<acc_t> var_tail_stats(const acc_t* vals,
                                                              const typename KeyOf<acc_t>::type* keys, int n,
                                                              const Tail<acc_t>& t, bool want_s, int lane) {
  VarTailStats<acc_t> r;
  acc_t part = 0;
  // Every lane starts beyond any value on the far side, so lanes without a tail atom drop out.
  acc_t v = t.upper ? static_cast<acc_t>(INFINITY) : -static_cast<acc_t>(INFINITY);
  for_each_coef<acc_t>(keys, n, t, lane, [&](int e, acc_t c) {
    const acc_t x = vals[e];
    part += c * x;
    if (c > acc_t(0)) v = t.upper ? (x < v ? x : v) : (x > v ? x : v);
  });
  r.value = warp_sum(part);
  r.var_at = t.upper ? warp_min(v) : warp_max(v);
  if (want_s) {
    acc_t spart = 0;
    for_each_coef<acc_t>(keys, n, t, lane, [&](int e, acc_t c) {
      const acc_t d = vals[e] - r.var_at;
      spart += c * d * d;
    });
    r.s = warp_sum(spart);
  }
  return r;
}

// One pass over the targets z[0, m) for the consistent-mode tail targets: the means of
// min(z_j - v_lo, 0) and its square (want_lo), and of max(z_j - v_hi, 0) and its square (want_hi),
// each a per-lane sum in acc_t, a warp butterfly and a correctly rounded division by m.
template <typename acc_t>
struct TargetTailMoments {
  acc_t a_lo = 0, b_lo = 0, a_hi = 0, b_hi = 0;
};

template <typename acc_t>
__device__ __forceinline__ TargetTailMoments<acc_t> target_tail_moments(const acc_t* z, int m, bool want_lo,
                                                                        acc_t v_lo, bool want_hi, acc_t v_hi,
                                                                        int lane) {
  TargetTailMoments<acc_t> r;
  acc_t al = 0, bl = 0, ah = 0, bh = 0;
  for (int j = lane; j < m; j += 32) {
    const acc_t zj = z[j];
    if (want_lo) {
      const acc_t d = math::tail_excess(zj, v_lo, false);
      al += d;
      bl += d * d;
    }
    if (want_hi) {
      const acc_t d = math::tail_excess(zj, v_hi, true);
      ah += d;
      bh += d * d;
    }
  }
  const acc_t fm = static_cast<acc_t>(m);
  if (want_lo) {
    r.a_lo = div_rn(warp_sum(al), fm);
    r.b_lo = div_rn(warp_sum(bl), fm);
  }
  if (want_hi) {
    r.a_hi = div_rn(warp_sum(ah), fm);
    r.b_hi = div_rn(warp_sum(bh), fm);
  }
  return r;
}

// ------------------------------------------------------------------------------- launch planning

__host__ __device__ constexpr size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// How a per-token kernel is launched: `warps` tokens per block, `smem` bytes of dynamic shared
// memory per block, or (global == true) a global workspace of `blocks * warps * per_token` bytes.
struct Plan {
  int warps = kWarpsPerBlock;
  size_t per_token = 0;
  size_t smem = 0;
  bool global = false;
  bool optin = false;  // smem above 48 KB: needs cudaFuncAttributeMaxDynamicSharedMemorySize
  int64_t blocks = 0;
  size_t workspace = 0;
};

inline cudaError_t make_plan(size_t per_token, int64_t tokens, Plan& plan) {
  plan = Plan{};
  plan.per_token = per_token;
  int dev = 0, optin = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  if (per_token * kWarpsPerBlock <= kStaticSmemLimit) {
    plan.warps = kWarpsPerBlock;
  } else if (per_token <= kStaticSmemLimit) {
    plan.warps = static_cast<int>(kStaticSmemLimit / per_token);
  } else if (per_token <= static_cast<size_t>(optin)) {
    plan.warps = 1;
    plan.optin = true;
  } else {
    plan.global = true;
    plan.warps = kWarpsPerBlock;
  }
  plan.smem = plan.global ? 0 : per_token * plan.warps;
  const int64_t need = (tokens + plan.warps - 1) / plan.warps;
  // A bounded grid (tokens are visited grid-stride): all of it resident for the global fallback,
  // whose workspace is one slot per warp of the grid.
  const int64_t cap = plan.global ? static_cast<int64_t>(sms) * 4 : (int64_t(1) << 30);
  plan.blocks = need < cap ? need : cap;
  if (plan.blocks < 1) plan.blocks = 1;
  plan.workspace = plan.global ? static_cast<size_t>(plan.blocks) * plan.warps * per_token : 0;
  return cudaSuccess;
}

// Sets the dynamic shared memory limit of `kernel` when the plan needs more than 48 KB.
template <typename Kernel>
inline cudaError_t prepare_kernel(Kernel kernel, const Plan& plan) {
  if (!plan.optin) return cudaSuccess;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(plan.smem));
}

// The per-warp scratch base: shared memory, or the warp's slot of the global workspace.
template <bool kShared>
__device__ __forceinline__ char* warp_scratch(void* workspace, size_t per_token) {
  extern __shared__ __align__(16) char dvpo_smem[];
  const int warp = threadIdx.x >> 5;
  if (kShared) return dvpo_smem + static_cast<size_t>(warp) * per_token;
  const size_t slot = static_cast<size_t>(blockIdx.x) * (blockDim.x >> 5) + warp;
  return static_cast<char*>(workspace) + slot * per_token;
}

}  // namespace detail
}  // namespace cuda
}  // namespace dvpo
