"""SDXL: UNet with added text/time conditions, two CLIP text encoders, StableDiffusionXLPipeline."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ldmkit.errors import UserError
from ldmkit.families.sd import SDFamily


class SDXLFamily(SDFamily):
    """SDXL: text condition = ``hidden_states[-2]`` of both encoders concatenated + pooled embeddings of
    the second, and the micro-conditioning ``time_ids`` (diffusers pipeline_stable_diffusion_xl.py
    ``encode_prompt`` / ``_get_add_time_ids``); unconditional = zeros (``force_zeros_for_empty_prompt``,
    as diffusers' train_lcm_distill_sdxl_wds.py)."""

    name = "SDXL"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    lcd_w_min = 3.0  # diffusers' train_lcm_distill_sdxl_wds.py default
    lcm_lora_guidance = 0.0  # SDXL pipelines skip CFG at guidance_scale <= 1; 0 as the LCM-LoRA model cards
    pcm_adv_heads = "light"  # the reference's SDXL discriminator (down and mid blocks, 1x1 heads)
    pipeline_import: ClassVar[str] = "from diffusers import StableDiffusionXLPipeline\n"
    _hidden_states = True
    _fingerprint_tag = "sdxl=True"

    def _prompt_embeds(self, outputs: list[Any]) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeds": torch.cat([o.hidden_states[-2] for o in outputs], dim=-1),  # (B, 77, D1 + D2)
            "pooled_prompt_embeds": outputs[-1][0],  # text_embeds of the last encoder, (B, D2)
        }

    def text(self, batch: dict[str, Any], text_encoders=None) -> dict[str, torch.Tensor]:
        if "prompt_embeds" in batch:
            if "pooled_prompt_embeds" not in batch:
                raise UserError(
                    "SDXL batch has prompt_embeds but no pooled_prompt_embeds (cache built for another model?)"
                )
            return {k: batch[k].to(self.device) for k in ("prompt_embeds", "pooled_prompt_embeds")}
        return self.encode_prompts(batch["captions"], text_encoders)

    def add_time_ids(self, batch: dict[str, Any], resolution: int, fix_crop_and_size: bool = False) -> torch.Tensor:
        """Micro-conditioning [B, 6] = (orig_h, orig_w, crop_top, crop_left, target_h, target_w), per sample.

        ``original_size`` is (height, width) as diffusers' ``_get_add_time_ids`` expects (diffusers'
        train_text_to_image_sdxl.py once sent (width, height), a bug). The target is the sample's
        ``target_size`` (its aspect-ratio bucket with data.buckets; SDXL paper sec. 2.3 conditions on the
        bucket's size), else (res, res). ``fix_crop_and_size`` gives (h, w, 0, 0, h, w) of that target.
        """
        n = len(batch["seed"])
        target = batch.get("target_size")
        target = torch.tensor([[resolution, resolution]] * n) if target is None else target.cpu().reshape(n, 2)
        if fix_crop_and_size:
            ids = torch.cat([target, torch.zeros(n, 2, dtype=target.dtype), target], dim=1)
        else:
            ids = torch.cat([batch["original_size"].cpu(), batch["crop_top_left"].cpu(), target], dim=1)
        return ids.to(self.device, torch.float32)

    def condition(self, batch, *, resolution, fix_crop_and_size=False, text_encoders=None):
        text = self.text(batch, text_encoders)
        return {
            "prompt_embeds": text["prompt_embeds"],
            "pooled_prompt_embeds": text["pooled_prompt_embeds"],
            "time_ids": self.add_time_ids(batch, resolution, fix_crop_and_size),
        }

    def unconditional(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeds": torch.zeros_like(cond["prompt_embeds"]),
            "pooled_prompt_embeds": torch.zeros_like(cond["pooled_prompt_embeds"]),
            "time_ids": cond["time_ids"],
        }

    def denoise(self, model, x, t, cond, w_emb=None):
        added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["time_ids"]}
        return model(
            x, t, encoder_hidden_states=cond["prompt_embeds"], timestep_cond=w_emb, added_cond_kwargs=added
        ).sample

    @property
    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def _pipeline_extras(self) -> dict[str, Any]:
        return {}
