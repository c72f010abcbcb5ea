// dvpo's per-pair and per-atom math, shared by the C++ CPU kernels and the CUDA kernels.
//
// Torch-free and header-only: CUDA translation units include it as-is (every function is
// __host__ __device__ there), so the CPU and GPU backends compute the same formulas
// (docs/math.md). Everything is templated on the accumulation type (float or double).
#pragma once

#include <cstring>  // memcpy (bit casts; also callable in CUDA device code), strlen, memcmp
#include <string>   // reduction_choices (host only)

#include "terms.h"  // kReductions, kTokenMean, ... (generated from dvpo/config.py)

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DVPO_HD __host__ __device__ __forceinline__
#else
#define DVPO_HD inline
#endif

namespace dvpo {
namespace math {

// Huber loss L_k(u) and its derivative clamp(u, -k, k).
template <typename T>
DVPO_HD T huber(T u, T k) {
  const T a = u < T(0) ? -u : u;
  return a <= k ? T(0.5) * u * u : k * (a - T(0.5) * k);
}

template <typename T>
DVPO_HD T huber_grad(T u, T k) {
  return u < -k ? -k : (u > k ? k : u);
}

// Asymmetric quantile weights |tau - 1{u < 0}| for u >= 0 and u < 0, hoisted out of the pair loop.
template <typename T>
struct QuantileWeights {
  T pos, neg;
};

template <typename T>
DVPO_HD QuantileWeights<T> quantile_weights(T tau) {
  return {tau < T(0) ? -tau : tau, tau - T(1) < T(0) ? T(1) - tau : tau - T(1)};
}

// One pair u = z_j - theta_i of the quantile Huber sum: adds |tau - 1{u<0}| L_k(u) to `loss` and
// |tau - 1{u<0}| L_k'(u) to `dsum` (the gradient w.r.t. theta_i is -dsum times the scale).
// Written with selects only, so the compiler vectorizes the loop over j.
template <typename T>
DVPO_HD void qh_pair(T u, QuantileWeights<T> w, T k, T& loss, T& dsum) {
  const bool neg = u < T(0);
  const T a = neg ? -u : u;
  const bool inside = a <= k;
  const T wt = neg ? w.neg : w.pos;
  const T h = inside ? T(0.5) * u * u : k * (a - T(0.5) * k);
  const T g = inside ? u : (neg ? -k : k);
  loss += wt * h;
  dsum += wt * g;
}

// Scale of the quantile Huber mean: 1 / (N M), divided by k under the QR-DQN convention.
template <typename T>
DVPO_HD T qh_scale(int n, int m, T k, bool normalize_kappa) {
  return T(1) / (T(n) * T(m)) / (normalize_kappa ? k : T(1));
}

// Sorting-free CVaR: the rank of atom i among n, ties broken by index, counted from the bottom
// (or from the top when `upper`), is #{k : x_k < x_i} + #{k < i : x_k == x_i}.
template <typename T>
DVPO_HD int cvar_rank(const T* x, int n, int i, bool upper) {
  const T xi = x[i];
  int r = 0;
  for (int k = 0; k < n; ++k) {
    const T xk = x[k];
    r += (upper ? xk > xi : xk < xi) || (k < i && xk == xi);
  }
  return r;
}

// CVaR coefficient of the atom with rank `rank` at level_n = level * n: clamp(level_n - rank, 0, 1) / level_n.
template <typename T>
DVPO_HD T cvar_coef(int rank, T level_n) {
  T c = level_n - T(rank);
  c = c < T(0) ? T(0) : (c > T(1) ? T(1) : c);
  return c / level_n;
}

// How many second differences each tail of the curvature term averages: max(1, floor(level (n - 2))).
// Computed in double on every backend so that all agree at the boundaries.
DVPO_HD int curvature_count(double level, int n) {
  const int c = static_cast<int>(level * static_cast<double>(n - 2));  // floor for positive values
  return c < 1 ? 1 : c;
}

// ---------------------------------------------------------------------------------------------
// Additions for the fused critic loss and the sorted quantile Huber algorithm (shared by the C++
// CPU kernels and, where useful, the CUDA kernels).
// ---------------------------------------------------------------------------------------------

// The same pair as qh_pair in fewer operations (9 per pair, 2 accumulators), the form the CPU
// kernels vectorize: with g = clamp(u, -k, k) = L_k'(u), the Huber value is L_k(u) = g (u - g / 2),
// so with q = |tau - 1{u<0}| g: dsum += q and loss += q (u - g / 2). `nk` is -k (hoisted).
// The clamp is written as two selects that map to single min/max instructions; a NaN u stays NaN.
template <typename T>
DVPO_HD void qh_pair_fused(T u, QuantileWeights<T> w, T k, T nk, T& loss, T& dsum) {
  T g = u > k ? k : u;
  g = g < nk ? nk : g;
  const T q = (u < T(0) ? w.neg : w.pos) * g;
  dsum += q;
  loss += q * (u - T(0.5) * g);
}

// Number of atoms with a positive CVaR coefficient at level_n = level * n: the smallest rank r with
// level_n - r <= 0 (evaluated in T, as cvar_coef does), at most n. Ranks below it get
// cvar_coef(rank, level_n) > 0; ranks below count - 1 get exactly 1 / level_n.
template <typename T>
DVPO_HD int cvar_tail_count(T level_n, int n) {
  int r = static_cast<int>(level_n);  // floor for level_n > 0
  if (r > n) r = n;
  while (r > 0 && level_n - T(r - 1) <= T(0)) --r;
  while (r < n && level_n - T(r) > T(0)) ++r;
  return r;
}

// d V / d x_i of the c-weighted tail variance V = sum_i c_i (x_i - CVaR)^2 (the path through CVaR
// vanishes because sum_i c_i (x_i - CVaR) = 0).
template <typename T>
DVPO_HD T tail_variance_grad(T c, T x, T cvar) {
  return T(2) * c * (x - cvar);
}

// Order-preserving integer keys: for non-NaN a, b, a < b iff key(a) < key(b) (as signed integers),
// with -0 below +0 (callers add +0 first to merge the zeros: -0 + 0 == +0); NaNs sort beyond the
// infinities on the side of their sign bit. Used for exact selection/sorting by bits.
DVPO_HD int order_key(float x) {
  int i;
  memcpy(&i, &x, sizeof(i));
  return i ^ ((i >> 31) & 0x7fffffff);
}
DVPO_HD long long order_key(double x) {
  long long i;
  memcpy(&i, &x, sizeof(i));
  return i ^ ((i >> 63) & 0x7fffffffffffffffLL);
}
DVPO_HD float order_key_inverse(int key) {
  const int i = key ^ ((key >> 31) & 0x7fffffff);
  float x;
  memcpy(&x, &i, sizeof(x));
  return x;
}
DVPO_HD double order_key_inverse(long long key) {
  const long long i = key ^ ((key >> 63) & 0x7fffffffffffffffLL);
  double x;
  memcpy(&x, &i, sizeof(x));
  return x;
}

// Sorted quantile Huber (docs/architecture.md, "Pair algorithms"): the sums over j of one atom theta from
// counts and centred sums over the four contiguous ranges of the sorted targets, with c a centre
// (any value; the sums are of y = z - c) and d = theta - c:
//   region 1: u < -k       (n1 targets, sum y: s1)
//   region 2: -k <= u < 0  (n2, s2, sum y^2: q2)
//   region 3: 0 <= u <= k  (n3, s3, q3)
//   region 4: u > k        (n4, s4)
// Gives loss = sum_j |tau - 1{u<0}| L_k(u) and dsum = sum_j |tau - 1{u<0}| L_k'(u) (as qh_pair).
// Evaluate in double: the quadratic regions cancel (q - 2 d s + n d^2).
template <typename T>
struct QHRegions {
  T n1, s1, n2, s2, q2, n3, s3, q3, n4, s4;
};

template <typename T>
DVPO_HD void qh_from_regions(const QHRegions<T>& r, T d, QuantileWeights<T> w, T k, T& loss, T& dsum) {
  const T half_k = T(0.5) * k;
  // Below theta (u < 0, weight w.neg): linear part k (|u| - k/2) = k (d - y - k/2), quadratic u^2/2.
  const T lin_neg = k * (r.n1 * (d - half_k) - r.s1);
  const T quad_neg = T(0.5) * (r.q2 - T(2) * d * r.s2 + r.n2 * d * d);
  const T quad_pos = T(0.5) * (r.q3 - T(2) * d * r.s3 + r.n3 * d * d);
  const T lin_pos = k * (r.s4 - r.n4 * (d + half_k));
  const T g_neg = -k * r.n1 + (r.s2 - r.n2 * d);
  const T g_pos = (r.s3 - r.n3 * d) + k * r.n4;
  loss = w.neg * (lin_neg + quad_neg) + w.pos * (quad_pos + lin_pos);
  dsum = w.neg * g_neg + w.pos * g_pos;
}

// Tail curvature (docs/math.md, term 8 in "4-9. Tail and shape terms") from the telescoping sums
// of second differences:
// sum_{j=a}^{b-1} d2_j = (theta_{b+1} - theta_b) - (theta_{a+1} - theta_a), d2_j = theta_{j+2} -
// 2 theta_{j+1} + theta_j. lo = mean of the first n_lo, hi = -(mean of the last n_hi); n >= 3.
template <typename T>
DVPO_HD void curvature_means(const T* theta, int n, int n_lo, int n_hi, T& lo, T& hi) {
  lo = ((theta[n_lo + 1] - theta[n_lo]) - (theta[1] - theta[0])) / T(n_lo);
  const int a = n - 2 - n_hi;  // first d2 index of the upper set
  hi = -((theta[n - 1] - theta[n - 2]) - (theta[a + 1] - theta[a])) / T(n_hi);
}

// Adds scale * d(lo)/d theta (sign = +1) or scale * d(hi)/d theta (sign = -1) to grad, for the mean
// of d2 over [a, a + cnt): +1 at theta_{a+cnt+1}, -1 at theta_{a+cnt}, -1 at theta_{a+1},
// +1 at theta_a, all / cnt (hi carries the extra minus sign).
template <typename T>
DVPO_HD void curvature_grad_add(T* grad, int a, int cnt, T scale) {
  const T s = scale / T(cnt);
  grad[a + cnt + 1] += s;
  grad[a + cnt] -= s;
  grad[a + 1] -= s;
  grad[a] += s;
}

// Multi-head consistency (term 9): value scale 2 / (H - 1) on sum_a ||h_a - mean||^2, gradient
// 4 / (H - 1) (h_a - mean); both 0 when H == 1.
template <typename T>
DVPO_HD T consistency_scale(int h) {
  return h > 1 ? T(2) / T(h - 1) : T(0);
}

// One step of the distributional GAE scan (term 11) for one quantile: the advantage at a real token
// given the reward, this value, and the value and advantage of the next real token (0 after the last).
template <typename T>
DVPO_HD T gae_step(T reward, T value, T next_value, T next_adv, T gamma, T gamma_lam) {
  return reward + gamma * next_value - value + gamma_lam * next_adv;
}

// ---------------------------------------------------------------------------------------------
// Consistent tail terms (tail_targets="consistent"; docs/math.md, "Why the recipe's forms fail, and the
// consistent ones"). The targets are
// built from the critic's own VaR v (detached): their expectation over per-sample returns is the
// pooled distribution's tail, which the recipe's per-sample CVaR/variance targets are not.
// ---------------------------------------------------------------------------------------------

// A target atom's excess beyond the VaR v: min(z - v, 0) for the lower tail, max(z - v, 0) upper.
template <typename T>
DVPO_HD T tail_excess(T z, T v, bool upper) {
  const T d = z - v;
  return upper ? (d > T(0) ? d : T(0)) : (d < T(0) ? d : T(0));
}

// Rockafellar-Uryasev CVaR target v + scale * E[excess] / level (a = mean excess).
template <typename T>
DVPO_HD T tail_cvar_target(T v, T a, T scale, T level) {
  return v + scale * a / level;
}

// Target of the tail's second moment about v: scale^2 E[excess^2] / level (b = mean squared excess).
template <typename T>
DVPO_HD T tail_moment_target(T b, T scale, T level) {
  return scale * scale * b / level;
}

// Weight of the expectile shift 2 omega d^2 (d = mean z - mean theta): tau above, 1 - tau below.
template <typename T>
DVPO_HD T expectile_weight(T d, T tau) {
  return d > T(0) ? tau : T(1) - tau;
}

// ---------------------------------------------------------------------------------------------
// Tails of a sorted row (the CUDA kernels sort a row's atoms by (value, index) instead of
// selecting; docs/math.md, "3. Sorting-free CVaR", defines the ranks this reproduces).
// ---------------------------------------------------------------------------------------------

// The tail rank of the atom at position q of a row of n atoms sorted ascending by (value, index),
// where [s, e) are the positions of the atoms equal to it. From the bottom it is q itself. From the
// top, the atoms above the tie group come first (n - e of them) and within the group the lower
// index ranks lower, i.e. the group's order is not reversed: (n - e) + (q - s).
DVPO_HD int sorted_tail_rank(int q, int n, int s, int e, bool upper) {
  return upper ? (n - e) + (q - s) : q;
}

}  // namespace math
}  // namespace dvpo

