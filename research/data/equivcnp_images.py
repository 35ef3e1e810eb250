"""Image-completion data for the EquivCNP zero-shot experiment: MNIST (IDX files), procedurally drawn seven-segment
"clock" digits, affine test shifts (rotation up to ±90°, scaling), and pixel-set tasks for the neural processes.

The EquivCNP paper trained on upright "digital clock" digits (a file from the authors' server, not available here)
and tested on digits rotated by U(-90°, 90°) and scaled to 0.3-0.45× the training size. We draw seven-segment digits
ourselves and add MNIST digits (the 10,000-image MNIST test set, split with a seed, is the only MNIST data offline).
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "read_idx",
    "load_mnist",
    "draw_clock_digits",
    "affine_images",
    "pixel_coordinates",
    "image_tasks",
]

# segment layout a..g on a unit box (x right, y down): (x0, y0, x1, y1) of each bar's centre line
_SEGMENTS = {
    "a": (0.2, 0.1, 0.8, 0.1),
    "b": (0.8, 0.1, 0.8, 0.5),
    "c": (0.8, 0.5, 0.8, 0.9),
    "d": (0.2, 0.9, 0.8, 0.9),
    "e": (0.2, 0.5, 0.2, 0.9),
    "f": (0.2, 0.1, 0.2, 0.5),
    "g": (0.2, 0.5, 0.8, 0.5),
}
_DIGIT_SEGMENTS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (optionally gzipped), as used by MNIST, into a uint8 tensor."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4]!r})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = math.prod(dims)
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but {len(data) - offset} bytes follow")
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).reshape(dims)


def load_mnist(data_dir: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST test set from `<data_dir>/mnist`: images `(10000, 28, 28)` in [0, 1] and labels `(10000,)`."""
    root = Path(data_dir) / "mnist"
    img, lab = root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"
    if not img.is_file() or not lab.is_file():
        raise FileNotFoundError(f"MNIST IDX files not found under {root}; pass the shared data directory (HF_KOOPMAN_DATA)")
    return read_idx(img).float() / 255.0, read_idx(lab).long()


def draw_clock_digits(
    digits: torch.Tensor, size: int = 28, generator: torch.Generator | None = None, jitter: float = 0.0, supersample: int = 4
) -> torch.Tensor:
    """Draw seven-segment digits as anti-aliased grey images `(N, size, size)` in [0, 1].

    Args:
        digits (`torch.LongTensor` of shape `(N,)`): values 0-9.
        size (`int`): image side; the glyph fills the central ~70 % like an MNIST digit.
        jitter (`float`): random variation of stroke width, slant and glyph width (0 = canonical glyphs).
    """
    if digits.dim() != 1 or bool(((digits < 0) | (digits > 9)).any()):
        raise ValueError("digits must be a 1-D tensor of values 0-9")
    n = digits.shape[0]
    s = size * supersample
    lin = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    out = torch.zeros(n, s, s)
    for i in range(n):
        r = torch.rand(3, generator=generator) * 2 - 1 if jitter > 0 else torch.zeros(3)
        width = 0.06 * (1 + 0.3 * jitter * float(r[0]))
        slant = 0.12 * jitter * float(r[1])
        gw = 0.5 * (1 + 0.2 * jitter * float(r[2]))  # glyph width as a fraction of the box height
        for seg in _DIGIT_SEGMENTS[int(digits[i])]:
            x0, y0, x1, y1 = _SEGMENTS[seg]
            # map the unit glyph into the central box (height 0.7, width gw*0.7·2), with a slant
            def place(x: float, y: float) -> tuple[float, float]:
                gy = 0.15 + 0.7 * y
                gx = 0.5 + (x - 0.5) * gw * 1.4 + slant * (0.5 - y)
                return gx, gy

            ax, ay = place(x0, y0)
            bx, by = place(x1, y1)
            vx, vy = bx - ax, by - ay
            t = (((xx - ax) * vx + (yy - ay) * vy) / (vx * vx + vy * vy)).clamp(0, 1)
            dist = torch.sqrt((xx - ax - t * vx) ** 2 + (yy - ay - t * vy) ** 2)
            out[i] = torch.maximum(out[i], (dist < width).float())
    return F.avg_pool2d(out[:, None], supersample)[:, 0]


def affine_images(images: torch.Tensor, angles: torch.Tensor, scales: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Rotate by `angles` (radians) and scale by `scales` about the image centre, bilinear, zero outside: `(N, S, S)`.

    `size` resizes the canvas (default: unchanged); the digit keeps its pixel size times `scales`.
    """
    n, h, w = images.shape
    size = size or h
    c, s = torch.cos(angles), torch.sin(angles)
    # output pixel p (normalised to the output canvas) samples the input at (R(θ) S)^{-1} p, rescaled to the input canvas
    ratio = size / h
    inv = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2) / scales[:, None, None] * ratio
    theta = torch.cat([inv, torch.zeros(n, 2, 1)], -1)
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    return F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def pixel_coordinates(size: int) -> torch.Tensor:
    """Pixel centres of a `size × size` image in [-1, 1]² (x right, y up), `(size², 2)`; the origin is not a pixel
    centre for even sizes (it is the singular point of the SO(2) / R×SO(2) lifts)."""
    lin = (torch.arange(size, dtype=torch.float32) - (size - 1) / 2) / (size / 2)
    yy, xx = torch.meshgrid(-lin, lin, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)


def image_tasks(
    images: torch.Tensor,
    context_fraction: float | tuple[float, float],
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Pixel-completion tasks: targets = all pixels; context = a Bernoulli(p) subset of pixels per image.

    Args:
        images (`torch.Tensor` of shape `(B, S, S)`): grey images.
        context_fraction (`float` or `(low, high)`): p, or a range to draw p from uniformly per image.

    Returns:
        `context_x (B, Nc, 2)`, `context_y (B, Nc, 1)`, `context_mask (B, Nc)`, `target_x (B, S², 2)`,
        `target_y (B, S², 1)`.
    """
    b, s, _ = images.shape
    coords = pixel_coordinates(s)
    values = images.reshape(b, -1, 1)
    if isinstance(context_fraction, tuple):
        lo, hi = context_fraction
        p = torch.rand(b, generator=generator) * (hi - lo) + lo
    else:
        p = torch.full((b,), float(context_fraction))
    keep = torch.rand(b, s * s, generator=generator) < p[:, None]
    keep[:, 0] |= ~keep.any(-1)  # at least one context pixel
    nc = int(keep.sum(-1).max())
    cx = torch.zeros(b, nc, 2)
    cy = torch.zeros(b, nc, 1)
    cm = torch.zeros(b, nc, dtype=torch.bool)
    for i in range(b):
        idx = keep[i].nonzero()[:, 0]
        cx[i, : len(idx)] = coords[idx]
        cy[i, : len(idx)] = values[i, idx]
        cm[i, : len(idx)] = True
    return {
        "context_x": cx,
        "context_y": cy,
        "context_mask": cm,
        "target_x": coords.expand(b, -1, -1).contiguous(),
        "target_y": values,
    }
