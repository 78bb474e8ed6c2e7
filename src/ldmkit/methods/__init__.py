"""Registry of training methods: ``method.name`` -> implementation (imported lazily), and the resolution
of a recipe into the typed config of the method it names."""

from __future__ import annotations

import importlib
import os

from ldmkit.config import Config, parse_config, recipe_method_name, resolve_recipe
from ldmkit.errors import UserError

BUILTIN_METHODS: dict[str, str] = {
    "finetune": "ldmkit.methods.finetune:FinetuneMethod",
    "lora": "ldmkit.methods.finetune:LoraMethod",
    "lcm_lora": "ldmkit.methods.lcd:LCMLoraMethod",
    "lcd": "ldmkit.methods.lcd:LCDMethod",
    "tcd_lora": "ldmkit.methods.tcd:TCDLoraMethod",
    "tcd": "ldmkit.methods.tcd:TCDMethod",
    "pcm_lora": "ldmkit.methods.pcm:PCMLoraMethod",
    "pcm": "ldmkit.methods.pcm:PCMMethod",
    "uvit": "ldmkit.methods.uvit:UViTMethod",
    "vae": "ldmkit.methods.vae:VAEMethod",
}


def registered_methods() -> dict[str, str]:
    """Every method by name: the built-in ones, plus your own from
    ``LDMKIT_METHODS="name=package.module:Class,..."`` (no fork needed)."""
    spec = os.environ.get("LDMKIT_METHODS", "")
    plugins = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
    return {**BUILTIN_METHODS, **plugins}


def get_method(name: str):
    """The Method class registered under ``name``."""
    methods = registered_methods()
    if name not in methods:
        raise UserError(f"unknown method.name {name!r}; choose one of: {', '.join(methods)}")
    module, cls = methods[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """Resolve a recipe (a file, or a shipped recipe's name such as ``lcm_lora/sd15``) plus
    ``--section.key=value`` overrides into the typed Config of the method it names.

    Unknown keys, wrong types and bad values raise UserError with one line naming the key.
    """
    overrides = list(overrides or [])
    path = None if path is None else str(resolve_recipe(path))
    name = recipe_method_name(path, overrides)
    method_cls = get_method(name)
    cfg = parse_config(method_cls.Config, name, path, overrides)
    method_cls.check_model(cfg)
    return cfg


def method_help(name: str) -> str:
    """Help text of one method's options (for ``ldmkit train --help``)."""
    from ldmkit.config import build_parser

    return build_parser(get_method(name).Config).format_help()
