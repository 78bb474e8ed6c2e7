"""Do samples follow their captions? Two measures that work on any data, and the warning they feed.

1. **Caption sensitivity** (any captions): images of P prompts x S seeds, every prompt with the same S
   seeds. ``caption_distance`` is the mean RMS pixel difference between two prompts' images at the same
   seed, ``seed_distance`` the mean between two seeds' images of the same prompt; their ratio is the
   sensitivity. A model that ignores its captions draws the same image for every prompt at a fixed seed:
   sensitivity near 0. A model that follows them changes the image with the caption about as much as with
   the seed, or more (the caption fixes what the seed otherwise varies).
2. **Label accuracy** (data whose captions are a small set of labels, e.g. "a photo of a <label>"): a small
   CNN trained on part of the data's own images (held out from the teacher's training) judges whether each
   sample shows its prompt's label; its accuracy on real held-out images is reported next to it, so the
   number says how far samples are from the data, and chance (1 / labels) how far from ignoring captions.

``caption_warning`` turns both into one line for the report and the terminal, and ``caption_adherence``
measures one pipeline with both (the quickstart's report and ``ldmkit evaluate``).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

MIN_SENSITIVITY = 0.25
"""Below this caption sensitivity the samples barely depend on the caption: warn."""
MAX_LABELS = 50
MIN_IMAGES_PER_LABEL = 10
MAX_PROMPTS = 8
"""Prompts of the caption-sensitivity grid: 8 x SEEDS images per model keeps it a small share of an evaluation."""
SEEDS = 4
"""Seeds of every prompt in that grid."""


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def caption_sensitivity(images: Sequence[Sequence[Image.Image]]) -> dict[str, float]:
    """``images[p][s]``: prompt p at seed s (the same seeds for every prompt). Returns caption_distance,
    seed_distance and sensitivity = caption_distance / seed_distance (see the module docstring)."""
    x = np.stack([np.stack([_array(im) for im in row]) for row in images])  # (P, S, H, W, 3)
    P, S = x.shape[:2]
    if P < 2 or S < 2:
        raise ValueError(f"caption sensitivity needs >= 2 prompts and >= 2 seeds, got {P} x {S}")

    def rms(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(np.mean((a - b) ** 2)))

    across_captions = np.mean([rms(x[i, s], x[j, s]) for s in range(S) for i, j in itertools.combinations(range(P), 2)])
    across_seeds = np.mean([rms(x[p, s], x[p, t]) for p in range(P) for s, t in itertools.combinations(range(S), 2)])
    return {
        "caption_distance": float(across_captions),
        "seed_distance": float(across_seeds),
        "sensitivity": float(across_captions / max(across_seeds, 1e-12)),
    }


def generate_grid(
    generate: Callable[[str, int, int], list[Image.Image]], prompts: Sequence[str], seeds: int, seed: int = 0
) -> list[list[Image.Image]]:
    """``generate(prompt, num_images, seed)`` -> images seeded ``seed .. seed + num_images - 1`` (as
    ``ldmkit.inference.generate_images`` with one prompt); returns ``[prompt][seed]``."""
    return [generate(p, seeds, seed) for p in prompts]


def sensitivity_prompts(captions: Sequence[str], n: int = MAX_PROMPTS) -> list[str]:
    """Up to ``n`` distinct captions, spread evenly over their sorted list (on labelled data: labels across the
    alphabet rather than the first ``n``)."""
    distinct = sorted(set(captions))
    k = min(n, len(distinct))
    return [distinct[i * len(distinct) // k] for i in range(k)]


def representative_steps(steps: Sequence[int], at_most: int = 4) -> int:
    """The step count a few-step model is judged at: the largest of ``steps`` up to ``at_most``, else the
    smallest (one count keeps the measure cheap; 4 is where LCM-type samplers are usually run)."""
    return max((s for s in steps if s <= at_most), default=min(steps))


def labels_of(captions: Sequence[str]) -> list[str] | None:
    """The captions as labels, when the data is class-labelled: at most MAX_LABELS distinct captions, each
    with at least MIN_IMAGES_PER_LABEL images; else None (free-form captions: use caption sensitivity)."""
    counts = Counter(captions)
    if not 2 <= len(counts) <= MAX_LABELS or min(counts.values()) < MIN_IMAGES_PER_LABEL:
        return None
    return sorted(counts)


class LabelClassifier:
    """A small CNN over 32 x 32 greyscale-and-colour inputs: images -> one of ``classes``.

    Small on purpose: it must train in seconds on a CPU from a few hundred held-out images, and it only has
    to tell the data's labels apart, not judge quality.
    """

    def __init__(self, classes: Sequence[str], seed: int = 0, size: int = 32):
        self.classes = list(classes)
        self.size = size
        self.seed = seed
        with torch.random.fork_rng(devices=[]):  # the initial weights from ``seed``, the global RNG untouched
            torch.manual_seed(seed)
            self.net = self._build()

    def _build(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (32, 16, 16)
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (64, 8, 8)
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),  # (64, 2, 2)
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(256, len(self.classes)),
        )

    def _tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arr = np.stack(
            [np.asarray(im.convert("RGB").resize((self.size, self.size)), dtype=np.float32) for im in images]
        )
        return torch.from_numpy(arr / 127.5 - 1.0).permute(0, 3, 1, 2)  # (N, 3, size, size)

    def fit(self, images: Sequence[Image.Image], labels: Sequence[str], epochs: int = 30, batch_size: int = 64):
        x = self._tensor(images)
        y = torch.tensor([self.classes.index(label) for label in labels])
        g = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.AdamW(self.net.parameters(), lr=2e-3, weight_decay=1e-4)
        self.net.train()
        # Dropout draws from the global RNG: seeded here (and the caller's RNG left as it was), so the same
        # images give the same classifier in every process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for _ in range(epochs):
                order = torch.randperm(len(x), generator=g)
                for start in range(0, len(x), batch_size):
                    idx = order[start : start + batch_size]
                    # small random shifts: samples are never exactly where the held-out images put their glyphs
                    shift = [int(v) for v in torch.randint(-2, 3, (2,), generator=g)]
                    batch = torch.roll(x[idx], shifts=shift, dims=(2, 3))
                    loss = nn.functional.cross_entropy(self.net(batch), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        self.net.eval()
        return self

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image]) -> list[str]:
        logits = self.net(self._tensor(images))
        return [self.classes[i] for i in logits.argmax(dim=1).tolist()]

    def accuracy(self, images: Sequence[Image.Image], labels: Sequence[str]) -> float:
        return float(np.mean([p == t for p, t in zip(self.predict(images), labels)]))


def fit_label_classifier(
    labels: Sequence[str],
    images: Sequence[Image.Image],
    captions: Sequence[str],
    seed: int = 0,
    shuffle: bool = False,
) -> tuple[LabelClassifier, float]:
    """A LabelClassifier over ``labels`` trained on the first 3/4 of (images, captions), and its accuracy on
    the last quarter (real images it did not see: how well it can judge at all). ``shuffle``: put the pairs
    in a seeded random order first: a user's dataset is often grouped by label (class folders, sorted names),
    and an unshuffled split would leave labels out of one part."""
    unknown = sorted(set(captions) - set(labels))
    if unknown:
        raise ValueError(f"captions that are not labels: {unknown[:3]}")
    if len(images) < 2:
        raise ValueError(f"the label classifier needs at least 2 labelled images, got {len(images)}")
    if shuffle:
        order = random.Random(seed).sample(range(len(images)), len(images))
        images, captions = [images[i] for i in order], [captions[i] for i in order]
    n = len(images) * 3 // 4
    classifier = LabelClassifier(labels, seed=seed).fit(images[:n], captions[:n])
    return classifier, classifier.accuracy(images[n:], captions[n:])


def caption_adherence(
    pipe,
    prompts: Sequence[str],
    steps: int,
    guidance: float | None,
    seed: int,
    *,
    seeds: int = SEEDS,
    classifier: LabelClassifier | None = None,
    samples_per_label: int = 1,
    label_seed: int | None = None,
    batch_size: int = 24,
    height: int | None = None,
    width: int | None = None,
    eta: float | None = None,
) -> dict[str, Any]:
    """Caption sensitivity of ``pipe`` at ``steps`` / ``guidance`` over ``prompts`` x ``seeds`` (every prompt
    with seeds ``seed .. seed + seeds - 1``), with a ``classifier`` also its label accuracy on
    ``samples_per_label`` images of every label (the label as the prompt, seeds from ``label_seed``, default
    ``seed + seeds``), and ``caption_warning`` of both.

    Returns caption_distance, seed_distance, sensitivity, (label_accuracy,) warning. Images follow
    ``ldmkit.inference.generate_images``'s seed rule, so the figures do not depend on the batch size beyond
    float rounding."""
    from ldmkit.inference import generate_images  # diffusers: only when a pipeline is measured

    if len(prompts) < 2:
        raise ValueError(f"caption adherence needs >= 2 distinct prompts, got {len(prompts)}")
    kw: dict[str, Any] = dict(height=height, width=width, eta=eta)
    grid = [generate_images(pipe, [p], steps, guidance, seed, num_images=seeds, **kw) for p in prompts]
    entry: dict[str, Any] = caption_sensitivity(grid)
    chance = None
    if classifier is not None:
        chance = 1 / len(classifier.classes)
        label_prompts = [label for label in classifier.classes for _ in range(samples_per_label)]
        start = seed + seeds if label_seed is None else label_seed
        samples = generate_images(pipe, label_prompts, steps, guidance, start, batch_size=batch_size, **kw)
        entry["label_accuracy"] = classifier.accuracy(samples, label_prompts)
    entry["warning"] = caption_warning(entry["sensitivity"], entry.get("label_accuracy"), chance)
    return entry


def caption_warning(
    sensitivity: float | None, label_accuracy: float | None = None, chance: float | None = None
) -> str | None:
    """One line when samples do not follow their captions, else None."""
    if label_accuracy is not None and chance is not None and label_accuracy < 2 * chance:
        return (
            f"samples do not follow their captions: the label classifier finds the prompt's label in "
            f"{label_accuracy:.0%} of them (chance: {chance:.0%})"
        )
    if sensitivity is not None and sensitivity < MIN_SENSITIVITY:
        return (
            f"samples barely depend on their captions: at a fixed seed, changing the caption changes the image "
            f"{sensitivity:.2f}x as much as changing the seed (a model that follows captions: about 1 or more)"
        )
    return None
