"""The model-family interface: what a training method needs from a teacher / base model folder.

A family object stands for one local diffusers-style folder (``model.pretrained`` + ``model.vae`` +
``model.variant``). It reads configs eagerly (cheap: the noise scheduler, the VAE config) and loads the
models LAZILY: the denoiser, the VAE and the text encoders are loaded the first time something asks for
them. So a run that trains from a latent cache never loads the VAE or the text encoders unless
validation or export needs them, and ``fingerprint()`` (the cache key) reads files only.

``Family`` implements what every latent diffusion family with an ``AutoencoderKL`` and CLIP text encoders
in diffusers' folder layout shares (loading, prompt and image encoding, the batch -> model inputs
conventions of docs/DESIGN.md); the subclasses in this package say which denoiser, which text
conditioning, which pipeline and which defaults (see docs/DESIGN.md, "Model families").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch

from ldmkit.compat import dtype_kwargs
from ldmkit.errors import UserError
from ldmkit.rng import SampleRNG

log = logging.getLogger(__name__)

_FINGERPRINT_CHUNK = 1 << 20  # bytes read at the start, middle and end of every weight file


def require(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(f"{what} not found: {path}")


def vae_location(pretrained: Path, vae: str | None) -> tuple[Path, str | None]:
    """(folder, subfolder) of the VAE: ``vae`` may be a bare VAE folder or a pipeline folder."""
    if vae is None:
        return pretrained, "vae"
    root = Path(vae)
    if (root / "config.json").exists():
        return root, None
    if (root / "vae" / "config.json").exists():
        return root, "vae"
    raise UserError(f"model.vae folder has no config.json (nor vae/config.json): {root}")


def _file_identity(path: Path) -> bytes:
    """Cheap content identity of a weight file: size, safetensors header (names, shapes, dtypes) and
    1 MiB from its start, middle and end. Any real change of weights (a fine-tune touches every
    tensor) changes it, and unlike mtimes it survives copying the folder."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        for offset in (0, max(0, size // 2 - _FINGERPRINT_CHUNK // 2), max(0, size - _FINGERPRINT_CHUNK)):
            f.seek(offset)
            h.update(f.read(_FINGERPRINT_CHUNK))
    return h.digest()


