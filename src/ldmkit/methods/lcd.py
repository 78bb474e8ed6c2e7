"""Latent Consistency Distillation: full LCD (``lcd``) and LCM-LoRA (``lcm_lora``).

LCM paper (Luo et al. 2023, arXiv:2310.04378) Algorithm 1; LCM-LoRA report (arXiv:2311.05556).
The reference implementations are diffusers' ``examples/consistency_distillation/train_lcm_distill_*``
and PaddleMIX's ``ppdiffusers/examples/consistency_distillation`` (``lcm_trainer``).

Differences from the references, on purpose:
- the teacher's conditional and unconditional passes run as one batched forward
  (``batch_teacher_passes``; the unbatched form stays for the benchmark);
- LCM-LoRA keeps ONE denoiser's weights: the teacher is the same UNet (or U-ViT) without its adapters, a module tree
  on the same tensors (``plain_teacher``; or the adapted one with adapters disabled);
- the full-LCD student's new ``time_embedding.cond_proj`` is zero-initialised, so the student equals
  the teacher at step 0 (the references leave it random);
- every random draw comes from the samples' own seeds (``SampleRNG``), so runs resume exactly;
- exports carry the run's ``num_ddim_timesteps`` and ``timestep_scaling_factor`` in an LCMScheduler
  config, and the LoRA loads in stock diffusers (all modules) and as a kohya file.

Any teacher: the algorithm talks to the model only through its family (``ldmkit.families``):
``family.denoise`` calls the denoiser, ``family.conditions`` gives (cond, uncond), ``family.pipeline``
samples, and the family's defaults (LoRA targets, w_min, guidance) fill what the config leaves open. SD1.x,
SDXL and ldmkit's U-ViT (a ``UViTPipeline`` folder, e.g. the export of a ``uvit`` run) are families, and so are
the rectified-flow SD3 and FLUX.1 (``Family.schedule``: the DDIM step becomes the Euler step over the shifted
sigmas, or Heun's with ``method.teacher_solver``; the full LCD student is then the teacher's transformer as it is:
FLUX.1-dev reads w through its own guidance input, SD3 bakes w in as the LoRAs do).
lcm_lora and lcd differ only in who plays student, teacher and target (``Roles``); TCD and PCM
(methods/tcd.py, methods/pcm.py) reuse both and override only the target point s, the consistency function
and the sampling scheduler (``_end_timesteps``, ``_f``, ``_sampling_scheduler``, ``_sampling_eta``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ldmkit.diffusion import lcm
from ldmkit.errors import UserError
from ldmkit.families.sd import UNET_LORA_TARGET_MODULES as LCM_LORA_TARGET_MODULES
from ldmkit.families.uvit import UVIT_LORA_TARGET_MODULES
from ldmkit.lora.adapters import adapters_disabled
from ldmkit.methods.base import Method, export_denoiser_lora
from ldmkit.methods.configs import LCDCommonConfig, LCDConfig, LCMLoraConfig  # noqa: F401 (help needs no torch)
from ldmkit.methods.ema import EMA
from ldmkit.rng import SampleRNG

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ldmkit.config import Config

__all__ = [
    "LCM_LORA_TARGET_MODULES",
    "UVIT_LORA_TARGET_MODULES",
    "ConsistencyPair",
    "LCDMethod",
    "LCMLoraMethod",
    "Roles",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- roles
@dataclass
class Roles:
    """Who plays which part of Algorithm 1: the methods differ only here (LCM-LoRA: one denoiser in three
    roles; full LCD: student, frozen teacher, EMA target). Models are called through ``Family.denoise``."""

    student: torch.nn.Module
    """f_theta, trained: the accelerate-prepared module (DDP sync, autocast)."""
    teacher: torch.nn.Module
    """The ODE solver's denoiser (with classifier-free guidance), no gradient."""
    target: torch.nn.Module
    """f_theta^-, no gradient."""
    teacher_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    """Entered around the teacher's passes (LCM-LoRA: adapters disabled)."""
    w_embedding: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Guidance scales w [B] -> the student's and target's ``timestep_cond``, or None (no w-embedding)."""


@dataclass
class ConsistencyPair:
    """What steps 1-7 of Algorithm 1 give: the two sides of the consistency loss, and what they were taken at
    (PCM's adversarial term re-noises both: methods/pcm.py)."""

    student: torch.Tensor
    """f_theta(z_{t_{n+k}}, w, c, t_{n+k} -> s), with the student's gradient."""
    target: torch.Tensor
    """f_theta^-(z_hat_{t_n}, w, c, t_n -> s), no gradient."""
    end: torch.Tensor | None
    """s per sample (None for LCM: the origin)."""
    cond: dict[str, torch.Tensor]
    """The text condition c (fp32), as ``Family.denoise`` takes it."""
    rng: SampleRNG
    """The samples' generators, after the draws of steps 1-7 (later draws continue their streams)."""


def _cat_cond(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([a[k], b[k]]) for k in a}


# ------------------------------------------------------------------------------------------- methods
class _LCDBase(Method):
    """Algorithm 1 of the LCM paper; subclasses say who the student, teacher and target are (``roles``)."""

    trainable_names = ("unet",)
    mcfg: LCDCommonConfig

    @classmethod
    def check_model(cls, cfg) -> None:
        from ldmkit.methods import checks

        checks.check_denoiser_model(cfg)

    def __init__(self, cfg: Config, accelerator: Accelerator):
        super().__init__(cfg, accelerator)
        from ldmkit.families import load_family

        m = self.mcfg
        # Lazy: the denoiser is loaded by the subclass; the VAE and text encoders only when a batch without
        # cached tensors, validation or export needs them (with a data cache the loss runs the denoiser only).
        self.family = load_family(
            cfg.model, dtype=self.weight_dtype, device=self.device, encode_batch_size=cfg.data.encode_batch_size
        )
        # The forward process: DDPM's (eps / v) or a rectified flow's (velocity; diffusion/schedule.py). Every
        # step of Algorithm 1 below goes through it, so the same code distils both model generations.
        self.schedule = self.family.schedule(m.prediction_type, cfg.data.resolution).to(self.device)
        self.prediction_type = self.schedule.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "flow"):
            raise UserError(
                f"teacher prediction_type {self.prediction_type!r} is not supported (epsilon, v_prediction, flow)"
            )
        if self.schedule.is_flow and not self.supports_flow:
            raise UserError(
                f"method {m.name} does not distil {self.family.name} (a rectified-flow model) yet; lcm_lora does"
            )
        if m.teacher_solver == "heun" and not self.schedule.is_flow:
            raise UserError(
                "method.teacher_solver heun needs a rectified-flow teacher (SD3, FLUX.1); DDPM teachers take euler (DDIM)"
            )
        T = self.schedule.num_train_timesteps
        if m.num_ddim_timesteps > T:
            raise UserError(f"method.num_ddim_timesteps ({m.num_ddim_timesteps}) exceeds the teacher's {T} timesteps")
        m.resolve_w_min(type(self.family))  # filled at config time unless the family was not known then
        self.w_min = m.w_min
        self.k = T // m.num_ddim_timesteps
        # DDPM's cumulative alphas, for what only the DDPM methods use (PCM's adversarial noise travel)
        self.alphas_cumprod = (
            None if self.schedule.is_flow else self.family.noise_scheduler.alphas_cumprod.to(self.device)
        )
        self.ddim_timesteps = lcm.ddim_timesteps(T, m.num_ddim_timesteps).to(self.device)

    @property
    def embedded_guidance(self) -> bool:
        """The teacher takes w as an input (FLUX.1-dev): one teacher pass, no CFG pair (Family.guidance_embedded)."""
        if not hasattr(self, "_embedded_guidance"):
            self._embedded_guidance = self.family.guidance_embedded
        return self._embedded_guidance

    supports_flow = False
    """Whether the method distils rectified-flow teachers (its target point, student and sampler have a flow form)."""

    def encoders(self):
        """The family: fingerprint from files; it loads the VAE / text encoders only if the cache is built."""
        return self.family

    # ---- the roles of Algorithm 1 -----------------------------------------------------------------
    def roles(self) -> Roles:
        raise NotImplementedError

    # ---- what LCM, TCD and PCM differ in: the target point and the parameterisation -----------------
    def _end_timesteps(self, index: torch.Tensor, t: torch.Tensor, rng: SampleRNG) -> torch.Tensor | None:
        """The time s the consistency function maps to, per sample; LCM: None (always the origin)."""
        return None

    def _f(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, end: torch.Tensor | None
    ) -> torch.Tensor:
        """LCM's consistency function f = c_skip(t) x + c_out(t) x0_hat (DDPM; x0_hat on a flow:
        diffusion/schedule.py); ``end`` unused."""
        return self.schedule.consistency(model_output, x, t, self.mcfg.timestep_scaling_factor)

    def _sampling_scheduler(self):
        """The stock diffusers scheduler that samples the distilled model (saved with every export)."""
        return self._lcm_scheduler()

    def _sampling_eta(self) -> float | None:
        """``eta`` for the pipeline call (TCD's gamma); None: the pipeline's default."""
        return None

    def _export_scheduler(self):
        """The scheduler saved with the export: the sampling one, unless only ldmkit implements that (flow TCD),
        then the closest stock diffusers scheduler."""
        return self._sampling_scheduler()

    def _sampling_sigmas(self, steps: int) -> list[float] | None:
        """The pipeline call's ``sigmas`` at ``steps`` (flow PCM: its grid points); None: the pipeline's own."""
        return None

    def _record_extras(self) -> dict[str, Any]:
        """SamplingRecord fields a method sets beyond the common ones (``sampler``, ``flow_grid``)."""
        return {}

    # ---- the loss: LCM paper, Algorithm 1 ---------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.consistency_distance(self.consistency_pair(batch, self.roles())), {}

    def consistency_pair(self, batch: dict[str, Any], roles: Roles) -> ConsistencyPair:
        """Steps 1-7 of Algorithm 1: the online and the target consistency function at one batch."""
        m, schedule, family = self.mcfg, self.schedule, self.family
        rng = SampleRNG(batch["seed"], self.device)
        with self.accelerator.autocast():
            # 1. Data: z = E(x) (scaled latents) and the text condition c; uncond for the teacher's CFG.
            z = family.latents(batch, rng)  # cached VAE moments, or the VAE
            cond, uncond = family.conditions(
                batch, resolution=self.cfg.data.resolution, fix_crop_and_size=m.use_fix_crop_and_size
            )
            cond, uncond = ({k: v.float() for k, v in c.items()} for c in (cond, uncond))

            # 2. Sample n ~ U{0..N-1}: t_{n+k} = ddim_timesteps[n] and t_n = max(t_{n+k} - k, 0).
            index = rng.randint(0, m.num_ddim_timesteps).to(self.device)  # (B,)
            t_start = self.ddim_timesteps[index]
            t = (t_start - self.k).clamp(min=0)

            # 3. Forward diffusion: z_{t_{n+k}} = alpha(t_{n+k}) z + sigma(t_{n+k}) eps (DDPMScheduler.add_noise;
            #    on a flow alpha = 1 - sigma). The denoiser is called at its own timestep units (flow: sigma * T).
            noise = rng.randn(*z.shape[1:]).to(z)
            z_start = schedule.add_noise(z, noise, t_start)
            time_start, time_n = schedule.timestep(t_start), schedule.timestep(t)

            # 4. Guidance scale w ~ U[w_min, w_max] (and its embedding when the student has one). A teacher with a
            #    guidance input (FLUX.1-dev) takes w itself, and so do its student and target.
            w = self.w_min + (m.w_max - self.w_min) * rng.rand().to(self.device)  # (B,)
            w_emb = roles.w_embedding(w) if roles.w_embedding is not None else None
            if self.embedded_guidance:
                w_emb = w

            # 4b. The point s both consistency functions map to: what the methods differ in (LCM: 0, via the
            #     boundary scalings; TCD: sampled on the solver grid below t_n; PCM: the lower edge of the phase).
            end = self._end_timesteps(index, t, rng)

            # 5. Online consistency function f_theta(z_{t_{n+k}}, w, c, t_{n+k} -> s).
            model_pred = self._f(family.denoise(roles.student, z_start, time_start, cond, w_emb), z_start, t_start, end)

            # 6. Teacher ODE solver with CFG: z_hat_{t_n} = Psi(z_{t_{n+k}}, t_{n+k}, t_n, c, w) (one DDIM step;
            #    on a flow the Euler step, or Heun's with method.teacher_solver=heun).
            with torch.no_grad(), roles.teacher_context():
                z_prev = self._teacher_step(roles.teacher, z_start, t_start, t, cond, uncond, w).float()

            # 7. Target f_theta^-(z_hat_{t_n}, w, c, t_n -> s), no gradient.
            with torch.no_grad():
                target = self._f(family.denoise(roles.target, z_prev, time_n, cond, w_emb), z_prev, t, end)
        return ConsistencyPair(model_pred, target, end, cond, rng)

    def _guided(self, teacher, x: torch.Tensor, t: torch.Tensor, cond, uncond, w: torch.Tensor):
        """The teacher's (x0_hat, eps_hat) at x_t with guidance w: one pass with w as its input (FLUX.1-dev), or
        classifier-free guidance in the LCM paper's form c + w (c - u) on both."""
        m, schedule, family, time = self.mcfg, self.schedule, self.family, self.schedule.timestep(t)
        if self.embedded_guidance:  # guidance-distilled teacher: w is its input, one pass
            out = family.denoise(teacher, x, time, cond, w)
            return schedule.x0(out, x, t), schedule.eps(out, x, t)
        if m.batch_teacher_passes:
            both = family.denoise(teacher, torch.cat([x, x]), torch.cat([time, time]), _cat_cond(cond, uncond))
            out_c, out_u = both.chunk(2)
        else:
            out_c = family.denoise(teacher, x, time, cond)
            out_u = family.denoise(teacher, x, time, uncond)
        x0_c, x0_u = (schedule.x0(o, x, t) for o in (out_c, out_u))
        eps_c, eps_u = (schedule.eps(o, x, t) for o in (out_c, out_u))
        wb = lcm.append_dims(w, x.ndim)
        return x0_c + wb * (x0_c - x0_u), eps_c + wb * (eps_c - eps_u)

    def _teacher_step(self, teacher, x: torch.Tensor, t_start, t, cond, uncond, w: torch.Tensor) -> torch.Tensor:
        """Psi: one step of the teacher's guided ODE from t_{n+k} to t_n: alpha_{t_n} x0_hat + sigma_{t_n} eps_hat
        (DDIM; on a flow the Euler step x + (sigma_n - sigma_{n+k}) v_hat). Heun (flow only) evaluates the teacher
        again at the Euler point and steps with the mean velocity (diffusion/schedule.py ``heun_step``)."""
        schedule = self.schedule
        x0_hat, eps_hat = self._guided(teacher, x, t_start, cond, uncond, w)
        x_euler = schedule.point(x0_hat, eps_hat, t)
        if self.mcfg.teacher_solver != "heun":
            return x_euler
        v = schedule.velocity(x0_hat, eps_hat)
        v_next = schedule.velocity(*self._guided(teacher, x_euler, t, cond, uncond, w))
        return schedule.heun(x, v, v_next, t_start, t)

    def consistency_distance(self, pair: ConsistencyPair) -> torch.Tensor:
        """Step 8: the consistency distillation loss d(f_theta, f_theta^-) in fp32."""
        if self.mcfg.loss_type == "huber":
            return lcm.pseudo_huber(pair.student, pair.target, self.mcfg.huber_c)
        return F.mse_loss(pair.student.float(), pair.target.float())

    # ---- validation -------------------------------------------------------------------------------
    def _lcm_scheduler(self):
        """LCMScheduler with the run's N and s; on a flow FlowMatchLCMScheduler on the teacher's shifted sigmas
        (it samples x0 = x_t - sigma v and re-noises, the consistency function trained here)."""
        if self.schedule.is_flow:
            from diffusers import FlowMatchLCMScheduler

            return FlowMatchLCMScheduler.from_config(self.family.noise_scheduler.config)
        return lcm.lcm_scheduler(
            self.family.noise_scheduler.config,
            self.mcfg.num_ddim_timesteps,
            self.mcfg.timestep_scaling_factor,
            prediction_type=self.prediction_type,
        )

    def _sampling_unet(self) -> torch.nn.Module:
        raise NotImplementedError

    def _default_guidance(self) -> float:
        raise NotImplementedError

    @torch.no_grad()
    def validate(self, step: int):
        """Rows: cfg.train.validation_prompts; columns: few-step samples at method.validation_steps (fixed seed)."""
        guidance = self.mcfg.validation_guidance
        guidance = self._default_guidance() if guidance is None else guidance
        unet, scheduler, eta = self._sampling_unet(), self._sampling_scheduler(), self._sampling_eta()
        return self.few_step_grid(unet, scheduler, guidance, eta, sigmas=self._sampling_sigmas)

    # ---- how the export is sampled (the record next to it; the model card) ----------------------------
    quickstart_student = True
    is_lora: bool = False
    """A LoRA of the teacher (w baked in, sampled without CFG) or a whole student (w through its embedding)."""

    def _default_steps(self) -> int:
        """Sampling steps the export is meant for (LCM: 4; 1-8 work)."""
        return 4

    def sampling_record(self):
        from ldmkit.inference import SamplingRecord

        guidance = self.mcfg.validation_guidance
        return SamplingRecord(
            method=self.mcfg.name,
            label=self.label,
            kind="lora" if self.is_lora else "pipeline",
            scheduler=type(self._export_scheduler()).__name__,
            steps=self._default_steps(),
            guidance=self._default_guidance() if guidance is None else guidance,
            eta=self._sampling_eta(),
            base=self.base_reference() if self.is_lora else None,
            guidance_embedded=self.embedded_guidance or not (self.is_lora or self.schedule.is_flow),
            few_step=True,
            **self._record_extras(),
        )

    def card_facts(self) -> list[str]:
        r = self.sampling_record()
        facts = [
            f"few-step sampling: {r.steps} steps (1-8 work), guidance_scale {r.guidance}; {self._scheduler_note()}"
        ]
        if self.embedded_guidance:
            facts.append(
                "guidance_scale is the transformer's guidance input, as trained (no classifier-free guidance pass)"
            )
        elif r.guidance_embedded:
            facts.append("guidance_scale is embedded as w = guidance_scale - 1 (no classifier-free guidance pass)")
        return facts

    def _scheduler_note(self) -> str:
        if self.schedule.is_flow:
            return "FlowMatchLCMScheduler with the teacher's shift (the export's scheduler config)"
        return (
            f"LCMScheduler, original_inference_steps={self.mcfg.num_ddim_timesteps}, "
            f"timestep_scaling={self.mcfg.timestep_scaling_factor} (use these at inference)"
        )


