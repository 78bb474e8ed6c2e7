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
    "dmd2_lora": "ldmkit.methods.dmd2:DMD2LoraMethod",
    "dmd2": "ldmkit.methods.dmd2:DMD2Method",
    "uvit": "ldmkit.methods.uvit:UViTMethod",
    "vae": "ldmkit.methods.vae:VAEMethod",
}


def registered_methods() -> dict[str, str]:
    """Every method by name: the built-in ones, plus your own from
    ``LDMKIT_METHODS="name=package.module:Class,..."`` (no fork needed)."""
    return {**BUILTIN_METHODS, **_plugins()}


# The built-in methods' configs live in one torch-free module (ldmkit.methods.configs): help and config
# checks need no model code.
BUILTIN_CONFIGS: dict[str, str] = {
    "finetune": "ldmkit.methods.configs:FinetuneConfig",
    "lora": "ldmkit.methods.configs:LoraMethodConfig",
    "lcm_lora": "ldmkit.methods.configs:LCMLoraConfig",
    "lcd": "ldmkit.methods.configs:LCDConfig",
    "tcd_lora": "ldmkit.methods.configs:TCDLoraConfig",
    "tcd": "ldmkit.methods.configs:TCDConfig",
    "pcm_lora": "ldmkit.methods.configs:PCMLoraConfig",
    "pcm": "ldmkit.methods.configs:PCMConfig",
    "dmd2_lora": "ldmkit.methods.configs:DMD2LoraConfig",
    "dmd2": "ldmkit.methods.configs:DMD2Config",
    "uvit": "ldmkit.methods.configs:UViTConfig",
    "vae": "ldmkit.methods.configs:VAEConfig",
}


def get_config_class(name: str):
    """The config dataclass of method ``name``, without importing the method (and torch) when it is built in."""
    spec = BUILTIN_CONFIGS.get(name)
    if spec is None or name in _plugins():
        return get_method(name).Config
    module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)


def _plugins() -> dict[str, str]:
    spec = os.environ.get("LDMKIT_METHODS", "")
    return dict(item.split("=", 1) for item in spec.split(",") if "=" in item)


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
    if name not in registered_methods():
        get_method(name)  # the UserError listing the methods
    cfg = parse_config(get_config_class(name), name, path, overrides)
    get_method(name).check_model(cfg)  # cross-checks against the model folder (config files only)
    return cfg


def method_help(name: str | None, values: dict | None = None) -> str:
    """``ldmkit train --help`` for one method: the shared sections and that method's options, one line per
    option with its default (or its value in ``values``, a resolved recipe); ``None``: the shared sections only."""
    from ldmkit.config import options_help

    return options_help(None if name is None else get_config_class(name), values)
