// Declarations of the C++ CPU kernels registered in bindings.cpp (one .cpp file per op). Each
// implements the kernel interface documented in dvpo/backends/reference.py: flattened inputs
// (tokens first), outputs in the accumulation dtype (fp64 for fp64 inputs, else fp32), per-token
// values plus the gradient w.r.t. the prediction computed in the same pass.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>

namespace dvpo {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> quantile_huber(const at::Tensor& pred, const at::Tensor& target,
                                                  const at::Tensor& taus,
                                                  const std::optional<at::Tensor>& weights,
                                                  const std::optional<at::Tensor>& mask, double kappa,
                                                  bool normalize_kappa, c10::string_view algorithm);

std::tuple<at::Tensor, at::Tensor> cvar(const at::Tensor& x, double level, bool upper);

std::tuple<at::Tensor, at::Tensor, at::Tensor> critic_loss(
    const at::Tensor& heads, const at::Tensor& target, const at::Tensor& taus, const at::Tensor& risk_weights,
    const std::optional<at::Tensor>& mask, double kappa, double alpha, double beta, bool normalize_kappa,
    at::ArrayRef<double> params, c10::string_view algorithm);

std::tuple<at::Tensor, at::Tensor> distributional_gae(const at::Tensor& rewards, const at::Tensor& values,
                                                      const at::Tensor& mask, double gamma, double lam);

// values [R, S] (a row per sequence) and an optional bool/float mask of that shape -> (the reduced
// value [], d value / d values [R, S]); reduction: token-mean, seq-mean-token-mean, seq-mean-token-sum.
std::tuple<at::Tensor, at::Tensor> reduce_tokens(const at::Tensor& values, const std::optional<at::Tensor>& mask,
                                                 c10::string_view reduction);

// Which instruction-set variant of the kernels runs now ("avx512", "avx2" or "baseline"; capped
// by DVPO_CPU_ISA) and, with detected=true, the widest one this CPU supports.
std::string cpu_isa(bool detected);

// Whether algorithm="auto" would run the sorted quantile Huber for N atoms and M targets.
bool auto_sorted(int64_t n, int64_t m);

}  // namespace cpu
}  // namespace dvpo
