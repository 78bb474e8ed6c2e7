"""Inference as a library: load a pipeline (folder, single file or cached repo id), pick its sampler, load a LoRA, generate
reproducible images, tile them.

Everything runs through stock diffusers pipelines and schedulers (our own pipeline only for U-ViT), so
what validation, ``ldmkit evaluate``, the quickstart and ``ldmkit generate`` show is what users of the
exported models get. Layer: above models / lora / methods' math, below the commands.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ldmkit import threads
from ldmkit.compat import dtype_kwargs
from ldmkit.diffusion.samplers import FLOW_SCHEDULERS, SCHEDULERS  # noqa: F401 (the commands' sampler names)
from ldmkit.errors import UserError

log = logging.getLogger(__name__)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; anything else is passed to torch.device."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``fp32`` / ``fp16`` / ``bf16``; ``auto``: fp16 on CUDA, else fp32."""
    return DTYPES.get(name, torch.float16 if device.type == "cuda" else torch.float32)


def load_pipeline(
    model: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    allow_pickle: bool = False,
    tokenizer: str | None = None,
    variant: str | None = None,
    components_from: str | None = None,
):
    """A diffusers pipeline for a model reference, resolved as ``model.pretrained`` is (families.hub): a
    diffusers folder, a single-file SD1.x/SD2.x/SDXL checkpoint (``.ckpt`` only with ``allow_pickle``) or a
    Hugging Face repo id in the local cache. The class named in model_index.json (SD, SDXL, ...), or
    ldmkit's UViTPipeline, which diffusers does not know."""
    import os

    import diffusers
    from diffusers import DiffusionPipeline

    if os.environ.get("DIFFUSERS_VERBOSITY") == "error":  # the CLI without -v: no "Loading components" bar
        diffusers.utils.logging.disable_progress_bar()

    from ldmkit.families import resolve_model

    root = resolve_model(
        model, what="--model", allow_pickle=allow_pickle, tokenizer=tokenizer, components_from=components_from
    )
    if not (root / "model_index.json").exists():
        raise UserError(f"--model is not a diffusers pipeline folder (no model_index.json): {root}")
    cls_name = json.loads((root / "model_index.json").read_text()).get("_class_name")
    if cls_name == "UViTPipeline":
        from ldmkit.pipelines.uvit import UViTPipeline  # optional component, imported only when needed

        return UViTPipeline.from_pretrained(root, variant=variant, **dtype_kwargs(dtype))
    return DiffusionPipeline.from_pretrained(root, variant=variant, **dtype_kwargs(dtype))


def set_scheduler(pipe, name: str) -> None:
    """Swap in a stock scheduler built from the loaded one's config, so betas, prediction_type and (for
    an LCM folder) original_inference_steps / timestep_scaling carry over."""
    import diffusers

    if is_flow_scheduler(pipe.scheduler):  # a rectified-flow model: the name's flow form (samplers.FLOW_SCHEDULERS)
        if name not in FLOW_SCHEDULERS:
            raise UserError(
                f"scheduler {name!r} has no flow-matching form; choose one of: {', '.join(FLOW_SCHEDULERS)}"
            )
        config = dict(pipe.scheduler.config)
        shift = config.get("shift", config.get("flow_shift", 1.0))  # FlowMatch*'s shift is the solvers' flow_shift
        cls_name, extra = FLOW_SCHEDULERS[name]
        cls = getattr(diffusers, cls_name)
        key = "flow_shift" if "flow_shift" in inspect.signature(cls.__init__).parameters else "shift"
        config = {k: v for k, v in config.items() if k not in ("shift", "flow_shift")}
        pipe.scheduler = cls.from_config(config, **extra, **{key: shift})
        return
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def is_flow_scheduler(scheduler) -> bool:
    """Whether ``scheduler`` samples a rectified flow: a FlowMatch* class, or a multistep solver on flow sigmas."""
    return type(scheduler).__name__.startswith("FlowMatch") or bool(scheduler.config.get("use_flow_sigmas"))


def lora_location(path: str | Path) -> tuple[Path, str]:
    """(folder, weight_name) for ``load_lora_weights`` from a LoRA file or a folder holding one."""
    p = Path(path)
    if p.is_file():
        return p.parent, p.name
    if not p.is_dir():
        raise UserError(f"--lora not found: {p}")
    if (p / "pytorch_lora_weights.safetensors").exists():
        return p, "pytorch_lora_weights.safetensors"
    files = sorted(p.glob("*.safetensors"))
    if len(files) != 1:
        raise UserError(
            f"--lora folder must hold pytorch_lora_weights.safetensors or exactly one .safetensors file: {p}"
        )
    return p, files[0].name


