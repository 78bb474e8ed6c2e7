"""DMD2's memory at SD1.5 size: ``dmd2_lora`` (one frozen UNet + two LoRAs) against ``dmd2`` (three UNets:
generator, real score, fake score), as a GPU would hold it, in one run (issue 24).

    python benchmarks/dmd2_memory.py [--settings 2:off,2:on,32:off,32:on] [--latent 64] [--rank 64]

Both methods are ldmkit's own (``ldmkit.methods.dmd2``), built by the training loop's calls (config, accelerate
at bf16: frozen weights bf16, trainable weights and optimizer state fp32, the loop's optimizer and per-group
clipping, its gradient checkpointing, its step with peft's input cast off under autocast), on SD1.5's UNet config
(diffusers' ``UNet2DConditionModel`` defaults + SD1.5's cross-attention width, as ``benchmarks/vs_diffusers.py
--full-size`` builds it) with SD1.5's CLIP text encoder layout (random weights).

Memory is counted by ``benchmarks/vs_diffusers.py``'s tracker (``LiveTensorBytes``: module weights, gradients and
optimizer state at the end of a step, then every tensor an op creates until it is freed, at its peak), over
two tracked optimizer steps after one untracked warm-up step (which creates the optimizer state): a generator
turn (steps 2-7 of ``ldmkit.methods.dmd2``: generator forward with gradient, real and fake score, GAN both sides,
fake-score denoising) and a fake-score turn (the generator without gradient, steps 6-7).

The UNets' weights are fake tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and storages without
memory or compute): three SD1.5 UNets with fp32 copies, gradients and AdamW state are ~30 GB, more than this
machine, and the tracker only needs sizes and lifetimes. Every op that touches them returns fake tensors too,
so the full SD1.5 latent size (64x64, 512 px) and the reference's batch (32 per GPU,
tianweiy/DMD2 experiments/sdv1.5/*.sh) cost nothing; the small modules (LoRA, classifier, text encoder) are real.
What the tracker cannot see on a GPU either way: kernels' workspaces and the allocator's caching.

Columns: weights (every module's parameters and buffers), grads (the trainable parameters' gradients after the
backward), optimizer (AdamW state), activations (what the loss holds when its backward starts: saved tensors,
autocast's bf16 copies of fp32 weights), step peak (all of it live at the highest point of either turn).
Each method runs in its own child process (the tracker's census counts every live module of its process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ldmkit.lora.adapters import input_casts_off_under_autocast

sys.path.insert(0, str(Path(__file__).parent))
from lcm_throughput import build_model as build_small  # noqa: E402
from vs_diffusers import LiveTensorBytes  # noqa: E402

METHODS = ("dmd2_lora", "dmd2")
GB = 1e9


def write_sd15_folder(out: Path) -> Path:
    """``out``: the small pipeline of benchmarks/lcm_throughput.py with SD1.5's UNet config (the config only:
    ``fake_unets`` builds the weights) and SD1.5's text-encoder layout (CLIP ViT-L/14's text tower: 12 layers,
    width 768), random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    build_small(out)
    for f in (out / "unet").iterdir():
        f.unlink()
    # diffusers' UNet2DConditionModel defaults are SD1.5's layout; SD1.5 sets these (its unet/config.json).
    sd15 = {
        "_class_name": "UNet2DConditionModel",
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "sample_size": 64,
    }
    (out / "unet" / "config.json").write_text(json.dumps(sd15))
    text = CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
    cfg = {k: v for k, v in text.config.to_dict().items() if k in CLIPTextConfig().to_dict()}
    cfg.update(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(**cfg)).save_pretrained(out / "text_encoder")
    return out


def fake_unets():
    """Make ldmkit's SD family build every UNet it loads from its config with fake weights (see the docstring)."""
    from diffusers import UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from ldmkit.families.sd import SDFamily

    # allow_non_fake_inputs: real inputs (noise, text embeddings, LoRA weights) meet fake weights; a shape
    # environment lets the methods' loss.item() for their logs return a symbol instead of failing.
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())

    def load_denoiser(self, dtype=None):
        config = UNet2DConditionModel.load_config(self.root / "unet")
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype or self.denoiser_dtype)  # built in its dtype: fake tensors cannot be cast
        try:
            with mode:
                unet = UNet2DConditionModel.from_config(config)
        finally:
            torch.set_default_dtype(default)
        return unet.requires_grad_(False).eval()  # the family's _frozen, without its .to(device): on the CPU already

    SDFamily.load_denoiser = load_denoiser


def build_method(name: str, model: Path, out: Path, batch: int, latent: int, rank: int, checkpointing: bool, gan=True):
    """The method as ``ldmkit train`` builds it (config, accelerator at bf16, gradient checkpointing) and the
    loop's optimizer over its parameter groups."""
    from accelerate import Accelerator

    from ldmkit.methods import get_method, load_config
    from ldmkit.train.optim import make_optimizer

    overrides = [
        f"--method.name={name}",
        f"--model.pretrained={model}",
        f"--data.resolution={latent * 8}",
        f"--train.batch_size={batch}",
        "--train.mixed_precision=bf16",
        "--train.report_to=none",
        f"--output_dir={out}",
    ]
    if name == "dmd2_lora":
        overrides += [f"--method.lora_rank={rank}", f"--method.lora_alpha={rank}"]
    if not gan:
        overrides += ["--method.gen_cls_loss_weight=0", "--method.guidance_cls_loss_weight=0"]
    cfg = load_config(None, overrides)
    method = get_method(name)(cfg, Accelerator(mixed_precision="bf16"))
    if checkpointing:  # as the loop's _prepare does
        method.enable_gradient_checkpointing()
    # The loop's optimizer: AdamW with torch's fused kernel (train/optim.py), on a GPU as here; no temporaries.
    return method, make_optimizer(cfg, method.param_groups(), 1)


