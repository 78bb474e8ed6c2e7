"""ldmkit's U-ViT (models/uvit.py) in a ``UViTPipeline`` folder (pipelines/uvit.py), e.g. the export of a
``uvit`` run: one CLIP text encoder as SD1.x, the U-ViT as denoiser (it takes the UNet's call)."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch

from ldmkit.compat import dtype_kwargs
from ldmkit.errors import UserError
from ldmkit.families.base import require
from ldmkit.families.sd import SDFamily

log = logging.getLogger(__name__)

UVIT_LORA_TARGET_MODULES = ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
"""The U-ViT modules LCM-LoRA adapts: every attention and MLP projection (models/uvit.py Block), the
counterpart of the UNet list's transformer-block entries."""


class UViTFamily(SDFamily):
    """The unconditional condition is the empty prompt's embedding, as the U-ViT was trained (caption
    dropout to "", the original's CFGDataset). The LoRA loads in UViTPipeline only (no kohya copy)."""

    name = "U-ViT"
    lora_target_modules = UVIT_LORA_TARGET_MODULES
    finetune_lora_target_modules = ("attn.qkv", "attn.proj")  # the attention projections, as the UNet's
    exports_kohya = False
    pcm_adv_heads = "light"  # PCM's discriminator on the in- and mid-block tokens: "full" costs 4 3x3 heads per block
    pipeline_import: ClassVar[str] = "from ldmkit.pipelines.uvit import UViTPipeline\n"

    def load_denoiser(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        from ldmkit.models.uvit import UViT

        require(self.root / "unet" / "config.json", "unet of model.pretrained")
        model = UViT.from_pretrained(
            self.root, subfolder="unet", variant=self.variant, **dtype_kwargs(dtype or self.denoiser_dtype)
        )
        log.info("loaded %s unet from %s", self.name, self.root)
        return self._frozen(model)

    def denoise(self, model, x, t, cond, w_emb=None):
        size = model.config.sample_size
        if x.shape[-1] != size:  # the U-ViT has a fixed token grid
            raise UserError(
                f"the U-ViT takes {size}px-wide latents, got {x.shape[-1]}; set data.resolution to the teacher's"
            )
        return super().denoise(model, x, t, cond, w_emb)

    @property
    def pipeline_class(self) -> type:
        from ldmkit.pipelines.uvit import UViTPipeline

        return UViTPipeline

    def _pipeline_extras(self) -> dict[str, Any]:
        return {}

    def _loader_class(self) -> type:
        return self.pipeline_class
