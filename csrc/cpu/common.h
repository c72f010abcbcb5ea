// Helpers shared by the C++ CPU kernels: argument checks and row access in the accumulation type.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <vector>

namespace dvpo {
namespace cpu {

// Kernels see contiguous tensors; a non-contiguous input is copied once here.
inline at::Tensor contiguous(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// The mask arrives as a per-token weight in the accumulation dtype (or is absent).
template <typename acc_t>
inline const acc_t* mask_ptr(const std::optional<at::Tensor>& mask, const at::Tensor& mask_c) {
  return mask.has_value() ? mask_c.data_ptr<acc_t>() : nullptr;
}

// A row of `n` values as acc_t: the input itself when it already is acc_t, else a converted copy
// into a per-thread scratch buffer (bf16/fp16 inputs are read once and computed in fp32).
template <typename scalar_t, typename acc_t>
struct RowReader {
  std::vector<acc_t> buf;
  const acc_t* operator()(const scalar_t* row, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return row;
    } else {
      buf.resize(n);
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(row[i]);
      return buf.data();
    }
  }
};

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace cpu
}  // namespace dvpo
