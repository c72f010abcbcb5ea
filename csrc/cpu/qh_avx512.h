// The pairwise quantile Huber sums with AVX-512 intrinsics (the avx512 variant's pair pass). Torch-free.
//
// Same sums as kern::qh_pairwise_sums (blocks of atoms, each target broadcast against the block), in
// fewer instructions than the compiler's code for math::qh_pair_fused: the clamp g = clamp(u, -k, k)
// is one VRANGEPS/PD (the smaller of |u| and k, with u's sign) instead of a min and a max. At the
// pair pass's 8 vector operations per 16 pairs (was 9), which run at the core's issue rate, that is
// about 13% less time (measured on Zen 4: 0.080 against 0.091 ns a pair, fp32).
//
// Blocks hold 2 vectors of atoms; a remainder of at most one vector's worth runs as a 1-vector block,
// so at N = 200 fp32 the pass covers 208 atom lanes instead of the generic form's 224. Two targets
// per step feed separate accumulators (independent add chains). Float partial sums are flushed into
// double every kQhChunk targets, in registers, as the generic form does, so the error does not grow
// with M.
//
// The functions carry the AVX-512 target attribute and are not inlined: they are called (once per
// token) only from the avx512 variant's entry points, after the run-time check (simd.h), and their
// names end in _avx512 so the wheel-safety test sees them as variant code.
#pragma once

#include <cstdint>

#include "simd.h"

namespace dvpo {
namespace cpu {
namespace kern {

// Targets per float partial sum before it is flushed into double (both pairwise forms).
constexpr int64_t kQhChunk = 64;

}  // namespace kern
}  // namespace cpu
}  // namespace dvpo

#if DVPO_X86_MULTIVERSION
#include <immintrin.h>

// Force-inlined helpers compiled for AVX-512 (only ever inlined into the _avx512 functions below).
#define DVPO_AVX512_FN DVPO_TARGET_AVX512 DVPO_INLINE

