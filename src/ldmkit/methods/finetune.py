"""Fine-tuning Stable Diffusion 1.x/2.x, SDXL, SD3 and FLUX.1: the full denoiser (``finetune``) or LoRA adapters
(``lora``).

The denoising loss of diffusers' examples/text_to_image (train_text_to_image*.py), with min-SNR weights
per sample (Hang et al. 2023, arXiv:2303.09556), and no VAE / text-encoder work per step when the batch
carries cached latents and embeddings. On a rectified-flow family (SD3, FLUX.1) the loss is instead the
flow-matching loss of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py / _flux.py
(``ldmkit.diffusion.flow_loss``: the SD3 paper's timestep densities and loss weights, velocity target).

The model family (ldmkit.families) loads the VAE and text encoders only when a batch without cached
tensors needs them; validation and export load what is missing and drop it afterwards, so with cached data
the memory they take is only used for the few seconds of a validation.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ldmkit.diffusion import flow_loss
from ldmkit.diffusion.losses import diffusion_target, min_snr_weights
from ldmkit.diffusion.schedule import Schedule, dynamic_shift_mu
from ldmkit.errors import UserError
from ldmkit.families import Family, load_family
from ldmkit.methods.base import Method
from ldmkit.methods.configs import (  # noqa: F401 (the configs import without torch: --help)
    DEFAULT_TEXT_TARGETS,
    FinetuneConfig,
    LoraMethodConfig,
    _SDTrainConfig,
)
from ldmkit.methods.ema import EMA
from ldmkit.rng import SampleRNG, sample_seed

log = logging.getLogger(__name__)


class _SDMethod(Method):
    """What finetune and lora share: loading, the loss, validation images."""

    Config: type[_SDTrainConfig] = _SDTrainConfig

    @classmethod
    def check_model(cls, cfg) -> None:
        from ldmkit.methods import checks

        checks.check_denoiser_model(cfg)

    def __init__(self, cfg, accelerator):
        super().__init__(cfg, accelerator)
        m = self.mcfg
        m.check(cfg)  # also when the config was built in code rather than by load_config
        self.family: Family = load_family(
            cfg.model,
            dtype=self.weight_dtype,
            device=self.device,
            denoiser_dtype=self._unet_load_dtype(),
            text_dtype=self._text_load_dtype(),
            encode_batch_size=cfg.data.encode_batch_size,
        )
        m.resolve_flow(type(self.family))  # filled at config time unless the family was not known then
        self.is_flow = self.family.objective == "flow"
        if self.is_flow:
            self._static_schedule = self._flow_schedule_static()
            if m.guidance_scale is not None and not self.family.guidance_embedded:
                raise UserError(
                    f"method.guidance_scale feeds a guidance-distilled transformer (FLUX.1-dev), but this "
                    f"{self.family.name} transformer has no guidance embedding: unset it"
                )
        if m.prediction_type:
            self.family.noise_scheduler.register_to_config(prediction_type=m.prediction_type)
        self.unet = self.family.denoiser
        self.text_encoder_names: tuple[str, ...] = ()  # the trained ones
        if m.train_text_encoder:
            # The encoders the pipeline's LoRA loader takes: every one on SD / SDXL, the CLIP ones on SD3 / FLUX
            # (T5 stays frozen, as diffusers' dreambooth SD3 / FLUX scripts train CLIP-L and -G / CLIP-L only).
            names = self.family.text_encoder_names
            loadable = getattr(self.family.pipeline_class, "_lora_loadable_modules", None) or names
            for name, te in zip(names, self.family.text_encoders):
                if name in loadable:
                    self.text_encoder_names += (name,)
                    setattr(self, name, te)
        self.trainable_names = ("unet", *self.text_encoder_names)
        self._make_trainable()  # gradient checkpointing of trainable modules is enabled by the loop
        for name in self.trainable_names:
            getattr(self, name).train()

    # Hooks for the subclasses.
    def _unet_load_dtype(self) -> torch.dtype:
        return self.weight_dtype

    def _text_load_dtype(self) -> torch.dtype:
        return self.weight_dtype

    def _make_trainable(self) -> None:
        raise NotImplementedError

    def _dropout_seeded(self) -> bool:
        return False

    # ---- training ---------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.is_flow:
            return self._flow_loss(batch)
        m, sched = self.mcfg, self.family.noise_scheduler
        rng = SampleRNG(batch["seed"], self.device)
        # 1. x0 ~ q(z | image): cached moments or the VAE; then the per-sample noise and timestep.
        latents = self.family.latents(batch, rng)  # (B, C, h, w) fp32, scaled
        noise = rng.randn(*latents.shape[1:])  # (B, C, h, w)
        if m.noise_offset:
            noise = noise + m.noise_offset * rng.randn(latents.shape[1], 1, 1)  # (B, C, 1, 1) per channel
        model_noise = noise
        if m.input_perturbation:
            model_noise = noise + m.input_perturbation * rng.randn(*latents.shape[1:])
        t = rng.randint(0, sched.config.num_train_timesteps)  # (B,)
        # 2. z_t = alpha_t x0 + sigma_t eps.
        noisy = sched.add_noise(latents, model_noise, t)
        # 3. Conditioning: cached embeddings or the (maybe trained) text encoders.
        cond = self._condition(batch)
        # 4. Prediction vs. target, MSE in fp32, per-sample min-SNR weights.
        with self._forward_rng(batch["seed"]), self.accelerator.autocast():
            pred = self.family.denoise(self.unet, noisy, t, cond)
        target = diffusion_target(sched, latents, noise, t)
        mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        logs = {"mse": mse.detach().mean().item()}
        if m.snr_gamma:
            mse = mse * min_snr_weights(sched, t, m.snr_gamma, sched.config.prediction_type)
        return mse.mean(), logs

    def _text_encoders(self, unwrap: bool = False) -> list[torch.nn.Module] | None:
        """The family's encoders in order with the trained ones as this method holds them (accelerate-wrapped,
        or ``unwrap``-ped), None when none is trained."""
        if not self.text_encoder_names:
            return None
        return [
            (self.unwrap(getattr(self, n)) if unwrap else getattr(self, n)) if n in self.text_encoder_names else te
            for n, te in zip(self.family.text_encoder_names, self.family.text_encoders)
        ]

    def _condition(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        encoders = self._text_encoders()
        if encoders and "prompt_embeds" in batch:  # e.g. a features folder found by format: auto
            raise UserError("method.train_text_encoder needs captions, but the data gives fixed prompt_embeds")
        return self.family.condition(
            batch,
            resolution=self.cfg.data.resolution,
            fix_crop_and_size=self.mcfg.use_fix_crop_and_size,
            text_encoders=encoders,
        )

    def _flow_schedule_static(self) -> Schedule:
        """The sigmas the flow loss trains on when they do not depend on the image size: the scheduler's training
        sigmas (its static shift; unshifted on a scheduler that shifts by resolution at sampling, as diffusers'
        scripts train FLUX.1) or method.flow_shift."""
        cfg, shift = self.family.noise_scheduler.config, self.mcfg.flow_shift
        if shift is None:
            shift = 1.0 if cfg.get("use_dynamic_shifting") else cfg.shift
        return Schedule.flow(cfg.num_train_timesteps, shift).to(self.device)

    def _flow_schedule(self, latents: torch.Tensor) -> Schedule:
        """The sigmas for this batch: with method.flow_resolution_shift, shifted by its latents' token count
        (h/2 * w/2: 2x2 patches) as the pipelines' ``calculate_shift``; else the static ones."""
        if not self.mcfg.flow_resolution_shift:
            return self._static_schedule
        cfg = self.family.noise_scheduler.config
        h, w = latents.shape[-2:]
        return Schedule.flow(cfg.num_train_timesteps, mu=dynamic_shift_mu((h // 2) * (w // 2), cfg)).to(self.device)

    def _flow_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Rectified-flow matching as diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py and
        train_dreambooth_lora_flux.py (ldmkit.diffusion.flow_loss), every draw from the sample's own seed."""
        m = self.mcfg
        rng = SampleRNG(batch["seed"], self.device)
        # 1. x0 ~ q(z | image) (cached moments or the VAE; scaled and shifted) and eps ~ N(0, I).
        latents = self.family.latents(batch, rng)  # (B, C, h, w) fp32
        noise = rng.randn(*latents.shape[1:])  # (B, C, h, w)
        # 2. u ~ the weighting scheme's density, the scheduler's index floor(u T), its (shifted) sigma.
        draw = rng.randn() if flow_loss.draws_normal(m.weighting_scheme) else rng.rand()  # (B,)
        u = flow_loss.timestep_density(m.weighting_scheme, draw, m.logit_mean, m.logit_std, m.mode_scale)
        schedule = self._flow_schedule(latents)
        t = flow_loss.train_index(u, schedule.num_train_timesteps)  # (B,) ascending index
        sigma = schedule.sigma[t]  # (B,)
        # 3. x_t = (1 - sigma) x0 + sigma eps.
        noisy = schedule.add_noise(latents, noise, t)
        # 4. Conditioning: cached embeddings or the text encoders; FLUX.1-dev's guidance input.
        cond = self._condition(batch)
        guidance = None
        if self.family.guidance_embedded:
            g = flow_loss.DEFAULT_GUIDANCE if m.guidance_scale is None else m.guidance_scale
            guidance = torch.full((latents.shape[0],), g, device=self.device)
        # 5. The velocity at (x_t, sigma * T) vs. its target eps - x0: per-sample MSE times the scheme's weight.
        with self._forward_rng(batch["seed"]), self.accelerator.autocast():
            pred = self.family.denoise(self.unet, noisy, schedule.timestep(t), cond, guidance)
        mse = flow_loss.per_sample_mse(pred, flow_loss.flow_target(latents, noise))  # (B,)
        loss = flow_loss.loss_weighting(m.weighting_scheme, sigma).float() * mse
        return loss.mean(), {"mse": mse.detach().mean().item()}

    @contextlib.contextmanager
    def _forward_rng(self, seeds: torch.Tensor):
        """Dropout inside the models (LoRA dropout) draws from torch's global RNG, which cannot take
        per-sample generators; seeding it from the batch's seeds at least makes it resume-exact."""
        if not self._dropout_seeded():
            yield
            return
        with torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
            torch.manual_seed(sample_seed(*seeds.tolist()))
            yield

    # ---- validation / export ----------------------------------------------------------------------
    def _pipeline(self):
        """A stock diffusers pipeline around the in-memory UNet (+ trained text encoders), with the
        folder's own inference scheduler."""
        import diffusers

        root = self.family.root  # the resolved folder (a single file or repo id resolves to one)
        sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
        if self.mcfg.prediction_type:
            scheduler.register_to_config(prediction_type=self.mcfg.prediction_type)
        text = self._text_encoders(unwrap=True)
        pipe = self.family.pipeline(unet=self.unwrap(self.unet), scheduler=scheduler, text_encoders=text)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @contextlib.contextmanager
    def _inference_weights(self):
        """Trainable modules in eval mode (and EMA weights in finetune) for the duration."""
        modules = [self.unwrap(getattr(self, n)) for n in self.trainable_names]
        for mod in modules:
            mod.eval()
        try:
            yield
        finally:
            for mod in modules:
                mod.train()

    def validate(self, step: int):
        from ldmkit.inference import generate_images, image_grid

        prompts = self.cfg.train.validation_prompts
        if not prompts:
            return None
        # Parts not in memory (cached data) are loaded for this and dropped afterwards.
        with self.family.transient(), self._inference_weights(), torch.no_grad(), self.accelerator.autocast():
            pipe = self._pipeline()
            (width, height), steps = self.validation_size(), self.mcfg.validation_steps
            columns = [
                generate_images(
                    pipe,
                    prompts,
                    n,
                    self.mcfg.validation_guidance,
                    self.cfg.train.validation_seed,
                    height=height,
                    width=width,
                )
                for n in steps
            ]
            del pipe
        gc.collect()
        images = [columns[j][i] for i in range(len(prompts)) for j in range(len(steps))]  # prompt-major rows
        return image_grid(images, len(steps), row_labels=prompts, col_labels=[f"{n} steps" for n in steps])

    def encoders(self):
        """The family: the data layer may build a cache with it (loading the VAE / text encoders then only)."""
        return self.family

    is_lora: bool = False

    def sampling_record(self):
        """The base pipeline's own scheduler, at the validation grids' largest step count and guidance."""
        from ldmkit.inference import SamplingRecord

        m = self.mcfg
        return SamplingRecord(
            method=m.name,
            label=self.label,
            kind="lora" if self.is_lora else "pipeline",
            scheduler=None,
            steps=max(m.validation_steps),
            guidance=m.validation_guidance,
            base=self.base_reference() if self.is_lora else None,
        )


class FinetuneMethod(_SDMethod):
    """Full UNet fine-tuning (optionally the text encoders too), with an optional EMA of the UNet."""

    Config = FinetuneConfig
    label, title = "fine-tuned model", "Fine-tuned pipeline"
    tags = ("stable-diffusion", "fine-tuned")

    def _unet_load_dtype(self) -> torch.dtype:
        return torch.float32

    def _text_load_dtype(self) -> torch.dtype:
        return torch.float32 if self.mcfg.train_text_encoder else self.weight_dtype

    def _make_trainable(self) -> None:
        for name in self.trainable_names:
            getattr(self, name).requires_grad_(True)
        self.ema = None
        if self.mcfg.use_ema:
            # Tracks the UNet only, with EMAModel's default ramp, like diffusers' train_text_to_image.py.
            self.ema = EMA(self.unet.parameters(), decay=self.mcfg.ema_decay, schedule="ramp")

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.step(self.unwrap(self.unet).parameters())

    def checkpoint_objects(self) -> dict[str, Any]:
        return {"ema_unet": self.ema} if self.ema is not None else {}

    @contextlib.contextmanager
    def _inference_weights(self):
        with super()._inference_weights():
            if self.ema is None:
                yield
                return
            with self.ema.swapped_into(self.unwrap(self.unet).parameters()):
                yield

    def export(self, out_dir: Path) -> None:
        """A complete diffusers pipeline folder: the trained (EMA) UNet and text encoders, everything
        else copied from model.pretrained as stored there (not the fp16 training copies)."""
        import diffusers

        parts: dict[str, Any] = {name: self.unwrap(getattr(self, name)) for name in self.text_encoder_names}
        if self.mcfg.prediction_type:
            root = self.family.root  # the resolved folder (a single file or repo id resolves to one)
            sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
            parts["scheduler"] = getattr(diffusers, sched_cfg["_class_name"]).from_config(
                sched_cfg, prediction_type=self.mcfg.prediction_type
            )
        with self._inference_weights():
            self.family.export_pipeline(out_dir, unet=self.unwrap(self.unet), **parts)
        log.info("exported pipeline to %s", out_dir)


class LoraMethod(_SDMethod):
    """LoRA adapters (peft) on the UNet, optionally on the text encoders; the base weights stay frozen
    in the mixed-precision dtype and only the adapters are trained, in fp32."""

    Config = LoraMethodConfig
    label, title = "LoRA", "LoRA adapter"
    tags = ("lora", "stable-diffusion")
    is_lora = True

    def _dropout_seeded(self) -> bool:
        return self.mcfg.lora_dropout > 0

    def _make_trainable(self) -> None:
        from ldmkit.lora.adapters import add_trainable_adapter, seeded

        m = self.mcfg
        m.resolve_lora(type(self.family))  # targets filled at config time unless the family was not known then
        # One build site for every LoRA method; the adapters' random init comes from train.seed (one stream
        # for the UNet's and the text encoders' adapters).
        with seeded(self.cfg.train.seed):
            n = add_trainable_adapter(self.unet, m, None)
            for name in self.text_encoder_names:
                n += add_trainable_adapter(getattr(self, name), m, None, m.text_encoder_target_modules)
        log.info("%s rank %d: %d trainable parameters", m.adapter, m.lora_rank, n)

    def export(self, out_dir: Path) -> None:
        """``pytorch_lora_weights.safetensors`` for ``load_lora_weights`` and (lora, loha, lokr) a kohya copy
        ``pytorch_lora_weights_kohya.safetensors`` for A1111 / ComfyUI (ldmkit.lora.adapters.export_adapter)."""
        from ldmkit.lora.adapters import export_adapter

        models = {name: self.unwrap(getattr(self, name)) for name in self.trainable_names}
        export_adapter(out_dir, models, self.family.pipeline_class, self.mcfg.adapter, kohya=self.family.exports_kohya)
