// Region attention, CUDA: argument checks, the launcher and the CUDA registration of the ops
// fastctx::ra_fwd and ra_bwd (schemas and contract: csrc/ops/region_attention.cpp). Device code
// and launch sequences: region_attention_kernels.cuh. This backend never keeps the weights
// (keep_p is ignored, p comes back empty) and its backward ignores p: it recomputes them.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "../ops/region_attention.h"
#include "common.cuh"
#include "launch.cuh"
#include "region_attention_kernels.cuh"

namespace fastctx {
namespace ra_gpu {
namespace {

#define RA_OP "fastctx.region_attention"

// What only the CUDA kernels need: a key and a channel at least (the CPU kernels take empty
// ones), a finite scale.
void check_cuda_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& bias, double scale, const char* op) {
  ra_checks::inputs(at::kCUDA, q, k, v, bias, op);
  TORCH_CHECK(k.size(2) > 0 && q.size(1) > 0 && v.size(1) > 0, RA_OP " (", op,
              "): needs at least one key and one channel, got q ", q.sizes(), ", k ", k.sizes(),
              " and v ", v.sizes());
  TORCH_CHECK(std::isfinite(scale), RA_OP " (", op, "): scale must be finite, got ", scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ra_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& bias,
                                                           double scale, bool /*keep_p*/) {
  check_cuda_inputs(q, k, v, bias, scale, "ra_fwd");
  c10::cuda::CUDAGuard guard(q.device());
  return fwd(gpu::CudaLaunch(), q, k, v, bias, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ra_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& bias, const at::Tensor& out, const at::Tensor& /*lse*/,
    const at::Tensor& /*p*/, double scale) {
  check_cuda_inputs(q, k, v, bias, scale, "ra_bwd");
  ra_checks::outputs(at::kCUDA, dout, out, q, v);
  c10::cuda::CUDAGuard guard(q.device());
  return bwd(gpu::CudaLaunch(), dout, q, k, v, bias, out, scale);
}

#undef RA_OP

}  // namespace
}  // namespace ra_gpu
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("ra_fwd", &fastctx::ra_gpu::ra_fwd_cuda);
  m.impl("ra_bwd", &fastctx::ra_gpu::ra_bwd_cuda);
}
