// Per-token building blocks of the C++ CPU kernels. Torch-free, so they can also be built and
// benchmarked on their own.
//
// Everything hot here is DVPO_INLINE: the per-ISA entry points (simd.h, DVPO_ISA_VARIANTS) inline
// these functions, so each ISA variant gets its own vectorized copy of every loop. Inner loops are
// written for the auto-vectorizer: `#pragma omp simd` reductions (the build passes -fopenmp; the
// pragma allows reassociating the float sums), selects instead of branches, unit strides.
//
// T is the accumulation type (float for fp32/bf16/fp16 inputs, double for fp64); every input row is
// contiguous and already in T (the op wrappers convert). Each token's result depends on that token's
// inputs only and every reduction runs in a fixed order: results are deterministic.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../dvpo_math.h"
#include "qh_avx512.h"
#include "simd.h"

namespace dvpo {
namespace cpu {
namespace kern {

template <typename T>
using key_t = std::conditional_t<std::is_same_v<T, float>, int32_t, int64_t>;
template <typename T>
using ukey_t = std::make_unsigned_t<key_t<T>>;

// ---------------------------------------------------------------------------------------------
// Small vector helpers
// ---------------------------------------------------------------------------------------------

// True when every x_i is finite (x - x is 0 for finite x and NaN for +-inf and NaN).
template <typename T>
DVPO_INLINE bool all_finite(const T* x, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += x[i] - x[i];
  return acc == T(0);
}

template <typename T>
DVPO_INLINE double sum_double(const T* x, int64_t n) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(x[i]);
  return acc;
}

// sum_i x_i and sum_i w_i x_i in double (w may be null: then only the first), as 8 interleaved
// partial sums combined in a fixed order: the same order on every ISA, and it vectorizes (one
// running sum is a chain of dependent adds, about 4 cycles an element).
template <typename T>
DVPO_INLINE void sums_double(const T* x, const T* w, int64_t n, double& sx, double& swx) {
  constexpr int kL = 8;
  double a[kL] = {}, b[kL] = {};
  int64_t i = 0;
  for (; i + kL <= n; i += kL) {
#pragma omp simd
    for (int r = 0; r < kL; ++r) {
      const double xv = static_cast<double>(x[i + r]);
      a[r] += xv;
      if (w) b[r] += static_cast<double>(w[i + r]) * xv;
    }
  }
  for (int r = 0; i + r < n; ++r) {
    const double xv = static_cast<double>(x[i + r]);
    a[r] += xv;
    if (w) b[r] += static_cast<double>(w[i + r]) * xv;
  }
  sx = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
  swx = ((b[0] + b[4]) + (b[2] + b[6])) + ((b[1] + b[5]) + (b[3] + b[7]));
}

// Order keys of x (math::order_key of x + 0, so -0 and +0 get the same key).
template <typename T>
DVPO_INLINE void order_keys(const T* x, int64_t n, key_t<T>* keys) {
  using K = key_t<T>;
  constexpr int shift = sizeof(K) * 8 - 1;
  constexpr K low_bits = std::numeric_limits<K>::max();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i] + T(0);
    K b;
    std::memcpy(&b, &v, sizeof(b));
    keys[i] = b ^ static_cast<K>((b >> shift) & low_bits);
  }
}

template <typename T>
DVPO_INLINE key_t<T> scalar_key(T x) {
  return static_cast<key_t<T>>(math::order_key(x + T(0)));
}

template <typename T>
DVPO_INLINE T key_value(key_t<T> key) {
  return math::order_key_inverse(static_cast<std::conditional_t<std::is_same_v<T, float>, int, long long>>(key));
}

// ---------------------------------------------------------------------------------------------
// Pairwise quantile Huber: per-quantile sums over the M targets
// ---------------------------------------------------------------------------------------------

