"""Prove every reference in ``python_ref`` against a brute-force per-pixel loop.

The loops below are written from docs/OPERATORS.md, independently of ``python_ref``: plain Python
for-loops over pixels on nested lists of floats, energies as explicit dot products, the softmax
with ``math.exp`` over each pixel's list of keys, argmax by strict comparison. Everything runs in
float64 on tiny odd shapes. Gradients: float64 ``gradcheck`` on each reference, and the
zero-gradient claims for fully masked rows / classes.
"""

from __future__ import annotations

import math

import pytest
import torch

import python_ref as ref

F64 = torch.float64
NEG_INF = float("-inf")
TOL = dict(atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------------------------
# Brute force (pure Python)
# --------------------------------------------------------------------------------------------


def _randn(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def _vec(t: list, b: int, i: int, j: int) -> list[float]:
    """The channel vector of pixel (i, j) of image b of a nested list [B][C][H][W]."""
    return [t[b][c][i][j] for c in range(len(t[b]))]


def _dot(x: list[float], y: list[float]) -> float:
    return sum(a * b for a, b in zip(x, y, strict=True))


def _softmax(es: list[float]) -> list[float]:
    """Softmax of a list of energies; all -inf gives all zeros."""
    finite = [e for e in es if e != NEG_INF]
    if not finite:
        return [0.0] * len(es)
    m = max(finite)
    ex = [0.0 if e == NEG_INF else math.exp(e - m) for e in es]
    s = sum(ex)
    return [x / s for x in ex]


def _weighted_sum(ws: list[float], vecs: list[list[float]]) -> list[float]:
    return [sum(w * vec[c] for w, vec in zip(ws, vecs, strict=True)) for c in range(len(vecs[0]))]


def _attend(qv, keys, vals, scale, biases=None) -> list[float]:
    es = [scale * _dot(qv, kv) for kv in keys]
    if biases is not None:
        es = [e + bb for e, bb in zip(es, biases, strict=True)]
    return _weighted_sum(_softmax(es), vals)


def _zeros(B: int, C: int, H: int, W: int) -> list:
    return [[[[0.0] * W for _ in range(H)] for _ in range(C)] for _ in range(B)]


def _put(out: list, b: int, i: int, j: int, vec: list[float]) -> None:
    for c, val in enumerate(vec):
        out[b][c][i][j] = val


def _attend_positions(q, k, v, scale, positions_of) -> torch.Tensor:
    """out[b, :, i, j] = attention of q[b, :, i, j] over the positions ``positions_of(i, j)``."""
    B, _, H, W = q.shape
    Q, K, V = q.tolist(), k.tolist(), v.tolist()
    out = _zeros(B, v.shape[1], H, W)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                pos = positions_of(i, j)
                o = _attend(
                    _vec(Q, b, i, j),
                    [_vec(K, b, r, c) for r, c in pos],
                    [_vec(V, b, r, c) for r, c in pos],
                    scale,
                )
                _put(out, b, i, j, o)
    return torch.tensor(out, dtype=F64)


def loop_criss_cross(q, k, v, scale):
    H, W = q.shape[2:]

    def positions_of(i, j):  # the column without the pixel, then the whole row
        return [(r, j) for r in range(H) if r != i] + [(i, c) for c in range(W)]

    return _attend_positions(q, k, v, scale, positions_of)


def loop_interlaced(q, k, v, block, mode, scale):
    H, W = q.shape[2:]
    bh, bw = block

    def same_group(i, j, r, c):
        if mode == "long":
            return i % bh == r % bh and j % bw == c % bw
        return i // bh == r // bh and j // bw == c // bw

    def positions_of(i, j):
        return [(r, c) for r in range(H) for c in range(W) if same_group(i, j, r, c)]

    return _attend_positions(q, k, v, scale, positions_of)


def loop_pyramid_pool(x, scales) -> torch.Tensor:
    B, C, H, W = x.shape
    X = x.tolist()
    out = [[[] for _ in range(C)] for _ in range(B)]
    for s in scales:
        for p in range(s):
            r0, r1 = math.floor(p * H / s), math.ceil((p + 1) * H / s)
            for t in range(s):
                c0, c1 = math.floor(t * W / s), math.ceil((t + 1) * W / s)
                for b in range(B):
                    for c in range(C):
                        vals = [X[b][c][r][cc] for r in range(r0, r1) for cc in range(c0, c1)]
                        out[b][c].append(sum(vals) / len(vals))
    return torch.tensor(out, dtype=F64)


def loop_region_attention(q, k, v, scale, bias=None) -> torch.Tensor:
    """q [B, Cqk, H, W] against S keys k [B, Cqk, S], values v [B, Cv, S], bias [B, S]."""
    B, _, H, W = q.shape
    S = k.shape[2]
    Q, K, V = q.tolist(), k.tolist(), v.tolist()
    bias_l = bias.tolist() if bias is not None else None
    out = _zeros(B, v.shape[1], H, W)
    for b in range(B):
        keys = [[K[b][c][s] for c in range(len(K[b]))] for s in range(S)]
        vals = [[V[b][c][s] for c in range(len(V[b]))] for s in range(S)]
        biases = bias_l[b] if bias_l is not None else None
        for i in range(H):
            for j in range(W):
                _put(out, b, i, j, _attend(_vec(Q, b, i, j), keys, vals, scale, biases))
    return torch.tensor(out, dtype=F64)


def loop_pyramid_attention(q, k, v, scales, scale) -> torch.Tensor:
    return loop_region_attention(
        q, loop_pyramid_pool(k, scales), loop_pyramid_pool(v, scales), scale
    )


def loop_spatial_gather(feats, logits, scale) -> torch.Tensor:
    B, C, H, W = feats.shape
    K = logits.shape[1]
    Fl, L = feats.tolist(), logits.tolist()
    pixels = [(i, j) for i in range(H) for j in range(W)]
    out = [[[0.0] * K for _ in range(C)] for _ in range(B)]
    for b in range(B):
        for k in range(K):
            w = _softmax([scale * L[b][k][i][j] for i, j in pixels])
            r = _weighted_sum(w, [_vec(Fl, b, i, j) for i, j in pixels])
            for c in range(C):
                out[b][c][k] = r[c]
    return torch.tensor(out, dtype=F64)


def loop_semantic(feats, logits):
    """-> pooled [B, C, H, W], regions [B, C, K], counts [B, K], labels [B, H, W]."""
    B, C, H, W = feats.shape
    K = logits.shape[1]
    Fl, L = feats.tolist(), logits.tolist()
    pooled = _zeros(B, C, H, W)
    regions = [[[0.0] * K for _ in range(C)] for _ in range(B)]
    counts = [[0] * K for _ in range(B)]
    labels = [[[0] * W for _ in range(H)] for _ in range(B)]
    for b in range(B):
        for i in range(H):
            for j in range(W):
                best = 0
                for c in range(1, K):
                    if L[b][c][i][j] > L[b][best][i][j]:  # strict: ties keep the lowest index
                        best = c
                labels[b][i][j] = best
        for c in range(K):
            pix = [(i, j) for i in range(H) for j in range(W) if labels[b][i][j] == c]
            counts[b][c] = len(pix)
            if not pix:
                continue
            w = _softmax([L[b][c][i][j] for i, j in pix])
            r = _weighted_sum(w, [_vec(Fl, b, i, j) for i, j in pix])
            for ch in range(C):
                regions[b][ch][c] = r[ch]
            for i, j in pix:
                _put(pooled, b, i, j, r)
    return (
        torch.tensor(pooled, dtype=F64),
        torch.tensor(regions, dtype=F64),
        torch.tensor(counts, dtype=torch.int64),
        torch.tensor(labels, dtype=torch.int64),
    )


def _check(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, **TOL)


# --------------------------------------------------------------------------------------------
# Criss-cross
# --------------------------------------------------------------------------------------------

CC_CASES = [
    pytest.param(2, 3, 5, 1, 1, 1.0, id="B2-C3x5-1x1"),
    pytest.param(2, 3, 5, 1, 7, 1.0, id="B2-C3x5-1x7"),
    pytest.param(2, 3, 5, 7, 1, 1.0, id="B2-C3x5-7x1"),
    pytest.param(2, 3, 5, 5, 3, 1.0, id="B2-C3x5-5x3"),
    pytest.param(2, 3, 5, 4, 6, 1.0, id="B2-C3x5-4x6"),
    pytest.param(1, 5, 2, 4, 6, 0.6, id="B1-C5x2-4x6-scale0.6"),
]


@pytest.mark.parametrize("B,Cqk,Cv,H,W,scale", CC_CASES)
def test_criss_cross(B, Cqk, Cv, H, W, scale):
    q, k, v = _randn(0, B, Cqk, H, W), _randn(1, B, Cqk, H, W), _randn(2, B, Cv, H, W)
    _check(ref.criss_cross_attention(q, k, v, scale=scale), loop_criss_cross(q, k, v, scale))


def test_criss_cross_default_scale_is_one():
    q, k, v = _randn(0, 1, 3, 4, 5), _randn(1, 1, 3, 4, 5), _randn(2, 1, 2, 4, 5)
    _check(ref.criss_cross_attention(q, k, v), loop_criss_cross(q, k, v, 1.0))


# --------------------------------------------------------------------------------------------
# Interlaced
# --------------------------------------------------------------------------------------------

ISA_CASES = [
    pytest.param(2, 3, 5, 4, 6, (2, 3), "long", None, id="B2-C3x5-4x6-blk2x3-long"),
    pytest.param(2, 3, 5, 4, 6, (2, 3), "short", None, id="B2-C3x5-4x6-blk2x3-short"),
    pytest.param(2, 3, 5, 4, 6, (1, 1), "long", None, id="B2-C3x5-4x6-blk1x1-long"),
    pytest.param(2, 3, 5, 4, 6, (1, 1), "short", None, id="B2-C3x5-4x6-blk1x1-short"),
    pytest.param(2, 3, 5, 4, 6, (4, 6), "long", None, id="B2-C3x5-4x6-blk4x6-long"),
    pytest.param(2, 3, 5, 4, 6, (4, 6), "short", None, id="B2-C3x5-4x6-blk4x6-short"),
    pytest.param(1, 3, 5, 9, 10, (3, 5), "long", None, id="B1-C3x5-9x10-blk3x5-long"),
    pytest.param(1, 3, 5, 9, 10, (3, 5), "short", 0.8, id="B1-C3x5-9x10-blk3x5-short-scale0.8"),
]


@pytest.mark.parametrize("B,Cqk,Cv,H,W,block,mode,scale", ISA_CASES)
def test_interlaced(B, Cqk, Cv, H, W, block, mode, scale):
    q, k, v = _randn(3, B, Cqk, H, W), _randn(4, B, Cqk, H, W), _randn(5, B, Cv, H, W)
    expected = loop_interlaced(q, k, v, block, mode, Cqk**-0.5 if scale is None else scale)
    _check(ref.interlaced_attention(q, k, v, block=block, mode=mode, scale=scale), expected)


def test_interlaced_rejects_bad_mode_and_shape():
    q = _randn(0, 1, 2, 4, 6)
    with pytest.raises(ValueError, match="mode"):
        ref.interlaced_attention(q, q, q, block=(2, 3), mode="medium")
    with pytest.raises(ValueError, match="multiple"):
        ref.interlaced_attention(q, q, q, block=(3, 3))


# --------------------------------------------------------------------------------------------
# Pyramid
# --------------------------------------------------------------------------------------------

PP_CASES = [
    pytest.param(2, 3, 7, 5, (1, 2, 3), id="B2-C3-7x5-s123"),
    pytest.param(2, 3, 5, 7, (1, 2, 3), id="B2-C3-5x7-s123"),
    pytest.param(1, 2, 9, 10, (1, 3, 6, 8), id="B1-C2-9x10-s1368"),
    pytest.param(1, 2, 2, 3, (3, 1), id="B1-C2-2x3-s31-upsampling-bins"),
]


@pytest.mark.parametrize("B,C,H,W,scales", PP_CASES)
def test_pyramid_pool(B, C, H, W, scales):
    x = _randn(6, B, C, H, W)
    out = ref.pyramid_pool(x, scales)
    assert out.shape == (B, C, sum(s * s for s in scales))
    _check(out, loop_pyramid_pool(x, scales))


def test_pyramid_pool_default_scales():
    x = _randn(7, 1, 2, 8, 9)
    out = ref.pyramid_pool(x)
    assert out.shape[2] == 110
    _check(out, loop_pyramid_pool(x, (1, 3, 6, 8)))


PA_CASES = [
    pytest.param(2, 3, 5, 3, 4, 7, 5, (1, 2, 3), None, id="B2-C3x5-q3x4-kv7x5-s123"),
    pytest.param(1, 4, 2, 5, 2, 5, 7, (2, 1, 3), 0.7, id="B1-C4x2-q5x2-kv5x7-s213-scale0.7"),
    pytest.param(1, 3, 3, 1, 1, 9, 10, (1, 3, 6, 8), None, id="B1-C3x3-q1x1-kv9x10-s1368"),
]


@pytest.mark.parametrize("B,Cqk,Cv,Hq,Wq,H,W,scales,scale", PA_CASES)
def test_pyramid_attention(B, Cqk, Cv, Hq, Wq, H, W, scales, scale):
    q, k, v = _randn(8, B, Cqk, Hq, Wq), _randn(9, B, Cqk, H, W), _randn(10, B, Cv, H, W)
    expected = loop_pyramid_attention(q, k, v, scales, Cqk**-0.5 if scale is None else scale)
    _check(ref.pyramid_attention(q, k, v, pool_scales=scales, scale=scale), expected)


# --------------------------------------------------------------------------------------------
# OCR
# --------------------------------------------------------------------------------------------

SG_CASES = [
    pytest.param(2, 5, 1, 3, 4, 1.0, (), id="B2-C5-K1-3x4"),
    pytest.param(2, 5, 4, 5, 3, 1.0, (), id="B2-C5-K4-5x3"),
    pytest.param(2, 3, 4, 3, 5, 0.5, (), id="B2-C3-K4-3x5-scale0.5"),
    pytest.param(2, 3, 4, 3, 5, 1.0, ((0, 2), (1, 0)), id="B2-C3-K4-3x5-deadclass"),
    pytest.param(1, 3, 1, 1, 1, 1.0, (), id="B1-C3-K1-1x1"),
]


def _sg_inputs(B, C, K, H, W, dead):
    feats, logits = _randn(11, B, C, H, W), 2.0 * _randn(12, B, K, H, W)
    for b, k in dead:
        logits[b, k] = NEG_INF
    # Some -inf pixels inside live classes too.
    if K > 1 and H * W > 2:
        logits[0, K - 1, 0, 0] = NEG_INF
    return feats, logits


@pytest.mark.parametrize("B,C,K,H,W,scale,dead", SG_CASES)
def test_spatial_gather(B, C, K, H, W, scale, dead):
    feats, logits = _sg_inputs(B, C, K, H, W, dead)
    out = ref.spatial_gather(feats, logits, scale=scale)
    _check(out, loop_spatial_gather(feats, logits, scale))
    for b, k in dead:
        assert torch.equal(out[b, :, k], torch.zeros(C, dtype=F64))


def test_spatial_gather_dead_class_zero_grad():
    feats, logits = _sg_inputs(2, 3, 4, 3, 5, ((0, 2), (1, 0)))
    feats.requires_grad_(True)
    logits.requires_grad_(True)
    out = ref.spatial_gather(feats, logits)
    # Upstream gradient on the dead classes only: nothing may reach the inputs.
    g = torch.zeros_like(out)
    g[0, :, 2] = _randn(13, 3)
    g[1, :, 0] = _randn(14, 3)
    gf, gl = torch.autograd.grad(out, (feats, logits), g)
    assert torch.equal(gf, torch.zeros_like(gf))
    assert torch.equal(gl, torch.zeros_like(gl))
    # Full random upstream gradient: finite everywhere, zero on the dead classes' logits.
    out = ref.spatial_gather(feats, logits)
    gf, gl = torch.autograd.grad(out, (feats, logits), _randn(15, *out.shape))
    assert torch.isfinite(gf).all() and torch.isfinite(gl).all()
    assert torch.equal(gl[0, 2], torch.zeros_like(gl[0, 2]))
    assert torch.equal(gl[1, 0], torch.zeros_like(gl[1, 0]))


def _ra_inputs(B, Cqk, Cv, S, H, W, masked):
    q, k, v = _randn(16, B, Cqk, H, W), _randn(17, B, Cqk, S), _randn(18, B, Cv, S)
    bias = None
    if masked:
        bias = _randn(19, B, S)
        bias[0, 1] = NEG_INF  # one absent key
        bias[0, S - 1] = NEG_INF
        bias[1] = NEG_INF  # every key absent: the whole image's rows are fully masked
    return q, k, v, bias


RA_CASES = [
    pytest.param(2, 3, 5, 1, 3, 4, False, None, id="B2-C3x5-S1-3x4"),
    pytest.param(2, 3, 5, 4, 3, 5, False, None, id="B2-C3x5-S4-3x5"),
    pytest.param(2, 3, 5, 4, 3, 5, False, 1.3, id="B2-C3x5-S4-3x5-scale1.3"),
    pytest.param(2, 3, 5, 4, 3, 5, True, None, id="B2-C3x5-S4-3x5-bias-inf"),
    pytest.param(2, 4, 2, 5, 1, 6, True, 0.9, id="B2-C4x2-S5-1x6-bias-inf-scale0.9"),
]


@pytest.mark.parametrize("B,Cqk,Cv,S,H,W,masked,scale", RA_CASES)
def test_region_attention(B, Cqk, Cv, S, H, W, masked, scale):
    q, k, v, bias = _ra_inputs(B, Cqk, Cv, S, H, W, masked)
    out = ref.region_attention(q, k, v, scale=scale, bias=bias)
    _check(out, loop_region_attention(q, k, v, Cqk**-0.5 if scale is None else scale, bias))
    if masked:
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_region_attention_bias_is_additive():
    # A finite bias against the loop with the bias folded in by hand: log-weights.
    q, k, v, _ = _ra_inputs(1, 3, 2, 4, 2, 3, False)
    bias = torch.tensor([[0.0, math.log(2.0), -1.5, 3.0]], dtype=F64)
    _check(ref.region_attention(q, k, v, bias=bias), loop_region_attention(q, k, v, 3**-0.5, bias))


def test_region_attention_masked_row_zero_grad():
    q, k, v, bias = _ra_inputs(2, 3, 5, 4, 3, 5, True)
    for t in (q, k, v, bias):
        t.requires_grad_(True)
    out = ref.region_attention(q, k, v, bias=bias)
    grads = torch.autograd.grad(out, (q, k, v, bias), _randn(20, *out.shape))
    for grad in grads:
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))  # image 1: every key absent
    gb = grads[3]
    assert gb[0, 1] == 0 and gb[0, 3] == 0  # absent keys of image 0
    assert torch.equal(grads[1][0, :, 1], torch.zeros(3, dtype=F64))
    assert torch.equal(grads[2][0, :, 3], torch.zeros(5, dtype=F64))


