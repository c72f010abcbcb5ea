// C++ CPU fused DVPO critic loss (docs/math.md, "10. The fused critic loss"): one pass over a token
// computes the eight per-token terms and, because the targets are detached, the gradient of the
// weighted total w.r.t. the heads. Per token:
//   theta = mean of the heads; QH and risk-weighted QH share one pass over the (i, j) pairs
//   (pairwise, or with algorithm="sorted" from the sorted targets and atoms, kern::qh_merge_sums);
//   the tail terms (CVaR, gain, shape) use exact tail selection (kern::select_tails: no sort) of
//   theta and, in the recipe's tail mode, of the target (with "sorted", both come from the sorts
//   that algorithm made anyway: kern::sorted_tail_coefficients, kern::sorted_tail_moments); in the
//   consistent mode the targets come from theta's VaR and one O(M) pass over the target (no
//   selection: cheaper than the recipe); shift, curvature and consistency are O(H N).
// A term whose weight is 0 is not computed (its work is skipped) and reported as 0. Masked tokens
// (mask weight 0) are never read and give 0; a token with a non-finite theta or target value gives
// NaN for the total, every computed term and the gradient. No [tokens, N, M] buffer.

#include "../terms.h"  // kTerms, the term indices kQH..kConsist and the params indices (generated)
#include "common.h"
#include "kernels.h"
#include "ops.h"

