"""TCD, PCM and full LCD from rectified-flow teachers (tiny SD3 and FLUX.1-dev twins).

The flow math against diffusers' flow schedulers step by step: Heun's teacher step against
FlowMatchHeunDiscreteScheduler, TCD's gamma step against FlowMatchEulerDiscreteScheduler (gamma 0) and
FlowMatchLCMScheduler (gamma 1) and against the flow's marginals in between, PCM's sampling sigmas against what
FlowMatchEulerDiscreteScheduler visits (the trained phase edges). Then each method's loss is its algorithm by hand,
decreases, survives a restart, and its export loads in stock diffusers (every module adapted) and generates at
1/2/4/8 steps, with ``ldmkit generate`` and ``merge-lora`` too."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FlowMatchLCMScheduler,
)
from safetensors.torch import load_file

from ldmkit.diffusion import lcm, pcm, tcd
from ldmkit.diffusion.schedule import Schedule, flow_noise_travel, heun_step
from ldmkit.errors import UserError
from ldmkit.lora.adapters import adapters_disabled
from ldmkit.rng import SampleRNG

from helpers.lcm import count_lora_modules, fixed_batch, make_distill_method, train_steps
from helpers.runs import assert_debug_recipe_resumes
from helpers.sd import pinned_threads  # noqa: F401  (autouse fixture)

T, RES = 1000, 32


# ------------------------------------------------------------------------------------------- the math
def test_heun_step_is_flow_match_heun_scheduler():
    """heun_step(x, v, v', sigma, sigma') is FlowMatchHeunDiscreteScheduler's two calls (Euler, then the mean slope)."""
    g = torch.Generator().manual_seed(0)
    x, v, v_next = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sched = FlowMatchHeunDiscreteScheduler(num_train_timesteps=T, shift=3.0)
    sched.set_timesteps(4)
    euler = sched.step(v, sched.timesteps[0], x).prev_sample
    torch.testing.assert_close(euler, x + (sched.sigmas[1] - sched.sigmas[0]) * v)
    heun = sched.step(v_next, sched.timesteps[1], euler).prev_sample
    torch.testing.assert_close(heun_step(x, v, v_next, sched.sigmas[0], sched.sigmas[1]), heun, rtol=1e-6, atol=1e-6)
    s = Schedule.flow(T, 3.0)  # on the training grid: indices -> its sigmas
    t, t_to = torch.tensor([799, 799]), torch.tensor([499, 499])
    expected = heun_step(x, v, v_next, s.sigma[799], s.sigma[499])
    torch.testing.assert_close(s.heun(x, v, v_next, t, t_to), expected)


