"""Helpers of the data-layer tests: the same samples written in every layout, and fake encoders."""

from __future__ import annotations

import base64
import gzip
import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.config import DataConfig

SIZES = [(40, 56), (56, 40), (48, 48), (36, 64), (64, 36), (40, 40), (50, 70), (33, 47)]  # (w, h)
EXTS = ["png", "png", "jpg", "webp", "png", "jpg", "png", "png"]


def make_items(n: int = 8, multi: bool = False, seed: int = 0) -> list[tuple[str, bytes, str, list[str]]]:
    """(key, encoded image bytes, extension, captions) of n noise images of various sizes."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        ext = EXTS[i % len(EXTS)]
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format={"jpg": "JPEG"}.get(ext, ext.upper()))
        caps = [f"caption {i} a"] + ([f"caption {i} b", f"caption {i} c"] if multi and i % 2 == 0 else [])
        items.append((f"img{i:03d}", buf.getvalue(), ext, caps))
    return items


def write_folder(root: Path, items) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for key, data, ext, caps in items:
        (root / f"{key}.{ext}").write_bytes(data)
        (root / f"{key}.txt").write_text("\n".join(caps) + "\n")
    return root


def write_imagefolder(root: Path, items) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for key, data, ext, caps in items:
            (root / f"{key}.{ext}").write_bytes(data)
            f.write(json.dumps({"file_name": f"{key}.{ext}", "text": caps if len(caps) > 1 else caps[0]}) + "\n")
    return root


def write_tar(path: Path, items) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, data, ext, caps in items:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.txt", "\n".join(caps).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return path


def write_wds(root: Path, items, per_shard: int = 3) -> Path:
    for s in range(0, len(items), per_shard):
        write_tar(root / f"shard-{s // per_shard:03d}.tar", items[s : s + per_shard])
    return root


def write_filelist(root: Path, items, parts: int = 2, weights: list[float] | None = None) -> Path:
    """items split over `parts` part files (odd ones gzipped), one *.filelist per part, one *.filelist.list."""
    root.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(items)), parts)
    list_lines = []
    for p, idx in enumerate(chunks):
        lines = "".join(f"{items[i][3][0]}\tph\t{base64.b64encode(items[i][1]).decode()}\n" for i in idx)
        part = root / "parts" / (f"part-{p}.txt.gz" if p % 2 else f"part-{p}.txt")
        part.parent.mkdir(exist_ok=True)
        if p % 2:
            with gzip.open(part, "wt") as f:
                f.write(lines)
        else:
            part.write_text(lines)
        (root / f"list{p}.filelist").write_text(f"parts/{part.name}\n")  # relative to the list's folder
        list_lines.append(f"list{p}.filelist" + (f" {weights[p]}" if weights else ""))
    path = root / "train.filelist.list"
    path.write_text("\n".join(list_lines) + "\n")
    return path


def data_cfg(path, **kw) -> DataConfig:
    return replace(DataConfig(path=str(path), resolution=32, num_workers=0), **kw)


class FakeEncoders:
    """Stands in for a model family (its three encoder methods): a fixed random stride-2 conv as the VAE encoder
    (moments [B, 8, H/2, W/2]) and a fixed byte-embedding table as the text encoder. Plain torch: importing
    diffusers would cost ~10 s of the test budget and the cache only stores what the encoders return."""

    def __init__(self, fail_after: int | None = None):
        torch.manual_seed(0)
        self.vae = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1).eval()
        self.table = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
        self.image_calls = 0
        self.prompt_calls = 0
        self.fail_after = fail_after

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.image_calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.image_calls += 1
        return self.vae(pixel_values).float()

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.prompt_calls += 1
        tokens = torch.zeros(len(captions), 8, dtype=torch.long)
        for i, c in enumerate(captions):
            b = list(c.encode())[:8]
            tokens[i, : len(b)] = torch.tensor(b, dtype=torch.long)
        embeds = self.table[tokens]  # (B, 8, 16)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": embeds.mean(1)}

    def fingerprint(self) -> str:
        return "fake-encoders-v1"


@pytest.fixture(scope="session")
def items():
    return make_items(8)


@pytest.fixture(scope="session")
def layouts(tmp_path_factory, items):
    """The same 8 samples as folder, imagefolder, wds and filelist."""
    root = tmp_path_factory.mktemp("layouts")
    return {
        "folder": write_folder(root / "folder", items),
        "imagefolder": write_imagefolder(root / "imagefolder", items),
        "wds": write_wds(root / "wds", items),
        "filelist": write_filelist(root / "filelist", items),
    }


@pytest.fixture(scope="session")
def fake_encoders():
    return FakeEncoders()
