"""Datasets, augmentation and the deterministic sampler of ``fastctx train``.

Every dataset returns raw ``(image uint8 [H, W, 3] RGB, label uint8 [H, W])`` pairs with train ids
``0..num_classes-1`` and 255 for "ignore". :class:`Augment` (train) and :class:`EvalTransform`
turn them into normalized float tensors. Randomness never comes from global state: the sample at
global position ``p`` of the training stream is ``dataset[perm_epoch[p % N]]`` augmented with
``numpy.random.default_rng([seed, 1, p])``, so a run is a pure function of (seed, iteration):
resuming, changing the number of data workers or the number of processes does not change it.
"""

from __future__ import annotations

import glob
import math
import os

import numpy as np
import torch

from fastctx.train.imageio import read_image

IGNORE_INDEX = 255
MEAN = (123.675, 116.28, 103.53)  # mmseg's ImageNet mean/std, RGB order
STD = (58.395, 57.12, 57.375)


class DatasetError(ValueError):
    """A dataset folder or file that is missing or malformed; the message names the path."""


class SegDataset:
    """Base: ``len(ds)``, ``ds.load(i) -> (img, label)`` checked, ``num_classes``, ``class_names``."""

    num_classes: int
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        raise NotImplementedError

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        img, label, where = self._read(i)
        if img.shape[:2] != label.shape:
            raise DatasetError(
                f"fastctx.train: image and label sizes differ for {where}: "
                f"image {img.shape[1]}x{img.shape[0]}, label {label.shape[1]}x{label.shape[0]} (WxH)"
            )
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            ids = sorted(int(v) for v in np.unique(label[bad]))
            raise DatasetError(
                f"fastctx.train: label {where} has class ids {ids[:8]} outside 0..{self.num_classes - 1} "
                f"(and not the ignore index {IGNORE_INDEX})"
            )
        return img, label


# --------------------------------------------------------------------------- synthetic scenes
_SYN_NAMES = ("background", "disc", "box", "stripe", "grid", "dots", "ring", "blob", "wave", "check")
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


class SyntheticScenes(SegDataset):
    """Procedurally generated scenes: textured objects of several classes that occlude each other.

    The class of a pixel is told by its color family and texture (stripes of a class-specific
    period and angle, checks or dots), never by the object's outline alone: shapes (ellipses,
    boxes, triangles, rings) are drawn at random for every class. Image ``i`` of ``split`` is a
    pure function of ``(seed, split, i)``; the ``"val"`` split is held out from ``"train"``.

    Args:
        split (str): ``"train"``, ``"val"`` or ``"test"``.
        length (int): number of images. Default: 2000.
        size (tuple[int, int]): ``(H, W)``. Default: ``(128, 128)``.
        num_classes (int): 2..10, class 0 is the background. Default: 8.
        seed (int): Default: 0.
    """

    def __init__(self, split: str = "train", length: int = 2000, size: tuple[int, int] = (128, 128),
                 num_classes: int = 8, seed: int = 0):
        if split not in _SPLIT_IDS:
            raise ValueError(f"fastctx.train.SyntheticScenes: split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        if not 2 <= num_classes <= len(_SYN_NAMES):
            raise ValueError(f"fastctx.train.SyntheticScenes: num_classes must be in 2..{len(_SYN_NAMES)}, got {num_classes}")
        if length < 1 or min(size) < 16:
            raise ValueError(f"fastctx.train.SyntheticScenes: need length >= 1 and size >= 16, got {length}, {size}")
        self.split, self.length, self.size, self.seed = split, length, tuple(size), seed
        self.num_classes = num_classes
        self.class_names = _SYN_NAMES[:num_classes]
        # Class appearance is fixed by the seed alone (shared by all splits).
        rng = np.random.default_rng([seed, 99])
        hues = (np.arange(num_classes) + rng.uniform(-0.15, 0.15, num_classes)) / num_classes
        self._color = np.stack([_hsv_to_rgb(hh % 1.0, 0.75, 0.85) for hh in hues]) * 255
        self._color[0] = (110, 105, 95)  # a grey-brown ground
        self._period = rng.uniform(4.0, 12.0, num_classes)
        self._angle = rng.uniform(0, math.pi, num_classes)
        self._kind = np.arange(num_classes) % 3  # 0 stripes, 1 checks, 2 dots

    def __len__(self) -> int:
        return self.length

    def _texture(self, c: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        per, ang, phase = self._period[c], self._angle[c], rng.uniform(0, 2 * math.pi)
        u = xx * math.cos(ang) + yy * math.sin(ang)
        v = -xx * math.sin(ang) + yy * math.cos(ang)
        if self._kind[c] == 0:
            t = np.sin(2 * math.pi * u / per + phase)
        elif self._kind[c] == 1:
            t = np.sign(np.sin(2 * math.pi * u / per + phase) * np.sin(2 * math.pi * v / per))
        else:
            t = np.cos(2 * math.pi * u / per + phase) * np.cos(2 * math.pi * v / per) > 0.5
            t = t * 2.0 - 1.0
        return t

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        if not 0 <= i < self.length:
            raise IndexError(f"fastctx.train.SyntheticScenes: index {i} out of range 0..{self.length - 1}")
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], i])
        h, w = self.size
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        label = np.zeros((h, w), np.uint8)
        img = self._paint(0, yy, xx, rng, amp=12.0)
        for _ in range(rng.integers(3, 9)):
            c = int(rng.integers(1, self.num_classes))
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(0.08, 0.3) * h, rng.uniform(0.08, 0.3) * w
            shape = rng.integers(0, 4)
            dy, dx = (yy - cy) / ry, (xx - cx) / rx
            if shape == 0:
                m = dy**2 + dx**2 <= 1
            elif shape == 1:
                m = (np.abs(dy) <= 1) & (np.abs(dx) <= 1)
            elif shape == 2:
                m = (dy <= 1) & (dy >= 2 * np.abs(dx) - 1)
            else:
                r = dy**2 + dx**2
                m = (r <= 1) & (r >= 0.35)
            if m.sum() < 4:
                continue
            tex = self._paint(c, yy, xx, rng, amp=35.0)
            img[m] = tex[m]
            label[m] = c
        img *= rng.uniform(0.8, 1.2)  # global illumination
        img += rng.normal(0, 6.0, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8), label, f"synthetic {self.split}[{i}]"

    def _paint(self, c: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator, amp: float) -> np.ndarray:
        base = self._color[c] + rng.uniform(-18, 18, 3)
        t = self._texture(c, yy, xx, rng)
        return base[None, None, :] + amp * t[..., None].astype(np.float64)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


