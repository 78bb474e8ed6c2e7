"""Command arguments checked where they enter, each bad one a UserError naming the option: devices against
what this torch offers, numbers that must be finite, image sizes against a memory estimate before anything
is allocated, paths that must be files or folders.

Foundation (docs/DESIGN.md, Layers): imports nothing of ldmkit but ``errors``; torch only inside functions.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ldmkit.errors import UserError


def check_device(name: str | None, option: str = "--device") -> None:
    """``auto`` (or None), or a device torch knows and this machine has: ``torch.device`` parses the name
    (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...) and the backend says whether it is there; otherwise the
    error would come from deep inside the first ``.to(device)`` as a traceback."""
    if name in (None, "auto"):
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{option} {name!r} is not a device torch knows (auto, cpu, cuda, cuda:N, mps, ...)") from None
    if device.type == "cpu" or device.type == "meta":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{option} {name}: this machine or this torch build has no CUDA GPU; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return
    backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise UserError(f"{option} {name}: no {device.type} device is available here; use cpu or auto")


SEED_LIMIT = 2**63
"""Seeds are in [0, 2**63): torch.Generator.manual_seed overflows beyond (a traceback), and train.seed, which
numpy also takes, is in [0, 2**32) (config.py)."""


def check_seed(option: str, value: int | None) -> None:
    if value is not None and not 0 <= value < SEED_LIMIT:
        raise UserError(f"{option} must be in [0, 2**63), got {value}")


def check_finite(option: str, value: float | None, *, positive: bool = False) -> None:
    """``value`` is a finite number (``nan`` and ``inf`` parse as floats), and > 0 with ``positive``."""
    if value is None:
        return
    if not math.isfinite(value) or (positive and value <= 0):
        raise UserError(f"{option} must be a {'positive ' if positive else ''}finite number, got {value}")


# Bytes per output pixel of the largest activation set of an SD-family VAE decoder at full resolution: its
# last up block holds 128 channels (diffusers AutoencoderKL, block_out_channels[0]) in fp32, and a ResNet
# block keeps about three such tensors alive (input, hidden, output). The UNet works at 1/64 of the pixels.
DECODER_BYTES_PER_PIXEL = 128 * 4 * 3


def available_memory(device: str | None = None) -> int | None:
    """Bytes free for tensors on ``device``: the GPU's free memory for CUDA, else the host's
    ``MemAvailable`` (Linux) or physical memory; None when unknown."""
    if device and str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_image_size(height: int | None, width: int | None, images: int = 1, device: str | None = None) -> None:
    """Refuse a size whose decoding alone would not fit in memory (a width of 1e8 was killed by the kernel
    with no message): ``images`` x height x width x ``DECODER_BYTES_PER_PIXEL`` against what is free."""
    for option, value in (("--height", height), ("--width", width)):
        if value is not None and value < 1:
            raise UserError(f"{option} must be positive, got {value}")
    if height is None and width is None:
        return
    h, w = height or width, width or height
    check_memory(
        f"--height {h} x --width {w}", images * h * w * DECODER_BYTES_PER_PIXEL, f"decode {images} image(s)", device
    )


def check_memory(what: str, need: int, purpose: str, device: str | None = None) -> None:
    """UserError when ``need`` bytes (an estimate, for ``purpose``) exceed what is free on ``device``."""
    free = available_memory(device)
    if free is not None and need > free:
        raise UserError(
            f"{what} would need about {need / 2**30:.1f} GiB to {purpose}, more than the "
            f"{free / 2**30:.1f} GiB free: choose a smaller size"
        )


def check_path(path: str | Path, option: str, kind: str = "file") -> Path:
    """``path`` exists and is a ``file`` / ``folder``: one line naming the option otherwise."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{option} {p} not found")
    if kind == "file" and not p.is_file():
        raise UserError(f"{option} {p} is a folder; give a file")
    if kind == "folder" and not p.is_dir():
        raise UserError(f"{option} {p} is a file; give a folder")
    return p


def check_safetensors(path: str | Path, option: str) -> Path:
    """A ``.safetensors`` file that is not empty and whose header reads (safetensors' own parser), before a
    loader deep in diffusers fails on it with a traceback."""
    p = check_path(path, option, "file")
    if p.suffix != ".safetensors":
        return p
    if p.stat().st_size == 0:
        raise UserError(f"{option} {p} is empty (0 bytes)")
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt"):
            pass
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ValueError ...
        raise UserError(f"{option} {p} is not a readable safetensors file ({type(e).__name__})") from None
    return p


def check_arguments(
    args,
    *,
    devices: tuple[str, ...] = (),
    seeds: tuple[str, ...] = (),
    finite: tuple[str, ...] = (),
    positive: tuple[str, ...] = (),
    counts: tuple[str, ...] = (),
    files: tuple[str, ...] = (),
    folders: tuple[str, ...] = (),
) -> None:
    """The checks above on a command's parsed ``args``, by option name (``--feature-net`` is
    ``args.feature_net``); options left at None are skipped. One call per command keeps them in one place."""

    def value(option: str):
        return getattr(args, option.lstrip("-").replace("-", "_"), None)

    for option in devices:
        check_device(value(option), option)
    for option in seeds:
        check_seed(option, value(option))
    for option in finite:
        check_finite(option, value(option))
    for option in positive:
        check_finite(option, value(option), positive=True)
    for option in counts:
        if value(option) is not None and value(option) < 1:
            raise UserError(f"{option} must be >= 1, got {value(option)}")
    for kind, options in (("file", files), ("folder", folders)):
        for option in options:
            if value(option) is not None:
                check_path(value(option), option, kind)
