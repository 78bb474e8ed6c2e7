"""The model card (README.md) of every export: the Hugging Face metadata block, what was trained on what,
the sample grid, and how to load it in diffusers and in A1111 / ComfyUI, so the export folder can be
uploaded to the hub as it is (metadata fields: huggingface_hub's ``ModelCardData``, the model card guide
of the Hub docs)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

SAMPLES_NAME = "samples.png"
METHOD_TAGS = {
    "finetune": ["stable-diffusion", "fine-tuned"],
    "lora": ["lora", "stable-diffusion"],
    "lcm_lora": ["lora", "lcm", "lcm-lora", "latent-consistency"],
    "lcd": ["lcm", "latent-consistency"],
    "tcd_lora": ["lora", "tcd", "trajectory-consistency"],
    "tcd": ["tcd", "trajectory-consistency"],
    "pcm_lora": ["lora", "pcm", "phased-consistency"],
    "pcm": ["pcm", "phased-consistency"],
    "uvit": ["u-vit"],
    "vae": ["vae", "autoencoder"],
}


def _class_name(folder: Path) -> str | None:
    index = folder / "model_index.json"
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else None


def _metadata(cfg, tags: list[str], base_model: str | None, prompt: str | None, has_samples: bool) -> str:
    meta: dict[str, Any] = {}
    pretrained = cfg.model.pretrained
    if base_model:
        meta["base_model"] = base_model
    meta.update(library_name="diffusers", pipeline_tag="text-to-image" if cfg.method.name != "vae" else None)
    meta["tags"] = ["ldmkit", "text-to-image", "diffusers", *tags]
    if prompt:
        meta["instance_prompt"] = prompt
        if has_samples:
            meta["widget"] = [{"text": prompt, "output": {"url": SAMPLES_NAME}}]
    meta = {k: v for k, v in meta.items() if v is not None}
    text = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    if not base_model and pretrained:
        # A local folder is no hub id: the Hub rejects it as base_model, so say where it came from instead.
        text += f"# base_model: the hub id of {Path(pretrained).resolve()} (set it before uploading)\n"
    return f"---\n{text}---\n"


def write_model_card(method, cfg, export_dir: Path, samples_dir: Path) -> Path:
    """README.md in ``export_dir`` for ``method`` (any built-in method; a plugin gets the generic part)."""
    export_dir = Path(export_dir).resolve()
    name = cfg.method.name
    pretrained = Path(cfg.model.pretrained).resolve() if cfg.model.pretrained else None
    is_hub_id = bool(cfg.model.pretrained) and not Path(cfg.model.pretrained).exists()
    base_model = cfg.model.pretrained if is_hub_id else None
    grids = sorted(Path(samples_dir).glob("step-*.png"))
    if grids:
        shutil.copyfile(grids[-1], export_dir / SAMPLES_NAME)
    prompts = list(cfg.train.validation_prompts)
    prompt = prompts[0] if prompts else None
    is_lora = (export_dir / "pytorch_lora_weights.safetensors").is_file()
    is_pipeline = _class_name(export_dir) is not None
    guidance_fn = getattr(method, "_default_guidance", None)
    guidance = getattr(cfg.method, "validation_guidance", None)
    if guidance is None and guidance_fn is not None:
        guidance = guidance_fn()
    few_step = name in ("lcm_lora", "lcd", "tcd_lora", "tcd", "pcm_lora", "pcm")
    lcm = few_step or (export_dir / "scheduler" / "scheduler_config.json").is_file() and is_lora
    sampler = _scheduler_class(export_dir) or "LCMScheduler"
    eta = getattr(method, "_sampling_eta", lambda: None)()
    steps = 4 if lcm else 25
    guidance = 7.5 if guidance is None else guidance
    tags = METHOD_TAGS.get(name, [])
    adapter = getattr(cfg.method, "adapter", "lora") if is_lora else None
    if adapter and adapter != "lora":
        tags = [*tags, adapter]
    parts = [_metadata(cfg, tags, base_model, prompt, bool(grids))]
    title = {
        "finetune": "Fine-tuned pipeline",
        "lora": f"{adapter.upper() if adapter else 'LoRA'} adapter",
        "lcm_lora": "LCM-LoRA",
        "lcd": "Latent Consistency Model",
        "tcd_lora": "TCD-LoRA",
        "tcd": "Trajectory Consistency Distillation model",
        "pcm_lora": "PCM-LoRA",
        "pcm": "Phased Consistency Model",
        "uvit": "U-ViT text-to-image model",
        "vae": "VAE (AutoencoderKL)",
    }.get(name, f"{name} export")
    parts.append(f"# {title} trained with ldmkit\n")
    c = cfg
    facts = [
        f"- method: `{name}`"
        + (f" (adapter `{adapter}`, rank {getattr(c.method, 'lora_rank', '?')})" if adapter else ""),
        f"- base model: `{pretrained}`" if pretrained else "- trained from scratch",
        f"- data: `{Path(c.data.path).resolve() if c.data.path else ''}` at {c.data.resolution} px",
        f"- {c.train.max_steps} steps, batch {c.train.batch_size} x {c.train.gradient_accumulation_steps} accumulation, "
        f"optimizer {c.train.optimizer}, learning rate {c.train.learning_rate}, mixed precision {c.train.mixed_precision}",
    ]
    note = getattr(method, "_scheduler_note", None)
    if lcm and note is not None:
        facts.append(f"- few-step sampling: {steps} steps (1-8 work), guidance_scale {guidance}; {note()}")
    elif lcm:
        facts.append(
            f"- LCM sampling: {steps} steps (1-8 work), guidance_scale {guidance}; LCMScheduler with "
            f"original_inference_steps={c.method.num_ddim_timesteps}, timestep_scaling={c.method.timestep_scaling_factor}"
        )
    if name in ("lcd", "tcd", "pcm"):
        facts.append("- guidance_scale is embedded as w = guidance_scale - 1 (no classifier-free guidance pass)")
    if adapter in ("loha", "lokr"):
        facts.append(
            f"- trained as {adapter.upper()}; written as an exact LoRA of its updates (stock diffusers and the "
            "kohya loaders read LoRA, not LyCORIS files)"
        )
    parts.append("\n".join(facts) + "\n")
    if grids:
        rows = "a prompt per row, " + ("LCM step counts" if lcm else "sampling step counts") + " per column"
        parts.append(
            f"## Samples\n\n![samples]({SAMPLES_NAME})\n\n{rows} (step {grids[-1].stem[5:].lstrip('0') or 0}).\n"
        )
    parts.append(
        "## Use it in diffusers\n\n```python\n"
        + _diffusers_snippet(
            cfg, export_dir, pretrained, is_lora, is_pipeline, lcm, steps, guidance, prompt, sampler, eta
        )
        + "\n```\n"
    )
    parts.append(
        "## Use it in A1111 / ComfyUI\n\n" + _webui_text(name, export_dir, is_lora, lcm, steps, guidance) + "\n"
    )
    parts.append(
        "## ldmkit\n\n```bash\n" + _ldmkit_lines(cfg, export_dir, pretrained, is_lora, is_pipeline, prompt) + "\n```\n"
    )
    knobs = json.dumps(asdict(cfg.method), indent=2)
    parts.append(
        f"## Method settings\n\n```json\n{knobs}\n```\n\nThe whole config: `ldmkit_config.yaml` next to this file.\n"
    )
    path = export_dir / "README.md"
    path.write_text("\n".join(parts))
    return path


def _scheduler_class(export_dir: Path) -> str | None:
    """The sampler an export ships: its scheduler/ folder (a LoRA export, or a pipeline folder)."""
    path = Path(export_dir) / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text()).get("_class_name") if path.is_file() else None


def _diffusers_snippet(
    cfg, export_dir, pretrained, is_lora, is_pipeline, lcm, steps, guidance, prompt, sampler="LCMScheduler", eta=None
) -> str:
    prompt = json.dumps(prompt or "a photo of a cat")
    if cfg.method.name == "vae":
        return f'from diffusers import AutoencoderKL\n\nvae = AutoencoderKL.from_pretrained("{export_dir}")'
    if is_lora:
        cls = _class_name(pretrained) if pretrained else None
        cls = cls or "DiffusionPipeline"
        imp = (
            "from ldmkit.pipelines.uvit import UViTPipeline"
            if cls == "UViTPipeline"
            else f"from diffusers import {cls}"
        )
        lines = [imp]
        if lcm:
            lines.append(f"from diffusers import {sampler}")
        lines += ["", f'pipe = {cls}.from_pretrained("{pretrained}")']
        if lcm:
            lines.append(f'pipe.scheduler = {sampler}.from_pretrained("{export_dir}", subfolder="scheduler")')
        lines.append(f'pipe.load_lora_weights("{export_dir}")  # or the hub id after uploading this folder')
    else:
        cls = _class_name(export_dir) or "DiffusionPipeline"
        imp = (
            "from ldmkit.pipelines.uvit import UViTPipeline"
            if cls == "UViTPipeline"
            else f"from diffusers import {cls}"
        )
        lines = [
            imp,
            "",
            f'pipe = {cls}.from_pretrained("{export_dir}")' + (f"  # scheduler: {sampler}" if lcm else ""),
        ]
    extra = "" if eta is None else f", eta={eta}"
    lines.append(f"image = pipe({prompt}, num_inference_steps={steps}, guidance_scale={guidance}{extra}).images[0]")
    return "\n".join(lines)


def _webui_text(name, export_dir, is_lora, lcm, steps, guidance) -> str:
    if name in ("uvit",):
        return "A1111 and ComfyUI do not know the U-ViT architecture: use diffusers with ldmkit's UViTPipeline."
    if name == "vae":
        return "A1111 / ComfyUI take a single-file VAE; convert with diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py."
    if is_lora:
        kohya = export_dir / "pytorch_lora_weights_kohya.safetensors"
        if not kohya.is_file():
            return (
                "No kohya-format copy of this adapter is written (DoRA or a U-ViT): load it in diffusers, or bake "
                "it into the model with `ldmkit merge-lora`."
            )
        text = (
            f"Copy `{kohya.name}` into `models/Lora/` (A1111: `<lora:{kohya.stem}:1>` in the prompt; ComfyUI: a "
            "LoraLoader node)."
        )
        if lcm:
            text += f" Sample with the LCM sampler, {steps} steps, CFG {max(1.0, guidance)}."
        return text
    return (
        "ComfyUI reads this diffusers folder (put it in `models/diffusers/`, then a DiffusersLoader node); A1111 needs a "
        "single-file checkpoint (diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py)."
        + (f" Sample with the LCM sampler, {steps} steps, CFG {guidance}." if lcm else "")
    )


def _ldmkit_lines(cfg, export_dir, pretrained, is_lora, is_pipeline, prompt) -> str:
    import shlex

    prompt = shlex.quote(prompt or "a photo of a cat")
    if is_lora:
        return (
            f"ldmkit generate --model {shlex.quote(str(pretrained))} --lora {shlex.quote(str(export_dir))} --prompt {prompt} --out samples\n"
            f"ldmkit merge-lora --model {shlex.quote(str(pretrained))} --lora {shlex.quote(str(export_dir))} --out merged"
        )
    if is_pipeline:
        return f"ldmkit generate --model {shlex.quote(str(export_dir))} --prompt {prompt} --out samples"
    return f"# {cfg.method.name}: see the diffusers snippet above"
