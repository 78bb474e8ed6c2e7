"""Deterministic prompt-adherence scorer for the synthetic shapes data (``ldmkit.data.synth``).

Classical image analysis, no learned weights, so the number means the same in every run:
1. background = median colour of the border pixels (generated images need not be exactly black);
2. foreground = the largest 8-connected blob of pixels far from the background;
3. colour = palette entry whose direction from the background best matches the blob's core colour
   (cosine, so a dim or washed-out red is still red);
4. coverage map ``a`` = every pixel's projection onto that core colour, in a window around the blob;
5. shape, radius and blur are fitted together: each shape's template (rendered like the data, centred
   on the blob's centroid) over a grid of radii, Gaussian-blurred over a grid of widths, is scaled by
   least squares to ``a``; the smallest residual wins. Fitting the blur makes the decision hold for
   soft, decoder-blurred samples where corner or fill-ratio heuristics mistake squares for circles;
6. size from the fitted radius, position = nearest grid centre to the fitted bounding-box centre.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from ldmkit.data.synth import ATTRIBUTES, BACKGROUND, PALETTE, POSITIONS, RADII, coverage, parse_caption
from ldmkit.errors import UserError

KEYS = tuple(ATTRIBUTES)  # color, shape, size, position
MIN_CONTRAST = 0.15  # a blob must differ from the background by this much (RGB distance, 0..1 scale)
# Template grids, as fractions of the image side: radii span both sizes with margin; blur up to ~2 px at 32 px.
FIT_RADII = np.arange(0.06, 0.2601, 0.01)
FIT_BLURS = (0.0, 0.02, 0.035, 0.05, 0.065)
SIZE_SPLIT = float(np.sqrt(RADII["small"] * RADII["large"]))  # geometric mean of the nominal radii
TEMPLATE_SUPERSAMPLE = 4


def _array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from a PIL image or a uint8 / float [0, 1] array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise UserError(f"expected an (H, W, 3) image array, got shape {arr.shape}")
    return arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix of a 1-D Gaussian blur with zero padding (kernel cut at 4 sigma, sums to 1)."""
    if sigma == 0:
        return np.eye(n)
    radius = int(4 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]  # (n, n) output row - input column
    return np.where(np.abs(offsets) <= radius, k[np.clip(offsets + radius, 0, 2 * radius)], 0.0)


def _fit(a: np.ndarray, cx: float, cy: float, side: float) -> tuple[str, float, float, float]:
    """Best (shape, radius px, residual, blur px) of blurred templates scaled to the coverage map ``a``.

    ``cx, cy`` is the centroid of ``a`` in its own pixel coordinates; blur keeps centroids, and an
    upright triangle's centroid lies r/3 below its bounding-box centre. For each template t the
    least-squares amplitude is <t, a> / <t, t>, leaving the residual |a|^2 - <t, a>^2 / <t, t>.
    """
    h, w = a.shape
    radii = FIT_RADII * side  # (R,)
    shapes = ATTRIBUTES["shape"]
    templates = np.concatenate(
        [  # (S * R, h, w)
            coverage(s, cx, cy - radii / 3 if s == "triangle" else cy, radii, h, w, TEMPLATE_SUPERSAMPLE)
            for s in shapes
        ]
    )
    best = ("circle", 0.0, np.inf, 0.0)
    for bf in FIT_BLURS:
        tb = _blur_matrix(h, bf * side) @ templates @ _blur_matrix(w, bf * side).T  # (S * R, h, w)
        ta = np.einsum("nij,ij->n", tb, a)
        tt = np.einsum("nij,nij->n", tb, tb)
        resid = float((a * a).sum()) - np.clip(ta, 0.0, None) ** 2 / np.maximum(tt, 1e-12)  # (S * R,)
        i = int(np.argmin(resid))
        if resid[i] < best[2]:
            best = (shapes[i // len(radii)], float(radii[i % len(radii)]), float(resid[i]), bf * side)
    return best


def detect(image: Image.Image | np.ndarray) -> dict[str, Any] | None:
    """The attributes of the most prominent shape (plus measurements), or None when there is no shape."""
    x = _array(image)  # (H, W, 3)
    h_px, w_px = x.shape[:2]
    side = float(min(h_px, w_px))
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

    # Window: the blob's bounding box grown by the largest blur and radius error the fit allows for.
    ys, xs = np.nonzero(blob)
    m = int(np.ceil(0.12 * side)) + 1
    y0, y1 = max(ys.min() - m, 0), min(ys.max() + m + 1, h_px)
    x0, x1 = max(xs.min() - m, 0), min(xs.max() + m + 1, w_px)
    a = d[y0:y1, x0:x1] @ ref / (ref @ ref)  # (h, w) coverage estimate, unclipped
    pos = np.clip(a, 0.0, None)
    gy, gx = np.mgrid[0 : y1 - y0, 0 : x1 - x0] + 0.5
    cx, cy = float((pos * gx).sum() / pos.sum()), float((pos * gy).sum() / pos.sum())
    shape, r, resid, blur = _fit(a, cx, cy, side)
    if shape == "triangle":
        cy -= r / 3
    fx, fy = (cx + x0) / w_px, (cy + y0) / h_px
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - fx) ** 2 + (POSITIONS[p][1] - fy) ** 2)
    return {
        "color": color,
        "shape": shape,
        "size": "large" if r / side > SIZE_SPLIT else "small",
        "position": position,
        "radius": r / side,
        "blur": blur / side,
        "x": fx,
        "y": fy,
        "residual": resid / max(float((a * a).sum()), 1e-12),
    }


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
