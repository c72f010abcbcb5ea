// CUDA CVaR (docs/math.md, "3. Sorting-free CVaR"): value[t] = sum_i c_i x_i and the coefficients
// c_i (the gradient). One warp per token: the row is staged in the warp's scratch and sorted by
// (value, index) there (common.cuh, sort_row), which gives the tail's threshold atom and its tie
// group in one read and two binary searches; the value sums the tail's own atoms, and the dense
// coefficients follow from the threshold plus a ballot prefix count of the tied atoms.
#include "common.cuh"

namespace dvpo {
namespace cuda {
namespace detail {
namespace {

template <typename acc_t>
struct CvarLayout {
  size_t x, sorted, bytes;
  __host__ __device__ CvarLayout(int n) {
    x = 0;
    sorted = align16(sizeof(acc_t) * n);
    bytes = sorted + sorted_row_bytes<acc_t>(n);
  }
};

// The op for launch_warp_op (common.cuh).
struct CvarOp {
  template <typename scalar_t>
  static size_t scratch_bytes(const CvarParams<scalar_t>& p) {
    return CvarLayout<acc_t<scalar_t>>(p.n).bytes;
  }
  template <typename scalar_t>
  static bool valid(const CvarParams<scalar_t>& p) {
    return p.n >= 1 && p.level > 0.0 && p.level <= 1.0;
  }
  static constexpr bool kHasSorted = false;
  template <bool kShared, bool kSorted, typename scalar_t>
  static __device__ __forceinline__ void run(const CvarParams<scalar_t>& p, size_t per_token);
};

template <bool kShared, bool kSorted, typename scalar_t>
__device__ __forceinline__ void CvarOp::run(const CvarParams<scalar_t>& p, const size_t per_token) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  const int n = p.n;
  const CvarLayout<acc> lay(n);
  char* base = warp_scratch<kShared>(p.workspace, per_token);
  acc* x = reinterpret_cast<acc*>(base + lay.x);
  SortedRow<acc> row(base + lay.sorted, n);
  const acc level_n = static_cast<acc>(p.level * static_cast<double>(n));

  for (int64_t tok = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5); tok < p.tokens;
       tok += static_cast<int64_t>(gridDim.x) * warps) {
    __syncwarp();  // the previous token's readers are done with the scratch
    load_rows_mean(p.x + tok * n, 1, n, x, lane);
    __syncwarp();
    sort_row(x, row, lane);
    const Tail<acc> tail = sorted_tail(row, level_n, p.upper);
    const TailStats<acc> st = tail_stats(x, row, tail, false, false, lane);
    scalar_t* coef = p.coef + tok * n;
    for_each_coef<acc>(x, n, tail, lane, [&](int e, acc c) { coef[e] = from_acc<scalar_t>(c); });
    if (lane == 0) p.value[tok] = st.value;
  }
}

}  // namespace
}  // namespace detail

DVPO_CUDA_WARP_OP(CvarOp, CvarParams, cvar_workspace_bytes, launch_cvar)

}  // namespace cuda
}  // namespace dvpo
