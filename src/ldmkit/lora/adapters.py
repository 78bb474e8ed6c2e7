"""What diffusers' ``PeftAdapterMixin`` (``src/diffusers/loaders/peft.py``) lacks for ldmkit's LoRA training.

UNets and ldmkit's U-ViT both carry the mixin, so adding, disabling, loading, fusing and unloading
adapters are the library's methods; this module adds a user-facing error for unknown target modules and
a context manager for the LCM-LoRA teacher pass (the base model = the adapters switched off).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ldmkit.errors import UserError


def add_lora(model: torch.nn.Module, config, adapter_name: str = "default") -> None:
    """``model.add_adapter(config, adapter_name)``; peft's "target modules not found" as a UserError."""
    try:
        model.add_adapter(config, adapter_name)
    except ValueError as e:  # peft: target modules not found in the model; diffusers: name in use
        raise UserError(f"LoRA target modules {sorted(config.target_modules)} on {type(model).__name__}: {e}") from None


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model (e.g. the LCM-LoRA teacher) for the duration of the block."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()
