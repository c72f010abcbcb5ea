// C++ CPU distributional GAE (docs/math.md, "11. Distributional GAE"): per sequence, a reversed
// scan over the tokens, vectorized over the M quantiles:
// A_t = r_t + gamma V_next - V_t + gamma lam A_next at real tokens
// (mask != 0), where "next" is the next *real* token (padding is skipped; 0 after the last one).
// Returns the scalar advantage mean_j A_t,j [B, T] and the returns V + A [B, T, M], both 0 at
// padding, whose values are never read. Parallel over (sequence, block of quantiles); the per-token
// mean is summed over the blocks in a fixed order afterwards, so results are deterministic.

#include "common.h"
#include "kernels.h"
#include "ops.h"

namespace dvpo {
namespace cpu {

namespace {

constexpr int64_t kQuantileBlock = 256;  // quantiles per task (a sequence with more is split)

template <typename T>
struct GAEArgs {
  int64_t B, Tn, M, blocks;
  const T* rewards;  // [B, T]
  const T* values;   // [B, T, M]
  const T* mask;           // [B, T] weights (nonzero = real token), or null when
  const bool* mask_bool;  // [B, T] the mask is bool, read as it comes (math::mask_weight)
  T gamma, gamma_lam;
  T* partial;  // [B, blocks, T] sums of A over each block of quantiles
  T* returns;  // [B, T, M]
};

template <typename T, Isa>
DVPO_INLINE void gae_tasks(const GAEArgs<T>& a, T* next_v, T* next_a, int64_t begin, int64_t end) {
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / a.blocks, blk = task % a.blocks;
    const int64_t j0 = blk * kQuantileBlock, j1 = std::min(a.M, j0 + kQuantileBlock), w = j1 - j0;
    for (int64_t j = 0; j < w; ++j) next_v[j] = next_a[j] = T(0);
    T* part = a.partial + (b * a.blocks + blk) * a.Tn;
    for (int64_t t = a.Tn - 1; t >= 0; --t) {
      const int64_t bt = b * a.Tn + t;
      // padding: outputs 0, the recursion skips it, values never read
      if (math::mask_weight(a.mask, a.mask_bool, bt) == T(0)) {
        T* ret = a.returns + bt * a.M + j0;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) ret[j] = T(0);
        part[t] = T(0);
        continue;
      }
      const T r = a.rewards[bt];
      const T* v = a.values + bt * a.M + j0;
      T* ret = a.returns + bt * a.M + j0;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < w; ++j) {
        const T adv = math::gae_step<T>(r, v[j], next_v[j], next_a[j], a.gamma, a.gamma_lam);
        ret[j] = v[j] + adv;
        next_v[j] = v[j];
        next_a[j] = adv;
        s += adv;
      }
      part[t] = s;
    }
  }
}

DVPO_ISA_VARIANTS(gae_tasks_f32, (const GAEArgs<float>& a, float* nv, float* na, int64_t b, int64_t e),
                  (a, nv, na, b, e), gae_tasks, float)
DVPO_ISA_VARIANTS(gae_tasks_f64, (const GAEArgs<double>& a, double* nv, double* na, int64_t b, int64_t e),
                  (a, nv, na, b, e), gae_tasks, double)

template <typename T>
void run_gae_tasks(Isa isa, const GAEArgs<T>& args, T* nv, T* na, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, float>) {
    gae_tasks_f32(isa)(args, nv, na, begin, end);
  } else {
    gae_tasks_f64(isa)(args, nv, na, begin, end);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> distributional_gae(const at::Tensor& rewards, const at::Tensor& values,
                                                      const at::Tensor& mask, double gamma, double lam) {
  const char* op = "distributional_gae";
  check_cpu_float(values, op, "values");
  check_cpu_float(rewards, op, "rewards");
  TORCH_CHECK(values.dim() == 3, "dvpo_C::distributional_gae: values [B, T, M] expected, got ", values.sizes());
  TORCH_CHECK(rewards.dim() == 2 && rewards.size(0) == values.size(0) && rewards.size(1) == values.size(1),
              "dvpo_C::distributional_gae: rewards [B, T] expected, got ", rewards.sizes());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == values.size(0) && mask.size(1) == values.size(1),
              "dvpo_C::distributional_gae: mask [B, T] expected, got ", mask.sizes());
  TORCH_CHECK(mask.device().is_cpu(), "dvpo_C::distributional_gae: mask must be a CPU tensor");
  check_mask_dtype(mask, "distributional_gae");
  const auto acc = acc_type(values.scalar_type());
  const at::Tensor v = as_acc(values, acc), r = as_acc(rewards, acc);
  const std::optional<at::Tensor> mk = mask_arg(mask, acc);
  const int64_t B = v.size(0), Tn = v.size(1), M = v.size(2);
  // every element is written by the kernel (padding included): no zero-fill pass
  at::Tensor adv = at::empty({B, Tn}, v.options());
  at::Tensor ret = at::empty({B, Tn, M}, v.options());
  if (B == 0 || Tn == 0 || M == 0) return {adv.zero_(), ret.zero_()};
  const int64_t blocks = (M + kQuantileBlock - 1) / kQuantileBlock;
  at::Tensor partial = at::empty({B, blocks, Tn}, v.options());
  const Isa isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES(acc, "dvpo_distributional_gae_cpu", [&] {
    using T = scalar_t;
    GAEArgs<T> args{.B = B, .Tn = Tn, .M = M, .blocks = blocks, .rewards = r.data_ptr<T>(), .values = v.data_ptr<T>(),
                    .mask = mask_weights<T>(mk), .mask_bool = mask_bools(mk), .gamma = static_cast<T>(gamma),
                    .gamma_lam = static_cast<T>(gamma * lam), .partial = partial.data_ptr<T>(),
                    .returns = ret.data_ptr<T>()};
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, Tn * std::min(M, kQuantileBlock)));
    at::parallel_for(0, B * blocks, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> nv(kQuantileBlock), na(kQuantileBlock);
      run_gae_tasks<T>(isa, args, nv.data(), na.data(), begin, end);
    });
    // advantages: mean over the quantiles, the blocks summed in order
    const T* part = partial.data_ptr<T>();
    T* ap = adv.data_ptr<T>();
    const T m_count = T(M);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t t = 0; t < Tn; ++t) {
          T s = 0;
          for (int64_t blk = 0; blk < blocks; ++blk) s += part[(b * blocks + blk) * Tn + t];
          ap[b * Tn + t] = s / m_count;
        }
      }
    });
  });
  return {adv, ret};
}

}  // namespace cpu
}  // namespace dvpo