# --------------------------------------------------------------------------- folder datasets
class _FolderDataset(SegDataset):
    def __init__(self, root: str, img_glob: str, img_suffix: str, ann_dir: str, ann_suffix: str, what: str):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise DatasetError(f"fastctx.train: {what} folder {self.root} does not exist")
        imgs = sorted(glob.glob(os.path.join(self.root, img_glob)))
        if not imgs:
            raise DatasetError(f"fastctx.train: no images match {os.path.join(self.root, img_glob)} ({what} layout)")
        pairs, missing = [], []
        for p in imgs:
            rel = os.path.relpath(p, self.img_base)
            ann = os.path.join(ann_dir, rel[: -len(img_suffix)] + ann_suffix)
            (pairs if os.path.isfile(ann) else missing).append((p, ann))
        if missing:
            p, ann = missing[0]
            raise DatasetError(
                f"fastctx.train: {len(missing)} image(s) of {what} have no label, e.g. {p}: expected {ann}"
            )
        self.pairs = pairs

    img_base: str

    def __len__(self) -> int:
        return len(self.pairs)

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        img_path, ann_path = self.pairs[i]
        return read_image(img_path), self._label(read_image(ann_path, gray=True)), ann_path

    def _label(self, label: np.ndarray) -> np.ndarray:
        return label


CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")


class Cityscapes(_FolderDataset):
    """``root/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
    ``root/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (19 classes, 255 ignore)."""

    def __init__(self, root: str, split: str = "train"):
        self.num_classes, self.class_names = 19, CITYSCAPES_CLASSES
        self.img_base = os.path.join(root, "leftImg8bit", split)
        super().__init__(root, os.path.join("leftImg8bit", split, "*", "*_leftImg8bit.png"), "_leftImg8bit.png",
                         os.path.join(root, "gtFine", split), "_gtFine_labelTrainIds.png", f"Cityscapes {split}")


