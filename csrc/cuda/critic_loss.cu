// CUDA fused DVPO critic loss (docs/math.md, "The fused critic loss"): the eight per-token terms
// (qh, risk, cvar, gain, shift, shape, curv, consist), their weighted total and the gradient w.r.t.
// the heads, in one kernel, one warp per token.
//
// Per token (a warp), in the warp's scratch (shared memory, or the global fallback):
//   th[N]  ensemble theta = mean of the H heads (16-byte vector loads of the heads when aligned),
//   g[N]   d total / d theta, accumulated term by term,
//   z[M]   the targets,
//   ts     theta sorted by (value, index): keys and atom indices over N padded to a power of two
//          (common.cuh, sort_row; used when a tail term is on, and by the sorted pair pass),
//   zs     the same for z (recipe mode only; no room is reserved otherwise).
// Phases, separated by __syncwarp():
//   1. qh and risk (the quantile Huber and its risk-weighted form) in one pair pass (qh_pairs,
//      pairwise.cuh): both share the pairs, the risk term only reweights each atom's sums;
//   2. the tail terms cvar, gain and shape and the mean-shift term shift; gradients into g. The
//      rows whose tails are needed are sorted in scratch (a warp bitonic sort by (value, index), so
//      position = rank with the reference's index tie-break); a tail is then the sorted positions
//      [0, K] (lower) or [n - 1 - K, n) plus its boundary tie group (upper), its VaR the value at
//      position K (n - 1 - K), and its sums run over its own atoms only (common.cuh, tail_stats).
//      Two modes (params[kTailMode], i.e. tail_mode):
//      recipe (0): theta and z are sorted; CVaR values and tail variances of both rows:
//          cvar = (CVaR_a(theta) - CVaR_a(z))^2, gain = (CVaR+_b(theta) - CVaR+_b(z))^2,
//          shape = relu(V_lo(theta) - V_lo(z)) + relu(V_hi(z) - V_hi(theta)),
//          shift = relu(mean z - mean theta);
//      consistent (1): theta only is sorted; each tail gives the CVaR C, the VaR v (the max of
//        theta over c > 0, min for the upper tail: the boundary atom) and (shape only)
//        S = sum c (theta - v)^2; one pass over z gives the means a, b of the excess
//        e = min(z - v_lo, 0) (max(z - v_hi, 0) above) and of e^2. z is never sorted.
//          y = v + scale a / level, s = scale^2 b / level   (lo_scale, alpha / hi_scale, beta),
//          cvar = (C_lo - y_lo)^2, gain = (C_hi - y_hi)^2, shape = (S_lo - s_lo)^2 + (S_hi - s_hi)^2,
//          shift = 2 omega d^2, d = mean z - mean theta, omega = tau_s if d > 0 else 1 - tau_s;
//        v, y and s are targets: constants in the gradient (a semi-gradient, like a TD target).
//      Both modes' gradients have the form d/d theta_i = c_lo,i (A_lo + B_lo (theta_i - m_lo)) +
//      c_hi,i (A_hi + B_hi (theta_i - m_hi)) + shift gradient, with the centre m the CVaR (recipe)
//      or the VaR (consistent): the shift gradient in one pass over all atoms, each tail's part
//      scattered to the tail's atoms only;
//   3. curv (curvature): two warp sums of second differences; the gradient of a mean of a run of
//      them telescopes to four atoms, so lane 0 adds it to at most eight entries of g;
//   4. the output pass: grad[h, i] = mask * (g_i / H + w_consist 4 / (H - 1) (heads_hi - theta_i)),
//      summing the consistency term consist on the way (the heads are re-read, L1/L2-hot).
// Terms whose weight is 0 are skipped and reported as 0. Every sum is a fixed-order per-lane loop
// plus a shuffle butterfly: no atomics, bitwise deterministic. With `sorted` (algorithm="sorted")
// phase 1 runs qh_sorted (sorted.cuh) instead of qh_pairs, with the same per-atom results; theta is
// then sorted into ts before phase 1, and the merges and the tails share that order.
#include "common.cuh"
#include "pairwise.cuh"
#include "sorted.cuh"
#include "terms.h"  // kTerms and the term indices kQH..kConsist (generated from dvpo/config.py)

