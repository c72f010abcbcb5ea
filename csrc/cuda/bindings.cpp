// The CUDA implementations of the dvpo_C operators (schemas in csrc/cpu/bindings.cpp, which
// dvpo._C registers with TORCH_LIBRARY; import dvpo._C before dvpo._cuda_C).
//
// The only torch-aware file of the CUDA backend, compiled by the host compiler: it checks the
// arguments, makes the inputs contiguous, converts the small per-quantile vectors and the mask to
// the accumulation dtype, allocates the outputs (and a workspace when a launcher asks for one),
// picks the dtype instantiation and calls the torch-free launchers of csrc/cuda/*.cu on the current
// stream. The `algorithm` argument is accepted and ignored: every CUDA kernel is pairwise for now.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "dvpo_cuda.h"

// An importable module with no Python functions: `import dvpo._cuda_C` loads the library and runs
// the registrations below.
extern "C" {
PyObject* PyInit__cuda_C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace dvpo {
namespace cuda {
namespace {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<scalar_t>{}) with the CUDA type of `dtype`.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kDouble: f(Tag<double>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, "dvpo_C::", op, " (CUDA): unsupported dtype ", dtype, " (fp32, fp64, fp16, bf16)");
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "dvpo_C::", op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "dvpo_C::", op, ": ", name, " must be on ", ref.device(), ", got ",
              t.device());
}

int as_int(int64_t v, const char* op, const char* what) {
  TORCH_CHECK(v >= 1 && v <= std::numeric_limits<int>::max(), "dvpo_C::", op, ": ", what, " must be in [1, 2^31), got ",
              v);
  return static_cast<int>(v);
}

// A per-quantile vector (or the mask) as a contiguous tensor of the accumulation dtype.
at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

template <typename acc_t>
const acc_t* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<const acc_t*>(t.const_data_ptr()) : nullptr;
}

void check_algorithm(c10::string_view algorithm, const char* op) {
  TORCH_CHECK(algorithm == "auto" || algorithm == "pairwise" || algorithm == "sorted", "dvpo_C::", op,
              ": algorithm must be auto, pairwise or sorted, got ", std::string(algorithm));
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "dvpo_C::", op, " (CUDA) failed: ", cudaGetErrorString(err));
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return bytes ? at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte)) : at::Tensor();
}

// -------------------------------------------------------------------------------- quantile Huber

