"""The lcm_lora and lcd methods on tiny SD1.5 / SDXL teachers: Algorithm 1, roles, exports, recipes, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import load_file

from ldmkit.errors import UserError
from ldmkit.inference import label_margins
from ldmkit.lora.adapters import adapters_disabled
from ldmkit.lora.export import KOHYA_WEIGHT_NAME, layers_from_peft_model
from ldmkit.methods import get_method, load_config
from ldmkit.methods.card import write_model_card
from ldmkit.methods.lcd import LCDMethod, LCMLoraMethod

from helpers.lcm import count_lora_modules, fixed_batch, shares_base_tensors, train_steps, unet_inputs, unet_out
from helpers.lcm import generate_at_few_steps as _generate
from helpers.lcm import make_distill_method as make_method
from helpers.runs import assert_debug_recipe_resumes, assert_same_exports, logged

ROOT = Path(__file__).parents[1]
RES = 32
STEPS = {"sd15": 20, "sdxl": 12}
LR = {"lcm_lora": 1e-3, "lcd": 3e-5}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd15, tiny_sdxl):
    """(arch, method name) -> (method trained on a fixed batch, losses); trained once, on first use."""
    runs: dict = {}

    def get(arch: str, name: str):
        if (arch, name) not in runs:
            model = tiny_sd15 if arch == "sd15" else tiny_sdxl
            extra = ["--method.num_ddim_timesteps=25", "--method.timestep_scaling_factor=5"] if name == "lcd" else []
            method = make_method(
                name, model, tmp_path_factory.mktemp(f"{arch}-{name}"), "--method.loss_type=huber", *extra
            )
            runs[arch, name] = method, train_steps(method, fixed_batch(), STEPS[arch], LR[name])
        return runs[arch, name]

    return get


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", ["lcm_lora", "lcd"])
def test_loss_decreases_on_a_fixed_batch(trained, arch, name):
    _, losses = trained(arch, name)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_lcm_lora_keeps_one_unet_and_its_teacher_is_the_base(trained, tiny_sd15):
    """One UNet's weights: the teacher (method.plain_teacher) is a module tree without the adapters whose every
    tensor IS the adapted UNet's base tensor; it and the adapted UNet with adapters off both give the base."""
    method, _ = trained("sd15", "lcm_lora")
    unets = {id(v) for v in vars(method).values() if isinstance(v, UNet2DConditionModel)}
    assert unets == {id(method.unet), id(method.teacher_unet)} and method.family.denoiser is method.unet
    assert shares_base_tensors(method.teacher_unet, method.unet)  # shared, not copied
    roles = method.roles()
    assert roles.teacher is method.teacher_unet and roles.target is method.unet
    inputs = unet_inputs(method.unet)
    base = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    with adapters_disabled(method.unet):
        teacher = unet_out(method.unet, inputs)
    torch.testing.assert_close(teacher, unet_out(base, inputs))
    torch.testing.assert_close(unet_out(method.teacher_unet, inputs), teacher, rtol=0, atol=0)
    assert not torch.allclose(unet_out(method.unet, inputs), teacher, atol=1e-4)  # the trained LoRA is back on
    assert count_lora_modules(method.unet) == len(layers_from_peft_model(method.unet)) > 0


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lcd_student_equals_teacher_at_step_0_and_ema(tmp_path, request, arch):
    method = make_method("lcd", request.getfixturevalue(f"tiny_{arch}"), tmp_path)
    assert method.unet.config.time_cond_proj_dim == 32 and method.teacher_unet.config.time_cond_proj_dim is None
    assert method.unet.dtype == method.target_unet.dtype == torch.float32
    inputs = unet_inputs(method.teacher_unet)
    w_emb = method._w_embedding(torch.tensor([3.0, 12.0]))
    student = method.unet(**inputs, timestep_cond=w_emb).sample
    torch.testing.assert_close(student, unet_out(method.teacher_unet, inputs), rtol=0, atol=1e-6)
    torch.testing.assert_close(method.target_unet(**inputs, timestep_cond=w_emb).sample, student, rtol=0, atol=0)
    # one step, then target = 0.95 target + 0.05 student
    before = {k: v.clone() for k, v in method.target_unet.state_dict().items()}
    opt = torch.optim.SGD(method.parameters(), lr=1.0)
    method.loss(fixed_batch())[0].backward()
    opt.step()
    method.after_step(1)
    online = method.unet.state_dict()
    moved = 0
    for k, v in method.target_unet.state_dict().items():
        torch.testing.assert_close(v, 0.95 * before[k] + 0.05 * online[k])
        moved += int(not torch.equal(v, before[k]))
    assert moved > 0
    assert set(method.checkpoint_objects()) == {"target_unet"}