def _sample(scheduler, steps: int, gen_seed: int, **timesteps_kw) -> torch.Tensor:
    """A full sampling loop with a fixed smooth 'model' v(x, t), noise from one generator."""
    scheduler.set_timesteps(steps, **timesteps_kw)
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for t in scheduler.timesteps:
        v = torch.tanh(x) * (t / T) - 0.3
        x = scheduler.step(v, t, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_tcd_gamma_0_is_flow_match_euler_and_gamma_1_is_flow_match_lcm(shift):
    tcd0 = tcd.FlowMatchTCDScheduler.with_gamma({"num_train_timesteps": T, "shift": shift}, 0.0)
    tcd1 = tcd.FlowMatchTCDScheduler.with_gamma({"num_train_timesteps": T, "shift": shift}, 1.0)
    euler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    lcm_s = FlowMatchLCMScheduler(num_train_timesteps=T, shift=shift)
    for steps in (1, 2, 4):
        torch.testing.assert_close(_sample(tcd0, steps, 5), _sample(euler, steps, 5), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_sample(tcd1, steps, 5), _sample(lcm_s, steps, 5), rtol=1e-5, atol=1e-5)
    half = tcd.FlowMatchTCDScheduler.with_gamma({"num_train_timesteps": T, "shift": shift}, 0.3)
    assert not torch.allclose(_sample(half, 4, 5), _sample(euler, 4, 5), atol=1e-3)


def test_flow_gamma_step_keeps_the_flow_marginal():
    """From x_t = (1 - t) x0 + t eps with the true x0 and eps, the gamma step to s has the marginal
    (1 - s) x0 + s eps' (mean (1 - s) x0, std s) for every gamma; its pieces are the paper's: the straight path to
    s' = (1 - gamma) s, then forward noising s' -> s."""
    n = 200_000
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((n,), 0.7)
    eps, z = torch.randn(n, generator=g), torch.randn(n, generator=g)
    s = 0.6
    for gamma in (0.0, 0.3, 1.0):
        out = tcd.flow_gamma_step(x0, eps, s, gamma, z)
        assert out.mean().item() == pytest.approx((1 - s) * 0.7, abs=5e-3)
        assert out.std().item() == pytest.approx(s, abs=5e-3)
        sp = (1 - gamma) * s
        r = (1 - s) / (1 - sp)
        by_hand = r * ((1 - sp) * x0 + sp * eps) + math.sqrt(s**2 - (r * sp) ** 2) * z
        torch.testing.assert_close(out, by_hand)
    x_mid = 0.5 * x0 + 0.5 * eps  # forward noising keeps the marginal: sigma 0.5 -> 0.8
    travelled = flow_noise_travel(x_mid, z, torch.tensor(0.5), torch.tensor(0.8))
    assert travelled.std().item() == pytest.approx(0.8, abs=5e-3)


@pytest.mark.parametrize("dynamic", [False, True])
def test_pcm_flow_sigmas_are_the_trained_edges_in_flow_match_euler(dynamic):
    """flow_sampling_sigmas(N, n) handed to FlowMatchEulerDiscreteScheduler (as the pipelines' ``sigmas``) makes it
    visit exactly the solver grid's shifted sigmas, at n = K the phase edges; each Euler step between edges is the
    trained consistency function f(x, t, s) of the phase (the schedule's ``trajectory``)."""
    n_grid, k_phases = 100, 4
    mu = 0.8 if dynamic else None
    shift = 1.0 if dynamic else 3.0
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift, use_dynamic_shifting=dynamic)
    sched.set_timesteps(sigmas=pcm.flow_sampling_sigmas(n_grid, k_phases), mu=mu)
    schedule = Schedule.flow(T, shift, mu)
    grid = lcm.ddim_timesteps(T, n_grid)
    edges = pcm.phase_edges(grid, k_phases).flip(0)  # descending: what the sampler visits
    torch.testing.assert_close(sched.sigmas[:-1], schedule.sigma[edges], rtol=0, atol=1e-6)
    assert pcm.flow_sampling_sigmas(n_grid, 4) == pytest.approx([1.0, 0.75, 0.5, 0.25])  # FluxPipeline's own at 4
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for i in range(k_phases - 1):  # the upper phases: the sampler's step is the consistency map to the edge
        t = edges[i].reshape(1)
        index = (grid == t).nonzero().reshape(1)
        end = pcm.phase_end_timesteps(index, grid, k_phases)
        assert end.item() == edges[i + 1].item()
        sched._step_index = i
        step = sched.step(v, sched.timesteps[i], x).prev_sample
        torch.testing.assert_close(schedule.trajectory(v, x, t, end), step, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        pcm.flow_sampling_sigmas(50, 51)


# ------------------------------------------------------------------------------------------- the losses by hand
def _sigmas(fam) -> torch.Tensor:
    """The teacher's training sigmas by index t = 0..T-1, from diffusers' FlowMatchEulerDiscreteScheduler."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(fam.noise_scheduler.config)
    if sched.config.use_dynamic_shifting:  # FLUX: the shift of the training resolution's token count
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = sched.config
        mu = calculate_shift((RES // 16) ** 2, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        sched.set_timesteps(sigmas=list(torch.linspace(1.0, 1 / T, T).numpy()), mu=mu)
    return sched.sigmas[:T].flip(0)


def _perturb(module, seed: int, scale: float, only_lora: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ("lora_B" in name) or (not only_lora and p.ndim == 2):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _end_index(name: str, m, index, t, u) -> torch.Tensor:
    """s per sample, by hand: TCD uniform on the grid points at or below t_n; PCM the lower edge of the phase;
    LCM None (the origin: f = x0 = x_t - sigma v)."""
    grid, k = m.ddim_timesteps, m.k
    if name == "lcd":
        return None
    if name.startswith("tcd"):
        j = torch.floor(u * (index + 1)).long().clamp(max=index)
        return (grid[j] - k).clamp(min=0)
    n, kp = len(grid), m.mcfg.num_phases
    pos = [math.floor(i * n / kp) for i in range(kp)]  # descending positions of the K sampled edges
    uppers = sorted(grid[n - 1 - p].item() for p in pos)
    lowers = [0, *uppers[:-1]]
    return torch.tensor([lowers[next(i for i, e in enumerate(uppers) if e >= ti)] for ti in grid[index].tolist()])


CASES = [
    ("tcd_lora", "sd3", "euler"),
    ("pcm_lora", "flux", "euler"),
    ("pcm_lora", "sd3", "heun"),
    ("lcd", "flux", "euler"),
]


@pytest.mark.parametrize("name,arch,solver", CASES, ids=["-".join(c) for c in CASES])
def test_loss_is_the_algorithm_on_the_flow_by_hand_and_decreases(name, arch, solver, request, tmp_path):
    """Steps 1-8 with diffusers' sigmas: x_t = (1 - s) x0 + s eps; the teacher's Euler (or Heun) step over the
    sigmas (SD3: CFG in the LCM form; FLUX.1-dev: w its own guidance input, one pass); student and target the
    Euler step to the method's s (x_t itself where s = t); then 10 steps lower the loss."""
    model = request.getfixturevalue(f"tiny_{arch}")
    extra = ["--method.loss_type=huber", f"--method.teacher_solver={solver}", "--method.plain_teacher=false"]
    if name == "lcd":
        extra = ["--method.loss_type=huber", "--method.ema_decay=0.95"]
    if name.startswith("pcm"):
        extra.append("--method.num_ddim_timesteps=100")
    m = make_distill_method(name, model, tmp_path, *extra, res=RES)
    _perturb(m.unet, 0, 0.05 if name != "lcd" else 0.02, only_lora=name != "lcd")
    batch = fixed_batch()
    loss, _ = m.loss(batch)

    fam, sig = m.family, _sigmas(m.family)
    teacher = m.teacher_unet if name == "lcd" else m.unet
    target = m.target_unet if name == "lcd" else m.unet
    rng = SampleRNG(batch["seed"])
    z = fam.latents(batch, rng)
    cond, uncond = ({k: v.float() for k, v in c.items()} for c in fam.conditions(batch, resolution=RES))
    index = rng.randint(0, m.mcfg.num_ddim_timesteps)
    t_start = m.ddim_timesteps[index]
    t = (t_start - m.k).clamp(min=0)
    s_start, s_n = sig[t_start].reshape(-1, 1, 1, 1), sig[t].reshape(-1, 1, 1, 1)
    z_start = (1 - s_start) * z + s_start * rng.randn(*z.shape[1:])
    w = m.w_min + (m.mcfg.w_max - m.w_min) * rng.rand()
    embedded = arch == "flux"
    g = w if embedded else None
    end = _end_index(name, m, index, t, rng.rand() if name.startswith("tcd") else None)
    s_end = torch.zeros(()) if end is None else sig[end].reshape(-1, 1, 1, 1)

    def v(model_, x, sigma, c, guidance=None):
        return fam.denoise(model_, x, sigma.reshape(-1) * T, c, guidance)

    def euler_to(x, vel, sigma, at):  # f(x, t, s): the Euler step to s, x itself where s is t
        if end is None:
            return x - sigma * vel
        return torch.where(lcm.append_dims(end == at, 4), x, x + (s_end - sigma) * vel)

    def guided(x, sigma):
        if embedded:
            return v(teacher, x, sigma, cond, w)
        v_c, v_u = v(teacher, x, sigma, cond), v(teacher, x, sigma, uncond)
        return v_c + lcm.append_dims(w, 4) * (v_c - v_u)  # CFG on v = CFG on x0 and eps (linear)

    student = euler_to(z_start, v(m.unet, z_start, s_start, cond, g), s_start, t_start)
    with torch.no_grad():
        ctx = adapters_disabled(m.unet) if name != "lcd" else torch.no_grad()
        with ctx:
            v1 = guided(z_start, s_start)
            z_prev = z_start + (s_n - s_start) * v1
            if solver == "heun":
                z_prev = z_start + (s_n - s_start) * 0.5 * (v1 + guided(z_prev, s_n))
        target_out = euler_to(z_prev, v(target, z_prev, s_n, cond, g), s_n, t)
    torch.testing.assert_close(loss, lcm.pseudo_huber(student, target_out, 0.001), rtol=2e-5, atol=1e-7)

    if solver == "heun":  # the heun case checks the teacher step only; the euler cases train
        return
    losses = train_steps(m, batch, 10, 1e-3 if name != "lcd" else 1e-4)
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_what_still_does_not_run_on_flows_says_so(tiny_flux, tiny_sd15, tmp_path):
    with pytest.raises(UserError, match="adversarial term does not run on FLUX"):
        make_distill_method("pcm_lora", tiny_flux, tmp_path / "a", "--method.adv_weight=0.1")
    with pytest.raises(UserError, match="teacher_solver heun needs a rectified-flow teacher"):
        make_distill_method("tcd_lora", tiny_sd15, tmp_path / "b", "--method.teacher_solver=heun")


# ------------------------------------------------------------------------------------------- exports
def _generate(pipe, steps: int, guidance: float, **kw):
    out = pipe(
        "a red circle",
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=RES,
        width=RES,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).images
    assert out.shape == (1, RES, RES, 3) and bool(torch.isfinite(torch.from_numpy(out)).all())
    return out


def _stock_lora_pipe(model, export):
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(export))
    pipe.set_progress_bar_config(disable=True)
    saved = {k.rsplit(".lora_", 1)[0] for k in load_file(str(export / "pytorch_lora_weights.safetensors"))}
    assert count_lora_modules(pipe.transformer) == len(saved) > 0  # every module of the file adapted
    return pipe


