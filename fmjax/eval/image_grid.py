"""Sample grids: N images in [-1, 1] tiled row by row into one uint8 picture, saved as PNG.

Shapes: N images, H x W x C each (C = 1 grey or 3 RGB), R rows, P images per row.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def grid(images_NxHxWxC: np.ndarray, per_row: int, border: int = 1) -> np.ndarray:
    """uint8 (R*(H+border)+border) x (P*(W+border)+border) x C tiles, black borders, missing tiles black."""
    n, h, w, c = images_NxHxWxC.shape
    rows = -(-n // per_row)
    pixels = np.clip(np.round((np.asarray(images_NxHxWxC, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    out = np.zeros((rows * (h + border) + border, per_row * (w + border) + border, c), np.uint8)
    for k in range(n):
        r, col = divmod(k, per_row)
        top, left = border + r * (h + border), border + col * (w + border)
        out[top:top + h, left:left + w] = pixels[k]
    return out


def save_png(picture_HxWxC: np.ndarray, path: str, scale: int = 4) -> None:
    """Writes the picture enlarged `scale` times (nearest neighbour: tiny digits stay readable)."""
    picture = picture_HxWxC.repeat(scale, axis=0).repeat(scale, axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