# --------------------------------------------------------------------------------------------
# Semantic (ISNet)
# --------------------------------------------------------------------------------------------


def _sem_inputs(case: str):
    """-> feats, logits for the named case."""
    if case == "ties":  # small integer logits: many exact ties in the argmax
        g = torch.Generator().manual_seed(21)
        logits = torch.randint(0, 3, (2, 4, 5, 3), generator=g).to(F64)
        return _randn(22, 2, 3, 5, 3), logits
    if case == "tie-everywhere":  # every pixel ties between classes 1 and 2 -> class 1
        logits = _randn(23, 1, 3, 3, 4)
        logits[:, 0] = logits[:, 1] - 1.0
        logits[:, 2] = logits[:, 1]
        return _randn(24, 1, 2, 3, 4), logits
    if case == "one-class-owns-all":
        logits = _randn(25, 2, 4, 3, 5)
        logits[:, 2] += 100.0
        return _randn(26, 2, 3, 3, 5), logits
    if case == "absent-classes":  # only classes 0 and 3 of 5 can win
        logits = _randn(27, 2, 5, 4, 3)
        logits[:, (1, 2, 4)] -= 100.0
        return _randn(28, 2, 3, 4, 3), logits
    if case == "K1":
        return _randn(29, 2, 3, 3, 4), _randn(30, 2, 1, 3, 4)
    if case == "dead-class":  # class 0 owns only pixels whose logits are all -inf
        logits = _randn(31, 2, 3, 3, 4)
        logits[:, 0] = -100.0
        logits[0, :, 1, 2] = NEG_INF
        logits[0, :, 2, 0] = NEG_INF
        logits[1, 0, 0, 0] = 100.0  # image 1: class 0 is present with a finite logit
        logits[1, 0, 0, 1] = NEG_INF  # and an -inf logit at a pixel it does not own
        return _randn(32, 2, 3, 3, 4), logits
    if case == "partly-inf":  # class 0 owns a mix of finite and -inf-logit pixels
        logits = _randn(33, 1, 3, 3, 4)
        logits[0, 0] = -100.0
        logits[0, 0, 0, :2] = 50.0
        logits[0, :, 2, 3] = NEG_INF
        return _randn(34, 1, 2, 3, 4), logits
    raise AssertionError(case)


