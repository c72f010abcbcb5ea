// The CUDA implementations of the dvpo_C operators (schemas in csrc/cpu/bindings.cpp, which
// dvpo._C registers with TORCH_LIBRARY; import dvpo._C before dvpo._cuda_C).
//
// The only torch-aware file of the CUDA backend, compiled by the host compiler. One helper,
// OpCall, does what every op needs before its launch (checks, contiguous inputs, the per-quantile
// vectors in the accumulation dtype, the mask: bool as it comes, else weights in the accumulation
// dtype, outputs, the dtype instantiation, the workspace a launcher asks for, the launch on the
// current stream); each op adds its shapes and its Params.
// `algorithm`: "sorted" runs the sorted pair algorithm (csrc/cuda/sorted.cuh) for the quantile
// Huber sums, "auto" and "pairwise" the pairwise one (no GPU cost model for "auto" yet).
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
#include "dvpo_math.h"  // math::reduction_id

// An importable module with no Python functions: `import dvpo._cuda_C` loads the library and runs
// the registrations below.
static PyModuleDef dvpo_cuda_module = {PyModuleDef_HEAD_INIT, "_cuda_C", nullptr, -1, nullptr};
extern "C" PyObject* PyInit__cuda_C(void) { return PyModule_Create(&dvpo_cuda_module); }

