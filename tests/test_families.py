"""Model families and the data layer's cache decision: a cached lcm_lora run loads the VAE and the text
encoder only to build the cache, and not at all once the cache exists (the SD1.x unconditional pass takes
the cache's empty-prompt embedding)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ldmkit.methods import load_config

from helpers.runs import logged

ROOT = Path(__file__).parents[1]


@pytest.fixture
def count_loads(monkeypatch):
    """Every from_pretrained of AutoencoderKL ("vae") and CLIPTextModel ("text"), in order."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    loads: list[str] = []
    for cls, kind in ((AutoencoderKL, "vae"), (CLIPTextModel, "text")):
        original = cls.from_pretrained.__func__

        def counted(c, *args, _original=original, _kind=kind, **kwargs):
            loads.append(_kind)
            return _original(c, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(counted))
    return loads


def test_cached_lcm_lora_loads_encoders_only_to_build_the_cache(
    tiny_sd15, shapes_folder, tmp_path, count_loads, monkeypatch
):
    from ldmkit.methods.lcd import LCMLoraMethod
    from ldmkit.train.loop import train

    at_start: list[list[str]] = []
    loss = LCMLoraMethod.loss

    def first_loss_records(self, batch):
        if len(at_start) < len(runs):
            at_start.append(list(count_loads))
        return loss(self, batch)

    monkeypatch.setattr(LCMLoraMethod, "loss", first_loss_records)

    def cfg(run: str):
        return load_config(
            str(ROOT / "configs" / "lcm_lora" / "debug.yaml"),
            [
                f"--model.pretrained={tiny_sd15}",
                f"--data.path={shapes_folder}",
                f"--data.cache_dir={tmp_path / 'cache'}",
                "--train.max_steps=2",
                "--train.checkpoint_every=2",
                "--train.validation_prompts=[]",
                "--train.batch_size=2",
                f"--output_dir={tmp_path / run}",
            ],
        )

    runs: list[str] = []
    for run in ("first", "second"):
        runs.append(run)
        count_loads.clear()
        train(cfg(run))
        if run == "first":
            # The cache is built: VAE and text encoder loaded once each, before the first step.
            assert len(list((tmp_path / "cache").glob("*/index.json"))) == 1
            assert Counter(at_start[0]) == {"vae": 1, "text": 1}
            assert Counter(count_loads) == {"vae": 1, "text": 1}  # and never again (the LoRA export needs none)
        else:
            # The cache exists: neither is loaded, at start or later (uncond = the cache's "" embedding).
            assert at_start[1] == [] and count_loads == []
    assert logged(tmp_path / "first") == logged(tmp_path / "second")  # both trained from the same cache