namespace dvpo {
namespace cpu {

namespace {

template <typename T>
using key_t = kern::key_t<T>;

template <typename T>
struct CriticArgs {
  int64_t H, N, M;
  const T* heads;   // [T, H, N]
  const T* target;  // [T, M]
  const T* mask;    // [T] weights, or null
  const bool* mask_bool;  // [T] bool mask, or null (math::mask_weight)
  const T* wpos;  // [N] |tau_i|
  const T* wneg;  // [N] |tau_i - 1|
  const T* risk_w;  // [N]
  T kappa, qh_scale;
  T alpha_n, beta_n, alpha_m, beta_m;           // level * N for theta, level * M for the target
  int64_t cnt_lo_n, cnt_hi_n, cnt_lo_m, cnt_hi_m;  // atoms with c > 0 in each tail
  int curv_lo, curv_hi;                         // second differences averaged by each curvature tail
  T w[kTerms];
  double alpha, beta, lo_scale, hi_scale, tau_s;  // consistent tail mode only
  bool sorted;
  T* total;  // [T]
  T* terms;  // [T, kTerms]
  T* grad;   // [T, H, N]
};

template <typename T>
struct CriticScratch {
  T* theta;  // [N] ensemble mean (H > 1)
  T* g;      // [N] d total / d theta
  T* L;      // [N] per-quantile QH sums
  T* D;      // [N]
  key_t<T>* keys;  // [max(N, M)]
  T* c_lo;   // [N] theta's lower-tail coefficients
  T* c_hi;   // [N]
  T* cz;     // [M] the target's coefficients (pairwise: selection, values only)
  kern::MergeScratch<T> merge;  // sorted only
};

// Lower and upper tail statistics of x (n atoms) at the given levels; coefficients into c_lo/c_hi.
template <typename T>
DVPO_INLINE void tails_of(const T* x, int64_t n, key_t<T>* keys, bool need_lo, bool need_hi, T level_lo,
                          T level_hi, int64_t cnt_lo, int64_t cnt_hi, T* c_lo, T* c_hi, T& cv_lo, T& var_lo,
                          T& cv_hi, T& var_hi) {
  kern::order_keys<T>(x, n, keys);
  kern::TailSelect<T> lo, hi;
  kern::select_tails<T>(keys, n, need_lo ? cnt_lo : 0, need_hi ? cnt_hi : 0, &lo, &hi);
  if (need_lo) {
    kern::tail_coefficients<T>(keys, n, lo, level_lo, false, c_lo);
    kern::tail_moments<T>(x, c_lo, n, cv_lo, var_lo);
  }
  if (need_hi) {
    kern::tail_coefficients<T>(keys, n, hi, level_hi, true, c_hi);
    kern::tail_moments<T>(x, c_hi, n, cv_hi, var_hi);
  }
}

// One consistent tail (docs/math.md, "10. The fused critic loss"): theta's CVaR minus its target,
// dc = C - y, and theta's second moment about the VaR v minus its target, ds = S - s, from theta's
// coefficients c and the target's mean excess (and squared excess) beyond v.
template <typename T>
DVPO_INLINE void consistent_tail_gaps(const T* theta, const T* c, int64_t N, double v, double mean_excess,
                                      double mean_excess2, double scale, double level, double& dc, double& ds) {
  double cv, mo;
  kern::tail_moments_about<T>(theta, c, N, v, cv, mo);
  dc = cv - math::tail_cvar_target<double>(v, mean_excess, scale, level);
  ds = mo - math::tail_moment_target<double>(mean_excess2, scale, level);
}

// theta's tail coefficients into s.c_lo / s.c_hi from its sorted order (the sorted algorithm's
// s.merge.ts / perm: no selection needed).
template <typename T>
DVPO_INLINE void theta_tails_sorted(const CriticArgs<T>& a, const CriticScratch<T>& s, bool need_lo, bool need_hi) {
  if (need_lo) kern::sorted_tail_coefficients<T>(s.merge.ts, s.merge.perm, a.N, a.cnt_lo_n, a.alpha_n, false, s.c_lo);
  if (need_hi) kern::sorted_tail_coefficients<T>(s.merge.ts, s.merge.perm, a.N, a.cnt_hi_n, a.beta_n, true, s.c_hi);
}

// Adds the tail terms' gradient: c_lo (f_lo + f_vlo (theta - ctr_lo)) and the same for the upper tail.
template <typename T>
DVPO_INLINE void tail_grad_add(T* g, const T* theta, int64_t N, bool need_lo, bool need_hi, const T* c_lo,
                               const T* c_hi, T f_lo, T f_hi, T f_vlo, T f_vhi, T ctr_lo, T ctr_hi) {
  if (need_lo && (f_lo != T(0) || f_vlo != T(0))) {
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) g[i] += c_lo[i] * (f_lo + f_vlo * (theta[i] - ctr_lo));
  }
  if (need_hi && (f_hi != T(0) || f_vhi != T(0))) {
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) g[i] += c_hi[i] * (f_hi + f_vhi * (theta[i] - ctr_hi));
  }
}

// kConsistent: the tail mode, a compile-time switch so the recipe's variant compiles as before.
template <typename T, Isa isa, bool kConsistent>
DVPO_INLINE void critic_token(const CriticArgs<T>& a, const CriticScratch<T>& s, int64_t tok) {
  const int64_t H = a.H, N = a.N, M = a.M;
  T* out_terms = a.terms + tok * kTerms;
  T* out_grad = a.grad + tok * H * N;
  const T mw = math::mask_weight(a.mask, a.mask_bool, tok);
  if (mw == T(0)) {  // masked: outputs 0, the inputs are never read
    a.total[tok] = T(0);
    for (int t = 0; t < kTerms; ++t) out_terms[t] = T(0);
#pragma omp simd
    for (int64_t i = 0; i < H * N; ++i) out_grad[i] = T(0);
    return;
  }
  const T* h = a.heads + tok * H * N;
  const T* z = a.target + tok * M;

  // theta = mean over the heads (sum, then divide, as torch's mean)
  const T* theta = h;
  if (H > 1) {
    T* th = s.theta;
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) th[i] = h[i];
    for (int64_t k = 1; k < H; ++k) {
      const T* hk = h + k * N;
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) th[i] += hk[i];
    }
    const T h_count = T(H);
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) th[i] /= h_count;
    theta = th;
  }

  if (!kern::all_finite(theta, N) || !kern::all_finite(z, M)) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    a.total[tok] = nan;
    for (int t = 0; t < kTerms; ++t) out_terms[t] = a.w[t] != T(0) ? nan : T(0);
    for (int64_t i = 0; i < H * N; ++i) out_grad[i] = nan;
    return;
  }

  T* g = s.g;
