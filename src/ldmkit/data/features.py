"""Precomputed features in U-ViT's MS-COCO layout (baofff/U-ViT ``scripts/extract_mscoco_feature.py``,
``datasets.py`` MSCOCOFeatureDataset), as published (``coco256_features``) or written by
``ldmkit prepare features``::

    <root>/empty_context.npy       [L, D]   text embedding of "" (the CFG-dropout context)
    <root>/<split>/{i}.npy         [2C,h,w] VAE posterior moments (mean, logvar), unscaled
    <root>/<split>/{i}_{k}.npy     [L, D]   text embedding of caption k of sample i (k = 0..K_i-1)
    <root>/<split>/captions.jsonl  {"id": i, "captions": [...]} per line (ours; optional)
    <root>/meta.json               {"resolution": ...} (ours; optional)

``split`` is ``train`` or ``val``. The published ``run_vis/`` prompt files are pickled (prompt, context)
tuples, which we do not load (no pickle); ldmkit's validation encodes train.validation_prompts instead.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ldmkit.data.transforms import Draws, choose_caption
from ldmkit.errors import UserError

if TYPE_CHECKING:
    from ldmkit.config import DataConfig

logger = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.jsonl"
META_FILE = "meta.json"
EMPTY_CONTEXT = "empty_context.npy"


def scan_split(split_dir: Path) -> dict[int, int]:
    """{sample id: number of contexts K} of a split folder, from one directory listing.

    Contexts must be ``{i}_0.npy .. {i}_{K-1}.npy`` without gaps (UserError otherwise).
    """
    ids: set[int] = set()
    contexts: dict[int, list[int]] = {}
    with os.scandir(split_dir) as it:
        for entry in it:
            stem, ext = os.path.splitext(entry.name)
            if ext != ".npy":
                continue
            if stem.isdigit():
                ids.add(int(stem))
            else:
                i, _, k = stem.partition("_")
                if i.isdigit() and k.isdigit():
                    contexts.setdefault(int(i), []).append(int(k))
    counts = {}
    for i in ids:
        ks = contexts.get(i, [])
        if ks and max(ks) + 1 != len(ks):
            raise UserError(
                f"{split_dir}: sample {i} has contexts {sorted(ks)}; expected {i}_0.npy .. {i}_{len(ks) - 1}.npy"
            )
        counts[i] = len(ks)
    return counts


def read_captions(split_dir: Path) -> dict[int, list[str]]:
    """Captions per sample id from captions.jsonl (later lines win: a resumed prepare may repeat ids)."""
    path = split_dir / CAPTIONS_FILE
    out: dict[int, list[str]] = {}
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    out[int(row["id"])] = list(row["captions"])
    return out


class FeatureDataset(Dataset):
    """Map-style dataset over a feature folder: ``dataset[(index, seed)]`` -> one encoded sample.

    Each step picks one of the sample's contexts and, with probability ``proportion_empty_prompts``,
    replaces it by ``empty_context`` (U-ViT's CFGDataset), using the same ``Draws`` of the seed as the
    image readers (data/transforms.py), so the choice is reproducible on any number of processes.
    """

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        proportion_empty_prompts: float = 0.0,
        max_samples: int | None = None,
    ):
        self.root = Path(path)
        self.split_dir = self.root / split
        if not self.split_dir.is_dir():
            raise UserError(f"feature folder has no '{split}' split: {self.split_dir}")
        self.p_empty = proportion_empty_prompts
        counts = scan_split(self.split_dir)
        missing = [i for i, k in counts.items() if k == 0]
        if missing:
            raise UserError(
                f"{self.split_dir}: sample {min(missing)} (and {len(missing) - 1} more) has no {{i}}_{{k}}.npy context"
            )
        self.ids = sorted(counts)[:max_samples]
        if not self.ids:
            raise UserError(f"no features ({{i}}.npy) in {self.split_dir}")
        self.num_contexts = [counts[i] for i in self.ids]
        empty_path = self.root / EMPTY_CONTEXT
        if not empty_path.is_file():
            raise UserError(f"feature folder has no {EMPTY_CONTEXT}: {self.root}")
        self.empty_context = torch.from_numpy(np.load(empty_path, allow_pickle=False))
        self.captions = read_captions(self.split_dir)
        meta = self.root / META_FILE
        self.resolution = json.loads(meta.read_text()).get("resolution") if meta.is_file() else None

    @classmethod
    def from_config(cls, cfg: DataConfig, split: str = "train") -> FeatureDataset:
        return cls(cfg.path, split, cfg.proportion_empty_prompts, cfg.max_samples)

    def __len__(self) -> int:
        return len(self.ids)

    def _load(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.load(self.split_dir / name, allow_pickle=False))

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, seed = item
        i = self.ids[index]
        moments = self._load(f"{i}.npy").float()  # (2C, h, w)
        captions = self.captions.get(i) or [""] * self.num_contexts[index]
        if len(captions) != self.num_contexts[index]:
            captions = [""] * self.num_contexts[index]  # captions file out of step with contexts: drop texts
        caption, k = choose_caption(captions, Draws.from_seed(seed), self.p_empty)
        context = self.empty_context if k is None else self._load(f"{i}_{k}.npy")  # (L, D)
        # The published features are KL-f8 latents of square 256 px crops.
        size = [self.resolution] * 2 if self.resolution else [8 * moments.shape[-2], 8 * moments.shape[-1]]
        return {
            "latent_moments": moments,
            "prompt_embeds": context.float(),
            "captions": caption,
            "original_size": torch.tensor(size, dtype=torch.int64),
            "crop_top_left": torch.zeros(2, dtype=torch.int64),
            "seed": int(seed),
            "key": str(i),
        }
