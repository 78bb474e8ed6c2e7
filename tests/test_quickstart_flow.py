"""``ldmkit quickstart --objective flow``: the U-ViT teacher trained with the rectified-flow objective (its loss by
hand, as diffusers' SD3 script draws its sigmas), a flow U-ViT sampled by ldmkit's pipeline against diffusers'
FlowMatchEulerDiscreteScheduler stepped by hand, its family and solvers, and the quickstart end to end at a tiny
size (the flow solver rows, one objective per --out, the methods that take a flow teacher)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from ldmkit.errors import UserError
from ldmkit.methods import load_config

from helpers.quickstart import run_quickstart, tiny_plan
from helpers.uvit import features_dir, pinned_threads, seeded, shapes_dir, tiny_pipeline, tiny_uvit  # noqa: F401

ROOT = Path(__file__).parents[1]
DEBUG = ROOT / "configs" / "uvit" / "debug.yaml"
SHIFT = 3.0  # SD3's shift: the sigmas differ from unshifted ones everywhere but at the ends


def _flow_method(tiny_sd15, features_dir, out: Path, *extra: str):
    from accelerate import Accelerator

    from ldmkit.methods.uvit import UViTMethod

    cfg = load_config(
        str(DEBUG),
        [
            f"--model.pretrained={tiny_sd15}",
            f"--data.path={features_dir}",
            f"--output_dir={out}",
            "--method.prediction_type=flow",
            "--method.snr_gamma=null",
            f"--method.flow_shift={SHIFT}",
            *extra,
        ],
    )
    torch.manual_seed(0)
    return UViTMethod(cfg, Accelerator(cpu=True))


def _batch(n: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(n, 4, 4, 4, generator=g), torch.full((n, 4, 4, 4), -3.0)
    return {
        "latent_moments": torch.cat([mean, logvar], 1),
        "prompt_embeds": torch.randn(n, 77, 32, generator=g),
        "seed": torch.arange(n) + 7,
    }


def test_flow_teacher_loss_is_the_rectified_flow_loss_by_hand(tiny_sd15, features_dir, tmp_path):
    """SD3's objective as diffusers' train_dreambooth_lora_sd3.py computes it: u = sigmoid(N(0, 1)), the scheduler's
    sigma at index floor(u T) of FlowMatchEulerDiscreteScheduler(shift).sigmas, x_t = (1 - sigma) x_0 + sigma eps,
    the U-ViT at sigma * 1000, MSE to eps - x_0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ldmkit.rng import SampleRNG

    method = _flow_method(tiny_sd15, features_dir, tmp_path)
    batch = _batch()
    loss, _ = method.loss(batch)

    rng = SampleRNG(batch["seed"])
    mean, logvar = batch["latent_moments"].chunk(2, dim=1)
    x0 = (mean + torch.exp(0.5 * logvar) * rng.randn(4, 4, 4)) * 0.2301  # the debug recipe's scale factor
    noise, u = rng.randn(4, 4, 4), torch.sigmoid(rng.randn())
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    indices = (u * 1000).long()
    sigma = scheduler.sigmas[indices].view(-1, 1, 1, 1)
    assert not torch.allclose(sigma.flatten(), 1 - indices / 1000)  # shifted
    xt = (1 - sigma) * x0 + sigma * noise
    pred = method.unet(xt, scheduler.timesteps[indices], batch["prompt_embeds"]).sample
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, noise - x0))


