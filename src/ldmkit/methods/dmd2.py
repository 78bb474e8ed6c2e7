"""Distribution Matching Distillation, improved: ``dmd2_lora`` (generator and fake score as LoRAs of one
denoiser) and ``dmd2`` (whole networks).

DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis",
arXiv:2405.14867; reference code tianweiy/DMD2, main/sd_unified_model.py, main/sd_guidance.py, main/train_sd.py,
hyperparameters in experiments/*/*.sh) trains a one- or few-step generator G so that the distribution of its
samples matches the teacher's: the gradient of the reverse KL at a noisy sample is the difference of two
scores, the real one (the frozen teacher, with classifier-free guidance) and a fake one (a denoiser trained on
G's own samples). Three models, three roles:

- generator G: the teacher plus LoRA (``dmd2_lora``) or a trainable copy (``dmd2``), called at the generator's
  timesteps (t = T - 1 from pure noise; K-step: the K timesteps its LCMScheduler visits);
- real score: the teacher, frozen (``dmd2_lora``: the same base tensors without adapters, as LCM-LoRA's teacher);
- fake score: a second LoRA on the same base (``dmd2_lora``, called through ``torch.func.functional_call`` with
  its own LoRA tensors) or a second trainable copy (``dmd2``), and DMD2's classifier on its bottleneck (the
  GAN term: models/discriminator.py BottleneckClassifier).

One training step (``loss``), with the reference's names:
  1. data: real latents x (the GAN's real images) and the text condition c (uncond u for the real score's CFG);
  2. the generator's input: pure noise at t_G = T - 1, or for a K-step generator step k ~ U{0..K-1} at t_k of
     a noised training latent, or (backward simulation) of G's own k-step sample, produced without gradient;
  3. x0_G = G's x0 at (x_{t_k}, t_k) (with gradient on generator turns only);
  generator turn (every ``dfake_gen_update_ratio``-th optimizer step):
  4. distribution matching: t ~ U{min_step..max_step}, x_t = add_noise(x0_G, eps, t); x0_real with CFG
     ``real_guidance_scale``, x0_fake without; p_real = x0_G - x0_real, p_fake = x0_G - x0_fake;
     grad = (p_real - p_fake) / mean|p_real| (per sample); loss_dm = 0.5 mse(x0_G, (x0_G - grad).detach()),
     whose gradient with respect to x0_G is grad / numel: the DMD gradient (paper eq. 2);
  5. GAN, generator side: softplus(-D(x0_G noised)), D = the classifier on the fake score's bottleneck, with
     the fake score's and classifier's weights detached (it trains G only);
  every step:
  6. fake score: denoising loss on x0_G.detach() at t ~ U{0..T-1}: mse(prediction, its target) (eps for SD;
     the reference's ``loss_fake_mean``; v or the flow velocity for other teachers);
  7. GAN, classifier side: softplus(D(x0_G noised)) + softplus(-D(x noised)) on detached inputs.
  The loss is dm_loss_weight * 4 + gen_cls_loss_weight * 5 (generator turns) + 6 + guidance_cls_loss_weight * 7.

Differences from the reference, on purpose:
- one loss, one backward and one optimizer step (two parameter groups, each clipped by its own norm) instead of
  two optimizers stepped in turn: the generator's and the fake score's gradients are each taken at the
  weights of the step's start, as the reference's generator step precedes the fake score's, which it does not
  change;
- every random draw comes from the samples' own seeds, so a run resumes exactly (and the generator-turn counter
  is checkpointed); backward simulation picks the step per sample, not one per step for all GPUs;
- the real score of ``dmd2_lora`` is the base without adapters: one denoiser's weights in memory instead of three.
No regression loss (DMD2 drops DMD's).

Rectified-flow teachers (SD3, FLUX.1, the flow U-ViT of ``ldmkit quickstart --objective flow``;
diffusion/schedule.py): the same steps on the flow's forward process x_t = (1 - s) x0 + s eps over the family's
shifted sigmas s, every x0 from the velocity (x0 = x_t - s v), the fake score's denoising target the velocity
eps - x0, the DM normaliser on x0 as above. The generator's timesteps are the sigmas FlowMatchLCMScheduler visits
in the stock pipeline (sigma = 1 for one step), which samples exactly as backward simulation does (x0, then
re-noised to the next sigma); at N > K steps it visits the pipeline's N sigmas the same way (off the generator's
training grid, as LCMScheduler's sampler_grid points between the trained timesteps on DDPM), so ``sampler_grid``
stays unset on a flow (``DMD2Knobs.resolve_flow``). SD3's real score runs CFG; FLUX.1-dev's takes g as its
guidance embedding (one pass), and generator and fake score are called with the same g (the export is sampled at
guidance_scale g, the embedding). The GAN head reads the transformer's (or the U-ViT's) middle block.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ldmkit.diffusion import lcm
from ldmkit.errors import UserError
from ldmkit.methods.base import Method, StepCounter, checkpoint_with_the_forwards_tensors, export_denoiser_lora
from ldmkit.methods.configs import DMD2Config, DMD2Knobs, DMD2LoraConfig  # noqa: F401 (help needs no torch)
from ldmkit.methods.lcd import _sharing_weights, _WithWeights
from ldmkit.models import discriminator
from ldmkit.rng import SampleRNG

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ldmkit.config import Config

__all__ = ["DMD2LoraMethod", "DMD2Method", "distribution_matching_loss"]
logger = logging.getLogger(__name__)


def distribution_matching_loss(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's generator loss 0.5 mse(x0, x0 - grad) with grad = (p_real - p_fake) / mean|p_real| (per sample),
    p = x0 - x0_score: its gradient with respect to x0 is grad / numel (reference: sd_guidance.py
    ``compute_distribution_matching_loss``; the scores' x0 in float64 there, fp32 here)."""
    with torch.no_grad():
        p_real = x0 - x0_real
        p_fake = x0 - x0_fake
        grad = (p_real - p_fake) / p_real.abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
        grad = torch.nan_to_num(grad)
    return 0.5 * F.mse_loss(x0.float(), (x0 - grad).detach().float(), reduction="mean")


