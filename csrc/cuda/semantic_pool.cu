// Semantic pooling (ISNet's per-class pooling), CUDA: host launchers and the CUDA registration of
// the ops fastctx::sp_fwd, sp_bwd, sp_gather and sp_scatter (schemas and contract:
// csrc/ops/semantic_pool.cpp). Device code and design: semantic_pool_kernels.cuh.
//
// Inputs are made NCHW-contiguous with .contiguous() (a no-op for NCHW input); regions, w and the
// gradients of regions are taken in the compute dtype (float32 for float16 / bfloat16 / float32,
// float64 for float64), which is also the accumulation dtype. No host synchronisation and no
// atomics: outputs are bit-identical run to run (deterministic with or without
// torch.use_deterministic_algorithms).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common.cuh"
#include "semantic_pool_kernels.cuh"

namespace fastctx {
namespace sp_gpu {
namespace {

#define SP_OP "fastctx.semantic_pool"

constexpr int64_t kSmemBudget = 48 * 1024;  // dynamic shared memory without an opt-in
// Pixel groups of the segmented sum: about kBlocksPerSM blocks per multiprocessor, each group at
// least two tiles, and the groups' partials at most kPartialBytes (they are written and read back
// once; that size stays in L2).
constexpr int64_t kBlocksPerSM = 4;
constexpr int64_t kPartialBytes = int64_t(16) << 20;

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned blocks_for(int64_t threads) {
  const int64_t n = cdiv(threads, kPix);
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), SP_OP ": too many elements for one launch (",
              threads, ")");
  return static_cast<unsigned>(n);
}

void check_grid_y(int64_t B, const char* stage) {
  TORCH_CHECK(B <= 65535, SP_OP " (", stage, "): at most 65535 images per call on CUDA, got ", B);
}

int multiprocessors() {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        c10::cuda::current_device()));
  return sms;
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

