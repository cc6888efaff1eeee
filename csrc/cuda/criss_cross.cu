// Criss-cross attention (CCNet), CUDA: host launchers and the CUDA registration of the ops
// fastctx::cc_fwd and fastctx::cc_bwd (schemas: csrc/ops/criss_cross.cpp). Device code:
// criss_cross_kernels.cuh (design notes and what would make it faster are at its top).
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
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common.cuh"
#include "criss_cross_kernels.cuh"

namespace fastctx {
namespace cc {
namespace {

#define CC_OP "fastctx.criss_cross_attention"

// Register-chunk widths: VC channels of v / out / dout, QC channels of q / k per pass over the
// partners. QC = 64 keeps CCNet's Cqk = 64 in one pass (dA over Cv is computed once); small
// Cqk (the odd test sizes) take the 16-wide variant so as not to predicate 48 dead lanes, and so
// does float64 always (64 doubles would not fit the register file: ptxas spills).
constexpr int kVC = 32;
constexpr int kQCSmall = 16;
constexpr int kQCLarge = 64;

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

at::ScalarType lse_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Thread-per-pixel launch shape shared by the forward, dq, dk and dv kernels: blockDim.x threads
// over a tile of j (a multiple of 32, at most kThreads), blockDim.y = kThreads / blockDim.x rows
// (b, i) per block so that narrow maps still fill the block; a 1-D grid of row groups x j tiles.
struct PixelLaunch {
  dim3 grid, block;
  int64_t n_jtiles;
};

// grid.y spreads `chunks` independent channel chunks (forward, dv) over blocks: just enough
// y-blocks to give about kBlocksPerSM blocks per multiprocessor, at most one per chunk.
constexpr int64_t kBlocksPerSM = 8;

PixelLaunch pixel_launch(int64_t B, int64_t H, int64_t W, int64_t chunks = 1) {
  const int64_t tj = W >= kThreads ? kThreads : (W + 31) / 32 * 32;
  const int64_t rows = kThreads / tj;
  const int64_t n_jtiles = (W + tj - 1) / tj;
  const int64_t blocks = (B * H + rows - 1) / rows * n_jtiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              CC_OP ": map too large for one launch (B=", B, ", H=", H, ", W=", W, ")");
  int64_t gy = 1;
  if (chunks > 1) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                          c10::cuda::current_device()));
    const int64_t want = (kBlocksPerSM * sms + blocks - 1) / blocks;
    gy = std::max<int64_t>(1, std::min<int64_t>({want, chunks, 65535}));
  }
  return {dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(gy)),
          dim3(static_cast<unsigned>(tj), static_cast<unsigned>(rows)), n_jtiles};
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> cc_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                               const at::Tensor& v_in, double scale) {
  check_qkv(q_in, k_in, v_in, "cc_fwd");
  const int64_t B = q_in.size(0), Cqk = q_in.size(1), H = q_in.size(2), W = q_in.size(3);
  const int64_t Cv = v_in.size(1);
  auto out = at::empty({B, Cv, H, W}, v_in.options());
  auto lse = at::empty({B, H, W}, q_in.options().dtype(lse_dtype(q_in.scalar_type())));
  if (B * H * W == 0) return {out, lse};  // nothing to compute; no launch

  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  // At least one y-block even when Cv == 0: the forward also writes lse.
  const PixelLaunch L = pixel_launch(B, H, W, (Cv + kVC - 1) / kVC);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  q.scalar_type(), "cc_fwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    cc_fwd_kernel<scalar_t, acc_t, kTile, kVC><<<L.grid, L.block, 0, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>(), B, Cqk, Cv, H, W,
        L.n_jtiles, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
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
  const int64_t B = q_in.size(0), Cqk = q_in.size(1), H = q_in.size(2), W = q_in.size(3);
  const int64_t Cv = v_in.size(1);
  TORCH_CHECK(lse_in.defined() && lse_in.is_cuda() && lse_in.device() == q_in.device(),
              CC_OP " (cc_bwd): lse must be a CUDA tensor on ", q_in.device());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H &&
                  lse_in.size(2) == W,
              CC_OP " (cc_bwd): lse must have shape [B, H, W] = [", B, ", ", H, ", ", W,
              "], got ", lse_in.sizes());
  const at::ScalarType acc_dtype = lse_dtype(q_in.scalar_type());
  TORCH_CHECK(lse_in.scalar_type() == acc_dtype, CC_OP " (cc_bwd): lse must have dtype ",
              acc_dtype, " for ", q_in.scalar_type(), " inputs, got ", lse_in.scalar_type());

  auto dq = at::empty({B, Cqk, H, W}, q_in.options());
  auto dk = at::empty({B, Cqk, H, W}, k_in.options());
  auto dv = at::empty({B, Cv, H, W}, v_in.options());
  if (B * H * W == 0) return {dq, dk, dv};  // nothing to compute; no launch

  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor dout = dout_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous(),
                   v = v_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  auto delta = at::empty({B, H, W}, lse.options());
  const PixelLaunch L = pixel_launch(B, H, W);                        // dq, dk
  const PixelLaunch Lv = pixel_launch(B, H, W, (Cv + kVC - 1) / kVC);  // dv
  const int64_t HW = H * W;
  const int64_t delta_blocks = std::min<int64_t>((B * HW + kThreads - 1) / kThreads, 1 << 20);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  q.scalar_type(), "cc_bwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const acc_t sc = static_cast<acc_t>(scale);
    const scalar_t* dout_p = dout.const_data_ptr<scalar_t>();
    const scalar_t* q_p = q.const_data_ptr<scalar_t>();
    const scalar_t* k_p = k.const_data_ptr<scalar_t>();
    const scalar_t* v_p = v.const_data_ptr<scalar_t>();
    const acc_t* lse_p = lse.const_data_ptr<acc_t>();
    acc_t* delta_p = delta.mutable_data_ptr<acc_t>();

    // Kernel 0: D = <dout, out> per pixel (0 when Cv == 0).
    cc_bwd_delta_kernel<scalar_t, acc_t><<<static_cast<unsigned>(delta_blocks), kThreads, 0,
                                           stream>>>(dout_p, out.const_data_ptr<scalar_t>(),
                                                     delta_p, B, Cv, HW);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // Kernels 1 and 2: dq per query, dk per key (gathered from the queries that see it).
    auto launch_dq_dk = [&](auto qc) {
      constexpr int QC = decltype(qc)::value;
      cc_bwd_dq_kernel<scalar_t, acc_t, kTile, QC><<<L.grid, L.block, 0, stream>>>(
          dout_p, q_p, k_p, v_p, lse_p, delta_p, dq.mutable_data_ptr<scalar_t>(), B, Cqk, Cv, H,
          W, L.n_jtiles, sc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cc_bwd_dk_kernel<scalar_t, acc_t, kTile, QC><<<L.grid, L.block, 0, stream>>>(
          dout_p, q_p, k_p, v_p, lse_p, delta_p, dk.mutable_data_ptr<scalar_t>(), B, Cqk, Cv, H,
          W, L.n_jtiles, sc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // float64 (gradcheck, not speed) takes the narrow chunk for any Cqk.
    constexpr int qc_wide = std::is_same_v<acc_t, double> ? kQCSmall : kQCLarge;
    if (Cqk > 0 && Cqk <= kQCSmall) {
      launch_dq_dk(std::integral_constant<int, kQCSmall>{});
    } else if (Cqk > kQCSmall) {
      launch_dq_dk(std::integral_constant<int, qc_wide>{});
    }
    if (Cv > 0) {
      // Kernel 3: dv per key.
      cc_bwd_dv_kernel<scalar_t, acc_t, kTile, kVC><<<Lv.grid, Lv.block, 0, stream>>>(
          dout_p, q_p, k_p, lse_p, dv.mutable_data_ptr<scalar_t>(), B, Cqk, Cv, H, W,
          Lv.n_jtiles, sc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dq, dk, dv};
}

#undef CC_OP

}  // namespace
}  // namespace cc
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("cc_fwd", &fastctx::cc::cc_fwd_cuda);
  m.impl("cc_bwd", &fastctx::cc::cc_bwd_cuda);
}
