// Spatial gather (OCR's soft region pooling), CUDA: argument checks, the launcher and the CUDA
// registration of the ops fastctx::sg_fwd and sg_bwd (schemas and contract:
// csrc/ops/spatial_gather.cpp). Device code and launch sequences: spatial_gather_kernels.cuh.
//
// Inputs are made NCHW-contiguous with .contiguous() (a no-op for NCHW input). No host
// synchronisation and no atomics: outputs are bit-identical run to run.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../ops/spatial_gather.h"
#include "common.cuh"
#include "launch.cuh"
#include "spatial_gather_kernels.cuh"

namespace fastctx {
namespace sg_gpu {
namespace {

#define SG_OP "fastctx.spatial_gather"

// The CUDA-only limit: the kernels put the images and the classes on grid axes y and z.
void check_limits(const at::Tensor& feats, const at::Tensor& logits, const char* stage) {
  TORCH_CHECK(feats.size(0) <= 65535 && logits.size(1) <= 65535, SG_OP " (", stage,
              "): at most 65535 images and classes on CUDA, got feats ", feats.sizes(),
              " and logits ", logits.sizes());
}

std::tuple<at::Tensor, at::Tensor> sg_fwd_cuda(const at::Tensor& feats, const at::Tensor& logits,
                                               double scale) {
  sg_checks::inputs(at::kCUDA, feats, logits, scale, "sg_fwd");
  check_limits(feats, logits, "sg_fwd");
  c10::cuda::CUDAGuard guard(feats.device());
  return fwd(gpu::CudaLaunch(), feats, logits, scale);
}

std::tuple<at::Tensor, at::Tensor> sg_bwd_cuda(const at::Tensor& dregions, const at::Tensor& feats,
                                               const at::Tensor& logits, const at::Tensor& regions,
                                               const at::Tensor& lse, double scale) {
  sg_checks::bwd(at::kCUDA, dregions, feats, logits, regions, lse, scale);
  check_limits(feats, logits, "sg_bwd");
  c10::cuda::CUDAGuard guard(feats.device());
  return bwd(gpu::CudaLaunch(), dregions, feats, logits, regions, lse, scale);
}

#undef SG_OP

}  // namespace
}  // namespace sg_gpu
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("sg_fwd", &fastctx::sg_gpu::sg_fwd_cuda);
  m.impl("sg_bwd", &fastctx::sg_gpu::sg_bwd_cuda);
}
