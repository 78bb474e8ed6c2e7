"""Pure Phased Consistency Model math (PCM; Wang et al. 2024, arXiv:2405.18407).

PCM splits the ODE trajectory into K phases and learns consistency only inside each phase: a point at
time t of phase j is mapped to the phase's lower edge e_j (the lowest phase maps to 0), with the same
DDIM-form consistency function as TCD (``ldmkit.diffusion.tcd.trajectory_consistency_function``).
Sampling is deterministic and jumps edge to edge.

Where the edges lie. The reference (G-U-N/Phased-Consistency-Model, code/text_to_image_sd15/
train_pcm_lora_sd15.py, ``ddim_style_multiphase_pred``) puts phase starts at solver-grid indices
floor(linspace(0, N, K)) counted from the low-noise end, but samples with a DDIM/TCD scheduler whose K
timesteps are counted from the high-noise end, so the trained edges and the sampled ones differ a little.
Here the edges ARE the K timesteps of ``TCDScheduler(original_inference_steps=N).set_timesteps(K)``
(floor(linspace(0, N, K)) of the descending grid), so the exported TCDScheduler at gamma 0 and K steps
visits exactly the trained edges: [999, 759, 499, 259] -> edges {759, 499, 259, 0} for N=50, K=4.
Every edge lies on the DDIM solver grid, so one teacher step from t_{n+k} never crosses an edge; when it
lands on the edge, the target is that point itself (boundary condition).

The optional adversarial consistency loss compares the student's and the target's points at the edge s after
both are diffused forward to a time t_adv inside the phase above s (``adversarial_timesteps``,
``noise_travel``; reference code/text_to_image_sd15/train_pcm_lora_sd15_adv.py and its
scheduling_ddpm_modified.py ``noise_travel``).

On a rectified flow (SD3, FLUX.1) the phases are the same index ranges of the same solver grid, now over the
shifted sigmas (diffusion/schedule.py), and the consistency function is the Euler step to the edge. Sampling is
deterministic Euler from edge to edge, as the authors' SD3 sampler (code/text_to_image_sd3/
pcm_fm_deterministic_scheduler.py: the descending N-point grid at floor(linspace(0, N, n)), then sigma 0). Stock
``FlowMatchEulerDiscreteScheduler`` does exactly that when the pipeline call is given those points as ``sigmas``
(``flow_sampling_sigmas``: unshifted, since the scheduler applies the shift, static or FLUX's dynamic one).
"""

from __future__ import annotations

import torch

from ldmkit.diffusion import lcm
from ldmkit.diffusion.lcm import append_dims


def phase_starts(num_ddim_timesteps: int, num_phases: int) -> torch.Tensor:
    """Solver-grid indices (ascending) of the phases' upper ends: a student at ddim_timesteps[i] is in the phase
    whose upper end is the smallest start >= i. Same selection as ``TCDScheduler.set_timesteps(K)`` on an
    N-point origin grid: descending positions floor(linspace(0, N, K, endpoint=False)) -> ascending N-1-pos."""
    if not 1 <= num_phases <= num_ddim_timesteps:
        raise ValueError(f"num_phases must be in 1..{num_ddim_timesteps}, got {num_phases}")
    pos = torch.floor(torch.linspace(0, num_ddim_timesteps, num_phases + 1, dtype=torch.float64)[:-1]).long()
    return (num_ddim_timesteps - 1 - pos).flip(0)


def phase_edges(ddim_timesteps: torch.Tensor, num_phases: int) -> torch.Tensor:
    """Timesteps the sampler visits at K steps, ascending (the phases' upper ends): [259, 499, 759, 999]
    for N=50, K=4 on a 1000-step schedule."""
    return ddim_timesteps[phase_starts(len(ddim_timesteps), num_phases).to(ddim_timesteps.device)]


def phase_end_timesteps(index: torch.Tensor, ddim_timesteps: torch.Tensor, num_phases: int) -> torch.Tensor:
    """For students at ddim_timesteps[index] [B]: the lower edge of their phase (the timestep the consistency
    function maps to): the next sampled timestep below the phase's upper end, 0 for the lowest phase."""
    uppers = phase_edges(ddim_timesteps, num_phases)  # ascending
    lowers = torch.cat([uppers.new_zeros(1), uppers[:-1]])
    t = ddim_timesteps[index]
    phase = torch.searchsorted(uppers, t)  # first upper end >= t
    return lowers[phase]


def adversarial_timesteps(
    end_timesteps: torch.Tensor, num_train_timesteps: int, num_phases: int, u: torch.Tensor
) -> torch.Tensor:
    """t_adv for points at the phase edges s [B]: uniform over the integers [s, s + T // K), the reference's
    range (one phase's length above s), cut at T - 1. ``u`` are uniform [0, 1) draws [B]."""
    span = (num_train_timesteps - end_timesteps).clamp(max=num_train_timesteps // num_phases)
    return end_timesteps + torch.floor(u.to(end_timesteps.device) * span).long()


def noise_travel(
    sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, to_timesteps: torch.Tensor, alphas_cumprod
) -> torch.Tensor:
    """Forward diffusion of x_s from s to t >= s (per sample, [B]): x_t = sqrt(a_t / a_s) x_s + sqrt(1 - a_t / a_s) eps,
    a = alphas_cumprod. If x_s = sqrt(a_s) x_0 + sqrt(1 - a_s) eps', x_t has the marginal of q(x_t | x_0)."""
    ac = alphas_cumprod.to(sample.device)
    ratio = append_dims(ac[to_timesteps.to(sample.device)] / ac[timesteps.to(sample.device)], sample.ndim)
    return ratio.sqrt() * sample + (1 - ratio).sqrt() * noise


def flow_sampling_sigmas(num_ddim_timesteps: int, steps: int, num_train_timesteps: int = 1000) -> list[float]:
    """The ``sigmas`` argument of a flow pipeline call (StableDiffusion3Pipeline, FluxPipeline) that makes its
    ``FlowMatchEulerDiscreteScheduler`` visit the N-point solver grid at ``steps`` points, descending, before the
    final step to sigma 0: grid indices N-1-floor(j N / steps), as unshifted sigmas (t + 1) / T. At ``steps`` = K
    these are exactly the K phases' upper ends (``phase_edges``); the scheduler shifts them as training did."""
    if not 1 <= steps <= num_ddim_timesteps:
        raise ValueError(f"a PCM flow model samples 1..{num_ddim_timesteps} steps (its solver grid), got {steps}")
    grid = lcm.ddim_timesteps(num_train_timesteps, num_ddim_timesteps)
    return [(grid[int(i)].item() + 1) / num_train_timesteps for i in phase_starts(num_ddim_timesteps, steps).flip(0)]
