"""ldmkit.diffusion.tcd / pcm against the papers' formulas and diffusers' TCDScheduler."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, TCDScheduler

from ldmkit.diffusion import lcm, pcm, tcd

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_trajectory_function_is_tcd_scheduler_pred_noised_sample(prediction_type):
    """TCDScheduler.step's pred_noised_sample is f(x_t, t, s) with s = floor((1 - gamma) * t_prev)."""
    ddpm = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    s = tcd.tcd_scheduler(ddpm.config, original_inference_steps=50)
    assert isinstance(s, TCDScheduler) and s.config.original_inference_steps == 50
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 759, 499, 259]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for gamma in (0.0, 0.3):
        s.set_timesteps(4)
        for i, t in enumerate(s.timesteps.tolist()):
            out = torch.randn(2, 4, 8, 8, generator=g)
            step = s.step(out, t, x, eta=gamma, generator=torch.Generator().manual_seed(1))
            t_prev = s.timesteps[i + 1].item() if i + 1 < len(s.timesteps) else 0
            end = int((1 - gamma) * t_prev)
            f = tcd.trajectory_consistency_function(
                out, x, torch.full((2,), t), torch.full((2,), end), prediction_type, s.alphas_cumprod
            )
            torch.testing.assert_close(f, step.pred_noised_sample, rtol=1e-5, atol=1e-5)
            if gamma == 0.0:
                torch.testing.assert_close(f, step.prev_sample, rtol=1e-5, atol=1e-5)
            x = step.prev_sample


def test_trajectory_function_equals_the_papers_exponential_integrator_form():
    ac = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t, s = torch.tensor([999, 500, 40]), torch.tensor([259, 0, 19])
    x0 = lcm.predicted_origin(out, t, x, "epsilon", ac)
    ours = tcd.trajectory_consistency_function(out, x, t, s, "epsilon", ac)
    torch.testing.assert_close(ours, tcd.exponential_integrator_step(x0, x, t, s, ac), rtol=1e-4, atol=1e-4)


def test_trajectory_function_boundary_and_lcm_limit():
    ac = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([259, 999])
    # f(x_t, t, t) = x_t exactly
    assert torch.equal(tcd.trajectory_consistency_function(out, x, t, t, "epsilon", ac), x)
    # s = 0 is the DDIM jump to t=0: alpha_0 x0 + sigma_0 eps, the LCM consistency function as c_skip -> 0
    f0 = tcd.trajectory_consistency_function(out, x, t, torch.zeros(2, dtype=torch.long), "epsilon", ac)
    x0 = lcm.predicted_origin(out, t, x, "epsilon", ac)
    eps = lcm.predicted_noise(out, t, x, "epsilon", ac)
    torch.testing.assert_close(f0, ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * eps)


def test_sample_end_timesteps_covers_the_grid_below_t_n():
    grid = lcm.ddim_timesteps(1000, 50)
    index = torch.full((2000,), 10)
    u = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    s = tcd.sample_end_timesteps(index, grid, 20, u)
    # t_n = grid[10] - 20 = 199; choices {0, 19, 39, ..., 199}: 11 values, each about 1/11
    assert sorted(set(s.tolist())) == [0] + list(range(19, 200, 20))
    counts = torch.bincount(torch.searchsorted(torch.tensor([0] + list(range(19, 200, 20))), s))
    assert counts.min() > 2000 / 11 * 0.7
    assert tcd.sample_end_timesteps(torch.tensor([0, 49]), grid, 20, torch.tensor([0.999, 0.999])).tolist() == [0, 979]
    assert tcd.sample_end_timesteps(torch.tensor([49]), grid, 20, torch.tensor([0.0])).tolist() == [0]


@pytest.mark.parametrize("n,k", [(50, 4), (50, 1), (50, 2), (25, 8), (50, 50)])
def test_phase_edges_are_the_tcd_scheduler_timesteps(n, k):
    grid = lcm.ddim_timesteps(1000, n)
    s = TCDScheduler(**SD_SCHEDULE, original_inference_steps=n)
    s.set_timesteps(k)
    assert pcm.phase_edges(grid, k).tolist() == sorted(s.timesteps.tolist())
    assert pcm.phase_edges(grid, k)[-1] == 999  # the first sampled step is the top of the schedule


def test_phase_end_timesteps():
    grid = lcm.ddim_timesteps(1000, 50)  # 19, 39, ..., 999; K=4 edges 259, 499, 759, 999
    index = torch.arange(50)
    ends = pcm.phase_end_timesteps(index, grid, 4)
    t = grid[index]
    expected = torch.where(t <= 259, 0, torch.where(t <= 499, 259, torch.where(t <= 759, 499, 759)))
    assert torch.equal(ends, expected)
    # one teacher DDIM step (k = 20) never leaves the phase
    assert bool(((t - 20).clamp(min=0) >= ends).all())
    assert pcm.phase_end_timesteps(index, grid, 1).eq(0).all()  # one phase: the LCM target (t = 0)
    with pytest.raises(ValueError):
        pcm.phase_starts(50, 0)


def test_pcm_sampling_at_k_steps_lands_on_the_edges():
    """TCDScheduler at gamma 0 and K steps: each step is f(x_t, t, lower edge of t's phase)."""
    ddpm = DDPMScheduler(**SD_SCHEDULE)
    s = tcd.tcd_scheduler(ddpm.config, original_inference_steps=50)
    s.set_timesteps(4)
    grid = lcm.ddim_timesteps(1000, 50)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=g)
    for t in s.timesteps.tolist():
        out = torch.randn(1, 4, 4, 4, generator=g)
        index = torch.searchsorted(grid, torch.tensor([t]))
        end = pcm.phase_end_timesteps(index, grid, 4)
        f = tcd.trajectory_consistency_function(out, x, torch.tensor([t]), end, "epsilon", s.alphas_cumprod)
        x = s.step(out, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(f, x, rtol=1e-5, atol=1e-5)
