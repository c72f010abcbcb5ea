// C++ CPU sorting-free CVaR (docs/math.md, "3. Sorting-free CVaR"): per row, the CVaR of the N
// equally weighted atoms at `level` (upper tail with `upper`) and its gradient, the coefficients
// c_i. Exact selection of the tail threshold by counting (kern::select_tails), no sort; the
// reference's index tie-break. A row with a non-finite value gives NaN (value and coefficients).

#include "common.h"
#include "kernels.h"
#include "ops.h"

namespace dvpo {
namespace cpu {

namespace {

template <typename T>
struct CVaRArgs {
  int64_t N;
  const T* x;  // [T, N]
  T level_n;
  int64_t count;  // atoms with a positive coefficient
  bool upper;
  T* value;  // [T]
  T* coef;   // [T, N]
};

template <typename T, Isa>
DVPO_INLINE void cvar_chunk(const CVaRArgs<T>& a, kern::key_t<T>* keys, int64_t begin, int64_t end) {
  const int64_t N = a.N;
  for (int64_t row = begin; row < end; ++row) {
    const T* x = a.x + row * N;
    T* c = a.coef + row * N;
    if (!kern::all_finite(x, N)) {
      const T nan = std::numeric_limits<T>::quiet_NaN();
      for (int64_t i = 0; i < N; ++i) c[i] = nan;
      a.value[row] = nan;
      continue;
    }
    kern::order_keys<T>(x, N, keys);
    kern::TailSelect<T> sel;
    if (a.upper) {
      kern::select_tails<T>(keys, N, 0, a.count, nullptr, &sel);
    } else {
      kern::select_tails<T>(keys, N, a.count, 0, &sel, nullptr);
    }
    kern::tail_coefficients<T>(keys, N, sel, a.level_n, a.upper, c);
    double s = 0;  // in double, as the critic's tail moments
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < N; ++i) s += static_cast<double>(c[i]) * static_cast<double>(x[i]);
    a.value[row] = static_cast<T>(s);
  }
}

DVPO_ISA_VARIANTS(cvar_chunk_f32, (const CVaRArgs<float>& a, int32_t* keys, int64_t b, int64_t e),
                  (a, keys, b, e), cvar_chunk, float)
DVPO_ISA_VARIANTS(cvar_chunk_f64, (const CVaRArgs<double>& a, int64_t* keys, int64_t b, int64_t e),
                  (a, keys, b, e), cvar_chunk, double)

template <typename T>
void run_cvar_chunk(Isa isa, const CVaRArgs<T>& args, kern::key_t<T>* keys, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, float>) {
    cvar_chunk_f32(isa)(args, keys, begin, end);
  } else {
    cvar_chunk_f64(isa)(args, keys, begin, end);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cvar(const at::Tensor& x, double level, bool upper) {
  check_cpu_float(x, "cvar", "x");
  TORCH_CHECK(x.dim() == 2, "dvpo_C::cvar: x [T, N] expected, got ", x.sizes());
  TORCH_CHECK(x.size(1) >= 1, "dvpo_C::cvar: N must be >= 1");
  TORCH_CHECK(level > 0 && level <= 1, "dvpo_C::cvar: level must be in (0, 1], got ", level);
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor xc = as_acc(x, acc);
  const int64_t T_ = xc.size(0), N = xc.size(1);
  at::Tensor value = at::empty({T_}, xc.options());  // every element is written by the kernel
  at::Tensor coef = at::empty({T_, N}, xc.options());
  if (T_ == 0) return {value, grad_in_input_dtype(coef, x)};
  const Isa isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES(acc, "dvpo_cvar_cpu", [&] {
    using T = scalar_t;
    const T level_n = static_cast<T>(level * static_cast<double>(N));
    CVaRArgs<T> args{N, xc.data_ptr<T>(), level_n, math::cvar_tail_count<T>(level_n, static_cast<int>(N)), upper,
                     value.data_ptr<T>(), coef.data_ptr<T>()};
    at::parallel_for(0, T_, token_grain(8 * N), [&](int64_t begin, int64_t end) {
      std::vector<kern::key_t<T>> keys(N);
      run_cvar_chunk<T>(isa, args, keys.data(), begin, end);
    });
  });
  return {value, grad_in_input_dtype(coef, x)};
}

}  // namespace cpu
}  // namespace dvpo
