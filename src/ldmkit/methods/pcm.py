"""Phased Consistency Models: ``pcm_lora`` (a LoRA, as PCM-LoRA) and ``pcm`` (full student).

PCM (Wang et al. 2024, arXiv:2405.18407; official code G-U-N/Phased-Consistency-Model,
code/text_to_image_sd15/train_pcm_lora_sd15.py) splits the trajectory into K phases and enforces
consistency inside each: student and target map to the lower edge of the phase (``ldmkit.diffusion.pcm``),
with the DDIM-form consistency function of TCD; a target whose teacher step lands on the edge is that point
itself. Everything else is the shared Algorithm-1 frame of ``methods/lcd.py``.

Sampling is deterministic, edge to edge: the export carries a ``TCDScheduler`` with the run's N, used with
eta (gamma) 0; at K steps it visits exactly the trained edges. Not implemented here: the reference's
optional adversarial term (a discriminator on the student's outputs) and solvers other than DDIM inside
a phase.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ldmkit.diffusion import pcm
from ldmkit.methods.configs import PCMConfig, PCMKnobs, PCMLoraConfig  # noqa: F401 (help needs no torch)
from ldmkit.methods.lcd import LCDMethod, LCMLoraMethod
from ldmkit.methods.tcd import TrajectoryTarget
from ldmkit.rng import SampleRNG

if TYPE_CHECKING:
    pass

__all__ = ["PCMConfig", "PCMLoraConfig", "PCMLoraMethod", "PCMMethod"]


class PhasedTarget(TrajectoryTarget):
    """Mixin over an LCD method: s = the lower edge of the student's phase; deterministic sampling."""

    kind = "Phased Consistency Model"
    lora_kind = "PCM-LoRA"

    def _end_timesteps(self, index: torch.Tensor, t: torch.Tensor, rng: SampleRNG) -> torch.Tensor:
        return pcm.phase_end_timesteps(index, self.ddim_timesteps, self.mcfg.num_phases)

    def _sampling_eta(self) -> float:
        return 0.0

    def _scheduler_note(self) -> str:
        return (
            f"TCDScheduler, original_inference_steps={self.mcfg.num_ddim_timesteps}, eta=0 (deterministic); "
            f"{self.mcfg.num_phases} steps visit exactly the {self.mcfg.num_phases} trained phase edges"
        )


class PCMLoraMethod(PhasedTarget, LCMLoraMethod):
    """pcm_lora: LCM-LoRA's roles (one denoiser; teacher = adapters off) with PCM's phase-edge target."""

    Config = PCMLoraConfig
    mcfg: PCMLoraConfig


class PCMMethod(PhasedTarget, LCDMethod):
    """pcm: full LCD's roles (student with w-embedding, EMA target, frozen teacher) with PCM's phase-edge target."""

    Config = PCMConfig
    mcfg: PCMConfig
