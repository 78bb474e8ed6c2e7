"""Stable Diffusion 3 / 3.5: SD3Transformer2DModel (MMDiT), two CLIP text encoders and T5, rectified flow,
StableDiffusion3Pipeline.

The flow families (this one and flux.py) differ from the UNet ones in four places: the noise scheduler is
``FlowMatchEulerDiscreteScheduler`` (``objective = "flow"``: the denoiser predicts the velocity noise - x_0),
the denoiser is a transformer that the pipelines take as ``transformer=`` (the methods hand it over as
``unet=``, the name they use for every family's denoiser), the prompt has a T5 part (the CLIP states padded
to T5's width and followed by T5's), and the pooled CLIP embedding conditions every call. ``t`` is in the
scheduler's timestep units, sigma * num_train_timesteps, as the pipelines pass ``scheduler.timesteps``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, ClassVar

import torch

from ldmkit.compat import dtype_kwargs
from ldmkit.errors import UserError
from ldmkit.families.base import Family, require

log = logging.getLogger(__name__)

SD3_ATTENTION = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
)  # fmt: skip
"""The joint attention's image and text projections (diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py
targets) and the second, image-only attention of SD3.5's dual-attention blocks (``attn2``; absent in SD3 and
SD3.5 Large, where these names match nothing)."""

SD3_LORA_TARGET_MODULES = SD3_ATTENTION + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
"""Every linear of the joint transformer blocks except the AdaLN modulation (``norm1.linear``): the attention
projections above and both streams' MLPs."""


