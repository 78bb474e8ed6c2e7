"""The model card (README.md) of every export: the Hugging Face metadata block, what was trained on what,
the sample grid, and how to load it in diffusers and in A1111 / ComfyUI, so the export folder can be
uploaded to the hub as it is (metadata fields: huggingface_hub's ``ModelCardData``, the model card guide
of the Hub docs).

Everything method-specific comes from the method itself: its ``label`` / ``title`` / ``tags``, its
``card_facts()`` and its sampling record (``Method.sampling_record``, the file generate and evaluate read),
so the card says what the commands do. No method name is compared here.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

SAMPLES_NAME = "samples.png"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _class_name(folder: Path | None) -> str | None:
    index = folder / "model_index.json" if folder is not None else None
    return json.loads(index.read_text()).get("_class_name") if index is not None and index.is_file() else None


@dataclass
class _Card:
    """What every part of the card needs to know about the export."""

    cfg: Any
    export_dir: Path
    record: Any  # ldmkit.inference.SamplingRecord | None
    base: str | None  # the base model as a later command names it (a LoRA's; None for a pipeline)
    base_folder: Path | None  # the diffusers folder the base resolved to (a single file's converted copy)
    prompt: str | None
    adapter: str | None  # LoRA exports: the adapter kind

    @property
    def is_lora(self) -> bool:
        return self.adapter is not None

    @property
    def steps(self) -> int:
        return self.record.steps if self.record else 25

    @property
    def guidance(self) -> float:
        return self.record.guidance if self.record else 7.5

    @property
    def few_step(self) -> bool:
        return bool(self.record and self.record.few_step)

    @property
    def base_is_file(self) -> bool:
        return bool(self.base) and Path(self.base).suffix in SINGLE_FILE_SUFFIXES and Path(self.base).is_file()


def _metadata(card: _Card, tags: list[str], has_samples: bool, text_to_image: bool) -> str:
    pretrained = card.cfg.model.pretrained
    is_hub_id = bool(pretrained) and not Path(pretrained).exists()
    meta: dict[str, Any] = {}
    if is_hub_id:
        meta["base_model"] = pretrained
    meta.update(library_name="diffusers", pipeline_tag="text-to-image" if text_to_image else None)
    meta["tags"] = ["ldmkit", "text-to-image", "diffusers", *tags]
    if card.prompt:
        meta["instance_prompt"] = card.prompt
        if has_samples:
            meta["widget"] = [{"text": card.prompt, "output": {"url": SAMPLES_NAME}}]
    meta = {k: v for k, v in meta.items() if v is not None}
    text = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    if not is_hub_id and pretrained:
        # A local folder is no hub id: the Hub rejects it as base_model, so say where it came from instead.
        text += f"# base_model: the hub id of {Path(pretrained).resolve()} (set it before uploading)\n"
    return f"---\n{text}---\n"


def write_model_card(method, cfg, export_dir: Path, samples_dir: Path) -> Path:
    """README.md in ``export_dir`` for ``method`` (any method: a plugin's card uses its declared label, title,
    tags, facts and sampling record)."""
    export_dir = Path(export_dir).resolve()
    grids = sorted(Path(samples_dir).glob("step-*.png"))
    if grids:
        shutil.copyfile(grids[-1], export_dir / SAMPLES_NAME)
    record = method.sampling_record()
    is_lora = (export_dir / "pytorch_lora_weights.safetensors").is_file()
    family = getattr(method, "family", None)
    card = _Card(
        cfg=cfg,
        export_dir=export_dir,
        record=record,
        base=method.base_reference(),
        base_folder=getattr(family, "root", None),
        prompt=next(iter(cfg.train.validation_prompts), None),
        adapter=getattr(cfg.method, "adapter", "lora") if is_lora else None,
    )
    tags = list(method.tags) + ([card.adapter] if card.adapter not in (None, "lora") else [])
    parts = [_metadata(card, tags, bool(grids), text_to_image=record is not None)]
    parts.append(f"# {_title(method, card)} trained with ldmkit\n")
    parts.append("\n".join(f"- {fact}" for fact in _facts(method, card)) + "\n")
    if grids:
        rows = "a prompt per row, " + ("few-step" if card.few_step else "sampling") + " step counts per column"
        parts.append(
            f"## Samples\n\n![samples]({SAMPLES_NAME})\n\n{rows} (step {grids[-1].stem[5:].lstrip('0') or 0}).\n"
        )
    parts.append("## Use it in diffusers\n\n```python\n" + _diffusers_snippet(card) + "\n```\n")
    clients = "ComfyUI / Forge" if _is_flow(card) else "A1111 / ComfyUI"  # A1111 runs no FLUX / SD3 model
    parts.append(f"## Use it in {clients}\n\n" + _webui_text(card) + "\n")
    parts.append("## ldmkit\n\n```bash\n" + _ldmkit_lines(card) + "\n```\n")
    knobs = json.dumps(asdict(cfg.method), indent=2)
    parts.append(
        f"## Method settings\n\n```json\n{knobs}\n```\n\nThe whole config: `ldmkit_config.yaml` next to this file"
        + (", how to sample it: `ldmkit_sampling.json`" if record is not None else "")
        + ".\n"
    )
    path = export_dir / "README.md"
    path.write_text("\n".join(parts))
    return path


def _title(method, card: _Card) -> str:
    title = method.title or method.label or f"{card.cfg.method.name} export"
    if card.adapter not in (None, "lora") and not card.few_step:
        title = title.replace("LoRA", card.adapter.upper())  # a DoRA / LoHa / LoKr fine-tune
    return title


def _facts(method, card: _Card) -> list[str]:
    c = card.cfg
    rank = f", rank {getattr(c.method, 'lora_rank', '?')}" if card.adapter else ""
    pretrained = c.model.pretrained
    facts = [
        f"method: `{c.method.name}`" + (f" (adapter `{card.adapter}`{rank})" if card.adapter else ""),
        f"base model: `{card.base or pretrained}`" if pretrained else "trained from scratch",
        f"data: `{Path(c.data.path).resolve() if c.data.path else ''}` at {c.data.resolution} px",
        f"{c.train.max_steps} steps, batch {c.train.batch_size} x {c.train.gradient_accumulation_steps} accumulation, "
        f"optimizer {c.train.optimizer}, learning rate {c.train.learning_rate}, mixed precision {c.train.mixed_precision}",
        *method.card_facts(),
    ]
    if card.adapter in ("loha", "lokr"):
        facts.append(
            f"trained as {card.adapter.upper()}; written as an exact LoRA of its updates (stock diffusers and the "
            "kohya loaders read LoRA, not LyCORIS files)"
        )
    return facts


def _import_line(cls: str) -> str:
    if cls == "UViTPipeline":
        return "from ldmkit.pipelines.uvit import UViTPipeline"
    return f"from diffusers import {cls}"


def _load_base_line(card: _Card, cls: str) -> str:
    """How diffusers loads the base: ``from_pretrained`` of a folder or repo id; a single file needs
    ``from_single_file`` with its diffusers configs (offline: a folder of the same model, e.g. the one
    ldmkit converted it into)."""
    if card.base_is_file:
        config = f', config="{card.base_folder}"' if card.base_folder else ""
        return f'pipe = {cls}.from_single_file("{card.base}"{config})'
    return f'pipe = {cls}.from_pretrained("{card.base}")'


def _diffusers_snippet(card: _Card) -> str:
    prompt = json.dumps(card.prompt or "a photo of a cat")
    if card.record is None:  # not a text-to-image model (a VAE)
        return f'from diffusers import AutoencoderKL\n\nvae = AutoencoderKL.from_pretrained("{card.export_dir}")'
    sampler = card.record.scheduler
    if card.is_lora:
        cls = _class_name(card.base_folder) or _class_name(Path(card.base) if card.base else None)
        cls = cls or "DiffusionPipeline"
        lines = [_import_line(cls)]
        if sampler:
            lines.append(f"from diffusers import {sampler}")
        lines += ["", _load_base_line(card, cls)]
        if sampler:
            lines.append(f'pipe.scheduler = {sampler}.from_pretrained("{card.export_dir}", subfolder="scheduler")')
        lines.append(f'pipe.load_lora_weights("{card.export_dir}")  # or the hub id after uploading this folder')
    else:
        cls = _class_name(card.export_dir) or "DiffusionPipeline"
        note = f"  # scheduler: {sampler}" if sampler else ""
        lines = [_import_line(cls), "", f'pipe = {cls}.from_pretrained("{card.export_dir}"){note}']
    eta = "" if card.record.eta is None or card.record.sampler else f", eta={card.record.eta}"
    if card.record.flow_grid:  # flow PCM: the solver grid's points as the call's sigmas (the phase edges)
        from ldmkit.diffusion.pcm import flow_sampling_sigmas

        eta += f", sigmas={[round(x, 6) for x in flow_sampling_sigmas(card.record.flow_grid, card.steps)]}"
    lines.append(
        f"image = pipe({prompt}, num_inference_steps={card.steps}, guidance_scale={card.guidance}{eta}).images[0]"
    )
    if card.record.sampler:
        lines.append(
            f"# the stock scheduler is {card.record.label}'s gamma 0 (deterministic); the trained gamma "
            f"{card.record.eta} samples with `ldmkit generate` ({card.record.sampler})"
        )
    return "\n".join(lines)


def _is_flow(card: _Card) -> bool:
    """A FLUX / SD3 export (or LoRA of one): ComfyUI and Forge run these, A1111 does not."""
    return _class_name(card.export_dir if not card.is_lora else card.base_folder) in FLOW_PIPELINES


FLOW_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")


def _flow_webui_text(card: _Card, sampler: str) -> str:
    if card.is_lora:
        return (
            "`pytorch_lora_weights_kohya.safetensors` is the LoRA in the original (BFL / SAI MMDiT) layout: copy it into "
            "ComfyUI's `models/loras/` (a LoraLoaderModelOnly node after the model loader) or Forge's `models/Lora/` "
            "(`<lora:pytorch_lora_weights_kohya:1>` in the prompt)." + sampler
        )
    return "ComfyUI reads this diffusers folder (put it in `models/diffusers/`, then a DiffusersLoader node)." + sampler


def _webui_text(card: _Card) -> str:
    if card.record is None:
        return "A1111 / ComfyUI take a single-file VAE; convert with diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py."
    if _class_name(card.export_dir if not card.is_lora else card.base_folder) == "UViTPipeline":
        return "A1111 and ComfyUI do not know the U-ViT architecture: use diffusers with ldmkit's UViTPipeline."
    sampler = ""
    if card.few_step:
        names = {"LCMScheduler": "LCM", "TCDScheduler": "TCD", "FlowMatchLCMScheduler": "LCM"}
        names["FlowMatchEulerDiscreteScheduler"] = "Euler"  # flow PCM (at its phase edges), flow TCD at gamma 0
        name = names.get(card.record.scheduler or "", card.record.scheduler)
        sampler = f" Sample with the {name} sampler, {card.steps} steps, CFG {max(1.0, card.guidance)}."
    if _is_flow(card):
        return _flow_webui_text(card, sampler)
    if card.is_lora:
        kohya = card.export_dir / "pytorch_lora_weights_kohya.safetensors"
        if not kohya.is_file():
            return (
                "No kohya-format copy of this adapter is written (DoRA or a U-ViT): load it in diffusers, or bake "
                "it into the model with `ldmkit merge-lora`."
            )
        return (
            f"Copy `{kohya.name}` into `models/Lora/` (A1111: `<lora:{kohya.stem}:1>` in the prompt; ComfyUI: a "
            "LoraLoader node)." + sampler
        )
    return (
        "ComfyUI reads this diffusers folder (put it in `models/diffusers/`, then a DiffusersLoader node); A1111 needs a "
        "single-file checkpoint (`ldmkit convert-model --in this-folder --to single-file --out model.safetensors`)."
        + sampler
    )


def _ldmkit_lines(card: _Card) -> str:
    prompt = shlex.quote(card.prompt or "a photo of a cat")
    export = shlex.quote(str(card.export_dir))
    if card.record is None:
        return f"# {card.cfg.method.name}: see the diffusers snippet above"
    if card.is_lora:
        base = shlex.quote(str(card.base))
        return (
            f"ldmkit generate --model {base} --lora {export} --prompt {prompt} --out samples\n"
            f"ldmkit merge-lora --model {base} --lora {export} --out merged"
        )
    return f"ldmkit generate --model {export} --prompt {prompt} --out samples"
