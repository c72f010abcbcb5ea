// CUDA sorting-free CVaR (docs/math.md, "3. Sorting-free CVaR"): value[t] = sum_i c_i x_i and the
// coefficients c_i (the gradient). One warp per token: the row is staged in the warp's scratch with
// an order-preserving integer key per atom; the threshold atom of the tail is found by an exact
// bisection select over the key bits (warp-cooperative counting, no sort), and the coefficients
// follow from the threshold plus a ballot prefix count of the tied atoms (common.cuh).
#include "common.cuh"

namespace dvpo {
namespace cuda {
namespace detail {
namespace {

template <typename acc_t>
struct CvarLayout {
  size_t x, keys, bytes;
  __host__ __device__ CvarLayout(int n) {
    x = 0;
    keys = align16(sizeof(acc_t) * n);
    bytes = keys + align16(sizeof(typename KeyOf<acc_t>::type) * n);
  }
};

template <typename scalar_t, bool kShared>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    cvar_kernel(const CvarParams<scalar_t> p, const size_t per_token) {
  using acc = acc_t<scalar_t>;
  using key_t = typename KeyOf<acc>::type;
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  const int n = p.n;
  const CvarLayout<acc> lay(n);
  char* base = warp_scratch<kShared>(p.workspace, per_token);
  acc* x = reinterpret_cast<acc*>(base + lay.x);
  key_t* keys = reinterpret_cast<key_t*>(base + lay.keys);
  const acc level_n = static_cast<acc>(p.level * static_cast<double>(n));

  for (int64_t tok = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5); tok < p.tokens;
       tok += static_cast<int64_t>(gridDim.x) * warps) {
    __syncwarp();
    load_rows_mean(p.x + tok * n, 1, n, x, lane);
    __syncwarp();
    for (int e = lane; e < n; e += 32) keys[e] = order_key(x[e]);
    __syncwarp();
    Tail<acc> lo, hi;
    find_tails<acc>(keys, n, !p.upper, level_n, p.upper, level_n, lo, hi, lane);
    const Tail<acc> tail = p.upper ? hi : lo;  // a copy: a selected reference would live in local memory
    acc* coef = p.coef + tok * n;
    acc part = 0;
    for_each_coef<acc>(keys, n, tail, lane, [&](int e, acc c) {
      coef[e] = c;
      part += c * x[e];
    });
    part = warp_sum(part);
    if (lane == 0) p.value[tok] = part;
  }
}

template <typename scalar_t>
cudaError_t plan_cvar(const CvarParams<scalar_t>& p, Plan& plan) {
  return make_plan(CvarLayout<acc_t<scalar_t>>(p.n).bytes, p.tokens, plan);
}

}  // namespace
}  // namespace detail

template <typename scalar_t>
size_t cvar_workspace_bytes(const CvarParams<scalar_t>& p) {
  detail::Plan plan;
  if (p.tokens <= 0 || detail::plan_cvar(p, plan) != cudaSuccess) return 0;
  return plan.workspace;
}

template <typename scalar_t>
cudaError_t launch_cvar(const CvarParams<scalar_t>& p, cudaStream_t stream) {
  if (p.tokens <= 0) return cudaSuccess;
  if (p.n < 1 || !(p.level > 0.0 && p.level <= 1.0)) return cudaErrorInvalidValue;
  detail::Plan plan;
  cudaError_t err = detail::plan_cvar(p, plan);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(plan.blocks)), block(32 * plan.warps);
  if (plan.global) {
    if (p.workspace == nullptr) return cudaErrorInvalidValue;
    detail::cvar_kernel<scalar_t, false><<<grid, block, 0, stream>>>(p, plan.per_token);
  } else {
    err = detail::prepare_kernel(detail::cvar_kernel<scalar_t, true>, plan);
    if (err != cudaSuccess) return err;
    detail::cvar_kernel<scalar_t, true><<<grid, block, plan.smem, stream>>>(p, plan.per_token);
  }
  return cudaGetLastError();
}

#define DVPO_INSTANTIATE(T)                                                  \
  template size_t cvar_workspace_bytes<T>(const CvarParams<T>&);             \
  template cudaError_t launch_cvar<T>(const CvarParams<T>&, cudaStream_t);
DVPO_INSTANTIATE(float)
DVPO_INSTANTIATE(double)
DVPO_INSTANTIATE(__half)
DVPO_INSTANTIATE(__nv_bfloat16)
#undef DVPO_INSTANTIATE

}  // namespace cuda
}  // namespace dvpo
