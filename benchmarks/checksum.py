"""What the checkpoint checksums cost at SD1.5 size: XXH3-128 (ldmkit.outputs.checksum) over a full-size
random SD1.5 UNet state dict, in memory and as the saved file, against the time to write that file.

    python benchmarks/checksum.py [--dtype fp32|fp16] [--repeats 3] [--dir /tmp]

The UNet is built from SD1.5's UNet config (diffusers UNet2DConditionModel, 859.5M parameters) on the meta
device, then every tensor is filled with random values, so nothing is downloaded. "write" is safetensors'
save_file plus fsync (what a checkpoint does); "hash file" is ldmkit.outputs.checksum reading the file back
(from the page cache, as right after a checkpoint is written; a cold read is disk-bound); "hash memory" is
XXH3-128 over the tensors' bytes. Median of --repeats runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import xxhash

# SD1.5's unet/config.json (runwayml/stable-diffusion-v1-5), the fields that set the weights' shapes.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)


def random_unet_state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET)
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g).to(dtype) for k, v in unet.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="Folder for the saved file (default: the system temp folder).")
    args = parser.parse_args()
    from safetensors.torch import save_file

    from ldmkit.outputs import checksum

    state = random_unet_state(torch.float32 if args.dtype == "fp32" else torch.float16)
    params = sum(v.numel() for v in state.values())
    size = sum(v.numel() * v.element_size() for v in state.values())
    mb = size / 1e6
    print(f"SD1.5 UNet: {params / 1e6:.1f}M parameters, {args.dtype}: {size / 1e9:.2f} GB")

    def hash_memory() -> None:
        h = xxhash.xxh3_128()
        for v in state.values():
            h.update(v.contiguous().view(torch.uint8).numpy())
        h.hexdigest()

    times: dict[str, list[float]] = {"write": [], "hash file": [], "hash memory": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "unet.safetensors"
        for _ in range(args.repeats):
            t = time.perf_counter()
            save_file(state, str(path))
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            times["write"].append(time.perf_counter() - t)
            t = time.perf_counter()
            checksum(path)
            times["hash file"].append(time.perf_counter() - t)
            t = time.perf_counter()
            hash_memory()
            times["hash memory"].append(time.perf_counter() - t)
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"{name:<12} {s:6.2f} s  {mb / s:8.0f} MB/s")
    print(
        f"checksum / write: {statistics.median(times['hash file']) / statistics.median(times['write']):.2f} "
        "(the checksums add this fraction to a checkpoint's save time)"
    )


if __name__ == "__main__":
    main()
