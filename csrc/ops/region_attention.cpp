// Schemas of the compiled region-attention ops ("pixels attend to a few keys": OCR's regions,
// ANN's pyramid-pooled keys, ISNet's classes). CPU kernels: csrc/cpu/region_attention.cpp.
// Semantics: shared/docs/OPERATORS.md, section 4 (region_attention).
//
//   ra_fwd(q [B,Cqk,H,W], k [B,Cqk,S], v [B,Cv,S], bias [B,S], scale) -> (out [B,Cv,H,W], lse [B,H,W])
//   ra_bwd(dout, q, k, v, bias, out, lse, scale) -> (dq, dk, dv, dbias)
//
// bias is always given (zeros when the user passed none); -inf masks a key. A pixel whose keys are
// all masked gets out = 0, lse = -inf and zero gradients. lse is float32 (float64 for float64).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastctx, m) {
  m.def("ra_fwd(Tensor q, Tensor k, Tensor v, Tensor bias, float scale) -> (Tensor, Tensor)");
  m.def(
      "ra_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor bias, Tensor out, Tensor lse, "
      "float scale) -> (Tensor, Tensor, Tensor, Tensor)");
}
