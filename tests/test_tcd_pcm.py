"""tcd_lora, tcd, pcm_lora, pcm on tiny SD1.5 / SDXL / U-ViT teachers: the shared Algorithm-1 frame with
their own target point, loss reduction, exports in stock diffusers with TCDScheduler, recipes, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, TCDScheduler

from ldmkit.diffusion import pcm
from ldmkit.errors import UserError
from ldmkit.inference import label_margins
from ldmkit.methods import get_method, load_config
from ldmkit.methods.card import write_model_card
from ldmkit.methods.pcm import PCMLoraMethod, PCMMethod
from ldmkit.methods.tcd import TCDLoraMethod, TCDMethod
from ldmkit.pipelines.uvit import UViTPipeline

from helpers.lcm import (
    count_lora_modules,
    fixed_batch,
    generate_at_few_steps,
    make_distill_method,
    train_steps,
    unet_inputs,
    unet_out,
)
from helpers.runs import assert_debug_recipe_resumes, assert_same_exports, logged
from helpers.uvit import pinned_threads, tiny_pipeline, tiny_uvit  # noqa: F401

ROOT = Path(__file__).parents[1]
RES = 32
NAMES = ("tcd_lora", "tcd", "pcm_lora", "pcm")
LR = {"tcd_lora": 1e-3, "pcm_lora": 1e-3, "tcd": 3e-5, "pcm": 3e-5}
CLASSES = {"tcd_lora": TCDLoraMethod, "tcd": TCDMethod, "pcm_lora": PCMLoraMethod, "pcm": PCMMethod}


def make_method(name: str, model_dir, out_dir, *extra: str):
    return make_distill_method(name, model_dir, out_dir, "--method.loss_type=huber", *extra, res=RES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd15, tiny_sdxl):
    """(arch, name) -> (method trained on a fixed batch, losses), trained once on first use."""
    runs: dict = {}

    def get(arch: str, name: str):
        if (arch, name) not in runs:
            model = tiny_sd15 if arch == "sd15" else tiny_sdxl
            method = make_method(
                name, model, tmp_path_factory.mktemp(f"{arch}-{name}"), "--method.num_ddim_timesteps=25"
            )
            runs[arch, name] = method, train_steps(method, fixed_batch(), 16, LR[name])
        return runs[arch, name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases_on_a_fixed_batch(trained, name):
    method, losses = trained("sd15", name)
    assert type(method) is CLASSES[name]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_sdxl_loss_decreases(trained):
    _, losses = trained("sdxl", "tcd_lora")
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_target_points_differ_only_where_the_methods_do(tiny_sd15, tmp_path):
    """The shared frame calls the method's target point: LCM none, TCD on the grid below t_n, PCM the phase edge."""
    from ldmkit.rng import SampleRNG

    index = torch.arange(25)
    m_tcd = make_method("tcd_lora", tiny_sd15, tmp_path / "t", "--method.num_ddim_timesteps=25")
    t = (m_tcd.ddim_timesteps[index] - m_tcd.k).clamp(min=0)
    s = m_tcd._end_timesteps(index, t, SampleRNG(torch.arange(25)))
    assert bool((s <= t).all()) and bool((s >= 0).all()) and len(set(s.tolist())) > 3
    m_pcm = make_method("pcm", tiny_sd15, tmp_path / "p", "--method.num_ddim_timesteps=25", "--method.num_phases=5")
    ends = m_pcm._end_timesteps(index, t, None)
    assert torch.equal(ends, pcm.phase_end_timesteps(index, m_pcm.ddim_timesteps, 5)) and bool((ends <= t).all())
    # at a phase edge the target is the teacher's point itself: f(x_s, s, s) = x_s
    x = torch.randn(2, 4, 4, 4)
    same = torch.tensor([199, 199])
    assert torch.equal(m_pcm._f(torch.randn_like(x), x, same, same), x)


@pytest.mark.parametrize("arch,name", [("sd15", "tcd_lora"), ("sd15", "pcm_lora"), ("sdxl", "tcd_lora")])
def test_lora_export_loads_in_stock_pipeline_with_tcd_scheduler(trained, tmp_path, request, arch, name):
    method, _ = trained(arch, name)
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    method.export(tmp_path)
    card = write_model_card(method, method.cfg, tmp_path, tmp_path / "samples").read_text()  # as the loop does
    assert f"# {name.split('_')[0].upper()}-LoRA" in card and "TCDScheduler" in card
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(model_dir)
    pipe.load_lora_weights(str(tmp_path))
    inputs = unet_inputs(method.unet)
    assert count_lora_modules(pipe.unet) == count_lora_modules(method.unet)
    torch.testing.assert_close(unet_out(pipe.unet, inputs), unet_out(method.unet, inputs), rtol=1e-5, atol=1e-5)
    pipe.scheduler = TCDScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert pipe.scheduler.config.original_inference_steps == 25
    generate_at_few_steps(pipe, 0.0 if arch == "sdxl" else 1.0, RES, eta=0.3 if name == "tcd_lora" else 0.0)


