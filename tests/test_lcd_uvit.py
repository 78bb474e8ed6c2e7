"""lcm_lora and lcd with a U-ViT teacher (a UViTPipeline folder): Algorithm 1 on a second architecture,
the LoRA through peft on the U-ViT, the w-embedding student, exports in UViTPipeline, merge-lora."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler

from ldmkit.commands import convert_lora as convert_cmd
from ldmkit.errors import UserError
from ldmkit.families import SDFamily, UViTFamily, detect_family
from ldmkit.inference import label_margins
from ldmkit.lora import adapters
from ldmkit.lora.export import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME
from ldmkit.methods import get_method, load_config
from ldmkit.methods.card import write_model_card
from ldmkit.methods.lcd import UVIT_LORA_TARGET_MODULES
from ldmkit.models.uvit import UViT
from ldmkit.pipelines.uvit import UViTPipeline

from helpers.lcm import count_lora_modules, fixed_batch, shares_base_tensors
from helpers.runs import assert_same_exports
from helpers.uvit import pinned_threads, tiny_pipeline, tiny_uvit  # noqa: F401

ROOT = Path(__file__).parents[1]
RES = 32  # 4x4 latents with the tiny VAE; uvit-tiny: 1 in, 1 mid, 1 out block
LORA_MODULES = 3 * len(UVIT_LORA_TARGET_MODULES)
W_DIM = 16


@pytest.fixture(scope="module")
def uvit_teacher(tiny_sd15, tmp_path_factory) -> Path:
    """A UViTPipeline folder from tiny parts (what a ``uvit`` run exports), with a DPM-Solver scheduler."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("uvit-teacher")
    tiny_pipeline(tiny_sd15, tiny_uvit()).save_pretrained(out)
    return out


def make_method(name: str, teacher: Path, out_dir: Path, *extra: str):
    from accelerate import Accelerator

    small = (
        ["--method.lora_rank=4", "--method.lora_alpha=4"]
        if name == "lcm_lora"
        else [f"--method.unet_time_cond_proj_dim={W_DIM}"]
    )
    cfg = load_config(
        None,
        [
            f"--method.name={name}",
            f"--model.pretrained={teacher}",
            f"--data.resolution={RES}",
            "--train.report_to=none",
            f"--output_dir={out_dir}",
            "--method.w_min=1.5",
            "--method.w_max=2.5",
            "--method.loss_type=huber",
            *small,
            *extra,
        ],
    )
    return get_method(name)(cfg, Accelerator(cpu=True))


def uvit_inputs(model: UViT, batch: int = 2) -> dict:
    cfg, g = model.config, torch.Generator().manual_seed(0)
    return dict(
        sample=torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        timestep=torch.tensor([999, 259][:batch]),
        encoder_hidden_states=torch.randn(batch, cfg.num_text_tokens, cfg.context_dim, generator=g),
    )


@torch.no_grad()
def out(model, inputs: dict, **kw) -> torch.Tensor:
    return model(**inputs, **kw).sample


