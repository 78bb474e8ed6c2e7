"""The global-batch sampler: N processes see exactly the batches one process would.

Per epoch e, one permutation of range(N) seeded by (seed, e), the same on every rank. The tail is
dropped so an epoch is a whole number of global batches of B*W samples; global batch g of the epoch is
``perm[g*B*W:(g+1)*B*W]`` and rank r takes its slice ``[r*B:(r+1)*B]``. So one process with batch B*W
and W processes with batch B see the same samples at every step (micro-batches of gradient
accumulation are consecutive global batches either way). Each index is paired with
``sample_seed(seed, epoch, index)``, the seed of all of that sample's randomness this epoch.

Positions count micro-batches per rank (= global batches) from the start of training, across epochs;
resuming at position p computes the permutation of epoch p // batches_per_epoch and skips without
touching any data.
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
