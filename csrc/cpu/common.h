// Helpers shared by the C++ CPU op wrappers (the torch side): argument checks, converting inputs to
// contiguous tensors in the accumulation dtype, per-thread scratch, the algorithm option.
#pragma once

// Per-operator ATen headers only (the umbrella ATen/ATen.h triples the compile time of each file).
#ifndef TORCH_ASSERT_ONLY_METHOD_OPERATORS
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#endif
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"
#include "merge_path.h"
#include "simd.h"

namespace dvpo {
namespace cpu {

// Accumulation dtype: float64 stays float64, everything else (fp32, bf16, fp16) computes in fp32.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The kernels read contiguous rows in the accumulation dtype: fp32/fp64 contiguous inputs are used
// in place; bf16/fp16 or strided inputs are converted/copied once (O(tokens x row) extra memory,
// within the bound of docs/architecture.md, "The kernel interface"; converting a masked token's
// garbage is harmless: it is never read).
inline at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

inline std::optional<at::Tensor> as_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value()) return std::nullopt;
  return as_acc(*t, acc);
}

// A loss op's gradient in its input's dtype (dvpo/opspec.py, Out.dtype "input"). The CPU kernels
// compute in the accumulation dtype on an accumulation-dtype copy of 16-bit inputs, so a 16-bit
// gradient is rounded once here; fp32 and fp64 pass through.
inline at::Tensor grad_in_input_dtype(const at::Tensor& grad, const at::Tensor& input) {
  return grad.to(input.scalar_type());  // the same tensor when the dtypes already match
}

template <typename T>
inline const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// A per-token mask as the kernels read it (math::mask_weight): bool as it comes, contiguous (no
// conversion pass), any other dtype as weights in the accumulation dtype.
inline std::optional<at::Tensor> mask_arg(const std::optional<at::Tensor>& m, at::ScalarType acc) {
  if (!m.has_value()) return std::nullopt;
  return m->scalar_type() == at::kBool ? m->contiguous() : as_acc(*m, acc);
}

template <typename T>
inline const T* mask_weights(const std::optional<at::Tensor>& mk) {
  return mk.has_value() && mk->scalar_type() != at::kBool ? mk->data_ptr<T>() : nullptr;
}

inline const bool* mask_bools(const std::optional<at::Tensor>& mk) {
  return mk.has_value() && mk->scalar_type() == at::kBool ? mk->data_ptr<bool>() : nullptr;
}

inline void check_cpu_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dvpo_C::", op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "dvpo_C::", op, ": ", name,
              " must be floating point (fp32, fp64, bf16 or fp16), got ", t.scalar_type());
}

// The prediction ([T, N], or heads [T, H, N]: pred_dim 3) and target [T, M] of a quantile-Huber op:
// CPU floating tensors, those ranks, the same token count, every other size >= 1.
inline void check_pred_target(const at::Tensor& pred, const char* pred_name, int64_t pred_dim,
                              const at::Tensor& target, const char* op) {
  check_cpu_float(pred, op, pred_name);
  check_cpu_float(target, op, "target");
  const char* layout = pred_dim == 3 ? " [T, H, N]" : " [T, N]";
  TORCH_CHECK(pred.dim() == pred_dim && target.dim() == 2 && pred.size(0) == target.size(0), "dvpo_C::", op, ": ",
              pred_name, layout, " and target [T, M] expected, got ", pred.sizes(), " and ", target.sizes());
  bool sizes_ok = target.size(1) >= 1;
  for (int64_t d = 1; d < pred_dim; ++d) sizes_ok = sizes_ok && pred.size(d) >= 1;
  TORCH_CHECK(sizes_ok, "dvpo_C::", op, ": ", pred_dim == 3 ? "H, N" : "N", " and M must be >= 1");
}

// A mask is bool (read as it comes) or floating-point weights.
inline void check_mask_dtype(const at::Tensor& mask, const char* op) {
  TORCH_CHECK(mask.scalar_type() == at::kBool || at::isFloatingType(mask.scalar_type()), "dvpo_C::", op,
              ": mask must be bool or floating point, got ", mask.scalar_type());
}

inline void check_mask(const std::optional<at::Tensor>& mask, int64_t tokens, const char* op) {
  if (!mask.has_value()) return;
  TORCH_CHECK(mask->device().is_cpu(), "dvpo_C::", op, ": mask must be a CPU tensor");
  TORCH_CHECK(mask->dim() == 1 && mask->size(0) == tokens, "dvpo_C::", op, ": mask must have shape [",
              tokens, "] (one weight per token), got ", mask->sizes());
  check_mask_dtype(*mask, op);
}

// algorithm = "auto" | "pairwise" | "sorted".
enum class Algorithm { automatic, pairwise, sorted };

inline Algorithm parse_algorithm(c10::string_view name, const char* op) {
  if (name == "auto") return Algorithm::automatic;
  if (name == "pairwise") return Algorithm::pairwise;
  if (name == "sorted") return Algorithm::sorted;
  TORCH_CHECK(false, "dvpo_C::", op, ": algorithm must be 'auto', 'pairwise' or 'sorted', got '",
              std::string(name.data(), name.size()), "'");
  return Algorithm::automatic;
}