@pytest.fixture(scope="module")
def trained(uvit_teacher, tmp_path_factory):
    """method name -> (method trained 15 steps on a fixed batch, losses)."""
    runs: dict = {}

    def get(name: str):
        if name not in runs:
            method = make_method(
                name,
                uvit_teacher,
                tmp_path_factory.mktemp(name),
                *(["--method.num_ddim_timesteps=25", "--method.timestep_scaling_factor=5"] if name == "lcd" else []),
            )
            opt = torch.optim.AdamW(method.parameters(), lr=3e-3 if name == "lcm_lora" else 1e-3, weight_decay=0.0)
            losses, batch = [], fixed_batch()
            for i in range(15):
                loss, _ = method.loss(batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                method.after_step(i + 1)
                losses.append(loss.item())
            runs[name] = method, losses
        return runs[name]

    return get


def test_teacher_folder_is_recognised(uvit_teacher, tiny_sd15):
    assert detect_family(uvit_teacher) is UViTFamily and detect_family(tiny_sd15) is SDFamily


@pytest.mark.parametrize("name", ["lcm_lora", "lcd"])
def test_loss_decreases_on_a_fixed_batch(trained, name):
    method, losses = trained(name)
    assert isinstance(method.family, UViTFamily) and isinstance(method.unet, UViT)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_lcm_lora_keeps_one_uvit_and_its_teacher_is_the_base(trained, uvit_teacher):
    method, _ = trained("lcm_lora")
    models = {id(v) for v in vars(method).values() if isinstance(v, UViT)} | {id(method.family.denoiser)}
    assert models == {id(method.unet), id(method.teacher_unet)}  # two module trees, one set of base tensors:
    assert shares_base_tensors(method.teacher_unet, method.unet)
    roles = method.roles()
    assert roles.teacher is method.teacher_unet and roles.target is method.unet
    assert count_lora_modules(method.unet) == LORA_MODULES and count_lora_modules(method.teacher_unet) == 0
    assert all(p.requires_grad == ("lora_" in n) for n, p in method.unet.named_parameters())
    inputs = uvit_inputs(method.unet)
    base = UViT.from_pretrained(uvit_teacher, subfolder="unet")
    with roles.teacher_context():
        teacher = out(roles.teacher, inputs)
    torch.testing.assert_close(teacher, out(base, inputs))
    assert not torch.allclose(out(method.unet, inputs), teacher, atol=1e-4)  # the trained LoRA is back on


def test_lcd_student_equals_teacher_at_step_0_and_ema(uvit_teacher, tmp_path):
    method = make_method("lcd", uvit_teacher, tmp_path)
    assert method.unet.config.time_cond_proj_dim == W_DIM and method.teacher_unet.config.time_cond_proj_dim is None
    assert not method.unet.cond_proj.weight.any() and not method.unet.cond_proj.bias.any()
    inputs = uvit_inputs(method.teacher_unet)
    w_emb = method._w_embedding(torch.tensor([1.5, 2.5]))
    student = out(method.unet, inputs, timestep_cond=w_emb)
    torch.testing.assert_close(student, out(method.teacher_unet, inputs), rtol=0, atol=1e-6)
    torch.testing.assert_close(out(method.target_unet, inputs, timestep_cond=w_emb), student, rtol=0, atol=0)
    before = {k: v.clone() for k, v in method.target_unet.state_dict().items()}
    opt = torch.optim.SGD(method.parameters(), lr=1.0)
    method.loss(fixed_batch())[0].backward()
    opt.step()
    method.after_step(1)
    online = method.unet.state_dict()
    for k, v in method.target_unet.state_dict().items():
        torch.testing.assert_close(v, 0.95 * before[k] + 0.05 * online[k])
    assert method.unet.cond_proj.weight.grad.abs().sum() > 0  # the w-embedding is learned


def _generate(pipe: UViTPipeline, guidance: float, steps=(1, 2, 4)) -> list:
    pipe.set_progress_bar_config(disable=True)
    images = []
    for n in steps:
        image = pipe(
            "a red circle",
            num_inference_steps=n,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        assert image.shape == (1, RES, RES, 3) and torch.isfinite(torch.from_numpy(image)).all()
        images.append(image)
    return images


def test_lcm_lora_export_loads_in_uvit_pipeline(trained, uvit_teacher, tmp_path):
    from ldmkit.inference import load_lora, load_pipeline

    method, _ = trained("lcm_lora")
    method.export(tmp_path)
    assert (tmp_path / LORA_WEIGHT_NAME).is_file() and not (tmp_path / KOHYA_WEIGHT_NAME).exists()
    assert "UViTPipeline" in write_model_card(method, method.cfg, tmp_path, tmp_path / "samples").read_text()
    inputs = uvit_inputs(method.unet)
    expected = out(method.unet, inputs)

    pipe = load_pipeline(uvit_teacher)
    base = out(pipe.unet, inputs)
    load_lora(pipe, tmp_path)  # what ldmkit generate / the quickstart call
    assert count_lora_modules(pipe.unet) == LORA_MODULES
    torch.testing.assert_close(out(pipe.unet, inputs), expected, rtol=1e-5, atol=1e-5)
    assert (out(pipe.unet, inputs) - base).abs().max() > 1e-4
    pipe.set_adapters("default", 0.0)
    torch.testing.assert_close(out(pipe.unet, inputs), base)
    pipe.set_adapters(["default"], [1.0])
    pipe.fuse_lora()
    torch.testing.assert_close(out(pipe.unet, inputs), expected, rtol=1e-5, atol=1e-5)
    pipe.unfuse_lora()
    with pytest.raises(UserError, match="already"):
        pipe.load_lora_weights(tmp_path)

    pipe.scheduler = LCMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert pipe.scheduler.config.original_inference_steps == 50 and pipe.scheduler.config.timestep_scaling == 10.0
    lora_images = _generate(pipe, guidance=1.0)
    pipe.unload_lora_weights()
    assert count_lora_modules(pipe.unet) == 0
    assert all(abs(a - b).max() > 1e-4 for a, b in zip(lora_images, _generate(pipe, guidance=1.0)))


def test_lcd_export_is_a_uvit_lcm_pipeline(trained, tmp_path):
    method, _ = trained("lcd")
    method.export(tmp_path)
    pipe = UViTPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 25 and pipe.scheduler.config.timestep_scaling == 5.0
    assert pipe.unet.config.time_cond_proj_dim == W_DIM
    target = method.target_unet.state_dict()
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, target[k], rtol=0, atol=0)
    card = write_model_card(method, method.cfg, tmp_path, tmp_path / "samples").read_text()
    assert "guidance_scale=3.0" in card  # 1 + w, w in [1.5, 2.5]
    low, high = _generate(pipe, 2.5, steps=(4,))[0], _generate(pipe, 3.5, steps=(4,))[0]
    _generate(pipe, 3.0)
    assert abs(low - high).max() > 0  # the guidance scale reaches the student through its embedding


def test_validate_grid(trained):
    method, _ = trained("lcd")
    method.cfg.train.validation_prompts = ["a red circle", "a blue square"]
    method.mcfg.validation_steps = [1, 2, 4]
    grid = method.validate(0)
    left, top, s = label_margins((RES, RES), True, True)  # a prompt per row, a step count per column
    assert grid.size == (left + 3 * RES * s, top + 2 * RES * s)
    assert method.unet.training


def test_merge_lora_into_uvit_folder(trained, uvit_teacher, tmp_path):
    from ldmkit.commands import merge_lora as merge_cmd

    method, _ = trained("lcm_lora")
    method.export(tmp_path / "lora")
    parser = argparse.ArgumentParser()
    merge_cmd.add_arguments(parser)
    merge_cmd.run(
        parser.parse_args(
            ["--model", str(uvit_teacher), "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")]
        )
    )
    merged = UViTPipeline.from_pretrained(tmp_path / "merged")
    assert isinstance(merged.scheduler, LCMScheduler) and count_lora_modules(merged.unet) == 0
    inputs = uvit_inputs(merged.unet)
    torch.testing.assert_close(out(merged.unet, inputs), out(method.unet, inputs), rtol=1e-5, atol=1e-5)


