// Semantic pooling (ISNet's per-class pooling), CUDA: host launchers and the CUDA registration of
// the ops fastctx::sp_fwd, sp_bwd, sp_gather and sp_scatter (schemas and contract:
// csrc/ops/semantic_pool.cpp). Device code and design: semantic_pool_kernels.cuh.
//
// Inputs are made NCHW-contiguous with .contiguous() (a no-op for NCHW input); regions, w and the
// gradients of regions are taken in the compute dtype (float32 for float16 / bfloat16 / float32,
// float64 for float64), which is also the accumulation dtype. No host synchronisation and no
// atomics: outputs are bit-identical run to run (deterministic with or without
// torch.use_deterministic_algorithms).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../ops/semantic_pool.h"
#include "common.cuh"
#include "launch.cuh"
#include "semantic_pool_kernels.cuh"

namespace fastctx {
namespace sp_gpu {
namespace {

#define SP_OP "fastctx.semantic_pool"

// The CUDA-only limits: the kernels put the images on grid axis y and the classes in int32.
void check_limits(int64_t B, int64_t K, const char* stage) {
  TORCH_CHECK(B <= 65535, SP_OP " (", stage, "): at most 65535 images per call on CUDA, got ", B);
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max(), SP_OP " (", stage,
              "): at most 2^31 - 1 classes, got ", K);
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sp_fwd_cuda(const at::Tensor& feats_in,
                                                                       const at::Tensor& logits_in) {
  sp_checks::fwd(at::kCUDA, feats_in, logits_in);
  check_limits(feats_in.size(0), logits_in.size(1), "sp_fwd");
  c10::cuda::CUDAGuard guard(feats_in.device());
  return fwd(gpu::CudaLaunch(), feats_in, logits_in);
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> sp_bwd_cuda(const at::Tensor& dregions_in,
                                               const at::Tensor& feats_in,
                                               const at::Tensor& labels_in, const at::Tensor& w_in,
                                               const at::Tensor& regions_in) {
  sp_checks::bwd(at::kCUDA, dregions_in, feats_in, labels_in, w_in, regions_in);
  check_limits(feats_in.size(0), regions_in.size(2), "sp_bwd");
  c10::cuda::CUDAGuard guard(feats_in.device());
  return bwd(gpu::CudaLaunch(), dregions_in, feats_in, labels_in, w_in, regions_in);
}

// ---------------------------------------------------------------------------------------------
at::Tensor sp_gather_cuda(const at::Tensor& regions_in, const at::Tensor& labels_in,
                          at::ScalarType dtype) {
  sp_checks::gather(at::kCUDA, regions_in, labels_in, dtype);
  check_limits(regions_in.size(0), regions_in.size(2), "sp_gather");
  c10::cuda::CUDAGuard guard(regions_in.device());
  return gather(gpu::CudaLaunch(), regions_in, labels_in, dtype);
}

at::Tensor sp_scatter_cuda(const at::Tensor& dpooled_in, const at::Tensor& labels_in, int64_t K) {
  sp_checks::scatter(at::kCUDA, dpooled_in, labels_in, K);
  check_limits(dpooled_in.size(0), K, "sp_scatter");
  c10::cuda::CUDAGuard guard(dpooled_in.device());
  return scatter(gpu::CudaLaunch(), dpooled_in, labels_in, K);
}

#undef SP_OP

}  // namespace
}  // namespace sp_gpu
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("sp_fwd", &fastctx::sp_gpu::sp_fwd_cuda);
  m.impl("sp_bwd", &fastctx::sp_gpu::sp_bwd_cuda);
  m.impl("sp_gather", &fastctx::sp_gpu::sp_gather_cuda);
  m.impl("sp_scatter", &fastctx::sp_gpu::sp_scatter_cuda);
}
