"""Phased Consistency Models: ``pcm_lora`` (a LoRA, as PCM-LoRA) and ``pcm`` (full student).

PCM (Wang et al. 2024, arXiv:2405.18407; official code G-U-N/Phased-Consistency-Model,
code/text_to_image_sd15/train_pcm_lora_sd15.py) splits the trajectory into K phases and enforces
consistency inside each: student and target map to the lower edge of the phase (``ldmkit.diffusion.pcm``),
with the DDIM-form consistency function of TCD; a target whose teacher step lands on the edge is that point
itself. Everything else is the shared Algorithm-1 frame of ``methods/lcd.py``.

Sampling is deterministic, edge to edge: the export carries a ``TCDScheduler`` with the run's N, used with
eta (gamma) 0; at K steps it visits exactly the trained edges. Not implemented here: solvers other than
DDIM inside a phase.

Rectified-flow teachers (SD3, FLUX.1): the phases over the shifted sigmas, the Euler step to the edge as the
consistency function (diffusion/pcm.py); sampled by the stock ``FlowMatchEulerDiscreteScheduler`` given the grid's
points as the pipeline call's ``sigmas`` (``pcm.flow_sampling_sigmas``, recorded as the record's ``flow_grid``),
as the authors' SD3 sampler. The adversarial term is not done on flows (its discriminator taps are the UNets').

The optional adversarial consistency loss (``method.adv_weight`` > 0; reference code/text_to_image_sd15/
train_pcm_lora_sd15_adv.py and discriminator_sd15.py, code/text_to_image_sdxl/ the same for SDXL). After
steps 1-8 of the shared frame (the consistency loss):
  9. t_adv ~ U{s, ..., s + T/K - 1} above the student's phase edge s; "fake" = the student's point at s,
     "real" = the target's point at s, each diffused forward from s to t_adv with its own noise;
 10. the discriminator is the frozen teacher (the LoRA methods: the base with adapters off) at (x, t_adv, c),
     read at its block outputs by small trainable heads (models/discriminator.py); c the text condition;
 11. generator term adv_weight * mean over heads of mean relu(1 - D(fake)): the reference's hinge form, not
     LDM's -D(fake); it reaches the student through the teacher and the heads' detached weights;
 12. discriminator term, mean over heads of mean relu(1 + D(fake)) + mean relu(1 - D(real)), on the fake's
     detached features: the heads' gradient is of this term alone.
Differences from the reference, on purpose, as the ``vae`` method's GAN: one loss, one backward and one
optimizer step a batch train both (the reference alternates, a discriminator step on even steps, a student step
on odd ones); the heads are a second parameter group of the one optimizer (their lr ``adv_lr``, betas (0, 0.999),
both the reference's; train.lr_scheduler, scale_lr and adam_weight_decay apply to them as to the student),
clipped by their own norm; ``adv_start`` can delay the term (the reference: on from the start). The heads and
the step counter are checkpointed (exact resume); the export has no discriminator in it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ldmkit.diffusion import pcm
from ldmkit.errors import UserError
from ldmkit.methods.base import StepCounter, checkpoint_with_the_forwards_tensors
from ldmkit.methods.configs import PCMConfig, PCMKnobs, PCMLoraConfig  # noqa: F401 (help needs no torch)
from ldmkit.methods.lcd import ConsistencyPair, LCDMethod, LCMLoraMethod, Roles
from ldmkit.methods.tcd import TrajectoryTarget
from ldmkit.models import discriminator
from ldmkit.rng import SampleRNG

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ldmkit.config import Config

__all__ = ["PCMConfig", "PCMLoraConfig", "PCMLoraMethod", "PCMMethod", "discriminator_hinge", "generator_hinge"]


def discriminator_hinge(logits_real: list[torch.Tensor], logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """Mean over heads of mean relu(1 - D(real)) + mean relu(1 + D(fake)) (the reference's ``d_loss``)."""
    terms = [
        torch.relu(1 - r.float()).mean() + torch.relu(1 + f.float()).mean() for r, f in zip(logits_real, logits_fake)
    ]
    return torch.stack(terms).mean()


def generator_hinge(logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """Mean over heads of mean relu(1 - D(fake)) (the reference's ``g_loss``)."""
    return torch.stack([torch.relu(1 - f.float()).mean() for f in logits_fake]).mean()


class PhasedTarget(TrajectoryTarget):
    """Mixin over an LCD method: s = the lower edge of the student's phase; deterministic sampling."""

    tags = ("pcm", "phased-consistency")
    disc: torch.nn.Module | None = None
    """The discriminator's trainable heads (accelerate-prepared); None without the adversarial term."""

    def __init__(self, cfg: Config, accelerator: Accelerator):
        super().__init__(cfg, accelerator)
        m = self.mcfg
        if m.adv_weight > 0 and self.schedule.is_flow:
            raise UserError(
                f"method.adv_weight: {m.name}'s adversarial term does not run on {self.family.name} yet (set 0)"
            )
        if m.adv_weight > 0:
            layout = m.adv_heads or self.family.pcm_adv_heads
            self._taps = discriminator.feature_taps(self.roles().teacher, layout)
            heads = discriminator.FeatureDiscriminator([c for _, c, _ in self._taps], layout)
            self.disc = heads.to(self.device).train()  # fp32: trained
            self.trainable_names = ("unet", "disc")
            self.adv_steps = StepCounter()

    def _end_timesteps(self, index: torch.Tensor, t: torch.Tensor, rng: SampleRNG) -> torch.Tensor:
        return pcm.phase_end_timesteps(index, self.ddim_timesteps, self.mcfg.num_phases)

    def _sampling_eta(self) -> float | None:
        return None if self.schedule.is_flow else 0.0

    def _sampling_scheduler(self):
        if self.schedule.is_flow:  # deterministic Euler, at the grid points the call's sigmas name
            from diffusers import FlowMatchEulerDiscreteScheduler

            return FlowMatchEulerDiscreteScheduler.from_config(self.family.noise_scheduler.config)
        return super()._sampling_scheduler()

    def _export_scheduler(self):
        return self._sampling_scheduler()

    def _record_extras(self) -> dict[str, Any]:
        return {"flow_grid": self.mcfg.num_ddim_timesteps} if self.schedule.is_flow else {}

    def _sampling_sigmas(self, steps: int) -> list[float] | None:
        if not self.schedule.is_flow:
            return None
        return pcm.flow_sampling_sigmas(self.mcfg.num_ddim_timesteps, steps, self.schedule.num_train_timesteps)

    def _default_steps(self) -> int:
        """K steps visit exactly the K trained phase edges (4 when K is above 8)."""
        return self.mcfg.num_phases if self.mcfg.num_phases <= 8 else 4

    def _scheduler_note(self) -> str:
        if self.schedule.is_flow:
            sigmas = pcm.flow_sampling_sigmas(self.mcfg.num_ddim_timesteps, self._default_steps())
            return (
                f"FlowMatchEulerDiscreteScheduler (deterministic), with the pipeline call's sigmas at the solver grid: "
                f"sigmas={[round(x, 6) for x in sigmas]} at {self._default_steps()} steps visit exactly the trained "
                f"phase edges (other step counts: ldmkit.diffusion.pcm.flow_sampling_sigmas; ldmkit generate passes them)"
            )
        return (
            f"TCDScheduler, original_inference_steps={self.mcfg.num_ddim_timesteps}, eta=0 (deterministic); "
            f"{self.mcfg.num_phases} steps visit exactly the {self.mcfg.num_phases} trained phase edges"
        )

    # ---- the loss: steps 1-8 of the shared frame, then the optional adversarial term -------------
    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        roles = self.roles()
        pair = self.consistency_pair(batch, roles)
        loss = self.consistency_distance(pair)
        if self.disc is None:
            return loss, {}
        adversarial, logs = self._adversarial(pair, roles)
        return loss + adversarial, {"consistency_loss": loss.item(), **logs}

    def _adversarial(self, pair: ConsistencyPair, roles: Roles) -> tuple[torch.Tensor, dict[str, float]]:
        """adv_weight x the generator term + the discriminator's loss (steps 9-12 of the module docstring);
        before adv_start nothing runs (no draws, no discriminator)."""
        m = self.mcfg
        if self.adv_steps.step < m.adv_start:
            return pair.student.new_zeros(()), {"g_loss": 0.0, "d_loss": 0.0, "adv_active": 0.0}
        rng, ac, end = pair.rng, self.alphas_cumprod, pair.end
        shape = pair.student.shape[1:]
        with self.accelerator.autocast():
            # 9. t_adv in the phase above s; both points at s diffused to t_adv, each with its own noise.
            T = self.family.noise_scheduler.config.num_train_timesteps
            t_adv = pcm.adversarial_timesteps(end, T, m.num_phases, rng.rand().to(self.device))
            fake = pcm.noise_travel(pair.student.float(), rng.randn(*shape).to(self.device), end, t_adv, ac)
            real = pcm.noise_travel(pair.target.float(), rng.randn(*shape).to(self.device), end, t_adv, ac)

            # 10. The frozen teacher's block features at (x, t_adv, c); the fake's carry the student's gradient.
            fake_features = self._teacher_features(roles, fake, t_adv, pair.cond)
            with torch.no_grad():
                real_features = self._teacher_features(roles, real, t_adv, pair.cond)

            # 11. Generator term: the heads with detached weights, so it trains the student only.
            heads = self.unwrap(self.disc)
            frozen = {name: p.detach() for name, p in heads.named_parameters()}
            g_loss = generator_hinge(torch.func.functional_call(heads, frozen, (fake_features,)))

            # 12. Discriminator term on detached features (one call: one DDP forward); trains the heads only.
            both = self.disc([torch.cat([r, f.detach()]) for r, f in zip(real_features, fake_features)])
            logits_real, logits_fake = zip(*(logits.chunk(2) for logits in both))
            d_loss = discriminator_hinge(list(logits_real), list(logits_fake))
        logs = {
            "g_loss": g_loss.item(),
            "d_loss": d_loss.item(),
            "adv_active": 1.0,
            "logits_real": torch.stack([x.float().mean() for x in logits_real]).mean().item(),
            "logits_fake": torch.stack([x.float().mean() for x in logits_fake]).mean().item(),
        }
        return m.adv_weight * g_loss + d_loss, logs

    def _teacher_features(self, roles: Roles, x: torch.Tensor, t: torch.Tensor, cond) -> list[torch.Tensor]:
        with roles.teacher_context(), discriminator.tapped(self._taps) as features:
            self.family.denoise(roles.teacher, x, t, cond)
        return features

    # ---- what the loop needs of the discriminator ---------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """train.gradient_checkpointing on the student, recomputing each block as its forward ran
        (``checkpoint_with_the_forwards_tensors``): ``pcm_lora``'s teacher with ``plain_teacher`` off is the student
        with its LoRA switched off, and its feature pass (step 10) carries the student's gradient, so its blocks
        recompute in the backward, when the LoRA is on again. The heads have nothing to checkpoint."""
        self.unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_with_the_forwards_tensors)

    def _student_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict[str, Any]]:
        if self.disc is None:
            return super().param_groups()
        heads = {"params": list(self.disc.parameters()), "lr": self.mcfg.adv_lr, "betas": (0.0, 0.999)}
        return [{"params": self._student_parameters()}, heads]

    def clip_groups(self) -> list[list[torch.nn.Parameter]]:
        if self.disc is None:
            return super().clip_groups()
        return [self._student_parameters(), list(self.disc.parameters())]

    def after_step(self, step: int) -> None:
        super().after_step(step)
        if self.disc is not None:
            self.adv_steps.step = step

    def checkpoint_objects(self) -> dict[str, Any]:
        objects = super().checkpoint_objects()
        return {**objects, "adv_steps": self.adv_steps} if self.disc is not None else objects


class PCMLoraMethod(PhasedTarget, LCMLoraMethod):
    """pcm_lora: LCM-LoRA's roles (one denoiser; teacher = adapters off) with PCM's phase-edge target."""

    Config = PCMLoraConfig
    mcfg: PCMLoraConfig
    label = title = "PCM-LoRA"
    tags = ("lora", *PhasedTarget.tags)


class PCMMethod(PhasedTarget, LCDMethod):
    """pcm: full LCD's roles (student with w-embedding, EMA target, frozen teacher) with PCM's phase-edge target."""

    Config = PCMConfig
    mcfg: PCMConfig
    label, title = "PCM", "Phased Consistency Model"
