// Criss-cross attention (CCNet), CUDA: argument checks, the launcher and the CUDA registration of
// the ops fastctx::cc_fwd and fastctx::cc_bwd (schemas: csrc/ops/criss_cross.cpp). Device code
// and launch sequences: criss_cross_kernels.cuh (design notes and what would make it faster are
// at its top).
//
// Inputs are made NCHW-contiguous with .contiguous(): the only copy, a no-op for NCHW input
// (channels_last or other strided inputs are copied once). Outputs are NCHW-contiguous in the
// input dtype; lse and the backward's D are float32 (float64 for float64 inputs). Accumulation is
// float32 for half / bfloat16 / float32 and float64 for float64. The backward gathers per key
// (no atomics): results are deterministic run to run.
//
// The current stream comes from c10/cuda/CUDAStream.h (the function behind
// at::cuda::getCurrentCUDAStream): ATen/cuda/CUDAContext.h pulls in cuSPARSE / cuBLAS headers,
// which a bare CUDA toolkit (as on the build machine) lacks.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../ops/criss_cross.h"
#include "common.cuh"
#include "launch.cuh"
#include "criss_cross_kernels.cuh"

namespace fastctx {
namespace cc {
namespace {

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> cc_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                               const at::Tensor& v_in, double scale) {
  cc_checks::qkv(at::kCUDA, q_in, k_in, v_in, "cc_fwd");
  c10::cuda::CUDAGuard guard(q_in.device());
  return fwd(gpu::CudaLaunch(), q_in, k_in, v_in, scale);
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> cc_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  cc_checks::bwd(at::kCUDA, dout_in, q_in, k_in, v_in, out_in, lse_in);
  c10::cuda::CUDAGuard guard(q_in.device());
  return bwd(gpu::CudaLaunch(), dout_in, q_in, k_in, v_in, out_in, lse_in, scale);
}


}  // namespace
}  // namespace cc
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("cc_fwd", &fastctx::cc::cc_fwd_cuda);
  m.impl("cc_bwd", &fastctx::cc::cc_bwd_cuda);
}