// Pairwise sums, vectorized over the targets: for i in [0, n), L[i] = sum_j |tau_i - 1{u<0}| L_k(u_ij)
// and D[i] = sum_j |tau_i - 1{u<0}| L_k'(u_ij), u_ij = z_j - theta_i (math::qh_pair_fused). Two
// atoms share each target load. Each atom ends with a horizontal reduction, so this is the form
// for few atoms (qh_pairwise_sums picks).
template <typename T>
DVPO_INLINE void qh_pairwise_sums_targets(const T* theta, int64_t n, const T* z, int64_t m, const T* wpos,
                                          const T* wneg, T k, T* L, T* D) {
  const T nk = -k;
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    const T t0 = theta[i], t1 = theta[i + 1];
    const math::QuantileWeights<T> w0{wpos[i], wneg[i]}, w1{wpos[i + 1], wneg[i + 1]};
    T l0 = 0, d0 = 0, l1 = 0, d1 = 0;
#pragma omp simd reduction(+ : l0, d0, l1, d1)
    for (int64_t j = 0; j < m; ++j) {
      const T zj = z[j];
      math::qh_pair_fused<T>(zj - t0, w0, k, nk, l0, d0);
      math::qh_pair_fused<T>(zj - t1, w1, k, nk, l1, d1);
    }
    L[i] = l0;
    D[i] = d0;
    L[i + 1] = l1;
    D[i + 1] = d1;
  }
  if (i < n) {
    const T t0 = theta[i];
    const math::QuantileWeights<T> w0{wpos[i], wneg[i]};
    T l0 = 0, d0 = 0;
#pragma omp simd reduction(+ : l0, d0)
    for (int64_t j = 0; j < m; ++j) math::qh_pair_fused<T>(z[j] - t0, w0, k, nk, l0, d0);
    L[i] = l0;
    D[i] = d0;
  }
}

// The same sums for a block of B atoms (th, wpos, wneg: B values each), vectorized over the atoms:
// each target is broadcast against the block, every accumulator is a lane of its own (no
// horizontal reductions, a long inner loop). The float lanes are flushed into double every kQhChunk
// targets, so the rounding error does not grow with M.
template <typename T, int B>
DVPO_INLINE void qh_atom_block(const T* th, const T* wpos, const T* wneg, const T* z, int64_t m, T k, T* L,
                               T* D) {
  const T nk = -k;
  T t[B], p[B], q[B];
  double lacc[B], dacc[B];
  for (int r = 0; r < B; ++r) {
    t[r] = th[r];
    p[r] = wpos[r];
    q[r] = wneg[r];
    lacc[r] = 0;
    dacc[r] = 0;
  }
  for (int64_t j0 = 0; j0 < m; j0 += kQhChunk) {
    const int64_t j1 = std::min(m, j0 + kQhChunk);
    T l[B], d[B];
    for (int r = 0; r < B; ++r) l[r] = d[r] = T(0);
    for (int64_t j = j0; j < j1; ++j) {
      const T zj = z[j];
#pragma omp simd
      for (int r = 0; r < B; ++r) math::qh_pair_fused<T>(zj - t[r], math::QuantileWeights<T>{p[r], q[r]}, k, nk, l[r], d[r]);
    }
#pragma omp simd
    for (int r = 0; r < B; ++r) {
      lacc[r] += static_cast<double>(l[r]);
      dacc[r] += static_cast<double>(d[r]);
    }
  }
  for (int r = 0; r < B; ++r) {
    L[r] = static_cast<T>(lacc[r]);
    D[r] = static_cast<T>(dacc[r]);
  }
}

// Atoms per block of the atom-vectorized form: two vector registers of the variant's width (two
// registers keep two independent dependency chains per accumulator; more would spill on SSE2/AVX2).
template <typename T>
constexpr int atom_block(Isa isa) {
  return 2 * vector_bytes(isa) / static_cast<int>(sizeof(T));
}

// Targets per token up to which the atom-vectorized form is used (measured: it is 1.2-2x faster at
// M <= 200, level at M = 1000, a few percent slower at M = 2000, where the per-atom overhead of the
// target-vectorized form no longer matters).
constexpr int64_t kAtomVecMaxTargets = 1024;

// D[i] = NaN for every atom with a NaN pair u_ij = z_j - theta_i (z_j or theta_i NaN, or both the
// same infinity), as math::qh_pair_fused's clamp gives; the AVX-512 clamp (VRANGE) returns k for a
// NaN u instead. L needs no fix-up: its u - g / 2 is NaN there in both forms.
template <typename T>
DVPO_INLINE void qh_nan_derivatives(const T* theta, int64_t n, const T* z, int64_t m, T* D) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  bool z_nan = false, z_pinf = false, z_ninf = false;
  for (int64_t j = 0; j < m; ++j) {
    z_nan |= z[j] != z[j];
    z_pinf |= z[j] == inf;
    z_ninf |= z[j] == -inf;
  }
  for (int64_t i = 0; i < n; ++i) {
    const T t = theta[i];
    if (z_nan || t != t || (t == inf && z_pinf) || (t == -inf && z_ninf)) D[i] = std::numeric_limits<T>::quiet_NaN();
  }
}

