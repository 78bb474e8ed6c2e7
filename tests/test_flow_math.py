"""The forward process of distillation (ldmkit.diffusion.schedule) against diffusers: rectified flow against
FlowMatchEulerDiscreteScheduler / FlowMatchLCMScheduler step by step, DDPM against ldmkit's LCM/TCD functions
(themselves tested against diffusers in test_lcm_math.py / test_tcd_pcm_math.py) bit for bit."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler

from ldmkit.diffusion import lcm, tcd
from ldmkit.diffusion.schedule import Schedule, dynamic_shift_mu, flow_sigmas

T = 1000


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_are_the_schedulers_training_sigmas(shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    torch.testing.assert_close(flow_sigmas(T, shift), sched.sigmas.flip(0), rtol=0, atol=1e-6)
    s = Schedule.flow(T, shift)
    torch.testing.assert_close(s.model_t, sched.timesteps.flip(0), rtol=0, atol=1e-3)  # what the pipelines pass


def test_dynamic_shift_matches_flux_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    for seq in (16, 256, 1024, 4096):
        mu = dynamic_shift_mu(seq, cfg)
        assert mu == pytest.approx(calculate_shift(seq, 256, 4096, 0.5, 1.15))
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, use_dynamic_shifting=True)
        index = torch.tensor([0, 19, 499, 998, 999])
        expected = sched.time_shift(mu, 1.0, (index + 1).double() / T)
        torch.testing.assert_close(flow_sigmas(T, mu=mu)[index], expected.float(), rtol=0, atol=1e-6)


def test_flow_noise_and_euler_step_equal_the_scheduler():
    """x_t = (1 - sigma) x0 + sigma eps is scale_noise; the DDIM step alpha_s x0 + sigma_s eps from a velocity is
    FlowMatchEulerDiscreteScheduler.step from sigma_t to sigma_s."""
    g = torch.Generator().manual_seed(0)
    x0, eps, v = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0)
    s = Schedule.flow(T, 3.0)
    t = torch.tensor([799, 799])
    noisy = sched.scale_noise(x0, sched.timesteps[T - 1 - t[:1]], eps)  # the scheduler's own training timestep
    torch.testing.assert_close(s.add_noise(x0, eps, t), noisy, rtol=1e-5, atol=1e-6)
    # Euler from sigma_t to sigma_s through the scheduler's own step (custom sigmas: the two points, unshifted
    # again by a shift-1 scheduler since they are shifted already)
    t_from, t_to = 799, 499
    euler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=1.0)
    euler.set_timesteps(sigmas=[s.sigma[t_from].item(), s.sigma[t_to].item()])
    step = euler.step(v, euler.timesteps[0], noisy).prev_sample
    x0_hat, eps_hat = s.x0(v, noisy, t), s.eps(v, noisy, t)
    torch.testing.assert_close(s.point(x0_hat, eps_hat, torch.tensor([t_to, t_to])), step, rtol=1e-5, atol=1e-5)
    # x0 and eps recombine into x_t: the conversions are exact inverses
    torch.testing.assert_close(s.add_noise(x0_hat, eps_hat, t), noisy, rtol=1e-5, atol=1e-5)


def test_flow_consistency_function_is_what_flow_match_lcm_samples():
    """f(x_t) = x_t - sigma_t v: FlowMatchLCMScheduler.step's x0 prediction (its output re-noised to sigma_next)."""
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    sched = FlowMatchLCMScheduler(num_train_timesteps=T, shift=3.0)
    sched.set_timesteps(4)
    s = Schedule.flow(T, 3.0)
    sigma = sched.sigmas[0].item()
    t = (s.sigma - sigma).abs().argmin().reshape(1)  # the index of the scheduler's first sigma
    assert s.sigma[t].item() == pytest.approx(sigma, abs=1e-6)
    out = sched.step(v, sched.timesteps[0], x, generator=torch.Generator().manual_seed(5)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    sigma_next = sched.sigmas[1].item()
    f = s.consistency(v, x, t, timestep_scaling=10.0)
    torch.testing.assert_close((1 - sigma_next) * f + sigma_next * noise, out, rtol=1e-5, atol=1e-5)
    # the boundary condition: at the lowest index f is (almost) the identity
    zero = torch.tensor([0])
    assert (s.consistency(v, x, zero, 10.0) - x).abs().max() <= s.sigma[0] * v.abs().max() + 1e-6


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_ddpm_schedule_is_the_lcm_and_tcd_math_bit_for_bit(ptype):
    """The distillation methods moved from lcm/tcd functions to the Schedule: the same numbers exactly."""
    ac = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    s = Schedule.ddpm(ac, ptype)
    g = torch.Generator().manual_seed(2)
    x, out, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t, end = torch.tensor([999, 499, 19]), torch.tensor([259, 0, 19])
    a = lcm.append_dims(ac[t], 4)
    assert torch.equal(s.add_noise(x, noise, t), a.sqrt() * x + (1 - a).sqrt() * noise)
    assert torch.equal(s.x0(out, x, t), lcm.predicted_origin(out, t, x, ptype, ac))
    assert torch.equal(s.eps(out, x, t), lcm.predicted_noise(out, t, x, ptype, ac))
    assert torch.equal(s.consistency(out, x, t, 10.0), lcm.consistency_function(out, x, t, ptype, ac, 10.0))
    assert torch.equal(s.trajectory(out, x, t, end), tcd.trajectory_consistency_function(out, x, t, end, ptype, ac))
    grid = lcm.ddim_timesteps(T, 50)
    index = torch.tensor([49, 10, 0])
    t_n = (grid[index] - T // 50).clamp(min=0)
    x0, eps = s.x0(out, x, t), s.eps(out, x, t)
    ddim = lcm.ddim_step(x0, eps, lcm.ddim_alpha_prev(ac, grid)[index])
    assert torch.equal(s.point(x0, eps, t_n), ddim)
    assert torch.equal(s.timestep(t), t)