@pytest.mark.parametrize("arch,name", [("sd15", "lcm_lora"), ("sdxl", "lcd")])
def test_batched_teacher_passes_equal_unbatched(tmp_path, request, arch, name):
    method = make_method(name, request.getfixturevalue(f"tiny_{arch}"), tmp_path)
    batch = fixed_batch(3)
    with torch.no_grad():
        batched = method.loss(batch)[0]
        method.mcfg.batch_teacher_passes = False
        unbatched = method.loss(batch)[0]
    torch.testing.assert_close(batched, unbatched, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lcm_lora_export_loads_in_stock_pipeline(trained, tmp_path, request, arch):
    method, _ = trained(arch, "lcm_lora")
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    method.export(tmp_path)
    card = write_model_card(method, method.cfg, tmp_path, tmp_path / "samples").read_text()
    assert card.startswith("---\n") and "\n# LCM-LoRA" in card and "tags:" in card
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    inputs = unet_inputs(method.unet)
    expected = unet_out(method.unet, inputs)
    n = count_lora_modules(method.unet)
    for weights in (tmp_path, tmp_path / KOHYA_WEIGHT_NAME):  # the diffusers file, then the kohya copy
        pipe = cls.from_pretrained(model_dir)
        pipe.load_lora_weights(str(weights))
        assert count_lora_modules(pipe.unet) == n
        torch.testing.assert_close(unet_out(pipe.unet, inputs), expected, rtol=1e-5, atol=1e-5)
    assert all(k.startswith("lora_unet_") for k in load_file(str(tmp_path / KOHYA_WEIGHT_NAME)))
    pipe.scheduler = LCMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert pipe.scheduler.config.original_inference_steps == 50 and pipe.scheduler.config.timestep_scaling == 10.0
    _generate(pipe, guidance=0.0 if arch == "sdxl" else 1.0)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lcd_export_is_a_stock_lcm_pipeline(trained, tmp_path, arch):
    method, _ = trained(arch, "lcd")
    method.export(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipe) is (StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 25 and pipe.scheduler.config.timestep_scaling == 5.0
    assert pipe.unet.config.time_cond_proj_dim == 32
    target = method.target_unet.state_dict()
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, target[k], rtol=0, atol=0)
    assert "guidance_scale=8.0" in write_model_card(method, method.cfg, tmp_path, tmp_path / "samples").read_text()
    _generate(pipe, guidance=8.0)


def test_validate_grid(trained):
    method, _ = trained("sd15", "lcm_lora")
    method.cfg.train.validation_prompts = ["a red circle", "a blue square"]
    method.mcfg.validation_steps = [1, 2]
    grid = method.validate(0)
    left, top, s = label_margins((RES, RES), True, True)  # a prompt per row, a step count per column
    assert grid.size == (left + 2 * RES * s, top + 2 * RES * s)
    assert method.unet.training  # restored after sampling


RECIPES = sorted((ROOT / "configs" / "lcm_lora").glob("*.yaml")) + sorted((ROOT / "configs" / "lcd").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipes_validate(path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the production recipes train in fp16
    cfg = load_config(str(path))
    assert cfg.method.name == path.parent.name
    assert isinstance(cfg.method, LCMLoraMethod.Config if cfg.method.name == "lcm_lora" else LCDMethod.Config)
    if path.stem in ("sd15", "sdxl"):  # quickstart.yaml (U-ViT teacher): tests/test_lcd_uvit.py
        assert cfg.method.loss_type == "huber" and cfg.method.num_ddim_timesteps == 50
        assert cfg.method.w_min == (3.0 if "sdxl" in path.stem else 5.0)
        assert cfg.train.learning_rate == (1e-4 if cfg.method.name == "lcm_lora" else 1e-6)


def test_recipe_set_is_complete():
    assert {f"{p.parent.name}/{p.stem}" for p in RECIPES} == {
        f"{m}/{r}" for m in ("lcm_lora", "lcd") for r in ("sd15", "sdxl", "debug", "debug_sdxl", "quickstart")
    } | {f"{m}/debug_{a}" for m in ("lcm_lora", "lcd") for a in ("sd3", "flux")} | {  # flow: test_flow_*.py
        f"lcm_lora/{r}"
        for r in ("flux_dev", "flux_dev_int8", "sd35_medium", "sd35_large")  # tests/test_flow_memory.py
    }


@pytest.mark.parametrize(
    "override",
    [
        "--method.w_min=16",
        "--method.validation_steps=[1,80]",
        "--method.huber_c=0",
        "--method.lora_rank=0",
        "--method.loss_type=l1",
    ],
)
def test_bad_knobs_are_user_errors(override):
    with pytest.raises(UserError):
        load_config(str(ROOT / "configs" / "lcm_lora" / "debug.yaml"), [override])


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", ["lcm_lora", "lcd"])
def test_resume_equals_uninterrupted(tmp_path, request, shapes_folder, name, arch):
    """Through the training loop, from the data cache: the student (LoRA or full, with the LCD EMA target)
    survives a restart exactly, and the loss curve continues where it stopped."""
    model = request.getfixturevalue(f"tiny_{arch}")
    assert_debug_recipe_resumes(name, arch, model, shapes_folder, tmp_path)


@pytest.mark.parametrize("name", ["lcm_lora", "lcd"])
def test_evaluate_on_exports(trained, tmp_path, tiny_sd15, name):
    """``ldmkit evaluate`` on an LCM-LoRA export (on its base model) and on a full-LCD export: one UNet pass
    per step at the guidance each kind is sampled with, the run's LCM grid, images that the LoRA changes."""
    import argparse

    from ldmkit.commands import evaluate

    method, _ = trained("sd15", name)
    export = tmp_path / "export"
    method.export(export)

    def run(out, *model_args: str, guidance: str) -> dict:
        parser = argparse.ArgumentParser()
        evaluate.add_arguments(parser)
        args = parser.parse_args(
            [
                *model_args,
                "--shapes",
                "--num-images",
                "2",
                "--steps",
                "1,4",
                "--scheduler",
                "lcm",
                "--guidance",
                guidance,
                "--height",
                str(RES),
                "--width",
                str(RES),
                "--device",
                "cpu",
                "--save-images",
                "--out",
                str(out),
            ]
        )
        assert evaluate.run(args) == 0
        return json.loads((out / "metrics.json").read_text())

    if name == "lcm_lora":
        # The export's LCMScheduler settings are adopted when a LoRA loads onto an LCM-sampling pipeline.
        from ldmkit.inference import load_lora, load_pipeline, set_scheduler

        cfg_file = export / "scheduler" / "scheduler_config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "original_inference_steps": 25}))
        pipe = load_pipeline(tiny_sd15)
        set_scheduler(pipe, "lcm")
        load_lora(pipe, export)
        assert pipe.scheduler.config.original_inference_steps == 25
        assert pipe.scheduler.config.beta_schedule == "scaled_linear"
        m = run(tmp_path / "eval", "--model", str(tiny_sd15), "--lora", str(export), guidance="1.0")
        base = run(tmp_path / "base", "--model", str(tiny_sd15), guidance="1.0")
        changed = [
            np.abs(
                np.asarray(Image.open(tmp_path / "eval" / "steps-4" / f)).astype(int)
                - np.asarray(Image.open(tmp_path / "base" / "steps-4" / f)).astype(int)
            ).max()
            for f in ("00000.png", "00001.png")
        ]
        assert min(changed) > 0, "the LoRA did not change the images"
        assert base["lora"] is None and m["lora"] == str(export) and m["lora_fused"]
        run(tmp_path / "unfused", "--model", str(tiny_sd15), "--lora", str(export), "--no-fuse-lora", guidance="1.0")
        for f in ("00000.png", "00001.png"):  # fusing changes float rounding only
            a, b = (np.asarray(Image.open(tmp_path / d / "steps-4" / f)).astype(int) for d in ("eval", "unfused"))
            assert np.abs(a - b).max() <= 2
    else:
        m = run(tmp_path / "eval", "--model", str(export), guidance="8.0")
    assert m["scheduler"] == "LCMScheduler"
    for s in m["settings"]:
        # LCM sampling never runs classifier-free guidance: w is baked in (LoRA) or embedded (LCD).
        assert s["unet_evals_per_image"] == s["steps"]
        assert s["seconds_per_image"] > 0 and 0.0 <= s["adherence"]["all"] <= 1.0
        assert len(list((tmp_path / "eval" / f"steps-{s['steps']}").glob("*.png"))) == 2