// L[i], D[i] for i in [0, n) (see qh_pairwise_sums_targets), with the variant's form: with at least
// one block of B = atom_block(isa) atoms (one vector on avx512) and not too many targets, blocks
// vectorized over the atoms (the avx512 variant: qh_pairwise_sums_avx512, with intrinsics; the
// others: qh_atom_block, the last, partial block padded with copies of the last atom, whose results
// are dropped); otherwise vectorized over the targets.
// wpos/wneg hold |tau_i| and |tau_i - 1| (math::quantile_weights).
template <typename T, Isa isa>
DVPO_INLINE void qh_pairwise_sums(const T* theta, int64_t n, const T* z, int64_t m, const T* wpos,
                                  const T* wneg, T k, T* L, T* D) {
  constexpr int B = atom_block<T>(isa);
#if DVPO_X86_MULTIVERSION
  if constexpr (isa == Isa::avx512) {
    if (n >= B / 2 && m <= kAtomVecMaxTargets) {
      qh_pairwise_sums_avx512<T>(theta, n, z, m, wpos, wneg, k, L, D);
      if (!all_finite(z, m) || !all_finite(theta, n)) qh_nan_derivatives<T>(theta, n, z, m, D);
      return;
    }
  }
#endif
  if (n < B || m > kAtomVecMaxTargets) {
    qh_pairwise_sums_targets<T>(theta, n, z, m, wpos, wneg, k, L, D);
    return;
  }
  int64_t i = 0;
  for (; i + B <= n; i += B) qh_atom_block<T, B>(theta + i, wpos + i, wneg + i, z, m, k, L + i, D + i);
  if (i < n) {  // a padded last block
    T th[B], wp[B], wn[B], l[B], d[B];
    for (int r = 0; r < B; ++r) {
      const int64_t src = std::min<int64_t>(i + r, n - 1);
      th[r] = theta[src];
      wp[r] = wpos[src];
      wn[r] = wneg[src];
    }
    qh_atom_block<T, B>(th, wp, wn, z, m, k, l, d);
    for (int64_t r = 0; r < n - i; ++r) {
      L[i + r] = l[r];
      D[i + r] = d[r];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Exact tail selection (CVaR without sorting)
// ---------------------------------------------------------------------------------------------
//
// The CVaR coefficient of atom i depends on its rank only (docs/math.md, "3. Sorting-free CVaR"),
// and only the `count` = math::cvar_tail_count(level_n, n) lowest ranks have c > 0. So it is enough
// to find the key kv of the count-th smallest atom (the count-th largest for the upper tail): atoms
// strictly below kv have ranks < count - 1 and the full coefficient 1 / level_n, atoms above it
// have c = 0, and an atom equal to kv has rank (#atoms strictly below) + (#equal atoms of lower
// index), the reference's index tie-break. kv is found by bisection on counts: each step is one
// vectorized counting pass over the keys (both tails share it), the first steps bisect the values
// (fast for real data), later ones the key bits (at most 32 (64 for double) more steps whatever the
// data); a step that leaves kth - 1 or kth atoms at or below its threshold ends it with one more
// pass. Non-finite atoms are ordered by their keys (NaN beyond the infinities) so this always ends.

template <typename T>
struct TailSelect {
  key_t<T> kv;   // key of the threshold atom
  int64_t beyond;  // atoms strictly on the tail side of kv (below it for the lower tail)
  int64_t ties;    // atoms with key == kv (>= 1)
  int64_t count;   // atoms with a positive coefficient
};

namespace detail {

template <typename K>
DVPO_INLINE void count_le2(const K* keys, int64_t n, K a, K b, int64_t& ca, int64_t& cb) {
  // Counting "greater than" compiles to one compare and one subtract of the mask per vector (the
  // "<=" form gets an extra blend); counts in the key type so the masks add up without widening.
  K ga = 0, gb = 0;
#pragma omp simd reduction(+ : ga, gb)
  for (int64_t j = 0; j < n; ++j) {
    ga += static_cast<K>(keys[j] > a);
    gb += static_cast<K>(keys[j] > b);
  }
  ca = n - static_cast<int64_t>(ga);
  cb = n - static_cast<int64_t>(gb);
}

// max { key : key <= a } (exists when called).
template <typename K>
DVPO_INLINE K max_le(const K* keys, int64_t n, K a) {
  K best = std::numeric_limits<K>::min();
#pragma omp simd reduction(max : best)
  for (int64_t j = 0; j < n; ++j) {
    const K v = keys[j] <= a ? keys[j] : std::numeric_limits<K>::min();
    best = v > best ? v : best;
  }
  return best;
}

// min { key : key > a } (exists when called).
template <typename K>
DVPO_INLINE K min_gt(const K* keys, int64_t n, K a) {
  K best = std::numeric_limits<K>::max();
#pragma omp simd reduction(min : best)
  for (int64_t j = 0; j < n; ++j) {
    const K v = keys[j] > a ? keys[j] : std::numeric_limits<K>::max();
    best = v < best ? v : best;
  }
  return best;
}

template <typename K>
DVPO_INLINE void min_max(const K* keys, int64_t n, K& lo, K& hi) {
  K a = std::numeric_limits<K>::max(), b = std::numeric_limits<K>::min();
#pragma omp simd reduction(min : a) reduction(max : b)
  for (int64_t j = 0; j < n; ++j) {
    a = keys[j] < a ? keys[j] : a;
    b = keys[j] > b ? keys[j] : b;
  }
  lo = a;
  hi = b;
}

// One bisection: invariant count(<= lo) < kth <= count(<= hi); `done` once hi is the answer.
template <typename T>
struct Bisect {
  using K = key_t<T>;
  using U = ukey_t<T>;
  K lo, hi;
  int64_t kth;
  bool done;
  K guess;  // first threshold to try (see select_tails)

  DVPO_INLINE K midpoint(int step) const {
    if (step == 0 && guess > lo && guess < hi) return guess;
    if (step < 24) {  // bisect the values while both ends are finite numbers
      const T a = key_value<T>(lo), b = key_value<T>(hi);
      if (std::isfinite(a) && std::isfinite(b)) {
        const K mk = scalar_key<T>(a * T(0.5) + b * T(0.5));
        if (mk > lo && mk < hi) return mk;
      }
    }
    // bisect the key bits (unsigned arithmetic: hi - lo may not fit K)
    return static_cast<K>(static_cast<U>(lo) + (static_cast<U>(hi) - static_cast<U>(lo)) / 2);
  }

  DVPO_INLINE void update(const K* keys, int64_t n, K mid, int64_t c) {
    // branchless: which side moves is data-dependent (unpredictable)
    const bool up = c >= kth;
    hi = up ? mid : hi;
    lo = up ? lo : mid;
    if (c == kth) {  // the kth smallest key is the largest one <= mid
      hi = max_le<K>(keys, n, mid);
      done = true;
    } else if (c == kth - 1) {  // ... or the smallest one > mid
      hi = min_gt<K>(keys, n, mid);
      done = true;
    } else if (static_cast<U>(hi) - static_cast<U>(lo) <= 1) {
      done = true;
    }
  }
};

}  // namespace detail

// The threshold keys of the lower tail at count_lo atoms and of the upper tail at count_hi atoms
// (either count may be 0 to skip that tail), from the keys of n >= 1 atoms.
template <typename T>
DVPO_INLINE void select_tails(const key_t<T>* keys, int64_t n, int64_t count_lo, int64_t count_hi,
                              TailSelect<T>* lo_out, TailSelect<T>* hi_out) {
  using K = key_t<T>;
  K kmin, kmax;
  detail::min_max<K>(keys, n, kmin, kmax);
  // kth smallest for the lower tail; the count_hi-th largest is the (n - count_hi + 1)-th smallest.
  // The first threshold tried is the atom at index kth - 1 (n - count_hi for the upper tail): for
  // quantile predictions that come (nearly) sorted by level, as a trained critic's and its returns'
  // do, that is (nearly) the answer and the search ends after a pass or two; for unsorted rows it is
  // a random pivot, about as good as a bisection step.
  detail::Bisect<T> a{kmin, kmax, count_lo, count_lo <= 0, count_lo > 0 ? keys[count_lo - 1] : kmin};
  detail::Bisect<T> b{kmin, kmax, n - count_hi + 1, count_hi <= 0, count_hi > 0 ? keys[n - count_hi] : kmax};
  // Start just below the minimum: count(<= lo) = 0 < kth. Only a negative NaN with every bit set
  // has the key min(K) (callers pass finite rows; the guard keeps any input in bounds).
  for (detail::Bisect<T>* s : {&a, &b}) {
    if (s->done) continue;
    if (s->kth == 1 || kmin == kmax) {
      s->hi = kmin;
      s->done = true;
    } else if (s->kth == n) {
      s->hi = kmax;
      s->done = true;
    } else {
      s->lo = kmin == std::numeric_limits<K>::min() ? kmin : kmin - 1;
      if (kmin == std::numeric_limits<K>::min()) {
        // count(<= kmin) may already reach kth: then kmin is the answer.
        int64_t c0, c1;
        detail::count_le2<K>(keys, n, kmin, kmin, c0, c1);
        if (c0 >= s->kth) {
          s->hi = kmin;
          s->done = true;
        }
      }
    }
  }
  for (int step = 0; !(a.done && b.done); ++step) {
    const K ma = a.done ? a.hi : a.midpoint(step);
    const K mb = b.done ? b.hi : b.midpoint(step);
    int64_t ca, cb;
    detail::count_le2<K>(keys, n, ma, mb, ca, cb);
    if (!a.done) a.update(keys, n, ma, ca);
    if (!b.done) b.update(keys, n, mb, cb);
  }
  // Counts around each threshold: one pass, four counters.
  const K ka = a.hi, kb = b.hi;
  K lt_a = 0, eq_a = 0, gt_b = 0, eq_b = 0;
#pragma omp simd reduction(+ : lt_a, eq_a, gt_b, eq_b)
  for (int64_t j = 0; j < n; ++j) {
    const K v = keys[j];
    lt_a += v < ka ? K(1) : K(0);
    eq_a += v == ka ? K(1) : K(0);
    gt_b += v > kb ? K(1) : K(0);
    eq_b += v == kb ? K(1) : K(0);
  }
  if (lo_out) *lo_out = TailSelect<T>{ka, static_cast<int64_t>(lt_a), static_cast<int64_t>(eq_a), count_lo};
  if (hi_out) *hi_out = TailSelect<T>{kb, static_cast<int64_t>(gt_b), static_cast<int64_t>(eq_b), count_hi};
}

// CVaR coefficients c[0..n) of a selected tail (lower: upper == false), with the reference's index
// tie-break among atoms equal to the threshold.
template <typename T>
DVPO_INLINE void tail_coefficients(const key_t<T>* keys, int64_t n, const TailSelect<T>& s, T level_n,
                                   bool upper, T* c) {
  using K = key_t<T>;
  const K kv = s.kv;
  const T full = T(1) / level_n;
  const T first_tie = math::cvar_coef<T>(static_cast<int>(s.beyond), level_n);
  if (s.ties == 1) {
    if (!upper) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) c[j] = keys[j] < kv ? full : (keys[j] == kv ? first_tie : T(0));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) c[j] = keys[j] > kv ? full : (keys[j] == kv ? first_tie : T(0));
    }
    return;
  }
  int64_t e = s.beyond;  // rank of the next tied atom (ties are ranked by index)
  for (int64_t j = 0; j < n; ++j) {
    const K v = keys[j];
    if (v == kv) {
      c[j] = math::cvar_coef<T>(static_cast<int>(e), level_n);
      ++e;
    } else {
      c[j] = (upper ? v > kv : v < kv) ? full : T(0);
    }
  }
}

