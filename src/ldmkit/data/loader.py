"""``build_loader``: data config -> an infinite iterator of collated batches (the batch contract)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ldmkit.data.buckets import Buckets, Size, most_common
from ldmkit.data.sampler import BucketBatchSampler, GlobalBatchSampler
from ldmkit.errors import UserError

if TYPE_CHECKING:
    from ldmkit.config import DataConfig

logger = logging.getLogger(__name__)


def detect_format(path: str) -> str:
    """folder | wds | filelist | features | datasets, from the shape of ``data.path``."""
    if not path:
        raise UserError("data.path is empty: give an image folder, WebDataset shards, a file list or a feature folder")
    if path.startswith("pipe:") or "://" in path or "{" in path or "::" in path:
        return "wds"
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data.path {path} does not exist")
    from ldmkit.data.hf import is_hf_source

    if is_hf_source(p):
        return "datasets"
    if p.is_file():
        if p.name.endswith(".tar"):
            return "wds"
        if p.name.endswith((".filelist.list", ".filelist")):
            return "filelist"
        raise UserError(
            f"data.path {path}: cannot tell the format of this file (expected *.tar, *.filelist.list, *.parquet or *.arrow)"
        )
    if (p / "empty_context.npy").is_file():
        return "features"
    if (p / "metadata.jsonl").is_file():
        return "folder"
    if any(p.glob("*.tar")):
        return "wds"
    return "folder"


def open_dataset(
    cfg: DataConfig, *, seed: int = 0, rank: int = 0, world_size: int = 1, batch_size: int = 1, start_batch: int = 0
) -> Dataset:
    """The reader for ``cfg.path``: map-style (folder, filelist, features, datasets) or streamed (wds).

    The keyword arguments only matter for WebDataset (its split and resume position).
    """
    fmt = detect_format(cfg.path) if cfg.format == "auto" else cfg.format
    if fmt == "folder":
        from ldmkit.data.folder import FolderDataset

        return FolderDataset(cfg.path, cfg)
    if fmt == "filelist":
        from ldmkit.data.filelist import FileListDataset

        return FileListDataset(cfg.path, cfg)
    if fmt == "wds":
        from ldmkit.data.wds import WdsDataset

        return WdsDataset(
            cfg.path, cfg, seed=seed, rank=rank, world_size=world_size, batch_size=batch_size, start_batch=start_batch
        )
    if fmt == "datasets":
        from ldmkit.data.hf import HFDataset

        return HFDataset(cfg.path, cfg)
    if fmt == "features":
        from ldmkit.data.features import FeatureDataset

        return FeatureDataset.from_config(cfg)
    raise UserError(f"unknown data.format {fmt}")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Tensors and arrays stacked, ints to int64 tensors, strings (and anything else) to lists.

    ``_skipped`` (unreadable samples a reader passed over) and ``_replaced_captions`` (captions decoded
    with replacement characters) are summed, for ``Loader.skipped`` / ``Loader.replaced_captions``.
    """
    skipped = sum(s.pop("_skipped", 0) for s in samples)
    replaced = sum(s.pop("_replaced_captions", 0) for s in samples)
    batch: dict[str, Any] = {}
    for k in samples[0]:
        values = [s[k] for s in samples]
        v = values[0]
        if isinstance(v, torch.Tensor):
            batch[k] = torch.stack(values)
        elif isinstance(v, np.ndarray):
            batch[k] = torch.from_numpy(np.stack(values))
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            batch[k] = torch.tensor([int(x) for x in values], dtype=torch.int64)
        else:
            batch[k] = list(values)
    if skipped:
        batch["_skipped"] = skipped
    if replaced:
        batch["_replaced_captions"] = replaced
    return batch


