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


def add_lora(
    model: torch.nn.Module, config, adapter_name: str = "default", what: str = "method.lora_target_modules"
) -> None:
    """``model.add_adapter(config, adapter_name)``; peft's "target modules not found" as a UserError naming
    the config key ``what``."""
    try:
        model.add_adapter(config, adapter_name)
    except ValueError as e:  # peft: target modules not found in the model; diffusers: name in use
        raise UserError(f"{what} {sorted(config.target_modules)} on {type(model).__name__}: {e}") from None


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model (e.g. the LCM-LoRA teacher) for the duration of the block."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


@contextlib.contextmanager
def input_casts_off_under_autocast(models: list[torch.nn.Module], mixed_precision: str) -> Iterator[None]:
    """peft's adapter layers cast their input to the adapter's dtype (fp32 here) before its matmul
    (``BaseTunerLayer._cast_input_dtype``); under autocast (``mixed_precision`` bf16 / fp16) that matmul runs in
    the autocast dtype again, so bf16 -> fp32 -> bf16 changes no number, but every adapted layer keeps its own
    copy of its input for the backward (dmd2_lora at SD1.5 size, batch 32: 118 GB of activations with it, 96
    without; README "Memory at SD1.5 size").
    For the block (a training step's forward and backward, where checkpointed blocks recompute) the cast is
    off, with peft's switch for it (``peft.helpers.disable_input_dtype_casting``). Left on in fp32 training
    (nothing to save there: the input is fp32 already) and where a LoRA's dropout acts on its input (it would
    then run on the bf16 input: other roundings)."""
    from peft.helpers import disable_input_dtype_casting
    from peft.tuners.lora import LoraLayer

    def lossless(model: torch.nn.Module) -> bool:
        return not any(
            isinstance(d, torch.nn.Dropout) and d.p > 0
            for m in model.modules()
            if isinstance(m, LoraLayer)
            for d in m.lora_dropout.values()
        )

    with contextlib.ExitStack() as stack:
        if mixed_precision in ("bf16", "fp16"):
            for model in models:
                stack.enter_context(disable_input_dtype_casting(model, active=lossless(model)))
        yield


ADAPTERS = ("lora", "dora", "loha", "lokr")
"""Adapter kinds of method.adapter (peft's tuners). How each is exported (``export_adapter``):
lora: the diffusers file + kohya copy; dora: the diffusers file with the magnitude vectors (diffusers'
``load_lora_weights`` reads DoRA; no kohya copy); loha, lokr: stock diffusers cannot load them, so their
weight updates are written as an exact LoRA (SVD at the rank of each update), which every LoRA loader reads."""