// ---------------------------------------------------------------------------------------------
// Token reductions (docs/math.md, "Reductions"): per-token values, already 0 at masked tokens, to
// one number. A sequence is a row. W is the mask's total weight, w_r a row's, V the number of rows
// with w_r > 0. The gradient of the result w.r.t. every token's value of a row is the row's weight
// below (so the backward is one scale). A zero denominator counts as 1: an empty batch or row gives
// 0 (its numerator is 0), never NaN.
// ---------------------------------------------------------------------------------------------
namespace dvpo {
namespace math {

// A token's mask weight: a bool mask read as it comes (no conversion pass), else float weights, else
// 1 (no mask). At most one of `flags` and `weights` is set.
template <typename T, typename I>
DVPO_HD T mask_weight(const T* weights, const bool* flags, I i) {
  if (flags) return flags[i] ? T(1) : T(0);
  return weights ? weights[i] : T(1);
}

// The id (kTokenMean, ... in terms.h, generated from dvpo/config.py) of a reduction's name, -1 for
// none. Host only: the bindings parse the op's `reduction` string with it.
inline int reduction_id(const char* name, size_t len) {
  for (int id = 0; id < kReductions; ++id)
    if (std::strlen(kReductionNames[id]) == len && std::memcmp(kReductionNames[id], name, len) == 0) return id;
  return -1;
}

// "a, b or c": the reductions' names for an error message.
inline std::string reduction_choices() {
  std::string s;
  for (int id = 0; id < kReductions; ++id) {
    if (id > 0) s += id + 1 < kReductions ? ", " : " or ";
    s += kReductionNames[id];
  }
  return s;
}

DVPO_HD double reduction_den(double d) { return d > 0.0 ? d : 1.0; }

// What row r adds to the sequence reductions' numerator (0 for a row without a real token).
DVPO_HD double reduction_row_value(int reduction, double row_sum, double row_w) {
  if (!(row_w > 0.0)) return 0.0;
  return reduction == kSeqMeanTokenMean ? row_sum / row_w : row_sum;
}

// d result / d value of a token of a row: 1 / W for token-mean; 1 / (w_r V) or 1 / V for the
// sequence reductions, 0 in a row without a real token.
DVPO_HD double reduction_weight(int reduction, double total_w, double row_w, double valid_rows) {
  if (reduction == kTokenMean) return 1.0 / reduction_den(total_w);
  if (!(row_w > 0.0)) return 0.0;
  return (reduction == kSeqMeanTokenMean ? 1.0 / row_w : 1.0) / reduction_den(valid_rows);
}

}  // namespace math
}  // namespace dvpo