SEM_CASES = [
    "ties",
    "tie-everywhere",
    "one-class-owns-all",
    "absent-classes",
    "K1",
    "dead-class",
    "partly-inf",
]


@pytest.mark.parametrize("case", SEM_CASES)
def test_semantic_pool(case):
    feats, logits = _sem_inputs(case)
    pooled, regions, counts, labels = loop_semantic(feats, logits)
    _check(ref.semantic_pool(feats, logits), pooled)
    r, n, lab = ref.semantic_pool_regions(feats, logits)
    _check(r, regions)
    assert n.dtype == torch.int64 and lab.dtype == torch.int64
    assert torch.equal(n, counts)
    assert torch.equal(lab, labels)
    # The compact form scattered back is the loop.
    gathered = torch.gather(r, 2, lab.flatten(1).unsqueeze(1).expand(-1, r.shape[1], -1))
    _check(gathered.reshape(pooled.shape), pooled)


def test_semantic_cases_exercise_what_they_claim():
    logits = _sem_inputs("ties")[1]
    top2 = logits.topk(2, dim=1).values
    assert (top2[:, 0] == top2[:, 1]).sum() >= 5  # many exact ties
    assert torch.equal(loop_semantic(*_sem_inputs("tie-everywhere"))[3], torch.ones(1, 3, 4).long())
    counts = loop_semantic(*_sem_inputs("one-class-owns-all"))[2]
    assert torch.equal(counts[:, 2], torch.full((2,), 15))
    counts = loop_semantic(*_sem_inputs("absent-classes"))[2]
    assert (counts[:, (1, 2, 4)] == 0).all() and (counts[:, (0, 3)] > 0).all()
    pooled, _, counts, _ = loop_semantic(*_sem_inputs("dead-class"))
    assert counts[0, 0] == 2 and torch.equal(pooled[0, :, 1, 2], torch.zeros(3, dtype=F64))