class FakeScore(torch.nn.Module):
    """``dmd2_lora``'s fake score: the generator's denoiser called with a second set of LoRA tensors (same
    modules, own values) through ``torch.func.functional_call``. A module of its own so that accelerate prepares,
    syncs and checkpoints those tensors; the denoiser is not a submodule (no second copy in state dicts)."""

    def __init__(self, denoiser: torch.nn.Module, lora: dict[str, torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "denoiser", denoiser)
        self.names = list(lora)
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(t.detach().clone().float()) for t in lora.values())

    @property
    def config(self):
        return self.denoiser.config

    def tensors(self, detach: bool = False) -> dict[str, torch.Tensor]:
        return {n: (p.detach() if detach else p) for n, p in zip(self.names, self.weights)}

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.denoiser, self.tensors(), args, kwargs, strict=False)


class _DMD2Base(Method):
    """Steps 1-7 of the module docstring; subclasses say who plays generator, real and fake score."""

    mcfg: DMD2Knobs
    is_lora: bool = False
    quickstart_student = True
    supports_flow = True  # SD3, FLUX.1 and the flow U-ViT (ldmkit quickstart --objective flow)

    @classmethod
    def check_model(cls, cfg) -> None:
        from ldmkit.methods import checks

        checks.check_denoiser_model(cfg)

    def __init__(self, cfg: Config, accelerator: Accelerator):
        super().__init__(cfg, accelerator)
        from ldmkit.families import load_family

        m = self.mcfg
        self.family = load_family(
            cfg.model, dtype=self.weight_dtype, device=self.device, encode_batch_size=cfg.data.encode_batch_size
        )
        # The forward process (diffusion/schedule.py): DDPM's, or a rectified flow's x_t = (1 - s) x0 + s eps over
        # the family's shifted sigmas, where x0 = x_t - s v; every step below is written in its terms.
        self.schedule = self.family.schedule(None, cfg.data.resolution).to(self.device)
        m.resolve_flow(type(self.family))  # the sampling grid: checked at config time unless the family was unknown
        T = self.schedule.num_train_timesteps
        self.min_step, self.max_step = int(m.min_step_percent * T), int(m.max_step_percent * T)
        self.generator_steps = self.schedule.index_of(self._sampler_timesteps(m.num_denoising_steps).to(self.device))
        self.gen_steps = StepCounter()
        self.classifier: torch.nn.Module | None = None

    def _sampler_timesteps(self, steps: int) -> torch.Tensor:
        """The generator's timesteps: those its exported sampler visits at ``steps`` steps in the stock pipeline.
        DDPM: LCMScheduler with K grid points, [999, 749, 499, 249] for K = 4 (the reference's
        denoising_step_list), [999] for one step. Flow: FlowMatchLCMScheduler as the family's pipeline sets it
        (diffusion/schedule.py ``pipeline_flow_timesteps``): sigma = 1 for one step; FLUX's and the flow U-ViT's
        K-step sigmas linspace(1, 1/K, K) shifted (pipeline_flux.py; pipelines/uvit.py ``_set_timesteps``), SD3's
        the scheduler's own spacing; for K = 4 the 1- and 2-step grids are subsets of the 4-step one in all, so
        the export samples 1, 2 or 4 steps at trained timesteps. The loss
        uses the nearest index of the training grid (flow: an exact match for FLUX's K | T, within one index
        otherwise)."""
        sampler = self._sampling_scheduler()
        if not self.schedule.is_flow:
            sampler.set_timesteps(steps)
            return torch.as_tensor(sampler.timesteps[:steps])
        from ldmkit.diffusion.schedule import dynamic_shift_mu, pipeline_flow_timesteps
        from ldmkit.families.flux import FluxFamily
        from ldmkit.families.uvit import FlowUViTFamily

        config = sampler.config
        mu = None
        if config.get("use_dynamic_shifting"):
            mu = dynamic_shift_mu(self.family.image_seq_len(self.cfg.data.resolution), config)
        return pipeline_flow_timesteps(
            sampler, steps, mu, linear_sigmas=isinstance(self.family, (FluxFamily, FlowUViTFamily))
        )

    def _build_classifier(self, fake: torch.nn.Module) -> None:
        """DMD2's classifier on the fake score's bottleneck (the UNet's mid block, the U-ViT's mid-block tokens,
        a flow transformer's middle block's image tokens: models/discriminator.py ``feature_taps``)."""
        m = self.mcfg
        if m.gen_cls_loss_weight <= 0 and m.guidance_cls_loss_weight <= 0:
            return
        try:
            self._taps = discriminator.feature_taps(fake, "light")[-1:]  # the pass stops at the bottleneck
        except TypeError:
            raise UserError(
                f"DMD2's GAN term reads a UNet's, U-ViT's or transformer's bottleneck; {self.family.name} has none "
                "here: set "
                "method.gen_cls_loss_weight=0 and method.guidance_cls_loss_weight=0"
            ) from None
        self.classifier = discriminator.BottleneckClassifier(self._taps[0][1], self._bottleneck_side(fake))
        self.classifier.to(self.device).train()

    def _bottleneck_side(self, model: torch.nn.Module) -> int:
        """Side of the bottleneck's feature map at data.resolution: the latent side halved by every UNet
        downsampler, the U-ViT's patch grid, or a flow transformer's token grid (2x2 latent patches)."""
        vae_factor = 2 ** (len(self.family.vae_config.get("block_out_channels", [0])) - 1)
        side = self.cfg.data.resolution // vae_factor
        cfg = model.config
        if hasattr(model, "transformer_blocks"):
            return math.isqrt(self.family.image_seq_len(self.cfg.data.resolution))
        if hasattr(model, "down_blocks"):
            return max(1, side // 2 ** sum(getattr(b, "downsamplers", None) is not None for b in model.down_blocks))
        return cfg.sample_size // cfg.patch_size

    def encoders(self):
        return self.family

    def enable_gradient_checkpointing(self) -> None:
        """train.gradient_checkpointing on every trainable denoiser, recomputing with the weights each call ran
        with (``checkpoint_with_the_forwards_tensors``)."""
        for model in self._denoisers():
            model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_with_the_forwards_tensors)

    def _denoisers(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    # ---- the roles ----------------------------------------------------------------------------------
    def generator(self) -> torch.nn.Module:
        """G: ``self.unet`` (LoRA on the base, or a trainable copy), accelerate-prepared."""
        return self.unet

    def real_score(self) -> torch.nn.Module:
        """The frozen teacher (``dmd2_lora``: the base tensors without adapters)."""
        return self.teacher_unet

    def fake_score(self, detach: bool = False) -> torch.nn.Module:
        """The fake score (trainable); ``detach``: the same with its weights detached (the GAN's generator side)."""
        raise NotImplementedError

    def _generator_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def _guidance_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.fake_score().parameters() if p.requires_grad]
        return params + (list(self.classifier.parameters()) if self.classifier is not None else [])

    # ---- the loss ---------------------------------------------------------------------------------
    def _x0(self, model, x, t, cond, w=None) -> torch.Tensor:
        """x0 of ``model`` at (x_t, t): the family's call at the schedule's timestep units, then the schedule."""
        return self.schedule.x0(self.family.denoise(model, x, self.schedule.timestep(t), cond, w).float(), x, t)

    def _real_x0(self, x, t, cond, uncond) -> torch.Tensor:
        """The real score with classifier-free guidance u + g (c - u) (one batched pass), or a guidance-distilled
        teacher with g as its input."""
        g = self.mcfg.real_guidance_scale
        real = self.real_score()
        if self.family.guidance_embedded:
            return self._x0(real, x, t, cond, torch.full_like(t, g, dtype=torch.float32))
        if g == 1.0:
            return self._x0(real, x, t, cond)
        both = self._x0(real, torch.cat([x, x]), torch.cat([t, t]), {k: torch.cat([cond[k], uncond[k]]) for k in cond})
        x0_c, x0_u = both.chunk(2)
        return x0_u + g * (x0_c - x0_u)  # linear in the prediction: the same as guiding eps

    def _guidance_input(self, t: torch.Tensor) -> torch.Tensor | None:
        """What a guidance-distilled family takes as ``w_emb`` for generator and fake score: the real score's g."""
        if not self.family.guidance_embedded:
            return None
        return torch.full_like(t, self.mcfg.real_guidance_scale, dtype=torch.float32)

    def _generator_input(self, z: torch.Tensor, cond, rng: SampleRNG) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 2: (x_{t_k}, t_k) per sample."""
        m, K = self.mcfg, self.mcfg.num_denoising_steps
        noise = rng.randn(*z.shape[1:]).to(z)
        if K == 1:
            t = self.generator_steps[torch.zeros(len(z), dtype=torch.long, device=self.device)]
            return noise, t
        k = rng.randint(0, K).to(self.device)  # (B,)
        t = self.generator_steps[k]
        if m.backward_simulation:  # G's own k-step sample, from fresh noise, without gradient
            x = rng.randn(*z.shape[1:]).to(z)
            clean = x
            # Every sample draws its K - 1 re-noisings, used or not: a draw per loop pass (up to the batch's
            # largest k) would advance a sample's stream by its batch-mates' k, and two ranks would not
            # reproduce one process (tests/test_distributed_methods.py).
            renoise = rng.randn(K - 1, *z.shape[1:]).to(z)
            w = self._guidance_input(t)
            with torch.no_grad():
                for j in range(int(k.max())):
                    tj = self.generator_steps[torch.full_like(k, j)]
                    x0 = self._x0(self.generator(), x, tj, cond, w)
                    active = (j < k).view(-1, *[1] * (z.ndim - 1))
                    clean = torch.where(active, x0, clean)
                    t_next = self.generator_steps[torch.full_like(k, j + 1)]
                    x = torch.where(active, self.schedule.add_noise(x0, renoise[:, j], t_next), x)
        else:
            clean = z  # a training latent (the reference's "denoising" data)
        x_t = self.schedule.add_noise(clean, noise, t)
        first = (k == 0).view(-1, *[1] * (z.ndim - 1))
        return torch.where(first, noise, x_t), t  # the first step starts from pure noise

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        m, schedule, family = self.mcfg, self.schedule, self.family
        generator_turn = self.gen_steps.step % m.dfake_gen_update_ratio == 0
        rng = SampleRNG(batch["seed"], self.device)
        T = schedule.num_train_timesteps
        logs: dict[str, float] = {"generator_turn": float(generator_turn)}
        with self.accelerator.autocast():
            # 1. Data: real latents and the text condition (uncond for the real score's CFG).
            z = family.latents(batch, rng)
            cond, uncond = family.conditions(batch, resolution=self.cfg.data.resolution)
            cond, uncond = ({k: v.float() for k, v in c.items()} for c in (cond, uncond))
            shape = z.shape[1:]

            # 2-3. The generator's sample x0_G (with gradient on generator turns).
            x_in, t_gen = self._generator_input(z, cond, rng)
            with torch.set_grad_enabled(generator_turn and torch.is_grad_enabled()):
                x0_g = self._x0(self.generator(), x_in, t_gen, cond, self._guidance_input(t_gen))

            loss = x0_g.new_zeros(())
            if generator_turn:
                # 4. Distribution matching: the real and the fake score's x0 at a noised x0_G, no gradient.
                t = rng.randint(self.min_step, min(self.max_step + 1, T)).to(self.device)
                with torch.no_grad():
                    x_t = schedule.add_noise(x0_g.detach(), rng.randn(*shape).to(z), t)
                    x0_fake = self._x0(self.fake_score(), x_t, t, cond, self._guidance_input(t))
                    x0_real = self._real_x0(x_t, t, cond, uncond)
                loss_dm = distribution_matching_loss(x0_g, x0_real, x0_fake)
                loss = loss + m.dm_loss_weight * loss_dm
                logs["loss_dm"] = loss_dm.item()
                # 5. GAN, generator side: the classifier and fake score with detached weights (trains G only).
                if self.classifier is not None and m.gen_cls_loss_weight > 0:
                    logits = self._logits(x0_g, cond, rng, detach=True)
                    gen_cls = F.softplus(-logits).mean()
                    loss = loss + m.gen_cls_loss_weight * gen_cls
                    logs["gen_cls_loss"] = gen_cls.item()

            # 6. Fake score: denoising on the generator's detached samples.
            x0 = x0_g.detach()
            t = rng.randint(0, T).to(self.device)
            noise = rng.randn(*shape).to(z)
            x_t = schedule.add_noise(x0, noise, t)
            pred = family.denoise(self.fake_score(), x_t, schedule.timestep(t), cond, self._guidance_input(t))
            loss_fake = F.mse_loss(pred.float(), schedule.target(x0, noise, t).float())
            loss = loss + loss_fake
            logs["loss_fake"] = loss_fake.item()

            # 7. GAN, classifier side: real latents against the generator's, both noised, detached inputs.
            if self.classifier is not None and m.guidance_cls_loss_weight > 0:
                logits = self._logits(torch.cat([z, x0]), {k: torch.cat([v, v]) for k, v in cond.items()}, rng)
                real, fake = logits.chunk(2)
                cls = F.softplus(fake).mean() + F.softplus(-real).mean()
                loss = loss + m.guidance_cls_loss_weight * cls
                logs["guidance_cls_loss"] = cls.item()
        return loss, logs

    def _logits(self, x0: torch.Tensor, cond, rng: SampleRNG, detach: bool = False) -> torch.Tensor:
        """The classifier's logits [B, 1] of latents noised at t ~ U{0..diffusion_gan_max_timestep-1} (clean
        when 0), read at the fake score's bottleneck. ``detach``: fake score and classifier weights detached."""
        n = len(x0)
        if self.mcfg.diffusion_gan_max_timestep > 0:
            t = rng.randint(0, min(self.mcfg.diffusion_gan_max_timestep, self.schedule.num_train_timesteps))
            t = t.to(self.device).repeat(n // len(t))
            noise = torch.cat([rng.randn(*x0.shape[1:]).to(x0) for _ in range(n // len(rng))])
            x = self.schedule.add_noise(x0, noise, t)
        else:
            t = torch.zeros(n, dtype=torch.long, device=self.device)
            x = x0
        with discriminator.tapped(self._taps) as features:
            self.family.denoise(self.fake_score(detach), x, self.schedule.timestep(t), cond, self._guidance_input(t))
        head = self.unwrap(self.classifier)
        if detach:
            frozen = {name: p.detach() for name, p in head.named_parameters()}
            return torch.func.functional_call(head, frozen, (features[0].float(),))
        return self.classifier(features[0].float())

    # ---- what the loop needs ------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """The generator at train.learning_rate, the fake score and classifier at ``guidance_lr``."""
        guidance = {"params": self._guidance_parameters()}
        if self.mcfg.guidance_lr is not None:
            guidance["lr"] = self.mcfg.guidance_lr
        return [{"params": self._generator_parameters()}, guidance]

    def clip_groups(self) -> list[list[torch.nn.Parameter]]:
        """Each side clipped by its own norm, as the reference clips each model before its optimizer step."""
        return [self._generator_parameters(), self._guidance_parameters()]

    def parameters(self) -> list[torch.nn.Parameter]:
        return self._generator_parameters() + self._guidance_parameters()

    def after_step(self, step: int) -> None:
        self.gen_steps.step = step  # the two-time-scale counter: optimizer steps done

    def checkpoint_objects(self) -> dict[str, Any]:
        return {"dmd2_steps": self.gen_steps}

    # ---- sampling, validation, export ---------------------------------------------------------------
    def _sampling_scheduler(self):
        """LCMScheduler with K grid points (original_inference_steps = K, or sampler_grid): at K steps it visits
        the generator's timesteps, at fewer a subset (the reference samples its models with LCMScheduler); on a
        flow FlowMatchLCMScheduler (x0 = x_t - s v, re-noised to the next sigma), whose K sigmas in the family's
        pipeline are the generator's (``_sampler_timesteps``) and which samples any other N at the pipeline's N
        sigmas (validation_steps, the quickstart's rows)."""
        if self.schedule.is_flow:
            from diffusers import FlowMatchLCMScheduler

            return FlowMatchLCMScheduler.from_config(self.family.noise_scheduler.config)
        return lcm.lcm_scheduler(
            self.family.noise_scheduler.config,
            self.mcfg.sampler_grid or self.mcfg.num_denoising_steps,
            10.0,
            prediction_type=self.schedule.prediction_type,
        )

    def _default_guidance(self) -> float:
        g = self.mcfg.validation_guidance
        if g is not None:
            return g
        return self.mcfg.real_guidance_scale if self.family.guidance_embedded else self.family.lcm_lora_guidance

    def _sampling_denoiser(self) -> torch.nn.Module:
        return self.unwrap(self.generator())

    def validate(self, step: int):
        """Rows: cfg.train.validation_prompts; columns: the generator at method.validation_steps (fixed seed)."""
        return self.few_step_grid(self._sampling_denoiser(), self._sampling_scheduler(), self._default_guidance())

    def sampling_record(self):
        from ldmkit.inference import SamplingRecord

        return SamplingRecord(
            method=self.mcfg.name,
            label=self.label,
            kind="lora" if self.is_lora else "pipeline",
            scheduler=type(self._sampling_scheduler()).__name__,
            steps=self.mcfg.num_denoising_steps,
            guidance=self._default_guidance(),
            base=self.base_reference() if self.is_lora else None,
            guidance_embedded=self.family.guidance_embedded,
            few_step=True,
        )

    def card_facts(self) -> list[str]:
        m, K = self.mcfg, self.mcfg.num_denoising_steps
        # Steps other than the generator's are off its training grid (re-noised x0 at untrained timesteps): they
        # work, as the quickstart's rows show, but are not what it was distilled for.
        more = "any other step count works" if self.schedule.is_flow else f"1 to {m.sampler_grid or K} steps work"
        return [
            f"{K}-step generator (distilled for {K} step{'s' * (K > 1)}; {more}) with "
            f"{type(self._sampling_scheduler()).__name__}, guidance_scale {self._default_guidance()} (no CFG pass)",
            f"distilled with real guidance {m.real_guidance_scale}, fake-score/generator update ratio "
            f"{m.dfake_gen_update_ratio}" + (", GAN term on" if self.classifier is not None else ""),
        ]


class DMD2LoraMethod(_DMD2Base):
    """dmd2_lora: one denoiser; generator = base + LoRA, fake score = base + a second LoRA, real score = base."""

    Config = DMD2LoraConfig
    mcfg: DMD2LoraConfig
    label = title = "DMD2-LoRA"
    tags = ("lora", "dmd2", "distribution-matching")
    is_lora = True

    def __init__(self, cfg: Config, accelerator: Accelerator):
        super().__init__(cfg, accelerator)
        from ldmkit.lora import adapters

        m = self.mcfg
        m.resolve_lora(type(self.family))
        self.unet = self.family.denoiser  # frozen base in weight dtype + the generator's LoRA (fp32)
        self.teacher_unet = _sharing_weights(self.unet)  # the real score: the same base tensors, no adapters
        adapters.add_trainable_adapter(self.unet, m, cfg.train.seed)
        self.unet.train()
        lora = {n: p for n, p in self.unet.named_parameters() if p.requires_grad}
        self._lora = list(lora.values())
        # The fake score starts where the generator starts (its LoRA's init: the teacher), then trains apart.
        self.fake = FakeScore(self.unet, lora).to(self.device)
        self._build_classifier(self.unet)
        self.trainable_names = ("unet", "fake") + (("classifier",) if self.classifier is not None else ())

    def fake_score(self, detach: bool = False):
        if detach:
            fake = self.unwrap(self.fake)
            return _WithWeights(fake.denoiser, fake.tensors(detach=True))
        return self.fake

    def _generator_parameters(self):
        return self._lora

    def _denoisers(self):
        return [self.unet]  # the fake score is the same network

    def export(self, out_dir: Path) -> None:
        """The generator's LoRA (diffusers file and, where clients read it, the kohya copy) and its sampler."""
        export_denoiser_lora(
            out_dir, self.unwrap(self.unet), self.family, self.mcfg.adapter, self._sampling_scheduler()
        )


class DMD2Method(_DMD2Base):
    """dmd2: generator and fake score are trainable fp32 copies of the teacher; the real score is the teacher."""

    Config = DMD2Config
    mcfg: DMD2Config
    label, title = "DMD2", "DMD2 one-step model"
    tags = ("dmd2", "distribution-matching")

    def __init__(self, cfg: Config, accelerator: Accelerator):
        super().__init__(cfg, accelerator)
        self.teacher_unet = self.family.denoiser  # frozen, weight dtype
        self.unet = self.family.load_denoiser(torch.float32).requires_grad_(True).train()
        self.fake = self.family.load_denoiser(torch.float32).requires_grad_(True).train()
        self._build_classifier(self.fake)
        self.trainable_names = ("unet", "fake") + (("classifier",) if self.classifier is not None else ())

    def fake_score(self, detach: bool = False):
        if detach:
            fake = self.unwrap(self.fake)
            return _WithWeights(fake, {n: p.detach() for n, p in fake.named_parameters()})
        return self.fake

    def _generator_parameters(self):
        return list(self.unet.parameters())

    def _denoisers(self):
        return [self.unet, self.fake]

    def export(self, out_dir: Path) -> None:
        """A full pipeline folder: the generator + its sampler."""
        self.family.export_pipeline(
            Path(out_dir), unet=self.unwrap(self.unet), scheduler=self._sampling_scheduler(), safety_checker=False
        )