def load_lora(pipe, path: str | Path, scale: float = 1.0) -> None:
    """Load a diffusers/peft- or kohya-format LoRA file into ``pipe`` (read by ``lora.formats``, which uses
    diffusers' converters for the kohya layouts it knows, then handed to ``load_lora_weights`` as peft keys).

    The file is read and checked against the pipeline first (an unreadable file, or a LoRA of another
    model, is one UserError naming it or its missing modules: diffusers would raise deep inside, or skip
    modules with a warning); DoRA's magnitude vectors, which ldmkit's reader does not hold, skip the check."""
    import math

    from ldmkit.lora import formats

    if not math.isfinite(scale):
        raise UserError(f"--lora-scale must be a finite number, got {scale}")
    folder, weight_name = lora_location(path)
    state = formats.load_lora_file(folder / weight_name)
    dora = any("lora_magnitude_vector" in k or "dora_scale" in k for k in state)
    components = None if dora else formats.read_for_pipeline(pipe, state)
    if components is not None:
        # diffusers gets the modules ldmkit read: its reader knows the original (SAI / BFL) layouts that
        # diffusers reads only at the released widths, and has fitted 1x1-conv / linear factors to their modules
        pipe.load_lora_weights(formats.peft_state_dict(components), adapter_name="default")
    else:
        pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name="default")
    if scale != 1.0:
        pipe.set_adapters(["default"], adapter_weights=[scale])
    adopt_lcm_settings(pipe, folder)


# ------------------------------------------------------------------------------------- the sampling record
SAMPLING_RECORD = "ldmkit_sampling.json"
"""The file next to every export that says how it is sampled (``SamplingRecord``)."""
SAMPLING_METADATA_KEY = "ldmkit_sampling"
"""safetensors metadata key that carries the record inside a single-file checkpoint (merge-lora / convert-model)."""


@dataclass
class SamplingRecord:
    """How an export is sampled, written next to it by the method that trained it (``Method.sampling_record``)
    and read by every command that samples it (``load_export``): the one place that decides."""

    method: str
    """The ``method.name`` that produced the export."""
    label: str
    """Its human name ("TCD-LoRA")."""
    kind: str
    """``lora`` (load onto ``base``) or ``pipeline`` (a whole model folder)."""
    scheduler: str | None
    """diffusers scheduler class; its config is the export's ``scheduler/scheduler_config.json`` (None: the
    pipeline's own)."""
    steps: int
    """Default number of sampling steps."""
    guidance: float
    """Default ``guidance_scale`` of the pipeline call."""
    eta: float | None = None
    """``eta`` of the pipeline call (TCD's gamma); None: the pipeline's default."""
    base: str | None = None
    """LoRA exports: the model the adapter was trained on, as the run named it (``model.pretrained``)."""
    guidance_embedded: bool = False
    """The denoiser takes w through an embedding (full LCD/TCD/PCM): no classifier-free guidance pass."""
    few_step: bool = False
    """A distilled few-step model (1-8 steps)."""
    version: int = 1
    sampler: str | None = None
    """ldmkit's own sampler when no stock diffusers scheduler samples the method (TCD on a rectified flow:
    ``FlowMatchTCDScheduler`` with ``eta`` as gamma); ``scheduler`` is then the closest stock one, whose config
    the export holds."""
    flow_grid: int | None = None
    """PCM on a rectified flow: N of the solver grid. At n steps the pipeline call's ``sigmas`` are the grid's
    points (``ldmkit.diffusion.pcm.flow_sampling_sigmas``; the phase edges at n = K)."""

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / SAMPLING_RECORD
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, source: str) -> SamplingRecord:
        try:
            data = json.loads(text)
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError) as e:
            raise UserError(f"{source}: not a valid ldmkit sampling record ({e})") from None


