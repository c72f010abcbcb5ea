// CUDA token reduction (docs/math.md, "Reductions"): per-token values [R, S] (a row per sequence,
// already 0 at masked tokens) and the optional mask to one number and its gradient, the weight of
// every token (math::reduction_weight). One block: token-mean sums with a fixed token-to-thread
// assignment, the sequence reductions one row per warp (row r on warp r mod warps); shuffle
// butterflies and a fixed-order finish by thread 0, in double: no atomics, the same bits at every
// call, one launch, no host synchronisation (an empty batch gives 0 in the kernel).
#include "common.cuh"

namespace dvpo {
namespace cuda {
namespace detail {
namespace {

constexpr int kReduceThreads = 1024;
constexpr int kReduceWarps = kReduceThreads / 32;

template <typename scalar_t>
__device__ __forceinline__ double mask_at(const ReduceTokensParams<scalar_t>& p, int64_t i) {
  return static_cast<double>(math::mask_weight(p.mask, p.mask_bool, i));
}

// Sums of a row's values (when `values`) and mask weights over the warp's lanes, on every lane.
template <typename scalar_t>
__device__ __forceinline__ void row_sums(const ReduceTokensParams<scalar_t>& p, int64_t r, int lane, bool values,
                                         double& sum, double& weight) {
  double s = 0.0, w = 0.0;
  for (int64_t c = lane; c < p.cols; c += 32) {
    const int64_t i = r * p.cols + c;
    if (values) s += static_cast<double>(to_acc(p.values[i]));
    w += mask_at(p, i);
  }
  sum = warp_sum(s);
  weight = warp_sum(w);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads) reduce_tokens_kernel(const ReduceTokensParams<scalar_t> p) {
  using acc = acc_t<scalar_t>;
  __shared__ double s_num[kReduceWarps], s_den[kReduceWarps];
  __shared__ double s_total[2];  // the numerator's and denominator's totals
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t n = p.rows * p.cols;
  double num = 0.0, den = 0.0;
  if (p.reduction == kTokenMean) {
    for (int64_t i = tid; i < n; i += kReduceThreads) {
      num += static_cast<double>(to_acc(p.values[i]));
      den += mask_at(p, i);
    }
    num = warp_sum(num);
    den = warp_sum(den);
  } else {
    for (int64_t r = warp; r < p.rows; r += kReduceWarps) {
      double rs, rw;
      row_sums(p, r, lane, true, rs, rw);
      num += math::reduction_row_value(p.reduction, rs, rw);
      den += rw > 0.0 ? 1.0 : 0.0;
    }
  }
  if (lane == 0) {
    s_num[warp] = num;
    s_den[warp] = den;
  }
  __syncthreads();
  if (tid == 0) {
    double a = 0.0, b = 0.0;
    for (int w = 0; w < kReduceWarps; ++w) {
      a += s_num[w];
      b += s_den[w];
    }
    s_total[0] = a;
    s_total[1] = b;
    *p.loss = static_cast<acc>(a / math::reduction_den(b));
  }
  __syncthreads();
  const double total_den = s_total[1];
  if (p.reduction == kTokenMean) {
    const acc g = static_cast<acc>(math::reduction_weight(p.reduction, total_den, 0.0, 0.0));
    for (int64_t i = tid; i < n; i += kReduceThreads) p.weights[i] = g;
    return;
  }
  for (int64_t r = warp; r < p.rows; r += kReduceWarps) {
    double rs, rw;
    row_sums(p, r, lane, false, rs, rw);
    const acc g = static_cast<acc>(math::reduction_weight(p.reduction, 0.0, rw, total_den));
    for (int64_t c = lane; c < p.cols; c += 32) p.weights[r * p.cols + c] = g;
  }
}

}  // namespace
}  // namespace detail

template <typename scalar_t>
size_t reduce_tokens_workspace_bytes(const ReduceTokensParams<scalar_t>&) {
  return 0;
}

template <typename scalar_t>
cudaError_t launch_reduce_tokens(const ReduceTokensParams<scalar_t>& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 0 || p.loss == nullptr) return cudaErrorInvalidValue;
  // also for an empty batch: the kernel writes its 0
  detail::reduce_tokens_kernel<scalar_t><<<1, detail::kReduceThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

DVPO_CUDA_INSTANTIATE(ReduceTokensParams, reduce_tokens_workspace_bytes, launch_reduce_tokens)

}  // namespace cuda
}  // namespace dvpo
