// The sorted quantile Huber sum of one token, by one warp (algorithm="sorted"; docs/architecture.md,
// "Pair algorithms"). Torch-free.
//
// Both rows are sorted once per token in the warp's scratch (sort_row, common.cuh): the targets,
// whose prefix sums of y = z - c and y^2 are then built in double (one fixed-order pass per lane over
// a contiguous chunk, then the 32 chunk totals added in lane order), and the atoms theta (the critic
// loss hands over the row it sorts for its tails anyway). The boundaries of the four ranges of
// u = z - theta (u < -k, -k <= u < 0, 0 <= u <= k, u > k), tested on u itself as the pairwise kernel
// does, are ascending in the sorted atom order, so each of the three boundary rows is one merge of
// the two sorted rows, cut into 32 equal pieces along its diagonals (merge path: one binary search
// per lane, then (N + M) / 32 steps) instead of a binary search per atom. math::qh_from_regions turns
// the ranges' counts and sums into each atom's loss and derivative sums, in double. A token with a
// non-finite value runs pairwise, so that inf and NaN propagate exactly as in the pairwise formula.
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

// Scratch of the sorted algorithm for n atoms and m targets: the sorted targets, the two prefix
// sums (m + 1 doubles each), the 2 x 32 lane totals, the targets' sort, the atoms' sort (unless the
// caller brings the atoms sorted) and the three boundary rows.
template <typename acc_t>
struct SortedQhLayout {
  size_t zs, p1, p2, tot, row, atoms, bnd, bytes;
  __host__ __device__ SortedQhLayout(int n, int m, bool own_atom_sort) {
    zs = 0;
    p1 = zs + align16(sizeof(acc_t) * m);
    p2 = p1 + align16(sizeof(double) * (m + 1));
    tot = p2 + align16(sizeof(double) * (m + 1));
    row = tot + align16(sizeof(double) * 64);
    atoms = row + sorted_row_bytes<acc_t>(m);
    bnd = atoms + (own_atom_sort ? sorted_row_bytes<acc_t>(n) : 0);
    bytes = bnd + align16(sizeof(int) * 3 * static_cast<size_t>(n));
  }
};

// b[p] = #{j : pred(zs[j], t_p)} for every atom p of the ascending order t_p = th[idx[p]], where
// pred(z, t) holds on a prefix of the ascending targets, a longer one for a larger t (fl(z - t) is
// monotone in both), so the counts are those of a binary search per atom. They are the steps of the
// merge of the two rows in which target j comes before atom p iff pred(zs[j], t_p): lane l takes the
// steps [l L, (l + 1) L) of the N + M, finds where the merge stands at its first step by a binary
// search along that diagonal, then walks: each step passes a target or records an atom's count, so
// every atom is recorded by exactly one lane. Lanes must __syncwarp before reading b.
template <typename acc_t, typename Pred>
__device__ __forceinline__ void merge_counts(const acc_t* th, const int* idx, int n, const acc_t* zs, int m,
                                             Pred pred, int* b, int lane) {
  const int steps = n + m, len = (steps + 31) / 32;
  const int d0 = lane * len < steps ? lane * len : steps, d1 = d0 + len < steps ? d0 + len : steps;
  // The targets passed before step d0: the largest j in [max(0, d0 - n), min(d0, m)] whose target
  // j - 1 comes before atom d0 - j (true at the lower end: j = 0, or all n atoms recorded).
  int lo = d0 > n ? d0 - n : 0, hi = d0 < m ? d0 : m;
  while (lo < hi) {
    const int j = (lo + hi + 1) >> 1;
    if (pred(zs[j - 1], th[idx[d0 - j]])) lo = j; else hi = j - 1;
  }
  int j = lo, p = d0 - lo;
  acc_t t = p < n ? th[idx[p]] : acc_t(0);
  for (int d = d0; d < d1 && p < n; ++d) {
    if (j < m && pred(zs[j], t)) {
      ++j;
    } else {
      b[p] = j;
      if (++p < n) t = th[idx[p]];
    }
  }
}

// The same contract as qh_pairs (pairwise.cuh): emit(i, loss_i, dsum_i) once per atom, by one lane;
// every lane must call it. `scratch` holds SortedQhLayout<acc_t>(n, m, atoms == nullptr).bytes;
// `atoms`, when given, is th already sorted by sort_row.
template <typename acc_t, bool kCompact = false, typename Emit>
__device__ __forceinline__ void qh_sorted(const acc_t* th, const acc_t* __restrict__ taus, int n, const acc_t* z,
                                          int m, acc_t k, char* scratch, const SortedRow<acc_t>* atoms, int lane,
                                          Emit& emit) {
  bool finite = true;
  for (int i = lane; i < n; i += 32) finite = finite && finite_bits(th[i]);
  for (int j = lane; j < m; j += 32) finite = finite && finite_bits(z[j]);
  if (__ballot_sync(kFullMask, !finite) != 0u) {
    qh_pairs<acc_t, kCompact>(th, taus, n, z, m, k, lane, emit);
    return;
  }
  const SortedQhLayout<acc_t> lay(n, m, atoms == nullptr);
  acc_t* zs = reinterpret_cast<acc_t*>(scratch + lay.zs);
  double* p1 = reinterpret_cast<double*>(scratch + lay.p1);
  double* p2 = reinterpret_cast<double*>(scratch + lay.p2);
  double* tot = reinterpret_cast<double*>(scratch + lay.tot);
  int* bnd = reinterpret_cast<int*>(scratch + lay.bnd);
  SortedRow<acc_t> row(scratch + lay.row, m);
  sort_row(z, row, lane);
  for (int j = lane; j < m; j += 32) zs[j] = z[row.idx[j]];
  SortedRow<acc_t> own(scratch + lay.atoms, n);
  if (atoms == nullptr) {
    sort_row(th, own, lane);  // ends with __syncwarp: zs is complete too
    atoms = &own;
  } else {
    __syncwarp();
  }
  const int* idx = atoms->idx;
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
  // b1 = #{u < -k}, b2 = #{u < 0}, b3 = #{u <= k}, u = z - theta
  merge_counts(th, idx, n, zs, m, [k](acc_t zj, acc_t t) { return zj - t < -k; }, bnd, lane);
  merge_counts(th, idx, n, zs, m, [](acc_t zj, acc_t t) { return zj - t < acc_t(0); }, bnd + n, lane);
  merge_counts(th, idx, n, zs, m, [k](acc_t zj, acc_t t) { return zj - t <= k; }, bnd + 2 * n, lane);
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
  for (int q = lane; q < n; q += 32) {  // sorted position q holds atom i
    const int i = idx[q];
    const int b1 = bnd[q], b2 = bnd[n + q], b3 = bnd[2 * n + q];
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
    math::qh_from_regions<double>(r, static_cast<double>(th[i]) - c, math::quantile_weights<double>(taus[i]), kd,
                                  loss, dsum);
    emit(i, static_cast<acc_t>(loss), static_cast<acc_t>(dsum));
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace dvpo
