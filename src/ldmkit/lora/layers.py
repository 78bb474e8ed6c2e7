"""The in-memory LoRA every ldmkit reader and writer shares, and the file names of an export.

Its own module so that the layout writers (``export`` for SD / SDXL / U-ViT, ``flux_layout`` for FLUX) import
it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' file name: what ``pipe.load_lora_weights(dir)`` looks for."""
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
"""The kohya-format copy written next to it."""

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
"""Pipeline components a LoRA may adapt (the denoiser is "unet", or "transformer" in SD3 / FLUX pipelines)."""


@dataclass
class LoraLayer:
    """One adapted module: ``W += (alpha / rank) * up @ down``; alpha None means alpha = rank."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def folded_up(self) -> torch.Tensor:
        """``scale * up``: the same update with alpha = rank."""
        return self.up if self.scale == 1.0 else (self.up.float() * self.scale).to(self.up.dtype)


Layers = dict[str, LoraLayer]
"""``{module path inside one component: LoraLayer}``."""
