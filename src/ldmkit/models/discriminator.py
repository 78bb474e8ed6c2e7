"""PatchGAN discriminator for autoencoder training (plain PyTorch).

The network of pix2pix (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
Networks", the 70x70 PatchGAN) as taming-transformers' ``taming/modules/discriminator/model.py``
``NLayerDiscriminator`` builds it and LDM's autoencoders use it (Rombach et al. 2022,
``ldm/modules/losses/contperceptual.py``): ``layers`` stride-2 4x4 convolutions that double the width
(capped at 8x), one stride-1 4x4 convolution, and a 4x4 convolution to one logit per patch; LeakyReLU 0.2;
normal(0, 0.02) convolution weights and normal(1, 0.02) norm scales as taming's ``weights_init``.

``norm="batch"`` is taming's BatchNorm, here without running statistics: the discriminator only ever runs
in training mode, so they would never be used (and need no checkpoint). BatchNorm normalises over each
process's batch, so its result depends on how a batch is split over processes; ``norm="group"``
(GroupNorm, per sample) makes a run on N processes reproduce the one-process run.
"""

from __future__ import annotations

import math

from torch import Tensor, nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """``(B, in_channels, H, W)`` images in [-1, 1] -> ``(B, 1, H / 2**layers - 2, W / 2**layers - 2)`` logits."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        widths = [channels * min(2**n, 8) for n in range(layers + 1)]
        seq: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1  # the last widening convolution keeps the resolution
            # no bias before a norm layer: the norm's shift replaces it
            seq += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=False)]
            seq += [_norm(norm, widths[n]), nn.LeakyReLU(0.2)]
        seq.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    @staticmethod
    def min_size(layers: int) -> int:
        """The smallest input side that leaves at least one logit: each stride-2 layer halves the side,
        the two stride-1 4x4 convolutions (padding 1) take one pixel each."""
        return 3 * 2**layers

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)
