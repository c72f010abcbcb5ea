// CUDA quantile Huber loss (docs/math.md, "1-2. Quantile Huber and its risk-weighted form"):
// per-token loss and, in the same pass, the gradient w.r.t. pred. One warp per token: pred and
// target rows staged in the warp's scratch (converted to acc_t, 16-byte vector loads when aligned),
// the N x M pairs by qh_pairs (pairwise.cuh), the token's loss by a shuffle reduction. No atomics;
// never an [N, M] buffer. With `sorted` (algorithm="sorted") the atoms' sums come from qh_sorted
// (sorted.cuh) instead: both rows sorted, then merges in O(N + M) per token.
#include "common.cuh"
#include "pairwise.cuh"
#include "sorted.cuh"

namespace dvpo {
namespace cuda {
namespace detail {
namespace {

template <typename acc_t>
struct QhLayout {
  size_t th, z, srt, bytes;
  __host__ __device__ QhLayout(int n, int m, bool sorted) {
    th = 0;
    z = align16(sizeof(acc_t) * n);
    srt = z + align16(sizeof(acc_t) * m);
    bytes = srt + (sorted ? SortedQhLayout<acc_t>(n, m, true).bytes : 0);
  }
};

// The op for launch_warp_op (common.cuh).
struct QuantileHuberOp {
  template <typename scalar_t>
  static size_t scratch_bytes(const QuantileHuberParams<scalar_t>& p) {
    return QhLayout<acc_t<scalar_t>>(p.n, p.m, p.sorted).bytes;
  }
  template <typename scalar_t>
  static bool valid(const QuantileHuberParams<scalar_t>& p) {
    return p.n >= 1 && p.m >= 1;
  }
  static constexpr bool kHasSorted = true;
  template <bool kShared, bool kSorted, typename scalar_t>
  static __device__ __forceinline__ void run(const QuantileHuberParams<scalar_t>& p, size_t per_token);
};

template <bool kShared, bool kSorted, typename scalar_t>
__device__ __forceinline__ void QuantileHuberOp::run(const QuantileHuberParams<scalar_t>& p, const size_t per_token) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  const QhLayout<acc> lay(p.n, p.m, p.sorted);
  char* base = warp_scratch<kShared>(p.workspace, per_token);
  acc* th = reinterpret_cast<acc*>(base + lay.th);
  acc* z = reinterpret_cast<acc*>(base + lay.z);
  const int n = p.n, m = p.m;
  const acc k = static_cast<acc>(p.kappa);
  const acc scale = math::qh_scale<acc>(n, m, k, p.normalize_kappa);

  for (int64_t tok = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5); tok < p.tokens;
       tok += static_cast<int64_t>(gridDim.x) * warps) {
    scalar_t* grad = p.grad + tok * n;
    const acc mw = math::mask_weight(p.mask, p.mask_bool, tok);
    if (mw == acc(0)) {  // masked: outputs exactly 0, inputs never read
      for (int i = lane; i < n; i += 32) grad[i] = from_acc<scalar_t>(acc(0));
      if (lane == 0) p.loss[tok] = acc(0);
      continue;
    }
    __syncwarp();  // the previous token's readers are done with the scratch
    load_rows_mean(p.pred + tok * n, 1, n, th, lane);
    load_rows_mean(p.target + tok * m, 1, m, z, lane);
    __syncwarp();
    const acc* w = p.weights;
    acc part = 0;
    auto emit = [&](int i, acc loss_i, acc dsum_i) {
      const acc wi = w ? w[i] : acc(1);
      part += wi * loss_i;
      grad[i] = from_acc<scalar_t>(mw * (-scale * wi * dsum_i));
    };
    if (kSorted)
      qh_sorted<acc, !kShared>(th, p.taus, n, z, m, k, base + lay.srt, nullptr, lane, emit);
    else
      qh_pairs<acc, !kShared>(th, p.taus, n, z, m, k, lane, emit);
    part = warp_sum(part);
    if (lane == 0) p.loss[tok] = mw * (part * scale);
  }
}

}  // namespace
}  // namespace detail

DVPO_CUDA_WARP_OP(QuantileHuberOp, QuantileHuberParams, quantile_huber_workspace_bytes, launch_quantile_huber)

}  // namespace cuda
}  // namespace dvpo
