// The CUDA semantic pool (csrc/cuda/semantic_pool_kernels.cuh: its kernels and launch sequences,
// unchanged) run on CPU tensors under the emulation of emu.h; built by
// tests/test_semantic_pool_cuda_emu.py. The argument checks of csrc/cuda/semantic_pool.cu are
// not part of it (they are the CPU kernels' checks, tested there).
#include <torch/extension.h>

#include "emu.h"

#include "cuda/semantic_pool_kernels.cuh"

namespace sp = fastctx::sp_gpu;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
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
}
