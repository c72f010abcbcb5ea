// The sorted quantile Huber by merge paths (algorithm="sorted" on the CPU). Torch-free.
//
// Per token, both sides are sorted once: the targets (detached; kern::sort_targets) and the atoms
// theta, carrying their original index (sort_atoms, stable: equal atoms keep index order, the
// reference's tie-break, so the same order also gives the CVaR ranks). The region boundaries of
// every atom, b1 = #{z < theta - k}, b2 = #{z < theta}, b3 = #{z <= theta + k}, are then ascending
// in the sorted atom order, so each of the three is one merge of two sorted rows (merge_counts)
// instead of N searches. The region counts and sums come from prefix sums of the sorted targets in
// double (kern::prefix_sums) and math::qh_from_regions, vectorized over the atoms.
//
// A merge is a walk whose every step either passes a target (z below the query) or records the
// count for the next query: N + M data-dependent steps, written without branches (a branch there
// mispredicts about once per query). One walk is a chain of dependent loads, so each merge is cut
// into kChains independent walks that run in lockstep (the merge-path partition: each walk starts
// at a binary-searched position); 2 to 8 walks measured within noise of each other (the steps'
// instruction count, not their latency, bounds it then).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels.h"

namespace dvpo {
namespace cpu {
namespace kern {

// The order key of x (as order_keys: zeros merged), by value so that loops over it vectorize.
template <typename T>
DVPO_INLINE key_t<T> query_key(T x) {
  using K = key_t<T>;
  constexpr int shift = sizeof(K) * 8 - 1;
  const T v = x + T(0);
  K b;
  std::memcpy(&b, &v, sizeof(b));
  return b ^ static_cast<K>((b >> shift) & std::numeric_limits<K>::max());
}

// Scratch of the merge-path sums for rows of n atoms and m targets (merge_scratch_bytes).
template <typename T>
struct MergeScratch {
  SortScratch<T> sort;  // the sorted targets and their sort's scratch
  double* p1;           // [m + 1] prefix sums of the sorted targets
  double* p2;           // [m + 1]
  T* ts;                // [n] sorted atoms
  int32_t* perm;        // [n] original index of each sorted atom
  int32_t* abi;         // [n] bucket of each atom (sort)
  int32_t* aoff;        // [kBucketsPerValue n + 2] bucket offsets (sort)
  key_t<T>* zk;         // [m + 1] order keys of the sorted targets
  key_t<T>* xk;         // [n + merge_pad(n, m)] order keys of one merge's queries
  int32_t* bnd;         // [3 (n + merge_pad(n, m))] b1, b2, b3 in sorted order
  T* w;                 // [4 n] wpos, wneg in sorted order; L, D in sorted order
  double* pre;          // [6 n] prefix sums gathered at the boundaries
};

// Sorts the n finite atoms x ascending into s.ts with their indices in s.perm, stably (bucket sort,
// or a comparison sort by (value, index) when the row is short or clustered).
template <typename T>
DVPO_INLINE void sort_atoms(const T* x, int64_t n, const MergeScratch<T>& s) {
  T* ts = s.ts;
  int32_t* perm = s.perm;
  if (bucket_offsets<T>(x, n, s.abi, s.aoff)) {
    for (int64_t i = 0; i < n; ++i) {  // scatter in index order: stable
      const int32_t p = s.aoff[s.abi[i]]++;
      ts[p] = x[i] + T(0);
      perm[p] = static_cast<int32_t>(i);
    }
    insertion_sort<T>(ts, perm, n);
  } else {
    for (int64_t i = 0; i < n; ++i) perm[i] = static_cast<int32_t>(i);
    std::sort(perm, perm + n, [x](int32_t a, int32_t b) {
      const T xa = x[a] + T(0), xb = x[b] + T(0);
      return xa < xb || (xa == xb && a < b);
    });
    for (int64_t i = 0; i < n; ++i) ts[i] = x[perm[i]] + T(0);
  }
}

// Number of keys in zk[0..m) below x, by branchless binary search.
template <typename K>
DVPO_INLINE int32_t count_below(const K* zk, int32_t m, K x) {
  const K* a = zk;
  int32_t len = m;
  while (len > 1) {
    const int32_t half = len / 2;
    a += half * static_cast<int32_t>(a[half - 1] < x);
    len -= half;
  }
  return static_cast<int32_t>(a - zk) + static_cast<int32_t>(*a < x);
}

constexpr int kChains = 4;

// Query and count rows of a merge carry this many slots past the n real ones (merge_counts).
inline int64_t merge_pad(int64_t n, int64_t m) { return n + m + 2; }

// b[i] = #{zk < xk[i]} for the n ascending query keys xk, from the m ascending target keys zk
// (order keys: integer compares). zk[m] and xk[n .. n + merge_pad) must hold the largest key, and
// b has n + merge_pad slots. kChains walks run in lockstep, walk c starting at query c n / kChains
// with its count found by binary search. A step stores the walk's current count at its query
// (the last store at a query, made when the walk moves past it, is the final count) and then
// either passes a target or moves to the next query. A walk that has finished its share carries
// on into the next one's, computing the same counts again, so all run the same number of steps,
// the longest share's, without bounds checks (past the last query they run into the padding).
// Only the query a walk stands on when the steps run out can be left with a partial count; it is
// recounted when it lies in a later share.
template <typename K>
DVPO_INLINE void merge_counts(const K* zk, int64_t m, const K* xk, int64_t n, int32_t* b) {
  int64_t i[kChains], j[kChains], start[kChains + 1], jstart[kChains + 1];
  const int32_t m32 = static_cast<int32_t>(m);
  for (int c = 0; c < kChains; ++c) {
    start[c] = static_cast<int64_t>(c) * n / kChains;
    jstart[c] = start[c] < n ? count_below<K>(zk, m32, xk[start[c]]) : m;
  }
  start[kChains] = n;
  jstart[kChains] = m;
  int64_t steps = 0;
  for (int c = 0; c < kChains; ++c) {
    i[c] = start[c];
    j[c] = jstart[c];
    steps = std::max(steps, (start[c + 1] - start[c]) + (jstart[c + 1] - jstart[c]));
  }
  for (int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 8
    for (int c = 0; c < kChains; ++c) {
      const int64_t pass = static_cast<int64_t>(zk[j[c]] < xk[i[c]]);
      b[i[c]] = static_cast<int32_t>(j[c]);
      j[c] += pass;
      i[c] += 1 - pass;
    }
  }
  for (int c = 0; c + 1 < kChains; ++c) {
    if (i[c] >= start[c + 1] && i[c] < n) b[i[c]] = count_below<K>(zk, m32, xk[i[c]]);
  }
}

// For i in [0, n): L[i], D[i] as qh_pairwise_sums, for the n finite atoms theta and m finite
// targets z: both rows sorted (sort_targets, sort_atoms), prefix sums of the sorted targets about
// their middle value in double (prefix_sums), the three boundary rows by merge_counts on order keys
// (exact, and integer compares are cheaper), then the sums in sorted atom order (vectorized) and
// scattered back. Returns the sorted targets; the sorted atoms are in s.ts / s.perm.
template <typename T>
DVPO_INLINE const T* qh_merge_sums(const T* theta, int64_t n, const T* z, int64_t m, const T* wpos,
                                   const T* wneg, T k, const MergeScratch<T>& s, T* L, T* D) {
  using K = key_t<T>;
  constexpr K kTop = std::numeric_limits<K>::max();
  const T* zs = sort_targets<T>(z, m, s.sort);
  const double centre = prefix_sums(zs, m, s.p1, s.p2);
  sort_atoms<T>(theta, n, s);
  const T* ts = s.ts;
  const int64_t pad = merge_pad(n, m);
  int32_t* b1 = s.bnd;
  int32_t* b2 = s.bnd + (n + pad);
  int32_t* b3 = s.bnd + 2 * (n + pad);
  K* zk = s.zk;
  K* xk = s.xk;
  order_keys<T>(zs, m, zk);
  zk[m] = kTop;
  for (int64_t i = n; i < n + pad; ++i) xk[i] = kTop;
  // b1 = #{z < theta - k}
  for (int64_t i = 0; i < n; ++i) xk[i] = query_key<T>(ts[i] - k);
  merge_counts<K>(zk, m, xk, n, b1);
  // b2 = #{z < theta}
  order_keys<T>(ts, n, xk);
  merge_counts<K>(zk, m, xk, n, b2);
  // b3 = #{z <= theta + k} = #{key(z) < key(theta + k) + 1}
  for (int64_t i = 0; i < n; ++i) xk[i] = query_key<T>(ts[i] + k) + 1;
  merge_counts<K>(zk, m, xk, n, b3);
  T* ws_pos = s.w;
  T* ws_neg = s.w + n;
  T* Ls = s.w + 2 * n;
  T* Ds = s.w + 3 * n;
  double* pre = s.pre;
  const double* p1 = s.p1;
  const double* p2 = s.p2;
  for (int64_t i = 0; i < n; ++i) {  // gathers (scalar: no gather instructions on most targets)
    const int32_t p = s.perm[i];
    ws_pos[i] = wpos[p];
    ws_neg[i] = wneg[p];
    pre[i] = p1[b1[i]];
    pre[n + i] = p1[b2[i]];
    pre[2 * n + i] = p1[b3[i]];
    pre[3 * n + i] = p2[b1[i]];
    pre[4 * n + i] = p2[b2[i]];
    pre[5 * n + i] = p2[b3[i]];
  }
  qh_regions_to_sums<T>(ts, n, b1, b2, b3, pre, m, p1[0], p1[m], centre, ws_pos, ws_neg, k, Ls, Ds);
  for (int64_t i = 0; i < n; ++i) {
    L[s.perm[i]] = Ls[i];
    D[s.perm[i]] = Ds[i];
  }
  return zs;
}

// CVaR coefficients c[0..n) of the atoms of one tail from their stable ascending order (ts, perm:
// sort_atoms), the same as tail selection gives (math::cvar_rank's index tie-break): the lower
// tail's rank of the atom at sorted position p is p; the upper tail's is (n - g1) + (p - g0) for
// the run [g0, g1) of equal atoms holding p (ties are ranked by index from the top too). Only the
// `count` = math::cvar_tail_count lowest ranks are non-zero.
template <typename T>
DVPO_INLINE void sorted_tail_coefficients(const T* ts, const int32_t* perm, int64_t n, int64_t count,
                                          T level_n, bool upper, T* c) {
  for (int64_t i = 0; i < n; ++i) c[i] = T(0);
  if (!upper) {
    for (int64_t p = 0; p < count; ++p) c[perm[p]] = math::cvar_coef<T>(static_cast<int>(p), level_n);
    return;
  }
  for (int64_t g1 = n; g1 > 0 && n - g1 < count;) {
    int64_t g0 = g1 - 1;
    while (g0 > 0 && ts[g0 - 1] == ts[g1 - 1]) --g0;
    for (int64_t p = g0; p < g1; ++p) {
      const int64_t r = (n - g1) + (p - g0);
      if (r < count) c[perm[p]] = math::cvar_coef<T>(static_cast<int>(r), level_n);
    }
    g1 = g0;
  }
}

// The value of the atom with tail rank count - 1 (the VaR of the consistent tail terms) from the
// sorted atoms.
template <typename T>
DVPO_INLINE T sorted_tail_var(const T* ts, int64_t n, int64_t count, bool upper) {
  return upper ? ts[n - count] : ts[count - 1];
}

}  // namespace kern
}  // namespace cpu
}  // namespace dvpo