def read_sampling_record(path: str | Path) -> SamplingRecord | None:
    """The record of an export folder, of the folder a LoRA file lies in, or inside a single-file checkpoint's
    metadata; None for models without one (older exports, models from elsewhere)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                text = (f.metadata() or {}).get(SAMPLING_METADATA_KEY)
        except Exception:  # not a safetensors file: its loader says so with its own message
            return None
        if text is not None:
            return SamplingRecord.from_json(text, str(p))
        p = p.parent
    file = p / SAMPLING_RECORD
    if not file.is_file():
        return None
    return SamplingRecord.from_json(file.read_text(), str(file))


@dataclass
class Sampling:
    """What a loaded model is sampled with: the record's defaults, or the model's (no record)."""

    steps: int
    guidance: float
    eta: float | None
    record: SamplingRecord | None = None


FLOW_GRID = "ldmkit_flow_grid"
"""Attribute ``load_export`` sets on a pipeline that samples a flow PCM model with its record's scheduler: N of the
solver grid, from which ``generate_images`` passes the call's ``sigmas`` (``SamplingRecord.flow_grid``)."""


def _export_scheduler(folder: Path, record: SamplingRecord | None):
    """The scheduler an export saved (scheduler/scheduler_config.json), or None."""
    import diffusers

    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    name = (record.scheduler if record else None) or saved.get("_class_name")
    cls = getattr(diffusers, name or "", None)
    return None if cls is None else cls.from_config(saved)


def load_export(
    path: str | Path,
    base: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    scheduler: str | None = None,
    lora_scale: float = 1.0,
    allow_pickle: bool = False,
    tokenizer: str | None = None,
    components_from: str | None = None,
) -> tuple[Any, Sampling]:
    """A ready pipeline for an export, sampled as its record says, and the sampling defaults.

    ``path`` is a LoRA export (folder or file) when its record says so or when ``base`` is given: it is loaded
    onto ``base`` (default: the model it was trained on, from the record) with the scheduler the export saved.
    Otherwise ``path`` is a whole model (an ldmkit pipeline export, any diffusers folder, single file or cached
    repo id), loaded as it is. ``scheduler`` (a ``SCHEDULERS`` name) replaces the sampler, built from the
    export's scheduler config so that its grid settings (original_inference_steps, timestep_scaling) carry over.

    Without a record (older exports, LoRAs from elsewhere) this is the inference of before: a LoRA export's saved
    scheduler is used, and the defaults follow the sampler (``sampling_defaults``)."""
    p = Path(path)
    record = read_sampling_record(p) if p.exists() else None
    if record is not None and record.kind == "pipeline" and base is not None:
        raise UserError(f"{p} is a whole {record.label} pipeline, not a LoRA: pass it as --model")
    if (record is not None and record.kind == "lora") or (record is None and base is not None):
        base = base or record.base  # type: ignore[union-attr]
        if not base:
            raise UserError(f"{p} is a LoRA and its record names no base model: give the model to load it onto")
        pipe = load_pipeline(
            base, dtype, allow_pickle=allow_pickle, tokenizer=tokenizer, components_from=components_from
        )
        saved = _export_scheduler(lora_location(p)[0], record)
        if saved is not None:
            pipe.scheduler = saved
        if scheduler:
            set_scheduler(pipe, scheduler)
        load_lora(pipe, p, lora_scale)
    else:
        pipe = load_pipeline(
            path, dtype, allow_pickle=allow_pickle, tokenizer=tokenizer, components_from=components_from
        )
        if scheduler:
            set_scheduler(pipe, scheduler)
    if record is None:
        return pipe, Sampling(*sampling_defaults(pipe), eta=None)
    # The record's eta belongs to its own sampler (TCD's gamma); another --scheduler gets the pipeline's default.
    own = type(pipe.scheduler).__name__ == record.scheduler or record.scheduler is None
    eta = record.eta if own else None
    if own and record.sampler:
        pipe.scheduler = ldmkit_sampler(record.sampler, pipe.scheduler.config, eta)
    if own and record.flow_grid:  # every caller of generate_images (generate, evaluate, ...) samples the grid
        setattr(pipe, FLOW_GRID, record.flow_grid)
    return pipe, Sampling(record.steps, record.guidance, eta, record)


def ldmkit_sampler(name: str, config, eta: float | None):
    """ldmkit's own sampler ``name`` (a record's ``sampler``) on a stock scheduler's config."""
    from ldmkit.diffusion.tcd import DEFAULT_GAMMA, FlowMatchTCDScheduler

    if name != "FlowMatchTCDScheduler":
        raise UserError(f"the export's sampling record names an unknown ldmkit sampler {name!r}")
    return FlowMatchTCDScheduler.with_gamma(config, DEFAULT_GAMMA if eta is None else eta)


