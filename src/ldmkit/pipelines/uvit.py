"""Text-to-image pipeline for a U-ViT (models/uvit.py): diffusers has none, so this is ours (docs/DESIGN.md).

It follows diffusers' StableDiffusionPipeline: same component names, classifier-free guidance
``uncond + g * (cond - uncond)`` (the original U-ViT's ``cond + s * (cond - uncond)`` is g = s + 1; on a flow U-ViT
the same combination of velocities, as StableDiffusion3Pipeline), latents
divided by ``vae.config.scaling_factor`` before decoding (the exported VAE config carries the factor the
model was trained with), and for a U-ViT with ``time_cond_proj_dim`` (an LCM student) the embedding of
``guidance_scale - 1`` as ``timestep_cond`` instead of CFG.

The denoiser component is named ``unet`` although it is a transformer: code written for diffusers'
pipelines (ldmkit's generate/evaluate, LCD's ``pipe.unet.config.time_cond_proj_dim`` checks, offload
sequences) reaches the denoiser as ``pipe.unet``, and ppdiffusers' LDMTextToImageUViTPipeline, the
reference U-ViT pipeline, names it ``unet`` too. model_index.json records it as
``["ldmkit.models.uvit", "UViT"]``; diffusers imports that module when loading (a library that is not
diffusers/transformers is recorded by its full module path), so ``UViTPipeline.from_pretrained(dir)`` works
in a fresh process without ``trust_remote_code``.

LoRA: the pipeline is a diffusers ``StableDiffusionLoraLoaderMixin`` (``load_lora_weights`` /
``set_adapters`` / ``fuse_lora`` / ``unfuse_lora`` / ``unload_lora_weights`` / ``save_lora_weights``), whose
``load_lora_weights`` calls ``self.unet.load_lora_adapter`` on the U-ViT (a ``PeftAdapterMixin``); only
reading files is ldmkit's (``ldmkit.lora.formats``: U-ViT kohya names), so code written for diffusers'
pipelines (ldmkit.inference.load_lora) works unchanged.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ldmkit.diffusion.lcm import guidance_scale_embedding
from ldmkit.models.uvit import UViT


class UViTPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """vae (AutoencoderKL), text_encoder (CLIPTextModel), tokenizer (CLIPTokenizer), unet (UViT), scheduler."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UViT,
        scheduler: SchedulerMixin,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ---- LoRA: diffusers' StableDiffusionLoraLoaderMixin (set_adapters, fuse_lora, unfuse_lora,
    # unload_lora_weights, save_lora_weights are the mixin's; loading reaches unet.load_lora_adapter) --------
    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs):
        """The mixin's reader knows UNet names only, so files are read by ``ldmkit.lora.formats`` (U-ViT kohya
        names resolved against ``uvit_names``, the U-ViT's module names) and handed on as peft keys."""
        from ldmkit.lora import formats

        return_metadata = kwargs.pop("return_lora_metadata", False)
        weight_name = kwargs.pop("weight_name", None)
        uvit_names = kwargs.pop("uvit_names", None)
        source = pretrained_model_name_or_path_or_dict
        if not isinstance(source, dict):
            source = formats.load_lora_file(Path(source) / weight_name if weight_name else source)
        state_dict = formats.peft_state_dict(formats.read_lora(source, uvit_names=uvit_names))
        return (state_dict, None, None) if return_metadata else (state_dict, None)

    def load_lora_weights(
        self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = "default", **kwargs
    ) -> None:
        """The mixin's ``load_lora_weights`` (adapter ``default`` unless named); a name in use is a UserError."""
        from ldmkit.errors import UserError

        if adapter_name in getattr(self.unet, "peft_config", {}):
            raise UserError(f"the U-ViT already has a LoRA adapter named {adapter_name!r}")
        names = [n for n, _ in self.unet.named_modules()]
        super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name, uvit_names=names, **kwargs)

    def _set_timesteps(self, steps: int, device: torch.device) -> None:
        """The scheduler's timesteps for ``steps`` steps. A FlowMatch* scheduler that takes ``sigmas`` (Euler, LCM)
        gets FluxPipeline's grid, ``steps`` sigmas evenly from 1 to 1 / steps before its shift (pipeline_flux.py):
        its own default grid runs from 1 to sigma_min ~ 0, so its last step moves almost nothing (2 steps would
        sample like 1). The multistep solvers on flow sigmas space theirs evenly already; FlowMatchHeun takes none."""
        scheduler = self.scheduler
        takes_sigmas = "sigmas" in inspect.signature(scheduler.set_timesteps).parameters
        if type(scheduler).__name__.startswith("FlowMatch") and takes_sigmas:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), device=device)
        else:
            scheduler.set_timesteps(steps, device=device)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """CLIP last hidden state [B, 77, D] (what U-ViT's MS-COCO features store)."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(device))[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        return_dict: bool = True,
    ):
        """Generate images; arguments as in diffusers' StableDiffusionPipeline. Returns ImagePipelineOutput
        (``.images``: PIL list, or an array/tensor for output_type "np"/"pt", latents for "latent")."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        cfg = self.unet.config
        native = cfg.sample_size * self.vae_scale_factor
        height, width = height or native, width or native
        if (height, width) != (native, native):
            # The learned position embedding fixes the token grid.
            raise ValueError(f"this U-ViT generates {native}x{native} images only, got {height}x{width}")
        device = self._execution_device
        batch = len(prompts) * num_images_per_prompt

        # 1. Text conditions; the unconditional one is the empty prompt (U-ViT's empty_context) unless given.
        cond = self.encode_prompt(prompts, device).repeat_interleave(num_images_per_prompt, dim=0)
        timestep_cond = None
        do_cfg = guidance_scale > 1.0 and cfg.time_cond_proj_dim is None
        if cfg.time_cond_proj_dim is not None:
            w = torch.full((batch,), guidance_scale - 1.0, device=device)
            timestep_cond = guidance_scale_embedding(w, cfg.time_cond_proj_dim).to(
                cond.dtype
            )  # as the LCD student saw it
        if do_cfg:
            negative = negative_prompt if negative_prompt is not None else ""
            negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
            uncond = self.encode_prompt(negatives, device).repeat_interleave(num_images_per_prompt, dim=0)
            cond = torch.cat([uncond, cond])

        # 2. Initial noise and timesteps.
        shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=cond.dtype)
        # FlowMatch* schedulers start from unit noise and have neither init_noise_sigma nor scale_model_input.
        latents = latents.to(device=device, dtype=cond.dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        self._set_timesteps(num_inference_steps, device)
        step_params = set(inspect.signature(self.scheduler.step).parameters)
        extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in step_params}

        # 3. Denoise.
        for t in self.progress_bar(self.scheduler.timesteps):
            x = torch.cat([latents] * 2) if do_cfg else latents
            if hasattr(self.scheduler, "scale_model_input"):
                x = self.scheduler.scale_model_input(x, t)
            pred = self.unet(x, t, encoder_hidden_states=cond, timestep_cond=timestep_cond, return_dict=False)[0]
            if do_cfg:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            latents = self.scheduler.step(pred, t, latents, **extra, return_dict=False)[0]

        # 4. Decode with the factor the model was trained with.
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
