"""UViTPipeline: diffusers-format folders, several schedulers, CFG and the LCM guidance embedding."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
)

from ldmkit.pipelines.uvit import UViTPipeline

from helpers.uvit import RESOLUTION, pinned_threads, seeded, tiny_pipeline, tiny_uvit  # noqa: F401


@pytest.fixture(scope="module")
def saved_pipeline(tiny_sd15, tmp_path_factory):
    torch.manual_seed(0)
    pipe = tiny_pipeline(tiny_sd15, tiny_uvit())
    out = tmp_path_factory.mktemp("uvit_pipe")
    pipe.save_pretrained(out)
    return out


def test_folder_is_diffusers_format(saved_pipeline):
    index = json.loads((saved_pipeline / "model_index.json").read_text())
    assert index["_class_name"] == "UViTPipeline"
    assert index["unet"] == ["ldmkit.models.uvit", "UViT"]
    for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        assert (saved_pipeline / name).is_dir()


def test_fresh_process_load_reproduces_the_images(saved_pipeline):
    pipe = UViTPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    here = pipe("a red circle", num_inference_steps=3, generator=seeded(1), output_type="np").images
    code = (
        "import sys, numpy as np, torch\n"
        "from ldmkit.pipelines.uvit import UViTPipeline\n"
        "p = UViTPipeline.from_pretrained(sys.argv[1]); p.set_progress_bar_config(disable=True)\n"
        "img = p('a red circle', num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type='np').images\n"
        "np.save(sys.argv[2], img)\n"
    )
    out = saved_pipeline.parent / "fresh.npy"
    subprocess.run([sys.executable, "-c", code, str(saved_pipeline), str(out)], check=True, capture_output=True)
    np.testing.assert_allclose(np.load(out), here, atol=1e-6)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_generates_with_stock_schedulers(saved_pipeline, scheduler_cls):
    pipe = UViTPipeline.from_pretrained(saved_pipeline)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a red circle", "a blue square"],
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=seeded(0),
        num_images_per_prompt=2,
    ).images
    assert len(images) == 4 and images[0].size == (RESOLUTION, RESOLUTION)
    again = pipe(
        ["a red circle", "a blue square"],
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=seeded(0),
        num_images_per_prompt=2,
    ).images
    assert np.array_equal(np.asarray(images[3]), np.asarray(again[3]))


def test_guidance_with_negative_equal_to_prompt_is_a_no_op(tiny_sd15):
    """uncond + g (cond - uncond) == cond when uncond == cond, for any g; a different uncond changes it."""
    torch.manual_seed(0)
    pipe = tiny_pipeline(tiny_sd15, tiny_uvit())
    kw = dict(num_inference_steps=3, output_type="np")
    plain = pipe("a red circle", guidance_scale=1.0, generator=seeded(), **kw).images
    same = pipe("a red circle", negative_prompt="a red circle", guidance_scale=6.0, generator=seeded(), **kw).images
    guided = pipe("a red circle", guidance_scale=6.0, generator=seeded(), **kw).images
    np.testing.assert_allclose(same, plain, atol=1e-5)
    assert np.abs(guided - plain).max() > 1e-3


def test_decodes_with_the_vae_scaling_factor(tiny_sd15):
    torch.manual_seed(0)
    pipe = tiny_pipeline(tiny_sd15, tiny_uvit())
    pipe.vae.register_to_config(scaling_factor=0.2301)
    latents = pipe("x", num_inference_steps=2, generator=seeded(), output_type="latent").images
    images = pipe("x", num_inference_steps=2, generator=seeded(), output_type="pt").images
    ref = pipe.vae.decode(latents / 0.2301).sample
    torch.testing.assert_close(images, (ref / 2 + 0.5).clamp(0, 1))


def test_lcm_student_gets_the_guidance_embedding_and_no_cfg(tiny_sd15):
    torch.manual_seed(0)
    pipe = tiny_pipeline(tiny_sd15, tiny_uvit(time_cond_proj_dim=16))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda mod, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    images = pipe(
        "a red circle", num_inference_steps=2, guidance_scale=8.0, generator=seeded(), num_images_per_prompt=3
    ).images
    assert len(images) == 3 and len(calls) == 2
    args, kwargs = calls[0]
    assert args[0].shape[0] == 3  # no doubled CFG batch
    w = torch.full((3,), 7.0)  # diffusers convention: embed guidance_scale - 1
    ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=16)
    torch.testing.assert_close(kwargs["timestep_cond"], ref)


def test_other_sizes_are_rejected(tiny_sd15):
    pipe = tiny_pipeline(tiny_sd15, tiny_uvit())
    with pytest.raises(ValueError, match="32x32"):
        pipe("x", height=64, width=64, num_inference_steps=1)
