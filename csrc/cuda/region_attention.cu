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

#include "common.cuh"
#include "launch.cuh"
#include "region_attention_kernels.cuh"

namespace fastctx {
namespace ra_gpu {
namespace {

#define RA_OP "fastctx.region_attention"

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& bias, double scale, const char* op) {
  gpu::check_tensor(RA_OP, op, q, "q", 4, "[B, Cqk, H, W]", q, "q");
  gpu::check_float(RA_OP, op, q, "q");
  gpu::check_tensor(RA_OP, op, k, "k", 3, "[B, Cqk, S]", q, "q");
  gpu::check_tensor(RA_OP, op, v, "v", 3, "[B, Cv, S]", q, "q");
  gpu::check_tensor(RA_OP, op, bias, "bias", 2, "[B, S]", q, "q");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1), RA_OP " (", op,
              "): q and k must agree in batch and channels, got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(2) == k.size(2), RA_OP " (", op,
              "): v must match k in batch and number of keys, got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(bias.size(0) == k.size(0) && bias.size(1) == k.size(2), RA_OP " (", op,
              "): bias must be [B, S] = [", k.size(0), ", ", k.size(2), "], got ", bias.sizes());
  TORCH_CHECK(k.size(2) > 0 && q.size(1) > 0 && v.size(1) > 0, RA_OP " (", op,
              "): needs at least one key and one channel, got q ", q.sizes(), ", k ", k.sizes(),
              " and v ", v.sizes());
  TORCH_CHECK(std::isfinite(scale), RA_OP " (", op, "): scale must be finite, got ", scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ra_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& bias,
                                                           double scale, bool /*keep_p*/) {
  check_inputs(q, k, v, bias, scale, "ra_fwd");
  c10::cuda::CUDAGuard guard(q.device());
  return fwd(gpu::CudaLaunch(), q, k, v, bias, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ra_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& bias, const at::Tensor& out, const at::Tensor& /*lse*/,
    const at::Tensor& /*p*/, double scale) {
  check_inputs(q, k, v, bias, scale, "ra_bwd");
  const std::vector<int64_t> shape{q.size(0), v.size(1), q.size(2), q.size(3)};
  gpu::check_tensor(RA_OP, "ra_bwd", dout, "dout", 4, "[B, Cv, H, W]", q, "q");
  gpu::check_tensor(RA_OP, "ra_bwd", out, "out", 4, "[B, Cv, H, W]", q, "q");
  TORCH_CHECK(dout.sizes() == at::IntArrayRef(shape) && out.sizes() == at::IntArrayRef(shape),
              RA_OP " (ra_bwd): dout and out must be [B, Cv, H, W] = ", at::IntArrayRef(shape),
              ", got ", dout.sizes(), " and ", out.sizes());
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
