// Schemas of the compiled criss-cross attention ops. Implementations: csrc/cpu/criss_cross.cpp
// (CPU) and csrc/cuda/criss_cross.cu (CUDA). Semantics: shared/docs/OPERATORS.md, section 1.
//
//   cc_fwd(q [B,Cqk,H,W], k [B,Cqk,H,W], v [B,Cv,H,W], scale) -> (out [B,Cv,H,W], lse [B,H,W])
//   cc_bwd(dout, q, k, v, out, lse, scale) -> (dq, dk, dv)
//
// lse is the per-pixel log-sum-exp of the H+W-1 scaled energies, float32 (float64 for float64
// inputs); the backward recomputes the attention weights from it.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastctx, m) {
  m.def("cc_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def(
      "cc_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> "
      "(Tensor, Tensor, Tensor)");
}
