// The pairwise quantile Huber sum of one token, loss and gradient in the same pass, by one warp
// (docs/math.md, "1-2. Quantile Huber and its risk-weighted form"). Torch-free.
//
// theta (N atoms) and the targets (M) sit in the warp's scratch. The atoms are processed in chunks
// of up to 32 * kMaxR: each lane keeps R <= kMaxR atoms in registers and streams the targets from
// shared memory (one broadcast load feeds R pairs). Chunks narrower than a warp split the targets
// across lane groups as well (P lanes on atoms x G = 32 / P lanes on targets), so a token with few
// atoms still uses the whole warp; the G partial sums are combined by a shuffle butterfly.
//
// Per pair u = z_j - theta_i the lane accumulates, with c = clamp(u, -k, k) and t = u - c / 2
// (so the Huber value is h = c t >= 0, and t has the sign of u):
//   sum c t = sum h,   sum c |t| = sum sign(u) h,   sum c,   sum |c|,
// 8 instructions, 2 of them on the ALU pipe. The asymmetric weights |tau - 1{u < 0}| depend on
// the sign of u only, so they are applied per atom afterwards:
//   sum_j |tau - 1{u<0}| h  = ((w+ + w-) sum h + (w+ - w-) sum sign(u) h) / 2,
//   sum_j |tau - 1{u<0}| c  = ((w+ + w-) sum c + (w+ - w-) sum |c|) / 2,
// with w+ = |tau|, w- = |tau - 1| (dvpo::math::quantile_weights). u = 0 adds 0 to all four sums.
#pragma once

#include "common.cuh"

namespace dvpo {
namespace cuda {
namespace detail {

constexpr int kMaxR = 8;  // atoms per lane per chunk

template <typename acc_t>
__device__ __forceinline__ void qh_pair(acc_t u, acc_t k, acc_t& hs, acc_t& hg, acc_t& cs, acc_t& ca) {
  const acc_t c = clamp_nan(u, k);
  const acc_t t = fma(acc_t(-0.5), c, u);
  hs = fma(c, t, hs);
  hg = fma(c, dabs(t), hg);
  cs += c;
  ca += dabs(c);
}

// Per-atom result handed to the caller's emit(i, loss_i, dsum_i): loss_i = sum_j |tau_i - 1{u<0}|
// L_k(u), dsum_i = sum_j |tau_i - 1{u<0}| L_k'(u) (unscaled; d loss / d theta_i = -scale * dsum_i).
template <int R, typename acc_t, typename Emit>
__device__ __forceinline__ void qh_chunk(const acc_t* th, const acc_t* __restrict__ taus, int i0, int nc,
                                         int log_p, const acc_t* z, int m, acc_t k, int lane, Emit& emit) {
  const int p_lanes = 1 << log_p;
  const int p = lane & (p_lanes - 1);
  const int g = lane >> log_p;
  const int groups = 32 >> log_p;
  acc_t x[R], hs[R], hg[R], cs[R], ca[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = p + r * p_lanes;
    x[r] = i < nc ? th[i0 + i] : acc_t(0);
    hs[r] = hg[r] = cs[r] = ca[r] = acc_t(0);
  }
#pragma unroll 4
  for (int j = g; j < m; j += groups) {
    const acc_t zj = z[j];
#pragma unroll
    for (int r = 0; r < R; ++r) qh_pair(zj - x[r], k, hs[r], hg[r], cs[r], ca[r]);
  }
  for (int off = p_lanes; off < 32; off <<= 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      hs[r] += __shfl_xor_sync(kFullMask, hs[r], off);
      hg[r] += __shfl_xor_sync(kFullMask, hg[r], off);
      cs[r] += __shfl_xor_sync(kFullMask, cs[r], off);
      ca[r] += __shfl_xor_sync(kFullMask, ca[r], off);
    }
  }
  if (g == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = p + r * p_lanes;
      if (i < nc) {
        const math::QuantileWeights<acc_t> w = math::quantile_weights<acc_t>(taus[i0 + i]);
        const acc_t sum_w = w.pos + w.neg, dif_w = w.pos - w.neg;
        const acc_t loss = acc_t(0.5) * (sum_w * hs[r] + dif_w * hg[r]);
        const acc_t dsum = acc_t(0.5) * (sum_w * cs[r] + dif_w * ca[r]);
        emit(i0 + i, loss, dsum);
      }
    }
  }
}

// All N atoms of one token; every lane of the warp must call it. emit(i, loss_i, dsum_i) is called
// exactly once per atom, by one lane (which lane depends on the chunk shape). kCompact (used by the
// rarely taken global-scratch fallback, for very large N, M) compiles one chunk shape only (32 x 8
// atoms, the last chunk padded) instead of eight, to keep the build time down.
template <typename acc_t, bool kCompact = false, typename Emit>
__device__ __forceinline__ void qh_pairs(const acc_t* th, const acc_t* __restrict__ taus, int n, const acc_t* z,
                                         int m, acc_t k, int lane, Emit& emit) {
  constexpr int kChunk = 32 * kMaxR;
  for (int i0 = 0; i0 < n; i0 += kChunk) {
    const int nc = n - i0 < kChunk ? n - i0 : kChunk;
    if (kCompact) {
      qh_chunk<kMaxR>(th, taus, i0, nc, 5, z, m, k, lane, emit);
      continue;
    }
    int log_p = 5, r = (nc + 31) / 32;
    if (nc < 32) {
      log_p = 0;
      while ((1 << log_p) < nc) ++log_p;
      r = 1;
    }
    switch (r) {
      case 1: qh_chunk<1>(th, taus, i0, nc, log_p, z, m, k, lane, emit); break;
      case 2: qh_chunk<2>(th, taus, i0, nc, log_p, z, m, k, lane, emit); break;
      case 3: qh_chunk<3>(th, taus, i0, nc, log_p, z, m, k, lane, emit); break;
      case 4: qh_chunk<4>(th, taus, i0, nc, log_p, z, m, k, lane, emit); break;
      case 5: qh_chunk<5>(th, taus, i0, nc, log_p, z, m, k, lane, emit); break;
      case 6: qh_chunk<6>(th, taus, i0, nc, log_p, z, m, k, lane, emit); break;
      case 7: qh_chunk<7>(th, taus, i0, nc, log_p, z, m, k, lane, emit); break;
      default: qh_chunk<8>(th, taus, i0, nc, log_p, z, m, k, lane, emit); break;
    }
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace dvpo
