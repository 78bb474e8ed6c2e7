"""Deterministic prompt-adherence scorer for the synthetic shapes data (``ldmkit.data.synth``).

Classical image analysis, no learned weights, so the number means the same in every run:
1. background = median colour of the border pixels (generated images need not be exactly black);
2. foreground = the largest 8-connected blob of pixels far from the background;
3. colour = palette entry whose direction from the background best matches the blob's core colour
   (cosine, so a dim or washed-out red is still red);
4. per-pixel coverage ``alpha`` = projection onto that core colour (anti-aliased edges count partially);
5. width / height = the largest row / column sum of alpha; fill = area / (width * height):
   square ~1, circle ~pi/4, triangle ~1/2;
6. size from the larger extent (small shapes span ~0.2 of the side, large ~0.39);
7. position = nearest grid centre to the bounding-box centre (a triangle's centroid lies h/6 below it).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from ldmkit.data.synth import ATTRIBUTES, BACKGROUND, PALETTE, POSITIONS, parse_caption
from ldmkit.errors import UserError

KEYS = tuple(ATTRIBUTES)  # color, shape, size, position
MIN_CONTRAST = 0.15  # a blob must differ from the background by this much (RGB distance, 0..1 scale)
SKEW_TRIANGLE = -0.3  # vertical skewness below: triangle (apex up: -0.57; circle, square: 0)
FILL_SQUARE = 0.89  # otherwise fill above: square (1), else circle (pi/4)
SIZE_SPLIT = 0.28  # extent / side above: large (nominal extents 0.2 and 0.39, geometric mean 0.28)


def _array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from a PIL image or a uint8 / float [0, 1] array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise UserError(f"expected an (H, W, 3) image array, got shape {arr.shape}")
    return arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)


def detect(image: Image.Image | np.ndarray) -> dict[str, Any] | None:
    """The attributes of the most prominent shape (plus measurements), or None when there is no shape."""
    x = _array(image)  # (H, W, 3)
    h_px, w_px = x.shape[:2]
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])  # (2H + 2W, 3)
    bg = np.median(border, axis=0)
    d = x - bg  # (H, W, 3)
    dist = np.linalg.norm(d, axis=-1)  # (H, W)
    peak = np.percentile(dist, 99.5)
    if peak < MIN_CONTRAST:
        return None
    labels, count = ndimage.label(dist > max(0.5 * peak, MIN_CONTRAST / 2), structure=np.ones((3, 3)))
    sizes = ndimage.sum_labels(np.ones_like(dist), labels, index=np.arange(1, count + 1))
    blob = labels == 1 + int(np.argmax(sizes))  # (H, W) bool

    core = blob & (dist >= np.percentile(dist[blob], 75))
    ref = d[core].mean(axis=0)  # (3,) core colour relative to the background
    names = list(PALETTE)
    dirs = np.array([PALETTE[n] for n in names], float) / 255.0 - np.array(BACKGROUND, float) / 255.0
    cos = dirs @ ref / (np.linalg.norm(dirs, axis=1) * np.linalg.norm(ref) + 1e-12)
    color = names[int(np.argmax(cos))]

    region = ndimage.binary_dilation(blob, structure=np.ones((3, 3)))
    alpha = np.clip(d @ ref / (ref @ ref), 0.0, 1.0) * region  # (H, W) coverage
    area = alpha.sum()
    width, height = alpha.sum(axis=1).max(), alpha.sum(axis=0).max()  # largest row / column coverage
    fill = float(area / (width * height))
    ys, xs = np.mgrid[0:h_px, 0:w_px]
    cx = float((alpha * (xs + 0.5)).sum() / area / w_px)
    cy = float((alpha * (ys + 0.5)).sum() / area / h_px)
    dy = (ys + 0.5) / h_px - cy
    skew = float((alpha * dy**3).sum() / area / ((alpha * dy**2).sum() / area) ** 1.5)
    if skew < SKEW_TRIANGLE:
        shape = "triangle"
    else:
        shape = "square" if fill > FILL_SQUARE else "circle"
    extent = float(max(width / w_px, height / h_px))
    size = "large" if extent > SIZE_SPLIT else "small"
    if shape == "triangle":
        cy -= float(height / h_px) / 6.0  # centroid of an upright triangle -> its bounding-box centre
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return {"color": color, "shape": shape, "size": size, "position": position,
            "fill": fill, "skew": skew, "extent": extent, "x": cx, "y": cy}


def _target(prompt_or_attrs: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(prompt_or_attrs, str):
        attrs = parse_caption(prompt_or_attrs)
        if attrs is None:
            raise UserError(f"not a shapes caption (needs one colour, shape, size and position): {prompt_or_attrs!r}")
        return attrs
    return prompt_or_attrs


def score(image: Image.Image | np.ndarray, prompt_or_attrs: str | dict[str, Any]) -> dict[str, bool]:
    """Which attributes of the prompt the image shows: color, shape, size, position, and all of them."""
    target = _target(prompt_or_attrs)
    found = detect(image)
    result = {k: bool(found is not None and found[k] == target[k]) for k in KEYS}
    result["all"] = all(result[k] for k in KEYS)
    return result


def adherence(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str | dict[str, Any]]) -> dict[str, float]:
    """Mean accuracy per attribute and for all four at once over (image, prompt) pairs."""
    if len(images) != len(prompts) or not images:
        raise UserError(f"adherence needs as many images as prompts (got {len(images)} and {len(prompts)})")
    scores = [score(im, p) for im, p in zip(images, prompts)]
    return {k: float(np.mean([s[k] for s in scores])) for k in (*KEYS, "all")}
