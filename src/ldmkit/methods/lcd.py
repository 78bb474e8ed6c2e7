"""Latent Consistency Distillation: full LCD (``lcd``) and LCM-LoRA (``lcm_lora``).

LCM paper (Luo et al. 2023, arXiv:2310.04378) Algorithm 1; LCM-LoRA report (arXiv:2311.05556).
The reference implementations are diffusers' ``examples/consistency_distillation/train_lcm_distill_*``
and PaddleMIX's ``lcm_trainer``; the facts we match are collected in REFERENCE.md section 1.

Differences from the references, on purpose:
- the teacher's conditional and unconditional passes run as one batched forward
  (``batch_teacher_passes``; the unbatched form stays for the benchmark);
- LCM-LoRA keeps ONE denoiser: the teacher is the same UNet (or U-ViT) with its adapters disabled;
- the full-LCD student's new ``time_embedding.cond_proj`` is zero-initialised, so the student equals
  the teacher at step 0 (the references leave it random);
- every random draw comes from the samples' own seeds (``SampleRNG``), so runs resume exactly;
- exports carry the run's ``num_ddim_timesteps`` and ``timestep_scaling_factor`` in an LCMScheduler
  config, and the LoRA loads in stock diffusers (all modules) and as a kohya file.

Any teacher: the algorithm needs only an epsilon- or v-predicting denoiser called as
``model(x_t, t, encoder_hidden_states=..., timestep_cond=...)``. Besides SD1.x/SDXL UNets, a
``UViTPipeline`` folder (ldmkit's U-ViT, e.g. the export of a ``uvit`` run) is a teacher: its U-ViT takes
the same call, its scheduler/ gives the DDPM training schedule, and its exports are a LoRA for
``UViTPipeline.load_lora_weights`` or a full ``UViTPipeline`` folder. The U-ViT-specific code is the
loader (``_load_teacher_denoiser``), the pipeline class and the LoRA target names.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from ldmkit.compat import dtype_kwargs
from ldmkit.diffusion import lcm
from ldmkit.errors import UserError
from ldmkit.lora.adapters import adapters_disabled
from ldmkit.methods.base import Method, MethodConfig
from ldmkit.rng import SampleRNG

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ldmkit.config import Config
    from ldmkit.models.sd import SDModels

logger = logging.getLogger(__name__)

LCM_LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip
"""The UNet modules LCM-LoRA adapts (diffusers' train_lcm_distill_lora_* scripts)."""
UVIT_LORA_TARGET_MODULES = ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
"""The U-ViT modules LCM-LoRA adapts: every attention and MLP projection (models/uvit.py Block), the
counterpart of the UNet list's transformer-block entries."""


# ------------------------------------------------------------------------------------------- configs
@dataclass
class LCDCommonConfig(MethodConfig):
    """Knobs shared by lcd and lcm_lora (defaults: diffusers / PaddleMIX references)."""

    w_min: float | None = None
    """Smallest guidance scale w sampled per sample; null: 5.0 for SD1.5, 3.0 for SDXL."""
    w_max: float = 15.0
    """Largest guidance scale w (teacher CFG in the LCM form x0 = c + w (c - u))."""
    num_ddim_timesteps: int = 50
    """N: DDIM solver grid size; skipping step k = T // N. Written to the exported LCMScheduler as original_inference_steps."""
    loss_type: Literal["l2", "huber"] = "l2"
    """Distance between student and target: l2 (MSE) or pseudo-Huber (the recipes use huber)."""
    huber_c: float = 0.001
    """c of the pseudo-Huber loss sqrt(d^2 + c^2) - c."""
    timestep_scaling_factor: float = 10.0
    """s in the boundary scalings c_skip/c_out(s * t); higher s = smaller approximation error. Exported as timestep_scaling."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """What the teacher predicts; null: the teacher scheduler's prediction_type."""
    use_fix_crop_and_size: bool = True
    """SDXL: condition on (res, res, 0, 0, res, res) instead of each image's original size and crop."""
    batch_teacher_passes: bool = True
    """Run the teacher's conditional and unconditional passes as one batched forward (false: two passes, as the references)."""
    validation_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """LCM sampling step counts shown in each validation grid (columns)."""
    validation_guidance: float | None = None
    """Pipeline guidance_scale for validation; null: 1.0 for LoRA (0.0 SDXL), 8.0 for full LCD (embedded as w = 7)."""

    def check(self, cfg: Config) -> None:
        if self.w_min is not None and self.w_min > self.w_max:
            raise UserError(f"method.w_min ({self.w_min}) must be <= method.w_max ({self.w_max})")
        if self.num_ddim_timesteps < 1:
            raise UserError(f"method.num_ddim_timesteps must be >= 1, got {self.num_ddim_timesteps}")
        if self.huber_c <= 0:
            raise UserError(f"method.huber_c must be > 0, got {self.huber_c}")
        if self.timestep_scaling_factor <= 0:
            raise UserError(f"method.timestep_scaling_factor must be > 0, got {self.timestep_scaling_factor}")
        bad = [s for s in self.validation_steps if not 1 <= s <= self.num_ddim_timesteps]
        if bad:
            raise UserError(f"method.validation_steps must lie in 1..num_ddim_timesteps, got {bad}")


@dataclass
class LCMLoraConfig(LCDCommonConfig):
    """LCM-LoRA: distil the teacher into a LoRA of itself (the base model with adapters off is the teacher)."""

    name: str = "lcm_lora"
    lora_rank: int = 64
    """LoRA rank r."""
    lora_alpha: float = 64.0
    """LoRA alpha; the update is scaled by alpha / r (diffusers 64/64; PaddleMIX 8/64 = 0.125)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input (draws from torch's global RNG, not the per-sample seeds)."""
    lora_target_modules: list[str] | None = None
    """Module names (suffixes) that get a LoRA; null: the 14 UNet module kinds of diffusers' LCM-LoRA scripts,
    or for a U-ViT teacher its attention and MLP projections (attn.qkv, attn.proj, mlp.0, mlp.2)."""

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if self.lora_rank < 1:
            raise UserError(f"method.lora_rank must be >= 1, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"method.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise UserError("method.lora_target_modules is empty (null selects the teacher's defaults)")


@dataclass
class LCDConfig(LCDCommonConfig):
    """Full LCD: a student denoiser with a guidance-scale embedding, an EMA target and a frozen teacher."""

    name: str = "lcd"
    unet_time_cond_proj_dim: int = 256
    """Size of the guidance-scale (w) embedding fed to the student's time_embedding.cond_proj."""
    ema_decay: float = 0.95
    """Target network update target = decay * target + (1 - decay) * student after every step."""

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if not 0.0 <= self.ema_decay <= 1.0:
            raise UserError(f"method.ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.unet_time_cond_proj_dim < 2:
            raise UserError(f"method.unet_time_cond_proj_dim must be >= 2, got {self.unet_time_cond_proj_dim}")


# ------------------------------------------------------------------------------------------- denoiser
class SDDenoiser:
    """How LCD calls the denoiser: (model, x_t, t, cond, w embedding) -> raw model output.

    ``cond`` holds ``prompt_embeds`` and, for SDXL, ``pooled_prompt_embeds`` and ``time_ids``. Serves
    UNet2DConditionModel and ldmkit's U-ViT alike (its forward takes the UNet's arguments and returns
    ``.sample``); another teacher plugs in by providing an object with the same ``__call__``.
    """

    def __call__(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], w_emb=None):
        added = None
        if "pooled_prompt_embeds" in cond:
            added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["time_ids"]}
        return model(
            x, t, encoder_hidden_states=cond["prompt_embeds"], timestep_cond=w_emb, added_cond_kwargs=added
        ).sample


def is_uvit_pipeline(folder: str | Path) -> bool:
    """Whether ``folder`` is a UViTPipeline (model_index.json ``_class_name``)."""
    index = Path(folder) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == "UViTPipeline"


def _load_teacher_denoiser(pretrained: str, variant: str | None, dtype: torch.dtype) -> torch.nn.Module:
    """The U-ViT of a UViTPipeline folder, frozen (SDModels loads UNets; this is the one U-ViT branch)."""
    from ldmkit.models.uvit import UViT

    if not (Path(pretrained) / "unet" / "config.json").is_file():
        raise UserError(f"unet of model.pretrained not found: {Path(pretrained) / 'unet'}")
    model = UViT.from_pretrained(pretrained, subfolder="unet", variant=variant, **dtype_kwargs(dtype))
    return model.requires_grad_(False).eval()


def _cat_cond(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([a[k], b[k]]) for k in a}


# ------------------------------------------------------------------------------------------- methods
class _LCDBase(Method):
    """Algorithm 1 of the LCM paper; subclasses say who the student, teacher and target are."""

    trainable_names = ("unet",)
    mcfg: LCDCommonConfig

    def __init__(self, cfg: Config, accelerator: Accelerator):
        super().__init__(cfg, accelerator)
        from ldmkit.models.sd import SDModels

        m = self.mcfg
        cache = cfg.data.cache
        self.is_uvit = is_uvit_pipeline(cfg.model.pretrained)
        # With a data cache the VAE and text encoders are not needed per step (REFERENCE sec. 1: then
        # only the 4 UNet forwards run); they are loaded on demand for caching and validation.
        self.models: SDModels = SDModels.load(
            cfg.model.pretrained,
            vae=cfg.model.vae,
            variant=cfg.model.variant,
            dtype=self.weight_dtype,
            device=self.device,
            vae_model=not cache,
            text=not cache,
            unet=not self.is_uvit,
        )
        if self.is_uvit:
            self.models.unet = _load_teacher_denoiser(cfg.model.pretrained, cfg.model.variant, self.weight_dtype).to(
                self.device
            )
        self.models.vae_batch_size = cfg.data.encode_batch_size
        self.is_sdxl = self.models.is_sdxl
        self.denoiser = SDDenoiser()

        sched = self.models.noise_scheduler
        self.prediction_type = m.prediction_type or sched.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(
                f"teacher prediction_type {self.prediction_type!r} is not supported (epsilon, v_prediction)"
            )
        T = sched.config.num_train_timesteps
        if m.num_ddim_timesteps > T:
            raise UserError(f"method.num_ddim_timesteps ({m.num_ddim_timesteps}) exceeds the teacher's {T} timesteps")
        self.w_min = m.w_min if m.w_min is not None else (3.0 if self.is_sdxl else 5.0)
        self.k = T // m.num_ddim_timesteps
        self.alphas_cumprod = sched.alphas_cumprod.to(self.device)
        self.ddim_timesteps = lcm.ddim_timesteps(T, m.num_ddim_timesteps).to(self.device)
        self.alpha_prev = lcm.ddim_alpha_prev(self.alphas_cumprod, self.ddim_timesteps)

        # SD1.x: the unconditional embedding is the empty prompt's (encoded once, only the tensor kept);
        # SDXL: zeros for prompt and pooled embeds (REFERENCE sec. 1).
        self.empty_embeds: torch.Tensor | None = None
        if not self.is_sdxl:
            text_models = self.models if self.models.text_encoders else self._load_aux()
            with torch.no_grad():
                self.empty_embeds = text_models.encode_prompts([""])["prompt_embeds"].float()  # (1, L, D)

    # ---- models on demand -------------------------------------------------------------------------
    def _load_aux(self) -> SDModels:
        from ldmkit.models.sd import SDModels

        c = self.cfg.model
        aux = SDModels.load(
            c.pretrained, vae=c.vae, variant=c.variant, dtype=self.weight_dtype, device=self.device, unet=False
        )
        aux.vae_batch_size = self.cfg.data.encode_batch_size
        return aux

    def _aux(self) -> SDModels:
        """VAE + text encoders: the training ones, or a fresh load when the cache made them unnecessary."""
        if self.models.vae is not None and self.models.text_encoders:
            return self.models
        return self._load_aux()

    def encoders(self):
        return self._aux()

    # ---- the roles of Algorithm 1 -----------------------------------------------------------------
    def _student(self, x, t, cond, w_emb):
        """f_theta with gradients (the accelerate-prepared module: DDP sync, autocast)."""
        return self.denoiser(self.unet, x, t, cond, w_emb)

    def _teacher_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def _teacher_context(self):
        return contextlib.nullcontext()

    def _target_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def _w_embedding(self, w: torch.Tensor) -> torch.Tensor | None:
        return None

    # ---- batch -> conditioning --------------------------------------------------------------------
    def _conditions(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        text = self.models.text(batch)  # cached embeddings, or the text encoders (loaded unless data.cache)
        cond = {"prompt_embeds": text["prompt_embeds"].float()}
        if self.is_sdxl:
            cond["pooled_prompt_embeds"] = text["pooled_prompt_embeds"].float()
            cond["time_ids"] = self.models.add_time_ids(
                batch, self.cfg.data.resolution, self.mcfg.use_fix_crop_and_size
            )
            uncond = {
                "prompt_embeds": torch.zeros_like(cond["prompt_embeds"]),
                "pooled_prompt_embeds": torch.zeros_like(cond["pooled_prompt_embeds"]),
                "time_ids": cond["time_ids"],
            }
        else:
            b = cond["prompt_embeds"].shape[0]
            uncond = {"prompt_embeds": self.empty_embeds.to(cond["prompt_embeds"].device).expand(b, -1, -1)}
        return cond, uncond

    # ---- the loss: LCM paper, Algorithm 1 ---------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        m, ptype, ac = self.mcfg, self.prediction_type, self.alphas_cumprod
        rng = SampleRNG(batch["seed"], self.device)
        with self.accelerator.autocast():
            # 1. Data: z = E(x) (scaled latents) and the text condition c; uncond for the teacher's CFG.
            z = self.models.latents(batch, rng)  # cached VAE moments, or the VAE (loaded unless data.cache)
            cond, uncond = self._conditions(batch)
            nd = z.ndim
            if self.is_uvit and z.shape[-1] != self.models.unet.config.sample_size:  # a fixed token grid
                raise UserError(
                    f"the U-ViT teacher takes {self.models.unet.config.sample_size}px-wide latents, data.resolution="
                    f"{self.cfg.data.resolution} gives {z.shape[-1]}; set data.resolution to the teacher's"
                )

            # 2. Sample n ~ U{0..N-1}: t_{n+k} = ddim_timesteps[n] and t_n = max(t_{n+k} - k, 0).
            index = rng.randint(0, m.num_ddim_timesteps).to(self.device)  # (B,)
            t_start = self.ddim_timesteps[index]
            t = (t_start - self.k).clamp(min=0)

            # 3. Forward diffusion: z_{t_{n+k}} = alpha(t_{n+k}) z + sigma(t_{n+k}) eps (DDPMScheduler.add_noise).
            noise = rng.randn(*z.shape[1:]).to(z)
            a_start = lcm.append_dims(ac[t_start], nd)
            z_start = a_start.sqrt() * z + (1 - a_start).sqrt() * noise

            # 4. Guidance scale w ~ U[w_min, w_max] (and its embedding for full LCD).
            w = self.w_min + (m.w_max - self.w_min) * rng.rand().to(self.device)  # (B,)
            w_emb = self._w_embedding(w)

            # 5. Online consistency function f_theta(z_{t_{n+k}}, w, c, t_{n+k}) = c_skip z + c_out x0_hat.
            c_skip_start, c_out_start = (
                lcm.append_dims(c, nd)
                for c in lcm.scalings_for_boundary_conditions(t_start, timestep_scaling=m.timestep_scaling_factor)
            )
            out = self._student(z_start, t_start, cond, w_emb)
            x0_student = lcm.predicted_origin(out, t_start, z_start, ptype, ac)
            model_pred = c_skip_start * z_start + c_out_start * x0_student

            # 6. Teacher ODE solver with CFG: z_hat_{t_n} = Psi(z_{t_{n+k}}, t_{n+k}, t_n, c, w) (one DDIM step).
            with torch.no_grad(), self._teacher_context():
                teacher = self._teacher_model()
                if m.batch_teacher_passes:
                    both = self.denoiser(
                        teacher, torch.cat([z_start, z_start]), torch.cat([t_start, t_start]), _cat_cond(cond, uncond)
                    )
                    out_c, out_u = both.chunk(2)
                else:
                    out_c = self.denoiser(teacher, z_start, t_start, cond)
                    out_u = self.denoiser(teacher, z_start, t_start, uncond)
                x0_c, x0_u = (lcm.predicted_origin(o, t_start, z_start, ptype, ac) for o in (out_c, out_u))
                eps_c, eps_u = (lcm.predicted_noise(o, t_start, z_start, ptype, ac) for o in (out_c, out_u))
                wb = lcm.append_dims(w, nd)
                x0_hat = x0_c + wb * (x0_c - x0_u)
                eps_hat = eps_c + wb * (eps_c - eps_u)
                z_prev = lcm.ddim_step(x0_hat, eps_hat, self.alpha_prev[index]).float()

            # 7. Target f_theta^-(z_hat_{t_n}, w, c, t_n), no gradient.
            with torch.no_grad():
                c_skip, c_out = (
                    lcm.append_dims(c, nd)
                    for c in lcm.scalings_for_boundary_conditions(t, timestep_scaling=m.timestep_scaling_factor)
                )
                target_out = self.denoiser(self._target_model(), z_prev, t, cond, w_emb)
                target = c_skip * z_prev + c_out * lcm.predicted_origin(target_out, t, z_prev, ptype, ac)

        # 8. Consistency distillation loss d(f_theta, f_theta^-) in fp32.
        if m.loss_type == "huber":
            loss = lcm.pseudo_huber(model_pred, target, m.huber_c)
        else:
            loss = F.mse_loss(model_pred.float(), target.float())
        return loss, {}

    # ---- validation -------------------------------------------------------------------------------
    def _lcm_scheduler(self):
        return lcm.lcm_scheduler(
            self.models.noise_scheduler.config,
            self.mcfg.num_ddim_timesteps,
            self.mcfg.timestep_scaling_factor,
            prediction_type=self.prediction_type,
        )

    def _sampling_unet(self) -> torch.nn.Module:
        raise NotImplementedError

    def _default_guidance(self) -> float:
        raise NotImplementedError

    def _pipeline(self, unet, aux: SDModels):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        parts = dict(
            vae=aux.vae,
            unet=unet,
            scheduler=self._lcm_scheduler(),
            text_encoder=aux.text_encoders[0],
            tokenizer=aux.tokenizers[0],
        )
        if self.is_uvit:
            from ldmkit.pipelines.uvit import UViTPipeline

            return UViTPipeline(**parts)
        if self.is_sdxl:
            return StableDiffusionXLPipeline(
                text_encoder_2=aux.text_encoders[1], tokenizer_2=aux.tokenizers[1], **parts
            )
        return StableDiffusionPipeline(
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts
        )

    @torch.no_grad()
    def validate(self, step: int):
        """Rows: cfg.train.validation_prompts; columns: LCM samples at method.validation_steps (fixed seed)."""
        from diffusers.utils import make_image_grid

        from ldmkit.generate import generate_images

        prompts = self.cfg.train.validation_prompts
        if not prompts:
            return None
        unet = self._sampling_unet()
        was_training = unet.training
        unet.eval()
        pipe = self._pipeline(unet, self._aux())
        pipe.set_progress_bar_config(disable=True)
        guidance = self.mcfg.validation_guidance
        guidance = self._default_guidance() if guidance is None else guidance
        res, seed, steps = self.cfg.data.resolution, self.cfg.train.validation_seed, self.mcfg.validation_steps
        try:
            with self.accelerator.autocast():
                columns = [generate_images(pipe, prompts, n, guidance, seed, height=res, width=res) for n in steps]
        finally:
            unet.train(was_training)
        images = [columns[j][i] for i in range(len(prompts)) for j in range(len(steps))]  # prompt-major rows
        return make_image_grid(images, rows=len(prompts), cols=len(steps))

    # ---- export helpers ---------------------------------------------------------------------------
    def _model_card(self, kind: str, how_to_load: str) -> str:
        c = self.cfg
        knobs = json.dumps(asdict(self.mcfg), indent=2)
        return (
            f"# {kind} distilled with ldmkit\n\n"
            f"- teacher: `{c.model.pretrained}`" + (f" (VAE `{c.model.vae}`)" if c.model.vae else "") + "\n"
            f"- data: `{c.data.path}` at {c.data.resolution} px\n"
            f"- steps: {c.train.max_steps}, batch {c.train.batch_size} x {c.train.gradient_accumulation_steps} "
            f"accumulation, learning rate {c.train.learning_rate}, mixed precision {c.train.mixed_precision}\n"
            f"- LCM scheduler: original_inference_steps={self.mcfg.num_ddim_timesteps}, "
            f"timestep_scaling={self.mcfg.timestep_scaling_factor} (use these at inference)\n\n"
            f"## How to load\n\n```python\n{how_to_load}\n```\n\n"
            f"## Method hyperparameters\n\n```json\n{knobs}\n```\n"
        )

    def _pipeline_class_name(self) -> str:
        if self.is_uvit:
            return "UViTPipeline"
        return "StableDiffusionXLPipeline" if self.is_sdxl else "StableDiffusionPipeline"

    def _pipeline_import(self) -> str:
        if self.is_uvit:
            return "from ldmkit.pipelines.uvit import UViTPipeline\n"
        return f"from diffusers import {self._pipeline_class_name()}\n"


class LCMLoraMethod(_LCDBase):
    """LCM-LoRA: one denoiser (UNet or U-ViT); teacher = base weights (adapters disabled), student = base + LoRA,
    target = the online student under no_grad (LCM-LoRA report; diffusers train_lcm_distill_lora_*)."""

    Config = LCMLoraConfig
    mcfg: LCMLoraConfig

    def __init__(self, cfg: Config, accelerator: Accelerator):
        super().__init__(cfg, accelerator)
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        from ldmkit.lora import adapters

        m = self.mcfg
        targets = m.lora_target_modules or list(UVIT_LORA_TARGET_MODULES if self.is_uvit else LCM_LORA_TARGET_MODULES)
        self.unet = self.models.unet  # the one denoiser: frozen base in weight dtype + trainable LoRA
        adapters.add_lora(
            self.unet,
            LoraConfig(
                r=m.lora_rank,
                lora_alpha=m.lora_alpha,
                lora_dropout=m.lora_dropout,
                target_modules=list(targets),
                init_lora_weights="gaussian",
            ),
        )
        cast_training_params(self.unet, dtype=torch.float32)  # LoRA weights train in fp32
        self.unet.train()

    def _teacher_model(self):
        return self.unwrap(self.unet)

    def _teacher_context(self):
        return adapters_disabled(self.unwrap(self.unet))

    def _target_model(self):
        return self.unwrap(self.unet)

    def _sampling_unet(self):
        return self.unwrap(self.unet)

    def _default_guidance(self) -> float:
        return 0.0 if self.is_sdxl else 1.0

    def export(self, out_dir: Path) -> None:
        """``pytorch_lora_weights.safetensors`` (stock ``load_lora_weights``), a kohya copy, an LCMScheduler
        config with the run's N and s, and a model card."""
        import diffusers

        from ldmkit.lora import export
        from ldmkit.pipelines.uvit import UViTPipeline

        out_dir = Path(out_dir)
        pipeline_cls = UViTPipeline if self.is_uvit else getattr(diffusers, self._pipeline_class_name())
        n = export.export_lora(out_dir, {"unet": self.unwrap(self.unet)}, pipeline_cls, kohya=not self.is_uvit)
        self._lcm_scheduler().save_pretrained(out_dir / "scheduler")
        kohya = "" if self.is_uvit else f"  # or {export.KOHYA_WEIGHT_NAME} in A1111/ComfyUI"
        load = (
            f"from diffusers import LCMScheduler\n{self._pipeline_import()}\n"
            f'pipe = {self._pipeline_class_name()}.from_pretrained("{self.cfg.model.pretrained}")\n'
            f'pipe.scheduler = LCMScheduler.from_pretrained("{out_dir}", subfolder="scheduler")\n'
            f'pipe.load_lora_weights("{out_dir}"){kohya}\n'
            f'image = pipe("a prompt", num_inference_steps=4, guidance_scale={self._default_guidance()}).images[0]\n'
            f"# or bake it in: ldmkit merge-lora --model {self.cfg.model.pretrained} --lora {out_dir} --out merged"
        )
        (out_dir / "README.md").write_text(self._model_card(f"LCM-LoRA ({n} adapted modules)", load))


class LCDMethod(_LCDBase):
    """Full LCD: student (fp32, trained) with a w-embedding, EMA target (fp32), frozen teacher (weight dtype)."""

    Config = LCDConfig
    mcfg: LCDConfig

    def __init__(self, cfg: Config, accelerator: Accelerator):
        super().__init__(cfg, accelerator)
        m = self.mcfg
        self.teacher_unet = self.models.unet  # frozen, weight dtype
        have = self.teacher_unet.config.time_cond_proj_dim
        if have is not None and have != m.unet_time_cond_proj_dim:
            raise UserError(f"teacher already has time_cond_proj_dim={have}; set method.unet_time_cond_proj_dim={have}")
        # The student: the teacher's class and config plus the w-embedding projection (UNet
        # time_embedding.cond_proj, U-ViT cond_proj).
        cls = type(self.teacher_unet)
        student = cls.from_config(self.teacher_unet.config, time_cond_proj_dim=m.unet_time_cond_proj_dim)
        source = self.teacher_unet
        if self.teacher_unet.dtype != torch.float32:  # initialise the fp32 student from the fp32 weights on disk
            source = cls.from_pretrained(cfg.model.pretrained, subfolder="unet", variant=cfg.model.variant)
        missing, unexpected = student.load_state_dict(source.state_dict(), strict=False)
        if unexpected or any("cond_proj" not in k for k in missing):
            raise RuntimeError(f"student/teacher mismatch: missing {missing}, unexpected {unexpected}")
        params = dict(student.named_parameters())
        for key in missing:
            # Zero-init: the w-embedding starts with no effect, so the student equals the teacher at step 0.
            torch.nn.init.zeros_(params[key])
        del source
        self.unet = student.to(self.device).train()
        self.target_unet = copy.deepcopy(student).requires_grad_(False).to(self.device).eval()

    def _w_embedding(self, w: torch.Tensor) -> torch.Tensor:
        return lcm.guidance_scale_embedding(w, self.mcfg.unet_time_cond_proj_dim)

    def _teacher_model(self):
        return self.teacher_unet

    def _target_model(self):
        return self.target_unet

    def _sampling_unet(self):
        return self.target_unet

    def _default_guidance(self) -> float:
        """8.0 (w = 7) as the references when w = 7 was trained, else the middle of the trained range."""
        if self.w_min <= 7.0 <= self.mcfg.w_max:
            return 8.0
        return 1.0 + (self.w_min + self.mcfg.w_max) / 2

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA target update: target <- decay * target + (1 - decay) * student (no warmup, as the references)."""
        target = list(self.target_unet.parameters())
        online = [p.detach() for p in self.unwrap(self.unet).parameters()]
        torch._foreach_lerp_(target, online, 1.0 - self.mcfg.ema_decay)

    def checkpoint_objects(self) -> dict[str, Any]:
        return {"target_unet": self.target_unet}

    def export(self, out_dir: Path) -> None:
        """A full pipeline folder (the teacher's pipeline class: SD, SDXL or UViTPipeline): the EMA target
        denoiser (with time_cond_proj_dim) + LCMScheduler with N and s."""
        from diffusers import DiffusionPipeline

        from ldmkit.pipelines.uvit import UViTPipeline

        out_dir = Path(out_dir)
        extra: dict[str, Any] = {}
        if self.cfg.model.vae:  # the separate VAE as stored (not the weight-dtype training copy)
            from diffusers import AutoencoderKL

            vae = Path(self.cfg.model.vae)
            sub = "vae" if (vae / "vae" / "config.json").is_file() else None
            extra["vae"] = AutoencoderKL.from_pretrained(vae, subfolder=sub, variant=self.cfg.model.variant)
        if not self.is_sdxl and not self.is_uvit:
            extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipeline_cls = UViTPipeline if self.is_uvit else DiffusionPipeline
        pipe = pipeline_cls.from_pretrained(
            self.cfg.model.pretrained,
            unet=self.target_unet,
            scheduler=self._lcm_scheduler(),
            variant=self.cfg.model.variant,
            **extra,
        )
        pipe.save_pretrained(out_dir)
        g = self._default_guidance()
        load = (
            f"{self._pipeline_import()}\n"
            f'pipe = {self._pipeline_class_name()}.from_pretrained("{out_dir}")  # scheduler: LCMScheduler\n'
            f"# guidance_scale is embedded as w = guidance_scale - 1 (no classifier-free guidance pass)\n"
            f'image = pipe("a prompt", num_inference_steps=4, guidance_scale={g}).images[0]'
        )
        (out_dir / "README.md").write_text(self._model_card("Latent Consistency Model", load))


_adapters_disabled = adapters_disabled  # the name tests/test_lcd.py imports