def test_semantic_dead_class_zero_grad():
    feats, logits = _sem_inputs("dead-class")
    dead = torch.zeros(2, 1, 3, 4, dtype=torch.bool)
    dead[0, 0, 1, 2] = dead[0, 0, 2, 0] = True
    for fn in (ref.semantic_pool, lambda f, lg: ref.semantic_pool_regions(f, lg)[0]):
        f, lg = feats.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        out = fn(f, lg)
        if out.dim() == 4:  # pooled: upstream gradient only at the dead class's pixels
            g = torch.where(dead, _randn(35, *out.shape), 0.0)
        else:  # regions: upstream gradient only on the dead class of image 0
            g = torch.zeros_like(out)
            g[0, :, 0] = _randn(36, out.shape[1])
        gf, gl = torch.autograd.grad(out, (f, lg), g)
        assert torch.equal(gf, torch.zeros_like(gf))
        assert torch.equal(gl, torch.zeros_like(gl))
        gf, gl = torch.autograd.grad(fn(f, lg), (f, lg), _randn(37, *out.shape))
        assert torch.isfinite(gf).all() and torch.isfinite(gl).all()


# --------------------------------------------------------------------------------------------
# Gradients (float64 gradcheck on tiny shapes)
# --------------------------------------------------------------------------------------------


