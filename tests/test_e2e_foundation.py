"""End to end through the CLI: the lora debug recipe from a latent cache, its export in stock diffusers,
and the same run on two processes (accelerate launch, gloo on CPU) reproducing the one-process curve."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import launch_two, logged
from helpers.threads import thread_env

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "configs" / "lora" / "debug.yaml"
ENV = thread_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
# The model family logs every part it loads; the training models of a cached run must be the UNet alone.
LOADED = re.compile(r"loaded SD (unet|vae|text encoders) from")


def _train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "ldmkit",
        "train",
        str(RECIPE),
        f"--model.pretrained={model}",
        f"--data.path={data}",
        "--data.cache=true",
        f"--output_dir={out}",
        *extra,
    ]


def _training_loads(log: str) -> list[str]:
    """Parts loaded before the cache was built (the method's training models; the cache build, validation
    and export load the VAE + text encoders, and drop them afterwards)."""
    return LOADED.findall(log.split("building the latent cache")[0])


@pytest.fixture(scope="module")
def one_process(tiny_sd15, shapes_folder, tmp_path_factory) -> tuple[Path, str]:
    """``ldmkit train configs/lora/debug.yaml`` (batch 2, 4 steps, validation and checkpoints every 2
    steps) on the tiny SD1.5 model and the shapes folder, from a latent cache."""
    out = tmp_path_factory.mktemp("lora-one") / "run"
    r = subprocess.run(
        [sys.executable, *_train_args(tiny_sd15, shapes_folder, out)], env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr


def test_lora_debug_recipe_from_cache_exports_a_lora_for_stock_diffusers(one_process, tiny_sd15):
    from diffusers import StableDiffusionPipeline

    out, log = one_process
    # The cache was built, and training loaded the UNet only (no VAE, no text encoder).
    assert len(list((out / "cache").glob("*/index.json"))) == 1
    assert _training_loads(log) == ["unet"] and LOADED.findall(log).count("unet") == 1, LOADED.findall(log)
    assert len(logged(out)) == 4 and (out / "samples" / "step-0000002.png").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    pipe.set_progress_bar_config(disable=True)

    def latents() -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return pipe(
            "a large red circle in the center",
            num_inference_steps=2,
            height=64,
            width=64,
            generator=gen,
            output_type="latent",
        ).images

    base = latents()
    pipe.load_lora_weights(out / "export")
    lora_layers = [n for n, _ in pipe.unet.named_modules() if n.endswith("lora_A.default_0")]
    assert len(lora_layers) == 32  # to_q/k/v/out.0 of the tiny UNet's 8 attention layers
    adapted = latents()
    assert (adapted - base).abs().max() > 1e-3  # 4 steps at lr 1e-3 moved the output


@pytest.mark.slow
def test_two_processes_reproduce_the_one_process_curve(one_process, tiny_sd15, shapes_folder, tmp_path):
    """2 processes x batch 1 = 1 process x batch 2: the same samples, noise and timesteps (per-sample
    seeds), the DDP-averaged gradient equals the full-batch one, and the LR schedule steps once per
    optimizer step. What may differ is float32 rounding: DDP's bucketed all-reduce (gloo) adds the two
    per-rank mean gradients in another order than the single-process batch mean, and the UNet runs
    batch 1 instead of 2. That is ~1e-7 relative (measured: <= 1.1e-7 on the loss, 2e-6 absolute on the
    exported weights); Adam divides by the running gradient RMS, which can magnify rounding in entries
    whose gradient is near zero, so we allow 1e-4 relative on the loss and 1e-3 relative / 1e-5 absolute
    on weights (LoRA B entries are ~1e-3 after 4 steps at lr 1e-3). A real mismatch (another sample,
    noise draw or timestep, an LR schedule stepped per process) changes these losses by far more:
    consecutive losses of the curve differ by > 1%."""
    one, _ = one_process
    two = tmp_path / "two"
    launch = launch_two()
    args = _train_args(tiny_sd15, shapes_folder, two, "--train.batch_size=1")[1:]  # drop "-m": launch takes it
    r = subprocess.run([*launch, "-m", *args], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    loads = LOADED.findall(r.stderr)
    assert _training_loads(r.stderr) == ["unet"] * 2 and loads.count("unet") == 2, loads  # each rank: UNet only

    l1, l2 = logged(one), logged(two)
    assert len(l1) == len(l2) == 4
    assert min(abs(a - b) / b for a, b in zip(l1, l1[1:])) > 1e-2  # the curve is not flat: equality means something
    assert l2 == pytest.approx(l1, rel=1e-4)
    a = load_file(str(one / "export" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(two / "export" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
