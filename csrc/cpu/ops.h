// Declarations of the C++ CPU kernels registered in bindings.cpp (one .cpp file per op).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace dvpo {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> quantile_huber(const at::Tensor& pred, const at::Tensor& target,
                                                  const at::Tensor& taus,
                                                  const std::optional<at::Tensor>& weights,
                                                  const std::optional<at::Tensor>& mask, double kappa,
                                                  bool normalize_kappa, c10::string_view algorithm);

}  // namespace cpu
}  // namespace dvpo
