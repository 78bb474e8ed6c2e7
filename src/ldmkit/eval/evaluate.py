"""``ldmkit evaluate``: generate at several step counts and report speed and quality per setting.

Per step count: images/s, seconds per image, denoiser evaluations per image, and quality: shapes
prompt adherence (``ldmkit.eval.scorer``, when every prompt is a shapes caption), FD and KID against
reference images (``ldmkit.eval.fid``: ldmkit's built-in features unless a feature network is given), FID with the
standard Inception-v3 features and CLIP score (``ldmkit.eval.metrics``: torchmetrics, weights from local files). Every setting uses the
same per-prompt seeds (image i: CPU generator seeded ``seed + i``, ``ldmkit.inference.generate_images``
with one image per prompt), so the settings differ only in the sampler's step count.

Denoiser evaluations are counted with a forward pre-hook on ``pipe.unet`` (``pipe.transformer`` for
pipelines that have one): ``unet_evals_per_image`` adds up the batch rows of every forward call and
divides by the number of images, so classifier-free guidance run as one doubled batch (diffusers'
SD pipelines) counts 2 per step, and an LCM (guidance through the w-embedding, no CFG) counts 1 per
step. ``unet_calls_per_batch`` is the number of forward calls per pipeline call (= steps when CFG is
batched; multistep warm-ups such as PNDM's show up here too).

FD is biased upward when there are fewer images than feature dimensions (368 for the default features,
2048 for Inception): compare FD only between runs with the same number of images. KID is unbiased and
the better number for small sets.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ldmkit.data.synth import parse_caption
from ldmkit.diffusion.samplers import TEACHER_SOLVERS  # noqa: F401 (re-exported)
from ldmkit.errors import UserError
from ldmkit.eval.fid import frechet_distance, kernel_inception_distance, load_feature_extractor
from ldmkit.eval.metrics import InceptionFID
from ldmkit.eval.metrics import LibraryClipScore as ClipScorer  # re-exported: the CLIP score of --clip-model
from ldmkit.eval.scorer import adherence
from ldmkit.inference import (
    generate_images,
    image_grid,
    set_scheduler,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_steps(text: str) -> list[int]:
    """ "1,2,4,8" -> [1, 2, 4, 8]; UserError on anything but positive integers."""
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise UserError(f"--steps must be comma-separated integers like 1,2,4,8, got {text!r}") from e
    if not steps or min(steps) < 1:
        raise UserError(f"--steps must list positive step counts, got {text!r}")
    return steps


def denoiser(pipe) -> torch.nn.Module:
    """The network the sampler calls once per step (``unet``, or ``transformer`` for DiT-style pipelines)."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise UserError(f"{type(pipe).__name__} has neither a unet nor a transformer to count evaluations of")


