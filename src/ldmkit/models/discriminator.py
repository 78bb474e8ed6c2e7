"""Discriminators (plain PyTorch): the PatchGAN of autoencoder training, and PCM's heads on a frozen denoiser.

PatchGAN (``PatchDiscriminator``, the ``vae`` method).

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

Feature heads (``FeatureDiscriminator``, the adversarial term of ``pcm`` / ``pcm_lora``). PCM's discriminator
(Wang et al. 2024, arXiv:2405.18407; G-U-N/Phased-Consistency-Model, code/text_to_image_sd15/
discriminator_sd15.py and code/text_to_image_sdxl/discriminator_sdxl.py) is the frozen teacher denoiser read
at the outputs of its blocks, each feature map with small trainable heads: conv-GroupNorm(32)-LeakyReLU twice
(the second with a residual) and a 1x1 convolution to one logit per position. Its two layouts:
``full`` (SD1.5 file): every down, mid and up block output, 4 heads each, 3x3 convolutions;
``light`` (SDXL file, "to save memory"): the down and mid block outputs only, 1 head each, 1x1 convolutions.
``feature_taps`` says where those outputs are in a diffusers UNet2DConditionModel and in ldmkit's U-ViT, whose
counterparts are its in-, mid- and out-block token features, the patch tokens laid out as their latent grid,
and in the flow transformers (SD3, FLUX), whose blocks' image tokens are laid out the same way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

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


class FeatureHead(nn.Module):
    """(B, C, h, w) features -> (B, 1, h, w) logits: two conv-GroupNorm-LeakyReLU layers (the second residual),
    then a 1x1 convolution; PyTorch's default initialisation, as the reference."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()

        def layer() -> nn.Sequential:
            conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
            return nn.Sequential(conv, nn.GroupNorm(math.gcd(32, channels), channels), nn.LeakyReLU())

        self.conv1, self.conv2 = layer(), layer()
        self.conv_out = nn.Conv2d(channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return self.conv_out(self.conv2(x) + x)


HEAD_LAYOUTS = {"full": (4, 3), "light": (1, 1)}
"""layout -> (heads per feature map, kernel size) of the reference's SD1.5 and SDXL discriminators."""


class FeatureDiscriminator(nn.Module):
    """The trainable part of PCM's discriminator: ``heads_per_feature`` heads on each of the feature maps of
    widths ``channels``; ``forward(features)`` gives every head's logits, feature-major."""

    def __init__(self, channels: list[int], layout: str = "full"):
        super().__init__()
        heads, kernel = HEAD_LAYOUTS[layout]
        self.heads = nn.ModuleList(nn.ModuleList(FeatureHead(c, kernel) for _ in range(heads)) for c in channels)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature maps, got {len(features)}")
        return [head(f) for f, heads in zip(features, self.heads) for head in heads]


class BottleneckClassifier(nn.Module):
    """DMD2's real/fake classifier on a denoiser's bottleneck (Yin et al. 2024, "Improved Distribution Matching
    Distillation"; tianweiy/DMD2 main/sd_guidance.py ``cls_pred_branch``): 4x4 stride-2 convolutions with
    GroupNorm(32) and SiLU until the map is at most 4 wide, a convolution over the rest to 1x1 (GroupNorm, SiLU),
    and a 1x1 convolution to one logit. For SD1.5's 8x8 mid block that is the reference's SD1.5 branch, for
    SDXL's 32x32 its SDXL branch. ``(B, channels, side, side)`` -> ``(B, 1)``."""

    def __init__(self, channels: int, side: int):
        super().__init__()
        layers: list[nn.Module] = []
        while side > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), _norm("group", channels), nn.SiLU()]
            side //= 2
        layers += [nn.Conv2d(channels, channels, side, stride=side), _norm("group", channels), nn.SiLU()]
        layers.append(nn.Conv2d(channels, 1, 1))
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x).flatten(1)  # (B, 1)


Tap = tuple[nn.Module, int, Callable[[object], Tensor]]
"""(block, width of its output, block output -> (B, C, h, w) feature map)."""