class ADE20K(_FolderDataset):
    """``root/ADEChallengeData2016/images/<training|validation>/*.jpg`` with
    ``.../annotations/<...>/*.png``; ``reduce_zero_label`` as mmseg (0 -> 255, k -> k-1; 150 classes).
    ``root`` may also be the ``ADEChallengeData2016`` folder itself."""

    def __init__(self, root: str, split: str = "training"):
        if split in ("train", "val"):
            split = {"train": "training", "val": "validation"}[split]
        base = os.path.join(root, "ADEChallengeData2016")
        if not os.path.isdir(base) and os.path.basename(os.path.normpath(root)) == "ADEChallengeData2016":
            base = root
        self.num_classes, self.class_names = 150, tuple(f"class{i}" for i in range(150))
        self.img_base = os.path.join(base, "images", split)
        super().__init__(base, os.path.join("images", split, "*.jpg"), ".jpg",
                         os.path.join(base, "annotations", split), ".png", f"ADE20K {split}")

    def _label(self, label: np.ndarray) -> np.ndarray:
        out = label.astype(np.int16) - 1
        out[label == 0] = IGNORE_INDEX
        out[out == IGNORE_INDEX - 1] = IGNORE_INDEX
        return out.astype(np.uint8)


def build_dataset(name: str, split: str, root: str | None = None, **kw) -> SegDataset:
    """``name`` in ``synthetic``, ``cityscapes``, ``ade20k``; ``split`` ``train`` or ``val``."""
    if name == "synthetic":
        return SyntheticScenes(split=split, **kw)
    if root is None:
        raise DatasetError(f"fastctx.train: dataset {name!r} needs a data root folder (--data-root)")
    if name == "cityscapes":
        return Cityscapes(root, split)
    if name == "ade20k":
        return ADE20K(root, split)
    raise ValueError(f"fastctx.train: unknown dataset {name!r} (synthetic, cityscapes, ade20k)")


# --------------------------------------------------------------------------- transforms
def _to_tensor(img: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (t - mean) / std


def _bilinear_taps(n_in: int, n_out: int):
    # torch/OpenCV bilinear with align_corners=False: src = (dst + 0.5) * in / out - 0.5, clamped at 0.
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _resize(img: np.ndarray, label: np.ndarray | None, hw: tuple[int, int]):
    """Bilinear image and nearest label resize in numpy (single-threaded: per-sample torch ops on
    small arrays are slower, and contend with the training step for the cores)."""
    (h, w), (oh, ow) = img.shape[:2], hw
    y0, y1, ly = _bilinear_taps(h, oh)
    x0, x1, lx = _bilinear_taps(w, ow)
    f = img.astype(np.float32)
    rows = f[y0] * (1 - ly)[:, None, None] + f[y1] * ly[:, None, None]
    out = rows[:, x0] * (1 - lx)[None, :, None] + rows[:, x1] * lx[None, :, None]
    img = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if label is not None:
        ny = np.minimum((np.arange(oh) * (h / oh)).astype(np.int64), h - 1)
        nx = np.minimum((np.arange(ow) * (w / ow)).astype(np.int64), w - 1)
        label = label[ny[:, None], nx[None, :]]
    return img, label


def _rescale_size(h: int, w: int, scale: tuple[int, int], ratio: float) -> tuple[int, int]:
    # mmcv rescale with keep_ratio: fit (long, short) edges of scale*ratio.
    long_e, short_e = max(scale) * ratio, min(scale) * ratio
    f = min(long_e / max(h, w), short_e / min(h, w))
    return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))


