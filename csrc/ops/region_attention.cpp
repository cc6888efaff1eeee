// Schemas of the compiled region-attention ops ("pixels attend to a few keys": OCR's regions,
// ANN's pyramid-pooled keys, ISNet's classes). CPU kernels: csrc/cpu/region_attention.cpp.
// Semantics: shared/docs/OPERATORS.md, section 4 (region_attention).
//
//   ra_fwd(q [B,Cqk,H,W], k [B,Cqk,S], v [B,Cv,S], bias [B,S], scale, keep_p)
//       -> (out [B,Cv,H,W], lse [B,H,W], p [B,S,H*W] when keep_p, else [0])
//   ra_bwd(dout, q, k, v, bias, out, lse, p, scale) -> (dq, dk, dv, dbias)
//
// bias is always given (zeros when the user passed none); -inf masks a key. A pixel whose keys are
// all masked gets out = 0, lse = -inf, p = 0 and zero gradients. lse and p are float32 (float64
// for float64). p, the softmax weights, is what the CPU backward reads when the forward kept them
// (keep_p = True); given an empty p it recomputes them from lse (as Triton's backward always does).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastctx, m) {
  m.def(
      "ra_fwd(Tensor q, Tensor k, Tensor v, Tensor bias, float scale, bool keep_p) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "ra_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor bias, Tensor out, Tensor lse, "
      "Tensor p, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
}