// CVaR = sum c x and the tail variance V = sum c (x - CVaR)^2, accumulated in double (a tail far
// from 0 relative to its spread would lose the variance to cancellation in fp32).
template <typename T>
DVPO_INLINE void tail_moments(const T* x, const T* c, int64_t n, T& cvar, T& var) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += static_cast<double>(c[j]) * static_cast<double>(x[j]);
  double v = 0;
#pragma omp simd reduction(+ : v)
  for (int64_t j = 0; j < n; ++j) {
    const double d = static_cast<double>(x[j]) - s;
    v += static_cast<double>(c[j]) * d * d;
  }
  cvar = static_cast<T>(s);
  var = static_cast<T>(v);
}

// Consistent mode: CVaR = sum c x and the second moment about the (given) VaR v, S = sum c (x - v)^2,
// in double and in one pass (v is known up front, unlike the recipe's centre, the CVaR itself).
template <typename T>
DVPO_INLINE void tail_moments_about(const T* x, const T* c, int64_t n, double v, double& cvar, double& moment) {
  double s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
  for (int64_t j = 0; j < n; ++j) {
    const double cj = static_cast<double>(c[j]), xj = static_cast<double>(x[j]);
    const double d = xj - v;
    s += cj * xj;
    q += cj * d * d;
  }
  cvar = s;
  moment = q;
}

