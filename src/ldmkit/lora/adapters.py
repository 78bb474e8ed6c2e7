"""LoRA adapters on any torch model through peft: add, switch off, load from a file, scale, fuse.

diffusers gives its own models these operations as methods (``PeftAdapterMixin``: add_adapter,
disable_adapters, load_lora_adapter, fuse_lora, ...). ldmkit's U-ViT is a plain ``ModelMixin`` without
that mixin, so the operations LCM-LoRA and the U-ViT pipeline need are written here once on top of the
model-agnostic parts: peft's ``inject_adapter_in_model`` and ``diffusers.utils.peft_utils`` (the very
helpers the mixin's methods call). They work on UNets and U-ViTs alike.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Iterator, Mapping

import torch

from ldmkit.errors import UserError
from ldmkit.lora import formats

logger = logging.getLogger(__name__)


def _tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _check_new_name(model: torch.nn.Module, adapter_name: str) -> None:
    if any(adapter_name in getattr(m, "lora_A", {}) for m in _tuner_layers(model)):
        raise UserError(f"the model already has a LoRA adapter named {adapter_name!r}")


def add_lora(model: torch.nn.Module, config, adapter_name: str = "default") -> None:
    """Inject a (trainable) LoRA adapter described by a peft ``LoraConfig``; the model's own ``add_adapter``
    when it has diffusers' ``PeftAdapterMixin`` (so its adapter bookkeeping stays right)."""
    from diffusers.loaders.peft import PeftAdapterMixin
    from peft import inject_adapter_in_model

    _check_new_name(model, adapter_name)
    try:
        if isinstance(model, PeftAdapterMixin):
            model.add_adapter(config, adapter_name)
        else:
            inject_adapter_in_model(config, model, adapter_name)
    except ValueError as e:  # peft: target modules not found in the model
        raise UserError(f"LoRA target modules {sorted(config.target_modules)} on {type(model).__name__}: {e}") from None


def set_adapters_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer of ``model`` on or off (what ``disable_adapters``/``enable_adapters`` do)."""
    from diffusers.utils.peft_utils import set_adapter_layers

    set_adapter_layers(model, enabled=enabled)


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model (e.g. the LCM-LoRA teacher) for the duration of the block."""
    set_adapters_enabled(model, False)
    try:
        yield
    finally:
        set_adapters_enabled(model, True)


@torch.no_grad()
def load_lora(
    model: torch.nn.Module, lora: Mapping[str, torch.Tensor] | formats.Layers, adapter_name: str = "default"
) -> int:
    """Add a LoRA from a state dict in any layout ``formats.read_lora`` reads (or already-read layers) as
    peft adapter ``adapter_name``; returns the number of adapted modules.

    Each module gets exactly the file's rank (peft ``rank_pattern`` for the odd ones out); alpha / r is
    folded into ``lora_B`` so that peft's scaling stays 1 and ``set_adapters`` weights multiply it.
    """
    from peft import LoraConfig

    _check_new_name(model, adapter_name)
    modules = dict(model.named_modules())
    layers = (
        lora if lora and isinstance(next(iter(lora.values())), formats.LoraLayer) else formats.read_lora(lora, modules)
    )
    missing = sorted(n for n in layers if not isinstance(modules.get(n), (torch.nn.Linear, torch.nn.Conv2d)))
    if missing:
        raise UserError(
            f"LoRA modules not found as Linear/Conv2d layers of {type(model).__name__}: {', '.join(missing[:5])}"
        )
    ranks = {n: layer.rank for n, layer in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    odd = {re.escape(n): k for n, k in ranks.items() if k != r}  # peft matches pattern keys as regexes
    add_lora(
        model,
        LoraConfig(r=r, lora_alpha=r, target_modules=sorted(layers), rank_pattern=odd, alpha_pattern=odd),
        adapter_name,
    )
    modules = dict(model.named_modules())  # now the peft wrappers
    for name, layer in layers.items():
        m = modules[name]
        a, b = m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight
        a.copy_(layer.down.reshape(a.shape).to(a))
        b.copy_((layer.up.float() * layer.scale).reshape(b.shape).to(b))
    logger.info("loaded LoRA adapter %r into %d modules of %s", adapter_name, len(layers), type(model).__name__)
    return len(layers)


def set_adapters(model: torch.nn.Module, adapter_names: list[str], weights: list[float] | None = None) -> None:
    """Activate ``adapter_names`` with the given strengths (default 1.0 each), as diffusers' ``set_adapters``."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    weights = [1.0] * len(adapter_names) if weights is None else list(weights)
    if len(weights) != len(adapter_names):
        raise UserError(f"{len(weights)} adapter weights for {len(adapter_names)} adapters")
    set_weights_and_activate_adapters(model, list(adapter_names), weights)


def fuse_lora(model: torch.nn.Module, scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
    """Merge the active adapters into the base weights (peft ``merge``), scaled by ``scale``."""
    for layer in _tuner_layers(model):
        if scale != 1.0:
            layer.scale_layer(scale)
        layer.merge(adapter_names=adapter_names)


def unfuse_lora(model: torch.nn.Module) -> None:
    """Undo ``fuse_lora``."""
    for layer in _tuner_layers(model):
        layer.unmerge()


def unload_lora(model: torch.nn.Module) -> None:
    """Remove every LoRA layer, restoring the plain modules (unmerged base weights)."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(model)
