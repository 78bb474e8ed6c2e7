"""AdamW's step on the CPU: foreach (multi-tensor), the per-tensor loop and the fused kernel, side by side.

    python benchmarks/optimizer_step.py [--model small|lora] [--threads 1] [--repeats 20]

The parameters are those of a real training job: ``small`` the full UNet of benchmarks/vs_diffusers.py's
SD1.5-layout model (17.7M parameters, what full LCD trains), ``lora`` its rank-16 LoRA (what LCM-LoRA trains). Each
variant steps the same parameters with the same gradients; times are the median of ``--repeats`` steps after
two warm-up steps, variants interleaved round by round. Also checks that the three give the same weights (they
differ only in rounding).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {"foreach": dict(foreach=True), "per-tensor": dict(foreach=False), "fused": dict(fused=True)}


def parameters(kind: str) -> list[torch.Tensor]:
    sys.path.insert(0, str(Path(__file__).parent))
    from diffusers import UNet2DConditionModel
    from lcm_throughput import build_model

    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp))
        unet = UNet2DConditionModel.from_pretrained(tmp, subfolder="unet")
    if kind == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        targets = [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "proj_in",
            "proj_out",
            "ff.net.0.proj",
            "ff.net.2",
            "conv1",
            "conv2",
        ]
        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=targets))
    return [p.detach().clone() for p in unet.parameters() if p.requires_grad]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("small", "lora"), default="small")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = parameters(args.model)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(t.shape, generator=g) * 1e-3 for t in base]
    params, opts = {}, {}
    for name, kw in VARIANTS.items():
        params[name] = [torch.nn.Parameter(t.clone()) for t in base]
        for q, gr in zip(params[name], grads):
            q.grad = gr.clone()
        opts[name] = torch.optim.AdamW(params[name], lr=1e-4, weight_decay=1e-2, **kw)
    times: dict[str, list[float]] = {n: [] for n in VARIANTS}
    for r in range(args.repeats + 2):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    n = sum(t.numel() for t in base)
    print(
        f"AdamW step, {args.model}: {len(base)} tensors, {n / 1e6:.2f}M parameters, {args.threads} thread(s), torch {torch.__version__}"
    )
    ref = statistics.median(times["foreach"])
    for name in VARIANTS:
        ms = statistics.median(times[name]) * 1e3
        diff = max((a - b).abs().max().item() for a, b in zip(params[name], params["foreach"]))
        print(
            f"  {name:10s} {ms:8.1f} ms/step  {ref * 1e3 / ms:5.2f}x foreach's speed   max |w - w_foreach| {diff:.1e}"
        )


if __name__ == "__main__":
    main()
