"""Helpers shared by test_sd_models.py, test_finetune.py and test_generate.py. Tiny models come from
conftest.py's ``tiny_sd15`` / ``tiny_sdxl`` fixtures."""

from __future__ import annotations

import torch

from helpers.threads import pinned_threads  # noqa: F401 (autouse fixture of the modules importing it)

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a small yellow star"]


def make_batch(n: int = 2, res: int = 64, seed: int = 0) -> dict:
    """A raw batch following docs/DESIGN.md (pixel_values in [-1, 1], captions, micro-conditioning)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.rand(n, 3, res, res, generator=g) * 2 - 1,
        "captions": [CAPTIONS[i % len(CAPTIONS)] for i in range(n)],
        "original_size": torch.tensor([[res + 16 * i, res + 8 * i] for i in range(n)]),
        "crop_top_left": torch.tensor([[i, 2 * i] for i in range(n)]),
        "seed": torch.arange(n) + 100 * seed,
        "key": [f"s{i}" for i in range(n)],
    }


def make_cfg(model_dir, method_cfg, **data):
    from ldmkit.config import Config, DataConfig, ModelConfig, TrainConfig

    return Config(
        method=method_cfg,
        model=ModelConfig(pretrained=str(model_dir)),
        data=DataConfig(resolution=64, **data),
        train=TrainConfig(validation_prompts=["a red circle", "a blue square"], validation_seed=3),
        output_dir="unused",
    )


def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)
