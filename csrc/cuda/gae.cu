// CUDA distributional GAE (docs/math.md, "11. Distributional GAE"): per quantile j, the reversed
// recursion
//   delta_t = r_t + gamma V_next - V_t,  A_t = delta_t + gamma lam A_next
// over the real tokens of each row (padding skipped: the recursion links consecutive real tokens;
// after the last real token V_next = A_next = 0); returns R = V + A and adv_t = mean_j A_t,j, both 0
// at padding.
//
// Parallel over (batch row, quantile) and over time: a block owns one row b and a tile of 32
// quantiles (lane = quantile) and splits the row's T steps into W <= 32 contiguous chunks, one warp
// each. The recursion is affine in the carry (V_next, A_next) entering a chunk, so:
//   pass 1  each warp scans its chunk backwards with a zero carry and keeps its summary: whether the
//           chunk has a real token, the V of its first real token, that token's A, and gamma lam
//           to the power (#real tokens - 1);
//   combine warp 0 walks the W summaries right to left (per lane) to get every chunk's exact carry;
//   pass 2  each warp rescans its chunk from its carry with the reference's recursion and writes R,
//           and the sum over the tile's quantiles of A_t (a shuffle butterfly) for the mean.
// A second kernel adds the per-tile sums of each (b, t) in tile order and divides by M. Loads are
// batched 8 (fp64: 4) steps ahead of the recursion. No atomics: bitwise deterministic.
#include "common.cuh"

namespace dvpo {
namespace cuda {
namespace detail {
namespace {

constexpr int kMaxChunks = 32;
// Steps whose loads are issued ahead of the recursion (fewer for fp64: 1024-thread blocks leave
// 64 registers a thread).
template <typename acc>
struct Unroll {
  static constexpr int value = sizeof(acc) == 8 ? 4 : 8;
};

inline int gae_tiles(int m) { return (m + 31) / 32; }
inline int gae_chunks(int64_t length) {
  const int64_t c = (length + 31) / 32;  // chunks of >= 32 steps
  return static_cast<int>(c < 1 ? 1 : (c > kMaxChunks ? kMaxChunks : c));
}

template <typename scalar_t>
__global__ void __launch_bounds__(32 * kMaxChunks)
    gae_scan_kernel(const GaeParams<scalar_t> p, const int tiles, const int64_t chunk_len, acc_t<scalar_t>* partial) {
  using acc = acc_t<scalar_t>;
  constexpr int kUnroll = Unroll<acc>::value;
  __shared__ acc s_v[kMaxChunks][32], s_a[kMaxChunks][32], s_pw[kMaxChunks][32];
  __shared__ acc s_cv[kMaxChunks][32], s_ca[kMaxChunks][32];
  __shared__ int s_has[kMaxChunks];

  const int lane = threadIdx.x & 31;
  const int chunk = threadIdx.x >> 5;
  const int chunks = blockDim.x >> 5;
  const int64_t b = blockIdx.x / tiles;
  const int tile = static_cast<int>(blockIdx.x % tiles);
  const int j = tile * 32 + lane;
  const bool valid = j < p.m;
  const int64_t T = p.length, M = p.m;
  const int64_t t_begin = chunk * chunk_len;
  const int64_t t_end = t_begin + chunk_len < T ? t_begin + chunk_len : T;
  const acc gamma = static_cast<acc>(p.gamma);
  const acc gl = static_cast<acc>(p.gamma * p.lam);
  const acc* rew = p.rewards + b * T;
  const acc* msk = p.mask ? p.mask + b * T : nullptr;
  const bool* mskb = p.mask_bool ? p.mask_bool + b * T : nullptr;
  const scalar_t* val = p.values + b * T * M + (valid ? j : 0);

  // Loads of steps t, t-1, ..., t-kUnroll+1 (those >= t_begin), issued before any use.
  auto load = [&](int64_t t, acc (&mk)[kUnroll], acc (&r)[kUnroll], acc (&v)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t s = t - u;
      const bool in = s >= t_begin;
      mk[u] = in ? math::mask_weight(msk, mskb, s) : acc(0);
      r[u] = in ? rew[s] : acc(0);
      v[u] = (in && valid) ? to_acc(val[s * M]) : acc(0);
    }
  };

