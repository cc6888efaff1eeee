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

#include <cmath>
#include <cstdint>
#include <tuple>

#include "common.cuh"
#include "launch.cuh"
#include "spatial_gather_kernels.cuh"

namespace fastctx {
namespace sg_gpu {
namespace {

#define SG_OP "fastctx.spatial_gather"

void check_inputs(const at::Tensor& feats, const at::Tensor& logits, double scale, const char* op) {
  gpu::check_tensor(SG_OP, op, feats, "feats", 4, "[B, C, H, W]", feats, "feats");
  gpu::check_float(SG_OP, op, feats, "feats");
  gpu::check_tensor(SG_OP, op, logits, "logits", 4, "[B, K, H, W]", feats, "feats");
  TORCH_CHECK(logits.size(0) == feats.size(0) && logits.size(2) == feats.size(2) &&
                  logits.size(3) == feats.size(3),
              SG_OP " (", op, "): feats and logits must agree in batch and spatial size, got "
              "feats ", feats.sizes(), " and logits ", logits.sizes());
  TORCH_CHECK(feats.numel() > 0 && logits.numel() > 0, SG_OP " (", op,
              "): feats and logits must not be empty, got feats ", feats.sizes(), " and logits ",
              logits.sizes());
  TORCH_CHECK(std::isfinite(scale) && scale > 0, SG_OP " (", op,
              "): scale must be positive and finite, got ", scale);
  TORCH_CHECK(feats.size(0) <= 65535 && logits.size(1) <= 65535, SG_OP " (", op,
              "): at most 65535 images and classes on CUDA, got feats ", feats.sizes(),
              " and logits ", logits.sizes());
}

std::tuple<at::Tensor, at::Tensor> sg_fwd_cuda(const at::Tensor& feats, const at::Tensor& logits,
                                               double scale) {
  check_inputs(feats, logits, scale, "sg_fwd");
  c10::cuda::CUDAGuard guard(feats.device());
  return fwd(gpu::CudaLaunch(), feats, logits, scale);
}

std::tuple<at::Tensor, at::Tensor> sg_bwd_cuda(const at::Tensor& dregions, const at::Tensor& feats,
                                               const at::Tensor& logits, const at::Tensor& regions,
                                               const at::Tensor& lse, double scale) {
  check_inputs(feats, logits, scale, "sg_bwd");
  const int64_t B = feats.size(0), C = feats.size(1), K = logits.size(1);
  gpu::check_tensor(SG_OP, "sg_bwd", dregions, "dregions", 3, "[B, C, K]", feats, "feats");
  gpu::check_tensor(SG_OP, "sg_bwd", regions, "regions", 3, "[B, C, K]", feats, "feats");
  for (const at::Tensor* t : {&dregions, &regions})
    TORCH_CHECK(t->size(0) == B && t->size(1) == C && t->size(2) == K,
                SG_OP " (sg_bwd): dregions and regions must be [B, C, K] = [", B, ", ", C, ", ",
                K, "], got ", t->sizes());
  const at::ScalarType ct = compute_dtype(feats.scalar_type());
  gpu::check_tensor(SG_OP, "sg_bwd", lse, "lse", 2, "[B, K]", feats, "feats", false);
  TORCH_CHECK(lse.size(0) == B && lse.size(1) == K, SG_OP " (sg_bwd): lse must have shape [B, K] = [",
              B, ", ", K, "], got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == ct, SG_OP " (sg_bwd): lse must have dtype ", ct, " for ",
              feats.scalar_type(), " inputs, got ", lse.scalar_type());
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