// Consistent mode: the target's sum and its excess sums beyond the VaRs v_lo / v_hi
// (math::tail_excess: a = sum excess, b = sum excess^2), one pass, in double (as sum_double: the
// targets of the sums are differences of similar numbers). No selection or sort of the target.
struct ExcessSums {
  double sum, a_lo, b_lo, a_hi, b_hi;
};

template <typename T>
DVPO_INLINE ExcessSums excess_sums(const T* z, int64_t m, double v_lo, double v_hi) {
  double s = 0, al = 0, bl = 0, ah = 0, bh = 0;
#pragma omp simd reduction(+ : s, al, bl, ah, bh)
  for (int64_t j = 0; j < m; ++j) {
    const double zj = static_cast<double>(z[j]);
    const double lo = math::tail_excess<double>(zj, v_lo, false);
    const double hi = math::tail_excess<double>(zj, v_hi, true);
    s += zj;
    al += lo;
    bl += lo * lo;
    ah += hi;
    bh += hi * hi;
  }
  return {s, al, bl, ah, bh};
}

// CVaR and tail variance of sorted values xs[0..n) (ascending), lower or upper tail: the
// coefficient of rank r is cvar_coef(r, level_n) (equal values share nothing but their value, so
// the tie-break does not matter here).
template <typename T>
DVPO_INLINE void sorted_tail_moments(const T* xs, int64_t n, T level_n, bool upper, T& cvar, T& var) {
  const int count = math::cvar_tail_count<T>(level_n, static_cast<int>(n));
  double s = 0;
  for (int r = 0; r < count; ++r) {
    s += static_cast<double>(math::cvar_coef<T>(r, level_n)) * static_cast<double>(xs[upper ? n - 1 - r : r]);
  }
  double v = 0;
  for (int r = 0; r < count; ++r) {
    const double d = static_cast<double>(xs[upper ? n - 1 - r : r]) - s;
    v += static_cast<double>(math::cvar_coef<T>(r, level_n)) * d * d;
  }
  cvar = static_cast<T>(s);
  var = static_cast<T>(v);
}

