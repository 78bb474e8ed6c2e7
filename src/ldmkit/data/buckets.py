"""Aspect-ratio buckets (``data.buckets``): sizes of about ``resolution``^2 pixels, one per aspect ratio.

The idea is NovelAI's aspect-ratio bucketing (NovelAI, "Improvements to Stable Diffusion", 2022), as
kohya sd-scripts (``library/model_util.py`` ``make_bucket_resolutions``) and SimpleTuner use it:
every batch is drawn from one bucket, so images keep their shape instead of being centre-cropped to
squares.

Buckets. For every width w = step, 2 step, ... the bucket is (w, h) with h the largest multiple of
``step`` such that w * h <= resolution^2, kept while the aspect ratio is at most ``max_aspect``, and
mirrored (h, w). ``step`` is 8 x the VAE's downsampling factor (64 for SD/SDXL: 8 latent pixels, which
keeps every UNet level of an SD UNet an integer size), ``data.bucket_step`` overrides it.

Assignment. An image goes to the bucket that needs the smallest crop: it is resized to cover the bucket
(scale = max(bucket_w / w, bucket_h / h)) and the bucket is chosen that leaves the fewest pixels to crop
on the longer-cropped side (ties: the larger bucket). This bounds the crop by one step for every aspect
ratio inside the bucket range; picking the bucket of the nearest aspect ratio (as sd-scripts does) can
crop almost two steps (512 px, step 64: up to 124 px).

The sample's size (width, height) is read from the image header (EXIF orientation applied, as
``transforms.decode_image`` does), so grouping by bucket decodes nothing.
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ldmkit.errors import UserError

if TYPE_CHECKING:
    from ldmkit.config import DataConfig

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height)
DEFAULT_STEP = 64
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees
_WARNED_SINGLE: set[tuple[int, int, float]] = set()  # settings already warned about (the loader and the
# methods' validation size both build the buckets; one warning is enough)


def bucket_step(cfg: DataConfig, encoders: Any = None) -> int:
    """``data.bucket_step``, else 8 x the VAE's downsampling factor of ``encoders`` (a model family:
    ``vae_config``), else 64."""
    if cfg.bucket_step is not None:
        return cfg.bucket_step
    vae_config = getattr(encoders, "vae_config", None)
    if isinstance(vae_config, dict) and vae_config.get("block_out_channels"):
        return 8 * 2 ** (len(vae_config["block_out_channels"]) - 1)
    return DEFAULT_STEP


def cover_size(size: Size, bucket: Size) -> Size:
    """(width, height) of ``size`` resized (aspect kept) to the smallest size covering ``bucket``."""
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)
    return max(bw, round(w * scale)), max(bh, round(h * scale))


def crop_excess(size: Size, bucket: Size) -> int:
    """Pixels cropped away (on the cropped side) when ``size`` is resized to cover ``bucket``."""
    cw, ch = cover_size(size, bucket)
    return max(cw - bucket[0], ch - bucket[1])


@dataclass(frozen=True)
class Buckets:
    """The bucket sizes of one resolution and step; ``assign`` maps an image size to its bucket."""

    resolution: int
    step: int
    max_aspect: float = 4.0

    def __post_init__(self):
        if self.resolution < self.step:
            raise UserError(
                f"data.buckets: data.resolution {self.resolution} is below one bucket step ({self.step} px = 8 x the "
                "VAE factor); raise data.resolution or set data.bucket_step"
            )

    @classmethod
    def from_config(cls, cfg: DataConfig, encoders: Any = None) -> Buckets | None:
        """None when ``data.buckets`` is off (square crops)."""
        if not cfg.buckets:
            return None
        buckets = cls(cfg.resolution, bucket_step(cfg, encoders), cfg.bucket_max_aspect)
        buckets.warn_if_single()
        return buckets

    def warn_if_single(self) -> None:
        """One warning (once per resolution and step in a process) when these settings give one bucket: every
        image is then cropped to that square, as without data.buckets, which the user asked not to happen."""
        sizes = self.sizes
        if len(sizes) > 1 or (self.resolution, self.step, self.max_aspect) in _WARNED_SINGLE:
            return
        _WARNED_SINGLE.add((self.resolution, self.step, self.max_aspect))
        # The next multiple of the step that gives several buckets (one of them square).
        (w, h), bigger = sizes[0], (self.resolution // self.step + 1) * self.step
        while len(Buckets(bigger, self.step, self.max_aspect).sizes) == 1 and bigger < 8 * self.step:
            bigger += self.step
        logger.warning(
            "data.buckets: data.resolution %d with a bucket step of %d px gives one bucket (%dx%d), so every image "
            "is cropped to that square as without buckets; for several aspect ratios raise data.resolution to at "
            "least %d or lower data.bucket_step",
            self.resolution,
            self.step,
            w,
            h,
            bigger,
        )

    @property
    def sizes(self) -> list[Size]:
        """Every bucket (width, height), ordered by aspect ratio (tall to wide)."""
        area, step, out = self.resolution**2, self.step, set()
        w = step
        while w * step <= area:
            h = (area // w) // step * step
            if max(w / h, h / w) <= self.max_aspect + 1e-9:
                out.update({(w, h), (h, w)})
            w += step
        return sorted(out, key=lambda b: (b[0] / b[1], b[0]))

    def assign(self, size: Size | None) -> Size:
        """The bucket of an image of ``size`` (width, height): the smallest crop, then the larger bucket.
        None (header unreadable) gets the bucket nearest to a square."""
        sizes = self.sizes
        if size is None or min(size) <= 0:
            return min(sizes, key=lambda b: (abs(math.log(b[0] / b[1])), -b[0] * b[1]))
        return min(sizes, key=lambda b: (crop_excess(size, b), -b[0] * b[1], b))


def header_size(source: bytes | str | Path) -> Size | None:
    """(width, height) of an image file as ``decode_image`` will give it (EXIF rotation applied),
    reading only the header; None when it is not an image PIL can open."""
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(fp) as im:
            w, h = im.size
            if im.getexif().get(0x0112) in _SWAPPED_ORIENTATIONS:
                w, h = h, w
            return w, h
    except Exception:  # noqa: BLE001 - any failure means: unknown size (the sample is then skipped as unreadable)
        return None


def most_common(buckets: list[Size]) -> Size | None:
    """The bucket that holds the most samples (ties: the first in order of appearance)."""
    return Counter(buckets).most_common(1)[0][0] if buckets else None