def _req(*ts):
    return tuple(t.clone().requires_grad_(True) for t in ts)


def _separated_logits(seed: int, B: int, K: int, H: int, W: int) -> torch.Tensor:
    """Logits whose argmax is far from any tie: perturbations cannot change the labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (B, H, W), generator=g)
    labels[:, 0, 0] = K - 1  # at least one class present in every image
    onehot = torch.nn.functional.one_hot(labels, K).permute(0, 3, 1, 2).to(F64)
    return 0.3 * _randn(seed + 1, B, K, H, W) + 10.0 * onehot


GRAD_CASES = {
    "criss_cross-B1-C2x3-3x4": lambda: (
        lambda q, k, v: ref.criss_cross_attention(q, k, v, scale=0.8),
        _req(_randn(40, 1, 2, 3, 4), _randn(41, 1, 2, 3, 4), _randn(42, 1, 3, 3, 4)),
    ),
    "criss_cross-B1-C2x3-1x3": lambda: (
        ref.criss_cross_attention,
        _req(_randn(40, 1, 2, 1, 3), _randn(41, 1, 2, 1, 3), _randn(42, 1, 3, 1, 3)),
    ),
    "interlaced-long-B1-C2x3-4x6-blk2x3": lambda: (
        lambda q, k, v: ref.interlaced_attention(q, k, v, block=(2, 3), mode="long"),
        _req(_randn(43, 1, 2, 4, 6), _randn(44, 1, 2, 4, 6), _randn(45, 1, 3, 4, 6)),
    ),
    "interlaced-short-B1-C2x3-4x6-blk2x3": lambda: (
        lambda q, k, v: ref.interlaced_attention(q, k, v, block=(2, 3), mode="short"),
        _req(_randn(43, 1, 2, 4, 6), _randn(44, 1, 2, 4, 6), _randn(45, 1, 3, 4, 6)),
    ),
    "pyramid_pool-B1-C2-5x7-s123": lambda: (
        lambda x: ref.pyramid_pool(x, (1, 2, 3)),
        _req(_randn(46, 1, 2, 5, 7)),
    ),
    "pyramid_attention-B1-C2x3-q2x3-kv5x4-s12": lambda: (
        lambda q, k, v: ref.pyramid_attention(q, k, v, pool_scales=(1, 2)),
        _req(_randn(47, 1, 2, 2, 3), _randn(48, 1, 2, 5, 4), _randn(49, 1, 3, 5, 4)),
    ),
    "spatial_gather-B2-C3-K3-3x4-deadclass": lambda: (
        lambda f, lg: ref.spatial_gather(f, lg, scale=0.7),
        _req(*_sg_inputs(2, 3, 3, 3, 4, ((1, 1),))),
    ),
    "region_attention-B2-C3x2-S4-2x3-bias-inf": lambda: (
        lambda q, k, v, b: ref.region_attention(q, k, v, bias=b),
        _req(*_ra_inputs(2, 3, 2, 4, 2, 3, True)),
    ),
    "semantic_pool-B2-C2-K3-2x3": lambda: (
        ref.semantic_pool,
        _req(_randn(50, 2, 2, 2, 3), _separated_logits(51, 2, 3, 2, 3)),
    ),
    "semantic_pool_regions-B2-C2-K4-3x4": lambda: (
        lambda f, lg: ref.semantic_pool_regions(f, lg)[0],
        _req(_randn(52, 2, 2, 3, 4), _separated_logits(53, 2, 4, 3, 4)),
    ),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck(name):
    fn, inputs = GRAD_CASES[name]()
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Dtypes and layouts
# --------------------------------------------------------------------------------------------


def _all_ops():
    """name -> (fn returning a tuple of tensors, float inputs)."""
    q, k, v = _randn(60, 2, 3, 4, 6), _randn(61, 2, 3, 4, 6), _randn(62, 2, 5, 4, 6)
    feats, logits = _randn(63, 2, 5, 4, 6), _randn(64, 2, 3, 4, 6)
    kr, vr, bias = _randn(65, 2, 3, 4), _randn(66, 2, 5, 4), _randn(67, 2, 4)
    bias[0, 1] = NEG_INF
    return {
        "criss_cross": (lambda *t: (ref.criss_cross_attention(*t),), (q, k, v)),
        "interlaced-long": (
            lambda *t: (ref.interlaced_attention(*t, block=(2, 3), mode="long"),),
            (q, k, v),
        ),
        "interlaced-short": (
            lambda *t: (ref.interlaced_attention(*t, block=(2, 3), mode="short"),),
            (q, k, v),
        ),
        "pyramid_pool": (lambda x: (ref.pyramid_pool(x, (1, 2, 3)),), (v,)),
        "pyramid_attention": (
            lambda *t: (ref.pyramid_attention(*t, pool_scales=(1, 2, 3)),),
            (q[:, :, :3], k, v),
        ),
        "spatial_gather": (lambda *t: (ref.spatial_gather(*t),), (feats, logits)),
        "region_attention": (
            lambda q, k, v, b: (ref.region_attention(q, k, v, bias=b),),
            (q, kr, vr, bias),
        ),
        "semantic_pool": (lambda *t: (ref.semantic_pool(*t),), (feats, logits)),
        "semantic_pool_regions": (lambda *t: ref.semantic_pool_regions(*t), (feats, logits)),
    }


OP_NAMES = list(_all_ops())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", OP_NAMES)
def test_low_precision_computes_in_fp32(name, dtype):
    fn, inputs = _all_ops()[name]
    low = tuple(t.to(dtype) for t in inputs)
    outs = fn(*low)
    expected = fn(*(t.float() for t in low))  # the same inputs, upcast by hand
    for out, exp in zip(outs, expected, strict=True):
        if exp.is_floating_point():
            assert out.dtype == dtype
            assert torch.equal(out, exp.to(dtype))
        else:
            assert torch.equal(out, exp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", OP_NAMES)
def test_float_dtypes_kept(name, dtype):
    fn, inputs = _all_ops()[name]
    outs = fn(*(t.to(dtype) for t in inputs))
    reference = fn(*inputs)
    for out, exp in zip(outs, reference, strict=True):
        if exp.is_floating_point():
            assert out.dtype == dtype
            tol = TOL if dtype == F64 else dict(atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out, exp.to(dtype), **tol)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout: channels_last for 4-D, transposed storage
    otherwise."""
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.transpose(0, -1).contiguous().transpose(0, -1)


@pytest.mark.parametrize("name", OP_NAMES)
def test_strided_inputs(name):
    fn, inputs = _all_ops()[name]
    strided = tuple(_strided(t) for t in inputs)
    assert not any(t.is_contiguous() for t in strided)
    for out, exp in zip(fn(*strided), fn(*inputs), strict=True):
        if exp.is_floating_point():
            torch.testing.assert_close(out, exp, **TOL)
        else:
            assert torch.equal(out, exp)