  // ---- pass 1: summary of the chunk with a zero carry.
  bool have = false;
  acc nv = 0, a = 0, pw = 1;
  for (int64_t t = t_end - 1; t >= t_begin; t -= kUnroll) {
    acc mk[kUnroll], r[kUnroll], v[kUnroll];
    load(t, mk, r, v);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (mk[u] != acc(0)) {  // uniform across the warp (same b, t); padding steps load mk = 0
        if (have) {
          a = r[u] + gamma * nv - v[u] + gl * a;
          pw *= gl;
        } else {
          a = r[u] - v[u];
          pw = acc(1);
          have = true;
        }
        nv = v[u];
      }
    }
  }
  s_v[chunk][lane] = nv;
  s_a[chunk][lane] = a;
  s_pw[chunk][lane] = pw;
  if (lane == 0) s_has[chunk] = have;
  __syncthreads();

  // ---- combine: carry (V_next, A_next) into every chunk, right to left.
  if (chunk == 0) {
    acc cv = 0, ca = 0;
    for (int c = chunks - 1; c >= 0; --c) {
      s_cv[c][lane] = cv;
      s_ca[c][lane] = ca;
      if (s_has[c]) {
        ca = s_a[c][lane] + s_pw[c][lane] * (gamma * cv + gl * ca);
        cv = s_v[c][lane];
      }
    }
  }
  __syncthreads();

  // ---- pass 2: the exact recursion from the carry; R = V + A, and the tile's sum of A per step.
  nv = s_cv[chunk][lane];
  acc na = s_ca[chunk][lane];
  acc* ret = p.ret + b * T * M + (valid ? j : 0);
  acc* part = partial + b * T * tiles + tile;
  for (int64_t t = t_end - 1; t >= t_begin; t -= kUnroll) {
    acc mk[kUnroll], r[kUnroll], v[kUnroll], out[kUnroll];
    load(t, mk, r, v);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      out[u] = acc(0);
      if (mk[u] != acc(0)) {
        const acc delta = r[u] + gamma * nv - v[u];
        na = delta + gl * na;
        nv = v[u];
        out[u] = valid ? na : acc(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t s = t - u;
      if (s >= t_begin) {
        if (valid) ret[s * M] = mk[u] != acc(0) ? v[u] + out[u] : acc(0);
        const acc sum = warp_sum(out[u]);
        if (lane == 0) part[s * tiles] = sum;
      }
    }
  }
}

// adv[b, t] = (sum over tiles of the partial sums, in tile order) / M, 0 at padding.
template <typename acc>
__global__ void gae_mean_kernel(const acc* __restrict__ partial, const acc* __restrict__ mask,
                                const bool* __restrict__ mask_bool, acc* __restrict__ adv, int64_t rows, int tiles,
                                int m) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= rows) return;
  const bool real = math::mask_weight(mask, mask_bool, q) != acc(0);
  acc s = 0;
  if (real)
    for (int t = 0; t < tiles; ++t) s += partial[q * tiles + t];
  adv[q] = real ? s / acc(m) : acc(0);
}

}  // namespace
}  // namespace detail

template <typename scalar_t>
size_t gae_workspace_bytes(const GaeParams<scalar_t>& p) {
  if (p.batch <= 0 || p.length <= 0 || p.m <= 0) return 0;
  return static_cast<size_t>(p.batch) * p.length * detail::gae_tiles(p.m) * sizeof(acc_t<scalar_t>);
}

template <typename scalar_t>
cudaError_t launch_distributional_gae(const GaeParams<scalar_t>& p, cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  if (p.batch <= 0 || p.length <= 0 || p.m <= 0) return cudaSuccess;
  if (p.workspace == nullptr) return cudaErrorInvalidValue;
  const int tiles = detail::gae_tiles(p.m);
  const int chunks = detail::gae_chunks(p.length);
  const int64_t chunk_len = (p.length + chunks - 1) / chunks;
  acc* partial = static_cast<acc*>(p.workspace);
  const int64_t blocks = p.batch * tiles;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  detail::gae_scan_kernel<scalar_t><<<static_cast<unsigned>(blocks), 32 * chunks, 0, stream>>>(p, tiles, chunk_len,
                                                                                             partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t rows = p.batch * p.length;
  const int threads = 256;
  const int64_t mean_blocks = (rows + threads - 1) / threads;
  if (mean_blocks > 0x7fffffff) return cudaErrorInvalidValue;
  detail::gae_mean_kernel<acc><<<static_cast<unsigned>(mean_blocks), threads, 0, stream>>>(
      partial, p.mask, p.mask_bool, p.adv, rows, tiles, p.m);
  return cudaGetLastError();
}

DVPO_CUDA_INSTANTIATE(GaeParams, gae_workspace_bytes, launch_distributional_gae)

}  // namespace cuda
}  // namespace dvpo