// Whether an op runs the sorted quantile Huber for rows of n atoms and m targets.
inline bool use_sorted(Algorithm algo, int64_t n, int64_t m) {
  return algo == Algorithm::sorted || (algo == Algorithm::automatic && kern::prefer_sorted(n, m));
}

// The quantile weights |tau - 1{u<0}| of each atom for u >= 0 (pos) and u < 0 (neg), hoisted out of
// the pair loops; `taus` is contiguous in T.
template <typename T>
struct QuantileWeightRows {
  std::vector<T> pos, neg;
  explicit QuantileWeightRows(const at::Tensor& taus) : pos(taus.numel()), neg(taus.numel()) {
    const T* t = taus.data_ptr<T>();
    for (int64_t i = 0; i < taus.numel(); ++i) {
      const math::QuantileWeights<T> w = math::quantile_weights<T>(t[i]);
      pos[i] = w.pos;
      neg[i] = w.neg;
    }
  }
};

// Tokens per parallel task: enough work per task (~64k pair-equivalents) to amortize scheduling
// and the per-task scratch allocation.
inline int64_t token_grain(int64_t work_per_token) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, work_per_token));
}

// Runs body(arena, begin, end) over [0, tokens) in parallel tasks of token_grain(work_per_token)
// tokens, each with its own scratch arena of `bytes`.
template <typename F>
inline void parallel_tokens(int64_t tokens, int64_t work_per_token, size_t bytes, const F& body);

// Per-task scratch: one allocation carved into 64-byte aligned arrays. Size it with the sum of
// Arena::bytes<U>(n) over the arrays taken.
class Arena {
 public:
  explicit Arena(size_t bytes) : buf_(bytes + 64) {}
  template <typename U>
  U* take(size_t n) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(buf_.data());
    const uintptr_t p = (base + used_ + 63) & ~uintptr_t(63);
    used_ = static_cast<size_t>(p - base) + n * sizeof(U);
    TORCH_INTERNAL_ASSERT(used_ <= buf_.size(), "dvpo_C: scratch arena too small");
    return reinterpret_cast<U*>(p);
  }
  template <typename U>
  static size_t bytes(size_t n) {
    return n * sizeof(U) + 64;
  }

 private:
  std::vector<unsigned char> buf_;
  size_t used_ = 0;
};

template <typename F>
inline void parallel_tokens(int64_t tokens, int64_t work_per_token, size_t bytes, const F& body) {
  at::parallel_for(0, tokens, token_grain(work_per_token), [&](int64_t begin, int64_t end) {
    Arena arena(bytes);
    body(arena, begin, end);
  });
}

// Scratch of the merge-path sorted quantile Huber (kern::qh_merge_sums) for rows of n atoms and m
// targets: its size, and carving it from an arena.
template <typename T>
inline size_t merge_scratch_bytes(int64_t n, int64_t m) {
  const int64_t pad = kern::merge_pad(n, m);
  const size_t targets = Arena::bytes<T>(m) + Arena::bytes<int32_t>(kern::kBucketsPerValue * m + 2) +
                         Arena::bytes<int32_t>(m) + 2 * Arena::bytes<kern::ukey_t<T>>(m) +
                         2 * Arena::bytes<double>(m + 1) + Arena::bytes<kern::key_t<T>>(m + 1);
  const size_t atoms = Arena::bytes<T>(n) + 2 * Arena::bytes<int32_t>(n) +
                       Arena::bytes<int32_t>(kern::kBucketsPerValue * n + 2) + Arena::bytes<kern::key_t<T>>(n + pad) +
                       Arena::bytes<int32_t>(3 * (n + pad)) + Arena::bytes<T>(4 * n) + Arena::bytes<double>(6 * n);
  return targets + atoms;
}

template <typename T>
inline kern::MergeScratch<T> take_merge_scratch(Arena& arena, int64_t n, int64_t m) {
  const int64_t pad = kern::merge_pad(n, m);
  kern::MergeScratch<T> s;
  s.sort.zs = arena.take<T>(m);
  s.sort.off = arena.take<int32_t>(kern::kBucketsPerValue * m + 2);
  s.sort.bi = arena.take<int32_t>(m);
  s.sort.ka = arena.take<kern::ukey_t<T>>(m);
  s.sort.kb = arena.take<kern::ukey_t<T>>(m);
  s.p1 = arena.take<double>(m + 1);
  s.p2 = arena.take<double>(m + 1);
  s.ts = arena.take<T>(n);
  s.perm = arena.take<int32_t>(n);
  s.abi = arena.take<int32_t>(n);
  s.aoff = arena.take<int32_t>(kern::kBucketsPerValue * n + 2);
  s.zk = arena.take<kern::key_t<T>>(m + 1);
  s.xk = arena.take<kern::key_t<T>>(n + pad);
  s.bnd = arena.take<int32_t>(3 * (n + pad));
  s.w = arena.take<T>(4 * n);
  s.pre = arena.take<double>(6 * n);
  return s;
}

}  // namespace cpu
}  // namespace dvpo