std::tuple<at::Tensor, at::Tensor> quantile_huber_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                       const at::Tensor& taus, const std::optional<at::Tensor>& weights,
                                                       const std::optional<at::Tensor>& mask, double kappa,
                                                       bool normalize_kappa, c10::string_view algorithm) {
  const char* op = "quantile_huber";
  TORCH_CHECK(pred.dim() == 2 && target.dim() == 2 && pred.size(0) == target.size(0), "dvpo_C::", op,
              ": pred [T, N] and target [T, M] expected, got ", pred.sizes(), " and ", target.sizes());
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), "dvpo_C::", op, ": pred and target dtypes differ");
  TORCH_CHECK(taus.dim() == 1 && taus.size(0) == pred.size(1), "dvpo_C::", op, ": taus [N] expected");
  TORCH_CHECK(kappa > 0, "dvpo_C::", op, ": kappa must be > 0");
  check_algorithm(algorithm, op);
  check_cuda(pred, pred, op, "pred");
  check_cuda(target, pred, op, "target");
  check_cuda(taus, pred, op, "taus");
  const c10::cuda::CUDAGuard guard(pred.device());
  const auto acc = acc_type(pred.scalar_type());
  const int64_t T = pred.size(0);
  at::Tensor loss = at::empty({T}, pred.options().dtype(acc));
  at::Tensor grad = at::empty({T, pred.size(1)}, pred.options().dtype(acc));
  if (T == 0) return {loss, grad};
  const int n = as_int(pred.size(1), op, "N"), m = as_int(target.size(1), op, "M");
  const at::Tensor p = pred.contiguous(), z = target.contiguous(), t = as_acc(taus, acc);
  at::Tensor w, mk;
  if (weights.has_value()) {
    check_cuda(*weights, pred, op, "weights");
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == n, "dvpo_C::", op, ": weights [N] expected");
    w = as_acc(*weights, acc);
  }
  if (mask.has_value()) {
    check_cuda(*mask, pred, op, "mask");
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == T, "dvpo_C::", op, ": mask [T] expected");
    mk = as_acc(*mask, acc);
  }
  dispatch_dtype(p.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using accT = acc_t<scalar_t>;
    QuantileHuberParams<scalar_t> prm;
    prm.pred = static_cast<const scalar_t*>(p.const_data_ptr());
    prm.target = static_cast<const scalar_t*>(z.const_data_ptr());
    prm.taus = ptr<accT>(t);
    prm.weights = ptr<accT>(w);
    prm.mask = ptr<accT>(mk);
    prm.loss = static_cast<accT*>(loss.data_ptr());
    prm.grad = static_cast<accT*>(grad.data_ptr());
    prm.tokens = T;
    prm.n = n;
    prm.m = m;
    prm.kappa = kappa;
    prm.normalize_kappa = normalize_kappa;
    const at::Tensor ws = workspace(quantile_huber_workspace_bytes(prm), p);
    prm.workspace = ws.defined() ? ws.data_ptr() : nullptr;
    check_launch(launch_quantile_huber(prm, c10::cuda::getCurrentCUDAStream().stream()), op);
  });
  return {loss, grad};
}

// ------------------------------------------------------------------------------------------ CVaR

std::tuple<at::Tensor, at::Tensor> cvar_cuda(const at::Tensor& x, double level, bool upper) {
  const char* op = "cvar";
  TORCH_CHECK(x.dim() == 2, "dvpo_C::", op, ": x [T, N] expected, got ", x.sizes());
  TORCH_CHECK(level > 0.0 && level <= 1.0, "dvpo_C::", op, ": level must be in (0, 1], got ", level);
  check_cuda(x, x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x.scalar_type());
  const int64_t T = x.size(0);
  at::Tensor value = at::empty({T}, x.options().dtype(acc));
  at::Tensor coef = at::empty({T, x.size(1)}, x.options().dtype(acc));
  if (T == 0) return {value, coef};
  const int n = as_int(x.size(1), op, "N");
  const at::Tensor xc = x.contiguous();
  dispatch_dtype(xc.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using accT = acc_t<scalar_t>;
    CvarParams<scalar_t> prm;
    prm.x = static_cast<const scalar_t*>(xc.const_data_ptr());
    prm.value = static_cast<accT*>(value.data_ptr());
    prm.coef = static_cast<accT*>(coef.data_ptr());
    prm.tokens = T;
    prm.n = n;
    prm.level = level;
    prm.upper = upper;
    const at::Tensor ws = workspace(cvar_workspace_bytes(prm), xc);
    prm.workspace = ws.defined() ? ws.data_ptr() : nullptr;
    check_launch(launch_cvar(prm, c10::cuda::getCurrentCUDAStream().stream()), op);
  });
  return {value, coef};
}

// ------------------------------------------------------------------------------- fused critic loss

