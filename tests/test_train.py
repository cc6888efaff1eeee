"""fastctx.train: datasets, augmentation, metrics, loss, the loop (resume), inference, the CLI.

The models are tiny ones defined here with the ``fastctx.models`` dict contract, so these tests
do not depend on :mod:`fastctx.models`.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from fastctx import cli
from fastctx.train import (
    ADE20K,
    IGNORE_INDEX,
    Augment,
    CheckpointError,
    Cityscapes,
    DatasetError,
    SyntheticScenes,
    TrainConfig,
    confusion_matrix,
    evaluate,
    seg_loss,
    slide_inference,
    summarize,
    train,
    whole_inference,
)
from fastctx.train.data import MEAN, STD
from fastctx.train.imageio import ImageReadError, read_image, write_png
from fastctx.train.loop import ohem_weight, poly_lr


# --------------------------------------------------------------------------- tiny models
class TinySeg(nn.Module):
    """Stride-2 conv stem, BN, dropout; ``{"out"}`` in eval, ``{"out", "aux"}`` in train mode."""

    def __init__(self, num_classes: int, width: int = 8, norm: bool = True, dropout: float = 0.1):
        super().__init__()

        def block(cin, cout, stride):
            layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=not norm)]
            if norm:
                layers.append(nn.BatchNorm2d(cout))
            return nn.Sequential(*layers, nn.ReLU())

        self.stem = block(3, width, 2)
        self.body = block(width, width, 1)
        self.drop = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(width, num_classes, 1)
        self.aux = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        f1 = self.stem(x)
        out = {"out": self.head(self.drop(self.body(f1)))}
        if self.training:
            out["aux"] = self.aux(f1)
        return out


class PixelSeg(nn.Module):
    """Per-pixel (1x1 convs only): sliding-window and whole-image inference must agree."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Tanh(), nn.Conv2d(6, num_classes, 1))

    def forward(self, x):
        return {"out": self.net(x)}


def tiny_factory(name, num_classes, backbone=None, backend=None):
    assert name.startswith("tiny"), name
    return TinySeg(num_classes, width=int(name[4:] or 8))


def small_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(iters=6, batch_size=2, crop=(32, 32), ckpt_every=3, log_every=1, device="cpu",
                out_dir=str(tmp_path), model_name="tiny")
    base.update(kw)
    return TrainConfig(**base)


def syn(split="train", **kw):
    kw.setdefault("size", (40, 40))
    kw.setdefault("num_classes", 5)
    kw.setdefault("length", 16)
    return SyntheticScenes(split, **kw)


# --------------------------------------------------------------------------- images and datasets
def _png_with_filters(arr: np.ndarray, path) -> None:
    """PNG (RGB or gray) whose rows cycle through filter types 0..4, encoded here from the spec."""
    h, w = arr.shape[:2]
    bpp = 1 if arr.ndim == 2 else 3
    rows = arr.reshape(h, w * bpp).astype(np.int32)
    out = []
    for y in range(h):
        ft = y % 5
        cur, prev = rows[y], rows[y - 1] if y else np.zeros_like(rows[0])
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        if ft == 0:
            pred = np.zeros_like(cur)
        elif ft == 1:
            pred = left
        elif ft == 2:
            pred = prev
        elif ft == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        out.append(bytes([ft]) + ((cur - pred) % 256).astype(np.uint8).tobytes())

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if bpp == 1 else 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(out))) + chunk(b"IEND", b"")
    path.write_bytes(data)


