// The Launch that the host sequences of csrc/cuda/*_kernels.cuh take, for the GPU: each kernel on
// the current stream, its launch checked. (tests/cuda_emu/emu.h has the CPU emulation's.)
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstddef>
#include <utility>

namespace fastctx {
namespace gpu {

struct CudaLaunch {
  cudaStream_t stream;
  int sms;  // multiprocessors of the current device (the launch plans size their grids by it)

  CudaLaunch() : stream(c10::cuda::getCurrentCUDAStream()), sms(0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                          c10::cuda::current_device()));
  }

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                  Args&&... args) const {
    kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace gpu
}  // namespace fastctx