std::tuple<at::Tensor, at::Tensor, at::Tensor> critic_loss_cuda(
    const at::Tensor& heads, const at::Tensor& target, const at::Tensor& taus, const at::Tensor& risk_weights,
    const std::optional<at::Tensor>& mask, double kappa, double alpha, double beta, bool normalize_kappa,
    at::ArrayRef<double> params, c10::string_view algorithm) {
  const char* op = "critic_loss";
  TORCH_CHECK(heads.dim() == 3 && target.dim() == 2 && heads.size(0) == target.size(0), "dvpo_C::", op,
              ": heads [T, H, N] and target [T, M] expected, got ", heads.sizes(), " and ", target.sizes());
  TORCH_CHECK(heads.scalar_type() == target.scalar_type(), "dvpo_C::", op, ": heads and target dtypes differ");
  TORCH_CHECK(taus.dim() == 1 && taus.size(0) == heads.size(2), "dvpo_C::", op, ": taus [N] expected");
  TORCH_CHECK(risk_weights.dim() == 1 && risk_weights.size(0) == heads.size(2), "dvpo_C::", op,
              ": risk_weights [N] expected");
  // params (dvpo/config.py, PARAM_NAMES): the 8 term weights, tail_mode (0 recipe, 1 consistent),
  // lo_scale, hi_scale, shift_expectile (the last three are ignored in recipe mode).
  TORCH_CHECK(params.size() == kParams, "dvpo_C::", op,
              ": 12 params expected (8 term weights, tail_mode, lo_scale, hi_scale, shift_expectile), got ",
              params.size());
  const double tail_mode = params[kTailMode];
  TORCH_CHECK(tail_mode == 0.0 || tail_mode == 1.0, "dvpo_C::", op,
              ": params[8] (tail_mode) must be 0 (recipe) or 1 (consistent), got ", tail_mode);
  if (tail_mode == 1.0) {
    TORCH_CHECK(std::isfinite(params[kLoScale]) && std::isfinite(params[kHiScale]), "dvpo_C::", op,
                ": params[9], params[10] (lo_scale, hi_scale) must be finite, got ", params[kLoScale], " and ",
                params[kHiScale]);
    TORCH_CHECK(params[kShiftExpectile] > 0.0 && params[kShiftExpectile] < 1.0, "dvpo_C::", op,
                ": params[11] (shift_expectile) must be in (0, 1), got ", params[kShiftExpectile]);
  }
  TORCH_CHECK(kappa > 0, "dvpo_C::", op, ": kappa must be > 0");
  TORCH_CHECK(alpha > 0.0 && alpha <= 1.0 && beta > 0.0 && beta <= 1.0, "dvpo_C::", op,
              ": alpha and beta must be in (0, 1]");
  check_algorithm(algorithm, op);
  check_cuda(heads, heads, op, "heads");
  check_cuda(target, heads, op, "target");
  check_cuda(taus, heads, op, "taus");
  check_cuda(risk_weights, heads, op, "risk_weights");
  const c10::cuda::CUDAGuard guard(heads.device());
  const auto acc = acc_type(heads.scalar_type());
  const int64_t T = heads.size(0);
  at::Tensor total = at::empty({T}, heads.options().dtype(acc));
  at::Tensor terms = at::empty({T, kTerms}, heads.options().dtype(acc));
  at::Tensor grad = at::empty(heads.sizes(), heads.options().dtype(acc));
  if (T == 0) return {total, terms, grad};
  const int h = as_int(heads.size(1), op, "H"), n = as_int(heads.size(2), op, "N");
  const int m = as_int(target.size(1), op, "M");
  const at::Tensor hd = heads.contiguous(), z = target.contiguous();
  const at::Tensor t = as_acc(taus, acc), rw = as_acc(risk_weights, acc);
  at::Tensor mk;
  if (mask.has_value()) {
    check_cuda(*mask, heads, op, "mask");
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == T, "dvpo_C::", op, ": mask [T] expected");
    mk = as_acc(*mask, acc);
  }
  dispatch_dtype(hd.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using accT = acc_t<scalar_t>;
    CriticLossParams<scalar_t> prm;
    prm.heads = static_cast<const scalar_t*>(hd.const_data_ptr());
    prm.target = static_cast<const scalar_t*>(z.const_data_ptr());
    prm.taus = ptr<accT>(t);
    prm.risk_weights = ptr<accT>(rw);
    prm.mask = ptr<accT>(mk);
    prm.total = static_cast<accT*>(total.data_ptr());
    prm.terms = static_cast<accT*>(terms.data_ptr());
    prm.grad = static_cast<accT*>(grad.data_ptr());
    prm.tokens = T;
    prm.h = h;
    prm.n = n;
    prm.m = m;
    prm.kappa = kappa;
    prm.alpha = alpha;
    prm.beta = beta;
    prm.normalize_kappa = normalize_kappa;
    for (int k = 0; k < kTerms; ++k) prm.weights[k] = params[k];
    prm.tail_mode = tail_mode == 1.0 ? 1 : 0;
    prm.lo_scale = params[kLoScale];
    prm.hi_scale = params[kHiScale];
    prm.shift_expectile = params[kShiftExpectile];
    const at::Tensor ws = workspace(critic_loss_workspace_bytes(prm), hd);
    prm.workspace = ws.defined() ? ws.data_ptr() : nullptr;
    check_launch(launch_critic_loss(prm, c10::cuda::getCurrentCUDAStream().stream()), op);
  });
  return {total, terms, grad};
}

