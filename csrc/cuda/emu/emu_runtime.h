// A host emulation of the CUDA execution model, to run the kernels of csrc/cuda/*.cu on a machine
// without a GPU (tests only; never part of the built package: setup.py compiles csrc/cuda/*.cu and
// csrc/cuda/*.cpp, not this folder).
//
// tests/test_cuda_backend.py copies the kernel files, rewrites the two constructs a host compiler
// cannot parse (`kernel<<<grid, block, smem, stream>>>(args)` becomes dvpo_emu::launch(...), the
// `extern __shared__` array becomes dvpo_emu::dynamic_smem(); the 48 KB shared-memory limit
// becomes a setting, so small shapes can take the opt-in and global-scratch paths), force-includes
// this header, and
// builds them with g++ into a CPU torch extension, next to csrc/cuda/bindings.cpp compiled
// against the stub c10/cuda headers of emu/stubs.
//
// Every CUDA thread of a block is a fiber (ucontext) with its own stack, run one at a time in one
// OS thread; blocks run one after another. A warp collective (__shfl_xor_sync, __ballot_sync,
// __reduce_add_sync, __syncwarp) publishes the lane's value and yields until all 32 lanes of the
// warp have arrived; __syncthreads waits for the whole block. A warp whose lanes do not all reach
// the same collectives (undefined on a GPU) is reported as a deadlock. Shared memory starts filled
// with NaN bytes, so a read of an unwritten slot shows up in the results.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

// ------------------------------------------------------------------ CUDA keywords on the host
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one at a time: a static is the block's shared array

namespace dvpo_emu {

constexpr int kStack = 128 * 1024;
constexpr int kMaxWarps = 32;

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  uint3 tid;
  int lane = 0, warp = 0;
  enum State { kRunnable, kWarpWait, kBlockWait, kDone } state = kRunnable;
  unsigned gen = 0;  // warp collectives passed
};

struct Emu {
  ucontext_t sched;
  Fiber* cur = nullptr;
  std::vector<Fiber> fibers;
  uint64_t slots[2][kMaxWarps][32];
  uint3 block_idx{0, 0, 0};
  dim3 grid_dim, block_dim;
  std::vector<uint64_t> smem;  // 8-byte aligned; dynamic shared memory
  std::function<void()> body;
  int optin_smem = 227 * 1024;         // what cudaDeviceGetAttribute reports (tests shrink it)
  size_t static_smem = 48 * 1024;      // the launchers' no-opt-in limit (tests shrink it)
  long long collectives = 0;
};

inline Emu& emu() {
  static Emu e;
  return e;
}

inline char* dynamic_smem() { return reinterpret_cast<char*>(emu().smem.data()); }

inline void set_smem_limits(size_t static_bytes, int optin_bytes) {
  emu().static_smem = static_bytes;
  emu().optin_smem = optin_bytes;
}

// ---- collectives
template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "collective values are at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

inline void check_mask(unsigned mask) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "dvpo_emu: only full-warp collectives are emulated\n");
    std::abort();
  }
}

// Publishes `value` for this lane and returns once all 32 lanes of the warp have published.
inline void warp_arrive(uint64_t value) {
  Emu& e = emu();
  Fiber* f = e.cur;
  e.slots[f->gen & 1][f->warp][f->lane] = value;
  f->state = Fiber::kWarpWait;
  ++e.collectives;
  swapcontext(&f->ctx, &e.sched);
}
inline uint64_t warp_value(int lane) {
  const Fiber* f = emu().cur;
  return emu().slots[f->gen & 1][f->warp][lane];
}
inline void warp_leave() { ++emu().cur->gen; }
inline int lane_id() { return emu().cur->lane; }

inline void block_barrier() {
  Emu& e = emu();
  e.cur->state = Fiber::kBlockWait;
  swapcontext(&e.cur->ctx, &e.sched);
}

// ---- the scheduler
inline void fiber_entry() {
  Emu& e = emu();
  e.body();
  e.cur->state = Fiber::kDone;
  // returns to e.sched through uc_link
}

