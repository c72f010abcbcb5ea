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

template <typename T>
inline const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

inline void check_cpu_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dvpo_C::", op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "dvpo_C::", op, ": ", name,
              " must be floating point (fp32, fp64, bf16 or fp16), got ", t.scalar_type());
}

inline void check_mask(const std::optional<at::Tensor>& mask, int64_t tokens, const char* op) {
  if (!mask.has_value()) return;
  TORCH_CHECK(mask->device().is_cpu(), "dvpo_C::", op, ": mask must be a CPU tensor");
  TORCH_CHECK(mask->dim() == 1 && mask->size(0) == tokens, "dvpo_C::", op, ": mask must have shape [",
              tokens, "] (one weight per token), got ", mask->sizes());
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

// Tokens per parallel task: enough work per task (~64k pair-equivalents) to amortize scheduling
// and the per-task scratch allocation.
inline int64_t token_grain(int64_t work_per_token) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, work_per_token));
}

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

// Scratch of kern::sort_targets for rows of m targets: its size, and carving it from an arena.
template <typename T>
inline size_t sort_scratch_bytes(int64_t m) {
  return Arena::bytes<T>(m + kern::kWindow) + 3 * Arena::bytes<int32_t>(m + 2) +
         2 * Arena::bytes<kern::ukey_t<T>>(m);
}

template <typename T>
inline kern::SortScratch<T> take_sort_scratch(Arena& arena, int64_t m) {
  kern::SortScratch<T> s;
  s.zs = arena.take<T>(m + kern::kWindow);
  s.off = arena.take<int32_t>(m + 2);
  s.pos = arena.take<int32_t>(m + 2);
  s.bi = arena.take<int32_t>(m + 2);
  s.ka = arena.take<kern::ukey_t<T>>(m);
  s.kb = arena.take<kern::ukey_t<T>>(m);
  return s;
}

}  // namespace cpu
}  // namespace dvpo
