"""Typed configs shared by every method.

A run's config is ``Config`` with ``method`` replaced by the method's own dataclass (see
``ldmkit.methods``, whose ``load_config`` picks that dataclass by ``method.name`` and calls
``parse_config`` here). YAML recipes and ``--section.key=value`` overrides are parsed by jsonargparse,
which rejects unknown keys and wrong types; field docstrings become ``ldmkit train --help``.
This module is foundation: it imports nothing of ldmkit but ``errors``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ldmkit.errors import UserError


@dataclass
class MethodConfig:
    """Base of every method's config; ``name`` selects the method."""

    name: str = ""
    """Training method: finetune | lora | lcm_lora | lcd | tcd_lora | tcd | pcm_lora | pcm | dmd2_lora | dmd2 | uvit | vae."""


@dataclass
class ModelConfig:
    pretrained: str = ""
    """A diffusers folder, a single-file SD1.x/SD2.x/SDXL checkpoint (.safetensors), or a Hugging Face repo id (owner/name[@revision]) in the local HF cache."""
    vae: str | None = None
    """Separate VAE (e.g. the fp16-safe SDXL VAE): a folder, a single-file VAE or a cached repo id; default: the model's own."""
    variant: str | None = None
    """Weight variant to load (e.g. fp16), as in diffusers from_pretrained."""
    allow_pickle: bool = False
    """Allow pickled single-file checkpoints (.ckpt/.pt/.bin), which can run code when loaded (opt-in)."""
    tokenizer: str | None = None
    """Tokenizer folder for a single-file checkpoint (a diffusers folder with tokenizer/, or one tokenizer); default: the HF cache."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Prediction type of a single-file checkpoint that does not say (SD2.x); default: its v_pred key, else v-prediction for SD2.x."""
    components_from: str | None = None
    """For a single original-layout FLUX / SD3 transformer file as model.pretrained (what ComfyUI keeps in models/diffusion_models): the diffusers folder or cached repo id its text encoders, tokenizers, VAE and scheduler come from; default: the released model in the HF cache."""
    quantize: Literal["int8", "int4"] | None = None
    """Store the frozen base transformer's linear weights in 8 or 4 bits (torchao weight-only quantisation; pip install ldmkit[quant]) for LoRA methods on FLUX / SD3; null: the mixed-precision dtype."""
    family: Literal["sd", "sdxl", "uvit", "sd3", "flux"] | None = None
    """The model family a recipe is written for (SD1.x/2.x, SDXL, ldmkit U-ViT); a model of another family stops with one line. null: any."""


@dataclass
class DataConfig:
    path: str = ""
    """Image folder, metadata.jsonl folder, WebDataset shards (path, brace pattern or URL), a PaddleMIX *.filelist.list, a feature folder, or a Hugging Face datasets source (save_to_disk folder, .parquet or .arrow files)."""
    format: Literal["auto", "folder", "wds", "filelist", "features", "datasets"] = "auto"
    """Source format; auto detects it from the path."""
    resolution: int = 512
    """Training resolution: shorter side is resized to this, then cropped to a square (with data.buckets: buckets of
    about this squared pixels)."""
    center_crop: bool = True
    """Centre crop (true) or random crop (false)."""
    random_flip: bool = False
    """Random horizontal flip."""
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    """Resize filter."""
    proportion_empty_prompts: float = 0.0
    """Share of captions replaced by the empty prompt (classifier-free guidance dropout)."""
    caption_column: str = "text"
    """Caption field in metadata.jsonl, or caption column of a Hugging Face datasets source (a string or a list of strings)."""
    image_column: str = "file_name"
    """Image path field in metadata.jsonl, or image column of a Hugging Face datasets source (default there: its one Image column)."""
    shuffle_tags: bool = False
    """Captions are comma-separated tags: shuffle them per sample and step (from the sample's seed)."""
    keep_tokens: int = 0
    """With shuffle_tags / tag_dropout: the first N tags stay in place and are never dropped."""
    tag_dropout: float = 0.0
    """Drop each tag (after the first keep_tokens) with this probability, per sample and step."""
    caption_prefix: str = ""
    """Put this (a trigger word) first in every non-empty caption: '<prefix>, <caption>'."""
    max_samples: int | None = None
    """Use only the first N samples (debugging)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    allow_shell: bool = False
    """Allow WebDataset 'pipe:' URLs, which run a shell command (opt-in for safety)."""
    shuffle_buffer: int = 1000
    """Shuffle buffer of streamed WebDataset samples."""
    num_samples: int | None = None
    """Samples per epoch of a streamed WebDataset (for epoch accounting); default: count the shards once."""
    cache: bool = False
    """Encode VAE latents and text embeddings once and train from the cache (the VAE and text encoder are then not loaded)."""
    cache_dir: str | None = None
    """Where caches live; default: <output_dir>/cache. Caches are keyed by model, data and transform settings."""
    encode_batch_size: int = 32
    """Batch size when building the cache (vae_encode_batch_size of the references)."""
    buckets: bool = False
    """Aspect-ratio bucketing (SD methods): every batch from one bucket of about resolution^2 pixels, each image
    resized to its bucket and cropped as little as possible (at most one bucket step); off: square crops."""
    bucket_step: int | None = None
    """Bucket sides are multiples of this; default: 8 x the VAE's downsampling factor (64 for SD/SDXL)."""
    bucket_max_aspect: float = 4.0
    """Largest aspect ratio (long side / short side) of a bucket."""


