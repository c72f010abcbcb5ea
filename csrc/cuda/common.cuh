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

// An accumulator value stored as scalar_t (gradients are written in the input dtype), rounded to
// nearest.
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(acc_t<scalar_t> x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float dmin(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double dmin(double a, double b) { return fmin(a, b); }
__device__ __forceinline__ float dmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double dmax(double a, double b) { return fmax(a, b); }

// clamp(u, -k, k) keeping a NaN u NaN, as the reference does: a NaN target or atom must reach the
// gradient, and fminf/fmaxf return the other operand. One min.NaN and one max.NaN on sm_80+ (the
// cost of fminf/fmaxf); selects elsewhere (doubles, older targets, the host emulation).
__device__ __forceinline__ float clamp_nan(float u, float k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(u), "f"(-k));
  asm("min.NaN.f32 %0, %0, %1;" : "+f"(r) : "f"(k));
  return r;
#else
  return u > k ? k : (u < -k ? -k : u);
#endif
}
__device__ __forceinline__ double clamp_nan(double u, double k) { return u > k ? k : (u < -k ? -k : u); }

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
__device__ __forceinline__ float2 to_float2(__half2 x) { return __half22float2(x); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }

// Eight 16-bit floats: four pairs of type pair_t (__half2 or __nv_bfloat162).
template <typename pair_t>
__device__ __forceinline__ void unpack16_pairs(const uint4& raw, float* out) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    pair_t two;
    memcpy(&two, &w[k], sizeof(two));
    const float2 f = to_float2(two);
    out[2 * k] = f.x;
    out[2 * k + 1] = f.y;
  }
}
__device__ __forceinline__ void unpack16(const uint4& raw, float* out, const __half*) {
  unpack16_pairs<__half2>(raw, out);
}
__device__ __forceinline__ void unpack16(const uint4& raw, float* out, const __nv_bfloat16*) {
  unpack16_pairs<__nv_bfloat162>(raw, out);
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

// ---------------------------------------------------------------- order-preserving keys (tails)
// An unsigned key per value with key(a) < key(b) iff a < b and key(a) == key(b) iff a == b
// (-0 and +0 map to the same key), so ranks and thresholds are integer comparisons.
template <typename acc_t>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = unsigned long long;
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

// ------------------------------------------------------------------------- sorted rows (tails)
// A tail is found by sorting the row's atoms by (key, index) in the warp's scratch: position p of
// that order is exactly the lower-tail rank of the atom there (docs/math.md, "3. Sorting-free
// CVaR": rank_i = #{x_k < x_i} + #{k < i : x_k == x_i}), the VaR is one read, and the tail's sums
// run over its own atoms only.

__host__ __device__ constexpr int pow2_ceil(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Scratch of one sorted row: keys and atom indices over the row padded to a power of two.
template <typename acc_t>
__host__ __device__ constexpr size_t sorted_row_bytes(int n) {
  return ((sizeof(typename KeyOf<acc_t>::type) + sizeof(int)) * static_cast<size_t>(pow2_ceil(n)) + 15) / 16 * 16;
}

template <typename acc_t>
struct SortedRow {
  using key_t = typename KeyOf<acc_t>::type;
  key_t* keys;  // [pow2_ceil(n)] ascending
  int* idx;     // [pow2_ceil(n)] the atom at each position
  int n;
  __device__ SortedRow(char* base, int n_) : n(n_) {
    keys = reinterpret_cast<key_t*>(base);
    idx = reinterpret_cast<int*>(base + sizeof(key_t) * static_cast<size_t>(pow2_ceil(n_)));
  }
};

// Sorts vals[0, n) into `row` by (key, index): a warp-cooperative bitonic sort over the padded
// power of two P (log2(P) (log2(P) + 1) / 2 compare-exchange rounds, each P / 2 pairs over the 32
// lanes and one __syncwarp). Padding slots hold the largest key and indices >= n, so they sort
// last. Indices are distinct: a strict total order, hence one result. All lanes must call it.
template <typename acc_t>
__device__ __forceinline__ void sort_row(const acc_t* vals, SortedRow<acc_t>& row, int lane) {
  using key_t = typename KeyOf<acc_t>::type;
  const int n = row.n, P = pow2_ceil(n);
  for (int e = lane; e < P; e += 32) {
    row.keys[e] = e < n ? order_key(vals[e]) : ~key_t(0);
    row.idx[e] = e;
  }
  __syncwarp();
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = lane; t < P / 2; t += 32) {
        const int i = 2 * t - (t & (stride - 1));  // the pair (i, i + stride), bit `stride` of i clear
        const int j = i + stride;
        const key_t ki = row.keys[i], kj = row.keys[j];
        const int ii = row.idx[i], ij = row.idx[j];
        const bool greater = ki > kj || (ki == kj && ii > ij);
        if (greater == ((i & size) == 0)) {  // ascending where bit `size` of i is clear
          row.keys[i] = kj;
          row.keys[j] = ki;
          row.idx[i] = ij;
          row.idx[j] = ii;
        }
      }
      __syncwarp();
    }
  }
}