class EvalCounter:
    """Counts forward calls of a module and the batch rows they process (a forward pre-hook)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.calls = 0
        self.rows = 0
        self._handle = None

    def _hook(self, module, args, kwargs) -> None:
        sample = (
            args[0]
            if args
            else next(
                (kwargs[k] for k in ("sample", "hidden_states", "x") if k in kwargs),
                next(v for v in kwargs.values() if isinstance(v, torch.Tensor)),
            )
        )
        self.calls += 1
        self.rows += int(sample.shape[0])

    def __enter__(self) -> EvalCounter:
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def _match_size(images: Sequence[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    """Resize (shorter side) and centre-crop to ``size`` = (width, height), so features see one size."""
    out = []
    for im in images:
        im = im.convert("RGB")
        if im.size != size:
            scale = max(size[0] / im.width, size[1] / im.height)
            im = im.resize(
                (max(size[0], round(im.width * scale)), max(size[1], round(im.height * scale))), Image.BICUBIC
            )
            left, top = (im.width - size[0]) // 2, (im.height - size[1]) // 2
            im = im.crop((left, top, left + size[0], top + size[1]))
        out.append(im)
    return out


def evaluate_pipeline(
    pipe,
    prompts: Sequence[str],
    steps_list: Sequence[int],
    guidance: float | None = None,
    seed: int = 0,
    *,
    batch_size: int = 8,
    reference: Sequence[Image.Image] | None = None,
    feature_extractor=None,
    clip: ClipScorer | None = None,
    fid: InceptionFID | None = None,
    fd: bool = True,
    height: int | None = None,
    width: int | None = None,
    out_dir: str | Path | None = None,
    save_images: bool = False,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    warmup: bool = True,
    eta: float | None = None,
) -> dict[str, Any]:
    """Generate ``prompts`` at every step count and measure speed and quality; returns the metrics dict.

    ``reference`` images enable FD/KID (features from ``feature_extractor``, default the weight-free
    ``RandomConvFeatures``; ``fd=False`` skips them) and, with ``fid``, FID with the Inception-v3 features; they
    are resized and centre-cropped to the generated size first. With ``out_dir``, a 4-column sample grid of the
    first 16 images per setting is written (``grid-steps-N.png``), with ``save_images`` every image.
    One untimed warm-up call (one prompt, fewest steps) comes first unless ``warmup`` is False.
    ``eta`` goes to schedulers that take it (TCD's gamma); None: the pipeline's default.
    """
    if not prompts:
        raise UserError("no prompts to evaluate")
    prompts = list(prompts)
    shapes = all(parse_caption(p) is not None for p in prompts)
    ref_feats = None
    if reference is not None:
        if len(reference) < 2 or len(prompts) < 2:
            raise UserError("FD/KID/FID need at least 2 reference and 2 generated images")
        feature_extractor = (feature_extractor or load_feature_extractor(None)) if fd else None
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    counter_module = denoiser(pipe)
    # Every setting samples alike (guidance, seeds, batches, size, eta); only the step count differs.
    sample = functools.partial(
        generate_images, pipe, guidance=guidance, seed=seed, batch_size=batch_size, height=height, width=width, eta=eta
    )
    if warmup:  # a full batch, so first-call allocations do not land in the first timed setting
        sample(prompts[:batch_size], min(steps_list))

    settings = []
    for steps in steps_list:
        images, result = _timed_setting(sample, counter_module, prompts, steps, batch_size)
        if feature_extractor is not None and ref_feats is None:  # at the size of the generated images
            ref_feats = feature_extractor(_match_size(reference, images[0].size))
        result.update(
            _quality(images, prompts, shapes, clip, feature_extractor, ref_feats, kid_subsets, kid_subset_size, seed)
        )
        result["fid"] = fid(images, reference, _match_size) if fid is not None and reference is not None else None
        _log_setting(result)
        if out is not None:
            _save_setting(out, steps, images, save_images)
        settings.append(result)

    return {
        "num_images": len(prompts),
        "seed": seed,
        "guidance": _guidance_used(pipe, guidance),
        "eta": eta,
        "scheduler": type(pipe.scheduler).__name__ if hasattr(pipe, "scheduler") else None,
        "shapes_prompts": shapes,
        # Which features each distance used: "fd"/"kid" ldmkit's (or --feature-net's), "fid" Inception-v3's.
        "feature_net": getattr(feature_extractor, "name", None) if feature_extractor is not None else None,
        "fid_features": fid.name if fid is not None and reference is not None else None,
        "reference_images": len(reference) if reference is not None else 0,
        "clip_model": clip.name if clip is not None else None,
        "settings": settings,
    }


def _guidance_used(pipe, guidance: float | None) -> float | None:
    """``guidance``, or when None the pipeline's own default ``guidance_scale`` (None if it takes none)."""
    if guidance is not None:
        return guidance
    default = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    return default.default if default is not None else None


def _timed_setting(sample, counter_module: torch.nn.Module, prompts: list[str], steps: int, batch_size: int):
    """(images, speed figures) of one step count: ``sample(prompts, steps)`` timed, with the denoiser's
    evaluations counted."""
    with EvalCounter(counter_module) as counter:
        t0 = time.perf_counter()
        images = sample(prompts, steps)
        seconds = time.perf_counter() - t0
    n = len(images)
    pipe_calls = -(-n // batch_size)  # generate_images: one pipeline call per batch_size prompts
    return images, {
        "steps": steps,
        "images": n,
        "seconds": seconds,
        "seconds_per_image": seconds / n,
        "images_per_second": n / seconds,
        "unet_evals_per_image": counter.rows / n,
        "unet_calls_per_batch": counter.calls / pipe_calls,
    }


def _quality(
    images: list[Image.Image],
    prompts: list[str],
    shapes: bool,
    clip: ClipScorer | None,
    feature_extractor,
    ref_feats: Any,
    kid_subsets: int,
    kid_subset_size: int,
    seed: int,
) -> dict[str, Any]:
    """The quality figures of one setting: shapes adherence (``shapes`` prompts), FD and KID to the reference
    features ``ref_feats`` (when given), CLIP score (with ``clip``); None for each one not measured."""
    result: dict[str, Any] = {
        "adherence": adherence(images, prompts) if shapes else None,
        "fd": None,
        "kid": None,
        "kid_std": None,
        "clip_score": clip(images, prompts) if clip is not None else None,
    }
    if ref_feats is not None:
        feats = feature_extractor(_match_size(images, images[0].size))
        result["fd"] = frechet_distance(feats, ref_feats)
        result["kid"], result["kid_std"] = kernel_inception_distance(
            feats, ref_feats, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )
    return result


def _log_setting(result: dict[str, Any]) -> None:
    logger.info(
        "steps %d: %.3f s/image, %.1f evals/image%s",
        result["steps"],
        result["seconds_per_image"],
        result["unet_evals_per_image"],
        f", adherence {result['adherence']['all']:.3f}" if result["adherence"] else "",
    )


def _save_setting(out: Path, steps: int, images: list[Image.Image], save_images: bool) -> None:
    """``grid-steps-N.png`` (the first 16 images) and, with ``save_images``, every image in ``steps-N/``."""
    image_grid(images[:16], cols=4).save(out / f"grid-steps-{steps}.png")
    if save_images:
        (out / f"steps-{steps}").mkdir(exist_ok=True)
        for i, im in enumerate(images):
            im.save(out / f"steps-{steps}" / f"{i:05d}.png")


def evaluate_solvers(
    pipe,
    solvers: Sequence[str],
    prompts: Sequence[str],
    steps_list: Sequence[int],
    guidance: float | None = None,
    seed: int = 0,
    *,
    out_dir: str | Path | None = None,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """``evaluate_pipeline`` once per solver (``ldmkit.inference.SCHEDULERS`` names, e.g. ``TEACHER_SOLVERS``)
    on the same pipeline, prompts, seeds and step counts: solver name -> metrics. Each solver is built from
    the pipeline's scheduler config (betas, prediction type); the pipeline's own scheduler is restored after.
    With ``out_dir``, each solver's grids go to ``out_dir/<solver>/``."""
    original = pipe.scheduler
    results = {}
    try:
        for name in solvers:
            set_scheduler(pipe, name)
            sub = Path(out_dir) / name if out_dir is not None else None
            results[name] = evaluate_pipeline(pipe, prompts, steps_list, guidance, seed, out_dir=sub, **kwargs)
            results[name]["solver"] = name
    finally:
        pipe.scheduler = original
    return results


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file (non-empty lines) or a JSON file: COCO's captions file (``captions_val2014.json``:
    the first caption of each image, in the order of its ``images``, as COCO FID protocols take one caption per
    image), a list of strings, or a list of objects with a ``caption`` (or ``prompt``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts file not found: {p}")
    if p.suffix.lower() == ".json":
        prompts = _json_prompts(p)
    else:
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts file has no prompts: {p}")
    return prompts


def _json_prompts(p: Path) -> list[str]:
    import json

    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {p} is not valid JSON ({e})") from e
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):  # COCO captions
        first: dict = {}
        for a in data["annotations"]:
            if isinstance(a, dict) and isinstance(a.get("caption"), str):
                first.setdefault(a.get("image_id"), a["caption"].strip())
        order = [im.get("id") for im in data.get("images", []) if isinstance(im, dict)] or list(first)
        return [first[i] for i in order if i in first and first[i]]
    if isinstance(data, list):
        out = [
            d if isinstance(d, str) else d.get("caption") or d.get("prompt") for d in data if isinstance(d, (str, dict))
        ]
        return [x.strip() for x in out if isinstance(x, str) and x.strip()]
    raise UserError(f"--prompts {p}: expected COCO's captions JSON (with 'annotations') or a list of captions")


def read_data(path: str | Path, limit: int, option: str = "--data") -> tuple[list[Image.Image], list[str]]:
    """The first ``limit`` (image, first caption) pairs of any dataset ldmkit trains on (folder, wds, filelist);
    errors name the command's ``option``."""
    from ldmkit.config import DataConfig
    from ldmkit.data.loader import open_dataset

    ds = open_dataset(DataConfig(path=str(path), max_samples=limit, num_workers=0))
    if not hasattr(ds, "lazy_samples"):
        raise UserError(f"{option} {path}: feature folders hold no images; pass an image dataset")
    images, captions = [], []
    for _, load in ds.lazy_samples():
        if len(images) >= limit:
            break
        sample = load()
        if sample is not None:
            images.append(sample.image.convert("RGB"))
            captions.append(sample.captions[0] if sample.captions else "")
    if not images:
        raise UserError(f"{option} {path} has no readable samples")
    return images, captions


def read_images(path: str | Path, limit: int) -> list[Image.Image]:
    """Up to ``limit`` reference images: a folder's image files (sorted, recursive), else a dataset's images."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"--reference not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit] if root.is_dir() else []
    if not files:
        return read_data(root, limit)[0]
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(im.convert("RGB"))
    return images