def _sharing_weights(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module``'s structure whose parameters and buffers ARE the original's tensors (deepcopy with
    them pre-entered in its memo): no weight memory, and in-place changes (device, dtype, memory format) reach
    both. Frozen and in eval mode: the LCM-LoRA teacher."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo).requires_grad_(False).eval()


class _WithWeights(torch.nn.Module):
    """``module`` called with some of its parameters replaced (``torch.func.functional_call``): the target
    pass reads the LoRA's average while the student's own tensors, saved for backward, stay untouched (an
    in-place swap would change them under autograd)."""

    def __init__(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "inner", module)  # not a submodule: no second copy in state dicts
        self.weights = weights

    @property
    def config(self):
        return self.inner.config

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.inner, self.weights, args, kwargs, strict=False)


class LCMLoraMethod(_LCDBase):
    """LCM-LoRA: one denoiser (UNet or U-ViT); teacher = base weights (without the adapters), student = base + LoRA,
    target = the online student under no_grad (LCM-LoRA report; diffusers train_lcm_distill_lora_*)."""

    Config = LCMLoraConfig
    mcfg: LCMLoraConfig
    label = title = "LCM-LoRA"
    tags = ("lora", "lcm", "lcm-lora", "latent-consistency")
    is_lora = True
    supports_flow = True

    def __init__(self, cfg: Config, accelerator: Accelerator):
        super().__init__(cfg, accelerator)
        from ldmkit.lora import adapters

        m = self.mcfg
        m.resolve_lora(type(self.family))  # targets filled at config time unless the family was not known then
        self.unet = self.family.denoiser  # the one denoiser: frozen base in weight dtype + trainable LoRA
        # The teacher: the same base weights in a module tree without the adapters (taken before they are
        # injected), so its passes skip peft's per-layer wrappers; with plain_teacher off, the adapted denoiser
        # with adapters disabled plays it.
        self.teacher_unet = _sharing_weights(self.unet) if m.plain_teacher else None
        adapters.add_trainable_adapter(self.unet, m, self.cfg.train.seed)  # LoRA weights train in fp32
        self.unet.train()
        # Averages of the LoRA weights only (the base is frozen): a target as full LCD's (constant decay), and
        # a Polyak average to export (warmup, as the U-ViT/finetune EMA). Off by default, as the references.
        # The LoRA's parameters and the target module are found once, not at every step.
        lora = {n: p for n, p in self.unet.named_parameters() if p.requires_grad}
        self._lora = list(lora.values())
        self.target_ema = self.export_ema = None
        self._target: torch.nn.Module = self.unet
        if m.target_ema_decay > 0:
            self.target_ema = EMA(self._lora, decay=m.target_ema_decay, schedule="constant")
            self._target = _WithWeights(self.unet, dict(zip(lora, self.target_ema.shadow_params)))
        if m.export_ema_decay is not None:
            self.export_ema = EMA(self._lora, decay=m.export_ema_decay, schedule="warmup")

    def _lora_params(self) -> list[torch.nn.Parameter]:
        return self._lora

    def roles(self) -> Roles:
        if self.teacher_unet is not None:
            return Roles(student=self.unet, teacher=self.teacher_unet, target=self._target)
        base = self.unwrap(self.unet)
        return Roles(
            student=self.unet, teacher=base, target=self._target, teacher_context=lambda: adapters_disabled(base)
        )

    def after_step(self, step: int) -> None:
        for ema in (self.target_ema, self.export_ema):
            if ema is not None:
                ema.step(self._lora_params())

    def checkpoint_objects(self) -> dict[str, Any]:
        objects = {"lora_target_ema": self.target_ema, "lora_export_ema": self.export_ema}
        return {k: v for k, v in objects.items() if v is not None}

    def _exported_weights(self) -> contextlib.AbstractContextManager:
        """The LoRA weights validation and export use: the export EMA swapped in, or the last weights."""
        if self.export_ema is None:
            return contextlib.nullcontext()
        return self.export_ema.swapped_into(self._lora_params())

    def validate(self, step: int):
        with self._exported_weights():
            return super().validate(step)

    def _sampling_unet(self):
        return self.unwrap(self.unet)

    def _default_guidance(self) -> float:
        return self.family.lcm_lora_guidance

    def export(self, out_dir: Path) -> None:
        """``pytorch_lora_weights.safetensors`` (stock ``load_lora_weights``), a kohya copy (not for DoRA),
        and the sampling scheduler's config with the run's settings (LCM: N and s); the model card:
        ldmkit.methods.card."""
        with self._exported_weights():
            export_denoiser_lora(
                out_dir, self.unwrap(self.unet), self.family, self.mcfg.adapter, self._export_scheduler()
            )


