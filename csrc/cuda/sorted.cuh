// The sorted quantile Huber sum of one token, by one warp (algorithm="sorted"; docs/architecture.md,
// "Pair algorithms"). Torch-free.
//
// The targets are sorted once per token in the warp's scratch (sort_row, common.cuh); prefix sums of
// the centred sorted targets y = z - c and of y^2 are built in double (one fixed-order pass per lane
// over a contiguous chunk, then the 32 chunk totals added in lane order). For each atom theta (one
// lane per atom) three binary searches over the sorted targets find the boundaries of the four
// ranges of u = z - theta (u < -k, -k <= u < 0, 0 <= u <= k, u > k), tested on u itself as the
// pairwise kernel does (z - theta is monotone in z, so the ranges are contiguous), and
// math::qh_from_regions turns the ranges' counts and sums into the atom's loss and derivative sums,
// in double. O((N + M) log M) per token instead of O(N M). A token with a non-finite value runs
// pairwise, so that inf and NaN propagate exactly as in the pairwise formula.
#pragma once

#include "common.cuh"
#include "pairwise.cuh"

namespace dvpo {
namespace cuda {
namespace detail {

__device__ __forceinline__ bool finite_bits(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }
__device__ __forceinline__ bool finite_bits(double x) {
  return (static_cast<unsigned long long>(__double_as_longlong(x)) & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

// Scratch of the sorted algorithm for m targets: the sorted values, the two prefix sums (m + 1
// doubles each), the 2 x 32 lane totals, and the sort's keys and indices.
template <typename acc_t>
struct SortedQhLayout {
  size_t zs, p1, p2, tot, row, bytes;
  __host__ __device__ SortedQhLayout(int m) {
    zs = 0;
    p1 = zs + align16(sizeof(acc_t) * m);
    p2 = p1 + align16(sizeof(double) * (m + 1));
    tot = p2 + align16(sizeof(double) * (m + 1));
    row = tot + align16(sizeof(double) * 64);
    bytes = row + sorted_row_bytes<acc_t>(m);
  }
};

// #{j : pred(zs[j])} for a predicate true on a prefix of the sorted targets.
template <typename acc_t, typename Pred>
__device__ __forceinline__ int count_prefix(const acc_t* zs, int m, Pred pred) {
  int lo = 0, hi = m;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (pred(zs[mid])) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The same contract as qh_pairs (pairwise.cuh): emit(i, loss_i, dsum_i) once per atom, by one lane;
// every lane must call it. `scratch` holds SortedQhLayout<acc_t>(m).bytes.
template <typename acc_t, bool kCompact = false, typename Emit>
__device__ __forceinline__ void qh_sorted(const acc_t* th, const acc_t* __restrict__ taus, int n, const acc_t* z,
                                          int m, acc_t k, char* scratch, int lane, Emit& emit) {
  bool finite = true;
  for (int i = lane; i < n; i += 32) finite = finite && finite_bits(th[i]);
  for (int j = lane; j < m; j += 32) finite = finite && finite_bits(z[j]);
  if (__ballot_sync(kFullMask, !finite) != 0u) {
    qh_pairs<acc_t, kCompact>(th, taus, n, z, m, k, lane, emit);
    return;
  }
  const SortedQhLayout<acc_t> lay(m);
  acc_t* zs = reinterpret_cast<acc_t*>(scratch + lay.zs);
  double* p1 = reinterpret_cast<double*>(scratch + lay.p1);
  double* p2 = reinterpret_cast<double*>(scratch + lay.p2);
  double* tot = reinterpret_cast<double*>(scratch + lay.tot);
  SortedRow<acc_t> row(scratch + lay.row, m);
  sort_row(z, row, lane);
  for (int j = lane; j < m; j += 32) zs[j] = z[row.idx[j]];
  __syncwarp();
  const double c = static_cast<double>(zs[m / 2]);  // any centre; the median keeps |y| small
  const int chunk = (m + 31) / 32;
  const int lo = lane * chunk < m ? lane * chunk : m, hi = lo + chunk < m ? lo + chunk : m;
  double s1 = 0, s2 = 0;
  for (int j = lo; j < hi; ++j) {
    const double y = static_cast<double>(zs[j]) - c;
    s1 += y;
    s2 += y * y;
  }
  tot[lane] = s1;
  tot[32 + lane] = s2;
  __syncwarp();
  s1 = 0;
  s2 = 0;
  for (int l = 0; l < lane; ++l) {
    s1 += tot[l];
    s2 += tot[32 + l];
  }
  for (int j = lo; j < hi; ++j) {  // exclusive prefix sums
    p1[j] = s1;
    p2[j] = s2;
    const double y = static_cast<double>(zs[j]) - c;
    s1 += y;
    s2 += y * y;
  }
  if (lane == 31) {
    p1[m] = s1;
    p2[m] = s2;
  }
  __syncwarp();
  const double kd = static_cast<double>(k);
  for (int i = lane; i < n; i += 32) {
    const acc_t t = th[i];
    const int b1 = count_prefix(zs, m, [&](acc_t zj) { return zj - t < -k; });
    const int b2 = count_prefix(zs, m, [&](acc_t zj) { return zj - t < acc_t(0); });
    const int b3 = count_prefix(zs, m, [&](acc_t zj) { return zj - t <= k; });
    math::QHRegions<double> r;
    r.n1 = b1;
    r.s1 = p1[b1];
    r.n2 = b2 - b1;
    r.s2 = p1[b2] - p1[b1];
    r.q2 = p2[b2] - p2[b1];
    r.n3 = b3 - b2;
    r.s3 = p1[b3] - p1[b2];
    r.q3 = p2[b3] - p2[b2];
    r.n4 = m - b3;
    r.s4 = p1[m] - p1[b3];
    double loss, dsum;
    math::qh_from_regions<double>(r, static_cast<double>(t) - c, math::quantile_weights<double>(taus[i]), kd, loss,
                                  dsum);
    emit(i, static_cast<acc_t>(loss), static_cast<acc_t>(dsum));
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace dvpo
