"""ldmkit.inference (reproducible images, scheduler swaps, LoRA loading, grids) and the ldmkit generate
command (output files)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit import inference
from ldmkit.commands import generate
from ldmkit.errors import UserError

from helpers.sd import pinned_threads  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def pipe(tiny_sd15):
    from diffusers import DiffusionPipeline

    p = DiffusionPipeline.from_pretrained(tiny_sd15)
    p.set_progress_bar_config(disable=True)
    return p


def arr(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return generate.run(parser.parse_args(list(argv)))


def test_generate_images_is_reproducible_per_image(pipe):
    kw = dict(steps=2, guidance=7.5, height=64, width=64)
    images = inference.generate_images(pipe, ["a red circle", "a blue square"], seed=10, num_images=2, **kw)
    assert len(images) == 4 and images[0].size == (64, 64)
    # Image j of prompt i is seed + i * num_images + j, whatever else is generated with it.
    alone = inference.generate_images(pipe, ["a blue square"], seed=13, **kw)[0]
    # Same noise, but the batch of 2 and the batch of 1 may block their float kernels differently on
    # another CPU model: allow 2 of 255 levels (a different seed moves pixels by far more; checked below).
    diff = np.abs(arr(images[3]).astype(int) - arr(alone).astype(int))
    assert diff.max() <= 2, diff.max()
    other = np.abs(arr(images[2]).astype(int) - arr(images[3]).astype(int))
    assert other.mean() > 10 * max(diff.mean(), 0.1), (other.mean(), diff.mean())


def test_batched_prompts_keep_every_images_seed(pipe):
    """batch_size prompts per pipeline call draw the same noise per image as one prompt per call."""
    kw = dict(steps=2, guidance=7.5, seed=3, num_images=2, height=64, width=64)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    one = inference.generate_images(pipe, prompts, batch_size=1, **kw)
    two = inference.generate_images(pipe, prompts, batch_size=2, negative_prompt="blurry", **kw)
    three = inference.generate_images(pipe, prompts, batch_size=3, **kw)
    assert len(one) == len(three) == 6
    for a, b in zip(one, three):  # within 2 of 255 levels: a batch may block its float kernels differently
        assert np.abs(arr(a) - arr(b)).max() <= 2
    # A negative prompt changes the guidance, not the batch layout: the uneven chunks (2 + 1 prompts)
    # still give image k of the batched run the seed of image k of a prompt-by-prompt run.
    for k, prompt in enumerate(prompts):
        alone = inference.generate_images(pipe, [prompt], **{**kw, "seed": 3 + 2 * k}, negative_prompt="blurry")
        for j in range(2):
            assert np.abs(arr(two[2 * k + j]) - arr(alone[j])).max() <= 2, (k, j)
    assert np.abs(arr(one[0]) - arr(one[1])).mean() > 10  # another seed is far away


def test_image_grid_fills_a_short_last_row_with_black():
    tiles = [Image.new("RGB", (4, 3), (10 * i, 200, 0)) for i in range(1, 4)]
    grid = inference.image_grid(tiles, cols=2)
    assert grid.size == (8, 6)
    assert grid.getpixel((5, 1)) == (20, 200, 0) and grid.getpixel((1, 4)) == (30, 200, 0)
    assert grid.getpixel((5, 4)) == (0, 0, 0)
    with pytest.raises(UserError, match="no images"):
        inference.image_grid([], cols=2)


@pytest.mark.parametrize("name", sorted(inference.SCHEDULERS))
def test_set_scheduler_keeps_the_training_schedule(pipe, name):
    from diffusers import LCMScheduler

    base = pipe.scheduler
    try:
        inference.set_scheduler(pipe, name)
        assert type(pipe.scheduler).__name__ == inference.SCHEDULERS[name]
        assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012
        images = inference.generate_images(pipe, ["x"], steps=2, guidance=1.0, seed=0, height=64, width=64)
        assert images[0].size == (64, 64)
    finally:
        pipe.scheduler = base
    # An LCM folder's distillation settings survive a swap to lcm.
    lcm = LCMScheduler.from_config(base.config, original_inference_steps=25, timestep_scaling=7.0)
    pipe.scheduler = lcm
    try:
        inference.set_scheduler(pipe, "lcm")
        assert pipe.scheduler.config.original_inference_steps == 25 and pipe.scheduler.config.timestep_scaling == 7.0
    finally:
        pipe.scheduler = base
    with pytest.raises(UserError, match="scheduler"):
        inference.set_scheduler(pipe, "heun")


def test_generate_command_writes_images_grid_and_settings(tiny_sd15, tmp_path):
    out = tmp_path / "out"
    assert run_cli("--model", str(tiny_sd15), "--prompt", "a red circle", "--prompt", "a blue square", "--num-images", "2",
                   "--steps", "2", "--scheduler", "dpm", "--seed", "5", "--height", "64", "--width", "64", "--device", "cpu", "--out", str(out)) == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "000.png",
        "001.png",
        "002.png",
        "003.png",
        "generate.json",
        "grid.png",
    ]
    assert Image.open(out / "grid.png").size == (128, 128)
    settings = json.loads((out / "generate.json").read_text())
    assert settings["prompt"] == ["a red circle", "a blue square"] and settings["seed"] == 5
    assert settings["scheduler_class"] == "DPMSolverMultistepScheduler" and settings["dtype"] == "float32"


def test_generate_with_lora_file_or_folder_in_both_formats(tiny_sd15, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ldmkit.lora.export import layers_from_peft_model, save_kohya

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    kohya = save_kohya(tmp_path / "kohya" / "style.safetensors", {"unet": layers_from_peft_model(unet)}, sdxl=False)

    common = [
        "--model",
        str(tiny_sd15),
        "--prompt",
        "a red circle",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--device",
        "cpu",
    ]
    run_cli(*common, "--out", str(tmp_path / "base"))
    run_cli(*common, "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "dir"))
    run_cli(*common, "--lora", str(kohya), "--out", str(tmp_path / "file"))
    base, with_dir, with_file = (arr(Image.open(tmp_path / d / "000.png")) for d in ("base", "dir", "file"))
    assert np.abs(with_dir - base).max() > 0
    assert np.abs(with_dir - with_file).max() <= 1  # same LoRA, two file formats

    with pytest.raises(UserError, match="lora"):
        inference.lora_location(tmp_path / "missing")
    (tmp_path / "two").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / "two" / name).write_bytes(b"")
    with pytest.raises(UserError, match="exactly one"):
        inference.lora_location(tmp_path / "two")


def test_generate_rejects_a_folder_without_model_index(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        inference.load_pipeline(tmp_path)


def test_uvit_folders_go_to_ldmkit_pipeline(tmp_path, monkeypatch):
    """model_index.json naming UViTPipeline is loaded by ldmkit's own pipeline class (imported lazily)."""
    import sys
    import types

    calls = []

    class FakeUViTPipeline:
        @classmethod
        def from_pretrained(cls, path, **kwargs):  # dtype= or torch_dtype= (ldmkit.compat)
            calls.append((path, kwargs.get("dtype", kwargs.get("torch_dtype"))))
            return cls()

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "UViTPipeline"}))
    monkeypatch.setitem(sys.modules, "ldmkit.pipelines.uvit", types.SimpleNamespace(UViTPipeline=FakeUViTPipeline))
    assert isinstance(inference.load_pipeline(tmp_path), FakeUViTPipeline)
    assert calls == [(tmp_path, torch.float32)]


def test_resolve_device_and_dtype():
    assert inference.resolve_device("cpu") == torch.device("cpu")
    assert inference.resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert inference.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert inference.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert inference.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
