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

#include "common.cuh"
#include "launch.cuh"
#include "criss_cross_kernels.cuh"

namespace fastctx {
namespace cc {
namespace {

#define CC_OP "fastctx.criss_cross_attention"

void check_cuda_4d(const at::Tensor& t, const char* op, const char* name, const char* shape,
                   const at::Tensor& ref) {
  gpu::check_tensor(CC_OP, op, t, name, 4, shape, ref, "q");
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  check_cuda_4d(q, op, "q", "[B, Cqk, H, W]", q);
  check_cuda_4d(k, op, "k", "[B, Cqk, H, W]", q);
  check_cuda_4d(v, op, "v", "[B, Cv, H, W]", q);
  TORCH_CHECK(k.sizes() == q.sizes(), CC_OP " (", op, "): q and k must have the same shape, got q ",
              q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(2) == q.size(2) && v.size(3) == q.size(3),
              CC_OP " (", op, "): v must match q in batch and spatial size, got q ", q.sizes(),
              " and v ", v.sizes());
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> cc_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                               const at::Tensor& v_in, double scale) {
  check_qkv(q_in, k_in, v_in, "cc_fwd");
  c10::cuda::CUDAGuard guard(q_in.device());
  return fwd(gpu::CudaLaunch(), q_in, k_in, v_in, scale);
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> cc_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  check_qkv(q_in, k_in, v_in, "cc_bwd");
  check_cuda_4d(dout_in, "cc_bwd", "dout", "[B, Cv, H, W]", q_in);
  check_cuda_4d(out_in, "cc_bwd", "out", "[B, Cv, H, W]", q_in);
  TORCH_CHECK(dout_in.sizes() == v_in.sizes(), CC_OP " (cc_bwd): dout must have the shape of v ",
              v_in.sizes(), ", got ", dout_in.sizes());
  TORCH_CHECK(out_in.sizes() == v_in.sizes(), CC_OP " (cc_bwd): out must have the shape of v ",
              v_in.sizes(), ", got ", out_in.sizes());
  const int64_t B = q_in.size(0), H = q_in.size(2), W = q_in.size(3);
  TORCH_CHECK(lse_in.defined() && lse_in.is_cuda() && lse_in.device() == q_in.device(),
              CC_OP " (cc_bwd): lse must be a CUDA tensor on ", q_in.device());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H &&
                  lse_in.size(2) == W,
              CC_OP " (cc_bwd): lse must have shape [B, H, W] = [", B, ", ", H, ", ", W,
              "], got ", lse_in.sizes());
  const at::ScalarType acc_dtype = lse_dtype(q_in.scalar_type());
  TORCH_CHECK(lse_in.scalar_type() == acc_dtype, CC_OP " (cc_bwd): lse must have dtype ",
              acc_dtype, " for ", q_in.scalar_type(), " inputs, got ", lse_in.scalar_type());

  c10::cuda::CUDAGuard guard(q_in.device());
  return bwd(gpu::CudaLaunch(), dout_in, q_in, k_in, v_in, out_in, lse_in, scale);
}

#undef CC_OP

}  // namespace
}  // namespace cc
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("cc_fwd", &fastctx::cc::cc_fwd_cuda);
  m.impl("cc_bwd", &fastctx::cc::cc_bwd_cuda);
}
