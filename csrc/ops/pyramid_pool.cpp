// Schemas of the compiled pyramid-pool ops (ANN's APNB / AFNB key and value pooling). CPU kernels:
// csrc/cpu/pyramid_pool.cpp. Semantics: shared/docs/OPERATORS.md, section 3 (pyramid_pool).
//
//   pp_fwd(x [B,C,H,W], scales) -> out [B,C,S]       S = sum(s * s) over scales
//   pp_bwd(dout [B,C,S], scales, H, W) -> dx [B,C,H,W]
//
// At scale s, bin (i, j) averages rows floor(i*H/s) .. ceil((i+1)*H/s) (exclusive) and the same
// for columns, exactly as adaptive_avg_pool2d (bins overlap when H % s != 0; s may exceed H).
// Bins are flattened row-major and the scales concatenated in the given order (duplicates
// allowed). The backward gives every pixel the sum of dout / area over the bins that contain it.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastctx, m) {
  m.def("pp_fwd(Tensor x, int[] scales) -> Tensor");
  m.def("pp_bwd(Tensor dout, int[] scales, SymInt H, SymInt W) -> Tensor");
}
