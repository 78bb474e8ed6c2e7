"""Encode a dataset once (VAE moments + text embeddings of every caption) and train from the cache.

Layout of ``<cache_root>/<key>/``:
- ``shard-NNNNN.safetensors``: samples at source positions ``[N*S, (N+1)*S)`` (S = shard size, unreadable
  samples left out): ``moments`` [n,2C,h,w] (and ``moments_flip`` with random_flip), ``text.<name>``
  [m,...] for every caption of the shard's samples (m = all captions, ``caption_offsets`` [n+1] say which
  rows belong to which sample), ``original_size``, ``crop_top_left`` (+ ``crop_top_left_flip``),
  ``target_size`` [n,2]; the metadata holds the keys and captions as JSON. With ``data.buckets`` the
  moments are stored per bucket, ``moments@{W}x{H}`` [n_b,2C,H/f,W/f] (and ``moments_flip@{W}x{H}``),
  and ``bucket_row`` [n] gives each sample's row in its bucket's tensor.
- ``empty.safetensors``: ``text.<name>`` [1,...] of the empty prompt (caption dropout).
- ``index.json``: written last; its presence marks a complete cache.
- ``key.json``: what the key was computed from (for people).

Moments and embeddings are stored in float16 (half the disk; the VAE posterior and CLIP states are
well inside its range, relative error ~1e-3) and returned as float32.

The key hashes the encoders' fingerprint, every data file (path, size, mtime), and the settings that
change the encoded tensors (resolution, center_crop, random_flip, interpolation, max_samples, caption and
image columns, the buckets: step and largest aspect ratio); any change gives a new folder, so a stale cache is never read. What stays dynamic:
flip (with random_flip both orientations are stored and the sample's seed picks one), caption choice and
caption dropout. With random crop (center_crop false) the crop is drawn once per sample at cache time
(seeded by its key) and fixed for the whole training.

Building: each shard file is written atomically (tmp + rename), so an interrupted build resumes with the
finished shards kept. With several processes (``accelerator``), rank r encodes shards r, r+W, ...,
all wait, and the main process writes the index. For a streamed WebDataset every rank reads (without
decoding) the whole stream to find its shards.

Finding a cache needs only the encoders' fingerprint: the model families (ldmkit.families) read
it from files and load the VAE / text encoders only when a cache has to be built.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ldmkit.data.buckets import Buckets, Size
from ldmkit.data.transforms import Draws, ImageTransform, RawSample, choose_caption
from ldmkit.rng import sample_seed

if TYPE_CHECKING:
    from ldmkit.config import DataConfig

logger = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: target_size, bucket_row and per-bucket moments (data.buckets)
STORE_DTYPE = torch.float16
SHARD_SIZE = 512  # samples per shard file


class Encoders(Protocol):
    """What the cache needs from the models (ldmkit.families' Family has it)."""

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor: ...  # VAE moments [B,2C,h,w]
    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]: ...
    def fingerprint(self) -> str: ...


def _stat(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [path]  # URLs (and pipe: commands) are keyed by name only
    return [path, st.st_size, st.st_mtime_ns]


def cache_key(
    dataset: Any, encoders: Encoders, cfg: DataConfig, shard_size: int, buckets: Buckets | None = None
) -> dict[str, Any]:
    """What a cache depends on; hashed into its folder name."""
    return {
        "buckets": [buckets.step, buckets.max_aspect] if buckets is not None else None,
        "version": CACHE_VERSION,
        "encoders": encoders.fingerprint(),
        "source": type(dataset).__name__,
        "files": [_stat(f) for f in dataset.files()],
        "resolution": cfg.resolution,
        "center_crop": cfg.center_crop,
        "random_flip": cfg.random_flip,
        "interpolation": cfg.interpolation,
        "max_samples": cfg.max_samples,
        "caption_column": cfg.caption_column,
        "image_column": cfg.image_column,
        "shard_size": shard_size,
    }


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], tag: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{tag}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _encode_text(encoders: Encoders, captions: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(captions), batch_size):
        for k, v in encoders.encode_prompts(captions[i : i + batch_size]).items():
            parts.setdefault(k, []).append(v.detach().to("cpu", STORE_DTYPE))
    return {f"text.{k}": torch.cat(v) for k, v in parts.items()}


