"""Data layer: readers, transforms, the global-batch sampler, the loader and the latent cache.

Map-style dataset protocol (folder, filelist, cache, and ldmkit.data.features follow it):

- ``__len__()``: number of samples.
- ``__getitem__((index, seed))``: the sample dict of the batch contract (docs/DESIGN.md) for sample
  ``index`` at this step. ALL of the sample's random choices (random crop, flip, which of several
  captions, caption dropout with ``proportion_empty_prompts``) come from ``random.Random(seed)``
  (``transforms.Draws.from_seed``), never from global RNG state, so a sample is identical on any number
  of processes and workers and after a resume. The dict carries ``seed`` (the int given) and ``key``
  (the sample id).
- optional ``first_readable()``: index of a readable sample, raising UserError when there is none
  (the loader calls it once at start-up).
- optional ``_skipped`` in a sample dict: how many unreadable samples were passed over to produce it;
  the loader's collate sums it and removes it from the batch (``Loader.skipped``).

The seeds come from ``GlobalBatchSampler``: ``sample_seed(train.seed, epoch, index)``.
Streamed WebDataset shards (``WdsDataset``) are iterable instead and seed samples by
``sample_seed(train.seed, epoch, key)``.

With ``data.buckets`` (data/buckets.py): map-style image readers offer ``use_buckets(buckets)``, which
assigns each index its bucket (from the image headers) and returns the list that ``BucketBatchSampler``
groups by; samples are then resized and cropped to their bucket (``target_size`` in the batch). The
latent cache stores each sample at its bucket (``CacheDataset.bucket_of``); WebDataset streams group
within their shuffle buffer.

Readers also expose ``load(index) -> RawSample`` (decoded PIL image, ALL captions, key) and
``lazy_samples()`` for tools that need every caption (the cache, ``prepare features``).
"""

from ldmkit.data.buckets import Buckets
from ldmkit.data.loader import Loader, build_loader, collate, detect_format, most_common_bucket, open_dataset
from ldmkit.data.sampler import BucketBatchSampler, GlobalBatchSampler
from ldmkit.data.transforms import Draws, ImageTransform, RawSample, SampleBuilder

__all__ = [
    "BucketBatchSampler",
    "Buckets",
    "Draws",
    "GlobalBatchSampler",
    "ImageTransform",
    "Loader",
    "RawSample",
    "SampleBuilder",
    "build_loader",
    "collate",
    "detect_format",
    "most_common_bucket",
    "open_dataset",
]
