"""Hugging Face ``datasets`` sources: a ``Dataset.save_to_disk`` folder, ``.arrow`` files or ``.parquet`` files.

What ``data.path`` may be (``loader.detect_format`` sends these here):
- a folder written by ``Dataset.save_to_disk`` (``state.json`` + ``data-*.arrow``), or by
  ``DatasetDict.save_to_disk`` (``dataset_dict.json``; its ``train`` split is used);
- an ``.arrow`` file, or a folder of them (the ``datasets`` cache layout, ``Dataset.from_file``);
- a ``.parquet`` file, or a folder with ``*.parquet`` / ``*/*.parquet`` (the Hub's ``data/train-*.parquet``).

Nothing is loaded into memory: arrow files are memory-mapped where they lie, and parquet files are
converted once into memory-mapped arrow by ``datasets`` itself (``Dataset.from_parquet``, the packaged
``parquet`` builder ``load_dataset`` uses; the copy sits in the ``datasets`` cache, ``HF_DATASETS_CACHE``).
A row is read when its sample is asked for. The reader is map-style (``ImageDataset``), so it goes
through the global batch sampler like an image folder: split per rank, one sample once per epoch, the
same batches on any number of processes and workers (data/sampler.py).

Columns: ``data.image_column`` holds the image as the ``datasets`` ``Image`` feature (read undecoded:
``{"bytes", "path"}``, the bytes, else the file at the path, relative paths against the dataset folder),
raw bytes, or a path; with the default ``file_name`` absent, the one ``Image`` column is taken.
``data.caption_column`` holds a string (one caption per non-empty line) or a list of strings. Keys are
the row numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldmkit.data import rows
from ldmkit.data.folder import ImageDataset
from ldmkit.data.transforms import RawSample, decode_image
from ldmkit.errors import UserError

if TYPE_CHECKING:
    from ldmkit.config import DataConfig

logger = logging.getLogger(__name__)
DEFAULT_IMAGE_COLUMN = "file_name"  # DataConfig's default, the metadata.jsonl field


def is_hf_source(p: Path) -> bool:
    """Whether the existing path ``p`` is a ``datasets`` source (see the module docstring)."""
    if p.is_file():
        return p.suffix in (".arrow", ".parquet")
    if (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()):
        return True
    if (p / "metadata.jsonl").is_file():
        return False
    return any(p.glob("*.arrow")) or any(p.glob("*.parquet")) or any(p.glob("*/*.parquet"))


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError(
            "this data.path is a Hugging Face datasets source, which needs the datasets package: "
            "pip install 'ldmkit[datasets]'"
        ) from None
    return datasets


def load_hf(path: str | Path) -> Any:
    """The ``datasets.Dataset`` at ``path`` (memory-mapped), UserError when it is none."""
    datasets = _import_datasets()
    p = Path(path).expanduser()
    try:
        if p.is_file() and p.suffix == ".arrow":
            return datasets.Dataset.from_file(str(p))
        if p.is_file() and p.suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(p))
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise UserError(
                        f"data.path {path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})"
                    )
                ds = ds["train"]
            return ds
        arrows = sorted(p.glob("*.arrow"))
        if arrows:
            return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in arrows])
        parquets = sorted(p.glob("*.parquet")) or sorted(p.glob("*/*.parquet"))
        if parquets:
            return datasets.Dataset.from_parquet([str(f) for f in parquets])
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise UserError(
            f"data.path {path}: not a readable datasets source ({str(e).strip().splitlines()[0]})"
        ) from None
    raise UserError(f"data.path {path}: no datasets folder, .arrow or .parquet files found")


def _check_types(path, features, image_col: str, caption_col: str, datasets) -> None:
    """The columns' declared types (a datasets table is typed per column, so one look serves every row):
    captions are strings or lists of strings, images Image / path strings / bytes."""

    def is_text(f) -> bool:
        return isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")

    def is_text_list(f) -> bool:  # List / Sequence / LargeList of strings ([Value] in a features dict)
        inner = f[0] if isinstance(f, list) and len(f) == 1 else getattr(f, "feature", None)
        return inner is not None and is_text(inner)

    cap, img = features[caption_col], features[image_col]
    if not (is_text(cap) or is_text_list(cap)):
        raise UserError(
            f"data.path {path}: column '{caption_col}' (data.caption_column) holds {cap}, not text or lists of text"
        )
    if not (
        isinstance(img, datasets.Image) or is_text(img) or getattr(img, "dtype", None) in ("binary", "large_binary")
    ):
        raise UserError(
            f"data.path {path}: column '{image_col}' (data.image_column) holds {img}, not images, paths or bytes"
        )


class HFDataset(ImageDataset):
    """Rows of a Hugging Face ``datasets`` source as samples; see the module docstring."""

    def __init__(self, path: str | Path, cfg: DataConfig):
        super().__init__(cfg, str(path))
        datasets = _import_datasets()
        self.root = Path(path).expanduser()
        ds = load_hf(self.root)
        columns = list(ds.column_names)
        image_col = cfg.image_column
        if image_col not in columns and image_col == DEFAULT_IMAGE_COLUMN:
            images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
            if len(images) == 1:
                image_col = images[0]
        for key, col in (("data.image_column", image_col), ("data.caption_column", cfg.caption_column)):
            if col not in columns:
                raise UserError(f"data.path {path}: no column '{col}' for {key} (columns: {', '.join(columns)})")
        _check_types(path, ds.features, image_col, cfg.caption_column, datasets)
        ds = ds.select_columns([image_col, cfg.caption_column])
        if isinstance(ds.features[image_col], datasets.Image):
            ds = ds.cast_column(image_col, datasets.Image(decode=False))  # our decoder: EXIF, 16-bit, errors
        if cfg.max_samples is not None and cfg.max_samples < len(ds):
            ds = ds.select(range(cfg.max_samples))
        if len(ds) == 0:
            raise UserError(f"data.path {path}: the dataset has no rows")
        self.ds, self.image_column, self.caption_column = ds, image_col, cfg.caption_column
        self.base = self.root if self.root.is_dir() else self.root.parent

    def __len__(self) -> int:
        return len(self.ds)

    def _image(self, value: Any) -> Any:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            return p if p.is_absolute() else self.base / p
        raise ValueError(f"no image in column '{self.image_column}'")

    def load(self, index: int) -> RawSample:
        row = self.ds[index]
        captions = rows.captions(row[self.caption_column], f"{self.path} row {index}", self.caption_column)
        return RawSample(decode_image(self._image(row[self.image_column])), captions, str(index))

    def files(self) -> list[str]:
        return sorted({f["filename"] for f in self.ds.cache_files})