def test_lora_targets_and_resolution_are_checked(uvit_teacher, tmp_path):
    with pytest.raises(UserError, match="target modules"):
        make_method("lcm_lora", uvit_teacher, tmp_path, "--method.lora_target_modules=[to_q]")
    # the latent grid is checked when the config is resolved (methods/checks.py), before anything loads
    with pytest.raises(UserError, match="data.resolution=64 gives 8 x 8 latents, but the U-ViT .* takes a 4 x 4"):
        make_method("lcm_lora", uvit_teacher, tmp_path, "--data.resolution=64")


def test_adapters_disabled_restores_on_error(trained):
    method, _ = trained("lcm_lora")
    inputs = uvit_inputs(method.unet)
    before = out(method.unet, inputs)
    with pytest.raises(RuntimeError), adapters.adapters_disabled(method.unet):
        raise RuntimeError
    torch.testing.assert_close(out(method.unet, inputs), before)


@pytest.mark.parametrize("name", ["lcm_lora", "lcd", "tcd_lora", "tcd", "pcm_lora", "pcm"])
def test_quickstart_recipes_validate(name):
    cfg = load_config(str(ROOT / "configs" / name / "quickstart.yaml"))
    assert cfg.method.name == name and cfg.method.loss_type == "huber" and cfg.method.num_ddim_timesteps == 50
    assert cfg.method.w_min <= 2.0 <= cfg.method.w_max  # the quickstart's teacher guidance 3.0 = w 2.0
    # Each method's quickstart recipe is its LCM twin's but for the method's own knobs (the report compares
    # methods, not training settings).
    twin = load_config(str(ROOT / "configs" / ("lcd" if "lora" not in name else "lcm_lora") / "quickstart.yaml"))
    assert cfg.train == twin.train and cfg.data == twin.data
    assert (cfg.method.w_min, cfg.method.w_max) == (twin.method.w_min, twin.method.w_max)