def test_flow_teacher_exports_a_flow_uvit_its_family_and_solvers_know(tiny_sd15, features_dir, tmp_path):
    """The export says objective flow (unet config) and carries a FlowMatchEulerDiscreteScheduler of the training
    shift: detect_family gives the flow U-ViT family, whose schedule is that scheduler's sigmas, and the sampler
    names become the flow solvers (Euler, Heun, DPM-Solver++ / UniPC on flow sigmas, same shift); DDIM is refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ldmkit.families import FlowUViTFamily, UViTFamily, detect_family
    from ldmkit.inference import load_pipeline, set_scheduler

    method = _flow_method(tiny_sd15, features_dir, tmp_path)
    method.export(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "unet" / "config.json").read_text())["objective"] == "flow"
    assert detect_family(tmp_path / "export") is FlowUViTFamily and FlowUViTFamily.objective == "flow"
    assert detect_family(tiny_sd15) is not FlowUViTFamily and UViTFamily.objective == "diffusion"
    cfg = load_config(str(DEBUG), [f"--model.pretrained={tmp_path / 'export'}", f"--data.path={features_dir}"])
    schedule = FlowUViTFamily(cfg.model.pretrained).schedule(None, 32)
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    torch.testing.assert_close(schedule.sigma, reference.sigmas.flip(0))
    torch.testing.assert_close(schedule.model_t, reference.timesteps.flip(0))

    pipe = load_pipeline(tmp_path / "export")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == SHIFT
    for name, cls in (("heun", "FlowMatchHeunDiscreteScheduler"), ("dpm", "DPMSolverMultistepScheduler")):
        set_scheduler(pipe, name)
        assert type(pipe.scheduler).__name__ == cls
    assert pipe.scheduler.config.use_flow_sigmas and pipe.scheduler.config.prediction_type == "flow_prediction"
    assert pipe.scheduler.config.flow_shift == SHIFT
    set_scheduler(pipe, "unipc")
    assert pipe.scheduler.config.flow_shift == SHIFT and pipe.scheduler.config.use_flow_sigmas
    with pytest.raises(UserError, match="no flow-matching form"):
        set_scheduler(pipe, "ddim")


def test_flow_uvit_pipeline_equals_flow_match_euler_by_hand(tiny_sd15):
    """UViTPipeline with FlowMatchEulerDiscreteScheduler: x <- x + (sigma_{i+1} - sigma_i) v, v the guided velocity
    v_u + g (v_c - v_u) of the U-ViT at the scheduler's timesteps (sigma * 1000), from the same initial noise, on
    FluxPipeline's grid (sigmas evenly from 1 to 1 / N, then shifted)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    unet = tiny_uvit(objective="flow")
    pipe = tiny_pipeline(tiny_sd15, unet, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT))
    prompts, steps, g = ["a red circle", "a blue square"], 4, 3.0
    noise = torch.randn(2, 4, 4, 4, generator=seeded(3))
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=g, latents=noise.clone(), output_type="latent")

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])  # pipeline_flux.py: np.linspace(1.0, 1 / N, N)
    shifted = [SHIFT * s / (1 + (SHIFT - 1) * s) for s in (1.0, 0.75, 0.5, 0.25)]
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([*shifted, 0.0]))
    cond, uncond = pipe.encode_prompt(prompts, "cpu"), pipe.encode_prompt(["", ""], "cpu")
    x = noise
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            v_c, v_u = (unet(x, t, c).sample for c in (cond, uncond))
            x = x + (scheduler.sigmas[i + 1] - scheduler.sigmas[i]) * (v_u + g * (v_c - v_u))
    assert scheduler.sigmas[-1] == 0
    torch.testing.assert_close(out.images, x, rtol=1e-5, atol=1e-5)


def test_flow_dmd2_samples_the_pipelines_sigmas_at_any_step_count(tiny_sd15, features_dir, tmp_path):
    """DMD2-LoRA of a flow U-ViT (shift 3): the 1-step generator is trained at sigma = 1, and its export, sampled as
    its record says (FlowMatchLCMScheduler), visits the U-ViT pipeline's N sigmas at N = 1, 2, 4, 8 steps:
    linspace(1, 1/N, N) shifted (pipelines/uvit.py, FluxPipeline's grid), where a 4-step generator is trained too.
    On a flow, validation_steps beyond the generator's are accepted and sampler_grid is refused."""
    from ldmkit.inference import load_export

    from helpers.lcm import make_distill_method

    _flow_method(tiny_sd15, features_dir, tmp_path).export(tmp_path / "teacher")
    teacher = tmp_path / "teacher"
    m = make_distill_method("dmd2_lora", teacher, tmp_path / "one", "--method.validation_steps=[1,2,4,8]")
    assert m.schedule.is_flow and m.generator_steps.tolist() == [999] and float(m.schedule.sigma[999]) == 1.0
    assert m.classifier is not None  # the GAN term reads the U-ViT's mid-block tokens

    def shifted(n: int) -> list[float]:
        return [SHIFT * s / (1 + (SHIFT - 1) * s) for s in torch.linspace(1.0, 1 / n, n).tolist()]

    m.export(tmp_path / "export")  # the training loop writes the record next to it; here it is read from the method
    record = m.sampling_record()
    assert record.scheduler == "FlowMatchLCMScheduler" and record.steps == 1
    pipe, _ = load_export(tmp_path / "export", base=teacher)
    assert type(pipe.scheduler).__name__ == record.scheduler
    seen: list[float] = []
    hook = pipe.unet.register_forward_pre_hook(lambda _, args: seen.extend(args[1].flatten().tolist()))
    for n in (1, 2, 4, 8):
        seen.clear()
        pipe("a red circle", num_inference_steps=n, guidance_scale=record.guidance, output_type="latent")
        torch.testing.assert_close(torch.tensor(seen), torch.tensor(shifted(n)) * 1000, rtol=0, atol=1e-3)
    hook.remove()

    four = make_distill_method("dmd2_lora", teacher, tmp_path / "four", "--method.num_denoising_steps=4")
    trained = four.schedule.sigma[four.generator_steps].double()
    torch.testing.assert_close(trained, torch.tensor(shifted(4), dtype=torch.float64), rtol=0, atol=2e-3)
    with pytest.raises(UserError, match="sampler_grid sets LCMScheduler's grid"):
        make_distill_method("dmd2_lora", teacher, tmp_path / "grid", "--method.sampler_grid=8")


