// dvpo's per-pair and per-atom math, shared by the C++ CPU kernels and the CUDA kernels.
//
// Torch-free and header-only: CUDA translation units include it as-is (every function is
// __host__ __device__ there), so the CPU and GPU backends compute the same formulas
// (DESIGN.md, "The math"). Everything is templated on the accumulation type (float or double).
#pragma once

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

}  // namespace math
}  // namespace dvpo