def test_kohya_copy_of_a_uvit_lora_loads_the_same(trained, uvit_teacher, tmp_path):
    """convert-lora's kohya names resolve back to U-ViT module paths, with and without the model at hand."""
    from safetensors.torch import load_file

    method, _ = trained("lcm_lora")
    method.export(tmp_path)
    peft_file = load_file(str(tmp_path / LORA_WEIGHT_NAME))
    inputs = uvit_inputs(method.unet)
    for i, model in enumerate(([], ["--model", str(uvit_teacher)])):
        kohya = tmp_path / f"kohya-{i}.safetensors"  # convert-lora replaces no file (without --overwrite)
        parser = argparse.ArgumentParser()
        convert_cmd.add_arguments(parser)
        args = ["--in", str(tmp_path), "--to", "kohya", "--out", str(kohya), *model]
        assert convert_cmd.run(parser.parse_args(args)) == 0
        assert all(k.startswith("lora_unet_") for k in load_file(str(kohya)))
        back = tmp_path / f"back-{i}.safetensors"
        args = ["--in", str(kohya), "--to", "diffusers", "--out", str(back), *model]
        assert convert_cmd.run(parser.parse_args(args)) == 0  # no model: names of a U-ViT of the file's depth
        assert set(load_file(str(back))) == set(peft_file)
    pipe = UViTPipeline.from_pretrained(uvit_teacher)
    pipe.load_lora_weights(load_file(str(kohya)))
    assert count_lora_modules(pipe.unet) == LORA_MODULES
    torch.testing.assert_close(out(pipe.unet, inputs), out(method.unet, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["lcm_lora", "lcd"])
def test_resume_equals_uninterrupted(uvit_teacher, shapes_folder, tmp_path, name):
    """Distilling a U-ViT through the training loop: a run stopped at step 2 and re-run to step 4 exports
    the same student (peft LoRA on the U-ViT, or the w-embedding U-ViT with its EMA target) as a run of 4."""
    from ldmkit.train.loop import train

    small = (
        ["--method.lora_rank=4", "--method.lora_alpha=4"]
        if name == "lcm_lora"
        else [f"--method.unet_time_cond_proj_dim={W_DIM}"]
    )

    def run(out: str, steps: int) -> Path:
        return train(
            load_config(
                None,
                [
                    f"--method.name={name}",
                    f"--model.pretrained={uvit_teacher}",
                    f"--data.path={shapes_folder}",
                    f"--data.resolution={RES}",
                    f"--data.cache_dir={tmp_path / 'cache'}",
                    "--method.w_min=1.5",
                    "--method.w_max=2.5",
                    *small,
                    f"--train.max_steps={steps}",
                    "--train.checkpoint_every=2",
                    "--train.validate_every=0",
                    "--train.validation_prompts=[]",
                    "--train.batch_size=2",
                    "--train.learning_rate=1e-3",
                    "--train.report_to=none",
                    f"--output_dir={tmp_path / out}",
                ],
            )
        )

    full = run("full", 4)
    run("resumed", 2)
    assert_same_exports(full, run("resumed", 4), uvit_teacher)