class Loader:
    """Infinite iterator of collated batches of this rank.

    Attributes: ``epoch`` (completed epochs, from the batch position), ``batches_per_epoch`` (None when
    unknown), ``num_samples``, ``skipped`` (unreadable samples passed over so far), ``replaced_captions``
    (captions read with replacement characters so far), ``position`` (global
    micro-batch index of the next batch).
    """

    def __init__(
        self,
        dataloader: DataLoader,
        *,
        num_samples: int | None,
        batches_per_epoch: int | None,
        start_batch: int = 0,
    ):
        self.dataloader = dataloader
        self.num_samples = num_samples
        self.batches_per_epoch = batches_per_epoch
        self.position = start_batch
        self.skipped = 0
        self.replaced_captions = 0
        self._it: Iterator[dict[str, Any]] | None = None

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch if self.batches_per_epoch else 0

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self.dataloader)
        batch = next(self._it)
        skipped = batch.pop("_skipped", 0)
        if skipped:
            self.skipped += skipped
            logger.warning("skipped %d unreadable samples so far (replaced by readable ones)", self.skipped)
        replaced = batch.pop("_replaced_captions", 0)
        if replaced:
            self.replaced_captions += replaced
            logger.warning(
                "%d captions so far were not UTF-8 (read with replacement characters)", self.replaced_captions
            )
        self.position += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes now (persistent workers otherwise live until the DataLoader is
        garbage collected, which an infinite sampler never lets it finish on its own)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()


class _Ranks:
    """rank/world as given, barrier from accelerate's process group (set up by the training loop)."""

    def __init__(self, rank: int, world_size: int):
        from accelerate import PartialState

        self.process_index, self.num_processes = rank, world_size
        self.wait_for_everyone = PartialState().wait_for_everyone


