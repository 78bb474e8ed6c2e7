"""Synthetic coloured-shapes text-to-image data: ``ldmkit data synth``.

One shape per image on a black background; the caption states its colour, shape, size and position
("a small red circle in the top left"). The vocabulary is small and visually unambiguous even at
32 px, so a tiny model trained on a CPU can learn it, and ``ldmkit.eval.scorer`` can read the four
attributes back from a generated image: prompt adherence becomes a number.

Shapes are rendered analytically with supersampled coverage (numpy only), so the pixels do not depend
on Pillow's rasteriser and edges are anti-aliased exactly.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldmkit.errors import UserError
from ldmkit.rng import sample_seed

logger = logging.getLogger(__name__)

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "green", "blue", "yellow"),
    "shape": ("circle", "square", "triangle"),
    "size": ("small", "large"),
    "position": ("top left", "top right", "bottom left", "bottom right", "center"),
}

# Saturated colours far apart in hue, bright enough to stand out from the black background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
# Centre of each position, as fractions (x, y) of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
# Half-extent of the shape's bounding box as a fraction of the image side (before jitter).
RADII: dict[str, float] = {"small": 0.10, "large": 0.195}
# Jitter ranges: position offset (fraction of the side) and radius scale. A large shape in a corner
# keeps >= 0.009 of the side free at the border; small and large extents never overlap.
MAX_OFFSET = 0.03
SCALE_RANGE = (0.92, 1.08)
SUPERSAMPLE = 8


def sample_attrs(rng: random.Random) -> dict[str, Any]:
    """Uniformly random attributes plus jitter (``dx``, ``dy`` offsets and radius ``scale``)."""
    attrs: dict[str, Any] = {k: rng.choice(v) for k, v in ATTRIBUTES.items()}
    attrs["dx"] = round(rng.uniform(-MAX_OFFSET, MAX_OFFSET), 4)
    attrs["dy"] = round(rng.uniform(-MAX_OFFSET, MAX_OFFSET), 4)
    attrs["scale"] = round(rng.uniform(*SCALE_RANGE), 4)
    return attrs


def _check(attrs: dict[str, Any]) -> None:
    for key, vocab in ATTRIBUTES.items():
        if attrs.get(key) not in vocab:
            raise UserError(f"shape attribute {key}={attrs.get(key)!r} is not one of {', '.join(vocab)}")


def coverage(
    shape: str, cx: Any, cy: Any, r: Any, height: int, width: int, supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """(..., height, width) fraction of each pixel inside the shape; centre and radius in pixels.

    ``cx, cy, r`` may be arrays (broadcast together) to render a batch of templates at once.
    Squares are axis-aligned; triangles point up, with base and height both 2 * r and the bounding box
    centred on (cx, cy). Coverage is the mean of an inside test over supersample^2 points per pixel.
    """
    cx, cy, r = (np.asarray(v, dtype=np.float64)[..., None, None] for v in (cx, cy, r))
    y = ((np.arange(height * supersample) + 0.5) / supersample)[:, None]
    x = ((np.arange(width * supersample) + 0.5) / supersample)[None, :]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif shape == "triangle":  # apex (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
        inside = (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    lead = inside.shape[:-2]
    return inside.reshape(*lead, height, supersample, width, supersample).mean(axis=(-3, -1))


def render(attrs: dict[str, Any], size: int) -> Image.Image:
    """Draw the shape described by ``attrs`` on a ``size`` x ``size`` black RGB image.

    Missing jitter keys mean no jitter (the nominal position and radius).
    """
    _check(attrs)
    cx, cy = POSITIONS[attrs["position"]]
    cx, cy = cx + float(attrs.get("dx", 0.0)), cy + float(attrs.get("dy", 0.0))
    r = RADII[attrs["size"]] * float(attrs.get("scale", 1.0))
    cover = coverage(attrs["shape"], cx * size, cy * size, r * size, size, size)[..., None]  # (H, W, 1)
    fg, bg = np.array(PALETTE[attrs["color"]], float), np.array(BACKGROUND, float)
    img = cover * fg + (1 - cover) * bg  # (H, W, 3)
    return Image.fromarray(np.round(img).astype(np.uint8), "RGB")


def caption(attrs: dict[str, Any]) -> str:
    """The canonical caption, e.g. "a small red circle in the top left" / "a large blue square in the center"."""
    _check(attrs)
    where = "the center" if attrs["position"] == "center" else f"the {attrs['position']}"
    return f"a {attrs['size']} {attrs['color']} {attrs['shape']} in {where}"


_WORDS = {
    key: re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(vocab, key=len, reverse=True)) + r")\b")
    for key, vocab in ATTRIBUTES.items()
}


def parse_caption(text: str) -> dict[str, str] | None:
    """The four attributes named in ``text``, or None when it is not a shapes caption.

    Word order is free (so paraphrases parse), but each attribute must be named exactly once;
    "centre" is accepted for "center".
    """
    low = re.sub(r"\s+", " ", text.lower().replace("centre", "center"))
    attrs: dict[str, str] = {}
    for key, pattern in _WORDS.items():
        found = set(pattern.findall(low))
        if len(found) != 1:
            return None
        attrs[key] = found.pop()
    return attrs


def all_attrs() -> list[dict[str, str]]:
    """Every combination of the attribute vocabularies, in a fixed order."""
    combos: list[dict[str, str]] = [{}]
    for key, vocab in ATTRIBUTES.items():
        combos = [{**c, key: v} for c in combos for v in vocab]
    return combos


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` evaluation prompts: every attribute combination once per round, each round shuffled by ``seed``.

    The vocabulary is small (120 combinations), so every combination also occurs in training data; the
    prompts are "held out" only in that they are drawn independently of any training set. With
    ``n`` a multiple of 120 each combination is weighted equally.
    """
    if n < 1:
        raise UserError(f"number of prompts must be >= 1, got {n}")
    prompts: list[str] = []
    rnd = 0
    while len(prompts) < n:
        combos = all_attrs()
        random.Random(sample_seed("heldout", seed, rnd)).shuffle(combos)
        prompts += [caption(c) for c in combos]
        rnd += 1
    return prompts[:n]


