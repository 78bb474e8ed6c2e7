"""``ldmkit prepare features``: encode a dataset into U-ViT's MS-COCO feature layout (data/features.py).

Like baofff/U-ViT ``scripts/extract_mscoco_feature.py``: every image is resized (shorter side) and
centre-cropped to ``--resolution``, scaled to [-1, 1] and encoded to VAE posterior moments; every caption
of it is encoded by the text encoder (last hidden state); ``empty_context.npy`` is the embedding of "".
Any source of the data layer works (image folder, metadata.jsonl, WebDataset, PaddleMIX file list):
the sample at position i of the source becomes ``{i}.npy`` / ``{i}_{k}.npy``.

Resumable: a sample whose ``{i}.npy`` exists is skipped without decoding its image. ``{i}.npy`` is
written last for each sample and atomically, so its presence means the sample is complete.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ldmkit.data.features import CAPTIONS_FILE, EMPTY_CONTEXT
from ldmkit.data.transforms import Draws, ImageTransform, RawSample

logger = logging.getLogger(__name__)


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def prepare_features(
    encoders: Any,
    samples: Iterator[tuple[int, Callable[[], RawSample | None]]],
    out: str | Path,
    *,
    transform: ImageTransform,
    split: str = "train",
    batch_size: int = 32,
    total: int | None = None,
) -> dict[str, int]:
    """Encode ``samples`` ((position, load) pairs of a data-layer reader's ``lazy_samples()``) with
    ``encoders`` (``encode_images`` / ``encode_prompts``, e.g. a model family of ldmkit.families) into ``out``.

    Returns counts: ``written``, ``skipped`` (already present), ``unreadable``.
    """
    out = Path(out)
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    done = {int(p.stem) for p in split_dir.glob("*.npy") if p.stem.isdigit()}
    counts = {"written": 0, "skipped": 0, "unreadable": 0}

    with torch.no_grad():
        if not (out / EMPTY_CONTEXT).is_file():
            _save_npy(out / EMPTY_CONTEXT, encoders.encode_prompts([""])["prompt_embeds"][0].float().cpu().numpy())
        pending: list[tuple[int, RawSample]] = []

        def flush() -> None:
            pixels = torch.stack(
                [transform(raw.image, Draws.from_seed(0), flip=False).pixel_values for _, raw in pending]
            )
            moments = encoders.encode_images(pixels).float().cpu().numpy()  # (B, 2C, h, w)
            texts = [c for _, raw in pending for c in raw.captions]
            contexts = encoders.encode_prompts(texts)["prompt_embeds"].float().cpu().numpy()  # (sum K, L, D)
            row = 0
            with open(split_dir / CAPTIONS_FILE, "a", encoding="utf-8") as captions_file:
                for (i, raw), m in zip(pending, moments):
                    for k in range(len(raw.captions)):
                        _save_npy(split_dir / f"{i}_{k}.npy", contexts[row + k])
                    row += len(raw.captions)
                    captions_file.write(json.dumps({"id": i, "key": raw.key, "captions": raw.captions}) + "\n")
                    captions_file.flush()
                    _save_npy(split_dir / f"{i}.npy", m)  # last: marks sample i complete
            counts["written"] += len(pending)
            pending.clear()

        for i, load in tqdm(samples, total=total, desc=f"features {split}", unit="img", dynamic_ncols=True):
            if i in done:
                counts["skipped"] += 1
                continue
            raw = load()
            if raw is None:
                counts["unreadable"] += 1
                continue
            pending.append((i, raw))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    if counts["unreadable"]:
        logger.warning("%d unreadable samples were left out", counts["unreadable"])
    return counts