// The tail rank K of the last atom with c > 0: c_i > 0 iff rank_i < level_n, so K = ceil(level_n) - 1.
template <typename acc_t>
__host__ __device__ inline int tail_last_rank(acc_t level_n, int n) {
  int k = static_cast<int>(level_n);
  if (static_cast<acc_t>(k) < level_n) ++k;  // ceil for positive values
  k -= 1;
  return k < 0 ? 0 : (k > n - 1 ? n - 1 : k);
}

// One tail of a sorted row: the boundary atom (tail rank K) sits at position `pos`; [s, e) are the
// positions of the atoms equal to it (only the order within this group differs between the lower
// and the upper tail's ranks); `inside` atoms lie strictly beyond it (c = 1 / level_n there).
template <typename acc_t>
struct Tail {
  typename KeyOf<acc_t>::type thr;
  int k, pos, s, e, inside;
  acc_t level_n;
  bool upper;
};

template <typename acc_t>
__device__ __forceinline__ Tail<acc_t> sorted_tail(const SortedRow<acc_t>& row, acc_t level_n, bool upper) {
  Tail<acc_t> t;
  t.level_n = level_n;
  t.upper = upper;
  t.k = tail_last_rank(level_n, row.n);
  t.pos = upper ? row.n - 1 - t.k : t.k;
  t.thr = row.keys[t.pos];
  // The tie group by two binary searches (every lane the same ones: broadcast reads).
  int lo = 0, hi = t.pos;  // first position whose key equals thr
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (row.keys[mid] < t.thr) lo = mid + 1; else hi = mid;
  }
  t.s = lo;
  lo = t.pos + 1;
  hi = row.n;  // first position whose key exceeds thr
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (row.keys[mid] > t.thr) hi = mid; else lo = mid + 1;
  }
  t.e = lo;
  t.inside = upper ? row.n - t.e : t.s;
  return t;
}

// Calls f(atom, c) for every atom of the tail with its CVaR coefficient c = clamp(level_n - rank,
// 0, 1) / level_n (possibly 0 in the boundary group), lane-strided over the tail's positions only:
// [0, K] from the bottom, [s, n) from the top (where the boundary group keeps index order). Each
// atom once, so the calls of one tail may scatter into per-atom arrays without conflicts.
template <typename acc_t, typename F>
__device__ __forceinline__ void for_each_tail_atom(const SortedRow<acc_t>& row, const Tail<acc_t>& t, int lane,
                                                   F&& f) {
  const int count = t.upper ? row.n - t.s : t.k + 1;
  for (int j = lane; j < count; j += 32) {
    const int q = t.upper ? row.n - 1 - j : j;
    const bool in_group = q >= t.s && q < t.e;
    const int rank = in_group ? math::sorted_tail_rank(q, row.n, t.s, t.e, t.upper) : (t.upper ? row.n - 1 - q : q);
    f(row.idx[q], math::cvar_coef<acc_t>(rank, t.level_n));
  }
}