// ---------------------------------------------------------------------------------------------
// Sorting a row (algorithm="sorted", csrc/cpu/merge_path.h)
// ---------------------------------------------------------------------------------------------
//
// The sorted quantile Huber sorts each token's targets and its atoms. Both use a bucket sort on the
// value range: bucket(x) = floor((x - xmin) * nb / (xmax - xmin)), clamped to [0, nb), with
// kBucketsPerValue buckets per value. That map is monotone (each rounded step is), so a lower
// bucket holds only smaller values: a counting sort by bucket (stable), then an insertion sort that
// only moves values inside their bucket (strict comparison: stable), sorts exactly in O(n) for
// reasonably spread data. When
// the values cluster (a bucket over kWindow values: outliers, a constant row, a tiny range) the row
// falls back to a radix or comparison sort.

constexpr int64_t kWindow = 32;  // the largest bucket the bucket sort accepts
// Buckets per value: 2 leaves fewer values sharing a bucket (each such pair may cost the insertion
// sort a mispredicted branch) for a counting pass over twice the buckets (measured 10-15% faster
// than 1 on normal rows of 200; 4 gains little more).
constexpr int64_t kBucketsPerValue = 2;

template <typename T>
DVPO_INLINE int64_t bucket_of(T x, T lo, T scale, int64_t nb) {
  T f = (x - lo) * scale;
  f = f > T(0) ? f : T(0);  // also sends NaN to 0
  const T top = static_cast<T>(nb - 1);
  f = f < top ? f : top;
  return static_cast<int64_t>(f);
}

// The bucket of each of the n finite values x (into bi) and the first slot of each bucket in the
// sorted row (off[0..nb], nb = kBucketsPerValue n, off[b] = #values in buckets below b). False (and
// nothing usable) when the row is too short or too clustered for the bucket sort.
template <typename T>
DVPO_INLINE bool bucket_offsets(const T* x, int64_t n, int32_t* bi, int32_t* off) {
  if (n <= 16) return false;
  T xmin = x[0], xmax = x[0];
#pragma omp simd reduction(min : xmin) reduction(max : xmax)
  for (int64_t j = 0; j < n; ++j) {
    xmin = x[j] < xmin ? x[j] : xmin;
    xmax = x[j] > xmax ? x[j] : xmax;
  }
  const int64_t nb = kBucketsPerValue * n;
  const T scale = static_cast<T>(nb) / (xmax - xmin);
  if (!(xmax > xmin && std::isfinite(scale) && scale > T(0))) return false;
  for (int64_t b = 0; b <= nb; ++b) off[b] = 0;  // off[b + 1] counts bucket b first
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) bi[j] = static_cast<int32_t>(bucket_of<T>(x[j], xmin, scale, nb));
  for (int64_t j = 0; j < n; ++j) off[bi[j] + 1]++;
  int32_t biggest = 0;
