"""Trajectory Consistency Distillation: ``tcd_lora`` (a LoRA, as TCD-LoRA) and ``tcd`` (full student).

TCD (Zheng et al. 2024, arXiv:2402.19159; official inference code jabir-zheng/TCD, sampler diffusers'
``TCDScheduler``) keeps Algorithm 1 of the LCM paper and changes two things, both in
``ldmkit.diffusion.tcd``: the consistency function maps x_t to an earlier point x_s of its trajectory
(semi-linear, the DDIM form alpha_s x0_hat + sigma_s eps_hat, no c_skip / c_out), and s is sampled per
sample on the solver grid at or below t_n (student and target map to the same s). The shared steps (data,
t_{n+k}, noise, w, the teacher's guided DDIM step, roles, EMA, exports) are those of ``methods/lcd.py``.

Sampling: ``TCDScheduler`` carrying the run's N (original_inference_steps), with ``eta`` = gamma
(strategic stochastic sampling; 0.3 the paper's default, 0 deterministic).

Rectified-flow teachers (SD3, FLUX.1): the same frame over the shifted sigmas (diffusion/schedule.py: the
trajectory function is the Euler step to s, x0 = x_t - sigma v); the gamma step has no stock diffusers flow
scheduler, so ldmkit samples with ``diffusion.tcd.FlowMatchTCDScheduler`` (``ldmkit generate``, validation) and the
export holds the stock ``FlowMatchEulerDiscreteScheduler`` config, which samples the model exactly at gamma 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ldmkit.diffusion import tcd
from ldmkit.methods.configs import TCDConfig, TCDKnobs, TCDLoraConfig  # noqa: F401 (help needs no torch)
from ldmkit.methods.lcd import LCDMethod, LCMLoraMethod
from ldmkit.rng import SampleRNG

if TYPE_CHECKING:
    pass

__all__ = ["TCDConfig", "TCDLoraConfig", "TCDLoraMethod", "TCDMethod", "TrajectoryTarget"]


class TrajectoryTarget:
    """Mixin over an LCD method: the trajectory consistency function f(x_t, t, s) and the TCDScheduler.
    Subclasses choose s (``_end_timesteps``) and the sampling gamma (``_sampling_eta``)."""

    tags = ("tcd", "trajectory-consistency")

    def _end_timesteps(self, index: torch.Tensor, t: torch.Tensor, rng: SampleRNG) -> torch.Tensor:
        if self.mcfg.end_time_sampling == "zero":
            return torch.zeros_like(t)
        return tcd.sample_end_timesteps(index, self.ddim_timesteps, self.k, rng.rand().to(self.device))

    supports_flow = True

    def _f(self, model_output, x, t, end):
        """f(x_t, t, s) = alpha_s x0_hat + sigma_s eps_hat (diffusion/tcd.py; the schedule's ``trajectory``)."""
        return self.schedule.trajectory(model_output, x, t, end)

    def _sampling_scheduler(self):
        if self.schedule.is_flow:
            return tcd.FlowMatchTCDScheduler.with_gamma(self.family.noise_scheduler.config, self._sampling_eta())
        return tcd.tcd_scheduler(
            self.family.noise_scheduler.config, self.mcfg.num_ddim_timesteps, prediction_type=self.prediction_type
        )

    def _export_scheduler(self):
        if self.schedule.is_flow:  # the stock scheduler closest to the gamma step: exact at gamma 0
            from diffusers import FlowMatchEulerDiscreteScheduler

            return FlowMatchEulerDiscreteScheduler.from_config(self.family.noise_scheduler.config)
        return self._sampling_scheduler()

    def _record_extras(self) -> dict[str, Any]:
        return {"sampler": "FlowMatchTCDScheduler"} if self.schedule.is_flow else {}

    def _sampling_eta(self) -> float:
        return self.mcfg.gamma

    def _scheduler_note(self) -> str:
        if self.schedule.is_flow:
            return (
                f"TCD's gamma step on the flow (gamma {self._sampling_eta()} as trained for): ldmkit generate samples "
                "it (ldmkit.diffusion.tcd.FlowMatchTCDScheduler); no stock diffusers scheduler has it, so the "
                "export holds FlowMatchEulerDiscreteScheduler, which samples it exactly at gamma 0 (deterministic)"
            )
        return (
            f"TCDScheduler, original_inference_steps={self.mcfg.num_ddim_timesteps}; pass eta (gamma) to the "
            f"pipeline call: {self._sampling_eta()} as trained for, 0 deterministic"
        )


class TCDLoraMethod(TrajectoryTarget, LCMLoraMethod):
    """tcd_lora: LCM-LoRA's roles (one denoiser; teacher = adapters off) with TCD's target point."""

    Config = TCDLoraConfig
    mcfg: TCDLoraConfig
    label = title = "TCD-LoRA"
    tags = ("lora", *TrajectoryTarget.tags)


class TCDMethod(TrajectoryTarget, LCDMethod):
    """tcd: full LCD's roles (student with w-embedding, EMA target, frozen teacher) with TCD's target point."""

    Config = TCDConfig
    mcfg: TCDConfig
    label, title = "TCD", "Trajectory Consistency Distillation model"
