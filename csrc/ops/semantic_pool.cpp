// Schemas of the compiled semantic-pooling ops (ISNet's per-class pooling). CPU kernels:
// csrc/cpu/semantic_pool.cpp. Semantics: shared/docs/OPERATORS.md, section 5.
//
//   sp_fwd(feats [B,C,H,W], logits [B,K,H,W]) -> (regions [B,C,K], counts [B,K], labels [B,H,W], w [B,H,W])
//   sp_bwd(dregions [B,C,K], feats, labels, w, regions) -> (dfeats [B,C,H,W], dlogits [B,K,H,W])
//   sp_gather(regions [B,C,K], labels [B,H,W], dtype) -> pooled [B,C,H,W]
//   sp_scatter(dpooled [B,C,H,W], labels [B,H,W], K) -> dregions [B,C,K]
//
// labels: argmax over K (ties: lowest index), int64; counts int64. regions and w are in the
// compute dtype (float32 for float16 / bfloat16 / float32, float64 for float64): w[n] is pixel n's
// softmax weight within its class (0 for a class whose logits are -inf at all its pixels), and
// regions[:, :, k] = sum of w * feats over the pixels of class k (0 for absent classes). sp_bwd's
// outputs are in the dtype of feats (dlogits too: feats and logits share a dtype). sp_gather
// writes regions[b, :, labels[b, n]] in `dtype`; sp_scatter is its adjoint (a segmented sum over
// the pixels of each class, in the compute dtype of dpooled).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastctx, m) {
  m.def("sp_fwd(Tensor feats, Tensor logits) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sp_bwd(Tensor dregions, Tensor feats, Tensor labels, Tensor w, Tensor regions) "
      "-> (Tensor, Tensor)");
  m.def("sp_gather(Tensor regions, Tensor labels, ScalarType dtype) -> Tensor");
  m.def("sp_scatter(Tensor dpooled, Tensor labels, int K) -> Tensor");
}