// out [B, C, K] (compute dtype acc_t) = the segmented sum of x [B, C, N] (NCHW-contiguous)
// weighted by w [B, N] (or by 1 when w is undefined).
template <typename scalar_t, typename acc_t>
void segsum(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w, at::Tensor& out,
            cudaStream_t stream) {
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3), K = out.size(2);
  if (B == 0 || C == 0 || N == 0) return;  // out is zeros
  // classes per block: as many accumulators as fit next to the staged tile (float: 232, double: 48)
  constexpr int64_t per_class = (kCT + 1) * int64_t(sizeof(acc_t));
  constexpr int64_t kt_cap = (kSmemBudget - segsum_smem_fixed<acc_t>()) / per_class / kWarps * kWarps;
  static_assert(kt_cap >= kWarps, "the segmented sum's tile leaves no room for accumulators");
  const int64_t KT = std::min(K, kt_cap);
  const int64_t n_ct = cdiv(C, kCT), n_kt = cdiv(K, KT), n_tiles = cdiv(N, kPT);
  const int64_t per_group = B * n_ct * n_kt;
  int64_t G = cdiv(kBlocksPerSM * multiprocessors(), per_group);
  G = std::min(G, std::max<int64_t>(1, n_tiles / 2));
  G = std::min(G, std::max<int64_t>(1, kPartialBytes / (B * C * K * int64_t(sizeof(acc_t)))));
  const int64_t pix = cdiv(n_tiles, G) * kPT;
  G = cdiv(N, pix);  // no empty group
  TORCH_CHECK(G * n_ct * n_kt <= std::numeric_limits<int32_t>::max(),
              SP_OP ": too many blocks for one launch (C=", C, ", K=", K, ", N=", N, ")");
  const int64_t smem = segsum_smem<acc_t>(KT);
  at::Tensor part = G == 1 ? out : at::empty({B, G, C, K}, out.options());
  const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
  const dim3 grid(static_cast<unsigned>(G * n_ct * n_kt), static_cast<unsigned>(B));
  if (wp != nullptr) {
    segsum_kernel<scalar_t, acc_t, true><<<grid, kWarps * 32, smem, stream>>>(
        x.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), wp,
        part.mutable_data_ptr<acc_t>(), C, N, K, KT, n_ct, n_kt, G, pix);
  } else {
    segsum_kernel<scalar_t, acc_t, false><<<grid, kWarps * 32, smem, stream>>>(
        x.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), nullptr,
        part.mutable_data_ptr<acc_t>(), C, N, K, KT, n_ct, n_kt, G, pix);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (G > 1) {
    sum_groups_kernel<acc_t><<<blocks_for(B * C * K), kPix, 0, stream>>>(
        part.const_data_ptr<acc_t>(), out.mutable_data_ptr<acc_t>(), B, G, C * K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
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
  const int64_t B = feats_in.size(0), C = feats_in.size(1), H = feats_in.size(2),
                W = feats_in.size(3), K = logits_in.size(1), N = H * W;
  TORCH_CHECK(K > 0, SP_OP " (sp_fwd): logits needs at least one class, got shape ",
              logits_in.sizes());
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max(), SP_OP " (sp_fwd): at most 2^31 - 1 classes, got shape ",
              logits_in.sizes());
  check_grid_y(B, "sp_fwd");
  const at::ScalarType ct = compute_dtype(feats_in.scalar_type());
  const auto copts = feats_in.options().dtype(ct), lopts = feats_in.options().dtype(at::kLong);
  at::Tensor regions = at::zeros({B, C, K}, copts), counts = at::zeros({B, K}, lopts);
  at::Tensor labels = at::empty({B, H, W}, lopts), w = at::empty({B, H, W}, copts);
  if (B == 0 || N == 0) return {regions, counts, labels, w};

  c10::cuda::CUDAGuard guard(feats_in.device());
  const at::Tensor f = feats_in.contiguous(), l = logits_in.contiguous();
  const int64_t nb = cdiv(N, kPix);
  TORCH_CHECK(nb <= std::numeric_limits<int32_t>::max(), SP_OP " (sp_fwd): map too large (N=", N, ")");
  at::Tensor best = at::empty({B, N}, copts), pmax = at::empty({B, nb, K}, copts),
             psum = at::empty({B, nb, K}, copts),
             pcnt = at::empty({B, nb, K}, feats_in.options().dtype(at::kInt)),
             m = at::empty({B, K}, copts), z = at::empty({B, K}, copts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "sp_fwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    argmax_kernel<scalar_t, acc_t><<<dim3(static_cast<unsigned>(nb), static_cast<unsigned>(B)), kPix, 0, stream>>>(
        l.const_data_ptr<scalar_t>(), labels.mutable_data_ptr<int64_t>(),
        best.mutable_data_ptr<acc_t>(), pmax.mutable_data_ptr<acc_t>(),
        psum.mutable_data_ptr<acc_t>(), pcnt.mutable_data_ptr<int>(), N, K, nb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    class_stats_kernel<acc_t><<<blocks_for(B * K), kPix, 0, stream>>>(
        pmax.const_data_ptr<acc_t>(), psum.const_data_ptr<acc_t>(), pcnt.const_data_ptr<int>(),
        m.mutable_data_ptr<acc_t>(), z.mutable_data_ptr<acc_t>(),
        counts.mutable_data_ptr<int64_t>(), B, K, nb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    weights_kernel<acc_t><<<blocks_for(B * N), kPix, 0, stream>>>(
        labels.const_data_ptr<int64_t>(), best.const_data_ptr<acc_t>(), m.const_data_ptr<acc_t>(),
        z.const_data_ptr<acc_t>(), w.mutable_data_ptr<acc_t>(), B, N, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    segsum<scalar_t, acc_t>(f, labels, w, regions, stream);
  });
  return {regions, counts, labels, w};
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
                W = feats_in.size(3), K = regions_in.size(2), N = H * W;
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
  const at::ScalarType ct = compute_dtype(feats_in.scalar_type());
  at::Tensor dfeats = at::empty({B, C, H, W}, feats_in.options());
  at::Tensor dlogits = at::empty({B, K, H, W}, feats_in.options());
  if (B == 0 || N == 0) return {dfeats, dlogits};

  c10::cuda::CUDAGuard guard(feats_in.device());
  const at::Tensor f = feats_in.contiguous(), dr = dregions_in.to(ct).contiguous(),
                   rg = regions_in.to(ct).contiguous(), wc = w_in.to(ct).contiguous(),
                   lab = labels_in.contiguous();
  at::Tensor drr = at::empty({B, K}, feats_in.options().dtype(ct));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "sp_bwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    drr_kernel<acc_t><<<blocks_for(B * K), kPix, 0, stream>>>(
        dr.const_data_ptr<acc_t>(), rg.const_data_ptr<acc_t>(), drr.mutable_data_ptr<acc_t>(), B,
        C, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_kernel<scalar_t, acc_t><<<dim3(blocks_for(N), static_cast<unsigned>(B)), kPix, 0, stream>>>(
        f.const_data_ptr<scalar_t>(), dr.const_data_ptr<acc_t>(), drr.const_data_ptr<acc_t>(),
        lab.const_data_ptr<int64_t>(), wc.const_data_ptr<acc_t>(),
        dfeats.mutable_data_ptr<scalar_t>(), dlogits.mutable_data_ptr<scalar_t>(), C, N, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dfeats, dlogits};
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
  at::Tensor out = at::empty({B, C, H, W}, regions_in.options().dtype(dtype));
  if (out.numel() == 0) return out;
  TORCH_CHECK(K > 0, SP_OP " (sp_gather): regions has no classes, got shape ", regions_in.sizes());
  c10::cuda::CUDAGuard guard(regions_in.device());
  const at::Tensor r = regions_in.to(dtype).contiguous(), lab = labels_in.contiguous();
  check_grid_y(B, "sp_gather");
  const dim3 grid(blocks_for(N), static_cast<unsigned>(cdiv(C, kGC)), static_cast<unsigned>(B));
  TORCH_CHECK(grid.y <= 65535, SP_OP " (sp_gather): at most ", 65535 * kGC, " channels on CUDA, got ", C);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sp_gather_cuda", [&] {
    gather_kernel<scalar_t><<<grid, kPix, 0, stream>>>(
        r.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(),
        out.mutable_data_ptr<scalar_t>(), C, N, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor sp_scatter_cuda(const at::Tensor& dpooled_in, const at::Tensor& labels_in, int64_t K) {
  gpu::check_tensor(SP_OP, "sp_scatter", dpooled_in, "dpooled", 4, "[B, C, H, W]", dpooled_in, "dpooled");
  gpu::check_float(SP_OP, "sp_scatter", dpooled_in, "dpooled");
  TORCH_CHECK(K > 0, SP_OP " (sp_scatter): K must be positive, got ", K);
  check_labels(labels_in, dpooled_in.size(0), dpooled_in.size(2), dpooled_in.size(3), "sp_scatter",
               dpooled_in, "dpooled");
  const int64_t B = dpooled_in.size(0), C = dpooled_in.size(1);
  check_grid_y(B, "sp_scatter");
  const at::ScalarType ct = compute_dtype(dpooled_in.scalar_type());
  at::Tensor out = at::zeros({B, C, K}, dpooled_in.options().dtype(ct));
  if (out.numel() == 0 || dpooled_in.numel() == 0) return out;
  c10::cuda::CUDAGuard guard(dpooled_in.device());
  const at::Tensor x = dpooled_in.contiguous(), lab = labels_in.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sp_scatter_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    segsum<scalar_t, acc_t>(x, lab, at::Tensor(), out, stream);
  });
  return out;
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