@dataclass
class TrainConfig:
    batch_size: int = 1
    """Per-device batch size."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 1000
    """Optimizer steps."""
    learning_rate: float = 1e-4
    """Peak learning rate."""
    scale_lr: bool = False
    """Multiply the learning rate by batch_size * gradient_accumulation_steps * num_processes."""
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "cosine", "linear", "polynomial", "cosine_with_restarts"
    ] = "constant"
    """LR schedule (diffusers get_scheduler)."""
    lr_warmup_steps: int = 0
    """Linear warmup steps."""
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor", "lion", "adamw_schedulefree"] = "adamw"
    """adamw (torch) | adamw8bit (bitsandbytes, GPU) | prodigy (prodigyopt: learning-rate free, set learning_rate 1.0) |
    adafactor (transformers) | lion (lion-pytorch: lr 3-10x smaller than AdamW's) | adamw_schedulefree (schedulefree)."""
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the optimizer, e.g. {d_coef: 0.5, safeguard_warmup: true} for prodigy."""
    adam_beta1: float = 0.9
    """beta1 of adamw, adamw8bit, prodigy, lion, adamw_schedulefree."""
    adam_beta2: float = 0.999
    """beta2 of the same (U-ViT uses 0.9; Lion's paper 0.99)."""
    adam_weight_decay: float = 1e-2
    """Decoupled weight decay (every optimizer)."""
    adam_epsilon: float = 1e-8
    """epsilon of adamw, adamw8bit, prodigy, adamw_schedulefree."""
    use_8bit_adam: bool = False
    """Old name of optimizer: adamw8bit."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; null disables clipping."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast dtype; frozen models are stored in it, trainable weights stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    allow_tf32: bool = False
    """Allow TF32 matmuls on Ampere+ GPUs."""
    compile: bool = False
    """torch.compile the method's networks (the trained denoiser, and a separate frozen teacher / target) in place;
    the first steps are slow while it compiles (benchmarks/vs_diffusers.py has the figure)."""
    channels_last: bool = False
    """Store the method's networks' 4-D weights in channels-last memory format (faster convolutions on some GPUs / CPUs)."""
    seed: int = 0
    """Seed of everything random: data order, augmentation, noise."""
    checkpoint_every: int = 500
    """Save resume state every N steps (0: only at the end)."""
    checkpoints_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest removed)."""
    save_every_seconds: float = 0.0
    """Also export the trained weights (a LoRA: its file) every N seconds of training time (validation and saving
    excluded; a resumed run starts its clock again) to output_dir/timed/, listed in timed/index.jsonl, for
    quality-vs-time curves (0: off)."""
    validate_every: int = 0
    """Write a validation grid every N steps (0: only at the end)."""
    validation_prompts: list[str] = field(default_factory=list)
    """Fixed prompts of the validation grids (one row each)."""
    validation_prompts_file: str | None = None
    """Text file with one validation prompt per line (added after validation_prompts)."""
    validation_seed: int = 0
    """Fixed seed of the validation grids."""
    log_every: int = 1
    """Write metrics every N steps."""
    report_to: str = "tensorboard"
    """Trackers besides metrics.jsonl, comma-separated: tensorboard (output_dir/logs), wandb, comet_ml, mlflow, aim,
    clearml, dvclive, swanlab, trackio (accelerate's; each needs its package), all, or none."""
    resume_from: str = "latest"
    """latest: continue from the newest undamaged checkpoint in output_dir; none: start again from step 0
    (what output_dir holds from before is moved to output_dir/previous/); or a checkpoint folder to start from."""
    allow_config_change: bool = False
    """Resume although the config differs from the one saved in output_dir (the changed keys are listed).
    Without it a changed config stops with the list; raising train.max_steps alone always continues."""


@dataclass
class Config:
    method: MethodConfig = field(default_factory=MethodConfig)
    """Method and its knobs; method.name selects it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Pretrained weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data source, transforms and caches."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, precision, logging, validation and checkpoints."""
    output_dir: str = "outputs/run"
    """Run folder: config.yaml, metrics.jsonl, samples/, checkpoints/, export/."""


SHARED_GROUPS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def build_parser(method_cls: type[MethodConfig], prog: str = "ldmkit train"):
    """jsonargparse parser of a run's config for one method's config class."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    # Field docstrings (the string under each dataclass field) become the --help text.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog=prog,
        exit_on_error=False,
        allow_abbrev=False,  # --train.max_step must not silently mean --train.max_steps
        description="Train with a YAML recipe; override any key with --section.key=value.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML recipe.")
    parser.add_class_arguments(method_cls, "method", help=f"Options of method {method_cls.name!r}.")
    for group, cls in SHARED_GROUPS.items():
        parser.add_class_arguments(cls, group)
    parser.add_argument(
        "--output_dir",
        type=str,
        default=Config.output_dir,
        help="Run folder: config.yaml, metrics.jsonl, samples/, checkpoints/, export/.",
    )
    return parser


def _show(value: object) -> str:
    """A default as it is written in YAML / on the command line."""
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and value.strip() == value else json.dumps(value)
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _choices(hint: object) -> list[str]:
    import typing

    if typing.get_origin(hint) is Literal:
        return [str(a) for a in typing.get_args(hint)]
    return [c for arg in typing.get_args(hint) for c in _choices(arg)]  # Optional[Literal[...]]


def _group_help(title: str, prefix: str, cls: type, values: dict | None = None) -> list[str]:
    """One line per field: ``--prefix.name=default {choices}  docstring``."""
    import typing

    from docstring_parser import parse_from_object

    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # inherited fields too
        docs.update({p.arg_name: " ".join((p.description or "").split()) for p in parse_from_object(klass).params})
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a plugin's annotation that does not resolve: no choices shown
        hints = {}
    lines = [f"{title}:"]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if values is not None and f.name in values:  # the recipe's value
            default = values[f.name]
        choices = _choices(hints.get(f.name))
        doc = docs.get(f.name, "")
        if choices and not all(c in doc for c in choices):
            doc = f"{{{'|'.join(choices)}}} {doc}"
        lines.append(f"  --{prefix}{f.name}={_show(default)}  {doc}".rstrip())
    return lines


def options_help(method_cls: type[MethodConfig] | None, values: dict | None = None) -> str:
    """The options of a run for ``ldmkit train --help``: the method's (when given) and the shared sections,
    one line each with its default, or with the recipe's value when ``values`` (``config_to_dict`` of the
    resolved recipe) is given (faster and shorter than jsonargparse's help, and without torch)."""
    lines = []
    values = values or {}
    if method_cls is not None:
        name = method_cls.name if isinstance(method_cls.name, str) else ""
        lines += _group_help(f"method {name!r}", "method.", method_cls, values.get("method")) + [""]
    for group, cls in SHARED_GROUPS.items():
        doc = next(p.description for p in _config_docs() if p.arg_name == group)
        lines += _group_help(f"{group} ({doc.rstrip('.')})", f"{group}.", cls, values.get(group)) + [""]
    lines.append(
        f"  --output_dir={values.get('output_dir', Config.output_dir)}  {next(p.description for p in _config_docs() if p.arg_name == 'output_dir')}"
    )
    return "\n".join(lines)


def _config_docs():
    from docstring_parser import parse_from_object

    return parse_from_object(Config).params


RECIPES = Path(__file__).resolve().parent / "recipes"  # shipped in the package; the checkout's configs/ links here


def shipped_recipes() -> list[str]:
    """Names (``<method>/<recipe>``) of the recipes shipped with ldmkit."""
    return sorted(f"{p.parent.name}/{p.stem}" for p in RECIPES.glob("*/*.yaml"))


def resolve_recipe(path: str) -> Path:
    """The recipe file ``path``, or else the shipped recipe it names: ``lcm_lora/sd15`` (``.yaml`` and a
    leading ``configs/`` optional), so an installed ldmkit needs no checkout of the repository."""
    if Path(path).is_file():
        return Path(path)
    name = path.removeprefix("configs/").removesuffix(".yaml")
    if (RECIPES / f"{name}.yaml").is_file():
        return RECIPES / f"{name}.yaml"
    raise UserError(f"config file not found: {path} (shipped recipes: {', '.join(shipped_recipes())})")


def recipe_method_name(path: str | None, overrides: list[str]) -> str:
    name = None
    if path:
        import yaml

        raw = resolve_recipe(path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(
                f"{path}: not a text file (byte 0x{raw[e.start]:02x} at offset {e.start}); a recipe is a UTF-8 YAML file"
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
            raise UserError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: a recipe must be a YAML mapping")
        name = (data.get("method") or {}).get("name")
    for i, arg in enumerate(overrides):
        if arg.startswith("--method.name="):
            name = arg.split("=", 1)[1]
        elif arg == "--method.name" and i + 1 < len(overrides):
            name = overrides[i + 1]
    if not name:
        raise UserError(
            "the config names no method: set method.name (finetune, lora, lcm_lora, lcd, tcd_lora, tcd, pcm_lora, pcm, uvit, vae)"
        )
    return name


def parse_config(method_cls: type[MethodConfig], name: str, path: str | None, overrides: list[str]) -> Config:
    """Parse a recipe file plus ``--section.key=value`` overrides into a typed, checked Config whose
    ``method`` is a ``method_cls`` named ``name``; unknown keys and wrong types raise UserError with one
    line naming the key."""
    parser = build_parser(method_cls)
    args = (["--config", str(path)] if path else []) + list(overrides)
    try:
        ns = parser.parse_args(args)
    except Exception as e:  # jsonargparse.ArgumentError and friends: reduce to one line
        raise UserError("bad config: " + " ".join(str(e).split())) from None
    init = parser.instantiate(ns)
    cfg = Config(method=init.method, model=init.model, data=init.data, train=init.train, output_dir=init.output_dir)
    cfg.method.name = name
    validate_config(cfg)
    return cfg


TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio")
"""accelerate's trackers (accelerate.utils.LoggerType) that train.report_to may name."""


def trackers(report_to: str) -> list[str]:
    """``train.report_to`` as a list of tracker names (empty for none); "all" means every one installed."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return ["all"]
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise UserError(f"train.report_to: unknown tracker {bad[0]!r}; choose from {', '.join(TRACKERS)}, all or none")
    return names


def _at_least(key: str, value: float | None, low: float, *, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if value is None or value < low:
        raise UserError(f"{key} must be >= {low}{' (or null)' if none_ok else ''}, got {value}")


def _folder_path(key: str, value: str | None) -> None:
    if value and Path(value).exists() and not Path(value).is_dir():
        raise UserError(f"{key} is a file, a folder is needed there: {value}")


VAE_FACTOR = 8
"""The downsampling of every VAE ldmkit trains with (SD, SDXL, U-ViT's and the vae method's, 3 downsampling
blocks); the model-aware checks (methods/checks.py) use the model's own."""


def _finite_floats(cfg: Config) -> None:
    """``nan`` and ``inf`` parse as floats: no float knob of any section takes them (each would reach the
    optimizer or sampler and turn the weights into nan)."""
    import math

    for section in ("method", "model", "data", "train"):
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise UserError(f"{section}.{f.name} must be a finite number, got {value}")


def validate_config(cfg: Config) -> None:
    """Checks that are about values rather than types (types are checked by the parser), so that a bad
    value stops at once (``--dry-run`` included) with one line naming the key, never after hours of
    training or as a traceback. Checks that need the model live with the method (``check``) and the
    model family."""
    _finite_floats(cfg)
    if not cfg.output_dir.strip():
        raise UserError("output_dir is empty: name the folder the run writes to (--output_dir=...)")
    _check_train(cfg.train)
    _check_data(cfg.data)
    for key in ("lora_alpha",):  # a knob of several methods: checked here once for all of them
        value = getattr(cfg.method, key, None)
        if value is not None and not value > 0:
            raise UserError(f"method.{key} must be positive, got {value} (alpha / rank scales the LoRA update)")
    if cfg.model.quantize and not hasattr(cfg.method, "lora_rank"):
        # only the frozen base is quantised; a method that trains the whole denoiser has no frozen one to shrink
        raise UserError(
            f"model.quantize={cfg.model.quantize} stores a frozen base in fewer bits, but method {cfg.method.name} "
            "trains the whole denoiser: use a LoRA method (lcm_lora, tcd_lora, pcm_lora, dmd2_lora, lora) or unset it"
        )
    _folder_path("output_dir", cfg.output_dir)
    _folder_path("data.cache_dir", cfg.data.cache_dir)
    check = getattr(cfg.method, "check", None)
    if check is not None:
        check(cfg)


def _check_train(t: TrainConfig) -> None:
    """The values of the ``train`` section (validate_config)."""
    if not 0 <= t.seed < 2**32:
        # numpy (seeded by accelerate's set_seed) takes seeds in [0, 2**32)
        raise UserError(f"train.seed must be in [0, 2**32), got {t.seed}")
    if not 0 <= t.validation_seed < 2**63:  # a torch.Generator seed
        raise UserError(f"train.validation_seed must be in [0, 2**63), got {t.validation_seed}")
    for key, value, low in (
        ("train.batch_size", t.batch_size, 1),
        ("train.max_steps", t.max_steps, 1),
        ("train.gradient_accumulation_steps", t.gradient_accumulation_steps, 1),
        ("train.log_every", t.log_every, 1),
        ("train.checkpoint_every", t.checkpoint_every, 0),
        ("train.save_every_seconds", t.save_every_seconds, 0.0),
        ("train.validate_every", t.validate_every, 0),
        ("train.lr_warmup_steps", t.lr_warmup_steps, 0),
        ("train.adam_weight_decay", t.adam_weight_decay, 0.0),
    ):
        _at_least(key, value, low)
    _at_least("train.checkpoints_total_limit", t.checkpoints_total_limit, 1, none_ok=True)
    for key, value in (("train.learning_rate", t.learning_rate), ("train.adam_epsilon", t.adam_epsilon)):
        if not value > 0 or value != value or value == float("inf"):
            raise UserError(f"{key} must be a positive finite number, got {value}")
    if t.max_grad_norm is not None and not 0 < t.max_grad_norm < float("inf"):
        # a negative norm would flip the clipped update: training would go uphill
        raise UserError(f"train.max_grad_norm must be positive (or null: no clipping), got {t.max_grad_norm}")
    for key, value in (("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise UserError(f"{key} must be in [0, 1), got {value}")
    if t.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            # accelerate refuses fp16 without a CUDA (or NPU/XPU) device with a long traceback
            raise UserError("train.mixed_precision=fp16 needs a CUDA GPU and none is visible: use bf16 or no here")
    trackers(t.report_to)  # names checked now; missing packages when the run starts (train/loop.py)
    if t.validation_prompts_file:
        # Read once here, so config.yaml records the prompts the grids show (the file may change later).
        path = Path(t.validation_prompts_file)
        if not path.is_file():
            raise UserError(f"train.validation_prompts_file not found: {path}")
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
        t.validation_prompts = [*t.validation_prompts, *[line for line in lines if line]]
        t.validation_prompts_file = None
    if t.resume_from not in ("latest", "none") and not Path(t.resume_from).is_dir():
        raise UserError(f"train.resume_from must be latest, none or a checkpoint folder, got {t.resume_from!r}")


def _check_data(d: DataConfig) -> None:
    """The values of the ``data`` section (validate_config)."""
    if d.bucket_step is not None and d.bucket_step % VAE_FACTOR:
        raise UserError(
            f"data.bucket_step={d.bucket_step} gives bucket sides the VAE cannot take: it must be a multiple of "
            f"{VAE_FACTOR} (the VAE's downsampling; 64 also keeps every UNet level whole)"
        )
    for key, value, low in (
        ("data.resolution", d.resolution, 8),
        ("data.num_workers", d.num_workers, 0),
        ("data.encode_batch_size", d.encode_batch_size, 1),
        ("data.shuffle_buffer", d.shuffle_buffer, 1),
        ("data.bucket_max_aspect", d.bucket_max_aspect, 1.0),
    ):
        _at_least(key, value, low)
    for key, value in (
        ("data.max_samples", d.max_samples),
        ("data.num_samples", d.num_samples),
        ("data.bucket_step", d.bucket_step),
    ):
        _at_least(key, value, 1, none_ok=True)
    if not 0.0 <= d.proportion_empty_prompts <= 1.0:
        raise UserError(f"data.proportion_empty_prompts must be in [0, 1], got {d.proportion_empty_prompts}")
    if not 0.0 <= d.tag_dropout <= 1.0:
        raise UserError(f"data.tag_dropout must be in [0, 1], got {d.tag_dropout}")
    _at_least("data.keep_tokens", d.keep_tokens, 0)
    tags = [k for k, on in (("shuffle_tags", d.shuffle_tags), ("tag_dropout", d.tag_dropout > 0),
                            ("caption_prefix", bool(d.caption_prefix.strip()))) if on]  # fmt: skip
    if d.cache and tags:
        # the cache holds one text embedding per caption, and these change the caption every step
        raise UserError(
            f"data.{tags[0]} changes captions per step, but data.cache stores one text embedding per caption: "
            "turn one of them off"
        )


# Keys that change how a run is watched or stored, not what it computes: a re-run may change them freely.
BOOKKEEPING_KEYS = frozenset(
    {
        "train.checkpoint_every",
        "train.checkpoints_total_limit",
        "train.save_every_seconds",
        "train.validate_every",
        "train.validation_prompts",
        "train.validation_prompts_file",
        "train.validation_seed",
        "train.log_every",
        "train.report_to",
        "train.resume_from",
        "train.allow_config_change",
        "train.compile",  # speed only: the same numbers up to float rounding (tests/test_speed_levers.py)
        "train.channels_last",
        "method.plain_teacher",  # the same numbers, bit for bit (tests/test_speed_levers.py)
        "data.num_workers",
        "data.cache_dir",
        "data.encode_batch_size",
    }
)


def is_bookkeeping(key: str) -> bool:
    """Whether changing ``key`` between runs leaves what is computed unchanged (see BOOKKEEPING_KEYS;
    a method's ``validation_*`` knobs too)."""
    return key in BOOKKEEPING_KEYS or key.startswith("method.validation_")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """``(dotted key, old value, new value)`` for every key of ``old`` whose value differs in ``new``.
    Keys that ``old`` lacks (written by an older ldmkit) are not changes."""
    a, b = _flat(old), _flat(new)
    return [(k, a[k], b.get(k)) for k in sorted(a) if k in b and a[k] != b[k]]


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