def make_sample(index: int, size: int, seed: int) -> tuple[Image.Image, dict[str, Any]]:
    """Sample ``index`` of the dataset with ``seed``: the same image whatever else is generated."""
    attrs = sample_attrs(random.Random(sample_seed("synth", seed, index)))
    return render(attrs, size), attrs


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


KINDS = ("shapes", "glyphs")
"""shapes: this module's coloured shapes (four scoreable attributes); glyphs: data/glyphs.py, captions that
differ in one word (a label)."""


def write_dataset(
    out: str | Path,
    num: int,
    fmt: str = "folder",
    size: int = 32,
    seed: int = 0,
    shard_size: int = 1000,
    kind: str = "shapes",
) -> list[Path]:
    """Write ``num`` samples of ``kind`` to ``out`` and return the written image files (folder) or shards (wds).

    folder: ``NNNNN.png`` + ``NNNNN.txt`` + ``metadata.jsonl`` (``file_name``, ``text`` and the attributes),
    readable as an image folder or a Hugging Face imagefolder.
    wds: ``shapes-NNNNNN.tar`` shards of ``shard_size`` samples, members ``KEY.png``, ``KEY.txt``,
    ``KEY.json`` (attributes, width, height); tar mtimes are fixed so shards are byte-reproducible.
    """
    if num < 1:
        raise UserError(f"--num must be >= 1, got {num}")
    if size < 16:
        raise UserError(f"--size must be >= 16 pixels, got {size}")
    if fmt not in ("folder", "wds"):
        raise UserError(f"--format must be folder or wds, got {fmt!r}")
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "glyphs":
        from ldmkit.data import glyphs

        make, describe = glyphs.make_sample, glyphs.caption
    else:
        make, describe = make_sample, caption
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(num - 1)))
    written: list[Path] = []
    if fmt == "folder":
        with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
            for i in range(num):
                image, attrs = make(i, size, seed)
                stem = f"{i:0{width}d}"
                text = describe(attrs)
                image.save(out / f"{stem}.png")
                (out / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
                meta.write(json.dumps({"file_name": f"{stem}.png", "text": text, **attrs}) + "\n")
                written.append(out / f"{stem}.png")
        return written

    import webdataset as wds

    for start in range(0, num, shard_size):
        path = out / f"{kind}-{start // shard_size:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            for i in range(start, min(start + shard_size, num)):
                image, attrs = make(i, size, seed)
                text = describe(attrs)
                meta = {"text": text, "width": size, "height": size, **attrs}
                sink.write({"__key__": f"{i:0{width}d}", "png": _png(image), "txt": text, "json": json.dumps(meta)})
        written.append(path)
    return written
