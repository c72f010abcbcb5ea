// C++ CPU token reduction (docs/math.md, "Reductions"): per-token values [R, S] (a row is a
// sequence), already 0 at masked tokens, and an optional mask (bool, or float weights, read as they
// come) to one number, with its gradient: the weight of every token (math::reduction_weight).
// Deterministic for any thread count: partial sums over fixed chunks (token-mean) or whole rows (the
// sequence reductions), each made by one task in double, then finished in order.

#include "common.h"
#include "ops.h"

namespace dvpo {
namespace cpu {

namespace {

constexpr int64_t kChunk = 4096;  // token-mean partial sums: fixed chunks, whatever the thread count

int parse_reduction(c10::string_view name) {
  const int id = math::reduction_id(name.data(), name.size());
  TORCH_CHECK(id >= 0, "dvpo_C::reduce_tokens: reduction must be ", math::reduction_choices(), ", got ",
              std::string(name));
  return id;
}

// Sum of values and of mask weights over [lo, hi) in double (mask == nullptr: weight 1 each).
template <typename T, typename W>
inline void partial_sums(const T* v, const W* w, int64_t lo, int64_t hi, double& sum, double& weight) {
  double s = 0.0, sw = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = lo; i < hi; ++i) s += static_cast<double>(v[i]);
  if (w == nullptr) {
    sw = static_cast<double>(hi - lo);
  } else {
#pragma omp simd reduction(+ : sw)
    for (int64_t i = lo; i < hi; ++i) sw += static_cast<double>(w[i]);
  }
  sum = s;
  weight = sw;
}

template <typename T, typename W>
void reduce(const T* v, const W* w, int64_t R, int64_t S, int red, T* loss, T* weights) {
  const int64_t n = R * S;
  if (red == kTokenMean) {
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<double> ps(chunks), pw(chunks);
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) partial_sums(v, w, c * kChunk, std::min(n, (c + 1) * kChunk), ps[c], pw[c]);
    });
    double sum = 0.0, total_w = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
      sum += ps[c];
      total_w += pw[c];
    }
    *loss = static_cast<T>(sum / math::reduction_den(total_w));
    const T g = static_cast<T>(math::reduction_weight(red, total_w, 0.0, 0.0));
    at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) { std::fill(weights + b, weights + e, g); });
    return;
  }
  std::vector<double> rs(R), rw(R);
  at::parallel_for(0, R, token_grain(S), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) partial_sums(v, w, r * S, (r + 1) * S, rs[r], rw[r]);
  });
  double num = 0.0, valid = 0.0;
  for (int64_t r = 0; r < R; ++r) {
    num += math::reduction_row_value(red, rs[r], rw[r]);
    valid += rw[r] > 0.0 ? 1.0 : 0.0;
  }
  *loss = static_cast<T>(num / math::reduction_den(valid));
  at::parallel_for(0, R, token_grain(S), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T g = static_cast<T>(math::reduction_weight(red, 0.0, rw[r], valid));
      std::fill(weights + r * S, weights + (r + 1) * S, g);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> reduce_tokens(const at::Tensor& values, const std::optional<at::Tensor>& mask,
                                                 c10::string_view reduction) {
  check_cpu_float(values, "reduce_tokens", "values");
  TORCH_CHECK(values.dim() == 2, "dvpo_C::reduce_tokens: values [R, S] expected (a row per sequence), got ",
              values.sizes());
  const int red = parse_reduction(reduction);
  const bool bool_mask = mask.has_value() && mask->scalar_type() == at::kBool;
  if (mask.has_value()) {
    TORCH_CHECK(mask->device().is_cpu(), "dvpo_C::reduce_tokens: mask must be a CPU tensor");
    TORCH_CHECK(mask->sizes() == values.sizes(), "dvpo_C::reduce_tokens: mask must have the shape of values ",
                values.sizes(), ", got ", mask->sizes());
    check_mask_dtype(*mask, "reduce_tokens");
  }
  const auto acc = acc_type(values.scalar_type());
  const at::Tensor v = as_acc(values, acc);
  const std::optional<at::Tensor> w = mask_arg(mask, acc);  // bool as it is, else weights in acc
  at::Tensor loss = at::empty({}, v.options());
  at::Tensor weights = at::empty(v.sizes(), v.options());
  const int64_t R = v.size(0), S = v.size(1);
  AT_DISPATCH_FLOATING_TYPES(acc, "dvpo_reduce_tokens_cpu", [&] {
    using T = scalar_t;
    if (bool_mask) {
      reduce<T, bool>(v.data_ptr<T>(), w->data_ptr<bool>(), R, S, red, loss.data_ptr<T>(), weights.data_ptr<T>());
    } else {
      reduce<T, T>(v.data_ptr<T>(), ptr_or_null<T>(w), R, S, red, loss.data_ptr<T>(), weights.data_ptr<T>());
    }
  });
  return {loss, weights};
}

}  // namespace cpu
}  // namespace dvpo
