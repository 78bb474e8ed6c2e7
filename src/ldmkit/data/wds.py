"""WebDataset tar shards as a streamed (iterable) dataset.

Shards: a local ``.tar``, a folder of ``*.tar``, a brace pattern ``data/{000..009}.tar``, ``a.tar::b.tar``,
remote URLs (opened with ``fsspec.open``: http(s) needs aiohttp, s3 needs s3fs, ...), or ``pipe:cmd``
URLs, which run a shell command and are refused unless ``data.allow_shell`` is true.

A sample is the files of one key, adjacent in the tar (``{key}.jpg|png|jpeg|webp`` + ``{key}.txt`` or
``.caption`` (one caption per non-empty line) or ``.json`` (field ``data.caption_column``, ``caption``
or ``text``)). Tar members are read and grouped with webdataset's ``tar_file_expander`` and
``group_by_keys``. Since webdataset 0.2.96 the expander yields an empty dict ``{}`` at the end of each
shard; anything without a ``__key__`` is dropped here too (webdataset >= 0.2.96 yields an empty dict at the end of each shard: diffusers' LCD scripts
crash on it with ``KeyError: 'fname'``).

Splitting. Processes x workers form U = world_size * num_workers units; unit u = rank * num_workers + w.
Per epoch e the shard list is shuffled with (seed, e) (the same order everywhere) and unit u reads
shards ``[u::U]``: every sample once per epoch, no duplicates. With fewer shards than units, or with
``max_samples``, every unit reads all shards and keeps the samples with ``position % U == u``.
Each unit shuffles through a buffer of ``data.shuffle_buffer`` samples seeded by (seed, e, u).
A sample's seed is ``sample_seed(seed, e, key)``.

Buckets (``data.buckets``, data/buckets.py). Bucketing happens within the shuffle buffer: each unit
reads the image header of every sample leaving its buffer, keeps one pending list per bucket, and emits
a bucket's list as soon as it holds ``batch_size`` samples, so the DataLoader's batches of that worker
are single-bucket. Lists still pending at the end of an epoch are dropped (fewer than a batch each).
Resume skips whole emitted batches without decoding, as above.

Resume. The DataLoader takes batch i from worker i % num_workers, so global micro-batch g comes from
the unit with w = g % num_workers. A loader started at position p lets worker w play role
(w + p) % num_workers and skips that role's samples of the batches before p: the stream continues
exactly where it stopped. Skipped samples are read but not decoded; if unreadable samples occurred
before p, the continuation is shifted by their number.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from ldmkit.data import rows
from ldmkit.data.buckets import Buckets, Size, header_size
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
from ldmkit.rng import sample_seed

if TYPE_CHECKING:
    from ldmkit.config import DataConfig

logger = logging.getLogger(__name__)


def _is_url(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def expand_shards(path: str, allow_shell: bool = False) -> list[str]:
    """The shard list of ``data.path``; UserError for ``pipe:`` without opt-in or no shards."""
    local = Path(path).expanduser()
    if not _is_url(path) and not path.startswith("pipe:") and local.is_dir():
        urls = sorted(str(p) for p in local.glob("*.tar"))
    else:
        urls = expand_urls(path)
    if not urls:
        raise UserError(f"no WebDataset shards (*.tar) at {path}")
    if any(u.startswith("pipe:") for u in urls) and not allow_shell:
        raise UserError(
            f"data.path {path} is a 'pipe:' URL, which runs a shell command; set data.allow_shell: true to allow it"
        )
    for u in urls:
        if not _is_url(u) and not u.startswith("pipe:") and not Path(u.removeprefix("file://")).is_file():
            raise UserError(f"WebDataset shard {u} does not exist")
    return urls


def open_shard(url: str) -> IO[bytes]:
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen  # runs the command through a shell (allow_shell checked before)

        return gopen(url, "rb")
    if _is_url(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


def _log_and_continue(exn: Exception) -> bool:
    logger.warning("WebDataset read error, skipping the rest of the shard: %s", exn)
    return True


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard: dicts of ``__key__`` and extension -> bytes."""
    try:
        stream = open_shard(url)
    except (OSError, ImportError, ValueError) as e:
        logger.warning("cannot open shard %s: %s", url, e)
        return
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=_log_and_continue)
        for sample in group_by_keys(files, handler=_log_and_continue):
            if "__key__" in sample:  # drop the {} end-of-shard marker of webdataset >= 0.2.96
                yield sample
    finally:
        stream.close()