namespace dvpo {
namespace cuda {
namespace detail {
namespace {

// zs (the sorted target) only in recipe mode: consistent mode never needs the target's tails.
template <typename acc_t>
struct CriticLayout {
  size_t th, g, z, ts, zs, qs, bytes;
  __host__ __device__ CriticLayout(int n, int m, bool target_sort, bool sorted_pairs) {
    th = 0;
    g = th + align16(sizeof(acc_t) * n);
    z = g + align16(sizeof(acc_t) * n);
    ts = z + align16(sizeof(acc_t) * m);
    zs = ts + sorted_row_bytes<acc_t>(n);
    qs = zs + (target_sort ? sorted_row_bytes<acc_t>(m) : 0);
    bytes = qs + (sorted_pairs ? SortedQhLayout<acc_t>(n, m, false).bytes : 0);  // theta sorted in ts
  }
};

constexpr int kTailRecipe = 0, kTailConsistent = 1;

// The op for launch_warp_op (common.cuh).
struct CriticLossOp {
  template <typename scalar_t>
  static size_t scratch_bytes(const CriticLossParams<scalar_t>& p) {
    return CriticLayout<acc_t<scalar_t>>(p.n, p.m, p.tail_mode != kTailConsistent, p.sorted).bytes;
  }
  template <typename scalar_t>
  static bool valid(const CriticLossParams<scalar_t>& p) {
    return p.h >= 1 && p.n >= 1 && p.m >= 1 && p.alpha > 0.0 && p.alpha <= 1.0 && p.beta > 0.0 && p.beta <= 1.0 &&
           (p.tail_mode == kTailRecipe || p.tail_mode == kTailConsistent);
  }
  static constexpr bool kHasSorted = true;
  template <bool kShared, bool kSorted, typename scalar_t>
  static __device__ __forceinline__ void run(const CriticLossParams<scalar_t>& p, size_t per_token);
};

template <bool kShared, bool kSorted, typename scalar_t>
__device__ __forceinline__ void CriticLossOp::run(const CriticLossParams<scalar_t>& p, const size_t per_token) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  const int H = p.h, n = p.n, m = p.m;
  const bool consistent = p.tail_mode == kTailConsistent;
  const CriticLayout<acc> lay(n, m, !consistent, p.sorted);
  char* base = warp_scratch<kShared>(p.workspace, per_token);
  acc* th = reinterpret_cast<acc*>(base + lay.th);
  acc* g = reinterpret_cast<acc*>(base + lay.g);
  acc* z = reinterpret_cast<acc*>(base + lay.z);
  SortedRow<acc> trow(base + lay.ts, n);
  SortedRow<acc> zrow(base + lay.zs, m);  // recipe mode only

  acc w[kTerms];
#pragma unroll
  for (int t = 0; t < kTerms; ++t) w[t] = static_cast<acc>(p.weights[t]);
  const acc k = static_cast<acc>(p.kappa);
  const acc scale = math::qh_scale<acc>(n, m, k, p.normalize_kappa);
  const bool do_pairs = w[kQH] != acc(0) || w[kRisk] != acc(0);
  const bool need_lo = w[kCvar] != acc(0) || w[kShape] != acc(0);
  const bool need_hi = w[kGain] != acc(0) || w[kShape] != acc(0);
  const bool need_var = w[kShape] != acc(0);
  // The sorted pair pass sorts theta into ts for its merges; the tails then reuse that order.
  const bool presort = kSorted && do_pairs;
  const bool do_consist = H > 1 && w[kConsist] != acc(0);
  const bool do_curv = n >= 3 && w[kCurv] != acc(0);
  const acc alpha_n = static_cast<acc>(p.alpha * n), beta_n = static_cast<acc>(p.beta * n);
  const acc alpha_m = static_cast<acc>(p.alpha * m), beta_m = static_cast<acc>(p.beta * m);
  const int curv_lo = math::curvature_count(p.alpha, n), curv_hi = math::curvature_count(p.beta, n);
  const acc inv_h = acc(1) / acc(H);
  const acc consist_grad = do_consist ? w[kConsist] * acc(4.0 / (H - 1)) : acc(0);
  const int64_t hn = static_cast<int64_t>(H) * n;
  // Consistent mode's scalars (unused in recipe mode).
  const acc lo_scale = static_cast<acc>(p.lo_scale), hi_scale = static_cast<acc>(p.hi_scale);
  const acc tau_s = static_cast<acc>(p.shift_expectile);
  const acc alpha = static_cast<acc>(p.alpha), beta = static_cast<acc>(p.beta);