class SD3Family(Family):
    """SD3 / SD3.5 (diffusers pipeline_stable_diffusion_3.py): text condition = ``hidden_states[-2]`` of both
    CLIP encoders concatenated, zero-padded to T5's width and followed by T5's last hidden state (256 tokens),
    plus the pooled projections of both CLIP encoders concatenated; unconditional = the empty prompt's
    embeddings, as the pipeline's default negative prompt "". The LoRA loads in
    StableDiffusion3Pipeline.load_lora_weights (and ComfyUI, which maps diffusers' SD3 names); the kohya copy is in
    SAI's MMDiT layout for sd-scripts and Forge (ldmkit.lora.sd3_layout)."""

    name = "SD3"
    objective: ClassVar[str] = "flow"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_target_modules = SD3_LORA_TARGET_MODULES
    finetune_lora_target_modules = SD3_ATTENTION
    exports_kohya = True  # the SAI MMDiT-layout copy with fused qkv (ldmkit.lora.sd3_layout); FluxFamily: BFL's
    lcm_lora_guidance = 1.0  # StableDiffusion3Pipeline runs CFG only at guidance_scale > 1
    # LCD's w in the LCM form c + w (c - u) is the pipeline's guidance_scale - 1: [3, 8] brackets the SD3.5
    # pipelines' defaults (guidance_scale 3.5-7, i.e. w 2.5-6) with some room above (our choice: no reference
    # distils SD3 with LCD's w sampling).
    lcd_w_min = 3.0
    lcd_w_max = 8.0
    pipeline_import: ClassVar[str] = "from diffusers import StableDiffusion3Pipeline\n"
    max_sequence_length: ClassVar[int] = 256
    """T5 tokens of the prompt: the pipeline's ``max_sequence_length`` default."""
    _text_encoder_classes: ClassVar[tuple[str, ...]] = (
        "CLIPTextModelWithProjection",
        "CLIPTextModelWithProjection",
        "T5EncoderModel",
    )
    _fingerprint_tag = "sd3"

    @classmethod
    def _noise_scheduler_class(cls) -> type:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler

    def schedule(self, prediction_type: str | None = None, resolution: int | None = None):
        """The rectified-flow forward process of the folder's FlowMatchEulerDiscreteScheduler config: its static
        ``shift``, or with ``use_dynamic_shifting`` (FLUX.1-dev) the shift of ``resolution``'s token count, as
        the pipelines compute it (pipeline_flux.py / pipeline_stable_diffusion_3.py ``calculate_shift`` of
        (height / vae_scale_factor / 2) * (width / vae_scale_factor / 2) tokens, square images here)."""
        from ldmkit.diffusion.schedule import FLOW, Schedule, dynamic_shift_mu

        if prediction_type not in (None, FLOW):
            raise UserError(
                f"{self.name} predicts the flow velocity: prediction_type {prediction_type!r} does not apply"
            )
        cfg = self.noise_scheduler.config
        mu = None
        if cfg.get("use_dynamic_shifting"):
            if resolution is None:
                raise UserError(f"{self.name}'s scheduler shifts by image size: the training resolution is needed")
            mu = dynamic_shift_mu(self.image_seq_len(resolution), cfg)
        return Schedule.flow(cfg.num_train_timesteps, cfg.shift, mu)

    def image_seq_len(self, resolution: int) -> int:
        """Image tokens of a square ``resolution`` image: latents / 2 per side (2x2 patches: SD3's patch_size,
        FLUX's packing)."""
        side = resolution // 2 ** (len(self.vae_config["block_out_channels"]) - 1) // 2
        return side * side

    # ---- parts ------------------------------------------------------------------------------------
    _transformer_class: ClassVar[str] = "SD3Transformer2DModel"

    def load_denoiser(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        import diffusers

        require(self.root / "transformer" / "config.json", "transformer of model.pretrained")
        model = getattr(diffusers, self._transformer_class).from_pretrained(
            self.root, subfolder="transformer", variant=self.variant, **dtype_kwargs(dtype or self.denoiser_dtype)
        )
        log.info("loaded %s transformer from %s", self.name, self.root)
        return self._frozen(model)

    def _load_tokenizers(self) -> list[Any]:
        from transformers import CLIPTokenizer, T5TokenizerFast

        tokenizers = []
        for name, cls_name in zip(self.text_encoder_names, self._text_encoder_classes):
            tok = name.replace("text_encoder", "tokenizer")
            require(self.root / tok, f"{tok} of model.pretrained")
            cls = T5TokenizerFast if cls_name == "T5EncoderModel" else CLIPTokenizer
            tokenizers.append(cls.from_pretrained(self.root, subfolder=tok))
        return tokenizers

    def _load_text_encoders(self) -> list[torch.nn.Module]:
        import transformers

        encoders = []
        for name, cls_name in zip(self.text_encoder_names, self._text_encoder_classes):
            require(self.root / name / "config.json", f"{name} of model.pretrained")
            # .to(dtype) after loading, as base.py (transformers renamed torch_dtype -> dtype).
            te = getattr(transformers, cls_name).from_pretrained(self.root, subfolder=name, variant=self.variant)
            encoders.append(self._frozen(_keep_fp32_parts(te.to(self.text_dtype))))
        log.info("loaded %s text encoders from %s", self.name, self.root)
        return encoders

    # ---- text -------------------------------------------------------------------------------------
    text_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds", "pooled_prompt_embeds")

    def _tokens(self, i: int, captions: list[str], max_length: int) -> torch.Tensor:
        """Token ids [B, max_length] of tokenizer ``i``, padded and truncated as the pipelines do."""
        tok = self.tokenizers[i]
        ids = tok(list(captions), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        return ids.input_ids.to(self.device)

    @contextlib.contextmanager
    def _grad(self, encoders: list[torch.nn.Module]):
        """Gradients only when some text-encoder parameter requires them (a trained text encoder)."""
        wants = torch.is_grad_enabled() and any(p.requires_grad for m in encoders for p in m.parameters())
        with torch.set_grad_enabled(wants):
            yield

    def encode_prompts(
        self, captions: list[str], text_encoders: list[torch.nn.Module] | None = None
    ) -> dict[str, torch.Tensor]:
        """As pipeline_stable_diffusion_3.py ``encode_prompt`` (clip_skip None, one image per prompt): CLIP
        tokens padded to the tokenizer's 77, T5 tokens to ``max_sequence_length``, no attention masks."""
        encoders = text_encoders or self.text_encoders
        with self._grad(encoders):
            clip = []
            for i in (0, 1):
                ids = self._tokens(i, captions, self.tokenizers[i].model_max_length)
                clip.append(encoders[i](ids, output_hidden_states=True))
            t5 = encoders[2](self._tokens(2, captions, self.max_sequence_length))[0]  # (B, 256, D_t5)
            states = torch.cat([o.hidden_states[-2] for o in clip], dim=-1)  # (B, 77, D1 + D2)
            states = torch.nn.functional.pad(states, (0, t5.shape[-1] - states.shape[-1]))  # (B, 77, D_t5)
            return {
                "prompt_embeds": torch.cat([states, t5.to(states.dtype)], dim=-2),  # (B, 77 + 256, D_t5)
                "pooled_prompt_embeds": torch.cat([o[0] for o in clip], dim=-1),  # text_embeds, (B, D1 + D2)
            }

    def text(self, batch: dict[str, Any], text_encoders=None) -> dict[str, torch.Tensor]:
        """Cached ``prompt_embeds`` and ``pooled_prompt_embeds`` when present (as SDXLFamily.text), else encoded."""
        if "prompt_embeds" in batch:
            if "pooled_prompt_embeds" not in batch:
                raise UserError(
                    f"{self.name} batch has prompt_embeds but no pooled_prompt_embeds (cache built for another model?)"
                )
            return {k: batch[k].to(self.device) for k in self.text_keys}
        return self.encode_prompts(batch["captions"], text_encoders)

    # ---- the denoiser call ------------------------------------------------------------------------
    def condition(self, batch, *, resolution, fix_crop_and_size=False, text_encoders=None):
        return self.text(batch, text_encoders)

    def unconditional(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The empty prompt's embeddings (prompt and pooled), the pipelines' negative prompt ""."""
        empty = self.prompt_embeds("")
        return {k: empty[k].to(cond[k]).expand(cond[k].shape[0], *cond[k].shape[1:]) for k in self.text_keys}

    def denoise(self, model, x, t, cond, w_emb=None):
        """Velocity [B, C, h, w] at latents ``x`` [B, C, h, w] and ``t`` [B] = sigma * 1000, one transformer
        call as pipeline_stable_diffusion_3.py makes it (the timestep as is). ``w_emb`` is ignored: SD3 has no
        guidance input (classifier-free guidance contrasts two calls)."""
        return model(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    # ---- pipelines --------------------------------------------------------------------------------
    @property
    def pipeline_class(self) -> type:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def pipeline(self, *, unet, scheduler, text_encoders=None):
        """The pipeline around ``unet`` (the methods' name for the denoiser: here the transformer)."""
        text = text_encoders or self.text_encoders
        parts: dict[str, Any] = dict(vae=self.vae, transformer=unet, scheduler=scheduler)
        for i, name in enumerate(self.text_encoder_names):
            parts[name] = text[i]
            parts[name.replace("text_encoder", "tokenizer")] = self.tokenizers[i]
        return self.pipeline_class(**parts)

    def export_pipeline(self, out_dir, *, unet, safety_checker=True, **components):
        """A complete folder with ``unet`` as its transformer and the given components, the rest from disk
        (as Family.export_pipeline; these pipelines have no safety checker)."""
        from diffusers import AutoencoderKL

        if self.separate_vae and "vae" not in components:
            vae_root, vae_sub = self.vae_dir
            components["vae"] = AutoencoderKL.from_pretrained(vae_root, subfolder=vae_sub, variant=self.variant)
        pipe = self.pipeline_class.from_pretrained(self.root, transformer=unet, variant=self.variant, **components)
        pipe.save_pretrained(out_dir)


def _keep_fp32_parts(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with the modules transformers keeps in fp32 when it loads the model in fp16 put back to fp32:
    T5 v1.1 (trained in bf16) overflows in fp16 in its feed-forward output projections, which
    T5PreTrainedModel lists in ``_keep_in_fp32_modules`` (["wo"]; its forward casts their input)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if keep and next(model.parameters()).dtype == torch.float16:
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in keep:
                module.float()
    return model