def count_samples(urls: list[str]) -> int:
    """Keys with an image in all shards (local tars: headers only; others are streamed once)."""
    total = 0
    for url in urls:
        if _is_url(url) or url.startswith("pipe:"):
            total += sum(any(e in s for e in IMAGE_EXTENSIONS) for s in iter_shard(url))
            continue
        try:
            with tarfile.open(url.removeprefix("file://")) as tf:
                names = [m.name for m in tf if m.isreg()]
        except (OSError, tarfile.TarError) as e:
            logger.warning("cannot read shard %s: %s", url, e)
            continue
        last, has_image = None, False
        for name in names:
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            if key != last:
                total += has_image
                last, has_image = key, False
            has_image |= ext.lower() in IMAGE_EXTENSIONS
        total += has_image
    return total


def decode_sample(raw: dict[str, Any], caption_column: str = "text") -> RawSample:
    """RawSample of a webdataset sample; raises a DECODE_ERROR when there is no readable image."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        raise ValueError(f"sample {raw['__key__']} has no image ({'/'.join(IMAGE_EXTENSIONS)})")
    captions, replaced = [""], False
    if "txt" in raw or "caption" in raw:
        text, replaced = decode_text(raw.get("txt", raw.get("caption")))
        captions = split_captions(text)
    elif "json" in raw:
        where = f"sample {raw['__key__']}.json"
        meta = rows.record(json.loads(raw["json"]), where)
        col = next((c for c in (caption_column, "caption", "text") if c in meta), None)
        captions = rows.captions(meta[col], where, col) if col else [""]
    return RawSample(decode_image(raw[ext]), captions, raw["__key__"], replaced_captions=replaced)


class WdsDataset(IterableDataset):
    """Infinite stream of batch-contract samples of this rank's share; see the module docstring."""

    def __init__(
        self,
        path: str,
        cfg: DataConfig,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        start_batch: int = 0,
    ):
        self.path = path
        self.urls = expand_shards(path, cfg.allow_shell)
        self.builder = SampleBuilder.from_config(cfg)
        self.caption_column = cfg.caption_column
        self.shuffle_buffer = cfg.shuffle_buffer
        self.max_samples = cfg.max_samples
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size, self.start_batch = batch_size, start_batch
        self.buckets: Buckets | None = None

    def use_buckets(self, buckets: Buckets) -> None:
        """Emit single-bucket runs of ``batch_size`` samples (see the module docstring)."""
        self.buckets = buckets

    def files(self) -> list[str]:
        return list(self.urls)

    def count(self) -> int:
        n = count_samples(self.urls)
        return n if self.max_samples is None else min(n, self.max_samples)

    def _unit_raw(self, unit: int, num_units: int, epoch: int) -> Iterator[dict[str, Any]]:
        urls = list(self.urls)
        if self.max_samples is None:
            random.Random(sample_seed(self.seed, "shards", epoch)).shuffle(urls)
        if self.max_samples is None and len(urls) >= num_units:
            for url in urls[unit::num_units]:
                yield from iter_shard(url)
            return
        position = 0
        for url in urls:
            for raw in iter_shard(url):
                if self.max_samples is not None and position >= self.max_samples:
                    return
                if position % num_units == unit:
                    yield raw
                position += 1

    def _shuffled(self, stream: Iterator[Any], rng: random.Random) -> Iterator[Any]:
        k, buf = self.shuffle_buffer, []
        for x in stream:
            if len(buf) < max(k, 1):
                buf.append(x)
                continue
            j = rng.randrange(len(buf))
            yield buf[j]
            buf[j] = x
        rng.shuffle(buf)
        yield from buf

    def iter_unit(
        self, unit: int, num_units: int, skip: int = 0, epochs: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Samples of one unit: forever (or ``epochs`` epochs), after skipping ``skip`` of them."""
        if len(self.urls) < num_units or self.max_samples is not None:
            logger.info(
                "%d shards for %d loader units: every unit reads all shards and keeps its share",
                len(self.urls),
                num_units,
            )
        epoch, unreadable = 0, 0
        while epochs is None or epoch < epochs:
            rng = random.Random(sample_seed(self.seed, "shuffle", epoch, unit))
            yielded, skipping = 0, skip > 0
            stream = self._shuffled(self._unit_raw(unit, num_units, epoch), rng)
            if self.buckets is not None:
                left = [skip]
                for decoded, size, lost in self._bucket_runs(stream, left):
                    unreadable += lost
                    sample = self.builder(decoded, sample_seed(self.seed, epoch, decoded.key), size)
                    if unreadable:
                        sample["_skipped"], unreadable = unreadable, 0
                    yielded += 1
                    yield sample
                if not yielded and not skipping:
                    raise UserError(
                        f"no bucket of loader unit {unit} of {num_units} in {self.path} collected "
                        f"{self.batch_size} readable samples (data.buckets; fewer samples per bucket than the batch size?)"
                    )
                epoch, skip = epoch + 1, left[0]
                continue
            for raw in stream:
                if skip:
                    skip -= 1
                    continue
                decoded = self._try_decode(raw)
                if decoded is None:
                    unreadable += 1
                    continue
                sample = self.builder(decoded, sample_seed(self.seed, epoch, decoded.key))
                if unreadable:
                    sample["_skipped"], unreadable = unreadable, 0
                yielded += 1
                yield sample
            if not yielded and not skipping:
                raise UserError(
                    f"no readable samples for loader unit {unit} of {num_units} in {self.path} "
                    "(fewer samples than processes x workers, or unreadable shards)"
                )
            epoch += 1

    def _bucket_runs(self, stream: Iterator[dict[str, Any]], skip: list[int]) -> Iterator[tuple[RawSample, Size, int]]:
        """(decoded sample, its bucket, unreadable samples dropped before it) in runs of ``batch_size``
        of one bucket; the first ``skip[0]`` samples (whole runs) are passed over without decoding, and
        ``skip[0]`` is left at what remains to skip (in the next epoch)."""
        pending: dict[Size, list[tuple[dict[str, Any], RawSample | None]]] = {}
        lost = 0
        for raw in stream:
            ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
            size = header_size(raw[ext]) if ext is not None else None
            if size is None:
                lost += 1
                continue
            bucket = self.buckets.assign(size)
            run = pending.setdefault(bucket, [])
            run.append((raw, None))
            if len(run) < self.batch_size:
                continue
            if skip[0] >= len(run):
                skip[0] -= len(run)
                del pending[bucket]
                continue
            decoded = [(r, d if d is not None else self._try_decode(r)) for r, d in run]
            good = [(r, d) for r, d in decoded if d is not None]
            lost += len(decoded) - len(good)
            if len(good) < self.batch_size:  # a header read but the image did not decode: wait for more
                pending[bucket] = good
                continue
            del pending[bucket]
            for _, d in good:
                yield d, bucket, lost
                lost = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        role = (worker + self.start_batch) % workers
        batches_before = max(0, -(-(self.start_batch - role) // workers))
        return self.iter_unit(
            self.rank * workers + role, self.world_size * workers, skip=batches_before * self.batch_size
        )

    def lazy_samples(self) -> Iterator[tuple[int, Callable[[], RawSample | None]]]:
        """(position, load) for all samples in shard order (no shuffle, no split); load() decodes,
        None if unreadable. Positions not loaded are read but never decoded (cache building)."""
        position = 0
        for url in self.urls:
            for raw in iter_shard(url):
                if self.max_samples is not None and position >= self.max_samples:
                    return
                yield position, functools.partial(self._try_decode, raw)
                position += 1

    def _try_decode(self, raw: dict[str, Any]) -> RawSample | None:
        try:
            return decode_sample(raw, self.caption_column)
        except DECODE_ERRORS as e:
            logger.debug("unreadable sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"), e)
            return None

    def first_readable(self) -> int:
        """Position of the first readable sample; UserError when there is none."""
        for i, load in self.lazy_samples():
            if load() is not None:
                return i
        raise UserError(f"no readable samples in {self.path}")