class Augment:
    """mmseg's training pipeline: RandomResize (keep ratio, ``ratio_range``), RandomCrop with
    ``cat_max_ratio``, RandomFlip, PhotoMetricDistortion, Normalize, Pad (image 0, label 255).

    Args:
        crop (tuple[int, int]): ``(H, W)`` of the output.
        scale (tuple[int, int] | None): the base ``(long, short)`` size before the random ratio;
            ``None`` keeps each image's own size. Default: ``None``.
        ratio_range (tuple[float, float]): Default: ``(0.5, 2.0)``.
        cat_max_ratio (float | None): Default: 0.75.
        flip (float): probability of a horizontal flip. Default: 0.5.
        photometric (bool): Default: ``True``.
    """

    def __init__(self, crop: tuple[int, int], scale: tuple[int, int] | None = None,
                 ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float | None = 0.75,
                 flip: float = 0.5, photometric: bool = True):
        self.crop, self.scale, self.ratio_range = tuple(crop), scale, ratio_range
        self.cat_max_ratio, self.flip, self.photometric = cat_max_ratio, flip, photometric

    def __call__(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        h, w = label.shape
        ratio = rng.uniform(*self.ratio_range)
        img, label = _resize(img, label, _rescale_size(h, w, self.scale or (max(h, w), min(h, w)), ratio))
        img, label = self._random_crop(img, label, rng)
        if rng.random() < self.flip:
            img, label = img[:, ::-1], label[:, ::-1]
        img = _photometric(img, rng) if self.photometric else img.astype(np.float32)
        ch, cw = self.crop
        h, w = label.shape
        out_img = np.zeros((ch, cw, 3), np.float32)
        out_lab = np.full((ch, cw), IGNORE_INDEX, np.uint8)
        # Pad after normalization with 0 (mmseg pads the normalized image with 0).
        out_img[:h, :w] = (img - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
        out_lab[:h, :w] = label
        return torch.from_numpy(out_img).permute(2, 0, 1).contiguous(), torch.from_numpy(out_lab).long()

    def _random_crop(self, img, label, rng):
        ch, cw = self.crop

        def bbox():
            y = int(rng.integers(0, max(label.shape[0] - ch, 0) + 1))
            x = int(rng.integers(0, max(label.shape[1] - cw, 0) + 1))
            return y, x

        y, x = bbox()
        if self.cat_max_ratio is not None and self.cat_max_ratio < 1.0:
            for _ in range(10):
                seg = label[y : y + ch, x : x + cw]
                _, cnt = np.unique(seg[seg != IGNORE_INDEX], return_counts=True)
                if len(cnt) > 1 and cnt.max() / cnt.sum() < self.cat_max_ratio:
                    break
                y, x = bbox()
        return img[y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg PhotoMetricDistortion: brightness (+-32), contrast (0.5-1.5) first or last,
    saturation (0.5-1.5), hue (+-18 degrees), each with probability 1/2."""
    img = img.astype(np.float32)

    def contrast(x):
        return np.clip(x * rng.uniform(0.5, 1.5), 0, 255) if rng.integers(2) else x

    if rng.integers(2):
        img = np.clip(img + rng.uniform(-32, 32), 0, 255)
    mode = rng.integers(2)
    if mode == 1:
        img = contrast(img)
    do_sat, do_hue = rng.integers(2), rng.integers(2)
    if do_sat or do_hue:
        hsv = _rgb_to_hsv(img / 255.0)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 1)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + rng.integers(-18, 19) / 360.0) % 1.0
        img = _hsv_to_rgb_arr(hsv) * 255.0
    if mode == 0:
        img = contrast(img)
    return img.astype(np.float32)


def _rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(-1), x.min(-1)
    d = mx - mn
    safe = np.where(d > 0, d, 1)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    h = np.where(d > 0, h, 0)
    s = np.where(mx > 0, d / np.where(mx > 0, mx, 1), 0)
    return np.stack([h, s, mx], -1)


def _hsv_to_rgb_arr(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
    k = (np.array([5.0, 3.0, 1.0], np.float32) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


class EvalTransform:
    """Resize the image to ``scale`` (keep ratio; ``None``: as is) and normalize; the label stays
    at its original size (predictions are resized back to it, as mmseg)."""

    def __init__(self, scale: tuple[int, int] | None = None):
        self.scale = scale

    def __call__(self, img: np.ndarray, label: np.ndarray, rng=None):
        if self.scale is not None:
            img, _ = _resize(img, None, _rescale_size(*label.shape, self.scale, 1.0))
        return _to_tensor(img), torch.from_numpy(label.astype(np.int64))


# --------------------------------------------------------------------------- sampling
class StreamSampler:
    """The training stream: global position ``p`` -> dataset index ``perm(p // N)[p % N]`` with a
    fresh permutation per epoch from ``(seed, epoch)``. Stateless: its state is ``(seed, N)``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, np.ndarray] = {}

    def index(self, p: int) -> int:
        epoch = p // self.n
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed, 0, epoch]).permutation(self.n)}
        return int(self._cache[epoch][p % self.n])

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed}


class TrainStream(torch.utils.data.Dataset):
    """Map-style view of the stream for a DataLoader: item ``p`` is the augmented sample at
    global position ``p``."""

    def __init__(self, dataset: SegDataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self.sampler = StreamSampler(len(dataset), seed)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, p: int):
        img, label = self.dataset.load(self.sampler.index(p))
        return self.transform(img, label, np.random.default_rng([self.seed, 1, p]))


def positions(iteration: int, batch: int, accum: int, world: int, rank: int) -> list[list[int]]:
    """Global positions of the micro-batches rank ``rank`` processes at ``iteration``: the global
    batch ``batch * accum * world`` is split into ``accum`` steps, each split across ranks."""
    base = iteration * batch * accum * world
    return [
        [base + (a * world + rank) * batch + j for j in range(batch)]
        for a in range(accum)
    ]
