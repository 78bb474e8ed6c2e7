"""SDModels: the Stable Diffusion 1.x/2.x and SDXL components every SD method uses.

Loads a local diffusers folder, encodes prompts (the conventions of diffusers' StableDiffusion(XL)
pipelines' ``encode_prompt``) and images (VAE posterior moments), and turns a batch into model inputs
from cached tensors when the batch has them (docs/DESIGN.md, batch contract), so methods never branch
on the data source.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ldmkit.compat import dtype_kwargs
from ldmkit.errors import UserError
from ldmkit.rng import SampleRNG

log = logging.getLogger(__name__)

_FINGERPRINT_CHUNK = 1 << 20  # bytes read at the start, middle and end of every weight file


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(f"{what} not found: {path}")


def _vae_location(pretrained: Path, vae: str | None) -> tuple[Path, str | None]:
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


class SDModels:
    """UNet, VAE, text encoders, tokenizers and the DDPM training scheduler of one SD/SDXL folder."""

    def __init__(self) -> None:
        self.is_sdxl = False
        self.unet: Any = None
        self.vae: Any = None
        self.text_encoders: list[Any] = []
        self.tokenizers: list[Any] = []
        self.noise_scheduler: Any = None
        self.vae_batch_size = 32
        """Images per VAE forward in encode_images (memory bound)."""
        self._vae_dir: tuple[Path, str | None] | None = None
        self._text_dirs: list[Path] = []
        self._vae_config: dict[str, Any] = {}
        self._dtype = torch.float32
        self._device = torch.device("cpu")
        self._variant: str | None = None

    @classmethod
    def load(
        cls,
        pretrained: str,
        *,
        vae: str | None = None,
        variant: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        unet: bool = True,
        vae_model: bool = True,
        text: bool = True,
        unet_dtype: torch.dtype | None = None,
        text_dtype: torch.dtype | None = None,
    ) -> SDModels:
        """Load the parts asked for from a local diffusers folder; everything frozen and in eval mode.

        ``dtype`` is for frozen parts; ``unet_dtype`` / ``text_dtype`` (default ``dtype``) let a method
        load the parts it trains in fp32 straight from disk instead of upcasting fp16 copies.

        The VAE is kept in fp32 when asked for fp16 but its config says ``force_upcast`` (the SDXL VAE
        overflows in fp16, REFERENCE.md sec 1), as diffusers' pipelines do.
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        if not pretrained:
            raise UserError("model.pretrained is empty: set it to a local diffusers model folder")
        root = Path(pretrained)
        if not root.is_dir():
            raise UserError(f"model.pretrained folder not found: {root}")
        _require(root / "model_index.json", "model_index.json of model.pretrained")
        index = json.loads((root / "model_index.json").read_text())

        self = cls()
        self.is_sdxl = (index.get("text_encoder_2") or [None])[0] is not None
        self._dtype, self._device, self._variant = dtype, torch.device(device), variant
        names = ["text_encoder", "text_encoder_2"] if self.is_sdxl else ["text_encoder"]
        self._text_dirs = [root / n for n in names] + [root / n.replace("text_encoder", "tokenizer") for n in names]
        self._vae_dir = _vae_location(root, vae)

        _require(root / "scheduler" / "scheduler_config.json", "scheduler of model.pretrained")
        # Training always uses DDPM's forward process (add_noise, get_velocity), whatever sampler the
        # folder ships for inference; the betas and prediction_type come from the folder's config.
        self.noise_scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")

        vae_root, vae_sub = self._vae_dir
        vae_cfg_path = vae_root / vae_sub / "config.json" if vae_sub else vae_root / "config.json"
        _require(vae_cfg_path, "VAE config")
        self._vae_config = json.loads(vae_cfg_path.read_text())

        if unet:
            _require(root / "unet" / "config.json", "unet of model.pretrained")
            self.unet = UNet2DConditionModel.from_pretrained(
                root, subfolder="unet", variant=variant, **dtype_kwargs(unet_dtype or dtype)
            )
        if vae_model:
            vae_dtype = torch.float32 if dtype == torch.float16 and self._vae_config.get("force_upcast") else dtype
            self.vae = AutoencoderKL.from_pretrained(
                vae_root, subfolder=vae_sub, variant=variant, **dtype_kwargs(vae_dtype)
            )
        if text:
            classes = [CLIPTextModel, CLIPTextModelWithProjection]
            for i, name in enumerate(names):
                _require(root / name / "config.json", f"{name} of model.pretrained")
                tok = name.replace("text_encoder", "tokenizer")
                _require(root / tok, f"{tok} of model.pretrained")
                self.tokenizers.append(CLIPTokenizer.from_pretrained(root, subfolder=tok))
                # .to(dtype) after loading: transformers renamed torch_dtype -> dtype across versions.
                te = classes[i].from_pretrained(root, subfolder=name, variant=variant)
                self.text_encoders.append(te.to(text_dtype or dtype))
        for m in self.modules():
            m.requires_grad_(False).eval().to(self._device)
        log.info(
            "loaded %s from %s (unet=%s vae=%s text=%s)", "SDXL" if self.is_sdxl else "SD", root, unet, vae_model, text
        )
        return self

    @classmethod
    def lazy_encoders(
        cls,
        pretrained: str,
        *,
        vae: str | None = None,
        variant: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        batch_size: int = 32,
    ):
        """VAE + text encoders for the data cache, loaded only if something must be encoded.

        The cache key needs just ``fingerprint()``, which reads files; so training from a finished
        cache (and every resume) never loads the VAE or the text encoders.
        """
        from ldmkit.data.cache import LazyEncoders

        probe = cls.load(
            pretrained, vae=vae, variant=variant, dtype=dtype, device=device, unet=False, vae_model=False, text=False
        )

        def load() -> SDModels:
            enc = cls.load(pretrained, vae=vae, variant=variant, dtype=dtype, device=device, unet=False)
            enc.vae_batch_size = batch_size
            return enc

        return LazyEncoders(probe.fingerprint, load)

    def modules(self) -> list[torch.nn.Module]:
        """The loaded torch modules."""
        return [m for m in [self.unet, self.vae, *self.text_encoders] if m is not None]

    @property
    def vae_scale(self) -> float:
        return float(self._vae_config.get("scaling_factor", 0.18215))

    @property
    def vae_shift(self) -> float:
        """``shift_factor`` of VAEs that have one (SD3/Flux-style configs); 0 for SD and SDXL."""
        return float(self._vae_config.get("shift_factor") or 0.0)

    # ---- text -------------------------------------------------------------------------------------
    def encode_prompts(
        self, captions: list[str], text_encoders: list[torch.nn.Module] | None = None
    ) -> dict[str, torch.Tensor]:
        """Prompt embeddings as the diffusers pipelines compute them.

        SD1.x/2.x: last hidden state of text_encoder. SDXL: ``hidden_states[-2]`` of both encoders
        concatenated on the feature axis, plus ``pooled_prompt_embeds`` = text_embeds of text_encoder_2
        (diffusers pipeline_stable_diffusion_xl.py ``encode_prompt``). ``text_encoders`` overrides the
        modules run (the accelerate-wrapped ones when a text encoder is trained). Gradients flow only
        when some text-encoder parameter requires them.
        """
        encoders = text_encoders or self.text_encoders
        if not encoders:
            raise RuntimeError("text encoders were not loaded (SDModels.load(text=False))")
        with torch.set_grad_enabled(
            torch.is_grad_enabled() and any(p.requires_grad for m in encoders for p in m.parameters())
        ):
            embeds, pooled = [], None
            for tok, te in zip(self.tokenizers, encoders):
                ids = tok(
                    list(captions),
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
                out = te(ids.to(self._device), output_hidden_states=self.is_sdxl)
                if self.is_sdxl:
                    embeds.append(out.hidden_states[-2])  # (B, 77, D_i)
                    pooled = out[0]  # text_embeds of the last encoder, (B, D2)
                else:
                    embeds.append(out[0])  # last_hidden_state, (B, 77, D)
        result = {"prompt_embeds": torch.cat(embeds, dim=-1)}
        if self.is_sdxl:
            result["pooled_prompt_embeds"] = pooled
        return result

    def text(
        self, batch: dict[str, Any], text_encoders: list[torch.nn.Module] | None = None
    ) -> dict[str, torch.Tensor]:
        """Text conditioning of a batch: cached ``prompt_embeds`` (+ pooled) when present, else encoded."""
        if "prompt_embeds" in batch:
            result = {"prompt_embeds": batch["prompt_embeds"].to(self._device)}
            if self.is_sdxl:
                if "pooled_prompt_embeds" not in batch:
                    raise UserError(
                        "SDXL batch has prompt_embeds but no pooled_prompt_embeds (cache built for another model?)"
                    )
                result["pooled_prompt_embeds"] = batch["pooled_prompt_embeds"].to(self._device)
            return result
        return self.encode_prompts(batch["captions"], text_encoders)

    # ---- images -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """VAE posterior parameters (mean, logvar) [B, 2C, h, w] in fp32, unscaled, in chunks of
        ``vae_batch_size`` (diffusers ``DiagonalGaussianDistribution.parameters``)."""
        if self.vae is None:
            raise RuntimeError("VAE was not loaded (SDModels.load(vae_model=False))")
        out = []
        for chunk in pixel_values.split(self.vae_batch_size):
            x = chunk.to(self._device, self.vae.dtype)
            out.append(self.vae.encode(x).latent_dist.parameters.float())
        return torch.cat(out)

    def latents(self, batch: dict[str, Any], rng: SampleRNG) -> torch.Tensor:
        """Scaled latents (fp32): a sample of the VAE posterior, from cached ``latent_moments`` or the VAE.

        The draw uses the samples' own generators, so it matches between cached and uncached runs.
        """
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = batch.get("latent_moments")
        moments = self.encode_images(batch["pixel_values"]) if moments is None else moments.to(self._device).float()
        dist = DiagonalGaussianDistribution(moments)  # clamps logvar like the VAE does
        z = dist.mean + dist.std * rng.randn(*dist.mean.shape[1:]).to(dist.mean.device)  # (B, C, h, w)
        return (z - self.vae_shift) * self.vae_scale

    def add_time_ids(self, batch: dict[str, Any], resolution: int, fix_crop_and_size: bool = False) -> torch.Tensor:
        """SDXL micro-conditioning [B, 6] = (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

        ``original_size`` is (height, width): one reference script sends (width, height), a bug
        (REFERENCE.md sec 1). ``fix_crop_and_size`` gives (res, res, 0, 0, res, res) for every sample.
        """
        n = len(batch["seed"])
        if fix_crop_and_size:
            ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * n)
        else:
            target = torch.tensor([[resolution, resolution]] * n)
            ids = torch.cat([batch["original_size"].cpu(), batch["crop_top_left"].cpu(), target], dim=1)
        return ids.to(self._device, torch.float32)

    def fingerprint(self) -> str:
        """Identity of the VAE and text encoders (configs, weight-file contents, tokenizers, dtype), the
        key under which encoded caches are stored. Read from disk, so it works without loading models."""
        if self._vae_dir is None:
            raise RuntimeError("fingerprint() of an SDModels that was not loaded")
        vae_root, vae_sub = self._vae_dir
        folders = [vae_root / vae_sub if vae_sub else vae_root, *self._text_dirs]
        h = hashlib.sha256(f"{self._dtype}|{self._variant}|sdxl={self.is_sdxl}".encode())
        for folder in folders:
            _require(folder, "model folder part")
            for f in sorted(p for p in folder.iterdir() if p.is_file()):
                h.update(f.name.encode())
                h.update(f.read_bytes() if f.suffix in (".json", ".txt") else _file_identity(f))
        return h.hexdigest()[:16]

    def to(self, device: torch.device | str) -> SDModels:
        self._device = torch.device(device)
        for m in self.modules():
            m.to(self._device)
        return self