namespace dvpo {
namespace cuda {
namespace {

template <typename T>
struct Tag {
  using type = T;
};

template <typename T>
const T* in(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}
template <typename T>
T* out(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// Points an op's Params at a mask from OpCall::mask: its flags when bool, else its weights in acc_t.
template <typename Params>
void set_mask(Params& prm, const at::Tensor& mk) {
  if (mk.defined() && mk.scalar_type() == at::kBool) {
    prm.mask_bool = in<bool>(mk);
  } else {
    prm.mask = in<typename Params::acc>(mk);
  }
}

// The torch side of one op call, shared by the four ops: device and dtype checks against the op's
// main input (the one the outputs follow), contiguous inputs, the small vectors (taus, weights) in
// the accumulation dtype, the mask (bool as it comes), the outputs, the device guard, the dtype
// instantiation and the launch with the workspace the launcher asks for, on the current stream.
class OpCall {
 public:
  OpCall(const char* op, const at::Tensor& main, const char* name)
      : op_(op), name_(name), main_(on_device(op, main, main, name)), guard_(main.device()),
        acc_(main.scalar_type() == at::kDouble ? at::kDouble : at::kFloat) {}

  // A row input with the main input's device and dtype, contiguous.
  at::Tensor input(const at::Tensor& t, const char* name) const {
    on_device(op_, t, main_, name);
    TORCH_CHECK(t.scalar_type() == main_.scalar_type(), "dvpo_C::", op_, ": ", name_, " and ", name, " dtypes differ");
    return t.contiguous();
  }

  // A vector of `size` entries, contiguous in the accumulation dtype (undefined when absent).
  at::Tensor vector(const std::optional<at::Tensor>& t, const char* name, int64_t size) const {
    if (!t.has_value()) return at::Tensor();
    on_device(op_, *t, main_, name);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == size, "dvpo_C::", op_, ": ", name, " [", size, "] expected, got ",
                t->sizes());
    return t->to(acc_).contiguous();
  }

  at::Tensor output(at::IntArrayRef sizes) const { return at::empty(sizes, main_.options().dtype(acc_)); }
  // A gradient output: in the main input's dtype (dvpo/opspec.py, Out.dtype "input").
  at::Tensor grad_output(at::IntArrayRef sizes) const { return at::empty(sizes, main_.options()); }

  // A mask shaped `sizes`, read by the kernel as it comes when bool, else as contiguous weights in
  // the accumulation dtype (undefined when absent).
  at::Tensor mask(const std::optional<at::Tensor>& t, at::IntArrayRef sizes) const {
    if (!t.has_value()) return at::Tensor();
    on_device(op_, *t, main_, "mask");
    TORCH_CHECK(t->sizes() == sizes, "dvpo_C::", op_, ": mask must have the shape ", sizes, ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kBool || at::isFloatingType(t->scalar_type()), "dvpo_C::", op_,
                ": mask must be bool or floating point, got ", t->scalar_type());
    return t->scalar_type() == at::kBool ? t->contiguous() : t->to(acc_).contiguous();
  }

  // A size the launchers take as int.
  int size(int64_t v, const char* what) const {
    TORCH_CHECK(v >= 1 && v <= std::numeric_limits<int>::max(), "dvpo_C::", op_, ": ", what,
                " must be in [1, 2^31), got ", v);
    return static_cast<int>(v);
  }

  void check_algorithm(c10::string_view algorithm) const {
    TORCH_CHECK(algorithm == "auto" || algorithm == "pairwise" || algorithm == "sorted", "dvpo_C::", op_,
                ": algorithm must be auto, pairwise or sorted, got ", std::string(algorithm));
  }

  // Calls f(Tag<scalar_t>{}) with the CUDA type of the main input's dtype.
  template <typename F>
  void dispatch(F&& f) const {
    switch (main_.scalar_type()) {
      case at::kFloat: f(Tag<float>{}); break;
      case at::kDouble: f(Tag<double>{}); break;
      case at::kHalf: f(Tag<__half>{}); break;
      case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
      default:
        TORCH_CHECK(false, "dvpo_C::", op_, " (CUDA): unsupported dtype ", main_.scalar_type(), " (fp32, fp64, fp16, bf16)");
    }
  }

  template <typename Params>
  void launch(Params& prm, size_t (*workspace_bytes)(const Params&),
              cudaError_t (*launcher)(const Params&, cudaStream_t)) const {
    const size_t bytes = workspace_bytes(prm);
    const at::Tensor ws =
        bytes ? at::empty({static_cast<int64_t>(bytes)}, main_.options().dtype(at::kByte)) : at::Tensor();
    prm.workspace = bytes ? ws.data_ptr() : nullptr;
    const cudaError_t err = launcher(prm, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "dvpo_C::", op_, " (CUDA) failed: ", cudaGetErrorString(err));
  }

 private:
  static const at::Tensor& on_device(const char* op, const at::Tensor& t, const at::Tensor& ref, const char* name) {
    TORCH_CHECK(t.is_cuda(), "dvpo_C::", op, ": ", name, " must be a CUDA tensor");
    TORCH_CHECK(t.device() == ref.device(), "dvpo_C::", op, ": ", name, " must be on ", ref.device(), ", got ",
                t.device());
    return t;
  }

  const char* op_;
  const char* name_;
  at::Tensor main_;
  c10::cuda::CUDAGuard guard_;
  at::ScalarType acc_;
};

// -------------------------------------------------------------------------------- quantile Huber

std::tuple<at::Tensor, at::Tensor> quantile_huber_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                       const at::Tensor& taus, const std::optional<at::Tensor>& weights,
                                                       const std::optional<at::Tensor>& mask, double kappa,
                                                       bool normalize_kappa, c10::string_view algorithm) {
  const OpCall call("quantile_huber", pred, "pred");
  TORCH_CHECK(pred.dim() == 2 && target.dim() == 2 && pred.size(0) == target.size(0),
              "dvpo_C::quantile_huber: pred [T, N] and target [T, M] expected, got ", pred.sizes(), " and ",
              target.sizes());
  TORCH_CHECK(kappa > 0, "dvpo_C::quantile_huber: kappa must be > 0");
  call.check_algorithm(algorithm);
  const int64_t T = pred.size(0);
  const at::Tensor p = pred.contiguous(), z = call.input(target, "target");
  const at::Tensor t = call.vector(taus, "taus", pred.size(1)), w = call.vector(weights, "weights", pred.size(1));
  const at::Tensor mk = call.mask(mask, {T});
  const at::Tensor loss = call.output({T}), grad = call.grad_output({T, pred.size(1)});
  if (T == 0) return {loss, grad};
  const int n = call.size(pred.size(1), "N"), m = call.size(target.size(1), "M");
  call.dispatch([&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using accT = acc_t<scalar_t>;
    QuantileHuberParams<scalar_t> prm;
    prm.pred = in<scalar_t>(p);
    prm.target = in<scalar_t>(z);
    prm.taus = in<accT>(t);
    prm.weights = in<accT>(w);
    set_mask(prm, mk);
    prm.loss = out<accT>(loss);
    prm.grad = out<scalar_t>(grad);
    prm.tokens = T;
    prm.n = n;
    prm.m = m;
    prm.kappa = kappa;
    prm.normalize_kappa = normalize_kappa;
    prm.sorted = algorithm == "sorted";
    call.launch(prm, &quantile_huber_workspace_bytes<scalar_t>, &launch_quantile_huber<scalar_t>);
  });
  return {loss, grad};
}

// ------------------------------------------------------------------------------------------ CVaR

std::tuple<at::Tensor, at::Tensor> cvar_cuda(const at::Tensor& x, double level, bool upper) {
  const OpCall call("cvar", x, "x");
  TORCH_CHECK(x.dim() == 2, "dvpo_C::cvar: x [T, N] expected, got ", x.sizes());
  TORCH_CHECK(level > 0.0 && level <= 1.0, "dvpo_C::cvar: level must be in (0, 1], got ", level);
  const int64_t T = x.size(0);
  const at::Tensor value = call.output({T}), coef = call.grad_output({T, x.size(1)});
  if (T == 0) return {value, coef};
  const int n = call.size(x.size(1), "N");
  const at::Tensor xc = x.contiguous();
  call.dispatch([&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using accT = acc_t<scalar_t>;
    CvarParams<scalar_t> prm;
    prm.x = in<scalar_t>(xc);
    prm.value = out<accT>(value);
    prm.coef = out<scalar_t>(coef);
    prm.tokens = T;
    prm.n = n;
    prm.level = level;
    prm.upper = upper;
    call.launch(prm, &cvar_workspace_bytes<scalar_t>, &launch_cvar<scalar_t>);
  });
  return {value, coef};
}

// ------------------------------------------------------------------------------- fused critic loss

// params (dvpo/config.py, PARAM_NAMES; indices from csrc/terms.h): the term weights, tail_mode
// (0 recipe, 1 consistent), lo_scale, hi_scale, shift_expectile (the last three only read in
// consistent mode).
void check_critic_params(at::ArrayRef<double> params) {
  TORCH_CHECK(params.size() == kParams, "dvpo_C::critic_loss: ", kParams, " params expected (", kTerms,
              " term weights, tail_mode, lo_scale, hi_scale, shift_expectile), got ", params.size());
  const double mode = params[kTailMode];
  TORCH_CHECK(mode == 0.0 || mode == 1.0, "dvpo_C::critic_loss: params[", kTailMode,
              "] (tail_mode) must be 0 (recipe) or 1 (consistent), got ", mode);
  if (mode == 0.0) return;
  TORCH_CHECK(std::isfinite(params[kLoScale]) && std::isfinite(params[kHiScale]), "dvpo_C::critic_loss: params[",
              kLoScale, "], params[", kHiScale, "] (lo_scale, hi_scale) must be finite, got ", params[kLoScale],
              " and ", params[kHiScale]);
  TORCH_CHECK(params[kShiftExpectile] > 0.0 && params[kShiftExpectile] < 1.0, "dvpo_C::critic_loss: params[",
              kShiftExpectile, "] (shift_expectile) must be in (0, 1), got ", params[kShiftExpectile]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> critic_loss_cuda(
    const at::Tensor& heads, const at::Tensor& target, const at::Tensor& taus, const at::Tensor& risk_weights,
    const std::optional<at::Tensor>& mask, double kappa, double alpha, double beta, bool normalize_kappa,
    at::ArrayRef<double> params, c10::string_view algorithm) {
  const OpCall call("critic_loss", heads, "heads");
  TORCH_CHECK(heads.dim() == 3 && target.dim() == 2 && heads.size(0) == target.size(0),
              "dvpo_C::critic_loss: heads [T, H, N] and target [T, M] expected, got ", heads.sizes(), " and ",
              target.sizes());
  check_critic_params(params);
  TORCH_CHECK(kappa > 0, "dvpo_C::critic_loss: kappa must be > 0");
  TORCH_CHECK(alpha > 0.0 && alpha <= 1.0 && beta > 0.0 && beta <= 1.0,
              "dvpo_C::critic_loss: alpha and beta must be in (0, 1]");
  call.check_algorithm(algorithm);
  const int64_t T = heads.size(0), N = heads.size(2);
  const at::Tensor hd = heads.contiguous(), z = call.input(target, "target");
  const at::Tensor t = call.vector(taus, "taus", N), rw = call.vector(risk_weights, "risk_weights", N);
  const at::Tensor mk = call.mask(mask, {T});
  const at::Tensor total = call.output({T}), terms = call.output({T, kTerms}), grad = call.grad_output(heads.sizes());
  if (T == 0) return {total, terms, grad};
  const int h = call.size(heads.size(1), "H"), n = call.size(N, "N"), m = call.size(target.size(1), "M");
  call.dispatch([&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using accT = acc_t<scalar_t>;
    CriticLossParams<scalar_t> prm;
    prm.heads = in<scalar_t>(hd);
    prm.target = in<scalar_t>(z);
    prm.taus = in<accT>(t);
    prm.risk_weights = in<accT>(rw);
    set_mask(prm, mk);
    prm.total = out<accT>(total);
    prm.terms = out<accT>(terms);
    prm.grad = out<scalar_t>(grad);
    prm.tokens = T;
    prm.h = h;
    prm.n = n;
    prm.m = m;
    prm.kappa = kappa;
    prm.alpha = alpha;
    prm.beta = beta;
    prm.normalize_kappa = normalize_kappa;
    prm.sorted = algorithm == "sorted";
    for (int k = 0; k < kTerms; ++k) prm.weights[k] = params[k];
    prm.tail_mode = params[kTailMode] == 1.0 ? 1 : 0;
    prm.lo_scale = params[kLoScale];
    prm.hi_scale = params[kHiScale];
    prm.shift_expectile = params[kShiftExpectile];
    call.launch(prm, &critic_loss_workspace_bytes<scalar_t>, &launch_critic_loss<scalar_t>);
  });
  return {total, terms, grad};
}

// ---------------------------------------------------------------------------- distributional GAE

std::tuple<at::Tensor, at::Tensor> distributional_gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                                           const at::Tensor& mask, double gamma, double lam) {
  const OpCall call("distributional_gae", values, "values");
  TORCH_CHECK(values.dim() == 3, "dvpo_C::distributional_gae: values [B, T, M] expected, got ", values.sizes());
  const int64_t B = values.size(0), T = values.size(1), M = values.size(2);
  TORCH_CHECK(rewards.dim() == 2 && rewards.size(0) == B && rewards.size(1) == T,
              "dvpo_C::distributional_gae: rewards [B, T] expected, got ", rewards.sizes());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == T,
              "dvpo_C::distributional_gae: mask [B, T] expected, got ", mask.sizes());
  // [B, T] per-token vectors, converted as flat ones
  const at::Tensor r = call.vector(rewards.reshape({-1}), "rewards", B * T);
  const at::Tensor mk = call.mask(mask, {B, T});
  const at::Tensor adv = call.output({B, T}), ret = call.output({B, T, M});
  const int m = call.size(M, "M");
  if (B == 0 || T == 0) return {adv, ret};
  const at::Tensor v = values.contiguous();
  call.dispatch([&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using accT = acc_t<scalar_t>;
    GaeParams<scalar_t> prm;
    prm.rewards = in<accT>(r);
    prm.values = in<scalar_t>(v);
    set_mask(prm, mk);
    prm.adv = out<accT>(adv);
    prm.ret = out<accT>(ret);
    prm.batch = B;
    prm.length = T;
    prm.m = m;
    prm.gamma = gamma;
    prm.lam = lam;
    call.launch(prm, &gae_workspace_bytes<scalar_t>, &launch_distributional_gae<scalar_t>);
  });
  return {adv, ret};
}

// ---------------------------------------------------------------------------- token reduction

std::tuple<at::Tensor, at::Tensor> reduce_tokens_cuda(const at::Tensor& values, const std::optional<at::Tensor>& mask,
                                                      c10::string_view reduction) {
  const OpCall call("reduce_tokens", values, "values");
  TORCH_CHECK(values.dim() == 2, "dvpo_C::reduce_tokens: values [R, S] expected (a row per sequence), got ",
              values.sizes());
  const int red = math::reduction_id(reduction.data(), reduction.size());
  TORCH_CHECK(red >= 0, "dvpo_C::reduce_tokens: reduction must be ", math::reduction_choices(), ", got ",
              std::string(reduction));
  const at::Tensor mk = call.mask(mask, values.sizes());
  const at::Tensor loss = call.output({}), weights = call.output(values.sizes());
  const at::Tensor v = values.contiguous();
  call.dispatch([&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using accT = acc_t<scalar_t>;
    ReduceTokensParams<scalar_t> prm;
    prm.values = in<scalar_t>(v);
    set_mask(prm, mk);
    prm.loss = out<accT>(loss);
    prm.weights = out<accT>(weights);
    prm.rows = values.size(0);
    prm.cols = values.size(1);
    prm.reduction = red;
    call.launch(prm, &reduce_tokens_workspace_bytes<scalar_t>, &launch_reduce_tokens<scalar_t>);
  });
  return {loss, weights};
}

}  // namespace
}  // namespace cuda
}  // namespace dvpo

TORCH_LIBRARY_IMPL(dvpo_C, CUDA, m) {
  m.impl("quantile_huber", &dvpo::cuda::quantile_huber_cuda);
  m.impl("cvar", &dvpo::cuda::cvar_cuda);
  m.impl("critic_loss", &dvpo::cuda::critic_loss_cuda);
  m.impl("distributional_gae", &dvpo::cuda::distributional_gae_cuda);
  m.impl("reduce_tokens", &dvpo::cuda::reduce_tokens_cuda);
}