class Family:
    """One model folder of a family: lazy parts, encoders, the denoiser call, pipelines and defaults."""

    # ---- what a family declares ---------------------------------------------------------------------
    name: ClassVar[str] = ""
    """Short name for logs ("SD", "SDXL", "U-ViT", "SD3", "FLUX")."""
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    """Subfolders of the text encoders (their tokenizers: the same names with ``tokenizer``)."""
    lora_target_modules: ClassVar[tuple[str, ...]] = ()
    """Modules of the denoiser that LCM-LoRA adapts by default."""
    exports_kohya: ClassVar[bool] = True
    """Whether A1111 / ComfyUI read this denoiser's LoRA (kohya copy next to the diffusers file)."""
    finetune_lora_target_modules: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")
    """Modules a fine-tuning LoRA adapts by default: the attention projections (diffusers'
    examples/text_to_image/train_text_to_image_lora.py)."""
    lcd_w_min: ClassVar[float] = 5.0
    """LCD's default smallest guidance scale w (LCM paper sec. 5: [w_min, w_max] = [5, 15] for SD)."""
    lcd_w_max: ClassVar[float] = 15.0
    """LCD's default largest guidance scale w."""
    lcm_lora_guidance: ClassVar[float] = 1.0
    """Pipeline guidance_scale at which an LCM-LoRA samples without classifier-free guidance."""
    pcm_adv_heads: ClassVar[str] = "full"
    """PCM's discriminator layout when method.adv_heads is null (the reference's SD1.5 discriminator)."""
    pipeline_import: ClassVar[str] = ""
    """Python line that imports the pipeline class (for model cards)."""

    @classmethod
    def default_lora_targets(cls, purpose: str) -> tuple[str, ...]:
        """The modules a LoRA adapts when the config names none: ``purpose`` "distill" (LCM-LoRA and its
        successors: every module kind) or "finetune" (the attention projections)."""
        return cls.lora_target_modules if purpose == "distill" else cls.finetune_lora_target_modules

    def __init__(
        self,
        pretrained: str,
        *,
        vae: str | None = None,
        variant: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        denoiser_dtype: torch.dtype | None = None,
        text_dtype: torch.dtype | None = None,
        encode_batch_size: int = 32,
        quantize: str | None = None,
    ):
        """Check the folder and read its configs; nothing is loaded yet.

        ``dtype`` is for frozen parts; ``denoiser_dtype`` / ``text_dtype`` (default ``dtype``) let a method
        load the parts it trains in fp32 straight from disk instead of upcasting fp16 copies.
        """
        self.root = root = Path(pretrained)
        self.variant = variant
        self.dtype = dtype
        self.device = torch.device(device)
        self.denoiser_dtype = denoiser_dtype or dtype
        self.text_dtype = text_dtype or dtype
        self.quantize = quantize
        """int8 / int4: the frozen denoiser's linear weights are stored quantised (families/quantize.py)."""
        self.vae_batch_size = encode_batch_size
        """Images per VAE forward in encode_images (memory bound)."""
        require(root / "scheduler" / "scheduler_config.json", "scheduler of model.pretrained")
        # Training uses the family's forward process (DDPM's add_noise / get_velocity for diffusion
        # families), whatever sampler the folder ships for inference; its settings come from the folder's config.
        self.noise_scheduler = self._noise_scheduler_class().from_pretrained(root, subfolder="scheduler")
        self.vae_dir = vae_location(root, vae)
        self.separate_vae = vae is not None
        vae_root, vae_sub = self.vae_dir
        vae_cfg_path = vae_root / vae_sub / "config.json" if vae_sub else vae_root / "config.json"
        require(vae_cfg_path, "VAE config")
        self.vae_config: dict[str, Any] = json.loads(vae_cfg_path.read_text())
        self._parts: dict[str, Any] = {}  # "denoiser", "vae", "tokenizers", "text_encoders" once loaded
        self._prompts: dict[str, dict[str, torch.Tensor]] = {}  # encoded prompts handed over (the cache's "")

    @classmethod
    def _noise_scheduler_class(cls) -> type:
        """The scheduler class whose forward process training uses (flow families: FlowMatchEulerDiscreteScheduler)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler

    # ---- lazy parts -------------------------------------------------------------------------------
    def loaded(self, part: str) -> bool:
        """Whether ``part`` (denoiser, vae, tokenizers, text_encoders) is in memory."""
        return part in self._parts

    def _get(self, part: str, load) -> Any:
        if part not in self._parts:
            self._parts[part] = load()
        return self._parts[part]

    @contextlib.contextmanager
    def transient(self):
        """Parts first loaded inside the block are dropped at its end (validation / export / cache
        building from a run that does not need them per step); parts loaded before stay."""
        before = set(self._parts)
        try:
            yield self
        finally:
            for part in set(self._parts) - before:
                del self._parts[part]

    @property
    def denoiser(self) -> torch.nn.Module:
        """The frozen denoiser in ``denoiser_dtype`` (loaded on first use), its linear weights quantised when
        ``quantize`` says so (only this shared frozen copy: ``load_denoiser`` copies, which methods train, never)."""
        return self._get("denoiser", self._frozen_denoiser)

    def _frozen_denoiser(self) -> torch.nn.Module:
        model = self.load_denoiser(self.denoiser_dtype)
        if self.quantize:
            from ldmkit.families.quantize import quantize_weights

            quantize_weights(model, self.quantize)
        return model

    def load_denoiser(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """A fresh copy of the denoiser from disk, frozen, in eval mode, on the family's device."""
        raise NotImplementedError

    @property
    def vae(self) -> torch.nn.Module:
        return self._get("vae", self._load_vae)

    @property
    def tokenizers(self) -> list[Any]:
        return self._get("tokenizers", self._load_tokenizers)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return self._get("text_encoders", self._load_text_encoders)

    def _frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.requires_grad_(False).eval().to(self.device)

    def _load_vae(self) -> torch.nn.Module:
        """The VAE in ``dtype``, or fp32 when asked for fp16 but its config says ``force_upcast`` (the
        SDXL VAE overflows in fp16), as diffusers' pipelines do (pipeline_stable_diffusion_xl.py)."""
        from diffusers import AutoencoderKL

        vae_dtype = torch.float32 if self.dtype == torch.float16 and self.vae_config.get("force_upcast") else self.dtype
        vae_root, vae_sub = self.vae_dir
        vae = AutoencoderKL.from_pretrained(
            vae_root, subfolder=vae_sub, variant=self.variant, **dtype_kwargs(vae_dtype)
        )
        log.info("loaded %s vae from %s", self.name, vae_root)
        return self._frozen(vae)

    def _load_tokenizers(self) -> list[Any]:
        from transformers import CLIPTokenizer

        tokenizers = []
        for name in self.text_encoder_names:
            tok = name.replace("text_encoder", "tokenizer")
            require(self.root / tok, f"{tok} of model.pretrained")
            tokenizers.append(CLIPTokenizer.from_pretrained(self.root, subfolder=tok))
        return tokenizers

    def _load_text_encoders(self) -> list[torch.nn.Module]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        classes = [CLIPTextModel, CLIPTextModelWithProjection]
        encoders = []
        for i, name in enumerate(self.text_encoder_names):
            require(self.root / name / "config.json", f"{name} of model.pretrained")
            # .to(dtype) after loading: transformers renamed torch_dtype -> dtype across versions.
            te = classes[i].from_pretrained(self.root, subfolder=name, variant=self.variant)
            encoders.append(self._frozen(te.to(self.text_dtype)))
        log.info("loaded %s text encoders from %s", self.name, self.root)
        return encoders

    def text_encoder_config(self, i: int = 0) -> dict[str, Any]:
        """config.json of text encoder ``i``, read without loading it."""
        path = self.root / self.text_encoder_names[i] / "config.json"
        require(path, f"{self.text_encoder_names[i]} of model.pretrained")
        return json.loads(path.read_text())

    @property
    def vae_scale(self) -> float:
        return float(self.vae_config.get("scaling_factor", 0.18215))

    @property
    def vae_shift(self) -> float:
        """``shift_factor`` of VAEs that have one (SD3/Flux-style configs); 0 for SD and SDXL."""
        return float(self.vae_config.get("shift_factor") or 0.0)

    objective: ClassVar[str] = "diffusion"
    """What the denoiser was trained for: "diffusion" (DDPM: eps or v) or "flow" (rectified flow: velocity)."""

    @property
    def guidance_embedded(self) -> bool:
        """The denoiser takes the guidance scale as an input (FLUX.1-dev's guidance embedding): one pass per step
        and no classifier-free guidance pair; ``denoise``'s ``w_emb`` is then that scale [B]."""
        return bool(getattr(self.denoiser.config, "guidance_embeds", False))

    def schedule(self, prediction_type: str | None = None, resolution: int | None = None):
        """The forward process distillation runs on (ldmkit.diffusion.schedule.Schedule): DDPM's from the
        folder's betas and prediction type (``prediction_type`` overrides it). Flow families override this."""
        from ldmkit.diffusion.schedule import Schedule

        ptype = prediction_type or self.noise_scheduler.config.prediction_type
        return Schedule.ddpm(self.noise_scheduler.alphas_cumprod, ptype)

    # ---- text -------------------------------------------------------------------------------------
    def encode_prompts(
        self, captions: list[str], text_encoders: list[torch.nn.Module] | None = None
    ) -> dict[str, torch.Tensor]:
        """Prompt embeddings as the family's diffusers pipeline computes them (``prompt_embeds`` and the
        family's extra keys). ``text_encoders`` overrides the modules run (the accelerate-wrapped ones
        when a text encoder is trained). Gradients flow only when some text-encoder parameter requires them.
        """
        encoders = text_encoders or self.text_encoders
        with torch.set_grad_enabled(
            torch.is_grad_enabled() and any(p.requires_grad for m in encoders for p in m.parameters())
        ):
            outputs = []
            for tok, te in zip(self.tokenizers, encoders):
                ids = tok(
                    list(captions),
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
                outputs.append(te(ids.to(self.device), output_hidden_states=self._hidden_states))
        return self._prompt_embeds(outputs)

    _hidden_states: ClassVar[bool] = False

    def _prompt_embeds(self, outputs: list[Any]) -> dict[str, torch.Tensor]:
        """The text encoders' outputs -> the embeddings the denoiser is conditioned on."""
        raise NotImplementedError

    def text(
        self, batch: dict[str, Any], text_encoders: list[torch.nn.Module] | None = None
    ) -> dict[str, torch.Tensor]:
        """Text conditioning of a batch: cached ``prompt_embeds`` when present, else encoded."""
        if "prompt_embeds" in batch:
            return {"prompt_embeds": batch["prompt_embeds"].to(self.device)}
        return self.encode_prompts(batch["captions"], text_encoders)

    def use_encoded_prompt(self, caption: str, embeds: dict[str, torch.Tensor]) -> None:
        """Take the embeddings of ``caption`` from elsewhere (the data cache stores the empty prompt's,
        encoded by the same encoders: the cache key holds ``fingerprint()``), so they need no text encoder.
        ``embeds``: one sample's tensors without a batch axis, as the cache returns them."""
        self._prompts[caption] = {k: v.unsqueeze(0) for k, v in embeds.items()}

    def prompt_embeds(self, caption: str) -> dict[str, torch.Tensor]:
        """Embeddings of one caption [1, ...]: handed over by the data cache, else encoded once (the text
        encoders are loaded for it only if they are not in memory, and dropped again) and kept."""
        if caption not in self._prompts:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False), self.transient():
                self._prompts[caption] = self.encode_prompts([caption])
        return {k: v.to(self.device) for k, v in self._prompts[caption].items()}

    # ---- images -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """VAE posterior parameters (mean, logvar) [B, 2C, h, w] in fp32, unscaled, in chunks of
        ``vae_batch_size`` (diffusers ``DiagonalGaussianDistribution.parameters``)."""
        vae = self.vae
        out = []
        for chunk in pixel_values.split(self.vae_batch_size):
            x = chunk.to(self.device, vae.dtype)
            out.append(vae.encode(x).latent_dist.parameters.float())
        return torch.cat(out)

    def latents(self, batch: dict[str, Any], rng: SampleRNG) -> torch.Tensor:
        """Scaled latents (fp32): a sample of the VAE posterior, from cached ``latent_moments`` or the VAE.

        The draw uses the samples' own generators, so it matches between cached and uncached runs.
        """
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = batch.get("latent_moments")
        moments = self.encode_images(batch["pixel_values"]) if moments is None else moments.to(self.device).float()
        dist = DiagonalGaussianDistribution(moments)  # clamps logvar like the VAE does
        z = dist.mean + dist.std * rng.randn(*dist.mean.shape[1:]).to(dist.mean.device)  # (B, C, h, w)
        return (z - self.vae_shift) * self.vae_scale

    # ---- the denoiser call ------------------------------------------------------------------------
    def conditions(
        self,
        batch: dict[str, Any],
        *,
        resolution: int,
        fix_crop_and_size: bool = False,
        text_encoders: list[torch.nn.Module] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(cond, uncond) of a batch for ``denoise``: the text condition and the unconditional one
        classifier-free guidance contrasts it with."""
        cond = self.condition(
            batch, resolution=resolution, fix_crop_and_size=fix_crop_and_size, text_encoders=text_encoders
        )
        return cond, self.unconditional(cond)

    def condition(
        self,
        batch: dict[str, Any],
        *,
        resolution: int,
        fix_crop_and_size: bool = False,
        text_encoders: list[torch.nn.Module] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The conditioning ``denoise`` takes: ``prompt_embeds`` (and the family's extra keys)."""
        return {"prompt_embeds": self.text(batch, text_encoders)["prompt_embeds"]}

    def unconditional(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional counterpart of ``cond`` (default: the empty prompt's embedding, as SD1.x and
        the U-ViT were trained with caption dropout to "")."""
        b = cond["prompt_embeds"].shape[0]
        empty = self.prompt_embeds("")["prompt_embeds"].to(cond["prompt_embeds"])
        return {"prompt_embeds": empty.expand(b, -1, -1)}

    def denoise(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, torch.Tensor],
        w_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw model output of ``model`` (this family's denoiser, or a copy / LoRA of it) at (x_t, t);
        ``w_emb`` is the guidance-scale embedding of an LCM student (``timestep_cond``)."""
        return model(x, t, encoder_hidden_states=cond["prompt_embeds"], timestep_cond=w_emb).sample

    # ---- pipelines --------------------------------------------------------------------------------
    @property
    def pipeline_class(self) -> type:
        raise NotImplementedError

    def pipeline(
        self,
        *,
        unet: torch.nn.Module,
        scheduler: Any,
        text_encoders: list[torch.nn.Module] | None = None,
    ):
        """The family's inference pipeline around ``unet`` (the in-memory denoiser being trained), with
        this family's VAE, tokenizers and text encoders (or the given trained ones)."""
        text = text_encoders or self.text_encoders
        parts: dict[str, Any] = dict(vae=self.vae, unet=unet, scheduler=scheduler)
        for i, name in enumerate(self.text_encoder_names):
            parts[name] = text[i]
            parts[name.replace("text_encoder", "tokenizer")] = self.tokenizers[i]
        return self.pipeline_class(**parts, **self._pipeline_extras())

    def _pipeline_extras(self) -> dict[str, Any]:
        return {}

    def export_pipeline(
        self, out_dir: str | Path, *, unet: torch.nn.Module, safety_checker: bool = True, **components: Any
    ) -> None:
        """Write a complete pipeline folder: ``unet`` and the given components (e.g. ``scheduler``, trained
        text encoders), everything else as stored in model.pretrained (and model.vae): fp32 from disk, not
        the mixed-precision training copies. ``safety_checker=False`` leaves out a safety checker the folder has."""
        from diffusers import AutoencoderKL

        if self.separate_vae and "vae" not in components:
            vae_root, vae_sub = self.vae_dir
            components["vae"] = AutoencoderKL.from_pretrained(vae_root, subfolder=vae_sub, variant=self.variant)
        if not safety_checker:
            components.update(self._without_safety_checker())
        pipe = self._loader_class().from_pretrained(self.root, unet=unet, variant=self.variant, **components)
        pipe.save_pretrained(out_dir)

    def _loader_class(self) -> type:
        """What loads the folder with replaced components (DiffusionPipeline picks the folder's class)."""
        from diffusers import DiffusionPipeline

        return DiffusionPipeline

    def _without_safety_checker(self) -> dict[str, Any]:
        return {}

    # ---- cache key ---------------------------------------------------------------------------------
    _fingerprint_tag: ClassVar[str] = "sdxl=False"

    def fingerprint(self) -> str:
        """Identity of the VAE and text encoders (configs, weight-file contents, tokenizers, dtype), the
        key under which encoded caches are stored. Read from disk, so it works without loading models."""
        vae_root, vae_sub = self.vae_dir
        tokenizers = [self.root / n.replace("text_encoder", "tokenizer") for n in self.text_encoder_names]
        folders = [vae_root / vae_sub if vae_sub else vae_root, *(self.root / n for n in self.text_encoder_names)]
        h = hashlib.sha256(f"{self.dtype}|{self.variant}|{self._fingerprint_tag}".encode())
        for folder in folders + tokenizers:
            require(folder, "model folder part")
            for f in sorted(p for p in folder.iterdir() if p.is_file()):
                h.update(f.name.encode())
                h.update(f.read_bytes() if f.suffix in (".json", ".txt") else _file_identity(f))
        return h.hexdigest()[:16]
