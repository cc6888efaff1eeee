// The CUDA kernels and launch sequences of csrc/cuda/*_kernels.cuh (unchanged) run on CPU tensors
// under the emulation of emu.h; built by tests/cuda_emu/build.py. The argument checks of the .cu
// launchers are not part of it (they mirror the CPU kernels' checks, tested there).
#include <torch/extension.h>

#include "emu.h"

#include "cuda/criss_cross_kernels.cuh"
#include "cuda/region_attention_kernels.cuh"
#include "cuda/semantic_pool_kernels.cuh"
#include "cuda/spatial_gather_kernels.cuh"

namespace cc = fastctx::cc;
namespace ra = fastctx::ra_gpu;
namespace sp = fastctx::sp_gpu;
namespace sg = fastctx::sg_gpu;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // criss-cross attention
  m.def("cc_fwd", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, int sms) {
    return cc::fwd(emu::Launch{sms}, q, k, v, scale);
  });
  m.def("cc_bwd", [](const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
                     int sms) { return cc::bwd(emu::Launch{sms}, dout, q, k, v, out, lse, scale); });
  // region attention
  m.def("ra_fwd", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& bias, double scale) {
    return ra::fwd(emu::Launch{1}, q, k, v, bias, scale);
  });
  m.def("ra_bwd", [](const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& bias, const at::Tensor& out,
                     double scale, int sms) {
    return ra::bwd(emu::Launch{sms}, dout, q, k, v, bias, out, scale);
  });
  // semantic pool
  m.def("sp_fwd", [](const at::Tensor& feats, const at::Tensor& logits, int sms) {
    return sp::fwd(emu::Launch{sms}, feats, logits);
  });
  m.def("sp_bwd", [](const at::Tensor& dregions, const at::Tensor& feats, const at::Tensor& labels,
                     const at::Tensor& w, const at::Tensor& regions, int sms) {
    return sp::bwd(emu::Launch{sms}, dregions, feats, labels, w, regions);
  });
  m.def("sp_gather", [](const at::Tensor& regions, const at::Tensor& labels, at::ScalarType dtype) {
    return sp::gather(emu::Launch{1}, regions, labels, dtype);
  });
  m.def("sp_scatter", [](const at::Tensor& dpooled, const at::Tensor& labels, int64_t K, int sms) {
    return sp::scatter(emu::Launch{sms}, dpooled, labels, K);
  });
  m.def("segsum_plan", [](int64_t B, int64_t C, int64_t N, int64_t K, int64_t sms, bool dbl) {
    const sp::SegsumPlan p = dbl ? sp::segsum_plan<double>(B, C, N, K, sms)
                                 : sp::segsum_plan<float>(B, C, N, K, sms);
    return std::make_tuple(p.KT, p.n_ct, p.n_kt, p.G, p.pix);
  });
  // spatial gather
  m.def("sg_fwd", [](const at::Tensor& feats, const at::Tensor& logits, double scale, int sms) {
    return sg::fwd(emu::Launch{sms}, feats, logits, scale);
  });
  m.def("sg_bwd", [](const at::Tensor& dregions, const at::Tensor& feats, const at::Tensor& logits,
                     const at::Tensor& regions, const at::Tensor& lse, double scale) {
    return sg::bwd(emu::Launch{1}, dregions, feats, logits, regions, lse, scale);
  });
  m.def("sg_fwd_plan", [](int64_t B, int64_t C, int64_t K, int64_t N, int64_t acc_bytes, int64_t sms) {
    return sg::fwd_plan(B, C, K, N, acc_bytes, sms);
  });
}