class _ShardWriter:
    """Accumulates one shard: transforms and VAE-encodes images in chunks of batch_size as they come."""

    def __init__(self, encoders: Encoders, transform: ImageTransform, batch_size: int, buckets: Buckets | None = None):
        self.encoders, self.transform, self.batch_size, self.buckets = encoders, transform, batch_size, buckets
        self.keys: list[str] = []
        self.captions: list[list[str]] = []
        self.sizes: list[tuple[int, int]] = []
        self.targets: list[tuple[int, int]] = []  # (height, width) of each sample's crop
        self.rows: list[int] = []  # row of each sample in its group's moments
        self.crops: dict[bool, list[tuple[int, int]]] = {False: [], True: []}
        # per group (moments name suffix: "" for square crops, "@{W}x{H}" per bucket) and flip
        self.pending: dict[tuple[str, bool], list[torch.Tensor]] = {}
        self.moments: dict[tuple[str, bool], list[torch.Tensor]] = {}
        self.counts: dict[str, int] = {}
        self.unreadable = 0
        self.replaced_captions = 0
        self.flips = (False, True) if transform.random_flip else (False,)

    def add(self, raw: RawSample | None) -> None:
        if raw is None:
            self.unreadable += 1
            return
        self.replaced_captions += raw.replaced_captions
        draws = Draws.from_seed(sample_seed("cache-crop", raw.key))  # random crop: fixed per key
        size = self.buckets.assign(raw.image.size) if self.buckets is not None else None
        group = f"@{size[0]}x{size[1]}" if size is not None else ""
        for flip in self.flips:
            t = self.transform(raw.image, draws, flip=flip, size=size)
            self.pending.setdefault((group, flip), []).append(t.pixel_values)
            self.crops[flip].append(t.crop_top_left)
        self.sizes.append(t.original_size)
        self.targets.append(tuple(t.pixel_values.shape[-2:]))
        self.rows.append(self.counts.get(group, 0))
        self.counts[group] = self.rows[-1] + 1
        self.keys.append(raw.key)
        self.captions.append(list(raw.captions))
        if len(self.pending[group, False]) >= self.batch_size:
            self._encode_pending(group)

    def _encode_pending(self, only: str | None = None) -> None:
        for (group, flip), pixels in self.pending.items():
            if pixels and only in (None, group):
                x = torch.stack(pixels)  # (b, 3, H, W)
                encoded = self.encoders.encode_images(x).detach().to("cpu", STORE_DTYPE)
                self.moments.setdefault((group, flip), []).append(encoded)
                self.pending[group, flip] = []

    def save(self, path: Path, tag: str) -> int:
        self._encode_pending()
        flat = [c for caps in self.captions for c in caps]
        tensors = _encode_text(self.encoders, flat, self.batch_size) if flat else {}
        offsets = [0]
        for caps in self.captions:
            offsets.append(offsets[-1] + len(caps))
        tensors["caption_offsets"] = torch.tensor(offsets, dtype=torch.int64)
        tensors["original_size"] = torch.tensor(self.sizes, dtype=torch.int64).reshape(-1, 2)
        tensors["target_size"] = torch.tensor(self.targets, dtype=torch.int64).reshape(-1, 2)
        tensors["bucket_row"] = torch.tensor(self.rows, dtype=torch.int64)
        for (group, flip), parts in self.moments.items():
            tensors["moments" + ("_flip" if flip else "") + group] = torch.cat(parts)
        for flip in self.flips:
            suffix = "_flip" if flip else ""
            tensors["crop_top_left" + suffix] = torch.tensor(self.crops[flip], dtype=torch.int64).reshape(-1, 2)
        meta = {
            "keys": json.dumps(self.keys),
            "captions": json.dumps(self.captions),
            "unreadable": str(self.unreadable),
            "replaced_captions": str(self.replaced_captions),
        }
        _save_atomic(tensors, path, meta, tag)
        return len(self.keys)


