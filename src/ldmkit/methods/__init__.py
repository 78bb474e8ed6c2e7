"""Registry of training methods: ``method.name`` -> implementation (imported lazily)."""

from __future__ import annotations

import importlib
import os

METHODS: dict[str, str] = {
    "finetune": "ldmkit.methods.finetune:FinetuneMethod",
    "lora": "ldmkit.methods.finetune:LoraMethod",
    "lcm_lora": "ldmkit.methods.lcd:LCMLoraMethod",
    "lcd": "ldmkit.methods.lcd:LCDMethod",
    "uvit": "ldmkit.methods.uvit:UViTMethod",
    "vae": "ldmkit.methods.vae:VAEMethod",
}


def _plugins() -> dict[str, str]:
    """Extra methods from LDMKIT_METHODS="name=package.module:Class,..." (your own methods, no fork needed)."""
    spec = os.environ.get("LDMKIT_METHODS", "")
    return dict(item.split("=", 1) for item in spec.split(",") if "=" in item)


def get_method(name: str):
    """The Method class registered under ``name``."""
    METHODS.update(_plugins())
    if name not in METHODS:
        raise ValueError(f"unknown method.name {name!r}; choose one of: {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
