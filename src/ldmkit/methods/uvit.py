"""``uvit``: train a text-to-image U-ViT from scratch in the latent space of a frozen VAE (Bao et al.,
"All are Worth Words", CVPR 2023; baofff/U-ViT ``train_t2i_discrete.py``).

Loss: epsilon (or v) MSE under SD's scaled-linear DDPM schedule; t ~ U{0..999} in diffusers' convention
(the original's 1..1000 is converted inside the model, see models/uvit.py). Latents are sampled from the
VAE posterior (cached moments or the VAE) and multiplied by ``scale_factor``; the exported VAE config
carries that same factor, so decoding divides by exactly what training multiplied by.

With ``prediction_type: flow`` the same network learns the rectified flow instead (SD3's objective: Esser et
al. 2024, arXiv:2403.03206, eq. 1-3 and section 3.1): x_t = (1 - sigma) x_0 + sigma eps on sigmas shifted by
``flow_shift``, drawn by the SD3 paper's densities (diffusion/flow_loss.py, the helpers the SD3 / FLUX fine-tuning
uses), target the velocity eps - x_0, timestep input sigma * 1000; the export is a flow U-ViT (``objective: flow``
in its unet config) with a FlowMatchEulerDiscreteScheduler of that shift.

Classifier-free guidance dropout is the data layer's ``proportion_empty_prompts`` (the dropped caption
becomes "" and cached text becomes ``empty_context``, as the original's CFGDataset does): ``p_uncond`` is
copied into it when the config is resolved, so --dry-run and config.yaml show the value in effect.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from ldmkit.diffusion import flow_loss
from ldmkit.diffusion.losses import diffusion_target, min_snr_weights
from ldmkit.diffusion.schedule import FLOW, Schedule
from ldmkit.errors import UserError
from ldmkit.methods.base import Method
from ldmkit.methods.configs import Arch, UViTConfig  # noqa: F401 (the configs import without torch: --help)
from ldmkit.methods.ema import EMA
from ldmkit.models.uvit import UViT
from ldmkit.rng import SampleRNG

if TYPE_CHECKING:
    from ldmkit.config import Config
    from ldmkit.pipelines.uvit import UViTPipeline

logger = logging.getLogger(__name__)


def training_scheduler(prediction_type: str) -> DDPMScheduler:
    """SD's training schedule: scaled-linear betas 0.00085 -> 0.012 over 1000 steps (the U-ViT repository's text-to-image configs, as Stable Diffusion)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=prediction_type,
    )


