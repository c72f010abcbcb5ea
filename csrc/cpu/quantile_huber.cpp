// C++ CPU quantile Huber loss (DESIGN.md, terms 1 and 2): per-token loss and, in the same pass, the
// gradient w.r.t. pred (the targets are detached). Parallel over tokens; each token's sums run in a
// fixed order, so results are deterministic. No [tokens, N, M] buffer: a pair lives in registers.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../dvpo_math.h"
#include "common.h"
#include "ops.h"

namespace dvpo {
namespace cpu {

namespace {

// One token: loss (returned) and grad[0..n) for pred row `theta` against target row `z`.
template <typename acc_t>
acc_t qh_token(const acc_t* theta, int64_t n, const acc_t* z, int64_t m,
               const math::QuantileWeights<acc_t>* qw, const acc_t* weights, acc_t k, acc_t scale,
               acc_t* grad) {
  double loss = 0.0;  // the outer sum in double: N partial sums of up to M terms each
  for (int64_t i = 0; i < n; ++i) {
    const acc_t th = theta[i];
    const math::QuantileWeights<acc_t> w = qw[i];
    acc_t l = 0, d = 0;
#pragma omp simd reduction(+ : l, d)
    for (int64_t j = 0; j < m; ++j) math::qh_pair<acc_t>(z[j] - th, w, k, l, d);
    const acc_t wi = weights ? weights[i] : acc_t(1);
    loss += static_cast<double>(wi * l);
    grad[i] = -scale * wi * d;
  }
  return static_cast<acc_t>(loss) * scale;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantile_huber(const at::Tensor& pred, const at::Tensor& target,
                                                  const at::Tensor& taus,
                                                  const std::optional<at::Tensor>& weights,
                                                  const std::optional<at::Tensor>& mask, double kappa,
                                                  bool normalize_kappa, c10::string_view algorithm) {
  TORCH_CHECK(pred.dim() == 2 && target.dim() == 2 && pred.size(0) == target.size(0),
              "dvpo_C::quantile_huber: pred [T, N] and target [T, M] expected");
  TORCH_CHECK(taus.dim() == 1 && taus.size(0) == pred.size(1), "dvpo_C::quantile_huber: taus [N] expected");
  const auto acc = acc_type(pred.scalar_type());
  const at::Tensor p = contiguous(pred), z = contiguous(target);
  const at::Tensor t = taus.to(acc).contiguous();
  const at::Tensor w = weights.has_value() ? weights->to(acc).contiguous() : at::Tensor();
  const at::Tensor mk = mask.has_value() ? mask->to(acc).contiguous() : at::Tensor();
  const int64_t T = p.size(0), N = p.size(1), M = z.size(1);
  at::Tensor loss = at::zeros({T}, p.options().dtype(acc));
  at::Tensor grad = at::zeros({T, N}, p.options().dtype(acc));
  if (T == 0) return {loss, grad};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "dvpo_quantile_huber_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t k = static_cast<acc_t>(kappa);
    const acc_t scale = math::qh_scale<acc_t>(N, M, k, normalize_kappa);
    std::vector<math::QuantileWeights<acc_t>> qw(N);
    for (int64_t i = 0; i < N; ++i) qw[i] = math::quantile_weights<acc_t>(t.data_ptr<acc_t>()[i]);
    const acc_t* wp = weights.has_value() ? w.data_ptr<acc_t>() : nullptr;
    const acc_t* mp = mask_ptr<acc_t>(mask, mk);
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    acc_t* lp = loss.data_ptr<acc_t>();
    acc_t* gp = grad.data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N * M));
    at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
      RowReader<scalar_t, acc_t> read_theta, read_z;
      for (int64_t tok = begin; tok < end; ++tok) {
        const acc_t mw = mp ? mp[tok] : acc_t(1);
        if (mw == acc_t(0)) continue;  // masked: loss and grad stay 0, inputs are never read
        acc_t* g = gp + tok * N;
        const acc_t l = qh_token<acc_t>(read_theta(pp + tok * N, N), N, read_z(zp + tok * M, M), M, qw.data(),
                                        wp, k, scale, g);
        lp[tok] = mw * l;
        if (mw != acc_t(1))
          for (int64_t i = 0; i < N; ++i) g[i] *= mw;
      }
    });
  });
  return {loss, grad};
}

}  // namespace cpu
}  // namespace dvpo
