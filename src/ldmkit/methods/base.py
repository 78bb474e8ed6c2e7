"""The method interface: what a training method owns, and what the one training loop owns.

A method owns its models, its ``loss(batch)`` and what happens after an optimizer step (EMA); the loop
(``ldmkit.train.loop``) owns accumulation, clipping, logging, previews, checkpoints and resume.
See docs/DESIGN.md for the batch contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ldmkit.config import Config, MethodConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["Method", "MethodConfig"]


class Method:
    """Base class. Subclasses set ``Config`` and ``trainable_names`` and implement ``loss``."""

    Config: type[MethodConfig] = MethodConfig
    trainable_names: tuple[str, ...] = ()

    def __init__(self, cfg: Config, accelerator: Accelerator):
        self.cfg = cfg
        self.mcfg = cfg.method
        self.accelerator = accelerator

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype for frozen models: the mixed-precision dtype (trainable weights stay fp32)."""
        mp = self.accelerator.mixed_precision
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)

    def unwrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The bare module behind accelerate's DDP/compile wrappers."""
        return self.accelerator.unwrap_model(module)

    def parameters(self) -> list[torch.nn.Parameter]:
        params = []
        for name in self.trainable_names:
            params += [p for p in getattr(self, name).parameters() if p.requires_grad]
        return params

    def clip_groups(self) -> list[list[torch.nn.Parameter]]:
        """Groups of ``parameters()`` whose gradients train.max_grad_norm clips each by its own norm (the
        first group's norm is the one logged): one group, unless modules trained together must not scale
        each other's steps (vae: the autoencoder and its discriminator)."""
        return [self.parameters()]

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (EMA updates)."""

    def checkpoint_objects(self) -> dict[str, Any]:
        """Extra objects with state_dict/load_state_dict saved in every checkpoint (EMA)."""
        return {}

    def validate(self, step: int):
        """A PIL image grid for output_dir/samples, or None."""
        return None

    def export(self, out_dir: Path) -> None:
        raise NotImplementedError

    def encoders(self):
        """Object with encode_images/encode_prompts/fingerprint that the data cache may use, or None."""
        return None
