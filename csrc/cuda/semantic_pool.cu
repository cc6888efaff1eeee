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

#include "common.cuh"
#include "launch.cuh"
#include "semantic_pool_kernels.cuh"

namespace fastctx {
namespace sp_gpu {
namespace {

#define SP_OP "fastctx.semantic_pool"

void check_grid_y(int64_t B, const char* stage) {
  TORCH_CHECK(B <= 65535, SP_OP " (", stage, "): at most 65535 images per call on CUDA, got ", B);
}

// labels: int64 [B, H, W] on the device of `ref`.
void check_labels(const at::Tensor& labels, int64_t B, int64_t H, int64_t W, const char* stage,
                  const at::Tensor& ref, const char* ref_name) {
  gpu::check_tensor(SP_OP, stage, labels, "labels", 3, "[B, H, W]", ref, ref_name, false);
  TORCH_CHECK(labels.scalar_type() == at::kLong, SP_OP " (", stage, "): labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.size(0) == B && labels.size(1) == H && labels.size(2) == W,
              SP_OP " (", stage, "): labels must be [B, H, W] = [", B, ", ", H, ", ", W, "], got ",
              labels.sizes());
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sp_fwd_cuda(const at::Tensor& feats_in,
                                                                       const at::Tensor& logits_in) {
  gpu::check_tensor(SP_OP, "sp_fwd", feats_in, "feats", 4, "[B, C, H, W]", feats_in, "feats");
  gpu::check_float(SP_OP, "sp_fwd", feats_in, "feats");
  gpu::check_tensor(SP_OP, "sp_fwd", logits_in, "logits", 4, "[B, K, H, W]", feats_in, "feats");
  TORCH_CHECK(logits_in.size(0) == feats_in.size(0) && logits_in.size(2) == feats_in.size(2) &&
                  logits_in.size(3) == feats_in.size(3),
              SP_OP " (sp_fwd): feats and logits must agree in batch and spatial size, got feats ",
              feats_in.sizes(), " and logits ", logits_in.sizes());
  const int64_t B = feats_in.size(0), K = logits_in.size(1);
  TORCH_CHECK(K > 0, SP_OP " (sp_fwd): logits needs at least one class, got shape ",
              logits_in.sizes());
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max(), SP_OP " (sp_fwd): at most 2^31 - 1 classes, got shape ",
              logits_in.sizes());
  check_grid_y(B, "sp_fwd");
  c10::cuda::CUDAGuard guard(feats_in.device());
  return fwd(gpu::CudaLaunch(), feats_in, logits_in);
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> sp_bwd_cuda(const at::Tensor& dregions_in,
                                               const at::Tensor& feats_in,
                                               const at::Tensor& labels_in, const at::Tensor& w_in,
                                               const at::Tensor& regions_in) {
  gpu::check_tensor(SP_OP, "sp_bwd", feats_in, "feats", 4, "[B, C, H, W]", feats_in, "feats");
  gpu::check_float(SP_OP, "sp_bwd", feats_in, "feats");
  gpu::check_tensor(SP_OP, "sp_bwd", dregions_in, "dregions", 3, "[B, C, K]", feats_in, "feats", false);
  gpu::check_tensor(SP_OP, "sp_bwd", regions_in, "regions", 3, "[B, C, K]", feats_in, "feats", false);
  gpu::check_tensor(SP_OP, "sp_bwd", w_in, "w", 3, "[B, H, W]", feats_in, "feats", false);
  gpu::check_float(SP_OP, "sp_bwd", dregions_in, "dregions");
  gpu::check_float(SP_OP, "sp_bwd", regions_in, "regions");
  gpu::check_float(SP_OP, "sp_bwd", w_in, "w");
  const int64_t B = feats_in.size(0), C = feats_in.size(1), H = feats_in.size(2),
                W = feats_in.size(3), K = regions_in.size(2);
  TORCH_CHECK(regions_in.size(0) == B && regions_in.size(1) == C && K > 0,
              SP_OP " (sp_bwd): regions must be [B, C, K] with B, C of feats ", feats_in.sizes(),
              " and K >= 1, got ", regions_in.sizes());
  TORCH_CHECK(dregions_in.sizes() == regions_in.sizes(), SP_OP " (sp_bwd): dregions must be ",
              regions_in.sizes(), ", got ", dregions_in.sizes());
  TORCH_CHECK(w_in.size(0) == B && w_in.size(1) == H && w_in.size(2) == W,
              SP_OP " (sp_bwd): w must be [B, H, W] = [", B, ", ", H, ", ", W, "], got ",
              w_in.sizes());
  check_labels(labels_in, B, H, W, "sp_bwd", feats_in, "feats");
  check_grid_y(B, "sp_bwd");
  c10::cuda::CUDAGuard guard(feats_in.device());
  return bwd(gpu::CudaLaunch(), dregions_in, feats_in, labels_in, w_in, regions_in);
}

// ---------------------------------------------------------------------------------------------
at::Tensor sp_gather_cuda(const at::Tensor& regions_in, const at::Tensor& labels_in,
                          at::ScalarType dtype) {
  gpu::check_tensor(SP_OP, "sp_gather", regions_in, "regions", 3, "[B, C, K]", regions_in, "regions");
  gpu::check_float(SP_OP, "sp_gather", regions_in, "regions");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              SP_OP " (sp_gather): dtype must be a floating-point type, got ", dtype);
  const int64_t B = regions_in.size(0), C = regions_in.size(1), K = regions_in.size(2);
  gpu::check_tensor(SP_OP, "sp_gather", labels_in, "labels", 3, "[B, H, W]", regions_in, "regions", false);
  const int64_t H = labels_in.size(1), W = labels_in.size(2), N = H * W;
  check_labels(labels_in, B, H, W, "sp_gather", regions_in, "regions");
  check_grid_y(B, "sp_gather");
  TORCH_CHECK(B * C * N == 0 || K > 0, SP_OP " (sp_gather): regions has no classes, got shape ",
              regions_in.sizes());
  c10::cuda::CUDAGuard guard(regions_in.device());
  return gather(gpu::CudaLaunch(), regions_in, labels_in, dtype);
}

at::Tensor sp_scatter_cuda(const at::Tensor& dpooled_in, const at::Tensor& labels_in, int64_t K) {
  gpu::check_tensor(SP_OP, "sp_scatter", dpooled_in, "dpooled", 4, "[B, C, H, W]", dpooled_in, "dpooled");
  gpu::check_float(SP_OP, "sp_scatter", dpooled_in, "dpooled");
  TORCH_CHECK(K > 0, SP_OP " (sp_scatter): K must be positive, got ", K);
  check_labels(labels_in, dpooled_in.size(0), dpooled_in.size(2), dpooled_in.size(3), "sp_scatter",
               dpooled_in, "dpooled");
  check_grid_y(dpooled_in.size(0), "sp_scatter");
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
