"""Per-sample deterministic randomness.

Every random draw a method makes (noise, timesteps, guidance scales, condition dropout) comes from a
generator seeded by the sample's own seed (see docs/DESIGN.md, batch key ``seed``). The seed is a pure
function of (train.seed, epoch, sample id), so a sample gets the same noise whether the global batch
is split over 1 or 8 processes, in any worker, and after a resume. That is what lets a resumed run
equal an uninterrupted one and a 2-process run reproduce a 1-process loss curve.
"""

from __future__ import annotations

import hashlib

import torch


def sample_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from any mix of ints and strings (blake2b; Python's hash() is salted)."""
    h = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class SampleRNG:
    """One torch.Generator per sample; successive draws advance every sample's stream.

    ``stream`` separates independent uses of the same seeds (e.g. data augmentation vs. loss noise).
    """

    def __init__(self, seeds: torch.Tensor, device: torch.device | str = "cpu", stream: int = 0):
        self.device = torch.device(device)
        self.generators = []
        for s in seeds.tolist():
            g = torch.Generator(device=self.device)
            g.manual_seed(sample_seed(int(s), stream))
            self.generators.append(g)

    def __len__(self) -> int:
        return len(self.generators)

    def _stack(self, fn) -> torch.Tensor:
        return torch.stack([fn(g) for g in self.generators])

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal, shape (B, *shape)."""
        return self._stack(lambda g: torch.randn(shape, generator=g, device=self.device, dtype=dtype))

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform [0, 1), shape (B, *shape)."""
        return self._stack(lambda g: torch.rand(shape, generator=g, device=self.device, dtype=dtype))

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        """Integers in [low, high), shape (B, *shape), int64."""
        return self._stack(lambda g: torch.randint(low, high, shape, generator=g, device=self.device))
