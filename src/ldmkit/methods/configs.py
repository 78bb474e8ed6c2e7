"""The configs of the built-in methods, in one module that imports neither torch nor the models, so that
``ldmkit train --help`` (and recipe checks) stay fast. Each method module imports its config from here;
field docstrings are the help text."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from ldmkit.config import MethodConfig
from ldmkit.errors import UserError

if TYPE_CHECKING:
    from ldmkit.config import Config


def check_validation_size(mcfg: MethodConfig) -> None:
    """``method.validation_width`` / ``validation_height``: positive multiples of 8 (diffusers' SD
    pipelines refuse other sizes), or null."""
    for key in ("validation_width", "validation_height"):
        value = getattr(mcfg, key, None)
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"method.{key} must be a multiple of 8 (at least 8), got {value}")


ADAPTERS = Literal["lora", "dora", "loha", "lokr"]


@dataclass
class LoraKnobs:
    """The one LoRA config of every method that trains adapters (lora, lcm_lora, tcd_lora, pcm_lora): one rule
    for alpha (null = the rank, scale 1) and one for the targets (null = the model family's defaults for the
    method's purpose), both filled in when the config is resolved (``resolve_lora``) so that ``--dry-run`` and
    config.yaml show what trains. The adapters are built in one place (ldmkit.lora.adapters.add_trainable_adapter),
    their random init seeded from train.seed."""

    lora_targets: ClassVar[str] = "finetune"
    """Which family defaults a null ``lora_target_modules`` takes: "finetune" (the attention projections, as
    diffusers' train_text_to_image_lora.py) or "distill" (every module kind LCM-LoRA adapts)."""

    adapter: ADAPTERS = "lora"
    """Adapter kind (peft): lora | dora (loads in diffusers) | loha, lokr (exported as an exact LoRA that any LoRA loader reads)."""
    lora_rank: int = 4
    """LoRA rank r."""
    lora_alpha: float | None = None
    """LoRA alpha (the update is scaled by alpha / rank); null: equal to the rank (scale 1)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch (draws from torch's global RNG, seeded per batch from the samples' seeds)."""
    lora_target_modules: list[str] | None = None
    """Denoiser modules that get adapters (name suffixes, e.g. to_q, to_out.0, conv1, time_emb_proj); null: the
    family's defaults (fine-tuning: the attention projections; distillation: the 14 UNet module kinds of
    diffusers' LCM-LoRA scripts, or a U-ViT's attention and MLP projections)."""

    def resolve_lora(self, family: type | None) -> None:
        """Fill alpha (and, when ``family`` is known, the targets) and check the values in effect."""
        if self.lora_rank < 1:
            raise UserError(f"method.lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        if not self.lora_alpha > 0:  # also NaN
            raise UserError(f"method.lora_alpha must be positive (or null: the rank), got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"method.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise UserError("method.lora_target_modules is empty (null selects the model family's defaults)")
        if self.lora_target_modules is None and family is not None:
            self.lora_target_modules = list(family.default_lora_targets(self.lora_targets))


# ----------------------------------------------------------------------------- finetune


PIPELINE_GUIDANCE = {"SD3": 7.0, "FLUX": 3.5}
"""guidance_scale defaults of StableDiffusion3Pipeline and FluxPipeline, by family name (the others: 7.5)."""

# CLIP attention projections (diffusers' text-encoder LoRA default).
DEFAULT_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class _SDTrainConfig(MethodConfig):
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Train for this prediction type instead of the scheduler's (written into exported schedulers)."""
    snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (5.0 recommended by the paper); null: plain MSE."""
    noise_offset: float = 0.0
    """Add noise_offset * N(0, 1) per channel to the noise (brighter/darker images; 0.05-0.1)."""
    input_perturbation: float = 0.0
    """Perturb the noise fed to the UNet (not the target) by this much (0.1 in the reference)."""
    train_text_encoder: bool = False
    """Also train the text encoder(s) (full weights for finetune, LoRA for lora). Needs uncached text."""
    use_fix_crop_and_size: bool = False
    """SDXL: condition on (h, w, 0, 0, h, w) of the crop (res x res, or the bucket with data.buckets) instead of each image's original size and crop."""
    validation_steps: list[int] = field(default_factory=lambda: [25])
    """Sampling step counts of the validation grids, one column each (the folder's own scheduler)."""
    validation_guidance: float | None = None
    """Guidance scale of the validation images; null: the family's pipeline default (SD3 7.0, FLUX 3.5; SD1.x/2.x
    and SDXL 7.5)."""
    validation_width: int | None = None
    """Width of the validation images; default: the data's most common bucket with data.buckets, else data.resolution."""
    validation_height: int | None = None
    """Height of the validation images; default: the data's most common bucket with data.buckets, else data.resolution."""
    weighting_scheme: Literal["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"] = "none"
    """SD3 / FLUX (rectified flow): the timestep density (logit_normal, mode) or loss weight (cosmap, sigma_sqrt) of
    diffusers' train_dreambooth_lora_sd3.py / _flux.py; none: uniform sigma, unweighted (their default)."""
    logit_mean: float = 0.0
    """SD3 / FLUX, weighting_scheme logit_normal: mean m of u = sigmoid(N(m, s^2)), where u picks the (shifted) sigma."""
    logit_std: float = 1.0
    """SD3 / FLUX, weighting_scheme logit_normal: std s of u = sigmoid(N(m, s^2))."""
    mode_scale: float = 1.29
    """SD3 / FLUX, weighting_scheme mode: scale c of the mode density (SD3 paper eq. 20)."""
    flow_shift: float | None = None
    """SD3 / FLUX: shift s of the trained sigmas, s sigma / (1 + (s - 1) sigma); null: as the scheduler trains (and
    diffusers' scripts): its static shift (SD3: 3.0), none on a scheduler that shifts by resolution (FLUX.1-dev)."""
    flow_resolution_shift: bool = False
    """SD3 / FLUX: shift the trained sigmas by the batch's image token count as the pipeline samples (FLUX.1-dev's
    dynamic shifting, calculate_shift; SD3 paper section 5.3.2; kohya's --timestep_sampling flux_shift)."""
    guidance_scale: float | None = None
    """FLUX.1-dev (a guidance-distilled transformer): the guidance embedding's input while training (diffusers'
    train_dreambooth_lora_flux.py --guidance_scale); null: 3.5, theirs and FluxPipeline's default."""

    def resolve_flow(self, family: type | None) -> None:
        """Against the family's objective (when known): a flow family (SD3, FLUX) refuses the DDPM knobs, a DDPM family
        the flow knobs; ``validation_guidance`` null becomes the family's pipeline default."""
        if family is None:
            return
        if self.validation_guidance is None:
            self.validation_guidance = PIPELINE_GUIDANCE.get(family.name, 7.5)
        flow = getattr(family, "objective", "diffusion") == "flow"
        ddpm_set = {
            "prediction_type": self.prediction_type is not None,
            "snr_gamma": self.snr_gamma is not None,
            "noise_offset": self.noise_offset != 0.0,
            "input_perturbation": self.input_perturbation != 0.0,
        }
        flow_set = {
            "weighting_scheme": self.weighting_scheme != "none",
            "flow_shift": self.flow_shift is not None,
            "flow_resolution_shift": self.flow_resolution_shift,
            "guidance_scale": self.guidance_scale is not None,
        }
        wrong = [k for k, on in (ddpm_set if flow else flow_set).items() if on]
        if wrong:
            kind = "a rectified-flow model (the flow loss has no such knob)" if flow else "a DDPM model (flow knobs)"
            raise UserError(f"method.{wrong[0]} does not apply to {family.name}, {kind}: unset it")

    def check(self, cfg) -> None:
        """Value checks (ldmkit.config.validate_config calls this)."""
        if self.logit_std <= 0:
            raise UserError(f"method.logit_std must be > 0, got {self.logit_std}")
        if self.flow_shift is not None and not self.flow_shift > 0:
            raise UserError(f"method.flow_shift must be > 0 (or null), got {self.flow_shift}")
        if self.flow_shift is not None and self.flow_resolution_shift:
            raise UserError("method.flow_shift and method.flow_resolution_shift both shift the sigmas: set one")
        if self.train_text_encoder and (cfg.data.cache or cfg.data.format == "features"):
            raise UserError(
                "method.train_text_encoder needs captions, but data.cache / features data give fixed text embeddings; disable one"
            )
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UserError(f"method.snr_gamma must be positive (or null), got {self.snr_gamma}")
        if not self.validation_steps or min(self.validation_steps) < 1:
            raise UserError(f"method.validation_steps must be step counts >= 1, got {self.validation_steps}")
        check_validation_size(self)


@dataclass
class FinetuneConfig(_SDTrainConfig):
    name: str = "finetune"
    """Training method: finetune | lora | lcm_lora | lcd | tcd_lora | tcd | pcm_lora | pcm | dmd2_lora | dmd2 | uvit | vae."""
    use_ema: bool = False
    """Keep an EMA of the UNet weights, used for validation and export."""
    ema_decay: float = 0.9999
    """EMA decay (diffusers EMAModel: ramps up as (1 + step) / (10 + step) until it reaches this)."""


@dataclass
class LoraMethodConfig(LoraKnobs, _SDTrainConfig):
    name: str = "lora"
    """Training method: finetune | lora | lcm_lora | lcd | tcd_lora | tcd | pcm_lora | pcm | dmd2_lora | dmd2 | uvit | vae."""
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TEXT_TARGETS))
    """Text-encoder modules that get adapters when train_text_encoder is true."""

    def check(self, cfg) -> None:
        super().check(cfg)
        self.resolve_lora(None)  # the targets: Method.check_model, which knows the family
        if not self.text_encoder_target_modules:
            raise UserError("method.text_encoder_target_modules is empty")


# ----------------------------------------------------------------------------- lcd


@dataclass
class LCDCommonConfig(MethodConfig):
    """Knobs shared by lcd and lcm_lora (defaults: diffusers / PaddleMIX references)."""

    w_min: float | None = None
    """Smallest guidance scale w sampled per sample; null: the family's (SD1.x 5.0, SDXL 3.0: the references')."""
    w_max: float | None = None
    """Largest guidance scale w (teacher CFG in the LCM form x0 = c + w (c - u); a teacher with a guidance input,
    FLUX.1-dev, takes w itself); null: the family's (SD1.x / SDXL 15.0, the references')."""
    num_ddim_timesteps: int = 50
    """N: DDIM solver grid size; skipping step k = T // N. Written to the exported LCM/TCD scheduler as original_inference_steps."""
    loss_type: Literal["l2", "huber"] = "l2"
    """Distance between student and target: l2 (MSE) or pseudo-Huber (the recipes use huber)."""
    huber_c: float = 0.001
    """c of the pseudo-Huber loss sqrt(d^2 + c^2) - c."""
    timestep_scaling_factor: float = 10.0
    """s in the boundary scalings c_skip/c_out(s * t); higher s = smaller approximation error. Exported as timestep_scaling.
    LCM only: TCD and PCM's consistency function has no boundary scalings."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """What the teacher predicts; null: the teacher scheduler's prediction_type."""
    use_fix_crop_and_size: bool = True
    """SDXL: condition on (h, w, 0, 0, h, w) of the crop (res x res, or the bucket with data.buckets) instead of each image's original size and crop."""
    batch_teacher_passes: bool = True
    """Run the teacher's conditional and unconditional passes as one batched forward (false: two passes, as the references)."""
    teacher_solver: Literal["euler", "heun"] = "euler"
    """The teacher's ODE step t_{n+k} -> t_n: euler (first order: the DDIM step, on a rectified flow the Euler step
    over the shifted sigmas, as the references) or heun (flow teachers only: a second teacher evaluation, as the
    PCM authors' SD3 scripts offer)."""
    validation_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """LCM sampling step counts shown in each validation grid (columns)."""
    validation_guidance: float | None = None
    """Pipeline guidance_scale for validation; null: 1.0 for LoRA (0.0 SDXL), 8.0 for full LCD (embedded as w = 7)."""
    validation_width: int | None = None
    """Width of the validation images; default: the data's most common bucket with data.buckets, else data.resolution."""
    validation_height: int | None = None
    """Height of the validation images; default: the data's most common bucket with data.buckets, else data.resolution."""

    def resolve_w_min(self, family: type | None) -> None:
        """w_min and w_max in effect: the family's defaults when null (SD 5.0 / 15.0, SDXL 3.0 / 15.0: the
        references'), checked against each other. ``family`` None (not known before loading): the method fills
        them in and calls this again."""
        if self.w_min is None and family is not None:
            self.w_min = family.lcd_w_min
        if self.w_max is None and family is not None:
            self.w_max = family.lcd_w_max
        if self.w_max is not None and not self.w_max >= 0:
            raise UserError(f"method.w_max must be >= 0, got {self.w_max}")
        if self.w_min is not None and self.w_max is not None and self.w_min > self.w_max:
            raise UserError(f"method.w_min ({self.w_min}) must be <= method.w_max ({self.w_max})")

    def check(self, cfg: Config) -> None:
        self.resolve_w_min(None)
        if self.num_ddim_timesteps < 1:
            raise UserError(f"method.num_ddim_timesteps must be >= 1, got {self.num_ddim_timesteps}")
        if self.huber_c <= 0:
            raise UserError(f"method.huber_c must be > 0, got {self.huber_c}")
        if self.timestep_scaling_factor <= 0:
            raise UserError(f"method.timestep_scaling_factor must be > 0, got {self.timestep_scaling_factor}")
        bad = [s for s in self.validation_steps if not 1 <= s <= self.num_ddim_timesteps]
        if bad:
            raise UserError(f"method.validation_steps must lie in 1..num_ddim_timesteps, got {bad}")
        check_validation_size(self)


@dataclass
class LCMLoraConfig(LoraKnobs, LCDCommonConfig):
    """LCM-LoRA: distil the teacher into a LoRA of itself (the base model with adapters off is the teacher)."""

    lora_targets: ClassVar[str] = "distill"

    name: str = "lcm_lora"
    lora_rank: int = 64
    """LoRA rank r (diffusers' LCM-LoRA scripts: 64)."""
    lora_alpha: float | None = None
    """LoRA alpha; the update is scaled by alpha / r; null: the rank (diffusers 64/64; PaddleMIX 8/64 = 0.125)."""
    target_ema_decay: float = 0.0
    """Target f_theta^- = base + an EMA of the LoRA weights with this decay (constant, as full LCD's target);
    0: the online LoRA, as the LCM-LoRA references (diffusers train_lcm_distill_lora_*)."""
    export_ema_decay: float | None = None
    """Export and validate an EMA of the LoRA weights (warmup schedule, capped at this decay) instead of the
    last weights; null: the last weights, as the references."""
    plain_teacher: bool = True
    """The teacher's passes run a copy of the denoiser without adapter layers that shares the base weights (no
    second copy of them: same tensors), so they do not pay for the adapters' wrappers; false: the adapted
    denoiser with its adapters disabled. The same numbers either way (tests/test_speed_levers.py)."""

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        self.resolve_lora(None)  # the targets: Method.check_model, which knows the family
        if not 0.0 <= self.target_ema_decay < 1.0:
            raise UserError(f"method.target_ema_decay must be in [0, 1), got {self.target_ema_decay}")
        if self.export_ema_decay is not None and not 0.0 < self.export_ema_decay < 1.0:
            raise UserError(f"method.export_ema_decay must be in (0, 1) or null, got {self.export_ema_decay}")


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


# ----------------------------------------------------------------------------- tcd


@dataclass
class TCDKnobs:
    """What TCD adds to the LCD knobs."""

    end_time_sampling: Literal["uniform", "zero"] = "uniform"
    """Target point s of the trajectory consistency function: uniform over the solver grid points in [0, t_n]
    (TCD), or always 0 (LCM's target with TCD's parameterisation, for ablations)."""
    gamma: float = 0.3  # diffusion/tcd.py DEFAULT_GAMMA (TCD's default)
    """Sampling stochasticity of TCDScheduler (``eta`` of the pipeline call) for validation and the model card;
    0 deterministic, 1 fully stochastic (TCD paper Algorithm 4; 0.3 its default)."""

    def check(self, cfg: Config) -> None:
        super().check(cfg)  # type: ignore[misc]
        if not 0.0 <= self.gamma <= 1.0:
            raise UserError(f"method.gamma must be in [0, 1], got {self.gamma}")


@dataclass
class TCDLoraConfig(TCDKnobs, LCMLoraConfig):
    """TCD-LoRA: a LoRA of the teacher (adapters off = the teacher), trajectory consistency targets."""

    name: str = "tcd_lora"


@dataclass
class TCDConfig(TCDKnobs, LCDConfig):
    """Full TCD: a student with a w-embedding, an EMA target, a frozen teacher; trajectory consistency targets."""

    name: str = "tcd"


# ----------------------------------------------------------------------------- pcm


@dataclass
class PCMKnobs:
    """What PCM adds to the LCD knobs."""

    num_phases: int = 4
    """K: sub-trajectories the ODE is split into (the reference's --multiphase; its SD1.5 script uses 4). Sample
    with K steps (or a divisor of K) to land on the trained edges."""
    adv_weight: float = 0.0
    """Weight of PCM's adversarial consistency loss (the reference's --adv_weight: 0.1 in its *_adv.py scripts);
    0: off, no discriminator. A discriminator (the frozen teacher's block features + trainable heads) tells the
    target's phase-edge point from the student's, both re-noised into the phase above (methods/pcm.py)."""
    adv_start: int = 0
    """Optimizer steps before the adversarial term and its discriminator switch on (the reference: from the start)."""
    adv_lr: float = 1e-5
    """Learning rate of the discriminator heads (the reference's --adv_lr), AdamW betas (0, 0.999) as its
    discriminator optimizer; their own group of the one optimizer (train.lr_scheduler and scale_lr apply as to
    the student)."""
    adv_heads: Literal["full", "light"] | None = None
    """Discriminator layout: full (reference discriminator_sd15.py: 4 heads with 3x3 convolutions on every down,
    mid and up block output) or light (discriminator_sdxl.py: 1 head with 1x1 convolutions on the down and mid
    block outputs; the teacher's pass stops after the mid block); null: full for SD1.x, light for SDXL and the
    U-ViT (in-, mid- and out-block tokens as its down, mid and up blocks)."""

    def check(self, cfg: Config) -> None:
        super().check(cfg)  # type: ignore[misc]
        if not 1 <= self.num_phases <= self.num_ddim_timesteps:  # type: ignore[attr-defined]
            raise UserError(
                f"method.num_phases must be in 1..num_ddim_timesteps ({self.num_ddim_timesteps}), "  # type: ignore[attr-defined]
                f"got {self.num_phases}"
            )
        for key, value in (("adv_weight", self.adv_weight), ("adv_start", self.adv_start)):
            if value < 0:
                raise UserError(f"method.{key} must be >= 0, got {value}")
        if self.adv_lr <= 0:
            raise UserError(f"method.adv_lr must be > 0, got {self.adv_lr}")


@dataclass
class PCMLoraConfig(PCMKnobs, LCMLoraConfig):
    """PCM-LoRA: a LoRA of the teacher (adapters off = the teacher), phased consistency targets."""

    name: str = "pcm_lora"


@dataclass
class PCMConfig(PCMKnobs, LCDConfig):
    """Full PCM: a student with a w-embedding, an EMA target, a frozen teacher; phased consistency targets."""

    name: str = "pcm"


# ----------------------------------------------------------------------------- dmd2


@dataclass
class DMD2Knobs(MethodConfig):
    """DMD2 (Yin et al. 2024, arXiv:2405.14867); defaults of the reference's SD1.5 experiment scripts
    (tianweiy/DMD2 experiments/sdv1.5/laion6.25_sd_baseline_8node_guidance1.75_*_dfake10_diffusion1000_gan1e-3_*.sh)
    unless said otherwise; its SDXL scripts (experiments/sdxl/) use real_guidance_scale 8, ratio 5, GAN 5e-3 and
    a 4-step generator with backward simulation."""

    quickstart_step_cost: ClassVar[float] = 2.13
    """Seconds of a step per LCM-LoRA step on the quickstart's teacher (the planner's estimate): 1068 s against
    501 s for 1500 steps of dmd2_lora and lcm_lora, one run each in one --out on the same machine."""

    real_guidance_scale: float = 1.75
    """Classifier-free guidance of the real score (the frozen teacher), in diffusers' form u + g (c - u) (the
    reference's --real_guidance_scale; SDXL 8). A teacher with a guidance input (FLUX.1-dev) takes it as input."""
    dfake_gen_update_ratio: int = 10
    """Two time scales: the fake score (and the classifier) updates every step, the generator every this many
    (the reference's --dfake_gen_update_ratio; SDXL 5)."""
    min_step_percent: float = 0.02
    """Lowest timestep of the distribution-matching gradient, as a share of T (the reference's default)."""
    max_step_percent: float = 0.98
    """Highest timestep of the distribution-matching gradient, as a share of T (the reference's default)."""
    dm_loss_weight: float = 1.0
    """Weight of the distribution-matching loss in the generator's (--dm_loss_weight)."""
    gen_cls_loss_weight: float = 1e-3
    """Weight of the GAN term in the generator's loss (--gen_cls_loss_weight; SDXL 5e-3); 0: no GAN term, no
    classifier (the reference's first, from-scratch stage)."""
    guidance_cls_loss_weight: float = 1e-2
    """Weight of the classifier's loss in the fake score's (--guidance_cls_loss_weight)."""
    diffusion_gan_max_timestep: int = 1000
    """The classifier sees real and generated latents noised at t ~ U{0..this-1} (--diffusion_gan
    --diffusion_gan_max_timestep 1000); 0: on the clean latents."""
    num_denoising_steps: int = 1
    """Steps of the generator: 1 (one step from pure noise at t = T - 1) or K (the timesteps a K-step
    LCMScheduler visits, [999, 749, 499, 249] for 4: the reference's SDXL 4-step schedule)."""
    sampler_grid: int | None = None
    """original_inference_steps of the exported LCMScheduler; null: num_denoising_steps, so K steps visit exactly
    the generator's timesteps. A multiple of K also samples at more steps than K (at timesteps between the trained
    ones, e.g. 8 for the quickstart's 8-step row of a 4-step generator). DDPM teachers only: a flow pipeline
    spaces its own sigmas (FlowMatchLCMScheduler), the generator is trained at those."""
    backward_simulation: bool = False
    """Multi-step generators: the input at step k is the generator's own k-step sample re-noised (no gradient),
    not a noised training image (--backward_simulation; the reference's 4-step SDXL model uses it)."""
    guidance_lr: float | None = None
    """Learning rate of the fake score and classifier; null: train.learning_rate (the reference uses equal ones)."""
    validation_steps: list[int] = field(default_factory=lambda: [1])
    """Sampling step counts in each validation grid (1 to sampler_grid; any on a rectified flow)."""
    validation_guidance: float | None = None
    """Pipeline guidance_scale of validation and of the export's record; null: the family's no-CFG value."""
    validation_width: int | None = None
    """Width of the validation images; default: the data's most common bucket with data.buckets, else data.resolution."""
    validation_height: int | None = None
    """Height of the validation images; default: the data's most common bucket with data.buckets, else data.resolution."""

    def check(self, cfg: Config) -> None:
        if self.dfake_gen_update_ratio < 1:
            raise UserError(f"method.dfake_gen_update_ratio must be >= 1, got {self.dfake_gen_update_ratio}")
        if not 0.0 <= self.min_step_percent < self.max_step_percent <= 1.0:
            raise UserError(
                "method.min_step_percent and max_step_percent must satisfy 0 <= min < max <= 1, got "
                f"{self.min_step_percent}, {self.max_step_percent}"
            )
        for key in ("real_guidance_scale", "dm_loss_weight", "gen_cls_loss_weight", "guidance_cls_loss_weight"):
            if not getattr(self, key) >= 0:
                raise UserError(f"method.{key} must be >= 0, got {getattr(self, key)}")
        if self.num_denoising_steps < 1:
            raise UserError(f"method.num_denoising_steps must be >= 1, got {self.num_denoising_steps}")
        if self.guidance_lr is not None and not self.guidance_lr > 0:
            raise UserError(f"method.guidance_lr must be > 0 (or null), got {self.guidance_lr}")
        if self.diffusion_gan_max_timestep < 0:
            raise UserError(f"method.diffusion_gan_max_timestep must be >= 0, got {self.diffusion_gan_max_timestep}")
        grid = self.sampler_grid or self.num_denoising_steps
        if grid % self.num_denoising_steps:
            raise UserError(
                f"method.sampler_grid ({grid}) must be a multiple of num_denoising_steps ({self.num_denoising_steps})"
            )
        check_validation_size(self)

    def resolve_flow(self, family: type | None) -> None:
        """The sampling grid against the family's objective, once it is known (config time for a model folder,
        else the method's start). DDPM: the export's LCMScheduler has sampler_grid points and samples 1 to
        sampler_grid steps. Rectified flow: the pipeline spaces its own sigmas, where FlowMatchLCMScheduler
        samples any step count (x0, re-noised to the next sigma): sampler_grid stays unset, any step count goes."""
        if family is None:
            return
        if getattr(family, "objective", "diffusion") == "flow":
            if self.sampler_grid not in (None, self.num_denoising_steps):
                raise UserError(
                    f"method.sampler_grid sets LCMScheduler's grid (DDPM teachers); {family.name}'s pipeline spaces "
                    "its own sigmas: leave it unset"
                )
            bad = [s for s in self.validation_steps if s < 1]
            if bad:
                raise UserError(f"method.validation_steps must be >= 1, got {bad}")
            return
        grid = self.sampler_grid or self.num_denoising_steps
        bad = [s for s in self.validation_steps if not 1 <= s <= grid]
        if bad:
            raise UserError(f"method.validation_steps must lie in 1..sampler_grid ({grid}), got {bad}")


@dataclass
class DMD2LoraConfig(LoraKnobs, DMD2Knobs):
    """DMD2 as LoRAs of one denoiser: generator and fake score are two adapters on the frozen base, the real score
    is the base itself (one set of base weights; the reference keeps three whole UNets)."""

    lora_targets: ClassVar[str] = "distill"
    quickstart_distill_factor: ClassVar[float] = 400 / 1500
    """The quickstart distils dmd2_lora for this share of LCM-LoRA's steps (quickstart/plan.py): on the full
    quickstart's teacher (seed 0, configs/dmd2_lora/quickstart.yaml) the 1-step FD to the data rose with the
    length, 0.113 / 0.157 / 0.172 after 400 / 800 / 1500 steps (4 steps: 0.075 / 0.084 / 0.099), while the
    1-step adherence stayed within its noise (0.758 / 0.800 / 0.775; README "One step: DMD2")."""

    name: str = "dmd2_lora"
    lora_rank: int = 64
    """LoRA rank r of the generator and of the fake score (the reference's SDXL LoRA script: 64)."""

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        self.resolve_lora(None)


@dataclass
class DMD2Config(DMD2Knobs):
    """DMD2 with whole networks: generator and fake score are trainable copies of the teacher (fp32), the real
    score the frozen teacher (weight dtype); train.gradient_checkpointing and bf16 save memory."""

    name: str = "dmd2"


# ----------------------------------------------------------------------------- uvit


Arch = Literal["uvit-tiny", "uvit-s", "uvit-s-deep", "uvit-m", "uvit-l", "uvit-h"]


@dataclass
class UViTConfig(MethodConfig):
    name: str = "uvit"
    arch: Arch = "uvit-s"
    """U-ViT size preset (models/uvit.py UVIT_PRESETS): uvit-s is U-ViT-S/2 (~45M), uvit-s-deep ~58M."""
    embed_dim: int | None = None
    """Override the preset's token width."""
    depth: int | None = None
    """Override the preset's depth (in + out blocks; even)."""
    num_heads: int | None = None
    """Override the preset's attention heads."""
    patch_size: int = 2
    """Latent patch size of the patch embedding."""
    sample_size: int | None = None
    """Latent side length; default: data.resolution / the VAE's downsampling factor."""
    context_dim: int | None = None
    """Width of the text embeddings; default (and required value): the text encoder's hidden size."""
    prediction_type: Literal["epsilon", "v_prediction", "flow"] = "epsilon"
    """What the network predicts (the original: epsilon); flow: the rectified-flow velocity eps - x_0 on x_t =
    (1 - sigma) x_0 + sigma eps (SD3's objective: Esser et al. 2024), exported as a flow U-ViT with a
    FlowMatchEulerDiscreteScheduler."""
    snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (Hang et al. 2023; they use 5); null: plain MSE, as the original. Short
    from-scratch runs converge far faster with it (see configs/uvit/quickstart.yaml). DDPM only."""
    flow_shift: float = 1.0
    """prediction_type flow: shift s of the sigmas, s sigma / (1 + (s - 1) sigma) (SD3 paper eq. 23; SD3's scheduler:
    3.0 at 1024 px), used for training and saved as the exported scheduler's ``shift``."""
    weighting_scheme: Literal["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"] = "logit_normal"
    """prediction_type flow: the density of the training sigmas (SD3 paper section 3.1; its best: logit_normal)."""
    logit_mean: float = 0.0
    """prediction_type flow, logit_normal: mean m of u = sigmoid(N(m, s^2))."""
    logit_std: float = 1.0
    """prediction_type flow, logit_normal: std s of u = sigmoid(N(m, s^2))."""
    p_uncond: float | None = 0.1
    """Classifier-free guidance dropout; written into data.proportion_empty_prompts (null: leave that as set)."""
    scale_factor: float | None = None
    """Latent scale; default: the VAE config's scaling_factor. U-ViT's MS-COCO runs use 0.23010 (SD: 0.18215)."""
    ema_decay: float = 0.9999
    """Maximum EMA decay of the exported weights."""
    ema_power: float = 0.6666666666666666
    """EMA warmup power (diffusers EMAModel use_ema_warmup): decay = 1 - (1 + step)^-power, capped at ema_decay."""
    validation_steps: list[int] = field(default_factory=lambda: [50])
    """DPM-Solver step counts of the validation grids (columns, times validation_images_per_prompt)."""
    validation_guidance: float = 7.5
    """Classifier-free guidance scale of the validation grids (diffusers convention)."""
    validation_images_per_prompt: int = 2
    """Images per prompt and step count in the validation grid."""
    pooled_context: bool = False
    """Add a projection of the mean text embedding to every patch token (models/uvit.py ``pooled_context``), a
    direct path from the caption besides the original's attention to text tokens."""
    train_text_encoder: bool = False
    """Train the text encoder of model.pretrained with the U-ViT (GLIDE, Nichol et al. 2022, trains its text
    transformer from scratch jointly with the diffusion model); the export carries the trained encoder (EMA
    weights, as the U-ViT's). For captions a frozen encoder does not tell apart well enough, e.g. a random one
    on captions that differ in one word (configs/uvit/quickstart.yaml says what it measured). With data.cache
    the latents come from the cache and the captions are encoded every step."""

    def check(self, cfg: Config) -> None:
        """Called when the config is resolved: apply p_uncond to the data layer."""
        if self.train_text_encoder and cfg.data.format == "features":
            raise UserError(
                "method.train_text_encoder needs captions, but features data gives fixed text embeddings; "
                "use image data (with data.cache=true for cached latents) or set method.train_text_encoder=false"
            )
        if cfg.data.buckets:
            raise UserError(
                "method uvit keeps its fixed latent grid (position embeddings of one size): "
                "data.buckets is not available, set data.buckets: false"
            )
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UserError(f"method.snr_gamma must be > 0 (or null), got {self.snr_gamma}")
        if self.prediction_type == "flow" and self.snr_gamma is not None:
            raise UserError("method.snr_gamma weights DDPM timesteps; with prediction_type flow set it to null")
        if not self.flow_shift > 0 or not self.logit_std > 0:
            raise UserError("method.flow_shift and method.logit_std must be > 0")
        if self.p_uncond is None:
            return
        if not 0.0 <= self.p_uncond <= 1.0:
            raise UserError(f"method.p_uncond must be in [0, 1], got {self.p_uncond}")
        current = cfg.data.proportion_empty_prompts
        if current not in (0.0, self.p_uncond):
            raise UserError(
                f"method.p_uncond={self.p_uncond} conflicts with data.proportion_empty_prompts={current}; "
                "set one of them (or method.p_uncond=null)"
            )
        cfg.data.proportion_empty_prompts = self.p_uncond


# ----------------------------------------------------------------------------- vae


@dataclass
class VAEConfig(MethodConfig):
    name: str = "vae"
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    """Encoder/decoder widths per level (from scratch); n levels downsample by 2^(n-1) (SD: [128, 256, 512, 512])."""
    layers_per_block: int = 1
    """ResNet layers per level (from scratch; SD: 2)."""
    latent_channels: int = 4
    """Latent channels (from scratch)."""
    norm_num_groups: int = 32
    """GroupNorm groups (from scratch); must divide every width."""
    mid_block_attention: bool = True
    """Self-attention in the encoder/decoder mid-blocks (from scratch; SD: true). Off makes a small VAE's
    steps cheaper (attention over the lowest-resolution map is a large share of its cost)."""
    loss: Literal["l1", "l2"] = "l1"
    """Reconstruction loss."""
    kl_weight: float = 1e-6
    """Weight of the KL term (LDM's convention, see the module docstring)."""
    stats_momentum: float = 0.99
    """Momentum of the running latent statistics that give the exported scaling_factor."""
    validation_images: int = 4
    """Images of the originals-vs-reconstructions grid (taken from the first training batch)."""
    train_encoder: bool = True
    """false: freeze the encoder (and its quant_conv) and fine-tune only the decoder, as Stability's
    sd-vae-ft-ema / sd-vae-ft-mse were fine-tuned from SD's kl-f8 VAE: the latent space stays what it was,
    so every UNet trained on the VAE's latents keeps working with the new decoder. Needs a VAE to fine-tune
    (model.vae or model.pretrained)."""
    recompute_scaling_factor: bool | None = None
    """Write 1/std of the training latents as the exported scaling_factor. null: yes for a VAE trained from
    scratch, no when fine-tuning an existing VAE (every SD pipeline it is dropped into decodes with the given
    factor: a changed one would mis-scale them all)."""
    lpips_weights: str | None = None
    """Perceptual distance as a local TorchScript file, called as net(x, y) on images in [-1, 1] and returning
    per-sample (or per-pixel) distances, e.g. LPIPS-VGG saved with
    torch.jit.trace(lpips.LPIPS(net="vgg").eval(), (x, x)).save(path) where its weights are at hand.
    null: no perceptual term (nothing is ever downloaded)."""
    perceptual_weight: float | None = None
    """Weight of the perceptual term (LDM: 1.0). null: 1.0 with lpips_weights, 0.0 without (config.yaml shows
    which)."""
    disc_weight: float = 0.0
    """Weight of the adversarial term, times the adaptive weight (SD's kl-f8 VAE: 0.5). 0: no discriminator."""
    disc_start: int = 0
    """Optimizer steps before the discriminator and the adversarial term switch on (SD's kl-f8 VAE: 50001):
    the autoencoder first learns to reconstruct."""
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    """Discriminator loss: hinge 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(rec))), or vanilla (softplus)."""
    disc_layers: int = 3
    """Stride-2 layers of the PatchGAN discriminator (LDM: 3); data.resolution must be >= 3 * 2**disc_layers."""
    disc_channels: int = 64
    """Width of the discriminator's first layer (LDM: 64); doubles per layer, at most 8x."""
    disc_norm: Literal["batch", "group"] = "batch"
    """Discriminator normalisation: batch (LDM's BatchNorm: statistics per process) or group (per sample:
    N processes reproduce one)."""

    def check(self, cfg: Config) -> None:
        """Called when the config is resolved: the perceptual term's file and weight, the GAN's settings."""
        if not self.train_encoder and cfg.model.vae is None and not cfg.model.pretrained:
            raise UserError(
                "method.train_encoder=false fine-tunes a VAE's decoder: name the VAE (model.vae or model.pretrained)"
            )
        if self.lpips_weights is not None and not Path(self.lpips_weights).is_file():
            raise UserError(f"method.lpips_weights: no such file: {self.lpips_weights}")
        if self.perceptual_weight is None:
            self.perceptual_weight = 1.0 if self.lpips_weights else 0.0
        if self.perceptual_weight < 0:
            raise UserError(f"method.perceptual_weight must be >= 0, got {self.perceptual_weight}")
        if self.perceptual_weight > 0 and not self.lpips_weights:
            raise UserError(
                f"method.perceptual_weight={self.perceptual_weight} needs method.lpips_weights "
                "(a local TorchScript perceptual network); nothing is downloaded"
            )
        for key, value, low in (("disc_weight", self.disc_weight, 0), ("disc_start", self.disc_start, 0)):
            if value < low:
                raise UserError(f"method.{key} must be >= {low}, got {value}")
        if self.disc_weight > 0:
            if self.disc_layers < 1 or self.disc_channels < 1:
                raise UserError(
                    f"method.disc_layers and method.disc_channels must be >= 1, got {self.disc_layers}, {self.disc_channels}"
                )
            low = 3 * 2**self.disc_layers  # models/discriminator.py PatchDiscriminator.min_size
            if cfg.data.resolution < low:
                raise UserError(
                    f"data.resolution={cfg.data.resolution} is too small for method.disc_layers={self.disc_layers} "
                    f"(needs >= {low}); lower disc_layers"
                )