class LCDMethod(_LCDBase):
    """Full LCD: student (fp32, trained) with a w-embedding, EMA target (fp32), frozen teacher (weight dtype)."""

    Config = LCDConfig
    mcfg: LCDConfig
    label, title = "LCM", "Latent Consistency Model"
    tags = ("lcm", "latent-consistency")
    supports_flow = True

    def __init__(self, cfg: Config, accelerator: Accelerator):
        super().__init__(cfg, accelerator)
        m = self.mcfg
        self.teacher_unet = self.family.denoiser  # frozen, weight dtype
        # On a flow transformer (SD3, FLUX.1) the student is the teacher's architecture as it is: FLUX.1-dev takes
        # w through its own guidance embedding (the teacher's input, kept by the student), SD3 has no w input and
        # the student bakes the sampled w in as the LoRA methods do. Elsewhere the UNet / U-ViT student gets the
        # w-embedding projection (time_embedding.cond_proj, U-ViT cond_proj).
        self.w_input = not self.schedule.is_flow
        extra = {"time_cond_proj_dim": m.unet_time_cond_proj_dim} if self.w_input else {}
        have = self.teacher_unet.config.get("time_cond_proj_dim")
        if self.w_input and have is not None and have != m.unet_time_cond_proj_dim:
            raise UserError(f"teacher already has time_cond_proj_dim={have}; set method.unet_time_cond_proj_dim={have}")
        cls = type(self.teacher_unet)
        student = cls.from_config(self.teacher_unet.config, **extra)
        source = self.teacher_unet
        if self.teacher_unet.dtype != torch.float32:  # initialise the fp32 student from the fp32 weights on disk
            source = self.family.load_denoiser(torch.float32)
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
        # The EMA's shadow IS target_unet (updated in place), constant decay: no warmup, as the references.
        self.target_ema = EMA(self.target_unet, decay=m.ema_decay, schedule="constant")

    def _w_embedding(self, w: torch.Tensor) -> torch.Tensor:
        return lcm.guidance_scale_embedding(w, self.mcfg.unet_time_cond_proj_dim)

    def roles(self) -> Roles:
        embedding = self._w_embedding if self.w_input else None
        return Roles(student=self.unet, teacher=self.teacher_unet, target=self.target_unet, w_embedding=embedding)

    def _sampling_unet(self):
        return self.target_unet

    def _default_guidance(self) -> float:
        """8.0 (w = 7) as the references when w = 7 was trained, else the middle of the trained range; a flow
        student samples as the LoRAs do (SD3: w baked in, no CFG; FLUX.1-dev: the pipeline's guidance input)."""
        if not self.w_input:
            return self.family.lcm_lora_guidance
        if self.w_min <= 7.0 <= self.mcfg.w_max:
            return 8.0
        return 1.0 + (self.w_min + self.mcfg.w_max) / 2

    def after_step(self, step: int) -> None:
        """EMA target update: target <- decay * target + (1 - decay) * student."""
        self.target_ema.step(self.unwrap(self.unet).parameters())

    def checkpoint_objects(self) -> dict[str, Any]:
        return {"target_unet": self.target_ema}

    def export(self, out_dir: Path) -> None:
        """A full pipeline folder (the teacher's pipeline class: SD, SDXL or UViTPipeline): the EMA target
        denoiser (with time_cond_proj_dim) + the sampling scheduler with the run's settings (LCM: N and s)."""
        out_dir = Path(out_dir)
        self.family.export_pipeline(
            out_dir, unet=self.target_unet, scheduler=self._export_scheduler(), safety_checker=False
        )
