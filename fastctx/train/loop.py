"""Training and evaluation loops of ``fastctx train`` / ``fastctx eval``.

The model contract: ``model(img [B, 3, H, W])`` returns a dict with ``"out"`` (logits
``[B, K, h, w]``) and, in train mode, auxiliary logits (``"aux"``, ...). Logits are resized to the
label size (bilinear, ``align_corners=False``) before the loss, as mmseg.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastctx.train import dist as fdist
from fastctx.train.data import IGNORE_INDEX, Augment, EvalTransform, SegDataset, TrainStream, positions
from fastctx.train.metrics import confusion_matrix, summarize

CKPT_FORMAT = "fastctx-train-1"
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from another model; the message names the file."""


@dataclass
class TrainConfig:
    """Settings of one run (mmseg's Cityscapes schedule where it has one)."""

    iters: int = 300
    batch_size: int = 8  # per process and micro-batch; global batch = batch_size * accum * world
    accum: int = 1
    crop: tuple[int, int] = (96, 96)
    scale: tuple[int, int] | None = None  # (long, short) base size of RandomResize; None: as is
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float | None = 0.75
    flip: float = 0.5
    photometric: bool = True
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    min_lr: float = 1e-4
    aux_weight: float = 0.4  # every auxiliary output ("aux", ...) unless aux_weights names it
    aux_weights: dict[str, float] = field(default_factory=dict)
    ohem: bool = False
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100000
    amp: str | None = None  # None, "fp16" or "bf16"
    channels_last: bool = False
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0
    workers: int = 0
    device: str | None = None
    out_dir: str = "fastctx-run"
    model_name: str = "custom"
    data: dict = field(default_factory=dict)  # a record of the dataset settings (fastctx eval reuses it)

    def check(self) -> None:
        if self.amp not in (None, "fp16", "bf16"):
            raise ValueError(f"fastctx train: amp must be None, 'fp16' or 'bf16', got {self.amp!r}")
        for k in ("iters", "batch_size", "accum", "ckpt_every", "log_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"fastctx train: {k} must be >= 1, got {getattr(self, k)}")


def resolve_device(name: str | None) -> torch.device:
    _, world, local = fdist.env_world()
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    return dev


def poly_lr(it: int, cfg: TrainConfig) -> float:
    """mmseg PolyLR: ``(lr - min_lr) * (1 - it / iters) ** power + min_lr``."""
    return (cfg.lr - cfg.min_lr) * (1 - it / cfg.iters) ** cfg.power + cfg.min_lr


def _resize_to(logits: torch.Tensor, hw) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(hw):
        return logits
    return F.interpolate(logits, size=tuple(hw), mode="bilinear", align_corners=False)


def ohem_weight(logits: torch.Tensor, label: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    """mmseg OHEMPixelSampler: keep pixels whose true-class probability is below
    ``max(thresh, the (min_kept * B)-th smallest probability)``; returns 0/1 weights [B, H, W]."""
    with torch.no_grad():
        valid = label != IGNORE_INDEX
        weight = torch.zeros_like(label, dtype=logits.dtype)
        prob = logits.softmax(1).gather(1, label.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
        sort_prob, _ = prob[valid].sort()
        kept = min_kept * label.shape[0]
        min_thr = sort_prob[min(kept, sort_prob.numel() - 1)] if sort_prob.numel() else 0.0
        threshold = max(float(min_thr), thresh)
        weight[valid] = (prob[valid] < threshold).to(weight.dtype)
    return weight


def seg_loss(outputs: dict, label: torch.Tensor, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Cross-entropy (ignore 255, mean over all pixels as mmseg's ``avg_non_ignore=False``) on
    ``"out"`` with weight 1 (OHEM-weighted if ``cfg.ohem``) plus every other output with its
    auxiliary weight. Returns ``{"loss": total, "loss_<key>": each}`` (float32)."""
    if "out" not in outputs:
        raise ValueError(f"fastctx train: the model must return a dict with 'out', got keys {sorted(outputs)}")
    losses = {}
    total = None
    for key, logits in outputs.items():
        logits = _resize_to(logits.float(), label.shape[-2:])
        ce = F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX, reduction="none")
        if key == "out" and cfg.ohem:
            ce = ce * ohem_weight(logits, label, cfg.ohem_thresh, cfg.ohem_min_kept)
        w = 1.0 if key == "out" else cfg.aux_weights.get(key, cfg.aux_weight)
        losses[f"loss_{key}"] = ce.mean()
        total = w * losses[f"loss_{key}"] if total is None else total + w * losses[f"loss_{key}"]
    losses["loss"] = total
    return losses


# --------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(path: str, model: nn.Module, optimizer, scaler, iteration: int, cfg: TrainConfig,
                    sampler_state: dict, extra: dict | None = None) -> None:
    """Written to ``path + '.tmp'`` then renamed: a run killed while saving keeps the previous file."""
    state = {
        "format": CKPT_FORMAT,
        "model_name": cfg.model_name,
        "iteration": iteration,
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
        "sampler": sampler_state,
        "config": json.loads(json.dumps(asdict(cfg))),
        **(extra or {}),
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"fastctx: checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure names the file
        raise CheckpointError(f"fastctx: cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"fastctx: {path} is not a fastctx training checkpoint (format {CKPT_FORMAT})")
    return ckpt


def load_model_state(path: str, ckpt: dict, model: nn.Module, model_name: str | None = None) -> None:
    """Load ``ckpt["model"]`` into ``model``; a checkpoint from another model is a
    :class:`CheckpointError` naming the file and the first differing keys/shapes."""
    if model_name is not None and ckpt.get("model_name") not in (None, "custom", model_name):
        raise CheckpointError(f"fastctx: checkpoint {path} is from model {ckpt['model_name']!r}, not {model_name!r}")
    mine = _unwrap(model).state_dict()
    theirs = ckpt["model"]
    missing = [k for k in mine if k not in theirs]
    unexpected = [k for k in theirs if k not in mine]
    shapes = [f"{k}: {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in mine.items()
              if k in theirs and tuple(theirs[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"fastctx: checkpoint {path} (model {ckpt.get('model_name')!r}) does not match this model: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, "
            f"{len(shapes)} shape mismatches {shapes[:3]}"
        )
    _unwrap(model).load_state_dict(theirs)


def _truncate_log(path: str, iteration: int) -> None:
    """Drop log records past ``iteration`` (written after the checkpoint a run resumes from)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["iter"] <= iteration]
    with open(path, "w") as f:
        f.writelines(keep)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- progress
class _Progress:
    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled, self.total, self.bar = enabled, total, None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)

    def update(self, it: int, rec: dict, force: bool) -> None:
        if not self.enabled:
            return
        post = f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['img_per_s']:.1f} img/s"
        if self.bar is not None:
            self.bar.set_postfix_str(post, refresh=False)
            self.bar.update(1)  # refreshes (at most every tqdm mininterval) with this postfix
        elif force:
            eta = (self.total - it) * rec["step_s"]
            print(f"[train] it {it}/{self.total} {post} eta {eta / 60:.1f} min", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- training
def train(model: nn.Module, train_set: SegDataset, cfg: TrainConfig, *, resume: str | None = None) -> dict:
    """Train ``model`` in place; returns ``{"iteration", "checkpoint", "log", "losses"}``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DistributedDataParallel with
    SyncBatchNorm (NCCL on CUDA, gloo with :class:`~fastctx.train.dist.CPUSyncBatchNorm` on CPU).
    ``resume`` continues from a checkpoint bit for bit; an interrupted run (Ctrl-C, a killed
    process) loses only the iterations since its last checkpoint (every ``cfg.ckpt_every``).
    """
    cfg.check()
    device = resolve_device(cfg.device)
    rank, world = fdist.init(device)
    main = rank == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "latest.pth")
    log_path = os.path.join(cfg.out_dir, "log.jsonl")

    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if world > 1:
        model = fdist.convert_sync_batchnorm(model, device).to(device)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        net = model
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start = 0
    aug = Augment(cfg.crop, cfg.scale, cfg.ratio_range, cfg.cat_max_ratio, cfg.flip, cfg.photometric)
    stream = TrainStream(train_set, aug, cfg.seed)
    if resume:
        ckpt = read_checkpoint(resume)
        load_model_state(resume, ckpt, net, cfg.model_name)
        if ckpt.get("sampler") != stream.sampler.state_dict():
            raise CheckpointError(
                f"fastctx: checkpoint {resume} was trained on a stream {ckpt.get('sampler')} (dataset size, seed); "
                f"this run has {stream.sampler.state_dict()}: it cannot continue the same run"
            )
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        start = int(ckpt["iteration"])
        if main:
            _truncate_log(log_path, start)
            print(f"fastctx train: resumed from {resume} at iteration {start}", file=sys.stderr)
    else:
        if main:
            open(log_path, "w").close()

    end = cfg.iters
    batches = [p for it in range(start, end) for p in positions(it, cfg.batch_size, cfg.accum, world, rank)]
    loader = torch.utils.data.DataLoader(
        stream, batch_sampler=batches, num_workers=cfg.workers, generator=torch.Generator(),
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    amp_ctx = (lambda: torch.autocast(device.type, dtype=AMP_DTYPES[cfg.amp])) if cfg.amp else contextlib.nullcontext
    progress = _Progress(cfg.iters, start, main)
    losses_seen = []
    data = iter(loader)
    t_last = time.perf_counter()
    it = start
    try:
        with open(log_path, "a") if main else contextlib.nullcontext() as log:
            for it in range(start, end):
                lr = poly_lr(it, cfg)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                parts: dict[str, float] = {}
                for a in range(cfg.accum):
                    img, label = next(data)
                    img = img.to(device, non_blocking=True)
                    label = label.to(device, non_blocking=True)
                    if cfg.channels_last:
                        img = img.contiguous(memory_format=torch.channels_last)
                    sync = net.no_sync() if world > 1 and a < cfg.accum - 1 else contextlib.nullcontext()
                    with sync:
                        with amp_ctx():
                            outputs = net(img)
                        losses = seg_loss(outputs, label, cfg)
                        scaler.scale(losses["loss"] / cfg.accum).backward()
                    for k, v in losses.items():
                        parts[k] = parts.get(k, 0.0) + v.detach() / cfg.accum
                scaler.step(optimizer)
                scaler.update()
                keys = sorted(parts)
                vals = fdist.all_reduce_(torch.stack([parts[k].float() for k in keys]).cpu()) / world
                now = time.perf_counter()
                step = now - t_last
                t_last = now
                rec = {"iter": it + 1, "lr": lr, **{k: float(v) for k, v in zip(keys, vals)},
                       "step_s": step, "img_per_s": cfg.batch_size * cfg.accum * world / step}
                losses_seen.append(rec["loss"])
                if not math.isfinite(rec["loss"]) and cfg.amp != "fp16":
                    raise FloatingPointError(f"fastctx train: loss is {rec['loss']} at iteration {it + 1}")
                done = it + 1
                if main:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    if done % cfg.ckpt_every == 0 or done == cfg.iters:
                        save_checkpoint(ckpt_path, net, optimizer, scaler, done, cfg, stream.sampler.state_dict())
                progress.update(done, rec, force=done % cfg.log_every == 0 or done == end)
        it = end
    except KeyboardInterrupt:
        if main:
            print(f"\nfastctx train: interrupted during iteration {it + 1}; continue with --resume {ckpt_path} "
                  f"(the last {(it) % cfg.ckpt_every} iteration(s) since the last checkpoint are repeated)",
                  file=sys.stderr)
        raise
    finally:
        progress.close()
    return {"iteration": end, "checkpoint": ckpt_path, "log": log_path, "losses": losses_seen, "model": net}


# --------------------------------------------------------------------------- inference
def whole_inference(model: nn.Module, img: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, K, H, W]`` at the input size from one forward pass."""
    return _resize_to(model(img)["out"].float(), img.shape[-2:])


def slide_inference(model: nn.Module, img: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """mmseg's slide mode: windows of ``crop`` every ``stride`` (the last one flush with the
    border), each window's logits resized to the window, overlaps averaged."""
    (hc, wc), (hs, ws) = crop, stride
    b, _, h, w = img.shape
    hg = max(h - hc + hs - 1, 0) // hs + 1
    wg = max(w - wc + ws - 1, 0) // ws + 1
    preds = None
    count = torch.zeros(1, 1, h, w, device=img.device)
    for i in range(hg):
        for j in range(wg):
            y1, x1 = i * hs, j * ws
            y2, x2 = min(y1 + hc, h), min(x1 + wc, w)
            y1, x1 = max(y2 - hc, 0), max(x2 - wc, 0)
            logit = whole_inference(model, img[:, :, y1:y2, x1:x2])
            if preds is None:
                preds = torch.zeros(b, logit.shape[1], h, w, device=img.device)
            preds[:, :, y1:y2, x1:x2] += logit
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


@torch.no_grad()
def evaluate(model: nn.Module, dataset: SegDataset, *, mode: str = "whole", crop: tuple[int, int] | None = None,
             stride: tuple[int, int] | None = None, scale: tuple[int, int] | None = None,
             device: str | torch.device | None = None, amp: str | None = None, channels_last: bool = False,
             progress: bool = True) -> dict:
    """Per-class IoU/Acc, mIoU, mAcc, aAcc (fractions) over ``dataset``; under torchrun each
    process takes every ``world``-th image and the confusion matrices are summed."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"fastctx eval: mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError("fastctx eval: slide mode needs crop and stride")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    rank, world = fdist.init(dev)
    was_training = model.training
    model.eval().to(dev)
    tf = EvalTransform(scale)
    k = dataset.num_classes
    hist = torch.zeros(k, k, dtype=torch.int64)
    t0 = time.perf_counter()
    n = len(dataset)
    for idx in range(rank, n, world):
        img, label = tf(*dataset.load(idx))
        img = img[None].to(dev)
        if channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext():
            logits = whole_inference(model, img) if mode == "whole" else slide_inference(model, img, crop, stride)
        pred = _resize_to(logits.float(), label.shape).argmax(1)[0].cpu()
        hist += confusion_matrix(pred, label, k)
        if progress and rank == 0 and (idx // world + 1) % 20 == 0:
            print(f"[eval] {idx + 1}/{n} images", file=sys.stderr, flush=True)
    fdist.all_reduce_(hist)
    model.train(was_training)
    res = summarize(hist, dataset.class_names)
    res["images"] = n
    res["eval_s"] = time.perf_counter() - t0
    return res
