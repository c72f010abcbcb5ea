// C++ CPU quantile Huber loss (docs/math.md, "1-2. Quantile Huber and its risk-weighted form"):
// per-token loss and, in the same pass, the gradient w.r.t. pred (the targets are detached).
// Parallel over tokens; each token's sums run in a fixed order, so results are deterministic. No
// [tokens, N, M] buffer: a pair lives in registers.
//
// algorithm="pairwise": O(N M) per token (kern::qh_pairwise_sums, vectorized over the targets).
// algorithm="sorted": the token's targets and atoms sorted once, region boundaries by merge walks,
// sums from prefix sums (kern::qh_merge_sums, csrc/cpu/merge_path.h); a token with a non-finite
// value runs pairwise, so that inf/NaN propagate exactly as in the pairwise formula. "auto" picks
// by shape (kern::prefer_sorted).

#include "common.h"
#include "kernels.h"
#include "ops.h"

namespace dvpo {
namespace cpu {

namespace {

template <typename T>
struct QHArgs {
  int64_t N, M;
  const T* pred;    // [T, N]
  const T* target;  // [T, M]
  const T* mask;    // [T] weights, or null
  const bool* mask_bool;  // [T] bool mask, or null (math::mask_weight)
  const T* weights;  // [N] or null
  const T* wpos;  // [N] |tau_i|
  const T* wneg;  // [N] |tau_i - 1|
  T kappa, scale;
  bool sorted;
  T* loss;  // [T]
  T* grad;  // [T, N]
};

template <typename T>
struct QHScratch {
  T* L;
  T* D;
  kern::MergeScratch<T> merge;  // sorted only
};

template <typename T, Isa isa>
DVPO_INLINE void qh_token(const QHArgs<T>& a, const QHScratch<T>& s, int64_t tok) {
  const int64_t N = a.N, M = a.M;
  const T mw = math::mask_weight(a.mask, a.mask_bool, tok);
  if (mw == T(0)) {  // masked: loss and grad 0, the inputs are never read
    a.loss[tok] = T(0);
    T* g = a.grad + tok * N;
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) g[i] = T(0);
    return;
  }
  const T* theta = a.pred + tok * N;
  const T* z = a.target + tok * M;
  if (a.sorted && kern::all_finite(theta, N) && kern::all_finite(z, M)) {
    kern::qh_merge_sums<T>(theta, N, z, M, a.wpos, a.wneg, a.kappa, s.merge, s.L, s.D);
  } else {
    kern::qh_pairwise_sums<T, isa>(theta, N, z, M, a.wpos, a.wneg, a.kappa, s.L, s.D);
  }
  double unweighted, loss;
  kern::sums_double<T>(s.L, a.weights, N, unweighted, loss);
  if (!a.weights) loss = unweighted;
  T* g = a.grad + tok * N;
  const T gs = -a.scale * mw;
  if (a.weights) {
    for (int64_t i = 0; i < N; ++i) g[i] = gs * a.weights[i] * s.D[i];
  } else {
    for (int64_t i = 0; i < N; ++i) g[i] = gs * s.D[i];
  }
  a.loss[tok] = static_cast<T>(loss * static_cast<double>(a.scale)) * mw;
}

template <typename T, Isa isa>
DVPO_INLINE void qh_chunk(const QHArgs<T>& a, const QHScratch<T>& s, int64_t begin, int64_t end) {
  for (int64_t tok = begin; tok < end; ++tok) qh_token<T, isa>(a, s, tok);
}

DVPO_ISA_VARIANTS(qh_chunk_f32, (const QHArgs<float>& a, const QHScratch<float>& s, int64_t b, int64_t e),
                  (a, s, b, e), qh_chunk, float)
DVPO_ISA_VARIANTS(qh_chunk_f64, (const QHArgs<double>& a, const QHScratch<double>& s, int64_t b, int64_t e),
                  (a, s, b, e), qh_chunk, double)

template <typename T>
auto qh_chunk_for(Isa isa) {
  if constexpr (std::is_same_v<T, float>) {
    return qh_chunk_f32(isa);
  } else {
    return qh_chunk_f64(isa);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantile_huber(const at::Tensor& pred, const at::Tensor& target,
                                                  const at::Tensor& taus,
                                                  const std::optional<at::Tensor>& weights,
                                                  const std::optional<at::Tensor>& mask, double kappa,
                                                  bool normalize_kappa, c10::string_view algorithm) {
  const char* op = "quantile_huber";
  check_pred_target(pred, "pred", 2, target, op);
  TORCH_CHECK(taus.dim() == 1 && taus.size(0) == pred.size(1), "dvpo_C::quantile_huber: taus [N] expected");
  TORCH_CHECK(!weights.has_value() || (weights->dim() == 1 && weights->size(0) == pred.size(1)),
              "dvpo_C::quantile_huber: weights [N] expected");
  TORCH_CHECK(kappa > 0, "dvpo_C::quantile_huber: kappa must be > 0, got ", kappa);
  check_mask(mask, pred.size(0), op);
  const Algorithm algo = parse_algorithm(algorithm, op);

  const auto acc = acc_type(pred.scalar_type());
  const at::Tensor p = as_acc(pred, acc), z = as_acc(target, acc), t = as_acc(taus, acc);
  const std::optional<at::Tensor> w = as_acc(weights, acc), mk = mask_arg(mask, acc);
  const int64_t T_ = p.size(0), N = p.size(1), M = z.size(1);
  // every element is written by the kernel (masked tokens included): no zero-fill pass
  at::Tensor loss = at::empty({T_}, p.options());
  at::Tensor grad = at::empty({T_, N}, p.options());
  if (T_ == 0) return {loss, grad_in_input_dtype(grad, pred)};
  const bool sorted = use_sorted(algo, N, M);
  const Isa isa = active_isa();

  AT_DISPATCH_FLOATING_TYPES(acc, "dvpo_quantile_huber_cpu", [&] {
    using T = scalar_t;
    const QuantileWeightRows<T> qw(t);
    QHArgs<T> args{.N = N, .M = M, .pred = p.data_ptr<T>(), .target = z.data_ptr<T>(),
                   .mask = mask_weights<T>(mk), .mask_bool = mask_bools(mk), .weights = ptr_or_null<T>(w),
                   .wpos = qw.pos.data(), .wneg = qw.neg.data(), .kappa = static_cast<T>(kappa),
                   .scale = math::qh_scale<T>(static_cast<int>(N), static_cast<int>(M), static_cast<T>(kappa),
                                              normalize_kappa),
                   .sorted = sorted, .loss = loss.data_ptr<T>(), .grad = grad.data_ptr<T>()};
    const auto fn = qh_chunk_for<T>(isa);
    const size_t bytes = 2 * Arena::bytes<T>(N) + (sorted ? merge_scratch_bytes<T>(N, M) : 0);
    parallel_tokens(T_, sorted ? 16 * (N + M) : N * M, bytes, [&](Arena& arena, int64_t begin, int64_t end) {
      QHScratch<T> s{};
      s.L = arena.take<T>(N);
      s.D = arena.take<T>(N);
      if (sorted) s.merge = take_merge_scratch<T>(arena, N, M);
      fn(args, s, begin, end);
    });
  });
  return {loss, grad_in_input_dtype(grad, pred)};
}

}  // namespace cpu
}  // namespace dvpo