def feature_taps(model: nn.Module, layout: str) -> list[Tap]:
    """The blocks of ``model`` whose outputs the heads read, in forward order: a diffusers UNet's down blocks
    and mid block (``full``: and its up blocks), or the U-ViT's in blocks and mid block (``full``: and its out
    blocks)."""
    full = layout == "full"
    if hasattr(model, "down_blocks") and getattr(model, "mid_block", None) is not None:  # UNet2DConditionModel
        widths = list(model.config.block_out_channels)
        taps: list[Tap] = [(b, c, _first) for b, c in zip(model.down_blocks, widths)]
        taps.append((model.mid_block, widths[-1], _itself))
        if full:
            taps += [(b, c, _itself) for b, c in zip(model.up_blocks, reversed(widths))]
        return taps
    if hasattr(model, "in_blocks"):  # models/uvit.py
        cfg = model.config
        side, extras = cfg.sample_size // cfg.patch_size, model.extras

        def grid(tokens: Tensor) -> Tensor:  # (B, extras + side^2, D) -> (B, D, side, side), row-major patches
            patches = tokens[:, extras:]
            return patches.reshape(patches.shape[0], side, side, -1).permute(0, 3, 1, 2)

        blocks = [*model.in_blocks, model.mid_block, *(model.out_blocks if full else [])]
        return [(b, cfg.embed_dim, grid) for b in blocks]
    if hasattr(model, "transformer_blocks"):  # SD3Transformer2DModel, FluxTransformer2DModel
        return _transformer_taps(model, full)
    raise TypeError(
        f"no feature taps known for {type(model).__name__} (a UNet2DConditionModel, U-ViT, SD3 or FLUX transformer is)"
    )


def _transformer_taps(model: nn.Module, full: bool) -> list[Tap]:
    """An MMDiT's (SD3) or FLUX's blocks: ``light`` the middle block of the whole stack (FLUX: double blocks
    then single blocks), ``full`` every block. A transformer keeps one token grid through its depth, so it has
    no bottleneck in the UNet's sense; the middle block is where DMD2's classifier reads it (our choice: the
    reference defines its head on UNets' mid block only; half-way through the stack is its counterpart in
    depth, and the forward pass stops there). Each block returns (text states, image states) in diffusers >= 0.32; the image tokens, patches in
    row-major order (SD3's PatchEmbed, FLUX's 2x2 packing), become a square grid."""
    blocks = [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]
    cfg = model.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    chosen = blocks if full else [blocks[(len(blocks) - 1) // 2]]
    return [(b, width, _image_token_grid) for b in chosen]


def _image_token_grid(output) -> Tensor:
    """A transformer block's image tokens (B, side^2, D) -> (B, D, side, side)."""
    tokens = output[1] if isinstance(output, tuple) else output
    n = tokens.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} image tokens are not a square grid (square training images are needed here)")
    return tokens.reshape(tokens.shape[0], side, side, -1).permute(0, 3, 1, 2)


def _first(output) -> Tensor:  # a UNet down block returns (hidden_states, skip connections)
    return output[0]


def _itself(output) -> Tensor:
    return output


class _Enough(Exception):
    """Raised by the last tap: the rest of the forward pass is not needed."""


@contextlib.contextmanager
def tapped(taps: list[Tap]) -> Iterator[list[Tensor]]:
    """Collects the tapped feature maps of the forward pass run inside the block into the list it yields. The
    pass stops at the last tap (``light`` skips the up blocks, as the reference's SDXL discriminator does).

    Under gradient checkpointing (non-reentrant ``torch.utils.checkpoint``, diffusers' and the U-ViT's) the
    stop may be raised inside a checkpointed block (the U-ViT's and the transformers' blocks are checkpointed
    whole, so their hooks run inside): the checkpoint closes its region and passes the exception on, and the
    block's recomputation in the backward runs without these hooks (removed when the block ends) and matches
    the forward, the hook's own ops being views that save nothing for the backward (tests/test_dmd2_memory.py
    checks the gradients of the UNet, U-ViT, SD3 and FLUX taps with and without checkpointing)."""
    features: list[Tensor] = []

    def hook(to_map: Callable[[object], Tensor], last: bool):
        def collect(module, args, output):
            features.append(to_map(output))
            if last:
                raise _Enough

        return collect

    handles = [block.register_forward_hook(hook(f, i == len(taps) - 1)) for i, (block, _, f) in enumerate(taps)]
    try:
        yield features
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
