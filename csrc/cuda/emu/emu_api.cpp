// The few CUDA runtime calls the launchers make, answered by the host emulation (emu_runtime.h):
// one device with an H100's shared-memory limits (the opt-in limit is settable by the tests).
#include "emu_runtime.h"

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  (void)device;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = dvpo_emu::emu().optin_smem; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 2; return cudaSuccess;  // small: exercises grid-stride loops
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  (void)func;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return value <= dvpo_emu::emu().optin_smem ? cudaSuccess : cudaErrorInvalidValue;
}

cudaError_t cudaGetLastError(void) { return cudaSuccess; }

const char* cudaGetErrorString(cudaError_t error) { return error == cudaSuccess ? "no error" : "emulated CUDA error"; }

}  // extern "C"

// Test hooks, called from the emulation binding.
void dvpo_emu_set_smem_limits(long long static_bytes, long long optin_bytes) {
  dvpo_emu::set_smem_limits(static_cast<size_t>(static_bytes), static_cast<int>(optin_bytes));
}