#pragma omp simd reduction(max : biggest)
  for (int64_t b = 1; b <= nb; ++b) biggest = off[b] > biggest ? off[b] : biggest;
  if (biggest > kWindow) return false;
  for (int64_t b = 0; b < nb; ++b) off[b + 1] += off[b];
  return true;
}

// Stable insertion sort of v[0..n) (nearly sorted input: each value moves inside its bucket),
// moving the payload p along when it is given.
template <typename T>
DVPO_INLINE void insertion_sort(T* v, int32_t* p, int64_t n) {
  for (int64_t i = 1; i < n; ++i) {
    const T x = v[i];
    if (!(v[i - 1] > x)) continue;
    const int32_t px = p ? p[i] : 0;
    int64_t j = i - 1;
    while (j >= 0 && v[j] > x) {
      v[j + 1] = v[j];
      if (p) p[j + 1] = p[j];
      --j;
    }
    v[j + 1] = x;
    if (p) p[j + 1] = px;
  }
}

// LSD radix sort of the order keys (8 bits a pass, passes with a single digit value skipped).
DVPO_INLINE void radix_sort(const float* x, int64_t n, float* out, uint32_t* ka, uint32_t* kb) {
  uint32_t hist[4][256];
  std::memset(hist, 0, sizeof(hist));
  order_keys<float>(x, n, reinterpret_cast<int32_t*>(ka));
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t k = ka[i] ^ 0x80000000u;  // signed order -> unsigned order
    ka[i] = k;
    hist[0][k & 0xff]++;
    hist[1][(k >> 8) & 0xff]++;
    hist[2][(k >> 16) & 0xff]++;
    hist[3][k >> 24]++;
  }
  uint32_t* src = ka;
  uint32_t* dst = kb;
  for (int pass = 0; pass < 4; ++pass) {
    uint32_t* h = hist[pass];
    const int shift = 8 * pass;
    if (h[(src[0] >> shift) & 0xff] == static_cast<uint32_t>(n)) continue;
    uint32_t run = 0;
    for (int d = 0; d < 256; ++d) {
      const uint32_t c = h[d];
      h[d] = run;
      run += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t k = src[i];
      dst[h[(k >> shift) & 0xff]++] = k;
    }
    std::swap(src, dst);
  }
  for (int64_t i = 0; i < n; ++i) out[i] = key_value<float>(static_cast<int32_t>(src[i] ^ 0x80000000u));
}

inline void radix_sort(const double* x, int64_t n, double* out, uint64_t*, uint64_t*) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] + 0.0;
  std::sort(out, out + n);
}

template <typename T>
struct SortScratch {
  T* zs;          // [m] the sorted row
  int32_t* off;   // [kBucketsPerValue m + 2] bucket offsets
  int32_t* bi;    // [m] bucket of each value
  ukey_t<T>* ka;  // [m] radix keys
  ukey_t<T>* kb;  // [m]
};

// Sorts the m finite targets z ascending into s.zs (zeros as +0).
template <typename T>
DVPO_INLINE const T* sort_targets(const T* z, int64_t m, const SortScratch<T>& s) {
  T* zs = s.zs;
  if (m <= 16) {
    for (int64_t j = 0; j < m; ++j) zs[j] = z[j] + T(0);
    insertion_sort<T>(zs, nullptr, m);
  } else if (bucket_offsets<T>(z, m, s.bi, s.off)) {
    for (int64_t j = 0; j < m; ++j) zs[s.off[s.bi[j]]++] = z[j] + T(0);
    insertion_sort<T>(zs, nullptr, m);
  } else {
    radix_sort(z, m, zs, s.ka, s.kb);
  }
  return zs;
}

// Prefix sums over the sorted targets of y = z - c and y^2 (double), with c the middle target
// zs[m / 2], accumulated outward from it: p[j] = sum of y over [m / 2, j) for j >= m / 2 and minus
// the sum over [j, m / 2) below, so p[b] - p[a] is the sum over [a, b) either way. A region's sums
// then only carry the values between it and the middle: a far outlier (and its square) does not
// enter the prefix sums of the regions on the other side, where it would cancel away their digits.
template <typename T>
DVPO_INLINE double prefix_sums(const T* zs, int64_t m, double* p1, double* p2) {
  const int64_t mid = m / 2;
  const double c = static_cast<double>(zs[mid]);
  double s1 = 0, s2 = 0, r1 = 0, r2 = 0;
  p1[mid] = 0;
  p2[mid] = 0;
  for (int64_t j = mid; j < m; ++j) {
    const double y = static_cast<double>(zs[j]) - c;
    s1 += y;
    s2 += y * y;
    p1[j + 1] = s1;
    p2[j + 1] = s2;
  }
  for (int64_t j = mid - 1; j >= 0; --j) {
    const double y = static_cast<double>(zs[j]) - c;
    r1 -= y;
    r2 -= y * y;
    p1[j] = r1;
    p2[j] = r2;
  }
  return c;
}