#pragma omp simd
  for (int64_t i = 0; i < N; ++i) g[i] = T(0);
  T term[kTerms] = {};
  const T* zs = nullptr;  // sorted target, when the sorted algorithm ran

  // Terms 1 and 2: quantile Huber and risk-weighted quantile Huber, one pass over the pairs.
  if (a.w[kQH] != T(0) || a.w[kRisk] != T(0)) {
    if (a.sorted) {
      zs = kern::qh_merge_sums<T>(theta, N, z, M, a.wpos, a.wneg, a.kappa, s.merge, s.L, s.D);
    } else {
      kern::qh_pairwise_sums<T, isa>(theta, N, z, M, a.wpos, a.wneg, a.kappa, s.L, s.D);
    }
    double lq, lr;
    kern::sums_double<T>(s.L, a.risk_w, N, lq, lr);
    term[kQH] = a.w[kQH] != T(0) ? static_cast<T>(lq * static_cast<double>(a.qh_scale)) : T(0);
    term[kRisk] = a.w[kRisk] != T(0) ? static_cast<T>(lr * static_cast<double>(a.qh_scale)) : T(0);
    const T g0 = -a.qh_scale * a.w[kQH], g1 = -a.qh_scale * a.w[kRisk];
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) g[i] += (g0 + g1 * a.risk_w[i]) * s.D[i];
  }

  const bool need_lo = a.w[kCvar] != T(0) || a.w[kShape] != T(0);
  const bool need_hi = a.w[kGain] != T(0) || a.w[kShape] != T(0);
  T f_lo = 0, f_hi = 0;      // multipliers of c_lo and c_hi in the gradient
  T f_vlo = 0, f_vhi = 0;    // multipliers of c (theta - centre) (shape)
  T ctr_lo = 0, ctr_hi = 0;  // that centre: theta's CVaR (recipe) or its VaR (consistent)
  if constexpr (kConsistent) {
    // Terms 4, 5, 7 (consistent): theta's tails by selection, VaR v = the threshold atom (rank
    // cnt - 1); the targets need one pass over z (no selection or sort of the target).
    double v_lo = 0, v_hi = 0;
    if (zs && (need_lo || need_hi)) {  // the sorted algorithm already sorted theta
      theta_tails_sorted<T>(a, s, need_lo, need_hi);
      if (need_lo) v_lo = static_cast<double>(kern::sorted_tail_var<T>(s.merge.ts, N, a.cnt_lo_n, false));
      if (need_hi) v_hi = static_cast<double>(kern::sorted_tail_var<T>(s.merge.ts, N, a.cnt_hi_n, true));
    } else if (need_lo || need_hi) {
      kern::order_keys<T>(theta, N, s.keys);
      kern::TailSelect<T> lo, hi;
      kern::select_tails<T>(s.keys, N, need_lo ? a.cnt_lo_n : 0, need_hi ? a.cnt_hi_n : 0, &lo, &hi);
      if (need_lo) {
        kern::tail_coefficients<T>(s.keys, N, lo, a.alpha_n, false, s.c_lo);
        v_lo = static_cast<double>(kern::key_value<T>(lo.kv));
      }
      if (need_hi) {
        kern::tail_coefficients<T>(s.keys, N, hi, a.beta_n, true, s.c_hi);
        v_hi = static_cast<double>(kern::key_value<T>(hi.kv));
      }
    }
    kern::ExcessSums ex{0, 0, 0, 0, 0};
    if (need_lo || need_hi) {
      ex = kern::excess_sums<T>(z, M, v_lo, v_hi);  // also gives the shift's sum of z
    } else if (a.w[kShift] != T(0)) {
      ex.sum = kern::sum_double(z, M);
    }
    const double inv_m = 1.0 / static_cast<double>(M);
    double dc_lo = 0, ds_lo = 0, dc_hi = 0, ds_hi = 0;  // C - y and S - s of each tail
    if (need_lo) {
      consistent_tail_gaps<T>(theta, s.c_lo, N, v_lo, ex.a_lo * inv_m, ex.b_lo * inv_m, a.lo_scale, a.alpha, dc_lo,
                              ds_lo);
      ctr_lo = static_cast<T>(v_lo);
    }
    if (need_hi) {
      consistent_tail_gaps<T>(theta, s.c_hi, N, v_hi, ex.a_hi * inv_m, ex.b_hi * inv_m, a.hi_scale, a.beta, dc_hi,
                              ds_hi);
      ctr_hi = static_cast<T>(v_hi);
    }
    // cvar (C_lo - y_lo)^2, gain (C_hi - y_hi)^2: gradient 2 (C - y) c.
    if (a.w[kCvar] != T(0)) {
      term[kCvar] = static_cast<T>(dc_lo * dc_lo);
      f_lo = static_cast<T>(static_cast<double>(a.w[kCvar]) * 2.0 * dc_lo);
    }
    if (a.w[kGain] != T(0)) {
      term[kGain] = static_cast<T>(dc_hi * dc_hi);
      f_hi = static_cast<T>(static_cast<double>(a.w[kGain]) * 2.0 * dc_hi);
    }
    // shape (S_lo - s_lo)^2 + (S_hi - s_hi)^2: gradient 4 (S - s) c (theta - v).
    if (a.w[kShape] != T(0)) {
      term[kShape] = static_cast<T>(ds_lo * ds_lo + ds_hi * ds_hi);
      f_vlo = static_cast<T>(static_cast<double>(a.w[kShape]) * 4.0 * ds_lo);
      f_vhi = static_cast<T>(static_cast<double>(a.w[kShape]) * 4.0 * ds_hi);
    }
    tail_grad_add<T>(g, theta, N, need_lo, need_hi, s.c_lo, s.c_hi, f_lo, f_hi, f_vlo, f_vhi, ctr_lo, ctr_hi);
    // Term 6 (consistent): expectile shift 2 omega d^2, d = mean z - mean theta; gradient -4 omega d / N.
    if (a.w[kShift] != T(0)) {
      const double d = ex.sum * inv_m - kern::sum_double(theta, N) / static_cast<double>(N);
      const double omega = math::expectile_weight<double>(d, a.tau_s);
      term[kShift] = static_cast<T>(2.0 * omega * d * d);
      const T gd = static_cast<T>(-4.0 * static_cast<double>(a.w[kShift]) * omega * d / static_cast<double>(N));
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) g[i] += gd;
    }
  } else {
    // Terms 4, 5, 7 (recipe): tails of theta and of the target.
    T cvt_lo = 0, vt_lo = 0, cvt_hi = 0, vt_hi = 0;  // theta
    T cvz_lo = 0, vz_lo = 0, cvz_hi = 0, vz_hi = 0;  // target
    if (need_lo || need_hi) {
      if (zs) {  // the sorted algorithm already sorted theta and the target
        theta_tails_sorted<T>(a, s, need_lo, need_hi);
        if (need_lo) kern::tail_moments<T>(theta, s.c_lo, N, cvt_lo, vt_lo);
        if (need_hi) kern::tail_moments<T>(theta, s.c_hi, N, cvt_hi, vt_hi);
        if (need_lo) kern::sorted_tail_moments<T>(zs, M, a.alpha_m, false, cvz_lo, vz_lo);
        if (need_hi) kern::sorted_tail_moments<T>(zs, M, a.beta_m, true, cvz_hi, vz_hi);
      } else {
        tails_of<T>(theta, N, s.keys, need_lo, need_hi, a.alpha_n, a.beta_n, a.cnt_lo_n, a.cnt_hi_n, s.c_lo, s.c_hi,
                    cvt_lo, vt_lo, cvt_hi, vt_hi);
        // the target's coefficients are not needed: both tails share one buffer
        tails_of<T>(z, M, s.keys, need_lo, need_hi, a.alpha_m, a.beta_m, a.cnt_lo_m, a.cnt_hi_m, s.cz, s.cz,
                    cvz_lo, vz_lo, cvz_hi, vz_hi);
      }
    }
    // Term 4: CVaR alignment (CVaR_a(theta) - CVaR_a(z))^2, gradient 2 d c_lo.
    if (a.w[kCvar] != T(0)) {
      const T d = cvt_lo - cvz_lo;
      term[kCvar] = d * d;
      f_lo += a.w[kCvar] * T(2) * d;
    }
    // Term 5: upper-tail gain.
    if (a.w[kGain] != T(0)) {
      const T d = cvt_hi - cvz_hi;
      term[kGain] = d * d;
      f_hi += a.w[kGain] * T(2) * d;
    }
    // Term 7: tail shape relu(V_lo(theta) - V_lo(z)) + relu(V_hi(z) - V_hi(theta)).
    if (a.w[kShape] != T(0)) {
      const T lo = vt_lo - vz_lo, hi = vz_hi - vt_hi;
      term[kShape] = (lo > T(0) ? lo : T(0)) + (hi > T(0) ? hi : T(0));
      if (lo > T(0)) f_vlo = a.w[kShape] * T(2);
      if (hi > T(0)) f_vhi = -a.w[kShape] * T(2);
    }
    ctr_lo = cvt_lo;
    ctr_hi = cvt_hi;
    tail_grad_add<T>(g, theta, N, need_lo, need_hi, s.c_lo, s.c_hi, f_lo, f_hi, f_vlo, f_vhi, ctr_lo, ctr_hi);
    // Term 6 (recipe): mean shift relu(mean z - mean theta).
    if (a.w[kShift] != T(0)) {
      const T gap = static_cast<T>(kern::sum_double(z, M) / static_cast<double>(M) -
                                   kern::sum_double(theta, N) / static_cast<double>(N));
      if (gap > T(0)) {
        term[kShift] = gap;
        const T d = -a.w[kShift] / T(N);
#pragma omp simd
        for (int64_t i = 0; i < N; ++i) g[i] += d;
      }
    }
  }
  // Term 8: tail curvature (0 for N < 3).
  if (a.w[kCurv] != T(0) && N >= 3) {
    T lo, hi;
    math::curvature_means<T>(theta, static_cast<int>(N), a.curv_lo, a.curv_hi, lo, hi);
    term[kCurv] = (lo > T(0) ? lo : T(0)) + (hi > T(0) ? hi : T(0));
    if (lo > T(0)) math::curvature_grad_add<T>(g, 0, a.curv_lo, a.w[kCurv]);
    if (hi > T(0)) math::curvature_grad_add<T>(g, static_cast<int>(N) - 2 - a.curv_hi, a.curv_hi, -a.w[kCurv]);
  }
  // Term 9: consistency of the heads, and the gradient w.r.t. each head.
  const bool consist = a.w[kConsist] != T(0) && H > 1;
  const T inv_h = T(1) / T(H);
  if (consist) {
    const T gc = a.w[kConsist] * T(2) * math::consistency_scale<T>(static_cast<int>(H)) * mw;  // 4 / (H - 1)
    T ss = 0;
    for (int64_t k = 0; k < H; ++k) {
      const T* hk = h + k * N;
      T* gk = out_grad + k * N;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < N; ++i) {
        const T c = hk[i] - theta[i];
        ss += c * c;
        gk[i] = g[i] * inv_h * mw + gc * c;
      }
    }
    term[kConsist] = math::consistency_scale<T>(static_cast<int>(H)) * ss;
  } else {
    for (int64_t k = 0; k < H; ++k) {
      T* gk = out_grad + k * N;
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) gk[i] = g[i] * inv_h * mw;
    }
  }
  T total = 0;
  for (int t = 0; t < kTerms; ++t) total += a.w[t] * term[t];
  a.total[tok] = total * mw;
  for (int t = 0; t < kTerms; ++t) out_terms[t] = term[t] * mw;
}

