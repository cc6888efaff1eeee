// Schemas of the compiled interlaced sparse self-attention ops (ISANet). CPU kernels:
// csrc/cpu/interlaced_attention.cpp. Semantics: shared/docs/OPERATORS.md, section 2.
//
//   isa_fwd(q [B,Cqk,H,W], k [B,Cqk,H,W], v [B,Cv,H,W], bh, bw, long_mode, scale, keep_p)
//       -> (out [B,Cv,H,W], lse [B,H,W], p [B,H*W/L,L,L] when keep_p, else [0])
//   isa_bwd(dout, q, k, v, out, lse, p, bh, bw, long_mode, scale) -> (dq, dk, dv)
//
// H % bh == 0 and W % bw == 0. long_mode: a group is every position of equal (i % bh, j % bw);
// otherwise (short) a contiguous bh x bw block. Dense softmax attention inside each group.
// lse (the log-sum-exp of each query's scaled energies) is float32 (float64 for float64 inputs).
// p: every group's L x L weights (L members per group) in the kernel's own group order, kept for
// the CPU backward, which reads them (it needs keep_p = True); a backward that recomputes the
// weights from lse (Triton's) gets an empty p. Same dtype as lse.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastctx, m) {
  m.def(
      "isa_fwd(Tensor q, Tensor k, Tensor v, int bh, int bw, bool long_mode, float scale, "
      "bool keep_p) -> (Tensor out, Tensor lse, Tensor p)");
  m.def(
      "isa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor p, "
      "int bh, int bw, bool long_mode, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
}