inline void run_block(int nthreads) {
  Emu& e = emu();
  if (nthreads % 32 != 0 || nthreads / 32 > kMaxWarps) throw std::runtime_error("dvpo_emu: bad block size");
  if (static_cast<int>(e.fibers.size()) < nthreads) e.fibers.resize(nthreads);
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = e.fibers[t];
    if (!f.stack) f.stack.reset(new char[kStack]);
    f.tid = uint3{static_cast<unsigned>(t % e.block_dim.x), static_cast<unsigned>(t / e.block_dim.x % e.block_dim.y),
                  static_cast<unsigned>(t / (e.block_dim.x * e.block_dim.y))};
    f.lane = t % 32;
    f.warp = t / 32;
    f.state = Fiber::kRunnable;
    f.gen = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &e.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  const int nwarps = nthreads / 32;
  for (;;) {
    bool ran = false;
    for (int t = 0; t < nthreads; ++t) {
      Fiber& f = e.fibers[t];
      if (f.state != Fiber::kRunnable) continue;
      ran = true;
      e.cur = &f;
      swapcontext(&e.sched, &f.ctx);
      e.cur = nullptr;
    }
    int done = 0, block_wait = 0;
    for (int t = 0; t < nthreads; ++t) {
      done += e.fibers[t].state == Fiber::kDone;
      block_wait += e.fibers[t].state == Fiber::kBlockWait;
    }
    if (done == nthreads) return;
    bool released = false;
    for (int w = 0; w < nwarps; ++w) {
      int waiting = 0;
      for (int l = 0; l < 32; ++l) waiting += e.fibers[w * 32 + l].state == Fiber::kWarpWait;
      if (waiting == 32) {
        for (int l = 0; l < 32; ++l) e.fibers[w * 32 + l].state = Fiber::kRunnable;
        released = true;
      }
    }
    if (!released && block_wait > 0 && block_wait + done == nthreads && done == 0) {
      for (int t = 0; t < nthreads; ++t) e.fibers[t].state = Fiber::kRunnable;
      released = true;
    }
    if (!released && !ran) {
      std::fprintf(stderr, "dvpo_emu: deadlock in block (%u, %u, %u): lanes of a warp reach different collectives\n",
                   e.block_idx.x, e.block_idx.y, e.block_idx.z);
      std::abort();
    }
  }
}

template <typename Kernel, typename... Args>
inline void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t, Args... args) {
  Emu& e = emu();
  e.grid_dim = grid;
  e.block_dim = block;
  e.body = [&]() { kernel(args...); };
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        e.block_idx = uint3{x, y, z};
        e.smem.assign((smem_bytes + 7) / 8 + 1, ~uint64_t(0));  // NaN bytes: unwritten reads show
        run_block(nthreads);
      }
  e.body = nullptr;
}

}  // namespace dvpo_emu

#define threadIdx (::dvpo_emu::emu().cur->tid)
#define blockIdx (::dvpo_emu::emu().block_idx)
#define blockDim (::dvpo_emu::emu().block_dim)
#define gridDim (::dvpo_emu::emu().grid_dim)

// ------------------------------------------------------------------ device intrinsics on the host
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  dvpo_emu::check_mask(mask);
  dvpo_emu::warp_arrive(dvpo_emu::to_bits(v));
  const T r = dvpo_emu::from_bits<T>(dvpo_emu::warp_value(dvpo_emu::lane_id() ^ lane_mask));
  dvpo_emu::warp_leave();
  return r;
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  dvpo_emu::check_mask(mask);
  dvpo_emu::warp_arrive(pred ? 1 : 0);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= static_cast<unsigned>(dvpo_emu::warp_value(l) & 1) << l;
  dvpo_emu::warp_leave();
  return r;
}

inline int __reduce_add_sync(unsigned mask, int v) {
  dvpo_emu::check_mask(mask);
  dvpo_emu::warp_arrive(static_cast<uint32_t>(v));
  uint32_t s = 0;
  for (int l = 0; l < 32; ++l) s += static_cast<uint32_t>(dvpo_emu::warp_value(l));
  dvpo_emu::warp_leave();
  return static_cast<int>(s);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  dvpo_emu::check_mask(mask);
  dvpo_emu::warp_arrive(0);
  dvpo_emu::warp_leave();
}

inline void __syncthreads() { dvpo_emu::block_barrier(); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __float_as_uint(float x) { return dvpo_emu::from_bits<unsigned>(dvpo_emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return dvpo_emu::from_bits<float>(dvpo_emu::to_bits(x)); }
inline long long __double_as_longlong(double x) { return dvpo_emu::from_bits<long long>(dvpo_emu::to_bits(x)); }
inline double __hiloint2double(int hi, int lo) {
  const uint64_t b = (static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) | static_cast<uint32_t>(lo);
  return dvpo_emu::from_bits<double>(b);
}
