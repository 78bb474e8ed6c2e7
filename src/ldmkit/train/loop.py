"""The one training loop. It knows nothing about diffusion: a method supplies models and ``loss``.

What the loop owns (STYLE.md 4): accelerate set-up, data, AdamW, LR schedule, accumulation, clipping,
logging (progress bar, TensorBoard, metrics.jsonl), validation grids, checkpoints and resume, export.

Resume = run the same command again (after NVlabs/edm2): the latest complete checkpoint restores
weights, optimizer, LR schedule, RNG, method extras (EMA) and the data position. Because every random
draw of a step comes from per-sample seeds (rng.py) and the sampler can start at any batch
(data/sampler.py), a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from ldmkit.config import Config, dump_config
from ldmkit.errors import UserError
from ldmkit.train import checkpoint as ckpt

logger = logging.getLogger(__name__)


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.output_dir)
    # Several processes without CUDA (e.g. `accelerate launch --multi_gpu --num_processes 2` on a CPU
    # machine): accelerate only forms a gloo process group when told to use the CPU.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=None if cfg.train.report_to == "none" else cfg.train.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter], num_processes: int):
    t = cfg.train
    lr = t.learning_rate
    if t.scale_lr:
        lr *= t.batch_size * t.gradient_accumulation_steps * num_processes
    if not params:
        raise UserError(f"method {cfg.method.name!r} has no trainable parameters")
    kwargs = dict(lr=lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    if t.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("train.use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    # foreach: one fused kernel per step over all tensors; torch picks it only on CUDA by default, and the
    # per-tensor loop costs 3x as much on CPU for a LoRA's hundreds of small tensors (benchmarks/lora_cache.py).
    return torch.optim.AdamW(params, foreach=True, **kwargs)


def make_lr_scheduler(cfg: Config, optimizer):
    """diffusers' get_scheduler, stepped once per optimizer step by the loop itself.

    It is deliberately not passed through ``accelerator.prepare``: a prepared scheduler steps once per
    process unless batches are split, which silently shortens warmup and decay on several GPUs
    (REFERENCE sec. 6).
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.train.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class MetricsLog:
    """Appends one JSON line per logged step to metrics.jsonl (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint so metrics.jsonl reads like one run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def install_trainable_only_checkpoints(accelerator) -> None:
    """Checkpoint only the parameters being trained (LoRA adapters, not the 10 GB SDXL UNet around them).

    The frozen rest is re-created from ``model.pretrained`` on resume. accelerate's save/load pre-hooks
    let us store the trainable tensors as safetensors and tell accelerate to skip the full state dicts.
    DeepSpeed and FSDP shard their own state and keep accelerate's default.
    """
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file, save_file

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return

    def trainable(model) -> dict[str, torch.Tensor]:
        return {
            n: p.detach().cpu().contiguous()
            for n, p in accelerator.unwrap_model(model).named_parameters()
            if p.requires_grad
        }

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                save_file(trainable(model), str(Path(output_dir) / f"trainable_{i}.safetensors"))
        weights.clear()

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            state = load_file(str(Path(input_dir) / f"trainable_{i}.safetensors"))
            result = accelerator.unwrap_model(model).load_state_dict(state, strict=False)
            if result.unexpected_keys:
                raise UserError(
                    f"checkpoint {input_dir} does not match the model: unexpected {result.unexpected_keys[:3]}"
                )
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, method, lr_scheduler, cfg: Config, step: int, samples_seen: int) -> None:
    root = Path(cfg.output_dir) / "checkpoints"
    if accelerator.is_main_process:
        tmp = ckpt.temp_dir(root, step)
    accelerator.wait_for_everyone()
    tmp = root / f".tmp-{ckpt.checkpoint_name(step)}"
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        ckpt.save_extra(tmp, {"lr_scheduler": lr_scheduler, **method.checkpoint_objects()})
        (tmp / "ldmkit_config.yaml").write_text(dump_config(cfg))
        # trainer_state.json is written last: its presence marks a complete checkpoint.
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "samples_seen": samples_seen}))
        ckpt.publish(tmp, step, cfg.train.checkpoints_total_limit)
        logger.info("saved checkpoint at step %d", step)
    accelerator.wait_for_everyone()


def save_validation(accelerator, method, cfg: Config, step: int) -> None:
    if accelerator.is_main_process:
        grid = method.validate(step)
        if grid is not None:
            samples = Path(cfg.output_dir) / "samples"
            samples.mkdir(parents=True, exist_ok=True)
            grid.save(samples / f"step-{step:07d}.png")
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    import numpy as np

                    tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
    accelerator.wait_for_everyone()


def train(cfg: Config, accelerator=None) -> Path:
    """Run (or resume) the training described by ``cfg``; returns the export folder."""
    from accelerate.utils import set_seed

    from ldmkit.data import build_loader
    from ldmkit.methods import get_method

    t = cfg.train
    out = Path(cfg.output_dir)
    export_dir = out / "export"
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    if latest is not None and latest[0] >= t.max_steps and (export_dir / "ldmkit_config.yaml").is_file():
        logger.info("%s is finished (step %d): nothing to do", out, latest[0])
        return export_dir
    out.mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or make_accelerator(cfg)
    set_seed(t.seed)
    if t.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        (out / "config.yaml").write_text(dump_config(cfg))

    method = get_method(cfg.method.name)(cfg, accelerator)
    if t.gradient_checkpointing:
        for name in method.trainable_names:
            module = getattr(method, name)
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
            elif hasattr(module, "gradient_checkpointing_enable"):
                module.gradient_checkpointing_enable()

    optimizer = make_optimizer(cfg, method.parameters(), accelerator.num_processes)
    lr_scheduler = make_lr_scheduler(cfg, optimizer)
    prepared = accelerator.prepare(*[getattr(method, n) for n in method.trainable_names], optimizer)
    for name, module in zip(method.trainable_names, prepared[:-1]):
        setattr(method, name, module)
    optimizer = prepared[-1]
    install_trainable_only_checkpoints(accelerator)

    # Resume from the latest complete checkpoint, if any.
    step, samples_seen = 0, 0
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    if latest is not None:
        step, path = latest
        accelerator.load_state(str(path))
        ckpt.load_extra(path, {"lr_scheduler": lr_scheduler, **method.checkpoint_objects()})
        samples_seen = json.loads((path / "trainer_state.json").read_text())["samples_seen"]
        logger.info("resumed from %s", path)
        if accelerator.is_main_process:
            _truncate_metrics(out / "metrics.jsonl", step)

    if step >= t.max_steps:
        if not (export_dir / "ldmkit_config.yaml").exists():
            _export(accelerator, method, cfg, export_dir)
        return export_dir

    micro_per_step = t.gradient_accumulation_steps
    loader = build_loader(
        cfg.data,
        batch_size=t.batch_size,
        seed=t.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        start_batch=step * micro_per_step,
        encoders=method.encoders(),  # the data layer decides whether to encode (data.cache)
        cache_root=Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache",
    )
    data_iter = iter(loader)

    if accelerator.is_main_process and accelerator.trackers == [] and cfg.train.report_to != "none":
        accelerator.init_trackers("ldmkit")
    metrics = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=t.max_steps,
        initial=step,
        desc=cfg.method.name,
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    global_batch = t.batch_size * micro_per_step * accelerator.num_processes
    params = method.parameters()
    tick = time.perf_counter()
    window_steps = 0
    try:
        while step < t.max_steps:
            loss_sum, logs_sum = torch.zeros((), device=accelerator.device), {}
            grad_norm = None
            for _ in range(micro_per_step):
                batch = _to_device(next(data_iter), accelerator.device)
                with accelerator.accumulate(*[getattr(method, n) for n in method.trainable_names]):
                    loss, logs = method.loss(batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.max_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach().float()
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + float(v)
            if not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
            step += 1
            samples_seen += global_batch
            window_steps += 1
            method.after_step(step)

            if step % t.log_every == 0 or step == t.max_steps:
                loss_mean = accelerator.gather(loss_sum[None]).mean().item() / micro_per_step
                elapsed = time.perf_counter() - tick
                record = {
                    "step": step,
                    "loss": loss_mean,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "samples_per_s": window_steps * global_batch / max(elapsed, 1e-9),
                    "epoch": getattr(loader, "epoch", 0),
                    "samples_seen": samples_seen,
                }
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                record.update({k: v / micro_per_step for k, v in logs_sum.items()})
                if not math.isfinite(loss_mean):
                    raise FloatingPointError(
                        f"loss is {loss_mean} at step {step}; lower the learning rate or use bf16/fp32"
                    )
                metrics.write(record)
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}")
                tick, window_steps = time.perf_counter(), 0
            bar.update(1)

            if t.validate_every and step % t.validate_every == 0 and step < t.max_steps:
                save_validation(accelerator, method, cfg, step)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_steps:
                save_checkpoint(accelerator, method, lr_scheduler, cfg, step, samples_seen)
    except KeyboardInterrupt:
        # Keep the work done so far: the next run of the same command resumes here.
        logger.warning("interrupted at step %d: saving a checkpoint before exiting", step)
        if step > 0 and (ckpt.latest_checkpoint(out / "checkpoints") or (None,))[0] != step:
            save_checkpoint(accelerator, method, lr_scheduler, cfg, step, samples_seen)
        raise
    finally:
        bar.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()

    save_validation(accelerator, method, cfg, step)
    _export(accelerator, method, cfg, export_dir)
    accelerator.end_training()
    return export_dir


def _export(accelerator, method, cfg: Config, export_dir: Path) -> None:
    if accelerator.is_main_process:
        export_dir.mkdir(parents=True, exist_ok=True)
        method.export(export_dir)
        (export_dir / "ldmkit_config.yaml").write_text(dump_config(cfg))
        logger.info("exported to %s", export_dir)
    accelerator.wait_for_everyone()
