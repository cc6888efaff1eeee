// The argument checks of the compiled semantic-pooling ops (schemas: semantic_pool.cpp), one for
// every device: the CPU and CUDA launchers call them with their device type. (The label values
// are the kernels' to check: reading them is a pass over the labels.)
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace fastctx {
namespace sp_checks {

constexpr const char* kOp = "fastctx.semantic_pool";

// labels: int64 [B, H, W] on the device of `ref` (called `ref_name`).
inline void labels(c10::DeviceType dev, const at::Tensor& lab, int64_t B, int64_t H, int64_t W,
                   const char* stage, const at::Tensor& ref, const char* ref_name) {
  check_tensor(dev, kOp, stage, lab, "labels", 3, "[B, H, W]", ref, ref_name, false);
  TORCH_CHECK(lab.scalar_type() == at::kLong, kOp, " (", stage, "): labels must be int64, got ",
              lab.scalar_type());
  TORCH_CHECK(lab.size(0) == B && lab.size(1) == H && lab.size(2) == W, kOp, " (", stage,
              "): labels must be [B, H, W] = [", B, ", ", H, ", ", W, "], got ", lab.sizes());
}

// sp_fwd: feats [B, C, H, W] floating, logits [B, K, H, W] of its device and dtype, K >= 1.
inline void fwd(c10::DeviceType dev, const at::Tensor& feats, const at::Tensor& logits) {
  check_tensor(dev, kOp, "sp_fwd", feats, "feats", 4, "[B, C, H, W]", feats, "feats");
  check_float(kOp, "sp_fwd", feats, "feats");
  check_tensor(dev, kOp, "sp_fwd", logits, "logits", 4, "[B, K, H, W]", feats, "feats");
  TORCH_CHECK(logits.size(0) == feats.size(0) && logits.size(2) == feats.size(2) &&
                  logits.size(3) == feats.size(3),
              kOp, " (sp_fwd): feats and logits must agree in batch and spatial size, got feats ",
              feats.sizes(), " and logits ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, kOp, " (sp_fwd): logits needs at least one class, got shape ",
              logits.sizes());
}

// sp_bwd: feats as above; dregions and regions [B, C, K] (K >= 1), w [B, H, W], each floating
// (any such dtype) on the device of feats; labels.
inline void bwd(c10::DeviceType dev, const at::Tensor& dregions, const at::Tensor& feats,
                const at::Tensor& lab, const at::Tensor& w, const at::Tensor& regions) {
  check_tensor(dev, kOp, "sp_bwd", feats, "feats", 4, "[B, C, H, W]", feats, "feats");
  check_float(kOp, "sp_bwd", feats, "feats");
  check_tensor(dev, kOp, "sp_bwd", dregions, "dregions", 3, "[B, C, K]", feats, "feats", false);
  check_tensor(dev, kOp, "sp_bwd", regions, "regions", 3, "[B, C, K]", feats, "feats", false);
  check_tensor(dev, kOp, "sp_bwd", w, "w", 3, "[B, H, W]", feats, "feats", false);
  check_float(kOp, "sp_bwd", dregions, "dregions");
  check_float(kOp, "sp_bwd", regions, "regions");
  check_float(kOp, "sp_bwd", w, "w");
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3);
  TORCH_CHECK(regions.size(0) == B && regions.size(1) == C && regions.size(2) > 0, kOp,
              " (sp_bwd): regions must be [B, C, K] with B, C of feats ", feats.sizes(),
              " and K >= 1, got ", regions.sizes());
  TORCH_CHECK(dregions.sizes() == regions.sizes(), kOp, " (sp_bwd): dregions must be ",
              regions.sizes(), ", got ", dregions.sizes());
  TORCH_CHECK(w.size(0) == B && w.size(1) == H && w.size(2) == W, kOp,
              " (sp_bwd): w must be [B, H, W] = [", B, ", ", H, ", ", W, "], got ", w.sizes());
  labels(dev, lab, B, H, W, "sp_bwd", feats, "feats");
}

// sp_gather: regions [B, C, K] floating (K >= 1 unless the output is empty), labels, a floating
// output dtype.
inline void gather(c10::DeviceType dev, const at::Tensor& regions, const at::Tensor& lab,
                   at::ScalarType dtype) {
  check_tensor(dev, kOp, "sp_gather", regions, "regions", 3, "[B, C, K]", regions, "regions");
  check_float(kOp, "sp_gather", regions, "regions");
  TORCH_CHECK(is_float(dtype), kOp, " (sp_gather): dtype must be a floating-point type, got ",
              dtype);
  check_tensor(dev, kOp, "sp_gather", lab, "labels", 3, "[B, H, W]", regions, "regions", false);
  const int64_t B = regions.size(0), C = regions.size(1), H = lab.size(1), W = lab.size(2);
  labels(dev, lab, B, H, W, "sp_gather", regions, "regions");
  TORCH_CHECK(B * C * H * W == 0 || regions.size(2) > 0, kOp,
              " (sp_gather): regions has no classes, got shape ", regions.sizes());
}

// sp_scatter: dpooled [B, C, H, W] floating, labels, K >= 1.
inline void scatter(c10::DeviceType dev, const at::Tensor& dpooled, const at::Tensor& lab,
                    int64_t K) {
  check_tensor(dev, kOp, "sp_scatter", dpooled, "dpooled", 4, "[B, C, H, W]", dpooled, "dpooled");
  check_float(kOp, "sp_scatter", dpooled, "dpooled");
  TORCH_CHECK(K > 0, kOp, " (sp_scatter): K must be positive, got ", K);
  labels(dev, lab, dpooled.size(0), dpooled.size(2), dpooled.size(3), "sp_scatter", dpooled,
         "dpooled");
}

}  // namespace sp_checks
}  // namespace fastctx
