"""Shared fixtures of the U-ViT, VAE and feature tests (imported by tests/test_uvit*.py, test_vae.py,
test_features.py). Folders are built once per session under pytest's base temp, whichever module asks
first; the tiny SD1.5 folder is conftest.py's ``tiny_sd15``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.threads import pinned_threads  # noqa: F401 (autouse fixture of the modules importing it)

TEXT_TOKENS, TEXT_WIDTH = 77, 32  # the tiny SD1.5 text encoder of ldmkit.models.tiny
RESOLUTION = 32  # 32 px images -> 4x4 latents with the tiny KL-f8 VAE


def _once(tmp_path_factory, name: str, build) -> Path:
    path = tmp_path_factory.getbasetemp() / name
    if not (path / ".done").exists():
        build(path)
        (path / ".done").write_text("")
    return path


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """16 coloured-shape images (32 px) in a metadata.jsonl folder with 1-3 captions each."""

    def build(path: Path) -> None:
        from ldmkit.data.synth import write_dataset

        write_dataset(path, 16, fmt="folder", size=RESOLUTION, seed=0)
        rows = []
        for i, txt in enumerate(sorted(path.glob("*.txt"))):
            caption = txt.read_text().strip()
            rows.append(
                {
                    "file_name": txt.with_suffix(".png").name,
                    "text": [caption, f"{caption}, picture {i}", "shapes"][: 1 + i % 3],
                }
            )
        (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    return _once(tmp_path_factory, "uvit_shapes", build)


def run_prepare(model: Path, data: Path, out: Path, *extra: str) -> int:
    """``ldmkit prepare features`` through its module (what cli.py dispatches to)."""
    import argparse

    from ldmkit.commands import prepare_features

    parser = argparse.ArgumentParser()
    prepare_features.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--resolution",
            str(RESOLUTION),
            "--batch-size",
            "5",
            *extra,
        ]
    )
    return prepare_features.run(args)


@pytest.fixture(scope="session")
def features_dir(tmp_path_factory, tiny_sd15, shapes_dir) -> Path:
    """``prepare features`` of shapes_dir with the tiny SD1.5 (conftest.py's tiny_sd15)."""
    return _once(tmp_path_factory, "uvit_features", lambda p: run_prepare(tiny_sd15, shapes_dir, p))


def tiny_uvit(**overrides):
    """A uvit-tiny that fits the tiny SD1.5 text encoder and VAE at 32 px."""
    from ldmkit.models.uvit import UViT

    kw = dict(sample_size=RESOLUTION // 8, context_dim=TEXT_WIDTH, num_text_tokens=TEXT_TOKENS)
    return UViT.from_preset("uvit-tiny", **{**kw, **overrides})


def tiny_pipeline(sd_dir: Path, unet, scheduler=None):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldmkit.methods.uvit import training_scheduler
    from ldmkit.pipelines.uvit import UViTPipeline

    scheduler = scheduler or DPMSolverMultistepScheduler.from_config(training_scheduler("epsilon").config)
    pipe = UViTPipeline(
        vae=AutoencoderKL.from_pretrained(sd_dir, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(sd_dir, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(sd_dir, subfolder="tokenizer"),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