template <typename T, Isa isa>
DVPO_INLINE void critic_chunk(const CriticArgs<T>& a, const CriticScratch<T>& s, int64_t begin, int64_t end) {
  for (int64_t tok = begin; tok < end; ++tok) critic_token<T, isa, false>(a, s, tok);
}

template <typename T, Isa isa>
DVPO_INLINE void critic_chunk_consistent(const CriticArgs<T>& a, const CriticScratch<T>& s, int64_t begin,
                                         int64_t end) {
  for (int64_t tok = begin; tok < end; ++tok) critic_token<T, isa, true>(a, s, tok);
}

// The per-ISA entry points of a chunk function IMPL, for float (NAME_f32) and double (NAME_f64).
#define DVPO_CRITIC_VARIANTS(NAME, IMPL)                                                                 \
  DVPO_ISA_VARIANTS(NAME##_f32, (const CriticArgs<float>& a, const CriticScratch<float>& s, int64_t b, int64_t e), \
                    (a, s, b, e), IMPL, float)                                                             \
  DVPO_ISA_VARIANTS(NAME##_f64,                                                                           \
                    (const CriticArgs<double>& a, const CriticScratch<double>& s, int64_t b, int64_t e),  \
                    (a, s, b, e), IMPL, double)

DVPO_CRITIC_VARIANTS(critic_chunk, critic_chunk)
DVPO_CRITIC_VARIANTS(critic_consistent, critic_chunk_consistent)
#undef DVPO_CRITIC_VARIANTS