// ---------------------------------------------------------------------------- distributional GAE

std::tuple<at::Tensor, at::Tensor> distributional_gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                                           const at::Tensor& mask, double gamma, double lam) {
  const char* op = "distributional_gae";
  TORCH_CHECK(values.dim() == 3, "dvpo_C::", op, ": values [B, T, M] expected, got ", values.sizes());
  TORCH_CHECK(rewards.dim() == 2 && rewards.size(0) == values.size(0) && rewards.size(1) == values.size(1),
              "dvpo_C::", op, ": rewards [B, T] expected, got ", rewards.sizes());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == values.size(0) && mask.size(1) == values.size(1), "dvpo_C::", op,
              ": mask [B, T] expected, got ", mask.sizes());
  check_cuda(values, values, op, "values");
  check_cuda(rewards, values, op, "rewards");
  check_cuda(mask, values, op, "mask");
  const c10::cuda::CUDAGuard guard(values.device());
  const auto acc = acc_type(values.scalar_type());
  const int64_t B = values.size(0), T = values.size(1), M = values.size(2);
  at::Tensor adv = at::empty({B, T}, values.options().dtype(acc));
  at::Tensor ret = at::empty({B, T, M}, values.options().dtype(acc));
  const int m = as_int(M, op, "M");
  if (B == 0 || T == 0) return {adv, ret};
  const at::Tensor v = values.contiguous(), r = as_acc(rewards, acc), mk = as_acc(mask, acc);
  dispatch_dtype(v.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using accT = acc_t<scalar_t>;
    GaeParams<scalar_t> prm;
    prm.rewards = ptr<accT>(r);
    prm.values = static_cast<const scalar_t*>(v.const_data_ptr());
    prm.mask = ptr<accT>(mk);
    prm.adv = static_cast<accT*>(adv.data_ptr());
    prm.ret = static_cast<accT*>(ret.data_ptr());
    prm.batch = B;
    prm.length = T;
    prm.m = m;
    prm.gamma = gamma;
    prm.lam = lam;
    const at::Tensor ws = workspace(gae_workspace_bytes(prm), v);
    prm.workspace = ws.defined() ? ws.data_ptr() : nullptr;
    check_launch(launch_distributional_gae(prm, c10::cuda::getCurrentCUDAStream().stream()), op);
  });
  return {adv, ret};
}

}  // namespace
}  // namespace cuda
}  // namespace dvpo

TORCH_LIBRARY_IMPL(dvpo_C, CUDA, m) {
  m.impl("quantile_huber", &dvpo::cuda::quantile_huber_cuda);
  m.impl("cvar", &dvpo::cuda::cvar_cuda);
  m.impl("critic_loss", &dvpo::cuda::critic_loss_cuda);
  m.impl("distributional_gae", &dvpo::cuda::distributional_gae_cuda);
}