namespace dvpo {
namespace cpu {
namespace kern {

namespace avx512 {

// The vector operations the block needs, for float (16 lanes) and double (8 lanes).
template <typename T>
struct Vec;

template <>
struct Vec<float> {
  using V = __m512;
  using M = __mmask16;
  static constexpr int kLanes = 16;
  DVPO_AVX512_FN static V set1(float x) { return _mm512_set1_ps(x); }
  DVPO_AVX512_FN static V zero() { return _mm512_setzero_ps(); }
  DVPO_AVX512_FN static V load(const float* p) { return _mm512_loadu_ps(p); }
  DVPO_AVX512_FN static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  DVPO_AVX512_FN static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  DVPO_AVX512_FN static V add(V a, V b) { return _mm512_add_ps(a, b); }
  DVPO_AVX512_FN static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  DVPO_AVX512_FN static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  DVPO_AVX512_FN static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  // imm 0b0010: the operand of smaller magnitude (|u| vs k), with the sign of the first (u): clamp
  DVPO_AVX512_FN static V clamp(V u, V k) { return _mm512_range_ps(u, k, 0x2); }
  DVPO_AVX512_FN static M negative(V u, V zero) { return _mm512_cmp_ps_mask(u, zero, _CMP_LT_OQ); }
  DVPO_AVX512_FN static V select(M m, V if_clear, V if_set) { return _mm512_mask_blend_ps(m, if_clear, if_set); }
};

template <>
struct Vec<double> {
  using V = __m512d;
  using M = __mmask8;
  static constexpr int kLanes = 8;
  DVPO_AVX512_FN static V set1(double x) { return _mm512_set1_pd(x); }
  DVPO_AVX512_FN static V zero() { return _mm512_setzero_pd(); }
  DVPO_AVX512_FN static V load(const double* p) { return _mm512_loadu_pd(p); }
  DVPO_AVX512_FN static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  DVPO_AVX512_FN static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
  DVPO_AVX512_FN static V add(V a, V b) { return _mm512_add_pd(a, b); }
  DVPO_AVX512_FN static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  DVPO_AVX512_FN static V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  DVPO_AVX512_FN static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_pd(a, b, c); }
  DVPO_AVX512_FN static V clamp(V u, V k) { return _mm512_range_pd(u, k, 0x2); }
  DVPO_AVX512_FN static M negative(V u, V zero) { return _mm512_cmp_pd_mask(u, zero, _CMP_LT_OQ); }
  DVPO_AVX512_FN static V select(M m, V if_clear, V if_set) { return _mm512_mask_blend_pd(m, if_clear, if_set); }
};

// Float sums into the double accumulators lo (lanes 0-7) and hi (lanes 8-15); double adds directly.
// (The zero-masked conversions: the plain ones start from an undefined register, which GCC 12
// reports as maybe-uninitialized.)
DVPO_AVX512_FN void flush(__m512 v, __m512d& lo, __m512d& hi) {
  lo = _mm512_add_pd(lo, _mm512_maskz_cvtps_pd(0xFF, _mm512_maskz_extractf32x8_ps(0xFF, v, 0)));
  hi = _mm512_add_pd(hi, _mm512_maskz_cvtps_pd(0xFF, _mm512_maskz_extractf32x8_ps(0xFF, v, 1)));
}
DVPO_AVX512_FN void flush(__m512d v, __m512d& lo, __m512d&) { lo = _mm512_add_pd(lo, v); }
DVPO_AVX512_FN void unflush(const __m512d& lo, const __m512d& hi, float* out) {
  _mm256_storeu_ps(out, _mm512_maskz_cvtpd_ps(0xFF, lo));
  _mm256_storeu_ps(out + 8, _mm512_maskz_cvtpd_ps(0xFF, hi));
}
DVPO_AVX512_FN void unflush(const __m512d& lo, const __m512d&, double* out) { _mm512_storeu_pd(out, lo); }

// One pair step: u = z - theta; g = clamp(u); q = |tau - 1{u<0}| g; d += q; l += q (u - g / 2).
template <typename T>
DVPO_AVX512_FN void pair(typename Vec<T>::V z, typename Vec<T>::V t, typename Vec<T>::V wp,
                                         typename Vec<T>::V wn, typename Vec<T>::V k, typename Vec<T>::V half,
                                         typename Vec<T>::V zero, typename Vec<T>::V& l, typename Vec<T>::V& d) {
  using X = Vec<T>;
  const auto u = X::sub(z, t);
  const auto g = X::clamp(u, k);
  const auto q = X::mul(X::select(X::negative(u, zero), wp, wn), g);
  d = X::add(d, q);
  l = X::fmadd(q, X::fnmadd(half, g, u), l);
}

// L[r], D[r] for the R * Vec<T>::kLanes atoms th[0..), against the m targets z.
template <typename T, int R>
DVPO_AVX512_FN void qh_block(const T* th, const T* wpos, const T* wneg, const T* z, int64_t m,
                                               T kappa, T* L, T* D) {
  using X = Vec<T>;
  using V = typename X::V;
  constexpr int W = X::kLanes;
  const V k = X::set1(kappa), half = X::set1(T(0.5)), zero = X::zero();
  V t[R], wp[R], wn[R];
  __m512d lacc[R][2], dacc[R][2];
  for (int r = 0; r < R; ++r) {
    t[r] = X::load(th + r * W);
    wp[r] = X::load(wpos + r * W);
    wn[r] = X::load(wneg + r * W);
    lacc[r][0] = lacc[r][1] = dacc[r][0] = dacc[r][1] = _mm512_setzero_pd();
  }
  for (int64_t j0 = 0; j0 < m; j0 += kQhChunk) {
    const int64_t j1 = j0 + kQhChunk < m ? j0 + kQhChunk : m;
    V la[R], lb[R], da[R], db[R];  // even and odd targets: two independent accumulator chains
    for (int r = 0; r < R; ++r) la[r] = lb[r] = da[r] = db[r] = zero;
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) {
      const V za = X::set1(z[j]), zb = X::set1(z[j + 1]);
      for (int r = 0; r < R; ++r) {
        pair<T>(za, t[r], wp[r], wn[r], k, half, zero, la[r], da[r]);
        pair<T>(zb, t[r], wp[r], wn[r], k, half, zero, lb[r], db[r]);
      }
    }
    if (j < j1) {
      const V za = X::set1(z[j]);
      for (int r = 0; r < R; ++r) pair<T>(za, t[r], wp[r], wn[r], k, half, zero, la[r], da[r]);
    }
    for (int r = 0; r < R; ++r) {
      flush(X::add(la[r], lb[r]), lacc[r][0], lacc[r][1]);
      flush(X::add(da[r], db[r]), dacc[r][0], dacc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    unflush(lacc[r][0], lacc[r][1], L + r * W);
    unflush(dacc[r][0], dacc[r][1], D + r * W);
  }
}

// A last block of n < R * kLanes atoms, padded with copies of the last atom (results dropped).
template <typename T, int R>
DVPO_AVX512_FN void qh_padded_block(const T* theta, int64_t n, const T* wpos, const T* wneg,
                                                 const T* z, int64_t m, T k, T* L, T* D) {
  constexpr int B = R * Vec<T>::kLanes;
  alignas(64) T th[B], wp[B], wn[B], l[B], d[B];
  for (int r = 0; r < B; ++r) {
    const int64_t src = r < n ? r : n - 1;
    th[r] = theta[src];
    wp[r] = wpos[src];
    wn[r] = wneg[src];
  }
  qh_block<T, R>(th, wp, wn, z, m, k, l, d);
  for (int64_t r = 0; r < n; ++r) {
    L[r] = l[r];
    D[r] = d[r];
  }
}

}  // namespace avx512

// L[i], D[i] for i in [0, n), as qh_pairwise_sums, for rows of at least one vector of atoms and at
// most kAtomVecMaxTargets targets (the caller, qh_pairwise_sums in kernels.h, checks).
template <typename T>
DVPO_TARGET_AVX512 DVPO_NOINLINE void qh_pairwise_sums_avx512(const T* theta, int64_t n, const T* z, int64_t m,
                                                               const T* wpos, const T* wneg, T k, T* L, T* D) {
  constexpr int W = avx512::Vec<T>::kLanes;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) avx512::qh_block<T, 2>(theta + i, wpos + i, wneg + i, z, m, k, L + i, D + i);
  const int64_t rest = n - i;
  if (rest > W) {
    avx512::qh_padded_block<T, 2>(theta + i, rest, wpos + i, wneg + i, z, m, k, L + i, D + i);
  } else if (rest > 0) {
    avx512::qh_padded_block<T, 1>(theta + i, rest, wpos + i, wneg + i, z, m, k, L + i, D + i);
  }
}

}  // namespace kern
}  // namespace cpu
}  // namespace dvpo

#endif  // DVPO_X86_MULTIVERSION