template <typename T>
auto critic_chunk_for(Isa isa, bool consistent) {
  if constexpr (std::is_same_v<T, float>) {
    return consistent ? critic_consistent_f32(isa) : critic_chunk_f32(isa);
  } else {
    return consistent ? critic_consistent_f64(isa) : critic_chunk_f64(isa);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> critic_loss(
    const at::Tensor& heads, const at::Tensor& target, const at::Tensor& taus, const at::Tensor& risk_weights,
    const std::optional<at::Tensor>& mask, double kappa, double alpha, double beta, bool normalize_kappa,
    at::ArrayRef<double> params, c10::string_view algorithm) {
  const char* op = "critic_loss";
  check_pred_target(heads, "heads", 3, target, op);
  const int64_t N = heads.size(2);
  TORCH_CHECK(taus.dim() == 1 && taus.size(0) == N, "dvpo_C::critic_loss: taus [N] expected");
  TORCH_CHECK(risk_weights.dim() == 1 && risk_weights.size(0) == N, "dvpo_C::critic_loss: risk_weights [N] expected");
  // params: the 8 term weights, tail_mode (0 recipe, 1 consistent), lo_scale, hi_scale, shift_expectile
  TORCH_CHECK(params.size() == static_cast<size_t>(kParams), "dvpo_C::critic_loss: ", kParams, " params expected (",
              kTerms, " term weights, tail_mode, lo_scale, hi_scale, shift_expectile), got ", params.size());
  const at::ArrayRef<double> weights = params.slice(0, kTerms);
  const double tail_mode = params[kTailMode];
  TORCH_CHECK(tail_mode == 0 || tail_mode == 1, "dvpo_C::critic_loss: tail_mode must be 0 (recipe) or 1 ",
              "(consistent), got ", tail_mode);
  const bool consistent = tail_mode == 1;
  const double lo_scale = params[kLoScale], hi_scale = params[kHiScale], tau_s = params[kShiftExpectile];
  TORCH_CHECK(!consistent || (std::isfinite(lo_scale) && std::isfinite(hi_scale) && tau_s > 0 && tau_s < 1),
              "dvpo_C::critic_loss: consistent mode needs finite lo_scale and hi_scale and shift_expectile in ",
              "(0, 1), got ", lo_scale, ", ", hi_scale, " and ", tau_s);
  TORCH_CHECK(kappa > 0, "dvpo_C::critic_loss: kappa must be > 0, got ", kappa);
  TORCH_CHECK(alpha > 0 && alpha <= 1 && beta > 0 && beta <= 1,
              "dvpo_C::critic_loss: alpha and beta must be in (0, 1], got ", alpha, " and ", beta);
  check_mask(mask, heads.size(0), op);
  const Algorithm algo = parse_algorithm(algorithm, op);

  const auto acc = acc_type(heads.scalar_type());
  const at::Tensor hc = as_acc(heads, acc), z = as_acc(target, acc);
  const at::Tensor t = as_acc(taus, acc), rw = as_acc(risk_weights, acc);
  const std::optional<at::Tensor> mk = mask_arg(mask, acc);
  const int64_t T_ = hc.size(0), H = hc.size(1), M = z.size(1);
  // every element is written by the kernel (masked tokens included): no zero-fill pass
  at::Tensor total = at::empty({T_}, hc.options());
  at::Tensor terms = at::empty({T_, kTerms}, hc.options());
  at::Tensor grad = at::empty({T_, H, N}, hc.options());
  if (T_ == 0) return {total, terms, grad_in_input_dtype(grad, heads)};
  const bool need_qh = weights[kQH] != 0 || weights[kRisk] != 0;
  const bool sorted = need_qh && use_sorted(algo, N, M);
  const Isa isa = active_isa();

  AT_DISPATCH_FLOATING_TYPES(acc, "dvpo_critic_loss_cpu", [&] {
    using T = scalar_t;
    const QuantileWeightRows<T> qw(t);
    const T kap = static_cast<T>(kappa);
    const T alpha_n = static_cast<T>(alpha * static_cast<double>(N));
    const T beta_n = static_cast<T>(beta * static_cast<double>(N));
    const T alpha_m = static_cast<T>(alpha * static_cast<double>(M));
    const T beta_m = static_cast<T>(beta * static_cast<double>(M));
    const int n = static_cast<int>(N), m = static_cast<int>(M);
    CriticArgs<T> args{.H = H, .N = N, .M = M, .heads = hc.data_ptr<T>(), .target = z.data_ptr<T>(),
                       .mask = mask_weights<T>(mk), .mask_bool = mask_bools(mk), .wpos = qw.pos.data(),
                       .wneg = qw.neg.data(),
                       .risk_w = rw.data_ptr<T>(), .kappa = kap,
                       .qh_scale = math::qh_scale<T>(n, m, kap, normalize_kappa),
                       .alpha_n = alpha_n, .beta_n = beta_n, .alpha_m = alpha_m, .beta_m = beta_m,
                       .cnt_lo_n = math::cvar_tail_count<T>(alpha_n, n),
                       .cnt_hi_n = math::cvar_tail_count<T>(beta_n, n),
                       .cnt_lo_m = math::cvar_tail_count<T>(alpha_m, m),
                       .cnt_hi_m = math::cvar_tail_count<T>(beta_m, m),
                       .curv_lo = math::curvature_count(alpha, n), .curv_hi = math::curvature_count(beta, n),
                       .alpha = alpha, .beta = beta, .lo_scale = lo_scale, .hi_scale = hi_scale, .tau_s = tau_s,
                       .sorted = sorted, .total = total.data_ptr<T>(), .terms = terms.data_ptr<T>(),
                       .grad = grad.data_ptr<T>()};
    for (int k = 0; k < kTerms; ++k) args.w[k] = static_cast<T>(weights[k]);
    const auto fn = critic_chunk_for<T>(isa, consistent);
    const int64_t NM = std::max(N, M);
    const size_t bytes = 6 * Arena::bytes<T>(N) + Arena::bytes<key_t<T>>(NM) + Arena::bytes<T>(M) +
                         (sorted ? merge_scratch_bytes<T>(N, M) : 0);
    const int64_t work = (need_qh && !sorted ? N * M : 16 * (N + M)) + H * N;
    parallel_tokens(T_, work, bytes, [&](Arena& arena, int64_t begin, int64_t end) {
      CriticScratch<T> s{};
      s.theta = arena.take<T>(N);
      s.g = arena.take<T>(N);
      s.L = arena.take<T>(N);
      s.D = arena.take<T>(N);
      s.c_lo = arena.take<T>(N);
      s.c_hi = arena.take<T>(N);
      s.keys = arena.take<key_t<T>>(NM);
      s.cz = arena.take<T>(M);
      if (sorted) s.merge = take_merge_scratch<T>(arena, N, M);
      fn(args, s, begin, end);
    });
  });
  return {total, terms, grad_in_input_dtype(grad, heads)};
}

}  // namespace cpu
}  // namespace dvpo
