// The argument checks of the compiled spatial-gather ops (schemas: spatial_gather.cpp), one for
// every device: the CPU and CUDA launchers call them with their device type.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cmath>

#include "checks.h"

namespace fastctx {
namespace sg_checks {

constexpr const char* kOp = "fastctx.spatial_gather";

// feats [B, C, H, W] floating and logits [B, K, H, W], one device and dtype, neither empty;
// scale positive and finite.
inline void inputs(c10::DeviceType dev, const at::Tensor& feats, const at::Tensor& logits,
                   double scale, const char* stage) {
  check_tensor(dev, kOp, stage, feats, "feats", 4, "[B, C, H, W]", feats, "feats");
  check_float(kOp, stage, feats, "feats");
  check_tensor(dev, kOp, stage, logits, "logits", 4, "[B, K, H, W]", feats, "feats");
  TORCH_CHECK(logits.size(0) == feats.size(0) && logits.size(2) == feats.size(2) &&
                  logits.size(3) == feats.size(3),
              kOp, " (", stage, "): feats and logits must agree in batch and spatial size, got "
              "feats ", feats.sizes(), " and logits ", logits.sizes());
  TORCH_CHECK(feats.numel() > 0 && logits.numel() > 0, kOp, " (", stage,
              "): feats and logits must not be empty, got feats ", feats.sizes(), " and logits ",
              logits.sizes());
  TORCH_CHECK(std::isfinite(scale) && scale > 0, kOp, " (", stage,
              "): scale must be positive and finite, got ", scale);
}

// sg_bwd's arguments: feats, logits and scale as above; dregions and regions [B, C, K]; lse
// [B, K] in the accumulation dtype.
inline void bwd(c10::DeviceType dev, const at::Tensor& dregions, const at::Tensor& feats,
                const at::Tensor& logits, const at::Tensor& regions, const at::Tensor& lse,
                double scale) {
  inputs(dev, feats, logits, scale, "sg_bwd");
  const int64_t B = feats.size(0), C = feats.size(1), K = logits.size(1);
  check_tensor(dev, kOp, "sg_bwd", dregions, "dregions", 3, "[B, C, K]", feats, "feats");
  check_tensor(dev, kOp, "sg_bwd", regions, "regions", 3, "[B, C, K]", feats, "feats");
  for (const at::Tensor* t : {&dregions, &regions})
    TORCH_CHECK(t->size(0) == B && t->size(1) == C && t->size(2) == K, kOp,
                " (sg_bwd): dregions and regions must be [B, C, K] = [", B, ", ", C, ", ", K,
                "], got ", t->sizes());
  const std::array<int64_t, 2> sizes{B, K};
  check_stat(dev, kOp, "sg_bwd", lse, "lse", "[B, K]", sizes, feats);
}

}  // namespace sg_checks
}  // namespace fastctx
