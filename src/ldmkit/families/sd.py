"""Stable Diffusion 1.x / 2.x: UNet2DConditionModel, one CLIP text encoder, StableDiffusionPipeline."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch

from ldmkit.compat import dtype_kwargs
from ldmkit.errors import UserError
from ldmkit.families.base import Family, require

log = logging.getLogger(__name__)

UNET_LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip
"""The UNet modules LCM-LoRA adapts (diffusers' examples/consistency_distillation/train_lcm_distill_lora_*.py)."""


class SDFamily(Family):
    """SD1.x/2.x: text condition = last hidden state of the CLIP text encoder (diffusers
    pipeline_stable_diffusion.py ``encode_prompt``); unconditional = the empty prompt's embedding."""

    name = "SD"
    lora_target_modules = UNET_LORA_TARGET_MODULES
    pipeline_import: ClassVar[str] = "from diffusers import StableDiffusionPipeline\n"

    def load_denoiser(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        require(self.root / "unet" / "config.json", "unet of model.pretrained")
        unet = UNet2DConditionModel.from_pretrained(
            self.root, subfolder="unet", variant=self.variant, **dtype_kwargs(dtype or self.denoiser_dtype)
        )
        log.info("loaded %s unet from %s", self.name, self.root)
        return self._frozen(unet)

    def _prompt_embeds(self, outputs: list[Any]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": outputs[0][0]}  # last_hidden_state, (B, 77, D)

    @property
    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def _pipeline_extras(self) -> dict[str, Any]:
        return dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def _without_safety_checker(self) -> dict[str, Any]:
        return self._pipeline_extras()


def check_single_text_encoder(family: Family, what: str) -> None:
    """UserError unless ``family`` conditions on one text encoder's hidden states (SD1.x-style)."""
    if len(family.text_encoder_names) != 1:
        raise UserError(f"{what} needs a single-text-encoder (SD1.x-style) model, got {family.name}")
