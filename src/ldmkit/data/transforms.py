"""From a decoded (image, captions) pair to one sample of the batch contract (docs/DESIGN.md).

Every random choice a sample needs (crop position, flip, which caption, caption dropout) is one uniform
number of ``Draws.from_seed(seed)``, drawn in a fixed order from ``random.Random(seed)``. Because each
decision reads its own number, turning one option on or off never shifts the others, and an encoded
cache (data/cache.py) reproduces the same flip and caption choices as the image path.

Geometry follows the torchvision transforms of the reference scripts (diffusers
``examples/text_to_image/train_text_to_image_sdxl.py``): ``Resize(resolution)`` of the shorter side
(longer side ``int(resolution * long / short)``), ``CenterCrop`` (offset ``round((size - res) / 2)``) or
``RandomCrop``, then ``RandomHorizontalFlip``; pixels ``x / 127.5 - 1`` (ToTensor + Normalize(0.5, 0.5)).

SDXL micro-conditioning: ``original_size`` is (height, width) before the resize, ``crop_top_left`` is
(top, left) of the crop in the resized image. After a flip we report the crop in the coordinates of the
flipped resized image, ``left = width - left - resolution``: the flipped sample is exactly that crop of
the mirrored image, so the conditioning still says where the training window sits. (The reference
script computes ``x1 = image.width - x1`` on the already cropped image, which gives ``resolution - x1``,
a value that describes no crop.)

Aspect-ratio buckets (``data.buckets``, data/buckets.py): the image is resized to the smallest size
covering its bucket instead of the square, then cropped (centre or random) to the bucket, and flipped
as above; ``target_size`` is the bucket's (height, width).
"""

from __future__ import annotations

import io
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ldmkit.data.buckets import cover_size
from ldmkit.rng import sample_seed

if TYPE_CHECKING:
    from ldmkit.config import DataConfig

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")

# What a broken image file raises in PIL (UnidentifiedImageError and "image file is truncated" are
# OSErrors; bad base64 is a ValueError) - caught by the readers, which skip and count the sample.
DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, zlib.error, Image.DecompressionBombError)


@dataclass(frozen=True)
class RawSample:
    """A decoded source sample: the image, ALL its captions, and its id."""

    image: Image.Image
    captions: list[str]
    key: str
    replaced_captions: bool = False
    """The caption bytes were not valid UTF-8 and were decoded with replacement characters."""


@dataclass(frozen=True)
class Draws:
    """The uniform numbers behind one sample's random choices, in a fixed order."""

    flip: float
    crop_top: float
    crop_left: float
    caption: float
    drop: float

    @classmethod
    def from_seed(cls, seed: int) -> Draws:
        r = random.Random(seed)
        return cls(r.random(), r.random(), r.random(), r.random(), r.random())


@dataclass(frozen=True)
class Transformed:
    pixel_values: torch.Tensor  # (3, res, res) (a bucket: (3, height, width)) float32 in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before resize
    crop_top_left: tuple[int, int]  # (top, left) in the (possibly flipped) resized image
    flipped: bool


def decode_image(source: bytes | str | Path) -> Image.Image:
    """Fully decoded 8-bit RGB image (EXIF orientation applied); raises one of DECODE_ERRORS when broken."""
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(fp) as im:
        im.load()  # decode now, so truncated files fail here and not later in a transform
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            im = _to_8bit(im)
        return im.convert("RGB")


def _to_8bit(im: Image.Image) -> Image.Image:
    """Greyscale with more than 8 bits (16-bit PNGs open as I;16 or I, float TIFFs as F) to 8-bit L.

    Pillow's own convert("RGB") clips such values at 255, so a 16-bit photo turns white; scale instead:
    integer modes by their bit depth (65535 -> 255), float by 255 when the values lie in [0, 1].
    """
    x = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        scale = 255.0 if x.size and np.nanmax(x) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    return Image.fromarray(np.clip(np.rint(x * scale), 0, 255).astype(np.uint8), mode="L")