def sampling_defaults(pipe) -> tuple[int, float]:
    """(steps, guidance) for a model without a sampling record: a few-step sampler (LCM, TCD) 4 steps, at 8.0
    for a full LCM (guidance is embedded, w = 7) or 1.0 for a LoRA of one (no classifier-free guidance pass);
    else 25 steps at 7.5."""
    from diffusers import LCMScheduler, TCDScheduler

    if isinstance(pipe.scheduler, (LCMScheduler, TCDScheduler)):
        unet = getattr(pipe, "unet", None)
        embedded = getattr(getattr(unet, "config", None), "time_cond_proj_dim", None) is not None
        return 4, 8.0 if embedded else 1.0
    return 25, 7.5


def adopt_lcm_settings(pipe, lora_folder: Path) -> None:
    """An ldmkit LCM-, TCD- or PCM-LoRA export carries the scheduler of its run (original_inference_steps =
    the distillation's num_ddim_timesteps, LCM's timestep_scaling): sampling with a different grid or
    boundary scaling than the LoRA was trained on degrades few-step images. Adopt those settings when the
    pipeline samples with an LCMScheduler or TCDScheduler; the base model's betas and prediction type stay."""
    from diffusers import LCMScheduler, TCDScheduler

    cfg_file = lora_folder / "scheduler" / "scheduler_config.json"
    if not isinstance(pipe.scheduler, (LCMScheduler, TCDScheduler)) or not cfg_file.is_file():
        return
    trained = json.loads(cfg_file.read_text())
    keep = {k: trained[k] for k in ("original_inference_steps", "timestep_scaling") if k in trained}
    if keep:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **keep)


def check_sampling(pipe, steps: int, height: int | None = None, width: int | None = None) -> None:
    """One UserError for a request the pipeline's scheduler or VAE cannot do (diffusers would raise an
    IndexError or a ValueError deep in a loop): more steps than the training schedule has (few-step
    schedulers: than the distillation grid, ``original_inference_steps``), or an image side that is not a
    multiple of the VAE's downsampling factor."""
    sched = pipe.scheduler.config
    limit = sched.get("original_inference_steps") or (sched.get("num_train_timesteps", 1000) - 1)
    if not 1 <= steps <= limit:
        what = (
            "its distillation grid (original_inference_steps)"
            if sched.get("original_inference_steps")
            else ("its training schedule")
        )
        raise UserError(f"{type(pipe.scheduler).__name__} takes 1..{limit} steps ({what}), got {steps}")
    factor = getattr(pipe, "vae_scale_factor", 8)
    for name, side in (("height", height), ("width", width)):
        if side is not None and (side < factor or side % factor):
            raise UserError(f"--{name} must be a multiple of {factor} (the VAE's downsampling factor), got {side}")


def generate_images(
    pipe,
    prompts: Sequence[str],
    steps: int,
    guidance: float | None,
    seed: int,
    *,
    negative_prompt: str | None = None,
    num_images: int = 1,
    batch_size: int = 1,
    height: int | None = None,
    width: int | None = None,
    eta: float | None = None,
    sigmas: list[float] | None = None,
) -> list[Any]:
    """``num_images`` PIL images per prompt, prompt-major.

    The one seed rule of ldmkit: image j of prompt i comes from its own CPU generator seeded
    ``seed + i * num_images + j`` (with one image per prompt: image i uses ``seed + i``), so each image
    is reproducible on any device and whatever else is generated with it. ``batch_size`` prompts go
    through one pipeline call (their ``num_images`` each); diffusers pipelines lay the batch out
    prompt-major (``num_images_per_prompt`` copies of each prompt in turn) and draw row k's noise from
    generator k, so the generators are listed in that order. ``guidance`` None (and any other None)
    means the pipeline's default; ``eta`` goes to schedulers that take it (DDIM's eta, TCD's gamma; ldmkit's flow
    TCD sampler as its gamma, and it draws from the images' generators); ``sigmas`` to the flow pipelines (default:
    the grid points of a flow PCM export, when ``load_export`` loaded it).
    """
    if batch_size < 1 or num_images < 1:
        raise UserError(f"batch_size and num_images must be at least 1, got {batch_size} and {num_images}")
    accepted = inspect.signature(pipe.__call__).parameters
    if sigmas is None and getattr(pipe, FLOW_GRID, None):
        sigmas = _flow_grid_sigmas(pipe, steps)
    prompts = list(prompts)
    images: list[Any] = []
    for start in range(0, len(prompts), batch_size):
        threads.tick()  # torch's threads follow the idle cores (ldmkit/threads.py)
        chunk = prompts[start : start + batch_size]
        first = start * num_images
        gens = [torch.Generator("cpu").manual_seed(seed + first + k) for k in range(len(chunk) * num_images)]
        scheduler = getattr(pipe, "scheduler", None)
        if hasattr(scheduler, "use_generators"):  # ldmkit's flow TCD sampler: the pipelines pass it none
            scheduler.use_generators(gens)
            scheduler.gamma = scheduler.gamma if eta is None else eta
        kwargs: dict[str, Any] = dict(
            prompt=chunk,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            num_images_per_prompt=num_images,
            # diffusers wants a list of negatives as long as a list of prompts
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(chunk),
            height=height,
            width=width,
            eta=eta,
            sigmas=sigmas,
            output_type="pil",
        )
        # Only pass what this pipeline takes (U-ViT's pipeline has a smaller signature).
        kwargs = {k: v for k, v in kwargs.items() if k in accepted and v is not None}
        images += pipe(**kwargs).images
    return images


