// Stub for the host emulation build of csrc/cuda/bindings.cpp (see ../../../emu_runtime.h).
#pragma once
#include <c10/core/Device.h>
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