def build_cache(
    dataset: Any,
    encoders: Encoders,
    cache_root: str | Path,
    data_cfg: DataConfig,
    *,
    batch_size: int,
    accelerator: Any = None,
    shard_size: int | None = None,
    buckets: Buckets | None = None,
) -> CacheDataset:
    """Build (or reuse) the cache of ``dataset`` and return it as a map-style dataset.

    ``dataset`` is any reader with ``files()`` and ``lazy_samples()`` (folder, filelist, wds).
    ``accelerator``: anything with ``process_index``, ``num_processes``, ``wait_for_everyone()``
    (accelerate's Accelerator or PartialState); None for one process.
    """
    shard_size = shard_size or SHARD_SIZE
    key_info = cache_key(dataset, encoders, data_cfg, shard_size, buckets)
    digest = hashlib.sha256(json.dumps(key_info, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(cache_root) / digest
    if (folder / "index.json").is_file():
        logger.info("using the latent cache %s", folder)
        return _report(CacheDataset(folder, data_cfg.proportion_empty_prompts))

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        logger.info("building the latent cache %s", folder)
        (folder / "key.json").write_text(json.dumps(key_info, indent=1))
    transform = ImageTransform.from_config(data_cfg)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    bar = tqdm(total=total, desc="caching latents", unit="img", disable=rank != 0, dynamic_ncols=True)
    writer, current, positions = None, -1, 0
    with torch.no_grad():
        for pos, load in dataset.lazy_samples():
            positions = pos + 1
            s = pos // shard_size
            if s != current:
                if writer is not None:
                    writer.save(folder / _shard_name(current), str(rank))
                current = s
                todo = s % world == rank and not (folder / _shard_name(s)).is_file()
                writer = _ShardWriter(encoders, transform, batch_size, buckets) if todo else None
            if writer is not None:
                writer.add(load())
            bar.update(1)
        if writer is not None:
            writer.save(folder / _shard_name(current), str(rank))
    bar.close()

    if accelerator is not None:
        accelerator.wait_for_everyone()
    if rank == 0:
        num_shards = -(-positions // shard_size)
        missing = [s for s in range(num_shards) if not (folder / _shard_name(s)).is_file()]
        if missing:
            raise RuntimeError(f"cache {folder}: shards {missing[:5]} were not written")
        with torch.no_grad():
            _save_atomic(_encode_text(encoders, [""], 1), folder / "empty.safetensors", {}, "0")
        index = {
            "version": CACHE_VERSION,
            "shards": [_shard_name(s) for s in range(num_shards)],
            "random_flip": data_cfg.random_flip,
            "resolution": data_cfg.resolution,
            "buckets": buckets is not None,
        }
        tmp = folder / "index.json.tmp"
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, folder / "index.json")
        for leftover in folder.glob("*.tmp-*"):
            leftover.unlink()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return _report(CacheDataset(folder, data_cfg.proportion_empty_prompts))


def _report(cache: CacheDataset) -> CacheDataset:
    """Say what the source cost at encoding time: the counts are stored with the shards, so a run that
    reuses the cache is told as well."""
    logger.info(
        "latent cache: %d samples; %d unreadable skipped; %d captions not UTF-8 (read with replacement characters)",
        len(cache),
        cache.unreadable,
        cache.replaced_captions,
    )
    return cache


class CacheDataset(Dataset):
    """Map-style dataset over a finished cache (protocol of ldmkit.data): ``ds[(index, seed)]`` gives
    ``latent_moments``, ``prompt_embeds`` (+ ``pooled_prompt_embeds``), ``captions``, ``original_size``,
    ``crop_top_left``, ``target_size``, ``seed``, ``key``. ``bucket_of``: (width, height) of every
    sample's bucket (the BucketBatchSampler groups by it), None for a square-crop cache. Flip, caption choice and dropout (-> the cached empty-prompt
    embedding, caption "") come from ``Draws.from_seed(seed)`` exactly as on the image path."""

    def __init__(self, folder: str | Path, proportion_empty_prompts: float = 0.0):
        self.folder = Path(folder)
        self.path = str(folder)
        index = json.loads((self.folder / "index.json").read_text())
        self.random_flip = bool(index["random_flip"])
        self.bucketed = bool(index.get("buckets", False))
        self.proportion_empty_prompts = proportion_empty_prompts
        self.shard_files = [self.folder / name for name in index["shards"]]
        self.keys: list[list[str]] = []
        self.captions: list[list[list[str]]] = []
        self.unreadable = self.replaced_captions = 0
        for f in self.shard_files:
            with safe_open(str(f), "pt") as h:
                meta = h.metadata()
            self.keys.append(json.loads(meta["keys"]))
            self.captions.append(json.loads(meta["captions"]))
            self.unreadable += int(meta["unreadable"])
            self.replaced_captions += int(meta.get("replaced_captions", 0))
        self.starts = [0]
        for k in self.keys:
            self.starts.append(self.starts[-1] + len(k))
        self.bucket_of: list[Size] | None = None
        if self.bucketed:
            self.bucket_of = []
            for f in self.shard_files:
                with safe_open(str(f), "pt") as h:
                    self.bucket_of += [(int(w), int(hh)) for hh, w in h.get_tensor("target_size").tolist()]
        self.empty = {
            k.removeprefix("text."): v[0].float() for k, v in load_file(str(self.folder / "empty.safetensors")).items()
        }
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # safetensors handles are per process
        return state

    def _handle(self, s: int) -> Any:
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.shard_files[s]), "pt")
        return self._handles[s]

    def first_readable(self) -> int:
        return 0

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, seed = item
        s = bisect.bisect_right(self.starts, index) - 1
        j = index - self.starts[s]
        h = self._handle(s)
        draws = Draws.from_seed(seed)
        flip = self.random_flip and draws.flip < 0.5
        suffix = "_flip" if flip else ""
        captions = self.captions[s][j]
        caption, ci = choose_caption(captions, draws, self.proportion_empty_prompts)
        target = h.get_slice("target_size")[j : j + 1][0]  # (height, width)
        row = int(h.get_slice("bucket_row")[j : j + 1][0])
        group = f"@{int(target[1])}x{int(target[0])}" if self.bucketed else ""
        moments = h.get_slice("moments" + suffix + group)[row : row + 1][0]
        sample: dict[str, Any] = {"latent_moments": moments.float()}
        if ci is None:
            sample.update({k: v.clone() for k, v in self.empty.items()})
        else:
            row = int(h.get_slice("caption_offsets")[j : j + 1][0]) + ci
            for name in h.keys():
                if name.startswith("text."):
                    sample[name.removeprefix("text.")] = h.get_slice(name)[row : row + 1][0].float()
        sample.update(
            {
                "captions": caption,
                "original_size": h.get_slice("original_size")[j : j + 1][0],
                "crop_top_left": h.get_slice("crop_top_left" + suffix)[j : j + 1][0],
                "target_size": target,
                "seed": int(seed),
                "key": self.keys[s][j],
            }
        )
        return sample