def decode_text(data: bytes) -> tuple[str, bool]:
    """Caption bytes as text: UTF-8, else UTF-8 with replacement characters (and True, to be counted),
    so a caption file in another encoding costs its odd characters, not its image."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def split_captions(text: Any) -> list[str]:
    """Captions from a caption file or field: a string (one caption per non-empty line) or a list."""
    items = text if isinstance(text, (list, tuple)) else str(text).splitlines()
    caps = [str(c).strip() for c in items]
    return [c for c in caps if c] or [""]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 CHW in [-1, 1]."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # (H, W, 3)
    return (x / 127.5 - 1.0).permute(2, 0, 1).contiguous()  # (3, H, W)


@dataclass(frozen=True)
class ImageTransform:
    """Resize shorter side, crop a square, maybe flip; see the module docstring for the geometry."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    interpolation: str = "bilinear"

    @classmethod
    def from_config(cls, cfg: DataConfig) -> ImageTransform:
        return cls(cfg.resolution, cfg.center_crop, cfg.random_flip, cfg.interpolation)

    def resize(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        res = self.resolution
        size = (res, int(res * h / w)) if w <= h else (int(res * w / h), res)  # (width, height)
        if size == image.size:
            return image
        return image.resize(size, INTERPOLATIONS[self.interpolation])

    def resize_to_cover(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """Aspect kept, resized to the smallest size covering ``size`` = (width, height) of a bucket
        (data/buckets.py ``cover_size``)."""
        target = cover_size(image.size, size)
        return image if target == image.size else image.resize(target, INTERPOLATIONS[self.interpolation])

    def crop_offsets(
        self, height: int, width: int, draws: Draws, crop: tuple[int, int] | None = None
    ) -> tuple[int, int]:
        """(top, left) of the crop (``crop`` = (width, height); default the square) in a resized image of
        this size."""
        cw, ch = crop or (self.resolution, self.resolution)
        dy, dx = height - ch, width - cw
        if self.center_crop:
            return int(round(dy / 2.0)), int(round(dx / 2.0))
        return min(int(draws.crop_top * (dy + 1)), dy), min(int(draws.crop_left * (dx + 1)), dx)

    def wants_flip(self, draws: Draws) -> bool:
        return self.random_flip and draws.flip < 0.5

    def __call__(
        self, image: Image.Image, draws: Draws, flip: bool | None = None, size: tuple[int, int] | None = None
    ) -> Transformed:
        """Transform with the draws' crop; ``flip`` overrides the drawn flip (the cache stores both);
        ``size`` = (width, height) of the image's aspect-ratio bucket (data/buckets.py), None: the square."""
        original_size = (image.height, image.width)
        if size is None:
            image, (cw, ch) = self.resize(image), (self.resolution, self.resolution)
        else:
            image, (cw, ch) = self.resize_to_cover(image, size), size
        width = image.width
        top, left = self.crop_offsets(image.height, width, draws, (cw, ch))
        image = image.crop((left, top, left + cw, top + ch))
        flip = self.wants_flip(draws) if flip is None else flip
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = width - left - cw  # the same window, in the mirrored resized image
        return Transformed(to_tensor(image), original_size, (top, left), flip)


def choose_caption(captions: list[str], draws: Draws, proportion_empty: float) -> tuple[str, int | None]:
    """The caption for this step and its index among ``captions`` (None when dropped to "")."""
    if draws.drop < proportion_empty:
        return "", None
    i = min(int(draws.caption * len(captions)), len(captions) - 1)
    return captions[i], i


@dataclass(frozen=True)
class TagCaptions:
    """Captions as taggers write them (``1girl, solo, red hair, ...``), the way kohya sd-scripts treats them
    (``shuffle_caption``, ``keep_tokens``, ``caption_tag_dropout_rate``, ``caption_prefix`` of its
    ``library/train_util.py``): tags are the comma-separated parts of the caption; the first
    ``keep_tokens`` stay in place and are never dropped, each other tag is dropped with probability
    ``tag_dropout`` and the rest are shuffled (``shuffle_tags``); ``prefix`` (a trigger word) goes first,
    untouched. All of it is drawn from the sample's seed (``tag_rng``), so a sample gets the same caption
    at the same epoch on any number of processes and after resume. The empty caption (dropped for
    classifier-free guidance) stays empty."""

    shuffle: bool = False
    keep_tokens: int = 0
    dropout: float = 0.0
    prefix: str = ""

    @classmethod
    def from_config(cls, cfg: DataConfig) -> TagCaptions:
        return cls(cfg.shuffle_tags, cfg.keep_tokens, cfg.tag_dropout, cfg.caption_prefix.strip())

    @property
    def active(self) -> bool:
        return self.shuffle or self.dropout > 0 or bool(self.prefix)

    def __call__(self, caption: str, seed: int) -> str:
        if not caption or not self.active:
            return caption
        tags = [t.strip() for t in caption.split(",")]
        tags = [t for t in tags if t]
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
        rng = tag_rng(seed)
        if self.dropout > 0:
            rest = [t for t in rest if rng.random() >= self.dropout]
        if self.shuffle:
            rng.shuffle(rest)
        return ", ".join(([self.prefix] if self.prefix else []) + kept + rest)


def tag_rng(seed: int) -> random.Random:
    """The sample's generator of tag dropout and shuffling: its own stream derived from the sample seed,
    so the draws of ``Draws`` (crop, flip, caption choice, dropout) stay what they are with tags on."""
    return random.Random(sample_seed(seed, "tags"))


class SampleBuilder:
    """RawSample + seed -> the sample dict of the batch contract."""

    def __init__(
        self, transform: ImageTransform, proportion_empty_prompts: float = 0.0, tags: TagCaptions | None = None
    ):
        self.transform = transform
        self.proportion_empty_prompts = proportion_empty_prompts
        self.tags = tags or TagCaptions()

    @classmethod
    def from_config(cls, cfg: DataConfig) -> SampleBuilder:
        return cls(ImageTransform.from_config(cfg), cfg.proportion_empty_prompts, TagCaptions.from_config(cfg))

    def __call__(self, raw: RawSample, seed: int, size: tuple[int, int] | None = None) -> dict[str, Any]:
        """``size``: (width, height) of the sample's aspect-ratio bucket (data/buckets.py); None: square."""
        draws = Draws.from_seed(seed)
        t = self.transform(raw.image, draws, size=size)
        caption, _ = choose_caption(raw.captions, draws, self.proportion_empty_prompts)
        caption = self.tags(caption, seed)
        sample = {
            "pixel_values": t.pixel_values,
            "captions": caption,
            "original_size": torch.tensor(t.original_size, dtype=torch.int64),
            "crop_top_left": torch.tensor(t.crop_top_left, dtype=torch.int64),
            "target_size": torch.tensor(t.pixel_values.shape[-2:], dtype=torch.int64),
            "seed": int(seed),
            "key": raw.key,
        }
        if raw.replaced_captions:
            sample["_replaced_captions"] = 1
        return sample