def batch_of(n: int, latent: int) -> dict:
    """A training batch of the data cache's kind (VAE latent moments, as the reference trains on stored latents)."""
    return {
        "latent_moments": torch.zeros(n, 8, latent, latent),
        "captions": [f"a photo of object {i}" for i in range(n)],
        "original_size": torch.tensor([[latent * 8] * 2] * n),
        "crop_top_left": torch.zeros(n, 2, dtype=torch.long),
        "seed": torch.arange(n),
        "key": [str(i) for i in range(n)],
    }


def one_step(method, optimizer, batch, tracker: LiveTensorBytes | None = None) -> tuple[int, int]:
    """One optimizer step as the loop takes it (loss, backward, per-group clipping, step, zero_grad); (bytes the
    loss holds for its backward: activations, bytes of the trainable parameters' gradients after the backward)."""
    start = tracker.current if tracker is not None else 0
    trainable = [getattr(method, n) for n in method.trainable_names]
    # the loop's _optimizer_step: peft's input cast off under autocast (ldmkit.lora.adapters)
    with input_casts_off_under_autocast(trainable, method.accelerator.mixed_precision):
        loss, _ = method.loss(batch)
        held = tracker.current - start if tracker is not None else 0
        loss.backward()
    grads = 0
    for group in method.clip_groups():
        grads += sum(p.grad.untyped_storage().nbytes() for p in group if p.grad is not None)
        torch.nn.utils.clip_grad_norm_(group, method.cfg.train.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return held, grads


def child(name: str, model: Path, batch: int, latent: int, rank: int, checkpointing: bool, gan: bool) -> dict:
    """Memory of one method: resident parts after a warm-up step, then a tracked generator turn and fake-score turn."""
    fake_unets()
    with tempfile.TemporaryDirectory() as out:
        method, optimizer = build_method(name, model, Path(out), batch, latent, rank, checkpointing, gan)
        data = batch_of(batch, latent)
        one_step(method, optimizer, data)  # generator turn (step 0): every parameter gets optimizer state
        tracker = LiveTensorBytes()
        resident = tracker.census()
        result = {"resident": resident, "turns": {}}
        for turn, step in (("fake_score", 1), ("generator", method.mcfg.dfake_gen_update_ratio)):
            method.after_step(step)
            start = tracker.current
            tracker.peak = start
            with tracker.mode:
                held, grads = one_step(method, optimizer, data, tracker)
            result["turns"][turn] = {"peak": tracker.peak, "start": start, "activations": held, "grads": grads}
    return result


def table(rows: list[tuple[str, str, dict]]) -> str:
    """Markdown table, GB: weights, gradients, optimizer state, activations (what the loss holds for its
    backward), the step's peak (everything live at its highest point), and dmd2_lora's peak over dmd2's."""
    lines = [
        "| setting | method | weights | grads | optimizer | activations | step peak | lora / full |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    totals = {}
    for setting, name, r in rows:
        res = r["resident"]
        turn = max(r["turns"].values(), key=lambda t: t["peak"])  # the heavier turn (the generator's)
        grads = max(t["grads"] for t in r["turns"].values())
        acts = max(t["activations"] for t in r["turns"].values())
        totals[setting, name] = turn["peak"]
        ratio = ""
        if name == "dmd2_lora" and (setting, "dmd2") in totals:
            ratio = f"{turn['peak'] / totals[setting, 'dmd2']:.2f}"
        cells = [res["weights"], grads, res["optimizer"], acts, turn["peak"]]
        lines.append(f"| {setting} | {name} | " + " | ".join(f"{c / GB:.2f}" for c in cells) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--settings",
        default="2:off,2:on,32:off,32:on",
        help="Comma-separated BATCH:CHECKPOINTING[:nogan] settings (checkpointing on/off, as "
        "train.gradient_checkpointing; nogan: without the GAN term); default: batch 2 and the reference's batch "
        "32 per GPU (tianweiy/DMD2 experiments/sdv1.5, which trains with gradient checkpointing), each without "
        "and with gradient checkpointing.",
    )
    p.add_argument("--latent", type=int, default=64, help="Latent side (64: SD1.5's 512 px).")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (alpha = rank) of dmd2_lora's two adapters.")
    p.add_argument("--json", help="Also write the measurements here.")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.child:
        name, model, batch, ckpt, gan, out = args.child
        r = child(name, Path(model), int(batch), args.latent, args.rank, ckpt == "on", gan != "nogan")
        Path(out).write_text(json.dumps(r))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="ldmkit-dmd2-memory-") as tmp:
        model = write_sd15_folder(Path(tmp) / "model")
        for setting in args.settings.split(","):
            batch, ckpt, gan = (setting.split(":") + ["gan"])[:3]
            label = f"batch {batch}, {args.latent}x{args.latent} latents" + (
                ", grad. checkpointing" if ckpt == "on" else ""
            )
            label += ", no GAN term" if gan == "nogan" else ""
            for name in ("dmd2", "dmd2_lora"):  # full first: the LoRA row carries the ratio
                out = Path(tmp) / f"{name}-{batch}-{ckpt}-{gan}.json"
                cmd = [sys.executable, __file__, "--latent", str(args.latent), "--rank", str(args.rank)]
                subprocess.run([*cmd, "--child", name, str(model), batch, ckpt, gan, str(out)], check=True)
                rows.append((label, name, json.loads(out.read_text())))
    print(
        f"DMD2 memory at SD1.5 size (GB; bf16 frozen weights, fp32 trainable weights and AdamW state; LoRA rank {args.rank})"
    )
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([{"setting": s, "method": n, **r} for s, n, r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
