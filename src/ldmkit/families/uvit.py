"""ldmkit's U-ViT (models/uvit.py) in a ``UViTPipeline`` folder (pipelines/uvit.py), e.g. the export of a
``uvit`` run: one CLIP text encoder as SD1.x, the U-ViT as denoiser (it takes the UNet's call)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
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


class FlowUViTFamily(UViTFamily):
    """A U-ViT trained with the rectified-flow objective (``ldmkit quickstart --objective flow``; its unet config
    says ``objective: flow``): x_t = (1 - sigma) x_0 + sigma eps on the shifted sigmas of the folder's
    FlowMatchEulerDiscreteScheduler (its ``shift``, as SD3's folders carry theirs), the denoiser called at
    sigma * 1000 predicts the velocity eps - x_0. Everything else is the U-ViT's (text, pipeline, LoRA targets);
    its name stays "U-ViT", so U-ViT recipes (``model.family: uvit``) take it."""

    objective: ClassVar[str] = "flow"

    @classmethod
    def _noise_scheduler_class(cls) -> type:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler

    def schedule(self, prediction_type: str | None = None, resolution: int | None = None):
        """The flow of the folder's scheduler config (static ``shift``; ``flow_shift`` when the folder ships a
        multistep solver on flow sigmas instead)."""
        from ldmkit.diffusion.schedule import FLOW, Schedule

        if prediction_type not in (None, FLOW):
            raise UserError(
                f"this U-ViT predicts the flow velocity: prediction_type {prediction_type!r} does not apply"
            )
        cfg = self.noise_scheduler.config
        saved = json.loads((self.root / "scheduler" / "scheduler_config.json").read_text())
        shift = saved.get("shift", saved.get("flow_shift", cfg.shift))
        return Schedule.flow(cfg.num_train_timesteps, float(shift))


def uvit_objective(root: Path) -> str:
    """What the U-ViT of a UViTPipeline folder was trained for: its unet config's ``objective`` (U-ViTs saved
    before it existed: "diffusion")."""
    config = Path(root) / "unet" / "config.json"
    return json.loads(config.read_text()).get("objective", "diffusion") if config.is_file() else "diffusion"


def uvit_family(root: Path) -> type[UViTFamily]:
    """The family class of a UViTPipeline folder: FlowUViTFamily for a flow U-ViT, else UViTFamily."""
    return FlowUViTFamily if uvit_objective(root) == "flow" else UViTFamily