@pytest.mark.parametrize("name", ["tcd", "pcm"])
def test_full_export_is_a_stock_pipeline_with_tcd_scheduler(trained, tmp_path, name):
    method, _ = trained("sd15", name)
    method.export(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipe) is StableDiffusionPipeline and isinstance(pipe.scheduler, TCDScheduler)
    assert pipe.scheduler.config.original_inference_steps == 25 and pipe.unet.config.time_cond_proj_dim == 32
    target = method.target_unet.state_dict()
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, target[k], rtol=0, atol=0)
    card = write_model_card(method, method.cfg, tmp_path, tmp_path / "samples").read_text()
    assert ("eta=0.3" if name == "tcd" else "eta=0.0") in card and "TCDScheduler" in card
    generate_at_few_steps(pipe, 8.0, RES, eta=0.3 if name == "tcd" else 0.0)


def test_validate_grid(trained):
    method, _ = trained("sd15", "pcm_lora")
    method.cfg.train.validation_prompts = ["a red circle", "a blue square"]
    method.mcfg.validation_steps = [1, 4]
    grid = method.validate(0)
    left, top, s = label_margins((RES, RES), True, True)  # a prompt per row, a step count per column
    assert grid.size == (left + 2 * RES * s, top + 2 * RES * s) and method.unet.training


@pytest.mark.parametrize("name", ["tcd_lora", "pcm"])
def test_uvit_teacher(tiny_sd15, tmp_path, name):
    """A U-ViT teacher (UViTPipeline folder): the loss trains and the export samples with TCDScheduler."""
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    tiny_pipeline(tiny_sd15, tiny_uvit()).save_pretrained(teacher)
    extra = ["--method.w_min=1.5", "--method.w_max=2.5", "--method.num_ddim_timesteps=25"]
    if name == "pcm":
        extra.append("--method.unet_time_cond_proj_dim=16")
    method = make_method(name, teacher, tmp_path / "run", *extra)
    losses = train_steps(method, fixed_batch(), 12, LR[name])
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    method.export(tmp_path / "export")
    if name == "tcd_lora":
        pipe = UViTPipeline.from_pretrained(teacher)
        pipe.load_lora_weights(str(tmp_path / "export"))
        pipe.scheduler = TCDScheduler.from_pretrained(tmp_path / "export", subfolder="scheduler")
    else:
        pipe = UViTPipeline.from_pretrained(tmp_path / "export")
    assert isinstance(pipe.scheduler, TCDScheduler)
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2, 4):
        image = pipe(["a red circle"], num_inference_steps=steps, guidance_scale=2.0, eta=0.3, output_type="np").images
        assert torch.isfinite(torch.as_tensor(image)).all()


