"""Image folders: ``img.png`` + ``img.txt`` sidecars, or a Hugging Face imagefolder ``metadata.jsonl``.

Also holds ``ImageDataset``, the base of every map-style image reader (folder, filelist): it turns
``dataset[(index, seed)]`` into a batch-contract sample and deals with unreadable images.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from ldmkit.data.buckets import Buckets, Size, header_size
from ldmkit.data.rows import metadata_rows
from ldmkit.data.transforms import (
    DECODE_ERRORS,
    IMAGE_EXTENSIONS,
    RawSample,
    SampleBuilder,
    decode_image,
    decode_text,
    split_captions,
)
from ldmkit.errors import UserError

if TYPE_CHECKING:
    from ldmkit.config import DataConfig

logger = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Map-style reader base: subclasses build an index and implement ``load(index) -> RawSample``.

    An unreadable sample (broken or truncated image, undecodable caption) is replaced by the next
    readable one (index + 1, + 2, ... modulo len), keeping the seed, so the batch stays the same on any
    number of processes; the sample dict then carries ``_skipped`` (how many were passed over), which the
    loader removes from the batch and adds to ``Loader.skipped``.
    """

    def __init__(self, cfg: DataConfig, path: str):
        self.path = path
        self.builder = SampleBuilder.from_config(cfg)
        self.bucket_of: list[Size] | None = None  # per index: (width, height) of its bucket (use_buckets)

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> RawSample:
        """The decoded sample; raises one of transforms.DECODE_ERRORS when it is unreadable."""
        raise NotImplementedError

    def files(self) -> list[str]:
        """Every file the samples are read from (cache keys stat them)."""
        raise NotImplementedError

    def image_size(self, index: int) -> Size | None:
        """(width, height) of sample ``index`` as decoded; None if unreadable. Subclasses that can read
        only the header override this."""
        raw = self.try_load(index)
        return raw.image.size if raw is not None else None

    def use_buckets(self, buckets: Buckets) -> list[Size]:
        """Assign every sample its aspect-ratio bucket (from the image headers); samples are then resized
        and cropped to it. An unreadable sample's replacement takes the bucket of the index asked for, so
        a batch stays in one bucket."""
        self.bucket_of = [buckets.assign(self.image_size(i)) for i in range(len(self))]
        return self.bucket_of

    def try_load(self, index: int) -> RawSample | None:
        try:
            return self.load(index)
        except DECODE_ERRORS as e:
            logger.debug("unreadable sample %d of %s: %s", index, self.path, e)
            return None

    def lazy_samples(self) -> Iterator[tuple[int, Callable[[], RawSample | None]]]:
        """(position, load) for every sample in index order; load() decodes (None if unreadable).

        The cache builder iterates these and decodes only the positions it encodes.
        """
        for i in range(len(self)):
            yield i, functools.partial(self.try_load, i)

    def first_readable(self) -> int:
        """Index of the first readable sample; UserError when there is none (checked once at start-up)."""
        for i in range(len(self)):
            if self.try_load(i) is not None:
                if i:
                    logger.warning("%s: the first %d samples are unreadable", self.path, i)
                return i
        raise UserError(f"no readable image in {self.path} ({len(self)} samples, all unreadable)")

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, seed = item
        n = len(self)
        for j in range(n):
            raw = self.try_load((index + j) % n)
            if raw is not None:
                sample = self.builder(raw, seed, self.bucket_of[index] if self.bucket_of is not None else None)
                if j:
                    sample["_skipped"] = j
                return sample
        raise UserError(f"no readable image in {self.path}")


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file())


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks followed) lies inside ``root``: a metadata.jsonl entry such as
    ``../outside/secret.png`` or ``/etc/passwd``, or a symlink out of the folder, must not be read."""
    return path.resolve().is_relative_to(root.resolve())


class FolderDataset(ImageDataset):
    """A folder of images with captions.

    - ``metadata.jsonl`` present (HF imagefolder): one JSON object a line with the image path relative to
      the folder in ``cfg.image_column`` (``file_name``) and the caption in ``cfg.caption_column``
      (``text``): a string or a list of strings (several captions: one is picked per step).
    - otherwise every ``*.png|jpg|jpeg|webp`` below the folder, captions in the ``.txt`` of the same
      name: one caption per non-empty line. A missing ``.txt`` means the empty caption.
    Keys are the image paths relative to the folder without the extension; order is sorted by path
    (sidecars) or the order of metadata.jsonl.
    """

    def __init__(self, root: str | Path, cfg: DataConfig):
        super().__init__(cfg, str(root))
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"data.path {root} is not a folder")
        self.metadata = self.root / "metadata.jsonl"
        self.images: list[Path] = []
        self.captions: list[list[str]] = []  # metadata.jsonl captions (sidecars are read per sample)
        if self.metadata.is_file():
            self._index_metadata(cfg.image_column, cfg.caption_column)
        else:
            self.images = _image_files(self.root)
            missing = sum(not p.with_suffix(".txt").is_file() for p in self.images)
            if missing:
                logger.warning("%s: %d images have no .txt caption file (empty caption)", root, missing)
        inside = [_inside(p, self.root) for p in self.images]
        self.refused = inside.count(False)
        if self.refused:
            logger.warning(
                "%s: %d image paths lead outside the data folder (metadata.jsonl entries or symlinks) and are refused",
                root,
                self.refused,
            )
            self.images = [p for p, ok in zip(self.images, inside) if ok]
            self.captions = [c for c, ok in zip(self.captions, inside) if ok] if self.captions else []
        if cfg.max_samples is not None:
            self.images = self.images[: cfg.max_samples]
            self.captions = self.captions[: cfg.max_samples]
        if not self.images:
            raise UserError(f"no images (png/jpg/jpeg/webp) found in {root}")

    def _index_metadata(self, image_column: str, caption_column: str) -> None:
        for image, captions in metadata_rows(self.metadata, image_column, caption_column):
            self.images.append(self.root / image)
            self.captions.append(captions)

    def __len__(self) -> int:
        return len(self.images)

    def key(self, index: int) -> str:
        return self.images[index].relative_to(self.root).with_suffix("").as_posix()

    def load(self, index: int) -> RawSample:
        path = self.images[index]
        if self.captions:
            captions = self.captions[index]
        else:
            txt = path.with_suffix(".txt")
            text, replaced = decode_text(txt.read_bytes()) if txt.is_file() else ("", False)
            captions = split_captions(text)
            return RawSample(decode_image(path), captions, self.key(index), replaced_captions=replaced)
        return RawSample(decode_image(path), captions, self.key(index))

    def image_size(self, index: int) -> Size | None:
        return header_size(self.images[index])

    def files(self) -> list[str]:
        out = [str(p) for p in self.images]
        if self.captions:
            out.append(str(self.metadata))
        else:
            out += [str(p.with_suffix(".txt")) for p in self.images if p.with_suffix(".txt").is_file()]
        return out
