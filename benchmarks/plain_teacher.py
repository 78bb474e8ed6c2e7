"""LCM-LoRA's teacher pass with and without peft's wrappers (``method.plain_teacher``, issue 14).

    python benchmarks/plain_teacher.py [--batch 8] [--resolution 64] [--rank 16] [--steps 20] [--cache]

The LCM-LoRA teacher is the base denoiser. With ``method.plain_teacher=false`` it is the adapted denoiser with
its adapters disabled: every targeted layer still goes through peft's wrapper (a Python call, the adapter
checks, then the base layer). With ``true`` (the default) it is a module tree without the adapters that holds
the very same weight tensors. Both methods are built in this one process on the small SD1.5-layout model of
benchmarks/lcm_throughput.py and their training steps (loss, backward, AdamW, after_step) alternate, so machine
noise hits both alike; it prints the median step time and the median time of the teacher's passes for each,
and their ratios (the teacher's block of the loss: its passes and the DDIM step), and the bytes of distinct weight storages each method holds (the plain teacher adds none).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def storage_bytes(modules) -> int:
    """Bytes of the distinct storages behind the modules' parameters and buffers (shared ones counted once)."""
    seen: dict[int, int] = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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

    tmp = Path(tempfile.mkdtemp(prefix="ldmkit-plain-teacher-"))
    model = build_model(tmp / "model")
    methods, batches, teacher_time = {}, {}, {}
    for plain in (False, True):
        torch.manual_seed(0)
        cfg = load_config(
            None,
            [
                "--method.name=lcm_lora",
                f"--model.pretrained={model}",
                f"--data.resolution={args.resolution}",
                f"--method.lora_rank={args.rank}",
                f"--method.lora_alpha={args.rank}",
                f"--method.plain_teacher={str(plain).lower()}",
                "--train.report_to=none",
            ],
        )
        method = get_method("lcm_lora")(cfg, Accelerator(cpu=not torch.cuda.is_available()))
        batch = _batch(args.batch, args.resolution)
        if args.cache:
            enc = method.encoders()
            with torch.no_grad():
                batch = {
                    **{k: v for k, v in batch.items() if k != "pixel_values"},
                    "latent_moments": enc.encode_images(batch["pixel_values"]).cpu(),
                    "prompt_embeds": enc.encode_prompts(batch["captions"])["prompt_embeds"].cpu(),
                }
        methods[plain], batches[plain], teacher_time[plain] = method, batch, []
        # The teacher's block of the loss (step 6: its passes and the DDIM step) timed the same way for both: around
        # Roles.teacher_context (adapters disabled, or nothing for the plain copy).
        roles = method.roles()

        @contextlib.contextmanager
        def timed_teacher(_inner=roles.teacher_context, _list=teacher_time[plain]):
            t0 = time.perf_counter()
            with _inner():
                yield
            _list.append(time.perf_counter() - t0)

        method.roles = lambda _r=roles, _c=timed_teacher: dataclasses.replace(_r, teacher_context=_c)

    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-6, fused=True) for k, m in methods.items()}
    step_times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.steps + 2):
        for plain in (False, True) if i % 2 == 0 else (True, False):  # alternate which goes first
            method, opt = methods[plain], optimizers[plain]
            t0 = time.perf_counter()
            loss, _ = method.loss(batches[plain])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            method.after_step(i)
            if i >= 2:
                step_times[plain].append(time.perf_counter() - t0)
            else:
                teacher_time[plain].clear()

    print(
        f"lcm_lora, small SD1.5-layout UNet, {args.resolution} px, batch {args.batch}, rank {args.rank}, "
        f"{'cached' if args.cache else 'uncached'} data, {args.threads} thread(s), {args.steps} steps each, alternated"
    )
    print(f"{'teacher':<34} {'step ms':>8} {'teacher ms':>11} {'weights MiB':>12}")
    for plain in (False, True):
        m = methods[plain]
        mods = [m.unet] + ([m.teacher_unet] if m.teacher_unet is not None else [])
        label = "plain copy sharing the weights" if plain else "adapters disabled (peft wrappers)"
        print(
            f"{label:<34} {statistics.median(step_times[plain]) * 1e3:8.1f} {statistics.median(teacher_time[plain]) * 1e3:11.1f} "
            f"{storage_bytes(mods) / 2**20:12.2f}"
        )
    print(
        f"plain / disabled: step {statistics.median(step_times[False]) / statistics.median(step_times[True]):.2f}x faster, teacher pass "
        f"{statistics.median(teacher_time[False]) / statistics.median(teacher_time[True]):.2f}x faster"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
