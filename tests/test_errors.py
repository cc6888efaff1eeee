"""Bad input gets a clear ValueError/TypeError naming the op, the argument and the shapes."""

from __future__ import annotations

import pytest
import torch

import fastctx

r = torch.randn
nan4 = r(1, 4, 5, 6).index_put_((torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.tensor([3])), torch.tensor(float("nan")))
meta = torch.empty(1, 4, 5, 6, device="meta")

CASES = {
    # criss-cross
    "cc-rank": (lambda: fastctx.criss_cross_attention(r(4, 5, 6), r(4, 5, 6), r(4, 5, 6)), ValueError, r"criss_cross_attention: q must be a 4-D tensor \[B, Cqk, H, W\], got shape \(4, 5, 6\)"),
    "cc-not-tensor": (lambda: fastctx.criss_cross_attention(r(1, 4, 5, 6), [1.0], r(1, 4, 5, 6)), TypeError, "k must be a torch.Tensor"),
    "cc-qk-shape": (lambda: fastctx.criss_cross_attention(r(1, 4, 5, 6), r(1, 3, 5, 6), r(1, 8, 5, 6)), ValueError, r"q and k must have the same shape, got \(1, 4, 5, 6\) and \(1, 3, 5, 6\)"),
    "cc-v-shape": (lambda: fastctx.criss_cross_attention(r(1, 4, 5, 6), r(1, 4, 5, 6), r(1, 8, 5, 7)), ValueError, r"v must match q in batch and spatial size, got q \(1, 4, 5, 6\) and v \(1, 8, 5, 7\)"),
    "cc-dtype": (lambda: fastctx.criss_cross_attention(r(1, 4, 5, 6), r(1, 4, 5, 6).double(), r(1, 8, 5, 6)), TypeError, "k is torch.float64 but q is torch.float32"),
    "cc-int": (lambda: fastctx.criss_cross_attention(torch.ones(1, 4, 5, 6, dtype=torch.int32), r(1, 4, 5, 6), r(1, 8, 5, 6)), TypeError, "q must be float16, bfloat16, float32 or float64, got torch.int32"),
    "cc-device": (lambda: fastctx.criss_cross_attention(r(1, 4, 5, 6), meta, r(1, 8, 5, 6)), ValueError, "k is on meta but q is on cpu"),
    "cc-empty": (lambda: fastctx.criss_cross_attention(r(0, 4, 5, 6), r(0, 4, 5, 6), r(0, 8, 5, 6)), ValueError, r"q is empty \(shape \(0, 4, 5, 6\)\)"),
    "cc-empty-channels": (lambda: fastctx.criss_cross_attention(r(1, 4, 5, 6), r(1, 4, 5, 6), r(1, 0, 5, 6)), ValueError, "v is empty"),
    "cc-nan": (lambda: fastctx.criss_cross_attention(nan4, r(1, 4, 5, 6), r(1, 8, 5, 6)), ValueError, r"q \(shape \(1, 4, 5, 6\)\) contains NaN"),
    "cc-inf": (lambda: fastctx.criss_cross_attention(r(1, 4, 5, 6), r(1, 4, 5, 6), r(1, 8, 5, 6) / 0), ValueError, "v .* contains NaN or infinite"),
    "cc-scale": (lambda: fastctx.criss_cross_attention(r(1, 4, 5, 6), r(1, 4, 5, 6), r(1, 8, 5, 6), float("nan")), ValueError, "scale must be finite"),
    "cc-scale-type": (lambda: fastctx.criss_cross_attention(r(1, 4, 5, 6), r(1, 4, 5, 6), r(1, 8, 5, 6), "1"), TypeError, "scale must be a python number"),
    # interlaced
    "isa-divide": (lambda: fastctx.interlaced_attention(r(1, 4, 9, 10), r(1, 4, 9, 10), r(1, 8, 9, 10), block=(8, 8)), ValueError, r"the map 9x10 is not divisible by block 8x8"),
    "isa-block": (lambda: fastctx.interlaced_attention(r(1, 4, 8, 8), r(1, 4, 8, 8), r(1, 8, 8, 8), block=(0, 8)), ValueError, "block must be two positive ints"),
    "isa-mode": (lambda: fastctx.interlaced_attention(r(1, 4, 8, 8), r(1, 4, 8, 8), r(1, 8, 8, 8), mode="mid"), ValueError, "mode must be 'long' or 'short'"),
    # pyramid
    "pool-scales": (lambda: fastctx.pyramid_pool(r(1, 4, 8, 8), pool_scales=(1, 0)), ValueError, "pool_scales must be a non-empty sequence of positive ints"),
    "pool-too-many-keys": (lambda: fastctx.pyramid_pool(r(1, 4, 7, 5), pool_scales=(1, 100000)), ValueError, r"pyramid_pool: pool_scales \(1, 100000\) give S = 10000000001 pooled keys; at most 2147483647 are supported"),
    "pa-too-many-keys": (lambda: fastctx.pyramid_attention(r(1, 4, 3, 3), r(1, 4, 7, 5), r(1, 6, 7, 5), pool_scales=(46341,)), ValueError, r"pyramid_attention: pool_scales \(46341,\) give S = 2147488281 pooled keys"),
    "pool-rank": (lambda: fastctx.pyramid_pool(r(4, 8, 8)), ValueError, r"pyramid_pool: x must be a 4-D tensor"),
    "pa-channels": (lambda: fastctx.pyramid_attention(r(1, 4, 3, 3), r(1, 5, 8, 8), r(1, 6, 8, 8)), ValueError, r"q and k must agree in batch and channels, got q \(1, 4, 3, 3\) and k \(1, 5, 8, 8\)"),
    "pa-v": (lambda: fastctx.pyramid_attention(r(1, 4, 3, 3), r(1, 4, 8, 8), r(1, 6, 8, 7)), ValueError, "v must match k in batch and spatial size"),
    # OCR
    "sg-size": (lambda: fastctx.spatial_gather(r(1, 4, 8, 8), r(1, 3, 8, 9)), ValueError, r"feats and logits must agree in batch and spatial size, got feats \(1, 4, 8, 8\) and logits \(1, 3, 8, 9\)"),
    "sg-scale": (lambda: fastctx.spatial_gather(r(1, 4, 8, 8), r(1, 3, 8, 8), scale=0.0), ValueError, "scale must be positive"),
    "sg-nan-logits": (lambda: fastctx.spatial_gather(r(1, 4, 5, 6), nan4), ValueError, "logits .* contains NaN"),
    "ra-k-rank": (lambda: fastctx.region_attention(r(1, 4, 5, 6), r(1, 4, 3, 1), r(1, 8, 3)), ValueError, r"k must be a 3-D tensor \[B, Cqk, S\]"),
    "ra-v": (lambda: fastctx.region_attention(r(1, 4, 5, 6), r(1, 4, 3), r(1, 8, 4)), ValueError, "v must match k in batch and number of keys"),
    "ra-bias-shape": (lambda: fastctx.region_attention(r(1, 4, 5, 6), r(1, 4, 3), r(1, 8, 3), bias=r(1, 4)), ValueError, r"bias must be \[B, S\] = \(1, 3\), got \(1, 4\)"),
    "ra-bias-posinf": (lambda: fastctx.region_attention(r(1, 4, 5, 6), r(1, 4, 3), r(1, 8, 3), bias=torch.tensor([[0.0, float("inf"), 0.0]])), ValueError, r"contains \+inf"),
    # ISNet
    "sp-size": (lambda: fastctx.semantic_pool(r(2, 4, 8, 8), r(1, 3, 8, 8)), ValueError, "feats and logits must agree in batch and spatial size"),
    "sp-meta": (lambda: fastctx.semantic_pool(meta, meta[:, :3]), ValueError, r"semantic_pool: meta tensors are not supported"),
    "spr-meta": (lambda: fastctx.semantic_pool_regions(meta, meta[:, :3]), ValueError, r"semantic_pool_regions: meta tensors are not supported"),
    "spr-dtype": (lambda: fastctx.semantic_pool_regions(r(1, 4, 8, 8), r(1, 3, 8, 8).half()), TypeError, "logits is torch.float16 but feats is torch.float32"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case):
    fn, exc, pattern = CASES[case]
    with pytest.raises(exc, match=pattern) as info:
        fn()
    assert str(info.value).startswith("fastctx.")


def test_nan_check_can_be_disabled(monkeypatch):
    monkeypatch.setenv("FASTCTX_CHECK_NAN", "0")
    out = fastctx.criss_cross_attention(nan4, r(1, 4, 5, 6), r(1, 8, 5, 6), backend="reference")
    assert torch.isnan(out).any()  # no check, NaN propagates as in PyTorch


def test_minus_inf_logits_are_allowed():
    logits = r(1, 3, 5, 6)
    logits[0, 1] = float("-inf")
    out = fastctx.spatial_gather(r(1, 4, 5, 6), logits)
    assert torch.isfinite(out).all() and (out[0, :, 1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_nan_check_finds_one_bad_value_anywhere(dtype, layout):
    from fastctx import _validate

    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 24, 45, 61, generator=g).to(dtype)  # 131760 values: a parallel reduction
    if layout == "channels_last":
        base = base.to(memory_format=torch.channels_last)

    def view(x):  # the checked tensor: channels_last and sliced ones are read in place
        return x[:, 1:22:2] if layout == "sliced" else x

    t = view(base)
    assert t.is_contiguous() == (layout == "contiguous")
    _validate.no_nan("op", x=t)
    for flat in torch.randint(0, t.numel(), (6,), generator=g).tolist() + [0, t.numel() - 1]:
        idx = torch.unravel_index(torch.tensor(flat), t.shape)
        for bad, allowed in ((float("nan"), False), (float("inf"), True), (float("-inf"), True)):
            u = view(base.clone(memory_format=torch.preserve_format))
            assert u.stride() == t.stride()
            u[idx] = bad
            with pytest.raises(ValueError, match=r"op: x \(shape .*\) contains NaN"):
                _validate.no_nan("op", x=u)
            if allowed:
                u[0, 0, 0, 0], u[-1, -1, -1, -1] = float("inf"), float("-inf")
                _validate.no_nan("op", allow_inf=True, x=u)  # both infinities, no NaN: fine
            else:  # a NaN among infinities is still found
                other = torch.unravel_index(torch.tensor((flat + t.numel() // 2) % t.numel()), t.shape)
                u[other] = float("-inf") if flat % 2 else float("inf")
                with pytest.raises(ValueError, match=r"op: x \(shape .*\) contains NaN"):
                    _validate.no_nan("op", allow_inf=True, x=u)


def test_triton_extent_check():
    """The Triton kernels address within a sample with 32-bit offsets: a sample spanning 2**31
    elements or more (by its shape or its strides) is refused with the op, shape and strides;
    dense tensors below that (NCHW, channels-last) and strided views within it pass."""
    from fastctx.triton._common import check_extent

    op = "fastctx.criss_cross_attention"
    fine = [torch.empty(2, 64, 97, 97, device="meta"),
            torch.empty(2, 64, 97, 97, device="meta").contiguous(memory_format=torch.channels_last),
            torch.empty(2, 64, 97, 97, device="meta")[:, ::2, 1:, :-1],
            torch.empty_strided((1, 1, 2, 2), (8, 8, 2**30 - 2, 1), device="meta")]
    for t in fine:
        check_extent(op, t)
    big = [torch.empty(1, device="meta").expand(1, 2, 2**15, 2**15),  # by its shape
           torch.empty_strided((1, 1, 2, 2), (8, 8, 2**31, 1), device="meta"),  # by its strides
           torch.empty(1, 2, 2**15, 2**15, device="meta")]  # dense, 2**31 elements
    for t in big:
        with pytest.raises(ValueError, match=r"criss_cross_attention: the Triton backend needs each sample to "
                           r"span fewer than 2\*\*31 elements, got of shape \(1, .*\), strides"):
            check_extent(op, t)


def test_meta_tensors_give_shapes():
    """Meta tensors (shape inference, e.g. a model built on the meta device) go through the checks
    (no values to test for NaN or +inf) to the reference, which gives the output's shape; a
    compiled backend named for them says it cannot run them."""
    m = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    assert fastctx.criss_cross_attention(m(1, 4, 5, 6), m(1, 4, 5, 6), m(1, 8, 5, 6)).shape == (1, 8, 5, 6)
    assert fastctx.last_backend("criss_cross_attention") == "reference"
    assert fastctx.interlaced_attention(m(1, 4, 8, 8), m(1, 4, 8, 8), m(1, 8, 8, 8)).shape == (1, 8, 8, 8)
    assert fastctx.pyramid_pool(m(2, 4, 5, 6)).shape == (2, 4, 110)
    assert fastctx.pyramid_attention(m(1, 4, 5, 6), m(1, 4, 9, 9), m(1, 8, 9, 9)).shape == (1, 8, 5, 6)
    assert fastctx.spatial_gather(m(1, 4, 5, 6), m(1, 3, 5, 6)).shape == (1, 4, 3)
    assert fastctx.region_attention(m(1, 4, 5, 6), m(1, 4, 3), m(1, 8, 3), bias=m(1, 3)).shape == (1, 8, 5, 6)
    with pytest.raises(fastctx.BackendUnavailableError, match="criss_cross_attention: backend 'cpu' cannot run this call"):
        fastctx.criss_cross_attention(m(1, 4, 5, 6), m(1, 4, 5, 6), m(1, 8, 5, 6), backend="cpu")


def test_triton_pyramid_bins():
    """The Triton pyramid pool's bin table (built on the host with tensor ops, not a Python loop
    over the keys): adaptive_avg_pool2d's bins, and a refusal past the kernels' 32-bit offsets."""
    from fastctx.triton.pyramid_pool import _bins

    H, W = 7, 5
    bins, inv = _bins((1, 3, 9), H, W, torch.device("cpu"))
    assert bins.dtype == torch.int32 and bins.shape == (4, 1 + 9 + 81)
    x = torch.randn(1, 1, H, W, dtype=torch.float64)
    want = torch.cat([torch.nn.functional.adaptive_avg_pool2d(x, s).flatten() for s in (1, 3, 9)])
    got = torch.stack([x[0, 0, r0:r1, c0:c1].mean() for r0, r1, c0, c1 in bins.t().tolist()])
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    areas = (bins[1] - bins[0]) * (bins[3] - bins[2])
    assert torch.equal(inv, (1.0 / areas.double()).float())
    with pytest.raises(ValueError, match=r"pyramid_pool: the Triton backend takes fewer than 2\*\*29 pooled keys, got S = 536895241"):
        _bins((23171,), H, W, torch.device("cpu"))
