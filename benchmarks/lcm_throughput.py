"""Throughput of one LCD / LCM-LoRA training step, and what the optimisations buy.

    python benchmarks/lcm_throughput.py [--batch 8] [--resolution 64] [--steps 16] [--repeats 3]

For lcm_lora and lcd, on a small SD1.5-architecture model built locally, it measures every combination of
- data cache off (VAE + text encoder run every step) / on (precomputed latent moments + prompt embeds),
- teacher passes unbatched (cond and uncond as two forwards, as the references) / batched (one forward),
and prints samples/s, the ratio to the unoptimised form (cache off, unbatched), peak memory and the
UNet's share of the step time (UNet forwards timed with hooks + the backward, which only runs through
the UNet). Each combination runs in its own process so peak memory (ru_maxrss on CPU,
torch.cuda.max_memory_allocated on GPU) is that combination's alone. It also prints how many UNets each
method keeps in memory (LCM-LoRA: one; its teacher is the same UNet with the adapters disabled).

What the cache can save depends on what the VAE and text encoder cost next to the UNet, so the small
model keeps SD1.5's proportions: the script counts FLOPs per sample (torch FlopCounterMode on the meta
device) of SD1.5 at 512 px (UNet 803 GFLOPs per forward, VAE encoder 1117, CLIP ViT-L 13: encoders =
1.41 UNet forwards) and of the small model at 64 px (VAE (32, 32, 64, 64) x 2 layers and the 4-layer
text encoder = 1.40 UNet forwards), and prints both.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

METHODS = ("lcm_lora", "lcd")
VARIANTS = [(False, False), (False, True), (True, False), (True, True)]  # (cache, batched teacher)


def build_model(out: Path) -> Path:
    """A small random SD1.5-architecture pipeline: 3-level UNet (64, 128, 256), CLIP 4x64, KL-f8 VAE."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldmkit.models.tiny import _SCHEDULERS, byte_tokenizer, byte_vocab

    torch.manual_seed(0)
    n = len(byte_vocab())
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=n,
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=4,
            num_hidden_layers=4,
            max_position_embeddings=77,
            bos_token_id=n - 2,
            eos_token_id=n - 1,
            pad_token_id=n - 1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    # SD's VAE layout (4 levels, 2 layers per block, mid attention) at widths that give it SD1.5's cost
    # relative to the UNet (see encoder_cost).
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        norm_num_groups=32,
        latent_channels=4,
        sample_size=64,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=byte_tokenizer(),
        scheduler=PNDMScheduler.from_config(_SCHEDULERS["sd15"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def _gflops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def encoder_cost(unet, vae, text_encoder, resolution: int) -> dict[str, float]:
    """GFLOPs per sample of one UNet forward, one VAE encode and one prompt encode (77 tokens)."""
    ctx = unet.config.cross_attention_dim
    lat = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    return {
        "unet": _gflops(lambda: unet(torch.randn(1, 4, lat, lat), torch.tensor([500]), torch.randn(1, 77, ctx))),
        "vae": _gflops(lambda: vae.encode(torch.randn(1, 3, resolution, resolution))),
        "text": _gflops(lambda: text_encoder(torch.zeros(1, 77, dtype=torch.long))),
    }


def sd15_cost() -> dict[str, float]:
    """The same for SD1.5 at 512 px, built on the meta device (no weights, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8, sample_size=64
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            sample_size=512,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                max_position_embeddings=77,
            )
        )
        return encoder_cost(unet, vae, text, 512)


def _batch(n: int, res: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.rand(n, 3, res, res, generator=g) * 2 - 1,
        "captions": [f"a small red circle number {i} in the top left" for i in range(n)],
        "original_size": torch.tensor([[res, res]] * n),
        "crop_top_left": torch.zeros(n, 2, dtype=torch.long),
        "seed": torch.arange(n),
        "key": [str(i) for i in range(n)],
    }


def run_one(model: str, method_name: str, cache: bool, batched: bool, args) -> dict:
    """One combination, in this process: warm up, then time ``args.steps`` optimizer steps."""
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    from ldmkit.methods import get_method, load_config

    cuda = torch.cuda.is_available()
    overrides = [
        f"--method.name={method_name}",
        f"--model.pretrained={model}",
        f"--data.resolution={args.resolution}",
        f"--data.cache={str(cache).lower()}",
        f"--method.batch_teacher_passes={str(batched).lower()}",
        "--train.report_to=none",
        f"--train.mixed_precision={args.mixed_precision}",
    ]
    cfg = load_config(None, overrides)
    method = get_method(method_name)(cfg, Accelerator(cpu=not cuda, mixed_precision=args.mixed_precision))
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some lazily imported objects warns
        warnings.simplefilter("ignore")
        num_unets = sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects())

    batch = _batch(args.batch, args.resolution)
    if cache:  # what the data cache would hand over: VAE moments and prompt embeddings
        enc = method.encoders()
        with torch.no_grad():
            batch = {
                **{k: v for k, v in batch.items() if k not in ("pixel_values",)},
                "latent_moments": enc.encode_images(batch["pixel_values"]).cpu(),
                "prompt_embeds": enc.encode_prompts(batch["captions"])["prompt_embeds"].cpu(),
            }
        del enc
        gc.collect()
    batch = {k: v.to(method.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    unet_time = [0.0]
    started: dict[int, float] = {}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def pre(module, *_):
        sync()
        started[id(module)] = time.perf_counter()

    def post(module, *_):
        sync()
        unet_time[0] += time.perf_counter() - started.pop(id(module))

    for unet in {
        id(m): m
        for m in (method.unet, getattr(method, "teacher_unet", None), getattr(method, "target_unet", None))
        if m is not None
    }.values():
        unet.register_forward_pre_hook(pre)
        unet.register_forward_hook(post)

    opt = torch.optim.AdamW(method.parameters(), lr=1e-6)

    def step() -> float:
        loss, _ = method.loss(batch)
        sync()
        t0 = time.perf_counter()
        loss.backward()  # the backward runs through the student UNet only
        sync()
        backward = time.perf_counter() - t0
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_step(1)
        return backward

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    unet_time[0] = 0.0
    backward, step_times = 0.0, []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        backward += step()
        sync()
        step_times.append(time.perf_counter() - t0)
    elapsed = sum(step_times)
    # The median step, not the mean: one step that the machine stalls (another process, a page fault
    # storm) would otherwise move the whole figure.
    median_step = sorted(step_times)[len(step_times) // 2]
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "method": method_name,
        "cache": cache,
        "batched": batched,
        "samples_per_s": args.batch / median_step,
        "unet_share": (unet_time[0] + backward) / elapsed,
        "peak_mb": peak / 2**20,
        "num_unets": num_unets,
        "memory": "cuda allocated" if cuda else "process RSS",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="Samples per step.")
    p.add_argument("--resolution", type=int, default=64, help="Image side in pixels (latents are 1/8).")
    p.add_argument(
        "--steps", type=int, default=16, help="Timed steps per combination (samples/s from the median step)."
    )
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps first.")
    p.add_argument("--repeats", type=int, default=3, help="Interleaved rounds of all variants; the median is reported.")
    p.add_argument(
        "--mixed-precision", default="no", choices=("no", "fp16", "bf16"), help="accelerate mixed precision."
    )
    p.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset of lcm_lora,lcd.")
    p.add_argument("--model", default=None, help="Use this pipeline folder instead of building the small model.")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: method,cache,batched in a child process
    args = p.parse_args()

    if args.one:
        name, cache, batched = args.one.split(",")
        print(json.dumps(run_one(args.model, name, cache == "1", batched == "1", args)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_model(Path(tmp) / "model"))
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        ours = encoder_cost(
            UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
            AutoencoderKL.from_pretrained(model, subfolder="vae"),
            CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
            args.resolution,
        )
        # Rounds of all variants, interleaved, and the median per variant: a shared or throttling machine
        # drifts by tens of percent over minutes, which a single pass would book on whichever variant ran then.
        runs: dict[tuple, list[dict]] = {}
        for round_ in range(args.repeats):
            for name in args.methods.split(","):
                for cache, batched in VARIANTS:
                    cmd = [
                        sys.executable,
                        __file__,
                        "--one",
                        f"{name},{int(cache)},{int(batched)}",
                        "--model",
                        model,
                        "--batch",
                        str(args.batch),
                        "--resolution",
                        str(args.resolution),
                        "--steps",
                        str(args.steps),
                        "--warmup",
                        str(args.warmup),
                        "--mixed-precision",
                        args.mixed_precision,
                    ]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    runs.setdefault((name, cache, batched), []).append(json.loads(out.strip().splitlines()[-1]))
                    print(
                        f"  round {round_ + 1}: measured {name} cache={cache} batched_teacher={batched}",
                        file=sys.stderr,
                    )
        results = []
        for rs in runs.values():
            rs = sorted(rs, key=lambda r: r["samples_per_s"])
            results.append({**rs[len(rs) // 2], "spread": (rs[0]["samples_per_s"], rs[-1]["samples_per_s"])})

    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"LCD training step, batch {args.batch}, {args.resolution} px, {device}, mixed precision {args.mixed_precision}"
    )
    print(
        f"{'method':9} {'cache':6} {'teacher':10} {'samples/s':>10} {'(min-max)':>13} {'vs base':>8} {'peak MB':>9} {'UNet share':>11}"
    )
    for name in args.methods.split(","):
        rows = [r for r in results if r["method"] == name]
        base = next(r for r in rows if not r["cache"] and not r["batched"])["samples_per_s"]
        for r in rows:
            print(
                f"{name:9} {'on' if r['cache'] else 'off':6} {'batched' if r['batched'] else 'unbatched':10} "
                f"{r['samples_per_s']:10.2f} {r['spread'][0]:6.1f}-{r['spread'][1]:<6.1f} {r['samples_per_s'] / base:7.2f}x "
                f"{r['peak_mb']:9.0f} {r['unet_share']:10.0%}"
            )
    for name in args.methods.split(","):
        r = next(r for r in results if r["method"] == name)
        print(f"UNet modules in memory for {name}: {r['num_unets']}")
    print(
        f"(median step of {args.steps}, median of {args.repeats} interleaved rounds; peak memory = {results[0]['memory']}; "
        "'vs base' = samples/s relative to cache off + unbatched teacher)"
    )
    sd = sd15_cost()
    for label, c in ((f"this model, {args.resolution} px", ours), ("SD1.5, 512 px", sd)):
        print(
            f"GFLOPs per sample, {label}: UNet forward {c['unet']:.3g}, VAE encode {c['vae']:.3g} "
            f"({c['vae'] / c['unet']:.2f} UNet), text encoder {c['text']:.3g} ({c['text'] / c['unet']:.3f} UNet)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