def _run_cli(*argv: str) -> None:
    from ldmkit.cli import main

    assert main(list(argv)) == 0


@pytest.mark.parametrize("name,arch", [("tcd_lora", "flux"), ("pcm_lora", "sd3")])
def test_debug_recipe_resumes_and_its_export_samples_everywhere(name, arch, request, shapes_folder, tmp_path):
    """The debug recipe resumes exactly; its export loads in stock diffusers with every module adapted and
    generates at 1/2/4/8 steps as its sampling record says (TCD: the stock Euler scheduler = gamma 0, and ldmkit's
    gamma sampler; PCM: the stock Euler scheduler at the grid's sigmas); ldmkit generate and merge-lora run on it."""
    from ldmkit.inference import FLOW_GRID, generate_images, load_export, read_sampling_record

    model = request.getfixturevalue(f"tiny_{arch}")
    assert_debug_recipe_resumes(name, arch, model, shapes_folder, tmp_path)
    export = tmp_path / "full" / "export"
    record = read_sampling_record(export)
    assert record.scheduler == "FlowMatchEulerDiscreteScheduler"
    pipe = _stock_lora_pipe(model, export)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(export, subfolder="scheduler")
    for steps in (1, 2, 4, 8):
        sigmas = pcm.flow_sampling_sigmas(record.flow_grid, steps) if record.flow_grid else None
        _generate(pipe, steps, record.guidance, sigmas=sigmas)
    loaded, _ = load_export(export)
    if name == "tcd_lora":
        assert (record.sampler, record.eta, record.flow_grid) == ("FlowMatchTCDScheduler", 0.3, None)
        assert isinstance(loaded.scheduler, tcd.FlowMatchTCDScheduler) and loaded.scheduler.gamma == 0.3
    else:
        assert (record.sampler, record.eta, record.flow_grid) == (None, None, 100)
        assert getattr(loaded, FLOW_GRID) == 100  # generate_images passes the grid's sigmas (generate, evaluate)
        loaded.set_progress_bar_config(disable=True)
        kw = dict(height=RES, width=RES)
        grid = np.asarray(generate_images(loaded, ["a red circle"], 4, 1.0, 0, **kw)[0])
        given = np.asarray(generate_images(loaded, ["a red circle"], 4, 1.0, 0, sigmas=[1.0, 0.75, 0.5, 0.25], **kw)[0])
        delattr(loaded, FLOW_GRID)
        default = np.asarray(generate_images(loaded, ["a red circle"], 4, 1.0, 0, **kw)[0])
        assert np.array_equal(grid, given) and not np.array_equal(grid, default)
    _run_cli("generate", "--model", str(model), "--lora", str(export), "--prompt", "a red circle",
             "--height", str(RES), "--width", str(RES), "--out", str(tmp_path / "gen"))  # fmt: skip
    assert json.loads((tmp_path / "gen" / "generate.json").read_text())["scheduler_class"] == (
        "FlowMatchTCDScheduler" if name == "tcd_lora" else "FlowMatchEulerDiscreteScheduler"
    )
    if name == "tcd_lora":  # merge-lora: once (the PCM export, whose record carries the grid)
        return
    merged = tmp_path / "merged"
    _run_cli("merge-lora", "--model", str(model), "--lora", str(export), "--out", str(merged))
    assert read_sampling_record(merged).flow_grid == record.flow_grid
    _run_cli("generate", "--model", str(merged), "--prompt", "a red circle", "--steps", "2",
             "--height", str(RES), "--width", str(RES), "--out", str(tmp_path / "gen2"))  # fmt: skip


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_full_lcd_export_is_a_stock_pipeline_that_samples(arch, request, tmp_path):
    """Full LCD on a flow: the export is the teacher's pipeline class with the trained transformer and
    FlowMatchLCMScheduler; it generates at 1/2/4/8 steps (FLUX.1-dev: w through its guidance input; SD3: no CFG)."""
    model = request.getfixturevalue(f"tiny_{arch}")
    m = make_distill_method("lcd", model, tmp_path, "--method.ema_decay=0.5", res=RES)
    train_steps(m, fixed_batch(), 2, 1e-4)
    m.export(tmp_path / "export")
    record = m.sampling_record()
    assert record.scheduler == "FlowMatchLCMScheduler" and record.guidance_embedded == (arch == "flux")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export")
    assert isinstance(pipe.scheduler, FlowMatchLCMScheduler)
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(
        dict(pipe.transformer.named_parameters())["proj_out.weight"],
        dict(m.target_unet.named_parameters())["proj_out.weight"],
    )
    for steps in (1, 2, 4, 8):
        _generate(pipe, steps, record.guidance)
