// A CPU emulation of the CUDA execution model, for running the device code of csrc/cuda in CI
// (no GPU there): each thread of a block is an OS thread, blocks run one after another.
// Include it after the torch headers and before a kernels header (.cuh): it defines the CUDA
// keywords and built-ins that header uses.
//
//   __syncthreads()         std::barrier over the block's live threads (a thread that returns
//                           drops out, as an exited thread does on the GPU)
//   __ballot_sync(m, p)     a barrier over the warp's 32 threads, votes gathered in between
//   __shared__ T a[n];      `static`: one array for all threads of the block (blocks are serial)
//   dynamic shared memory   a fresh buffer per block, filled with 0xFF bytes (NaN as float or
//                           double, -1 as int) so that reading what no thread wrote shows
//
// What it cannot show: timing, coalescing, bank conflicts, the GPU's own rounding (fast math),
// races that need the GPU's memory model. A missing barrier shows as a wrong or varying result
// (threads really run concurrently), an out-of-bounds access as one under a sanitizer.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <tuple>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

struct Warp {
  std::barrier<> bar;
  unsigned votes[32];
  explicit Warp(std::ptrdiff_t n) : bar(n) {}
};

inline thread_local dim3 thread_idx, block_idx;
inline dim3 grid_dim, block_dim;
inline thread_local std::barrier<>* block_bar = nullptr;
inline thread_local Warp* warp = nullptr;
inline thread_local unsigned lane = 0;
inline unsigned char* dynamic_smem = nullptr;

// The Launch of the host sequences in csrc/cuda/*_kernels.cuh.
struct Launch {
  int sms;  // the multiprocessor count the launch plans assume

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                  Args&&... args) const {
    const std::tuple<Params...> params(std::forward<Args>(args)...);
    grid_dim = grid;
    block_dim = block;
    const unsigned nt = block.x * block.y * block.z;
    std::vector<unsigned char> dyn(smem + 64);
    dynamic_smem = dyn.data() + (64 - reinterpret_cast<uintptr_t>(dyn.data()) % 64) % 64;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          std::memset(dyn.data(), 0xFF, dyn.size());
          std::barrier<> bar(nt);
          std::vector<std::unique_ptr<Warp>> warps;
          for (unsigned w = 0; w * 32 < nt; ++w)
            warps.push_back(std::make_unique<Warp>(std::min<unsigned>(32, nt - w * 32)));
          std::vector<std::thread> threads;
          threads.reserve(nt);
          for (unsigned t = 0; t < nt; ++t)
            threads.emplace_back([&, t] {
              thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
              block_idx = dim3(bx, by, bz);
              block_bar = &bar;
              warp = warps[t / 32].get();
              lane = t % 32;
              std::apply(kernel, params);
              warp->bar.arrive_and_drop();
              bar.arrive_and_drop();
            });
          for (auto& th : threads) th.join();
        }
  }
};

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define gridDim (::emu::grid_dim)
#define blockDim (::emu::block_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define FASTCTX_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem

inline void __syncthreads() { ::emu::block_bar->arrive_and_wait(); }

inline unsigned __ballot_sync(unsigned mask, bool pred) {
  ::emu::Warp* w = ::emu::warp;
  w->votes[::emu::lane] = pred ? 1u : 0u;
  w->bar.arrive_and_wait();
  unsigned r = 0;
  for (unsigned i = 0; i < 32; ++i)
    if (w->votes[i]) r |= 1u << i;
  w->bar.arrive_and_wait();  // every lane has read the votes before the next ballot writes
  return r & mask;
}

inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
