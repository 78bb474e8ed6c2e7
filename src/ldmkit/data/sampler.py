"""The global-batch sampler: N processes see exactly the batches one process would.

Per epoch e, one permutation of range(N) seeded by (seed, e), the same on every rank. The tail is
dropped so an epoch is a whole number of global batches of B*W samples; global batch g of the epoch is
``perm[g*B*W:(g+1)*B*W]`` and rank r takes its slice ``[r*B:(r+1)*B]``. So one process with batch B*W
and W processes with batch B see the same samples at every step (micro-batches of gradient
accumulation are consecutive global batches either way). Each index is paired with
``sample_seed(seed, epoch, index)``, the seed of all of that sample's randomness this epoch.

Positions count micro-batches per rank (= global batches) from the start of training, across epochs;
resuming at position p computes the permutation of epoch p // batches_per_epoch and skips without
touching any data. ``BucketBatchSampler`` (``data.buckets``) does the same with global batches that each
come from one aspect-ratio bucket.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ldmkit.errors import UserError
from ldmkit.rng import sample_seed


class GlobalBatchSampler:
    """Infinite iterator of this rank's micro-batches: lists of (index, sample seed)."""

    def __init__(
        self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = num_samples // self.global_batch
        if self.batches_per_epoch == 0:
            raise UserError(
                f"the dataset has {num_samples} samples, fewer than one global batch "
                f"(batch_size {batch_size} x {world_size} processes)"
            )
        self._perm_epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64(sample_seed(self.seed, "permutation", epoch)))
            self._perm_epoch, self._perm = epoch, rng.permutation(self.num_samples)
        return self._perm

    def micro_batch(self, position: int) -> list[tuple[int, int]]:
        """This rank's (index, seed) pairs of global batch ``position`` (counted across epochs)."""
        epoch, g = divmod(position, self.batches_per_epoch)
        start = g * self.global_batch + self.rank * self.batch_size
        indices = self.permutation(epoch)[start : start + self.batch_size]
        return [(int(i), sample_seed(self.seed, epoch, int(i))) for i in indices]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start_batch
        while True:
            yield self.micro_batch(position)
            position += 1


class BucketBatchSampler(GlobalBatchSampler):
    """GlobalBatchSampler whose global batches each come from one aspect-ratio bucket (data/buckets.py).

    Per epoch e: the same permutation as GlobalBatchSampler, split by bucket (permutation order kept),
    each bucket cut into global batches of B*W samples (a bucket's remainder, fewer than B*W samples,
    is left out this epoch: the permutation decides which), and the list of global batches shuffled
    with (seed, e). Rank r takes slice ``[r*B:(r+1)*B]`` of each, so one process with batch B*W and W
    processes with batch B see the same samples at every step, no sample is on two ranks, and every
    sample is drawn at most once per epoch. The number of global batches per epoch depends only on the
    bucket sizes, so a position still maps to (epoch, batch) and resuming skips without loading data.
    """

    def __init__(
        self,
        bucket_of: list,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ):
        self.bucket_of = list(bucket_of)
        counts: dict = {}
        for b in self.bucket_of:
            counts[b] = counts.get(b, 0) + 1
        self.bucket_counts = counts
        g = batch_size * world_size
        if sum(n // g for n in counts.values()) == 0:
            raise UserError(
                f"data.buckets: no bucket holds one global batch (batch_size {batch_size} x {world_size} processes); "
                f"largest bucket: {max(counts.values())} samples"
            )
        super().__init__(
            len(self.bucket_of), batch_size, seed=seed, rank=rank, world_size=world_size, start_batch=start_batch
        )
        self.batches_per_epoch = sum(n // g for n in counts.values())
        self.dropped_per_epoch = sum(n % g for n in counts.values())
        self._batches_epoch, self._batches = -1, []

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches (index arrays of B*W samples, each from one bucket), in order."""
        if epoch != self._batches_epoch:
            groups: dict = {}
            for i in self.permutation(epoch):
                groups.setdefault(self.bucket_of[i], []).append(int(i))
            g = self.global_batch
            batches = [
                np.asarray(idx[k * g : (k + 1) * g], dtype=np.int64)
                for _, idx in sorted(groups.items())
                for k in range(len(idx) // g)
            ]
            order = np.random.Generator(np.random.PCG64(sample_seed(self.seed, "bucket-batches", epoch)))
            self._batches_epoch, self._batches = epoch, [batches[j] for j in order.permutation(len(batches))]
        return self._batches

    def micro_batch(self, position: int) -> list[tuple[int, int]]:
        epoch, g = divmod(position, self.batches_per_epoch)
        start = self.rank * self.batch_size
        indices = self.global_batches(epoch)[g][start : start + self.batch_size]
        return [(int(i), sample_seed(self.seed, epoch, int(i))) for i in indices]
