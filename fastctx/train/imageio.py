"""Reading and writing dataset images without a hard dependency.

PNG (8-bit gray, gray+alpha, RGB, RGBA, palette; not interlaced) is decoded here with ``zlib`` and
numpy, so label maps and the test fixtures need nothing installed. When Pillow is importable it is
used instead (faster on real data: the Average and Paeth row filters are a Python loop here).
JPEG (ADE20K images) needs Pillow; without it the error says so and names the file.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


class ImageReadError(ValueError):
    """An image or label file that cannot be read; the message names the file."""


def _pil():
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def _unfilter(raw: bytes, h: int, w: int, bpp: int) -> np.ndarray:
    stride = w * bpp
    data = np.frombuffer(raw, dtype=np.uint8)
    if data.size != h * (stride + 1):
        raise ValueError(f"decompressed size {data.size} != {h} rows x {stride + 1} bytes")
    rows = data.reshape(h, stride + 1)
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        ftype, line = rows[y, 0], rows[y, 1:]
        if ftype == 0:
            cur = line.copy()
        elif ftype == 1:  # Sub: running sum along the row, per channel (uint8 wraps)
            cur = np.cumsum(line.reshape(w, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif ftype == 2:  # Up
            cur = line + prev
        elif ftype in (3, 4):  # Average, Paeth: serial along the row
            cur = line.astype(np.int32)
            up = prev.astype(np.int32)
            for x in range(stride):
                a = int(cur[x - bpp]) if x >= bpp else 0
                b = int(up[x])
                if ftype == 3:
                    cur[x] = (cur[x] + ((a + b) >> 1)) & 255
                else:
                    c = int(up[x - bpp]) if x >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                    cur[x] = (cur[x] + pred) & 255
            cur = cur.astype(np.uint8)
        else:
            raise ValueError(f"unknown PNG filter type {ftype} in row {y}")
        out[y] = cur
        prev = cur
    return out


def _decode_png(blob: bytes) -> np.ndarray:
    pos, idat, palette, header = 8, [], None, None
    while pos + 8 <= len(blob):
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        kind = blob[pos + 4 : pos + 8]
        body = blob[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise ValueError("truncated PNG (no IHDR or IDAT chunk)")
    w, h, depth, ctype, _, _, interlace = header
    if depth != 8 or interlace != 0 or ctype not in _CHANNELS:
        raise ValueError(
            f"unsupported PNG (bit depth {depth}, color type {ctype}, interlace {interlace}); "
            "install Pillow to read it"
        )
    bpp = _CHANNELS[ctype]
    pix = _unfilter(zlib.decompress(b"".join(idat)), h, w, bpp).reshape(h, w, bpp)
    if ctype == 3:
        if palette is None:
            raise ValueError("palette PNG without a PLTE chunk")
        return pix[..., 0].copy()  # palette labels: the index is the class id (as PIL's "P" mode)
    if ctype in (0, 4):
        return pix[..., 0].copy()
    return pix[..., :3].copy()


def read_image(path: str | os.PathLike, *, gray: bool = False) -> np.ndarray:
    """Read ``path`` as uint8 ``[H, W, 3]`` (RGB) or, with ``gray=True``, ``[H, W]`` (label ids:
    palette indices are kept as they are, as mmseg reads label PNGs)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ImageReadError(f"fastctx.train: cannot read {path}: {e.strerror}") from e
    Image = _pil()
    try:
        if Image is not None:
            import io

            with Image.open(io.BytesIO(blob)) as im:
                if gray:
                    arr = np.asarray(im if im.mode in ("L", "P") else im.convert("L"))
                else:
                    arr = np.asarray(im.convert("RGB"))
        elif blob.startswith(_PNG_MAGIC):
            arr = _decode_png(blob)
        elif blob.startswith(_JPEG_MAGIC):
            raise ValueError("JPEG images need Pillow (pip install pillow)")
        else:
            raise ValueError("not a PNG or JPEG file")
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes an error naming the file
        raise ImageReadError(f"fastctx.train: cannot decode {path}: {e}") from e
    if gray and arr.ndim == 3:
        raise ImageReadError(f"fastctx.train: label {path} has {arr.shape[2]} channels, expected a single-channel PNG")
    if not gray and arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def write_png(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write uint8 ``[H, W]`` (gray) or ``[H, W, 3]`` (RGB) as PNG (filter 0, zlib level 6)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if arr.ndim == 2:
        ctype, rows = 0, arr
    elif arr.ndim == 3 and arr.shape[2] == 3:
        ctype, rows = 2, arr.reshape(arr.shape[0], -1)
    else:
        raise ValueError(f"fastctx.train.write_png: expected [H, W] or [H, W, 3] uint8, got {tuple(arr.shape)}")
    h, w = arr.shape[:2]
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    blob = _PNG_MAGIC + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, ctype, 0, 0, 0))
    blob += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(blob)
