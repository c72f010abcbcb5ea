// The dvpo_C operator library: schemas of the kernel interface (see dvpo/backends/reference.py)
// and the CPU implementations. The CUDA extension adds TORCH_LIBRARY_IMPL(dvpo_C, CUDA, ...) to the
// same schemas. Python (dvpo/library.py) wraps these in the public `dvpo::` ops with autograd.
#include <Python.h>
#include <torch/library.h>

#include "kernels.h"
#include "ops.h"
#include "simd.h"

// An importable module with no Python functions: `import dvpo._C` loads the library and runs the
// registrations below (the ops are then reachable as torch.ops.dvpo_C.*).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace dvpo {
namespace cpu {

std::string cpu_isa(bool detected) { return isa_name(detected ? detected_isa() : active_isa()); }

bool auto_sorted(int64_t n, int64_t m) { return kern::prefer_sorted(n, m); }

}  // namespace cpu
}  // namespace dvpo

TORCH_LIBRARY(dvpo_C, m) {
  m.def(
      "quantile_huber(Tensor pred, Tensor target, Tensor taus, Tensor? weights, Tensor? mask, float kappa, "
      "bool normalize_kappa, str algorithm) -> (Tensor, Tensor)");
  m.def("cvar(Tensor x, float level, bool upper) -> (Tensor, Tensor)");
  m.def(
      "critic_loss(Tensor heads, Tensor target, Tensor taus, Tensor risk_weights, Tensor? mask, float kappa, "
      "float alpha, float beta, bool normalize_kappa, float[] params, str algorithm) -> (Tensor, Tensor, Tensor)");
  m.def("distributional_gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def("reduce_tokens(Tensor values, Tensor? mask, str reduction) -> (Tensor, Tensor)");
}

// Introspection of the CPU build, in a fragment of its own (the block above holds the kernel
// interface's schemas only; tests/test_cuda_backend.py copies it into its emulated build):
// torch.ops.dvpo_C.cpu_isa(False) and torch.ops.dvpo_C.cpu_auto_sorted(n, m).
TORCH_LIBRARY_FRAGMENT(dvpo_C, m) {
  m.def("cpu_isa(bool detected=False) -> str", &dvpo::cpu::cpu_isa);
  m.def("cpu_auto_sorted(int n, int m) -> bool", &dvpo::cpu::auto_sorted);
}

TORCH_LIBRARY_IMPL(dvpo_C, CPU, m) {
  m.impl("quantile_huber", &dvpo::cpu::quantile_huber);
  m.impl("cvar", &dvpo::cpu::cvar);
  m.impl("critic_loss", &dvpo::cpu::critic_loss);
  m.impl("distributional_gae", &dvpo::cpu::distributional_gae);
  m.impl("reduce_tokens", &dvpo::cpu::reduce_tokens);
}