# ---- the quickstart end to end at a tiny size -------------------------------------------------------------


def test_quickstart_flow_end_to_end(tmp_path, shapes_folder, monkeypatch, capsys):
    """--objective flow at a tiny size: a flow teacher (objective in its config, FlowMatchEuler scheduler), its
    Euler / Heun / DPM++ / UniPC rows at the student's steps (Euler's full-step run the reference set), the
    LCM-LoRA sampled with FlowMatchLCMScheduler; the --out refuses an eps run; DMD2-LoRA in the same --out (its
    flow recipe, GAN term on) sampled at 1, 2 and 4 steps with FlowMatchLCMScheduler; a method without a flow form
    is refused in one line. (That a second --method in one --out reuses the teacher and its evaluation is
    tests/test_quickstart.py's, the same code for both objectives.)"""
    from ldmkit.quickstart import stages, student_methods

    monkeypatch.setattr(stages, "plan_for", lambda *a, **k: (tiny_plan(), "A tiny plan for a test."))
    out = tmp_path / "qs"
    base = ["--data", str(shapes_folder), "--out", str(out)]
    assert run_quickstart(["--objective", "flow", *base]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["objective"] == "flow" and report["plan"]["reference_solver"] == "euler"
    teacher = Path(report["exports"]["teacher"])
    assert json.loads((teacher / "unet" / "config.json").read_text())["objective"] == "flow"
    assert json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == (
        "FlowMatchEulerDiscreteScheduler"
    )
    student = json.loads((out / "evaluate" / "lcm_lora" / "results.json").read_text())["run"]
    assert student["scheduler"] == "FlowMatchLCMScheduler"
    figs = report["figures"]
    assert figs["teacher_50"]["steps"] == 8 and figs["teacher_50"]["unet_evals_per_image"] == 16  # Euler, guided
    for n in (1, 2, 4):
        for solver, evals in (("euler", 2 * n), ("heun", 2 * (2 * n - 1)), ("dpm", 2 * n), ("unipc", 2 * n)):
            f = figs[f"teacher_{solver}_{n}"]
            assert f["unet_evals_per_image"] == evals, (solver, n)
            assert f["fd"] is not None and f["fd_to_teacher_50"] is not None and f["adherence"] is not None
        assert figs[f"lcm_{n}"]["unet_evals_per_image"] == n and figs[f"lcm_{n}"]["fd"] is not None
    assert not any(k.startswith("teacher_ddim") for k in figs)
    assert figs["teacher_4"]["fd_to_teacher_50"] == figs["teacher_euler_4"]["fd_to_teacher_50"]
    html = (out / "report.html").read_text()
    assert "Heun" in html and "rectified-flow" in html and "teacher 8 steps (Euler, guided)" not in html
    for row in ("teacher Euler", "teacher Heun", "teacher DPM++ 2M", "teacher UniPC", "LCM-LoRA"):
        assert row in printed

    # One objective per --out (the check comes before any stage: nothing of the flow run is touched).
    with pytest.raises(UserError, match="--objective flow; use another --out"):
        run_quickstart(base)
    assert {"lcm_lora", "dmd2_lora", "dmd2"} <= set(student_methods("flow")) == set(student_methods())

    # DMD2-LoRA on the flow teacher in the same --out (teacher and its rows reused): its 1-step generator with the
    # GAN term on, sampled by FlowMatchLCMScheduler at 1, 2 and 4 steps as its export records.
    assert run_quickstart(["--objective", "flow", "--method", "dmd2_lora", *base]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["student"] == "DMD2-LoRA" and report["sampling"]["recorded"]
    run = json.loads((out / "evaluate" / "dmd2_lora" / "results.json").read_text())["run"]
    assert run["scheduler"] == "FlowMatchLCMScheduler"
    saved = yaml.safe_load((out / "dmd2_lora" / "config.yaml").read_text())["method"]
    assert saved["sampler_grid"] is None and saved["gen_cls_loss_weight"] > 0  # the flow recipe, GAN term on
    for n in (1, 2, 4):
        f = report["figures"][f"lcm_{n}"]
        assert f["method"] == "dmd2_lora" and f["unet_evals_per_image"] == n and f["fd"] is not None

    # A method whose class does not say supports_flow is refused in one line, before any stage.
    from ldmkit.methods.tcd import TCDMethod

    monkeypatch.setattr(TCDMethod, "supports_flow", False)
    with pytest.raises(UserError, match="--method tcd does not distil a rectified-flow teacher"):
        run_quickstart(["--objective", "flow", "--method", "tcd", *base])
