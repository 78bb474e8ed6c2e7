"""Memory of the full-size flow recipes (FLUX.1-dev, SD3.5 Medium / Large LCM-LoRA), "as a GPU would hold it".

    PYTHONPATH=src python benchmarks/flow_memory.py          # needs torchao (pip install 'ldmkit[quant]')

One row per recipe and precision of the frozen base: weights, LoRA + optimizer, activations of one training step at
the recipe's resolution and batch, the total, and whether it fits a 24 GB GPU (<= 23 GiB: 1 GiB left for the CUDA
context and the allocator). How each column is obtained:

- weights: the full-size transformer built on the meta device (the released configs below: every tensor's shape,
  no memory) and its parameters counted at 2 bytes (bf16, the recipes' mixed precision: ldmkit loads frozen models
  in it); for int8 / int4 every ``nn.Linear`` weight at the bytes torchao actually holds for that shape once
  ldmkit's ``quantize_weights`` has quantised a real layer of it (measured per distinct shape: int8 is 1 byte a
  weight plus a per-channel scale; torchao's int4 on the portable path ldmkit uses stores the 4-bit values
  unpacked in int8 bytes plus group scales and zero points, so it is no smaller than int8 in memory; packed int4
  needs torchao's CUDA kernels, which ldmkit does not select).
- LoRA + optimizer: the recipe's rank on the family's LCM-LoRA targets (every block linear but the AdaLN
  modulation), fp32 weight, gradient and AdamW's two moments: 16 bytes a parameter.
- activations: MEASURED with the tracker of benchmarks/vs_diffusers.py (``LiveTensorBytes``: every tensor an op
  creates, until its storage is freed), on one LCM-LoRA step as ldmkit's lcm_lora runs it (teacher pass without the
  adapters, FLUX one pass with its guidance input, SD3 a conditional and an unconditional pass; target pass; student
  pass with gradient checkpointing and backward), the peak above what was resident before it (weights, the LoRA, its
  gradients, which stay allocated between steps, and AdamW's state: counted above). Not at full size (a CPU cannot run a 12B step in reasonable time): at 1/4 of the width
  (heads / 4, the same head size), 1 and 3 repeating units of blocks, two sequence lengths, batch 1; then scaled
  linearly in width, units, tokens and batch (per-block activations are linear in width and tokens with the
  memory-efficient attention kernels used on both CPU and GPU, which never hold the tokens x tokens matrix; the
  checkpointed blocks keep their inputs, so units add linearly). The script prints the linearity check in tokens.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from vs_diffusers import LiveTensorBytes  # noqa: E402  (the tracker, reused as is)

GiB = 2**30
FITS = 23 * GiB

from ldmkit.families.configs import FLUX_DEV, SD35_LARGE, SD35_MEDIUM  # noqa: E402  (released configs)


@dataclass
class Model:
    name: str
    family: str  # flux / sd3
    config: dict
    units: int  # repeating units at full size
    text_tokens: int  # T5 tokens (+ CLIP's 77 for SD3): the pipelines' max_sequence_length


MODELS = {
    "flux_dev": Model("FLUX.1-dev", "flux", FLUX_DEV, 19, 512),  # a unit: 1 double + 2 single blocks (19 + 38)
    "sd35_medium": Model("SD3.5 Medium", "sd3", SD35_MEDIUM, 24, 77 + 256),
    "sd35_large": Model("SD3.5 Large", "sd3", SD35_LARGE, 38, 77 + 256),
}
ROWS = [  # (recipe, model, precision of the frozen base)
    ("lcm_lora/flux_dev", "flux_dev", "bf16"),
    ("lcm_lora/flux_dev_int8", "flux_dev", "int8"),
    ("lcm_lora/flux_dev + quantize=int4", "flux_dev", "int4"),
    ("lcm_lora/sd35_medium", "sd35_medium", "bf16"),
    ("lcm_lora/sd35_large", "sd35_large", "bf16"),
    ("lcm_lora/sd35_large + quantize=int8", "sd35_large", "int8"),
]


def transformer(m: Model, units: int | None = None, shrink: int = 1) -> torch.nn.Module:
    import diffusers

    cfg = dict(m.config)
    if m.family == "flux":
        if units is not None:
            cfg.update(num_layers=units, num_single_layers=2 * units)
        cfg["num_attention_heads"] //= shrink
        cls = diffusers.FluxTransformer2DModel
    else:
        if units is not None:
            cfg.update(
                num_layers=units,
                dual_attention_layers=tuple(range(min(units, len(cfg.get("dual_attention_layers", ()))))),
            )
        heads = max(1, cfg["num_attention_heads"] // shrink)
        cfg.update(num_attention_heads=heads, caption_projection_dim=heads * cfg["attention_head_dim"])
        cls = diffusers.SD3Transformer2DModel
    return cls(**cfg)


def lora_targets(m: Model) -> tuple[str, ...]:
    from ldmkit.families.flux import FLUX_LORA_TARGET_MODULES
    from ldmkit.families.sd3 import SD3_LORA_TARGET_MODULES

    return FLUX_LORA_TARGET_MODULES if m.family == "flux" else SD3_LORA_TARGET_MODULES


def targeted(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)  # peft's suffix match


def quantised_bytes(shape: tuple[int, int], mode: str, cache: dict) -> int:
    """Bytes torchao holds for one quantised linear weight of ``shape`` (out, in), measured on a real layer."""
    if (shape, mode) not in cache:
        from ldmkit.families.quantize import quantize_weights

        layer = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=torch.bfloat16)
        quantize_weights(layer, mode)
        w = layer.weight.data
        if type(w) is torch.Tensor:  # left unquantised (no group divides the inputs)
            cache[(shape, mode)] = w.numel() * w.element_size()
        else:
            names, _ = w.__tensor_flatten__()
            cache[(shape, mode)] = sum(getattr(w, n).numel() * getattr(w, n).element_size() for n in names)
        del layer
        gc.collect()
    return cache[(shape, mode)]


def weights_and_lora(m: Model, precision: str, rank: int, cache: dict) -> tuple[int, int]:
    with torch.device("meta"):
        model = transformer(m)
    total = sum(p.numel() for p in model.parameters()) * 2
    lora = 0
    targets = lora_targets(m)
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if precision != "bf16":
            total += quantised_bytes(tuple(module.weight.shape), precision, cache) - module.weight.numel() * 2
        if targeted(name, targets):
            lora += rank * (module.in_features + module.out_features)
    return total, lora * 16


def step_activations(m: Model, units: int, shrink: int, image_tokens: int, rank: int) -> int:
    """Peak bytes above the resident ones (weights, LoRA, its gradients and AdamW state) of one LCM-LoRA step
    (batch 1)."""
    from peft import LoraConfig

    from ldmkit.families.flux import FluxFamily
    from ldmkit.families.sd3 import SD3Family

    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformer(m, units, shrink)
    model = model.to_empty(device="cpu").to(torch.bfloat16).requires_grad_(False)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)  # random weights: memory does not depend on their values
    model.enable_gradient_checkpointing()
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(lora_targets(m)))
    model.add_adapter(cfg)  # diffusers' peft integration, as ldmkit's adapters.add_trainable_adapter
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = p.data.float()
        p.requires_grad_(True)
    opt = torch.optim.AdamW(lora, lr=1e-4)
    side = int(math.isqrt(image_tokens)) * 2  # latent side: 2x2 patches
    x = torch.randn(1, 16, side, side, dtype=torch.bfloat16)
    d = m.config["joint_attention_dim"]
    pooled = m.config["pooled_projection_dim"]
    cond = {
        "prompt_embeds": torch.randn(1, m.text_tokens, d, dtype=torch.bfloat16),
        "pooled_prompt_embeds": torch.randn(1, pooled, dtype=torch.bfloat16),
    }
    denoise = FluxFamily.denoise if m.family == "flux" else SD3Family.denoise
    t = torch.tensor([500.0])

    def one_step():
        from ldmkit.lora.adapters import adapters_disabled

        with torch.no_grad():
            with adapters_disabled(model):  # teacher: FLUX one pass (guidance input), SD3 cond + uncond
                for _ in range(1 if m.family == "flux" else 2):
                    denoise(None, model, x, t, cond, torch.tensor([3.5]))
            target = denoise(None, model, x, t * 0.9, cond, torch.tensor([3.5]))
        with torch.autocast("cpu", torch.bfloat16):
            student = denoise(None, model, x, t, cond, torch.tensor([3.5]))
        loss = (student.float() - target.float()).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: resident, as LoRA + optimizer counts them

    one_step()  # the optimizer state exists from here on, as in a run's steady state
    tracker = LiveTensorBytes()
    tracker.census()
    tracker.peak = tracker.current
    with tracker.mode:
        one_step()
    return tracker.peak - tracker.current


def activations(m: Model, rank: int, image_tokens: int, batch: int, shrink: int = 4) -> tuple[int, float]:
    """Activations at full width, depth, ``image_tokens`` and ``batch`` from three small measurements; the second
    value is the token-linearity check (measured at 4x the image tokens / predicted)."""
    small = 64
    a1 = step_activations(m, 1, shrink, small, rank)
    a3 = step_activations(m, 3, shrink, small, rank)
    a1_big = step_activations(m, 1, shrink, 4 * small, rank)
    per_unit = (a3 - a1) / 2
    fixed = a1 - per_unit
    tokens = small + m.text_tokens
    predicted_big = a1 * (4 * small + m.text_tokens) / tokens
    full_tokens = image_tokens + m.text_tokens
    scale = shrink * full_tokens / tokens * batch
    return int((fixed + per_unit * m.units) * scale), a1_big / predicted_big


def recipe_settings(recipe: str) -> tuple[int, int, int]:
    from ldmkit.methods import load_config

    name = recipe.split(" ")[0]
    cfg = load_config(name)
    return cfg.data.resolution, cfg.train.batch_size, cfg.method.lora_rank


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shrink", type=int, default=4, help="Width divisor of the activation measurements.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cache: dict = {}
    acts: dict = {}
    lines = [
        "| recipe | base | weights | LoRA + optimizer | activations (res, batch) | total | fits 24 GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe, key, precision in ROWS:
        m = MODELS[key]
        res, batch, rank = recipe_settings(recipe)
        weights, lora = weights_and_lora(m, precision, rank, cache)
        image_tokens = (res // 16) ** 2
        if (key, res, batch, rank) not in acts:
            acts[(key, res, batch, rank)] = activations(m, rank, image_tokens, batch, args.shrink)
            print(
                f"{m.name}: token linearity (measured / predicted at 4x tokens) {acts[(key, res, batch, rank)][1]:.3f}"
            )
        act = acts[(key, res, batch, rank)][0]
        total = weights + lora + act
        lines.append(
            f"| {recipe} | {precision} | {weights / GiB:.1f} GiB | {lora / GiB:.2f} GiB (r{rank}) | "
            f"{act / GiB:.1f} GiB ({res} px, {batch}) | {total / GiB:.1f} GiB | {'yes' if total <= FITS else 'no'} |"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