RECIPES = sorted(p for n in NAMES for p in (ROOT / "configs" / n).glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipes_validate(path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the production recipes train in fp16
    cfg = load_config(str(path))
    assert cfg.method.name == path.parent.name and isinstance(cfg.method, CLASSES[cfg.method.name].Config)
    if path.parent.name.startswith("pcm") and path.stem in ("sd15", "sdxl"):
        # the reference's scripts: SD1.5 N=50, w 4-5; SDXL N=40, w 6-7; K=4
        assert cfg.method.num_phases == 4 and cfg.method.loss_type == "huber"
        assert (cfg.method.num_ddim_timesteps, cfg.method.w_min, cfg.method.w_max) == (
            (40, 6.0, 7.0) if path.stem == "sdxl" else (50, 4.0, 5.0)
        )
    if path.parent.name.startswith("tcd"):
        assert cfg.method.gamma == 0.3 and cfg.method.end_time_sampling == "uniform"


def test_recipe_set_is_complete():
    assert {f"{p.parent.name}/{p.stem}" for p in RECIPES} == {
        f"{m}/{r}" for m in NAMES for r in ("sd15", "sdxl", "debug", "debug_sdxl", "quickstart")
    } | {f"{m}/debug_{a}" for m in ("tcd_lora", "pcm_lora") for a in ("sd3", "flux")}  # test_flow_tcd_pcm.py


@pytest.mark.parametrize(
    "recipe,override",
    [
        ("tcd_lora", "--method.gamma=1.5"),
        ("tcd", "--method.end_time_sampling=middle"),
        ("pcm_lora", "--method.num_phases=0"),
        ("pcm", "--method.num_phases=51"),
    ],
)
def test_bad_knobs_are_user_errors(recipe, override):
    with pytest.raises(UserError):
        load_config(str(ROOT / "configs" / recipe / "debug.yaml"), [override])


@pytest.mark.parametrize("name,arch", [("tcd_lora", "sd15"), ("pcm", "sd15"), ("pcm_lora", "sdxl")])
def test_resume_equals_uninterrupted(tmp_path, request, shapes_folder, name, arch):
    model = request.getfixturevalue(f"tiny_{arch}")
    assert_debug_recipe_resumes(name, arch, model, shapes_folder, tmp_path)


def _cmd(module, argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def test_evaluate_tcd_lora_next_to_the_teachers_solvers(trained, tmp_path, tiny_sd15, shapes_folder):
    """``ldmkit evaluate --scheduler tcd --eta 0.3 --teacher-solvers``: the distilled model and the teacher with
    DDIM, DPM-Solver++ 2M and UniPC at the same steps and seeds; UNet evaluations per image for equal compute."""
    import json

    from ldmkit.commands import evaluate

    method, _ = trained("sd15", "tcd_lora")
    export = tmp_path / "export"
    method.export(export)
    out = tmp_path / "eval"
    argv = ["--model", str(tiny_sd15), "--lora", str(export), "--data", str(shapes_folder), "--max-reference", "8"]
    argv += ["--num-images", "2", "--steps", "1,2,4,8", "--scheduler", "tcd", "--eta", "0.3", "--guidance", "1.0"]
    argv += ["--teacher-solvers", "--teacher-guidance", "3.0", "--device", "cpu", "--out", str(out)]
    argv += ["--height", str(RES), "--width", str(RES)]
    assert _cmd(evaluate, argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["scheduler"] == "TCDScheduler" and m["eta"] == 0.3 and m["teacher_model"] == str(tiny_sd15)
    assert [s["unet_evals_per_image"] for s in m["settings"]] == [1, 2, 4, 8]
    assert set(m["teacher"]) == {"ddim", "dpm", "unipc"}
    classes = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}
    for name, t in m["teacher"].items():
        assert t["scheduler"] == classes[name] and t["guidance"] == 3.0
        # guided teacher: 2 UNet evaluations per step (cond + uncond)
        assert [s["unet_evals_per_image"] for s in t["settings"]] == [2, 4, 8, 16]
        assert all(s["fd"] is not None for s in t["settings"])
        assert (out / "teacher" / name / "grid-steps-4.png").is_file()
    assert (out / "quality_vs_unet_evals.png").is_file() and (out / "quality_vs_steps.png").is_file()
    with pytest.raises(UserError):
        _cmd(evaluate, [*argv[:-4], "--teacher-solvers", "ddim,rk4", "--out", str(tmp_path / "bad")])


def test_evaluate_solvers_restores_the_scheduler(tiny_sd15):
    from ldmkit.eval.evaluate import TEACHER_SOLVERS, evaluate_solvers

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    pipe.set_progress_bar_config(disable=True)
    before = pipe.scheduler
    res = evaluate_solvers(pipe, TEACHER_SOLVERS, ["a red circle"], [1, 2], 1.0, 0, warmup=False, height=RES, width=RES)
    assert pipe.scheduler is before and list(res) == list(TEACHER_SOLVERS)
    assert [s["unet_evals_per_image"] for s in res["unipc"]["settings"]] == [1, 2]


def test_generate_with_tcd_scheduler_and_gamma(trained, tmp_path, tiny_sd15):
    import json

    import numpy as np
    from PIL import Image

    from ldmkit.commands import generate

    method, _ = trained("sd15", "tcd_lora")
    method.export(tmp_path / "export")
    base = ["--model", str(tiny_sd15), "--lora", str(tmp_path / "export"), "--scheduler", "tcd", "--steps", "4"]
    base += ["--guidance", "1.0", "--prompt", "a red circle", "--height", str(RES), "--width", str(RES)]
    base += ["--device", "cpu"]
    for eta in ("0.0", "0.3"):
        assert _cmd(generate, [*base, "--eta", eta, "--out", str(tmp_path / eta)]) == 0
        settings = json.loads((tmp_path / eta / "generate.json").read_text())
        assert settings["scheduler_class"] == "TCDScheduler" and settings["eta"] == float(eta)
    a, b = (np.asarray(Image.open(tmp_path / eta / "000.png"), dtype=np.int16) for eta in ("0.0", "0.3"))
    assert np.abs(a - b).max() > 0  # gamma injects noise between steps
    with pytest.raises(UserError):
        _cmd(generate, [*base, "--eta", "2", "--out", str(tmp_path / "bad")])