def _ignore_stop_signals(worker_id: int) -> None:
    """Ctrl-C and SIGTERM reach the workers too (same process group); the main process decides what to
    do (finish the step, save, exit: train/loop.py), so a worker must not die and take the batch with it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(
    data_cfg: DataConfig,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    encoders: Any = None,
    cache_root: str | Path | None = None,
) -> Loader:
    """The training data of this rank from global micro-batch ``start_batch`` on.

    Map-style sources go through GlobalBatchSampler (1 process with batch B*W sees the same samples as W
    processes with batch B; resume skips without loading). WebDataset streams are split per rank and
    worker (data/wds.py). With ``data_cfg.cache`` and ``encoders``, the source is encoded once
    (data/cache.py) and batches carry ``latent_moments`` / ``prompt_embeds`` instead of pixels.

    This is the one place that decides whether the cache is used: methods hand over their encoders
    (a model family: ``encode_images``, ``encode_prompts``, ``fingerprint``) whatever the config says.
    Encoders that load models on demand (ldmkit.families) may offer ``transient()``: what encoding
    loaded is dropped once the cache is built; and ``use_encoded_prompt(caption, embeds)``: they receive
    the cache's empty-prompt embedding, so the unconditional pass needs no text encoder either.

    With ``data_cfg.buckets`` every batch comes from one aspect-ratio bucket (data/buckets.py; the
    bucket step from the encoders' VAE): BucketBatchSampler for map-style sources and the cache, runs
    of one bucket within the shuffle buffer for WebDataset streams.
    """
    buckets = Buckets.from_config(data_cfg, encoders)
    dataset = open_dataset(
        data_cfg, seed=seed, rank=rank, world_size=world_size, batch_size=batch_size, start_batch=start_batch
    )
    if data_cfg.cache:
        dataset = _encoded(dataset, data_cfg, encoders, cache_root, buckets, rank, world_size)

    workers = data_cfg.num_workers
    common = dict(
        num_workers=workers,
        worker_init_fn=_ignore_stop_signals,
        collate_fn=collate,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )
    bucket_of = _use_buckets(dataset, buckets, data_cfg.path) if buckets is not None else None
    if isinstance(dataset, torch.utils.data.IterableDataset):
        num_samples = data_cfg.num_samples if data_cfg.num_samples is not None else dataset.count()
        if num_samples == 0:
            raise UserError(f"no samples with an image in {data_cfg.path}")
        dataset.first_readable()  # UserError when nothing is readable
        per_epoch = num_samples // (batch_size * world_size) or None
        loader = DataLoader(dataset, batch_size=batch_size, **common)
        return Loader(loader, num_samples=num_samples, batches_per_epoch=per_epoch, start_batch=start_batch)

    num_samples = len(dataset)
    if num_samples == 0:
        raise UserError(f"no usable samples in {data_cfg.path}")
    check = getattr(dataset, "first_readable", None)
    if check is not None:
        check()  # UserError when nothing is readable
    if bucket_of is not None:
        sampler = BucketBatchSampler(
            bucket_of, batch_size, seed=seed, rank=rank, world_size=world_size, start_batch=start_batch
        )
        _log_buckets(sampler)
    else:
        sampler = GlobalBatchSampler(
            num_samples, batch_size, seed=seed, rank=rank, world_size=world_size, start_batch=start_batch
        )
    loader = DataLoader(dataset, batch_sampler=sampler, **common)
    return Loader(loader, num_samples=num_samples, batches_per_epoch=sampler.batches_per_epoch, start_batch=start_batch)


def _encoded(
    dataset: Any,
    data_cfg: DataConfig,
    encoders: Any,
    cache_root: str | Path | None,
    buckets: Buckets | None,
    rank: int,
    world_size: int,
) -> Any:
    """``data.cache``: the source encoded once into the latent cache (data/cache.py) and read from there; the
    source itself when there is nothing to encode (no encoders, or a source already encoded)."""
    if encoders is None or not hasattr(dataset, "lazy_samples"):
        logger.info("data.cache: nothing to encode (no encoders, or the source is already encoded)")
        return dataset
    from ldmkit.data.cache import build_cache

    root = cache_root or data_cfg.cache_dir
    if root is None:
        raise UserError("data.cache is true but no cache folder is known: set data.cache_dir")
    transient = getattr(encoders, "transient", contextlib.nullcontext)
    with transient():
        dataset = build_cache(
            dataset,
            encoders,
            root,
            data_cfg,
            batch_size=data_cfg.encode_batch_size,
            accelerator=_Ranks(rank, world_size) if world_size > 1 else None,
            buckets=buckets,
        )
    if hasattr(encoders, "use_encoded_prompt"):
        encoders.use_encoded_prompt("", dataset.empty)
    return dataset


def _use_buckets(dataset: Any, buckets: Buckets, path: str) -> list[Size] | None:
    """Switch a source to bucketing: the per-sample buckets of a map-style source (None for a stream,
    which groups on its own, or a source of fixed-size samples, which cannot bucket)."""
    if getattr(dataset, "bucket_of", None) is not None:  # a bucketed latent cache
        return dataset.bucket_of
    if not hasattr(dataset, "use_buckets"):
        logger.warning("data.buckets: %s holds fixed-size samples (e.g. a feature folder); not bucketed", path)
        return None
    return dataset.use_buckets(buckets)


def _log_buckets(sampler: BucketBatchSampler) -> None:
    counts = sorted(sampler.bucket_counts.items(), key=lambda kv: -kv[1])
    logger.info(
        "data.buckets: %d buckets (width x height: samples) %s; %d samples per epoch left out (bucket remainders)",
        len(counts),
        ", ".join(f"{w}x{h}: {n}" for (w, h), n in counts),
        sampler.dropped_per_epoch,
    )
    small = [f"{w}x{h}" for (w, h), n in counts if n < sampler.global_batch]
    if small:
        logger.warning(
            "data.buckets: buckets %s hold fewer samples than one global batch (%d) and are never drawn",
            ", ".join(small),
            sampler.global_batch,
        )


def most_common_bucket(data_cfg: DataConfig, encoders: Any = None, limit: int = 1000) -> Size | None:
    """(width, height) of the bucket most samples of ``data_cfg`` fall into (of the first ``limit``
    samples of a stream); None without ``data.buckets`` or for fixed-size samples. The methods' default
    validation size when bucketing."""
    buckets = Buckets.from_config(data_cfg, encoders)
    if buckets is None:
        return None
    dataset = open_dataset(data_cfg)
    if hasattr(dataset, "use_buckets") and not isinstance(dataset, torch.utils.data.IterableDataset):
        return most_common(dataset.use_buckets(buckets))
    if not hasattr(dataset, "lazy_samples"):
        return None
    sizes = []
    for i, load in dataset.lazy_samples():
        if i >= limit:
            break
        raw = load()
        if raw is not None:
            sizes.append(buckets.assign(raw.image.size))
    return most_common(sizes)
