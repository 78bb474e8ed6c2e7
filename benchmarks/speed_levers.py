"""The step speed of train.compile and train.channels_last against the plain step (README, "What each lever
contributed").

    python benchmarks/speed_levers.py --lever compile|channels_last [--method lcm_lora|lcd] [--steps 20] [--cache]

Two copies of the method are built in this one process on the small SD1.5-layout model of
benchmarks/lcm_throughput.py (the same seed, the same batch); the lever is applied to one of them the way the
training loop applies it (``train.loop.apply_speed_levers``), and their training steps (loss, backward, fused
AdamW, after_step) alternate, so machine noise hits both alike. Prints the seconds the lever's first step took
(for compile: compiling the student, teacher and target), the median step time of each after 2 warm-up steps,
their ratio, the time saved per step and after how many steps the first step's extra time is paid back.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lever", choices=("compile", "channels_last"), required=True)
    p.add_argument("--method", choices=("lcm_lora", "lcd"), default="lcm_lora")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--cache", action="store_true", help="feed cached latents and prompt embeddings (data.cache)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).parent))
    from accelerate import Accelerator
    from lcm_throughput import _batch, build_model

    from ldmkit.methods import get_method, load_config
    from ldmkit.train.loop import apply_speed_levers

    model = build_model(Path(tempfile.mkdtemp(prefix="ldmkit-speed-levers-")) / "model")
    knobs = (
        [f"--method.lora_rank={args.rank}", f"--method.lora_alpha={args.rank}"]
        if args.method == "lcm_lora"
        else ["--method.unet_time_cond_proj_dim=256"]
    )
    methods, batches, first_step = {}, {}, {}
    for lever in (False, True):
        torch.manual_seed(0)
        cfg = load_config(
            None,
            [
                f"--method.name={args.method}",
                f"--model.pretrained={model}",
                f"--data.resolution={args.resolution}",
                *knobs,
                "--train.report_to=none",
            ],
        )
        method = get_method(args.method)(cfg, Accelerator(cpu=not torch.cuda.is_available()))
        batch = _batch(args.batch, args.resolution)
        if args.cache:
            enc = method.encoders()
            with torch.no_grad():
                batch = {
                    **{k: v for k, v in batch.items() if k != "pixel_values"},
                    "latent_moments": enc.encode_images(batch["pixel_values"]).cpu(),
                    "prompt_embeds": enc.encode_prompts(batch["captions"])["prompt_embeds"].cpu(),
                }
        if lever:
            apply_speed_levers(
                dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **{args.lever: True})), method
            )
        methods[lever], batches[lever] = method, batch

    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-6, fused=True) for k, m in methods.items()}
    step_times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.steps + 2):
        for lever in (False, True) if i % 2 == 0 else (True, False):  # alternate which goes first
            method, opt = methods[lever], optimizers[lever]
            t0 = time.perf_counter()
            loss, _ = method.loss(batches[lever])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            method.after_step(i)
            elapsed = time.perf_counter() - t0
            if i == 0:
                first_step[lever] = elapsed
            if i >= 2:
                step_times[lever].append(elapsed)

    plain, lever = statistics.median(step_times[False]), statistics.median(step_times[True])
    print(
        f"{args.method}, small SD1.5-layout UNet, {args.resolution} px, batch {args.batch}, "
        f"{'cached' if args.cache else 'uncached'} data, {args.threads} thread(s), torch {torch.__version__}, "
        f"{args.steps} steps each, alternated"
    )
    print(f"first step: plain {first_step[False]:.1f} s, {args.lever} {first_step[True]:.1f} s")
    print(f"median step: plain {plain * 1e3:.1f} ms, {args.lever} {lever * 1e3:.1f} ms: {plain / lever:.2f}x the speed")
    saved = plain - lever
    if saved > 0:
        extra = first_step[True] - first_step[False]
        print(
            f"saves {saved * 1e3:.1f} ms a step; the first step's extra {extra:.0f} s is paid back after {extra / saved:.0f} steps"
        )
    else:
        print(f"no time saved per step ({-saved * 1e3:.1f} ms slower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