@pytest.mark.parametrize("gray", [True, False], ids=["gray", "rgb"])
def test_png_roundtrip_and_all_row_filters(tmp_path, gray):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (11, 7) if gray else (11, 7, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", arr)
    _png_with_filters(arr, tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        got = read_image(tmp_path / name, gray=gray)
        np.testing.assert_array_equal(got, arr)


def test_unreadable_images_name_the_file(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError, match="x.png"):
        read_image(bad)
    with pytest.raises(ImageReadError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    jpg = tmp_path / "y.jpg"
    jpg.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageReadError, match="y.jpg"):
        read_image(jpg)


def test_synthetic_scenes_are_deterministic_and_held_out():
    a, b = syn(), syn()
    for i in (0, 7):
        ia, la = a.load(i)
        ib, lb = b.load(i)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
        assert ia.shape == (40, 40, 3) and ia.dtype == np.uint8 and la.shape == (40, 40)
        assert la.max() < 5 and len(np.unique(la)) >= 2
    assert not np.array_equal(a.load(0)[0], a.load(1)[0])
    assert not np.array_equal(a.load(0)[0], syn("val").load(0)[0])
    assert not np.array_equal(a.load(0)[0], syn(seed=1).load(0)[0])
    # every class appears over a few images
    seen = set()
    for i in range(16):
        seen |= set(np.unique(a.load(i)[1]).tolist())
    assert seen == set(range(5))


def _cityscapes(root, split="train", n=(2, 1), size=(12, 20)):
    rng = np.random.default_rng(1)
    made = []
    for c, count in enumerate(n):
        city = f"city{c}"
        os.makedirs(root / "leftImg8bit" / split / city, exist_ok=True)
        os.makedirs(root / "gtFine" / split / city, exist_ok=True)
        for k in range(count):
            stem = f"{city}_{k:06d}_000019"
            img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            lab = rng.integers(0, 19, size, dtype=np.uint8)
            lab[0, :3] = IGNORE_INDEX
            write_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", img)
            write_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", lab)
            made.append((img, lab, root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png"))
    return made


def test_cityscapes_fixture(tmp_path):
    made = _cityscapes(tmp_path)
    ds = Cityscapes(str(tmp_path), "train")
    assert len(ds) == 3 and ds.num_classes == 19
    for i, (img, lab, _) in enumerate(made):
        gi, gl = ds.load(i)
        np.testing.assert_array_equal(gi, img)
        np.testing.assert_array_equal(gl, lab)


def test_cityscapes_bad_inputs(tmp_path):
    with pytest.raises(DatasetError, match="does_not_exist"):
        Cityscapes(str(tmp_path / "does_not_exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="leftImg8bit"):
        Cityscapes(str(tmp_path / "empty"))
    made = _cityscapes(tmp_path / "ok")
    # out-of-range id (not 255)
    lab = made[1][1].copy()
    lab[2, 2] = 19
    write_png(made[1][2], lab)
    ds = Cityscapes(str(tmp_path / "ok"))
    ds.load(0)
    with pytest.raises(DatasetError, match=r"city0_000001_000019_gtFine_labelTrainIds\.png.*\[19\]"):
        ds.load(1)
    # size mismatch
    write_png(made[2][2], np.zeros((5, 5), np.uint8))
    with pytest.raises(DatasetError, match=r"sizes differ for .*city1_000000_000019_gtFine_labelTrainIds\.png"):
        ds.load(2)
    # missing label
    os.remove(made[0][2])
    with pytest.raises(DatasetError, match=r"city0_000000_000019_leftImg8bit\.png"):
        Cityscapes(str(tmp_path / "ok"))


def test_ade20k_fixture_reduce_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    (base / "images" / "validation").mkdir(parents=True)
    (base / "annotations" / "validation").mkdir(parents=True)
    lab = np.array([[0, 1, 2], [150, 75, 0]], np.uint8)
    img = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    # A PNG stream under the .jpg name: no JPEG encoder is installed here; the reader goes by content.
    write_png(base / "images" / "validation" / "ADE_val_00000001.jpg", img)
    write_png(base / "annotations" / "validation" / "ADE_val_00000001.png", lab)
    for root in (tmp_path, base):
        ds = ADE20K(str(root), "val")
        gi, gl = ds.load(0)
        np.testing.assert_array_equal(gi, img)
        np.testing.assert_array_equal(gl, [[255, 0, 1], [149, 74, 255]])
    with pytest.raises(DatasetError, match="training"):
        ADE20K(str(tmp_path), "train")


# --------------------------------------------------------------------------- augmentation
def test_augment_shapes_and_ignore_pixels():
    ds = syn(size=(48, 40))
    img, lab = ds.load(3)
    lab = lab.copy()
    lab[10:20, 5:15] = IGNORE_INDEX
    ident = Augment((48, 40), ratio_range=(1.0, 1.0), cat_max_ratio=None, flip=0.0, photometric=False)
    x, y = ident(img, lab, np.random.default_rng(0))
    assert torch.equal(y, torch.from_numpy(lab).long())  # identity settings keep the label exactly
    aug = Augment((32, 32))
    n_ignore = 0
    for s in range(12):
        x, y = aug(img, lab, np.random.default_rng(s))
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.shape == (32, 32)
        assert set(y.unique().tolist()) <= set(np.unique(lab).tolist())  # nearest resize: no new ids
        n_ignore += int((y == IGNORE_INDEX).sum())
    assert n_ignore > 0
    # downscaled below the crop: padded with ignore
    small = Augment((64, 64), ratio_range=(0.5, 0.5), cat_max_ratio=None, photometric=False)
    _, y = small(img, lab, np.random.default_rng(0))
    assert (y[24:, :] == IGNORE_INDEX).all() and (y[:, 20:] == IGNORE_INDEX).all()
    assert (y[:24, :20] != IGNORE_INDEX).any()


def test_augment_is_a_function_of_the_rng():
    img, lab = syn().load(0)
    aug = Augment((32, 32))
    a = aug(img, lab, np.random.default_rng([0, 1, 5]))
    b = aug(img, lab, np.random.default_rng([0, 1, 5]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------- metrics and loss
def test_metrics_against_hand_computed_confusion_matrix():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    hist = confusion_matrix(pred, label, 4)
    expected = torch.tensor([[1, 1, 0, 0], [1, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(hist, expected)
    m = summarize(hist, ("a", "b", "c", "d"))
    # IoU = TP / (GT + P - TP): a 1/(2+3-1), b 2/(3+3-2), c 1/(2+1-1); d absent -> NaN, not averaged
    assert m["IoU"]["a"] == pytest.approx(1 / 4) and m["IoU"]["b"] == pytest.approx(2 / 4)
    assert m["IoU"]["c"] == pytest.approx(1 / 2) and np.isnan(m["IoU"]["d"])
    assert m["mIoU"] == pytest.approx((1 / 4 + 2 / 4 + 1 / 2) / 3)
    assert m["aAcc"] == pytest.approx(4 / 7)
    assert m["mAcc"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(pred, torch.full_like(label, 4), 4)


def test_seg_loss_matches_manual_and_aux_weights():
    torch.manual_seed(0)
    label = torch.randint(0, 3, (2, 8, 8))
    label[0, :2] = IGNORE_INDEX
    out, aux, aux2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 2, 2)
    cfg = TrainConfig(aux_weights={"aux2": 0.25})
    got = seg_loss({"out": out, "aux": aux, "aux2": aux2}, label, cfg)

    def ce(x):
        x = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
        per = torch.nn.functional.cross_entropy(x, label, ignore_index=255, reduction="none")
        return per.sum() / per.numel()  # mmseg avg_non_ignore=False: mean over all pixels

    want = ce(out) + 0.4 * ce(aux) + 0.25 * ce(aux2)
    torch.testing.assert_close(got["loss"], want)
    torch.testing.assert_close(got["loss_aux"], ce(aux))
    with pytest.raises(ValueError, match="'out'"):
        seg_loss({"aux": aux}, label, cfg)


def test_ohem_keeps_hard_pixels():
    # true-class probabilities 0.9, 0.6, 0.3 and an ignored pixel
    p = torch.tensor([0.9, 0.6, 0.3, 0.5])
    logits = torch.stack([p.log(), (1 - p).log()]).view(1, 2, 1, 4)
    label = torch.tensor([[[0, 0, 0, 255]]])
    w = ohem_weight(logits, label, thresh=0.7, min_kept=1)
    assert w.tolist() == [[[0.0, 1.0, 1.0, 0.0]]]
    # thresh 0.5 alone keeps 1 pixel; min_kept=2 raises the threshold to the 3rd smallest
    # probability (mmseg: sort_prob[min_kept]), so the 2 hardest pixels are kept
    assert ohem_weight(logits, label, thresh=0.5, min_kept=1).tolist() == [[[0.0, 0.0, 1.0, 0.0]]]
    assert ohem_weight(logits, label, thresh=0.5, min_kept=2).tolist() == [[[0.0, 1.0, 1.0, 0.0]]]


def test_poly_lr_schedule():
    cfg = TrainConfig(iters=100)
    assert poly_lr(0, cfg) == pytest.approx(0.01)
    assert poly_lr(100, cfg) == pytest.approx(1e-4)
    assert poly_lr(50, cfg) == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4)


# --------------------------------------------------------------------------- inference
def test_slide_inference_equals_whole_for_a_per_pixel_model():
    model = PixelSeg(4).eval()
    x = torch.randn(2, 3, 37, 53)
    with torch.no_grad():
        whole = whole_inference(model, x)
        for crop, stride in [((16, 20), (10, 12)), ((37, 53), (5, 5)), ((50, 60), (30, 30)), ((7, 9), (7, 9))]:
            torch.testing.assert_close(slide_inference(model, x, crop, stride), whole, rtol=1e-5, atol=1e-6)


def test_slide_inference_averages_overlaps():
    class Count(nn.Module):  # logits = 1 everywhere: the average of overlapping windows is still 1
        def forward(self, x):
            return {"out": torch.ones(x.shape[0], 2, (x.shape[2] + 1) // 2, (x.shape[3] + 1) // 2)}

    got = slide_inference(Count(), torch.zeros(1, 3, 23, 31), (10, 12), (6, 7))
    torch.testing.assert_close(got, torch.ones(1, 2, 23, 31))


def test_evaluate_perfect_and_slide_modes():
    class Oracle(nn.Module):  # predicts class = (red channel > 0), so its mIoU on such labels is 1
        def forward(self, x):
            r = (x[:, :1] > 0).float()
            return {"out": torch.cat([1 - r, r], 1) * 10}

    class Data(SyntheticScenes):
        def _read(self, i):
            rng = np.random.default_rng(i)
            lab = rng.integers(0, 2, (17, 23), dtype=np.uint8)
            img = np.where(lab[..., None] == 1, 250, 10).astype(np.uint8).repeat(3, 2)
            lab[0, 0] = IGNORE_INDEX
            return img, lab, f"oracle[{i}]"

    ds = Data(length=3, num_classes=2)
    for kw in ({"mode": "whole"}, {"mode": "slide", "crop": (8, 8), "stride": (5, 5)}):
        m = evaluate(Oracle(), ds, device="cpu", progress=False, **kw)
        assert m["mIoU"] == 1.0 and m["aAcc"] == 1.0 and m["images"] == 3
    with pytest.raises(ValueError, match="slide"):
        evaluate(Oracle(), ds, mode="slide", device="cpu")


# --------------------------------------------------------------------------- the loop
def _read_log(path):
    with open(path) as f:
        return [json.loads(ln) for ln in f]


def test_short_run_reduces_the_loss(tmp_path):
    torch.manual_seed(0)
    model = TinySeg(5, width=12)
    cfg = small_cfg(tmp_path, iters=30, batch_size=4, ckpt_every=30, lr=0.05)
    res = train(model, syn(length=64), cfg)
    losses = res["losses"]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    log = _read_log(res["log"])
    assert [r["iter"] for r in log] == list(range(1, 31))
    assert {"loss", "loss_out", "loss_aux", "lr", "img_per_s"} <= set(log[0])
    assert log[0]["lr"] == pytest.approx(0.05) and log[-1]["lr"] < log[0]["lr"]
    assert os.path.isfile(res["checkpoint"])


class _Interrupting(SyntheticScenes):
    """Raises KeyboardInterrupt (Ctrl-C) on its ``after``-th load."""

    def __init__(self, after, **kw):
        super().__init__(**kw)
        self.after, self.calls = after, 0

    def _read(self, i):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return super()._read(i)


def test_resume_after_interrupt_continues_bit_for_bit(tmp_path, capsys):
    kw = dict(split="train", size=(40, 40), num_classes=5, length=8)  # 12 samples: crosses an epoch
    torch.manual_seed(1)
    ref = train(TinySeg(5), SyntheticScenes(**kw), small_cfg(tmp_path / "a"))
    ref_w = {k: v.clone() for k, v in ref["model"].state_dict().items()}

    torch.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while loading iteration 5 (loads 9 and 10)
        train(TinySeg(5), _Interrupting(after=10, **kw), small_cfg(tmp_path / "b"))
    assert "interrupted during iteration 5" in capsys.readouterr().err
    log_b = _read_log(tmp_path / "b" / "log.jsonl")
    assert [r["loss"] for r in log_b] == ref["losses"][:4]
    torch.manual_seed(123)  # the resumed process starts from other weights and RNG state
    torch.rand(7)
    ckpt = str(tmp_path / "b" / "latest.pth")
    resumed = train(TinySeg(5), SyntheticScenes(**kw), small_cfg(tmp_path / "b"), resume=ckpt)
    assert resumed["losses"] == ref["losses"][3:]  # the checkpoint was at 3: iteration 4 is redone
    for k, v in resumed["model"].state_dict().items():
        assert torch.equal(v, ref_w[k]), k
    assert [r["loss"] for r in _read_log(resumed["log"])] == ref["losses"]


def test_accumulation_matches_the_larger_batch(tmp_path):
    ds = syn(length=8)
    runs = []
    for bs, acc in ((4, 1), (2, 2)):
        torch.manual_seed(2)
        model = TinySeg(5, norm=False, dropout=0.0)
        runs.append(train(model, ds, small_cfg(tmp_path / f"{bs}", iters=3, batch_size=bs, accum=acc)))
    np.testing.assert_allclose(runs[0]["losses"], runs[1]["losses"], rtol=1e-5)
    for (k, a), b in zip(runs[0]["model"].state_dict().items(), runs[1]["model"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_channels_last_run(tmp_path, amp):
    torch.manual_seed(3)
    res = train(TinySeg(5), syn(), small_cfg(tmp_path, iters=2, amp=amp, channels_last=True, ohem=True))
    assert len(res["losses"]) == 2 and all(np.isfinite(res["losses"]))
    m = evaluate(res["model"], syn("val", length=2), device="cpu", amp=amp, channels_last=True, progress=False)
    assert 0.0 <= m["aAcc"] <= 1.0


def test_checkpoint_errors_name_the_file(tmp_path):
    torch.manual_seed(4)
    res = train(TinySeg(5), syn(), small_cfg(tmp_path, iters=1, ckpt_every=1))
    path = res["checkpoint"]
    with pytest.raises(CheckpointError, match=r"latest\.pth.*does not match.*shape mismatches"):
        train(TinySeg(5, width=6), syn(), small_cfg(tmp_path / "w", iters=2), resume=path)
    with pytest.raises(CheckpointError, match=r"latest\.pth.*from model 'tiny', not 'other'"):
        train(TinySeg(5), syn(), small_cfg(tmp_path / "o", iters=2, model_name="other"), resume=path)
    with pytest.raises(CheckpointError, match=r"nope\.pth does not exist"):
        train(TinySeg(5), syn(), small_cfg(tmp_path / "n", iters=2), resume=str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match=r"latest\.pth was trained on a stream .* cannot continue"):
        train(TinySeg(5), syn(length=9), small_cfg(tmp_path / "d", iters=2), resume=path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        train(TinySeg(5), syn(), small_cfg(tmp_path / "j", iters=2), resume=str(junk))
    torch.save({"state_dict": {}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match=r"foreign\.pth is not a fastctx training checkpoint"):
        train(TinySeg(5), syn(), small_cfg(tmp_path / "f", iters=2), resume=str(tmp_path / "foreign.pth"))
    with pytest.raises(ValueError, match="amp"):
        train(TinySeg(5), syn(), small_cfg(tmp_path, amp="fp8"))


# --------------------------------------------------------------------------- CLI
def test_cli_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--image-size", "40", "--num-classes", "5", "--val-images", "2", "--device", "cpu"]
    rc = cli.main(["train", "--model", "tiny", "--iters", "2", "--batch-size", "2", "--crop", "32",
                   "--train-images", "8", "--ckpt-every", "1", "--out", str(out), *common], model_factory=tiny_factory)
    assert rc == 0
    cap = capsys.readouterr()
    text = cap.out
    assert "loss" in cap.err and "img/s" in cap.err  # the progress (plain text without tqdm) on stderr
    assert f"checkpoint: {out / 'latest.pth'}" in text and f"metrics: {out / 'metrics.json'}" in text
    assert "demo target" not in text  # synthetic data, but not the demo
    m = json.loads((out / "metrics.json").read_text())
    assert m["images"] == 2 and 0 <= m["mIoU"] <= 1 and set(m["IoU"]) == set(syn().class_names)
    assert len(_read_log(out / "log.jsonl")) == 2

    # eval reuses the training run's synthetic settings (5 classes, 40x40) from the checkpoint
    rc = cli.main(["eval", str(out / "latest.pth"), "--mode", "slide", "--slide-crop", "24", "--slide-stride", "16",
                   "--val-images", "2", "--device", "cpu"], model_factory=tiny_factory)
    assert rc == 0
    assert f"metrics: {out / 'metrics_slide.json'}" in capsys.readouterr().out
    m2 = json.loads((out / "metrics_slide.json").read_text())
    assert m2["model"] == "tiny" and 0 <= m2["mIoU"] <= 1 and len(m2["IoU"]) == 5
    # resume from OUT/latest.pth and continue to 3 iterations
    rc = cli.main(["train", "--model", "tiny", "--iters", "3", "--batch-size", "2", "--crop", "32", "--train-images",
                   "8", "--out", str(out), "--resume", "--no-eval", *common], model_factory=tiny_factory)
    assert rc == 0 and [r["iter"] for r in _read_log(out / "log.jsonl")] == [1, 2, 3]
    with pytest.raises(CheckpointError, match="latest.pth"):
        cli.main(["eval", str(out / "latest.pth"), "--model", "tiny6", *common], model_factory=tiny_factory)


def test_cli_defaults_are_the_demo():
    p_args = []

    def spy(name, num_classes, backbone=None, backend=None):
        p_args.append((name, num_classes))
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        cli.main(["train"], model_factory=spy)
    assert p_args == [("ccnet_r18_d8", 8)]


@pytest.mark.parametrize(("argv", "demo"), [
    ([], True),  # the defaults: the demo
    (["--model", cli.DEMO["model"], "--iters", str(cli.DEMO["iters"]), "--crop", str(cli.DEMO["crop"])], True),
    (["--model", "tiny"], False),
    (["--iters", str(cli.DEMO["iters"] - 1)], False),
    (["--batch-size", str(cli.DEMO["batch_size"] // 2)], False),
    (["--crop", str(cli.DEMO["crop"] + 8)], False),
    (["--val-images", "4"], False),
], ids=["defaults", "defaults-spelled-out", "other-model", "other-iters", "other-batch", "other-crop",
        "other-val-images"])
def test_cli_prints_the_demo_target_only_for_the_demo(tmp_path, monkeypatch, capsys, argv, demo):
    """``fastctx train`` on synthetic data prints the demo target line only when the run is the
    demo (every demo setting at the parser's default); the training and evaluation are faked
    (the line depends only on the arguments, the mIoU and the wall time)."""
    import fastctx.train as fastctx_train

    def fake_train(model, tr, cfg, resume=None):
        os.makedirs(cfg.out_dir, exist_ok=True)
        return {"checkpoint": os.path.join(cfg.out_dir, "latest.pth"), "log": os.path.join(cfg.out_dir, "log.jsonl"),
                "model": model}

    def fake_evaluate(model, va, **kw):
        return {"mIoU": 0.9, "mAcc": 0.95, "aAcc": 0.97, "images": len(va), "IoU": {"ground": 0.9}}

    monkeypatch.setattr(fastctx_train, "train", fake_train)
    monkeypatch.setattr(fastctx_train, "evaluate", fake_evaluate)
    out = tmp_path / "run"
    rc = cli.main(["train", *argv, "--out", str(out), "--device", "cpu"],
                  model_factory=lambda name, num_classes, **kw: TinySeg(num_classes))
    assert rc == 0
    text = capsys.readouterr().out
    assert f"metrics: {out / 'metrics.json'}" in text and "mIoU 0.9000" in text
    lines = [line for line in text.splitlines() if "target" in line]
    if demo:
        assert len(lines) == 1 and lines[0].startswith("demo target (mIoU >= 0.8 in 15 min): mIoU 0.9000 in ")
        assert lines[0].endswith(" min -> met")
    else:
        assert lines == []


@pytest.mark.parametrize("has_tqdm", [False, True], ids=["plain", "tqdm"])
def test_progress_reports_loss_lr_throughput(monkeypatch, capsys, has_tqdm):
    from fastctx.train.loop import _Progress

    if has_tqdm:
        pytest.importorskip("tqdm")
    else:
        monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    rec = {"loss": 1.25, "lr": 0.01, "img_per_s": 3.5, "step_s": 2.0}
    p = _Progress(total=4, start=0, enabled=True)
    assert (p.bar is not None) == has_tqdm
    p.update(2, rec, force=True)
    p.close()
    err = capsys.readouterr().err
    assert "loss 1.2500" in err and "lr 1.00e-02" in err and "3.5 img/s" in err
    if not has_tqdm:
        assert "[train] it 2/4" in err and "eta 0.1 min" in err


def test_random_crop_cat_max_ratio():
    lab = np.zeros((64, 64), np.uint8)
    lab[:, 48:] = 1  # crops of 32 px: about half the positions see class 1 in > 25% of the pixels
    img = np.zeros((64, 64, 3), np.uint8)
    aug = Augment((32, 32), ratio_range=(1.0, 1.0), cat_max_ratio=0.75, flip=0.0, photometric=False)
    free = Augment((32, 32), ratio_range=(1.0, 1.0), cat_max_ratio=None, flip=0.0, photometric=False)
    ratios, free_ratios = [], []
    for s in range(20):
        for a, acc in ((aug, ratios), (free, free_ratios)):
            _, y = a(img, lab, np.random.default_rng(s))
            acc.append(max(float((y == 0).float().mean()), float((y == 1).float().mean())))
    # mmseg gives up after 10 tries, so a rare crop may still break the ratio (about 6% here)
    assert sum(r < 0.75 for r in ratios) >= 17
    assert sum(r < 0.75 for r in free_ratios) <= 10  # about 1 in 4 without the constraint
    assert max(free_ratios) == 1.0


def test_photometric_distortion_stays_in_range_and_changes_colors():
    img, lab = syn().load(2)
    plain = Augment((40, 40), ratio_range=(1.0, 1.0), cat_max_ratio=None, flip=0.0, photometric=False)
    photo = Augment((40, 40), ratio_range=(1.0, 1.0), cat_max_ratio=None, flip=0.0, photometric=True)
    lo = (torch.tensor([0.0, 0, 0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (torch.tensor([255.0, 255, 255]) - torch.tensor(MEAN)) / torch.tensor(STD)
    changed = 0
    for s in range(6):
        x0, y0 = plain(img, lab, np.random.default_rng(s))
        x1, y1 = photo(img, lab, np.random.default_rng(s))
        assert torch.equal(y0, y1)
        assert (x1 >= lo.view(3, 1, 1) - 1e-5).all() and (x1 <= hi.view(3, 1, 1) + 1e-5).all()
        changed += not torch.allclose(x0, x1)
    assert changed >= 3


def test_data_workers_do_not_change_the_run(tmp_path):
    runs = []
    for workers in (0, 2):
        torch.manual_seed(6)
        runs.append(train(TinySeg(5), syn(), small_cfg(tmp_path / f"w{workers}", iters=3, workers=workers))["losses"])
    assert runs[0] == runs[1]