  for (int64_t tok = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5); tok < p.tokens;
       tok += static_cast<int64_t>(gridDim.x) * warps) {
    scalar_t* grad = p.grad + tok * hn;
    acc* terms_out = p.terms + tok * kTerms;
    const acc mw = math::mask_weight(p.mask, p.mask_bool, tok);
    if (mw == acc(0)) {  // masked: every output exactly 0, inputs never read
      for (int64_t e = lane; e < hn; e += 32) grad[e] = from_acc<scalar_t>(acc(0));
      if (lane < kTerms) terms_out[lane] = acc(0);
      if (lane == 0) p.total[tok] = acc(0);
      continue;
    }
    const scalar_t* heads = p.heads + tok * hn;
    __syncwarp();  // the previous token's readers are done with the scratch
    load_rows_mean(heads, H, n, th, lane);
    load_rows_mean(p.target + tok * m, 1, m, z, lane);
    __syncwarp();
    acc term[kTerms];
#pragma unroll
    for (int t = 0; t < kTerms; ++t) term[t] = acc(0);

    // ---- 1. qh (quantile Huber) and risk (risk-weighted quantile Huber), one pair pass.
    if (do_pairs) {
      const acc* rw = p.risk_weights;
      acc q_part = 0, r_part = 0;
      auto emit = [&](int i, acc loss_i, acc dsum_i) {
        const acc rwi = rw[i];
        q_part += loss_i;
        r_part += rwi * loss_i;
        g[i] = -scale * dsum_i * (w[kQH] + w[kRisk] * rwi);
      };
      if (presort) {
        sort_row(th, trow, lane);
        qh_sorted<acc, !kShared>(th, p.taus, n, z, m, k, base + lay.qs, &trow, lane, emit);
      } else {
        qh_pairs<acc, !kShared>(th, p.taus, n, z, m, k, lane, emit);
      }
      if (w[kQH] != acc(0)) term[kQH] = warp_sum(q_part) * scale;
      if (w[kRisk] != acc(0)) term[kRisk] = warp_sum(r_part) * scale;
    } else {
      for (int i = lane; i < n; i += 32) g[i] = acc(0);
    }
    __syncwarp();

    // ---- 2. tails (cvar, gain, shape) and the mean shift (shift); gradients into g.
    acc shift_grad = 0;
    if (w[kShift] != acc(0)) {
      acc st = 0, sz = 0;
      for (int i = lane; i < n; i += 32) st += th[i];
      for (int j = lane; j < m; j += 32) sz += z[j];
      const acc gap = div_rn(warp_sum(sz), acc(m)) - div_rn(warp_sum(st), acc(n));
      if (consistent) {  // expectile: 2 omega d^2, d/d theta_i = -4 omega d / N
        const acc omega = math::expectile_weight(gap, tau_s);
        term[kShift] = acc(2) * omega * gap * gap;
        shift_grad = acc(-4) * w[kShift] * omega * gap / acc(n);
      } else {  // relu(d), d/d theta_i = -1{d > 0} / N
        term[kShift] = gap > acc(0) ? gap : acc(0);
        shift_grad = gap > acc(0) ? -w[kShift] / acc(n) : acc(0);
      }
    }
    if (shift_grad != acc(0)) {
      for (int i = lane; i < n; i += 32) g[i] += shift_grad;
      __syncwarp();
    }
    if (need_lo || need_hi) {
      // theta (and in recipe mode z) sorted by (value, index): the tails' boundary atoms and sums.
      if (!presort) sort_row(th, trow, lane);
      if (!consistent) sort_row(z, zrow, lane);
      // d/d theta_i = c_lo,i (a_lo + b_lo (theta_i - m_lo)) + c_hi,i (a_hi + b_hi (theta_i - m_hi)).
      acc a_lo = 0, b_lo = 0, a_hi = 0, b_hi = 0, m_lo = 0, m_hi = 0;
      Tail<acc> tlo{}, thi{};
      if (need_lo) tlo = sorted_tail(trow, alpha_n, false);
      if (need_hi) thi = sorted_tail(trow, beta_n, true);
      TailStats<acc> tl, thh;  // theta's tails; spread about the VaR (consistent) or the CVaR (recipe)
      if (need_lo) tl = tail_stats(th, trow, tlo, need_var, consistent, lane);
      if (need_hi) thh = tail_stats(th, trow, thi, need_var, consistent, lane);
      if (consistent) {
        const TargetTailMoments<acc> zt = target_tail_moments<acc>(z, m, need_lo, tl.var_at, need_hi, thh.var_at, lane);
        if (w[kCvar] != acc(0)) {
          const acc d = tl.value - math::tail_cvar_target(tl.var_at, zt.a_lo, lo_scale, alpha);
          term[kCvar] = d * d;
          a_lo = acc(2) * w[kCvar] * d;
        }
        if (w[kGain] != acc(0)) {
          const acc d = thh.value - math::tail_cvar_target(thh.var_at, zt.a_hi, hi_scale, beta);
          term[kGain] = d * d;
          a_hi = acc(2) * w[kGain] * d;
        }
        if (need_var) {
          const acc lo = tl.spread - math::tail_moment_target(zt.b_lo, lo_scale, alpha);
          const acc hi = thh.spread - math::tail_moment_target(zt.b_hi, hi_scale, beta);
          term[kShape] = lo * lo + hi * hi;
          b_lo = acc(4) * w[kShape] * lo;
          b_hi = acc(4) * w[kShape] * hi;
        }
        m_lo = tl.var_at;
        m_hi = thh.var_at;
      } else {
        TailStats<acc> zl, zh;
        if (need_lo) zl = tail_stats(z, zrow, sorted_tail(zrow, alpha_m, false), need_var, false, lane);
        if (need_hi) zh = tail_stats(z, zrow, sorted_tail(zrow, beta_m, true), need_var, false, lane);
        if (w[kCvar] != acc(0)) {
          const acc d = tl.value - zl.value;
          term[kCvar] = d * d;
          a_lo = acc(2) * w[kCvar] * d;
        }
        if (w[kGain] != acc(0)) {
          const acc d = thh.value - zh.value;
          term[kGain] = d * d;
          a_hi = acc(2) * w[kGain] * d;
        }
        if (need_var) {
          const acc lo = tl.spread - zl.spread, hi = zh.spread - thh.spread;
          term[kShape] = (lo > acc(0) ? lo : acc(0)) + (hi > acc(0) ? hi : acc(0));
          b_lo = lo > acc(0) ? acc(2) * w[kShape] : acc(0);
          b_hi = hi > acc(0) ? acc(-2) * w[kShape] : acc(0);
        }
        m_lo = tl.value;
        m_hi = thh.value;
      }
      // Each tail scatters into its own atoms (one lane per atom); the tails may share atoms, so
      // the upper one waits for the lower one.
      if (need_lo)
        for_each_tail_atom(trow, tlo, lane, [&](int e, acc c) { g[e] += c * (a_lo + b_lo * (th[e] - m_lo)); });
      __syncwarp();
      if (need_hi)
        for_each_tail_atom(trow, thi, lane, [&](int e, acc c) { g[e] += c * (a_hi + b_hi * (th[e] - m_hi)); });
    }
    __syncwarp();

    // ---- 3. curv (curvature): the means of the first curv_lo and the last curv_hi second
    // differences d2_k = (th[k+2] - 2 th[k+1]) + th[k] (computed as the reference does, so that the
    // relu decisions agree at exact ties); the gradient of a mean of consecutive d2 telescopes to
    // four atoms: d/d th of sum_{k=a}^{b} d2_k is +1 at a, -1 at a+1, -1 at b+1, +1 at b+2.
    if (do_curv) {
      const int a_hi = n - 2 - curv_hi;
      acc s_lo = 0, s_hi = 0;
      for (int kk = lane; kk < curv_lo; kk += 32) s_lo += (th[kk + 2] - acc(2) * th[kk + 1]) + th[kk];
      for (int kk = a_hi + lane; kk < n - 2; kk += 32) s_hi += (th[kk + 2] - acc(2) * th[kk + 1]) + th[kk];
      const acc lo = warp_sum(s_lo) / acc(curv_lo);
      const acc hi = -(warp_sum(s_hi) / acc(curv_hi));
      term[kCurv] = (lo > acc(0) ? lo : acc(0)) + (hi > acc(0) ? hi : acc(0));
      if (lane == 0) {
        if (lo > acc(0)) {
          const acc s = w[kCurv] / acc(curv_lo);
          g[0] += s;
          g[1] -= s;
          g[curv_lo] -= s;
          g[curv_lo + 1] += s;
        }
        if (hi > acc(0)) {
          const acc s = w[kCurv] / acc(curv_hi);
          g[a_hi] -= s;
          g[a_hi + 1] += s;
          g[n - 2] += s;
          g[n - 1] -= s;
        }
      }
      __syncwarp();
    }

    // ---- 4. output pass: gradient w.r.t. each head, and the consistency term (consist).
    if (do_consist) {
      acc c_part = 0;
      for (int i = lane; i < n; i += 32) {
        const acc gi = g[i] * inv_h, ti = th[i];
        for (int hh = 0; hh < H; ++hh) {
          const acc c = to_acc(heads[static_cast<int64_t>(hh) * n + i]) - ti;
          c_part += c * c;
          grad[static_cast<int64_t>(hh) * n + i] = from_acc<scalar_t>(mw * (gi + consist_grad * c));
        }
      }
      term[kConsist] = warp_sum(c_part) * acc(2.0 / (H - 1));
    } else {
      for (int i = lane; i < n; i += 32) {
        const acc gi = mw * (g[i] * inv_h);
        for (int hh = 0; hh < H; ++hh) grad[static_cast<int64_t>(hh) * n + i] = from_acc<scalar_t>(gi);
      }
    }
    if (lane == 0) {
      acc total = 0;
#pragma unroll
      for (int t = 0; t < kTerms; ++t) {
        total += w[t] * term[t];
        terms_out[t] = mw * term[t];
      }
      p.total[tok] = mw * total;
    }
  }
}

}  // namespace
}  // namespace detail

DVPO_CUDA_WARP_OP(CriticLossOp, CriticLossParams, critic_loss_workspace_bytes, launch_critic_loss)

}  // namespace cuda
}  // namespace dvpo
