// Schemas of the compiled spatial-gather ops (OCR's soft region pooling). CPU kernels:
// csrc/cpu/spatial_gather.cpp. Semantics: shared/docs/OPERATORS.md, section 4 (spatial_gather).
//
//   sg_fwd(feats [B,C,H,W], logits [B,K,H,W], scale) -> (regions [B,C,K], lse [B,K])
//   sg_bwd(dregions [B,C,K], feats, logits, regions, lse, scale) -> (dfeats, dlogits)
//
// For each class k the softmax runs over the N = H * W pixels of scale * logits[:, k]:
// lse[b, k] = logsumexp_n scale * logits[b, k, n], w = exp(scale * logits - lse),
// regions[b, :, k] = sum_n w[k, n] * feats[b, :, n]. A class whose logits are all -inf gets a zero
// region, lse = -inf and zero gradients. lse is float32 (float64 for float64 inputs). scale > 0.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastctx, m) {
  m.def("sg_fwd(Tensor feats, Tensor logits, float scale) -> (Tensor, Tensor)");
  m.def(
      "sg_bwd(Tensor dregions, Tensor feats, Tensor logits, Tensor regions, Tensor lse, "
      "float scale) -> (Tensor, Tensor)");
}
