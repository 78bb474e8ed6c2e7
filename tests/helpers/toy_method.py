"""A small denoiser on raw pixels: exercises the training loop quickly, without diffusion models.

Registered for tests through LDMKIT_METHODS="toy=helpers.toy_method:ToyMethod" (tests/ on sys.path).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldmkit.methods.base import Method, MethodConfig
from ldmkit.rng import SampleRNG


@dataclass
class ToyConfig(MethodConfig):
    name: str = "toy"
    width: int = 16
    """Hidden channels."""
    use_ema: bool = False
    """Keep an EMA of the weights (checks that EMA state survives resume)."""


class ToyMethod(Method):
    Config = ToyConfig
    trainable_names = ("net",)
    crash_at_step = 0
    """Raise in loss() at this step (simulates a killed run; 0 = never). A class attribute that tests
    patch, not a config key: a resumed run must have the same config as the killed one."""

    def __init__(self, cfg, accelerator):
        super().__init__(cfg, accelerator)
        torch.manual_seed(0)
        w = self.mcfg.width
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, w, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(w, 3, 3, padding=1)
        )
        self.ema = None
        self.calls = 0
        if self.mcfg.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.net.parameters(), decay=0.9)

    def loss(self, batch):
        self.calls += 1
        if self.crash_at_step and self.calls > (self.crash_at_step - 1) * self.cfg.train.gradient_accumulation_steps:
            raise RuntimeError("simulated crash")
        x = batch["pixel_values"]
        rng = SampleRNG(batch["seed"], x.device)
        noise = rng.randn(*x.shape[1:])
        sigma = rng.rand(1, 1, 1)
        pred = self.net(x + sigma * noise)
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        return loss, {"sigma": sigma.mean().item()}

    def after_step(self, step):
        if self.ema is not None:
            self.ema.step(self.unwrap(self.net).parameters())

    def checkpoint_objects(self):
        return {"ema": self.ema} if self.ema is not None else {}

    def export(self, out_dir: Path):
        save_file(
            {k: v.contiguous() for k, v in self.unwrap(self.net).state_dict().items()}, str(out_dir / "toy.safetensors")
        )
