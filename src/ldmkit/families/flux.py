"""FLUX.1 (dev, schnell): FluxTransformer2DModel, CLIP-L and T5, rectified flow, FluxPipeline.

What it shares with SD3 (the flow scheduler, the transformer passed as ``transformer=``, cached prompt and
pooled embeddings, the empty prompt as unconditional) comes from SD3Family; FLUX differs in its text
condition (T5's states alone; CLIP only pooled), in packing the latents into 2x2 patches with position ids,
in the timestep scale and in the guidance embedding of the guidance-distilled FLUX.1-dev.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ldmkit.errors import UserError
from ldmkit.families.sd3 import SD3Family

FLUX_ATTENTION = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)  # fmt: skip
"""The attention projections of the double blocks (image and text stream) and the single blocks' q, k, v."""

FLUX_LORA_TARGET_MODULES = FLUX_ATTENTION + (
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
)  # fmt: skip
"""Every linear of the transformer blocks except the AdaLN modulation (``norm*.linear``): diffusers'
examples/dreambooth/train_dreambooth_lora_flux.py targets (the double blocks' attention and MLPs, which
include the single blocks' q, k, v) plus the single blocks' MLP input ``proj_mlp`` and their fused attention /
MLP output ``proj_out`` (in BFL's layout q, k, v and proj_mlp are one linear, ``linear1``, and proj_out is
``linear2``). ``proj_out`` also names the transformer's final projection (BFL ``final_layer.linear``), which
peft's suffix match adapts with them."""

DEFAULT_GUIDANCE = 3.5
"""FluxPipeline's default ``guidance_scale``, the guidance embedding FLUX.1-dev is sampled with."""


def pack(x: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] -> 2x2 patches [B, h/2 * w/2, 4C] (pipeline_flux.py ``_pack_latents``)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack``: [B, h/2 * w/2, 4C] -> [B, C, h, w] (pipeline_flux.py ``_unpack_latents``)."""
    b, _, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids [h/2 * w/2, 3] of the packed patches: (0, row, column), as pipeline_flux.py
    ``_prepare_latent_image_ids`` (given the patch grid's height and width)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


def _config(model: torch.nn.Module):
    """The transformer's config through a DDP / accelerate wrapper (``.module``)."""
    return getattr(model, "module", model).config


class FluxFamily(SD3Family):
    """FLUX.1 (diffusers pipeline_flux.py): text condition = T5's last hidden state (512 tokens) + CLIP-L's
    pooled output; unconditional = the empty prompt's embeddings, used only for true classifier-free guidance
    (FluxPipeline's ``true_cfg_scale``) on transformers without a guidance embedding. FLUX.1-dev is
    guidance-distilled: the guidance scale is an input of the transformer (``guidance``, from ``w_emb``).

    ``lcm_lora_guidance`` is 3.5, FluxPipeline's default ``guidance_scale``: the pipeline never runs CFG on it
    (that is ``true_cfg_scale``), it only feeds the value to the guidance embedding of FLUX.1-dev (schnell
    ignores it), and 3.5 is the embedding the released model and its LoRAs are sampled with."""

    name = "FLUX"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    lora_target_modules = FLUX_LORA_TARGET_MODULES
    finetune_lora_target_modules = FLUX_ATTENTION
    exports_kohya = True  # the BFL-layout copy with fused qkv / linear1 (ldmkit.lora.flux_layout)
    lcm_lora_guidance = DEFAULT_GUIDANCE
    # FLUX.1-dev takes w as its guidance input (no CFG pair): sample w around the pipeline's 3.5 (our choice;
    # FLUX.1-dev model cards sample at 2-5). A transformer without guidance_embeds (schnell) runs CFG with w
    # in the LCM form instead, from the same range.
    lcd_w_min = 2.0
    lcd_w_max = 5.0
    pipeline_import: ClassVar[str] = "from diffusers import FluxPipeline\n"
    max_sequence_length: ClassVar[int] = 512
    _text_encoder_classes: ClassVar[tuple[str, ...]] = ("CLIPTextModel", "T5EncoderModel")
    _transformer_class: ClassVar[str] = "FluxTransformer2DModel"
    _fingerprint_tag = "flux"

    def encode_prompts(self, captions, text_encoders=None):
        """As pipeline_flux.py ``encode_prompt``: CLIP tokens padded to 77, only its pooled output used; T5
        tokens padded to ``max_sequence_length``, its last hidden state the prompt; no attention masks."""
        encoders = text_encoders or self.text_encoders
        with self._grad(encoders):
            clip = encoders[0](
                self._tokens(0, captions, self.tokenizers[0].model_max_length), output_hidden_states=False
            )
            t5 = encoders[1](self._tokens(1, captions, self.max_sequence_length), output_hidden_states=False)[0]
            return {"prompt_embeds": t5, "pooled_prompt_embeds": clip.pooler_output}  # (B, 512, D_t5), (B, D)

    def denoise(self, model, x, t, cond, w_emb=None):
        """Velocity [B, C, h, w] at latents ``x`` [B, C, h, w] and ``t`` [B] = sigma * 1000: one transformer
        call on the packed latents as pipeline_flux.py makes it (timestep / 1000, text ids zeros), unpacked.
        ``w_emb`` [B] is the guidance scale of a transformer with ``guidance_embeds`` (None: FluxPipeline's
        default 3.5); a transformer without the embedding (schnell) takes no guidance and ignores it."""
        b, _, h, w = x.shape
        if h % 2 or w % 2:
            raise UserError(f"FLUX packs 2x2 latent patches: latents of {h} x {w} need even sides (image sides / 16)")
        if _config(model).guidance_embeds:
            guidance = torch.full((b,), DEFAULT_GUIDANCE, device=x.device) if w_emb is None else w_emb
            guidance = guidance.to(x.device, torch.float32).expand(b)
        else:
            guidance = None
        prompt = cond["prompt_embeds"]
        out = model(
            hidden_states=pack(x),
            timestep=t.to(x.dtype).expand(b) / 1000,  # the pipeline's scale; the transformer multiplies by 1000
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=prompt,
            txt_ids=torch.zeros(prompt.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=image_ids(h, w, x.device, x.dtype),
            return_dict=False,
        )[0]  # (B, h/2 * w/2, 4C)
        return unpack(out, h, w)

    @property
    def pipeline_class(self) -> type:
        from diffusers import FluxPipeline

        return FluxPipeline