// Calls f(e, c_e) for every atom e in [0, n) (lane-strided: e = 32 r + lane, r ascending) with its
// CVaR coefficient, for a dense output (the cvar op's coefficients). Atoms strictly inside the
// tail get 1 / level_n, strictly outside 0; the atoms equal to the threshold take ranks inside,
// inside + 1, ... in index order, counted by warp ballots. All lanes must call it (warp votes).
template <typename acc_t, typename F>
__device__ __forceinline__ void for_each_coef(const acc_t* vals, int n, const Tail<acc_t>& t, int lane, F&& f) {
  using key_t = typename KeyOf<acc_t>::type;
  const acc_t full = acc_t(1) / t.level_n;
  const unsigned lower_lanes = (1u << lane) - 1u;
  int ties = 0;
  const int rounds = (n + 31) / 32;
  for (int r = 0; r < rounds; ++r) {
    const int e = r * 32 + lane;
    const bool valid = e < n;
    const key_t x = valid ? order_key(vals[e]) : key_t(0);
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

// The statistics of one tail of vals (sorted into `row`): the CVaR value sum_i c_i x_i, the VaR
// (the boundary atom's value: max of x over c > 0, min from the top) and, with want_spread, the
// spread sum_i c_i (x_i - centre)^2 about the VaR (consistent mode's second moment) or about the
// CVaR (about_var false: the recipe's tail variance). Two short passes over the tail's atoms.
template <typename acc_t>
struct TailStats {
  acc_t value = 0, var_at = 0, spread = 0;
};

template <typename acc_t>
__device__ __forceinline__ TailStats<acc_t> tail_stats(const acc_t* vals, const SortedRow<acc_t>& row,
                                                       const Tail<acc_t>& t, bool want_spread, bool about_var,
                                                       int lane) {
  TailStats<acc_t> r;
  acc_t part = 0;
  for_each_tail_atom(row, t, lane, [&](int e, acc_t c) { part += c * vals[e]; });
  r.value = warp_sum(part);
  r.var_at = vals[row.idx[t.pos]];
  if (want_spread) {
    const acc_t centre = about_var ? r.var_at : r.value;
    acc_t spart = 0;
    for_each_tail_atom(row, t, lane, [&](int e, acc_t c) {
      const acc_t d = vals[e] - centre;
      spart += c * d * d;
    });
    r.spread = warp_sum(spart);
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

// ------------------------------------------------------------------ launching a warp-per-token op
// One launch path for the per-token ops (quantile Huber, CVaR, critic loss). An op is a struct
// with these static members, for its Params<scalar_t> (dvpo_cuda.h):
//   size_t scratch_bytes(const Params& p)             per-token scratch (host),
//   bool valid(const Params& p)                       the launcher's own argument checks (host),
//   kHasSorted                                        whether p.sorted exists (the sorted pair
//                                                     algorithm: its own kernel, so that the pairwise
//                                                     one keeps its register allocation),
//   template <bool kShared, bool kSorted> void run(const Params& p, size_t per_token)   the body.

template <typename Op, typename Params, bool kShared, bool kSorted>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) warp_token_kernel(const Params p, const size_t per_token) {
  Op::template run<kShared, kSorted>(p, per_token);
}

// Bytes of global workspace the launch of `p` needs (0: the scratch fits shared memory).
template <typename Op, typename Params>
size_t warp_op_workspace(const Params& p) {
  Plan plan;
  if (p.tokens <= 0 || make_plan(Op::scratch_bytes(p), p.tokens, plan) != cudaSuccess) return 0;
  return plan.workspace;
}

template <typename Op, bool kSorted, typename Params>
cudaError_t launch_planned(const Params& p, const Plan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.blocks)), block(32 * plan.warps);
  if (plan.global) {
    if (p.workspace == nullptr) return cudaErrorInvalidValue;
    warp_token_kernel<Op, Params, false, kSorted><<<grid, block, 0, stream>>>(p, plan.per_token);
  } else {
    const cudaError_t err = prepare_kernel(warp_token_kernel<Op, Params, true, kSorted>, plan);
    if (err != cudaSuccess) return err;
    warp_token_kernel<Op, Params, true, kSorted><<<grid, block, plan.smem, stream>>>(p, plan.per_token);
  }
  return cudaGetLastError();
}

// Plans the launch (warps per block, shared memory or the global fallback) and enqueues the kernel.
template <typename Op, typename Params>
cudaError_t launch_warp_op(const Params& p, cudaStream_t stream) {
  if (p.tokens <= 0) return cudaSuccess;
  if (!Op::valid(p)) return cudaErrorInvalidValue;
  Plan plan;
  const cudaError_t err = make_plan(Op::scratch_bytes(p), p.tokens, plan);
  if (err != cudaSuccess) return err;
  if constexpr (Op::kHasSorted) {
    if (p.sorted) return launch_planned<Op, true>(p, plan, stream);
  }
  return launch_planned<Op, false>(p, plan, stream);
}

}  // namespace detail
}  // namespace cuda
}  // namespace dvpo

// The explicit instantiations of an op's workspace query and launcher (dvpo_cuda.h) for the four
// input dtypes; used inside namespace dvpo::cuda.
#define DVPO_CUDA_INSTANTIATE_ONE(Params, workspace_fn, launch_fn, T) \
  template size_t workspace_fn<T>(const Params<T>&);                  \
  template cudaError_t launch_fn<T>(const Params<T>&, cudaStream_t);
#define DVPO_CUDA_INSTANTIATE(Params, workspace_fn, launch_fn)                \
  DVPO_CUDA_INSTANTIATE_ONE(Params, workspace_fn, launch_fn, float)           \
  DVPO_CUDA_INSTANTIATE_ONE(Params, workspace_fn, launch_fn, double)          \
  DVPO_CUDA_INSTANTIATE_ONE(Params, workspace_fn, launch_fn, __half)          \
  DVPO_CUDA_INSTANTIATE_ONE(Params, workspace_fn, launch_fn, __nv_bfloat16)

// The two entry points of a warp-per-token op (dvpo_cuda.h: workspace query and launcher) on top of
// warp_op_workspace / launch_warp_op, instantiated for the four dtypes; used inside dvpo::cuda.
#define DVPO_CUDA_WARP_OP(Op, Params, workspace_fn, launch_fn)                      \
  template <typename scalar_t>                                                       \
  size_t workspace_fn(const Params<scalar_t>& p) {                                   \
    return detail::warp_op_workspace<detail::Op>(p);                                 \
  }                                                                                  \
  template <typename scalar_t>                                                       \
  cudaError_t launch_fn(const Params<scalar_t>& p, cudaStream_t stream) {            \
    return detail::launch_warp_op<detail::Op>(p, stream);                            \
  }                                                                                  \
  DVPO_CUDA_INSTANTIATE(Params, workspace_fn, launch_fn)
