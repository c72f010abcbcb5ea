// Stub for the host emulation build of csrc/cuda/bindings.cpp (see ../../../emu_runtime.h).
#pragma once
#include <cuda_runtime_api.h>
namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(signed char = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