// The region sums of every atom from its boundaries and the prefix sums gathered at them
// (math::qh_from_regions in double), vectorized over the atoms; first1 and last1 are p1[0] and
// p1[m] (prefix_sums).
template <typename T>
DVPO_INLINE void qh_regions_to_sums(const T* theta, int64_t n, const int32_t* b1, const int32_t* b2,
                                    const int32_t* b3, const double* pre, int64_t m, double first1,
                                    double last1, double centre, const T* wpos, const T* wneg, T k, T* L,
                                    T* D) {
  const double kd = static_cast<double>(k);
  const double* s1a = pre;  // p1[b1], p1[b2], p1[b3], p2[b1], p2[b2], p2[b3]
  const double* s1b = pre + n;
  const double* s1c = pre + 2 * n;
  const double* s2a = pre + 3 * n;
  const double* s2b = pre + 4 * n;
  const double* s2c = pre + 5 * n;
  // No `omp simd` here: GCC 12 then fails to vectorize the loop ("no vectype" for the loads of
  // this struct-building body); the auto-vectorizer does it (versioned for aliasing).
  for (int64_t i = 0; i < n; ++i) {
    math::QHRegions<double> r;
    r.n1 = static_cast<double>(b1[i]);
    r.s1 = s1a[i] - first1;
    r.n2 = static_cast<double>(b2[i] - b1[i]);
    r.s2 = s1b[i] - s1a[i];
    r.q2 = s2b[i] - s2a[i];
    r.n3 = static_cast<double>(b3[i] - b2[i]);
    r.s3 = s1c[i] - s1b[i];
    r.q3 = s2c[i] - s2b[i];
    r.n4 = static_cast<double>(m - b3[i]);
    r.s4 = last1 - s1c[i];
    const math::QuantileWeights<double> w{static_cast<double>(wpos[i]), static_cast<double>(wneg[i])};
    double loss, dsum;
    math::qh_from_regions<double>(r, static_cast<double>(theta[i]) - centre, w, kd, loss, dsum);
    L[i] = static_cast<T>(loss);
    D[i] = static_cast<T>(dsum);
  }
}

// ---------------------------------------------------------------------------------------------
// Algorithm choice
// ---------------------------------------------------------------------------------------------

// Whether algorithm="auto" runs the sorted quantile Huber for N atoms and M targets per token.
// Cost model in ns per token (fp32, AVX-512 variant, one thread):
//   pairwise ~ kPairNs N M + kPairAtomNs N,   sorted ~ kSortNs M + kSearchNs N + kFixedNs,
// fitted by bench/cpu_auto_fit.py (least squares on relative error) to both kernels (the pairwise
// one with the VRANGE clamp of qh_avx512.h, the merge-path sorted one of merge_path.h) timed on 42
// shapes, N in {32, 100, 200, 300, 500, 1000} x M in {32, 100, 200, 300, 500, 1000, 2000}, quantile
// Huber alone and the fused critic loss (fits within 10% of each other; these constants round
// between them), normal targets, process CPU time, best of two alternating runs, on the development
// machine (AMD EPYC Zen 4). The rule picks the faster kernel on 81 of the 84 (shape, op) cases; the
// misses are quantile Huber at 300 x 300 and 500 x 200 (3-8%) and 200 x 500 (25%). Square shapes
// cross over near N = M = 300 (measured: sorted is 0.7x pairwise at 200, level at 300, 1.6-1.7x
// faster at 500, 3x at 1000), so the benchmark shape 200 x 200 stays pairwise. The bench harness's
// `crossover` sweep re-measures it on any machine.
constexpr double kPairNs = 0.09;
constexpr double kPairAtomNs = 4.5;
constexpr double kSortNs = 12.4;
constexpr double kSearchNs = 17.0;
constexpr double kFixedNs = 0.0;

inline bool prefer_sorted(int64_t n, int64_t m) {
  const double nd = static_cast<double>(n), md = static_cast<double>(m);
  const double pairwise = kPairNs * nd * md + kPairAtomNs * nd;
  const double sorted = kSortNs * md + kSearchNs * nd + kFixedNs;
  return sorted < pairwise;
}

}  // namespace kern
}  // namespace cpu
}  // namespace dvpo