def adapter_config(kind: str, rank: int, alpha: float, dropout: float, targets: list[str]):
    """The peft config of ``kind`` (see ADAPTERS). LoRA and DoRA start from Gaussian A and zero B
    (diffusers' LoRA scripts), LoHa and LoKr from peft's default init; all start equal to the base model."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = list(targets)
    if kind in ("lora", "dora"):
        # DoRA: Liu et al. 2024, arXiv:2402.09353 (peft LoraConfig.use_dora)
        return LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            init_lora_weights="gaussian",
            use_dora=kind == "dora",
        )
    if kind == "loha":  # LoHa: Hyeon-Woo et al. 2022 (FedPara), arXiv:2108.06098; LyCORIS
        return LoHaConfig(r=rank, alpha=alpha, module_dropout=dropout, target_modules=targets)
    if kind == "lokr":  # LoKr: Yeh et al. 2024 (LyCORIS), arXiv:2309.14859
        return LoKrConfig(r=rank, alpha=alpha, module_dropout=dropout, target_modules=targets)
    raise UserError(f"unknown method.adapter {kind!r}; choose one of: {', '.join(ADAPTERS)}")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Adapters added inside the block draw their init from ``seed``; the global generator is restored after.
    peft initialises an adapter on the CPU before moving it to its base layer's device, so forking the CPU
    generator is enough."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def add_trainable_adapter(model: torch.nn.Module, knobs, seed: int | None, targets: list[str] | None = None) -> int:
    """The one place ldmkit adds trainable adapters (every LoRA method: lora, lcm_lora, tcd_lora, pcm_lora):
    ``knobs`` is a resolved LoRA config (methods.configs.LoraKnobs: adapter, lora_rank, lora_alpha,
    lora_dropout, lora_target_modules; ``targets`` replaces the last, e.g. a text encoder's). The random init
    comes from ``seed`` (train.seed), whatever the global RNG has drawn before, so the same config starts from
    the same adapter (None: the caller has seeded the generator, e.g. for several models in one stream, see
    ``seeded``); the adapter's weights are cast to fp32 (they train in fp32 under mixed precision).
    Returns the number of trainable parameters added."""
    from diffusers.training_utils import cast_training_params

    what = "method.lora_target_modules" if targets is None else "method.text_encoder_target_modules"
    targets = list(targets if targets is not None else knobs.lora_target_modules)
    alpha = knobs.lora_alpha if knobs.lora_alpha is not None else knobs.lora_rank
    config = adapter_config(knobs.adapter, knobs.lora_rank, alpha, knobs.lora_dropout, targets)
    before = {id(p) for p in model.parameters() if p.requires_grad}
    with contextlib.nullcontext() if seed is None else seeded(seed):
        add_lora(model, config, what=what)
    cast_training_params(model, dtype=torch.float32)
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in before)


def dora_magnitudes(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """``{<module>.lora_magnitude_vector.weight: m}`` of a DoRA-adapted model (the key layout of peft's
    ``get_peft_model_state_dict``, which diffusers' ``load_lora_weights`` reads back)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_magnitude_vector", {}):
            m = module.lora_magnitude_vector[adapter_name].weight
            out[f"{name}.lora_magnitude_vector.weight"] = m.detach().float().cpu().contiguous()
    return out


def lycoris_as_lora(model: torch.nn.Module, adapter_name: str = "default", rtol: float = 1e-5):
    """The LoHa / LoKr updates of ``model`` as exact LoRA layers (ldmkit.lora.export Layers): each module's
    delta weight (peft ``get_delta_weight``, scale included) split by SVD, keeping the singular values above
    ``rtol`` times the largest (the update's rank, at most r^2 for LoHa), so ``up @ down`` is the update;
    every module padded with zeros to the largest of these ranks."""
    from peft.tuners.lycoris_utils import LycorisLayer

    from ldmkit.lora.export import LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, LycorisLayer) or adapter_name not in module._available_adapters:
            continue
        delta = module.get_delta_weight(adapter_name).detach().float().cpu()
        out_features = delta.shape[0]
        u, s, vh = torch.linalg.svd(delta.reshape(out_features, -1), full_matrices=False)
        rank = max(1, int((s > s[0] * rtol).sum())) if s.numel() and s[0] > 0 else 1
        root = s[:rank].sqrt()
        up = u[:, :rank] * root  # [out, r]
        down = root[:, None] * vh[:rank]  # [r, in * kh * kw]
        if delta.ndim == 4:  # conv: down is a conv of the module's kernel, up a 1x1 conv
            down = down.reshape(rank, *delta.shape[1:])
            up = up[:, :, None, None]
        layers[name] = (down, up)
    # One rank for all modules (zero-padded): loaders read a peft file without alphas as alpha = the most
    # common rank, which would rescale modules of another rank.
    rank = max((down.shape[0] for down, _ in layers.values()), default=1)
    padded = {}
    for name, (down, up) in layers.items():
        extra = rank - down.shape[0]
        down = torch.cat([down, down.new_zeros(extra, *down.shape[1:])])
        up = torch.cat([up, up.new_zeros(up.shape[0], extra, *up.shape[2:])], dim=1)
        padded[name] = LoraLayer(down=down.contiguous(), up=up.contiguous(), alpha=None)
    return padded


def export_adapter(
    out_dir, models: dict[str, torch.nn.Module], pipeline_cls: type, kind: str, kohya: bool = True
) -> tuple[int, list[str]]:
    """Write the adapters of ``models`` (``{component: model}``) as files stock diffusers loads (see
    ADAPTERS); returns (adapted modules, the files written)."""
    from pathlib import Path

    from ldmkit.lora import export

    out_dir = Path(out_dir)
    if kind == "lora":
        n = export.export_lora(out_dir, models, pipeline_cls, kohya=kohya)
        files = [export.LORA_WEIGHT_NAME] + ([export.KOHYA_WEIGHT_NAME] if kohya else [])
        return n, files
    if kind == "dora":
        layers = {name: export.layers_from_peft_model(model) for name, model in models.items()}
        state = {}
        for name, model in models.items():
            state[f"{name}_lora_layers"] = {**export.peft_state_dict(layers[name]), **dora_magnitudes(model)}
        out_dir.mkdir(parents=True, exist_ok=True)
        pipeline_cls.save_lora_weights(out_dir, weight_name=export.LORA_WEIGHT_NAME, **state)
        return sum(len(v) for v in layers.values()), [export.LORA_WEIGHT_NAME]
    layers = {name: lycoris_as_lora(model) for name, model in models.items()}
    export.save_diffusers(out_dir, layers, pipeline_cls)
    files = [export.LORA_WEIGHT_NAME]
    if kohya:
        # the denoiser's own config lays out SDXL's original-SD names and FLUX's BFL names, as for LoRA
        export.save_kohya_copy(out_dir, layers, pipeline_cls, models.get("unet", models.get("transformer")))
        files.append(export.KOHYA_WEIGHT_NAME)
    return sum(len(v) for v in layers.values()), files