def flow_training_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    """The rectified flow's scheduler: 1000 sigmas shifted by ``shift`` (SD3's scheduler config, with its own shift)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


class UViTMethod(Method):
    Config = UViTConfig
    trainable_names = ("unet",)
    label, title = "U-ViT", "U-ViT text-to-image model"
    tags = ("u-vit",)

    def sampling_record(self):
        """The pipeline's own DPM-Solver at the validation grids' largest step count and guidance."""
        from ldmkit.inference import SamplingRecord

        m = self.mcfg
        return SamplingRecord(
            method=m.name,
            label=self.label,
            kind="pipeline",
            scheduler=None,
            steps=max(m.validation_steps),
            guidance=m.validation_guidance,
        )

    @classmethod
    def check_model(cls, cfg) -> None:
        from ldmkit.methods import checks

        checks.check_features_fit(cfg)

    def __init__(self, cfg: Config, accelerator):
        super().__init__(cfg, accelerator)
        from ldmkit.families import load_family
        from ldmkit.families.sd import check_single_text_encoder

        m = self.mcfg
        self.is_flow = m.prediction_type == FLOW
        m.check(cfg)  # idempotent; covers configs built in code rather than by load_config
        # The VAE and text encoder of model.pretrained (a U-ViT folder's or an SD1.x folder's), loaded when
        # a batch without cached tensors, validation or export needs them; the configs are read from files.
        self.family = load_family(
            cfg.model,
            dtype=self.weight_dtype,
            device=self.device,
            encode_batch_size=cfg.data.encode_batch_size,
            text_dtype=torch.float32 if m.train_text_encoder else None,  # trainable weights stay fp32
        )
        check_single_text_encoder(self.family, "method uvit")
        vae_config = self.family.vae_config
        self.scale = m.scale_factor if m.scale_factor is not None else self.family.vae_scale

        width = self.family.text_encoder_config(0)["hidden_size"]
        if m.context_dim is not None and m.context_dim != width:
            raise UserError(
                f"method.context_dim={m.context_dim} but the text encoder of model.pretrained is {width} wide"
            )
        down = 2 ** (len(vae_config["block_out_channels"]) - 1)
        if m.sample_size is None and cfg.data.resolution % down:
            raise UserError(f"data.resolution={cfg.data.resolution} is not a multiple of the VAE factor {down}")
        overrides = {
            k: v
            for k, v in (("embed_dim", m.embed_dim), ("depth", m.depth), ("num_heads", m.num_heads))
            if v is not None
        }
        try:
            self.unet = UViT.from_preset(
                m.arch,
                **overrides,
                patch_size=m.patch_size,
                in_channels=vae_config["latent_channels"],
                sample_size=m.sample_size or cfg.data.resolution // down,
                context_dim=width,
                num_text_tokens=self.family.tokenizers[0].model_max_length,
                pooled_context=m.pooled_context,
                objective="flow" if self.is_flow else "diffusion",
            ).to(self.device)
        except ValueError as e:
            raise UserError(f"method uvit: {e}") from None
        self.unet.train()
        logger.info(
            "U-ViT %s: %.1fM parameters, scale factor %.5f",
            m.arch,
            sum(p.numel() for p in self.unet.parameters()) / 1e6,
            self.scale,
        )
        if m.train_text_encoder:
            self.text_encoder = self.family.text_encoders[0].requires_grad_(True).train()
            self.trainable_names = ("unet", "text_encoder")
        if self.is_flow:
            self.noise_scheduler = flow_training_scheduler(m.flow_shift)
            self.schedule = Schedule.flow(self.noise_scheduler.config.num_train_timesteps, m.flow_shift).to(self.device)
        else:
            self.noise_scheduler = training_scheduler(m.prediction_type)
        self.ema = EMA(self._averaged(), decay=m.ema_decay, schedule="warmup", power=m.ema_power)

    def _averaged(self, unet: torch.nn.Module | None = None, text_encoder: torch.nn.Module | None = None):
        """The parameters the EMA averages, in its order: the U-ViT's, then the trained text encoder's."""
        params = list((unet or self.unwrap(self.unet)).parameters())
        if self.mcfg.train_text_encoder:
            params += list((text_encoder or self.unwrap(self.text_encoder)).parameters())
        return params

    def loss(self, batch):
        rng = SampleRNG(batch["seed"], self.device)
        # The family scales by the VAE config's factor; rescale to ours.
        x0 = self.family.latents(batch, rng) * (self.scale / self.family.vae_scale)  # (B, C, h, w)
        if self.mcfg.train_text_encoder:  # the captions through the trained encoder ("" when dropped)
            if "captions" not in batch:
                raise UserError("method.train_text_encoder needs captions, but the data gives fixed text embeddings")
            context = self.family.encode_prompts(list(batch["captions"]), [self.text_encoder])["prompt_embeds"]
        else:
            context = self.family.text(batch)["prompt_embeds"]  # (B, L, D); empty context when dropped
        if self.is_flow:
            return self._flow_loss(x0, context, rng)
        noise = rng.randn(*x0.shape[1:])
        t = rng.randint(0, self.noise_scheduler.config.num_train_timesteps)  # (B,), diffusers 0..999
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        pred = self.unet(xt, t, encoder_hidden_states=context).sample
        target = diffusion_target(self.noise_scheduler, x0, noise, t)
        if self.mcfg.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float()), {}
        weights = min_snr_weights(self.noise_scheduler, t, self.mcfg.snr_gamma, self.mcfg.prediction_type)  # (B,)
        per_sample = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))  # (B,)
        return (weights * per_sample).mean(), {}

    def _flow_loss(self, x0: torch.Tensor, context: torch.Tensor, rng: SampleRNG):
        """Rectified-flow matching (SD3 paper eq. 1-3): the loss of diffusers' train_dreambooth_lora_sd3.py."""
        m = self.mcfg
        # 1. eps ~ N(0, I); u ~ the weighting scheme's density; the shifted sigma of index floor(u T).
        noise = rng.randn(*x0.shape[1:])  # (B, C, h, w)
        draw = rng.randn() if flow_loss.draws_normal(m.weighting_scheme) else rng.rand()  # (B,)
        u = flow_loss.timestep_density(m.weighting_scheme, draw, m.logit_mean, m.logit_std)
        t = flow_loss.train_index(u, self.schedule.num_train_timesteps)  # (B,) ascending index
        # 2. x_t = (1 - sigma) x_0 + sigma eps; the U-ViT is called at sigma * 1000.
        xt = self.schedule.add_noise(x0, noise, t)
        pred = self.unet(xt, self.schedule.timestep(t), encoder_hidden_states=context).sample
        # 3. The velocity target eps - x_0, the scheme's per-sample weight, MSE in fp32.
        weights = flow_loss.loss_weighting(m.weighting_scheme, self.schedule.sigma[t])  # (B,)
        mse = flow_loss.per_sample_mse(pred, flow_loss.flow_target(x0, noise))  # (B,)
        return (weights * mse).mean(), {}

    def after_step(self, step: int) -> None:
        self.ema.step(self._averaged())

    def checkpoint_objects(self):
        return {"ema": self.ema}

    def encoders(self):
        return self.family

    def _pipeline(self, unet: UViT, vae, text_encoder) -> UViTPipeline:
        """UViTPipeline of ``unet`` with ``vae`` (its config given this run's scale factor, so decoding
        divides by exactly what training multiplied by), ``text_encoder`` and the family's tokenizer."""
        from ldmkit.pipelines.uvit import UViTPipeline

        vae.register_to_config(scaling_factor=self.scale)
        # Sampling: DPM-Solver on the training betas; a flow U-ViT: flow-matching Euler on the training shift.
        sampler = FlowMatchEulerDiscreteScheduler if self.is_flow else DPMSolverMultistepScheduler
        return UViTPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=self.family.tokenizers[0],
            unet=unet,
            scheduler=sampler.from_config(self.noise_scheduler.config),
        )

    @torch.no_grad()
    def validate(self, step: int):
        from ldmkit.inference import image_grid

        prompts = self.cfg.train.validation_prompts
        if not prompts:
            return None
        m = self.mcfg
        unet = self.unwrap(self.unet)
        text_encoder = self.unwrap(self.text_encoder) if m.train_text_encoder else None
        with self.ema.swapped_into(self._averaged()), self.family.transient():
            # parts the training did not need are dropped afterwards
            pipe = self._pipeline(unet, self.family.vae, text_encoder or self.family.text_encoders[0])
            pipe.set_progress_bar_config(disable=True)
            columns = []
            for n in m.validation_steps:
                generator = torch.Generator(self.device).manual_seed(self.cfg.train.validation_seed)
                with self.accelerator.autocast():
                    columns.append(
                        pipe(
                            prompts,
                            num_inference_steps=n,
                            guidance_scale=m.validation_guidance,
                            generator=generator,
                            num_images_per_prompt=m.validation_images_per_prompt,
                        ).images
                    )
        k = m.validation_images_per_prompt
        images = [columns[j][i * k + c] for i in range(len(prompts)) for j in range(len(columns)) for c in range(k)]
        labels = [f"{'Euler' if self.is_flow else 'DPM'} {n} steps" for n in m.validation_steps for _ in range(k)]
        return image_grid(images, len(columns) * k, row_labels=prompts, col_labels=labels)

    def export(self, out_dir: Path) -> None:
        """A UViTPipeline folder with the EMA weights, the VAE (config carrying the training scale factor),
        text encoder (the trained one's EMA weights with method.train_text_encoder) and tokenizer of
        model.pretrained, and a DPM-Solver scheduler with the training betas (a flow U-ViT: FlowMatchEulerDiscrete-
        Scheduler with the training shift)."""
        from ldmkit.families import load_family

        unet = UViT.from_config(self.unwrap(self.unet).config)
        # Fresh fp32 copies: the training ones may be stored in the mixed-precision dtype.
        parts = load_family(self.cfg.model)
        text_encoder = parts.text_encoders[0]
        self.ema.copy_to(self._averaged(unet, text_encoder))
        pipe = self._pipeline(unet, parts.vae, text_encoder)
        pipe.save_pretrained(out_dir)
        logger.info("exported UViTPipeline to %s", out_dir)