def _flow_grid_sigmas(pipe, steps: int) -> list[float]:
    from ldmkit.diffusion.pcm import flow_sampling_sigmas

    try:
        return flow_sampling_sigmas(getattr(pipe, FLOW_GRID), steps, pipe.scheduler.config.num_train_timesteps)
    except ValueError as e:
        raise UserError(str(e)) from None


def image_grid(
    images: Sequence[Any],
    cols: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> Any:
    """The images tiled row-major in ``cols`` columns (diffusers' ``make_image_grid``); a short last row
    is filled with black. With labels: a caption band on the left (one label per row, e.g. its prompt,
    wrapped) and on top (one per column, e.g. "4 steps"), so a grid is readable on its own."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    if not images:
        raise UserError("no images to tile")
    rows = -(-len(images) // cols)
    blank = Image.new("RGB", images[0].size)
    cells = [*images, *[blank] * (rows * cols - len(images))]
    if not row_labels and not col_labels:
        return make_image_grid(cells, rows=rows, cols=cols)
    left, top, scale = label_margins(images[0].size, bool(row_labels), bool(col_labels))
    if scale > 1:  # small images (32 px) blown up by whole pixels, so that they and their labels are readable
        cells = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in cells]
    grid = make_image_grid(cells, rows=rows, cols=cols)
    return _labelled(grid, cells[0].size, rows, cols, list(row_labels or []), list(col_labels or []))


def _label_font_size(cell_height: int) -> int:
    return max(12, min(24, cell_height // 8))


LABELLED_MIN_CELL = 96
"""Labelled grids blow smaller images up (by a whole factor) to at least this width."""


def label_margins(cell: tuple[int, int], row_labels: bool, col_labels: bool) -> tuple[int, int, int]:
    """(left, top, scale): the width of the row-label band, the height of the column-label band and the
    factor the images are blown up by that ``image_grid`` uses for images of size ``cell``."""
    scale = max(1, -(-LABELLED_MIN_CELL // cell[0]))
    w, h = cell[0] * scale, cell[1] * scale
    left = max(160, min(3 * w, 320)) if row_labels else 0
    top = _label_font_size(h) + 12 if col_labels else 0
    return left, top, scale


def _labelled(grid, cell: tuple[int, int], rows: int, cols: int, row_labels: list[str], col_labels: list[str]):
    """``grid`` with a white band of row labels on the left and column labels on top (PIL's built-in font,
    scaled to the cells, at least 12 px so 32 px images still get readable captions)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    w, h = cell
    size = _label_font_size(h)
    font = ImageFont.load_default(size=size)
    line_h = size + 4
    left, top, _ = label_margins(cell, bool(row_labels), bool(col_labels))
    chars = max(8, int(left / (size * 0.55)))  # characters per line of the left band
    out = Image.new("RGB", (left + grid.width, top + grid.height), "white")
    out.paste(grid, (left, top))
    draw = ImageDraw.Draw(out)
    for j, label in enumerate(col_labels[:cols]):
        x = left + j * w + w // 2
        draw.text((x, top // 2), str(label), fill="black", font=font, anchor="mm")
    max_lines = max(1, (h - 4) // line_h)
    for i, label in enumerate(row_labels[:rows]):
        lines = textwrap.wrap(str(label), chars) or [""]
        if len(lines) > max_lines:
            lines = [
                *lines[: max_lines - 1],
                textwrap.shorten(" ".join(lines[max_lines - 1 :]), chars, placeholder="..."),
            ]
        y = top + i * h + (h - len(lines) * line_h) // 2
        for k, line in enumerate(lines):
            draw.text((6, y + k * line_h), line, fill="black", font=font)
    return out
