// The CUDA backend's launcher API: plain C++ (no torch, no device code), so the binding
// (csrc/cuda/bindings.cpp, compiled by the host compiler with torch) and the kernel files
// (csrc/cuda/*.cu, compiled by nvcc without torch) share it.
//
// Every op works on flattened, contiguous tensors, tokens first (the kernel interface of
// dvpo/backends/reference.py). `scalar_t` is the input dtype (float, double, __half,
// __nv_bfloat16); per-token values are written in the accumulation type acc_t<scalar_t> (double
// for double, else float), gradients in scalar_t (dvpo/opspec.py: the gradient is in the input dtype). Small per-quantile vectors (taus, weights,
// risk weights) and the mask arrive already converted to acc_t. Each launcher enqueues its
// kernels on `stream` and returns the launch status; it never synchronizes.
//
// Explicit instantiations for float, double, __half and __nv_bfloat16 live in the .cu files.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "terms.h"  // kTerms, the term and params indices (generated from dvpo/config.py)

namespace dvpo {
namespace cuda {

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

// ----------------------------------------------------------------------------------- quantile Huber
// loss[t] = mask[t] * scale * sum_i w_i sum_j |tau_i - 1{u<0}| L_k(u), u = target[t, j] - pred[t, i];
// grad[t, i] = d loss[t] / d pred[t, i]. Masked tokens (mask == 0) give 0 and are never read.
template <typename scalar_t>
struct QuantileHuberParams {
  using acc = acc_t<scalar_t>;
  const scalar_t* pred = nullptr;    // [T, N]
  const scalar_t* target = nullptr;  // [T, M]
  const acc* taus = nullptr;         // [N]
  const acc* weights = nullptr;      // [N] or nullptr (all 1)
  const acc* mask = nullptr;         // [T] per-token weight, or
  const bool* mask_bool = nullptr;   // [T] a bool mask (math::mask_weight; both null: all 1)
  acc* loss = nullptr;               // [T] out
  scalar_t* grad = nullptr;          // [T, N] out
  int64_t tokens = 0;
  int n = 0, m = 0;
  double kappa = 1.0;
  bool normalize_kappa = false;
  bool sorted = false;        // the sorted pair algorithm (csrc/cuda/sorted.cuh) instead of pairwise
  void* workspace = nullptr;  // quantile_huber_workspace_bytes(...) bytes, when that is not 0
};

// ----------------------------------------------------------------------------------------- CVaR
// value[t] = sum_i coef[t, i] x[t, i]; coef = the sorting-free CVaR coefficients (docs/math.md,
// "3. Sorting-free CVaR").
template <typename scalar_t>
struct CvarParams {
  using acc = acc_t<scalar_t>;
  const scalar_t* x = nullptr;  // [T, N]
  acc* value = nullptr;         // [T] out
  scalar_t* coef = nullptr;     // [T, N] out
  int64_t tokens = 0;
  int n = 0;
  double level = 0.1;
  bool upper = false;
  void* workspace = nullptr;
};

// ------------------------------------------------------------------------------ fused critic loss
// The eight per-token terms (TERM_NAMES order: qh, risk, cvar, gain, shift, shape, curv, consist),
// the weighted total and the gradient of the total w.r.t. the heads, all times the mask weight.
// The op's kParams-entry `params` list (dvpo/config.py, PARAM_NAMES; indices in csrc/terms.h) maps
// onto the last five fields: params[0, kTerms) = weights, [kTailMode] = tail_mode, [kLoScale] =
// lo_scale, [kHiScale] = hi_scale, [kShiftExpectile] = shift_expectile.
// tail_mode 0 ("recipe") is the original form of the cvar, gain, shift and shape terms (lo_scale,
// hi_scale and shift_expectile are ignored); tail_mode 1 ("consistent") fits theta's tails to
// targets built from the target's deviations beyond theta's own VaRs, and the shift term is an
// expectile loss (docs/math.md, "4-9. Tail and shape terms"; the kernel's header comment has the
// formulas).
template <typename scalar_t>
struct CriticLossParams {
  using acc = acc_t<scalar_t>;
  const scalar_t* heads = nullptr;   // [T, H, N]
  const scalar_t* target = nullptr;  // [T, M]
  const acc* taus = nullptr;         // [N]
  const acc* risk_weights = nullptr; // [N]
  const acc* mask = nullptr;         // [T] per-token weight, or
  const bool* mask_bool = nullptr;   // [T] a bool mask (math::mask_weight; both null: all 1)
  acc* total = nullptr;              // [T] out
  acc* terms = nullptr;              // [T, kTerms] out
  scalar_t* grad = nullptr;          // [T, H, N] out
  int64_t tokens = 0;
  int h = 1, n = 0, m = 0;
  double kappa = 1.0, alpha = 0.1, beta = 0.1;
  bool normalize_kappa = false;
  bool sorted = false;  // the sorted pair algorithm for qh and risk (csrc/cuda/sorted.cuh)
  double weights[kTerms] = {1, 1, 1, 1, 1, 1, 1, 1};  // term weights, TERM_NAMES order
  int tail_mode = 0;                              // 0 = recipe, 1 = consistent
  double lo_scale = 1.0;                          // 1 - lower_contraction (consistent mode)
  double hi_scale = 1.0;                          // 1 + upper_expansion (consistent mode)
  double shift_expectile = 0.5;                   // tau_s in (0, 1) (consistent mode)
  void* workspace = nullptr;
};

// ----------------------------------------------------------------------------- distributional GAE
// adv[b, t] = mean_j A[b, t, j]; ret[b, t, j] = V + A; both 0 where mask == 0 (docs/math.md,
// "11. Distributional GAE").
template <typename scalar_t>
struct GaeParams {
  using acc = acc_t<scalar_t>;
  const acc* rewards = nullptr;     // [B, T]
  const scalar_t* values = nullptr; // [B, T, M]
  const acc* mask = nullptr;        // [B, T], nonzero = real token, or
  const bool* mask_bool = nullptr;  // [B, T] a bool mask (one of the two is set)
  acc* adv = nullptr;               // [B, T] out
  acc* ret = nullptr;               // [B, T, M] out
  int64_t batch = 0;
  int64_t length = 0;
  int m = 0;
  double gamma = 1.0, lam = 0.95;
  void* workspace = nullptr;  // gae_workspace_bytes(...) bytes
};

// ------------------------------------------------------------------------------ token reduction
// values [R, S] (a row per sequence, already 0 at masked tokens) -> loss [] and weights [R, S] =
// d loss / d values (docs/math.md, "Reductions"; the reduction ids are terms.h's kTokenMean, ...).
// The mask, optional, is read as it comes: bool, or float weights in acc_t.
template <typename scalar_t>
struct ReduceTokensParams {
  using acc = acc_t<scalar_t>;
  const scalar_t* values = nullptr;  // [R, S]
  const bool* mask_bool = nullptr;   // [R, S], or
  const acc* mask = nullptr;         // [R, S] weights (both null: every token weighs 1)
  acc* loss = nullptr;               // [] out
  acc* weights = nullptr;            // [R, S] out
  int64_t rows = 0, cols = 0;
  int reduction = 0;
  void* workspace = nullptr;  // none needed
};

// Bytes of global scratch a launch needs (0 in the usual case: per-token data fits shared memory;
// larger N, M fall back to a global per-token scratch). Query on the device the launch will use.
template <typename scalar_t>
size_t quantile_huber_workspace_bytes(const QuantileHuberParams<scalar_t>& p);
template <typename scalar_t>
size_t cvar_workspace_bytes(const CvarParams<scalar_t>& p);
template <typename scalar_t>
size_t critic_loss_workspace_bytes(const CriticLossParams<scalar_t>& p);
template <typename scalar_t>
size_t gae_workspace_bytes(const GaeParams<scalar_t>& p);
template <typename scalar_t>
size_t reduce_tokens_workspace_bytes(const ReduceTokensParams<scalar_t>& p);

template <typename scalar_t>
cudaError_t launch_quantile_huber(const QuantileHuberParams<scalar_t>& p, cudaStream_t stream);
template <typename scalar_t>
cudaError_t launch_cvar(const CvarParams<scalar_t>& p, cudaStream_t stream);
template <typename scalar_t>
cudaError_t launch_critic_loss(const CriticLossParams<scalar_t>& p, cudaStream_t stream);
template <typename scalar_t>
cudaError_t launch_distributional_gae(const GaeParams<scalar_t>& p, cudaStream_t stream);
template <typename scalar_t>
cudaError_t launch_reduce_tokens(const ReduceTokensParams<scalar_t>& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace dvpo
