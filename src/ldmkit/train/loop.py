"""The one training loop. It knows nothing about diffusion: a method supplies models and ``loss``.

What the loop owns (docs/DESIGN.md, Method contract): accelerate set-up, data, AdamW, LR schedule, accumulation, clipping,
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

from ldmkit import threads
from ldmkit.config import Config, dump_config
from ldmkit.errors import Interrupted, UserError
from ldmkit.lora.adapters import input_casts_off_under_autocast
from ldmkit.train import checkpoint as ckpt
from ldmkit.train.optim import evaluation_weights, make_lr_scheduler, make_optimizer, weights_mode  # noqa: F401
from ldmkit.train.runs import RunLock, StopSignals, check_rerun, resume_point, set_aside

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
        log_with=tracker_names(cfg) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


# Package (import name, pip name) of the trackers accelerate supports (accelerate.tracking).
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "mlflow": ("mlflow", "mlflow"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
    "trackio": ("trackio", "trackio"),
}


def tracker_names(cfg: Config) -> list[str]:
    """``train.report_to`` as accelerate's ``log_with``; a tracker whose package is missing is a UserError
    (accelerate itself would drop it silently and the run would log nowhere)."""
    from accelerate.tracking import get_available_trackers

    from ldmkit.config import trackers

    names = trackers(cfg.train.report_to)
    available = {str(getattr(x, "value", x)) for x in get_available_trackers()}
    for name in names:
        if name != "all" and name not in available:
            module, pip_name = TRACKER_PACKAGES[name]
            raise UserError(f"train.report_to={name} needs the {module} package: pip install {pip_name}")
    return names


def apply_speed_levers(cfg: Config, method) -> None:
    """``train.channels_last`` and ``train.compile`` on every network the method holds (for LCM-LoRA its one
    denoiser; full LCD also the frozen teacher and the EMA target). Both act in place (``Module.to`` with a
    memory format, ``Module.compile``), so parameter names, checkpoints, the EMA and exports are unchanged;
    neither changes what is computed beyond float rounding (tests/test_speed_levers.py)."""
    t = cfg.train
    if not (t.compile or t.channels_last):
        return
    networks = {id(m): m for m in vars(method).values() if isinstance(m, torch.nn.Module)}
    for module in networks.values():
        if t.channels_last:
            module.to(memory_format=torch.channels_last)
        if t.compile:
            module.compile()


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
    """On resume, drop lines logged after the checkpoint so metrics.jsonl reads like one run; a line cut
    short by a crash (unparseable JSON) is dropped with a warning."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            if line.strip():
                logger.warning("%s: dropping a damaged line (%d characters)", path, len(line))
            continue
        if record.get("step", 0) <= step:
            keep.append(line)
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
    # Every rank writes its own RNG state into tmp: all must be done before the manifest lists the files
    # and the folder is renamed (else a slower rank writes into a folder that has moved).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.save_extra(tmp, {"lr_scheduler": lr_scheduler, **method.checkpoint_objects()})
        (tmp / "ldmkit_config.yaml").write_text(dump_config(cfg))
        # trainer_state.json is written last: its presence marks a complete checkpoint.
        ckpt.write_state(tmp, {"step": step, "samples_seen": samples_seen})
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
            import numpy as np

            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
                elif hasattr(tracker, "log_images"):  # wandb and others that take images
                    try:
                        tracker.log_images({"validation": [np.asarray(grid)]}, step=step)
                    except Exception as e:  # a tracker's image support is optional; scalars still go there
                        logger.debug("%s: validation image not logged: %s", tracker.name, e)
    accelerator.wait_for_everyone()


class TimedExports:
    """``train.save_every_seconds``: the trained weights exported (``method.export``, what the run's final export
    holds) each time training time passes a multiple of N s, into ``timed/NNNNNNs/``, with one line per export
    in ``timed/index.jsonl``: the mark, the training seconds and step reached, the Unix time the save started and
    the seconds all timed saves took before it (so a caller can put the export on its own clock, saves excluded).
    For quality-vs-time curves (benchmarks/time_to_quality.py); not resume state (that is checkpoint_every)."""

    def __init__(self, cfg: Config, accelerator, method):
        self.every, self.accelerator, self.method = cfg.train.save_every_seconds, accelerator, method
        self.root = Path(cfg.output_dir) / "timed"
        self.next_mark, self.save_seconds = self.every, 0.0

    def after_step(self, step: int, training_seconds: float, optimizer) -> None:
        if not self.every or training_seconds < self.next_mark:
            return
        mark = self.next_mark
        # Marks passed during one long step collapse into one export (the weights are the same).
        self.next_mark = (math.floor(training_seconds / self.every) + 1) * self.every
        if self.accelerator.is_main_process:
            start_unix, start = time.time(), time.perf_counter()
            folder = self.root / f"{int(mark):06d}s"
            folder.mkdir(parents=True, exist_ok=True)
            with evaluation_weights(optimizer):
                self.method.export(folder)
            sampling = self.method.sampling_record()  # how it is sampled (scheduler, guidance), as the final export
            if sampling is not None:
                sampling.save(folder)
            record = {"mark": mark, "training_seconds": training_seconds, "step": step, "folder": folder.name}
            record |= {"unix_time": start_unix, "save_seconds_before": self.save_seconds}
            with (self.root / "index.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.save_seconds += time.perf_counter() - start
        self.accelerator.wait_for_everyone()


def train(cfg: Config, accelerator=None) -> Path:
    """Run (or resume) the training described by ``cfg``; returns the export folder."""
    out = Path(cfg.output_dir)
    main = accelerator.is_main_process if accelerator is not None else int(os.environ.get("RANK", "0")) == 0
    with RunLock(out, enabled=main):
        if cfg.train.resume_from == "none" and main:
            set_aside(out)
        return _train(cfg, out, accelerator)


def _train(cfg: Config, out: Path, accelerator) -> Path:
    from accelerate.utils import set_seed

    from ldmkit.methods import get_method

    t = cfg.train
    export_dir = out / "export"
    resume = resume_point(cfg, out)
    check_rerun(cfg, out, resume[0] if resume else None)
    if resume is not None and resume[0] >= t.max_steps and (export_dir / "ldmkit_config.yaml").is_file():
        logger.info("%s is finished (step %d): nothing to do", out, resume[0])
        return export_dir
    out.mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or make_accelerator(cfg)
    set_seed(t.seed)
    if t.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        (out / "config.yaml").write_text(dump_config(cfg))

    method = get_method(cfg.method.name)(cfg, accelerator)
    optimizer, lr_scheduler = _prepare(cfg, method, accelerator)
    step, samples_seen = _restore(accelerator, method, lr_scheduler, resume, out)
    if step >= t.max_steps:
        _write_stats(accelerator, out, step, 0, 0.0, 0)
        if not (export_dir / "ldmkit_config.yaml").exists():
            _export(accelerator, method, cfg, export_dir)
        return export_dir

    loader = _training_loader(cfg, accelerator, method, step, out)
    if accelerator.is_main_process and accelerator.trackers == [] and tracker_names(cfg):
        accelerator.init_trackers("ldmkit", config=_flat_config(cfg))
    first_step = step
    step, seconds = _run_steps(cfg, accelerator, method, optimizer, lr_scheduler, loader, step, samples_seen)
    if getattr(loader, "skipped", 0) or getattr(loader, "replaced_captions", 0):
        logger.warning(
            "data: %d unreadable samples were skipped (replaced by readable ones), %d captions were not UTF-8",
            loader.skipped,
            loader.replaced_captions,
        )
    global_batch = t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes
    _write_stats(accelerator, out, step, step - first_step, seconds, (step - first_step) * global_batch)
    weights_mode(optimizer, train=False)  # schedule-free: validate and export the averaged weights
    save_validation(accelerator, method, cfg, step)
    _export(accelerator, method, cfg, export_dir)
    accelerator.end_training()
    return export_dir


def _prepare(cfg: Config, method, accelerator) -> tuple[Any, Any]:
    """The method's networks ready to train (speed levers, gradient checkpointing, wrapped by accelerate) and
    their optimizer and LR schedule."""
    apply_speed_levers(cfg, method)
    if cfg.train.gradient_checkpointing:
        method.enable_gradient_checkpointing()

    optimizer = make_optimizer(cfg, method.param_groups(), accelerator.num_processes)
    lr_scheduler = make_lr_scheduler(cfg, optimizer)
    prepared = accelerator.prepare(*[getattr(method, n) for n in method.trainable_names], optimizer)
    for name, module in zip(method.trainable_names, prepared[:-1]):
        setattr(method, name, module)
    optimizer = prepared[-1]
    install_trainable_only_checkpoints(accelerator)
    weights_mode(optimizer, train=True)
    return optimizer, lr_scheduler


def _restore(accelerator, method, lr_scheduler, resume: tuple[int, Path] | None, out: Path) -> tuple[int, int]:
    """(step, samples seen) to start from: 0 for a new run, else the checkpoint ``resume`` loaded into the
    networks, optimizer, LR schedule and method extras (metrics.jsonl cut back to its step)."""
    if resume is None:
        return 0, 0
    step, path = resume
    accelerator.load_state(str(path))
    ckpt.load_extra(path, {"lr_scheduler": lr_scheduler, **method.checkpoint_objects()})
    samples_seen = ckpt.read_state(path)["samples_seen"]
    logger.info("resumed from %s", path)
    if accelerator.is_main_process:
        _truncate_metrics(out / "metrics.jsonl", step)
    return step, samples_seen


def _training_loader(cfg: Config, accelerator, method, step: int, out: Path):
    """This process's batches from ``step`` on (the data position of a resumed run)."""
    from ldmkit.data import build_loader

    t = cfg.train
    return build_loader(
        cfg.data,
        batch_size=t.batch_size,
        seed=t.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        start_batch=step * t.gradient_accumulation_steps,
        encoders=method.encoders(),  # the data layer decides whether to encode (data.cache)
        cache_root=Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache",
    )


def _run_steps(
    cfg: Config, accelerator, method, optimizer, lr_scheduler, loader, step: int, samples_seen: int
) -> tuple[int, float]:
    """Train from ``step`` to ``train.max_steps``: each step logged, validated and checkpointed at its cadence;
    a stop signal saves a checkpoint and raises ``Interrupted``. Returns the last step and the seconds spent
    training (validation and saving excluded)."""
    from tqdm.auto import tqdm

    t = cfg.train
    out = Path(cfg.output_dir)
    data_iter = iter(loader)
    metrics = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)
    bar = tqdm(
        total=t.max_steps,
        initial=step,
        desc=cfg.method.name,
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    global_batch = t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes
    clip_groups = method.clip_groups()
    tick = time.perf_counter()
    window_steps = 0
    started, paused_total = tick, 0.0  # training time of this run: validation and saving excluded
    timed = TimedExports(cfg, accelerator, method)
    try:
        with StopSignals() as stop:
            while step < t.max_steps:
                loss_sum, logs_sum, grad_norm = _optimizer_step(
                    cfg, accelerator, method, optimizer, data_iter, clip_groups
                )
                if not accelerator.optimizer_step_was_skipped:
                    lr_scheduler.step()
                step += 1
                samples_seen += global_batch
                window_steps += 1
                method.after_step(step)
                threads.tick()  # torch's threads follow the idle cores (ldmkit/threads.py; off when the user chose)

                if step % t.log_every == 0 or step == t.max_steps:
                    loss_mean = accelerator.gather(loss_sum[None]).mean().item() / t.gradient_accumulation_steps
                    samples_per_s = window_steps * global_batch / max(time.perf_counter() - tick, 1e-9)
                    record = _step_record(loader, lr_scheduler, step, samples_seen, loss_mean, samples_per_s)
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm)
                    _log_step(accelerator, metrics, bar, loader, record, logs_sum, t.gradient_accumulation_steps)
                    tick, window_steps = time.perf_counter(), 0
                bar.update(1)

                signum = stop.requested(accelerator)
                paused = time.perf_counter()  # samples/s counts training only, not validation or saving
                timed.after_step(step, paused - started - paused_total, optimizer)
                if t.validate_every and step % t.validate_every == 0 and step < t.max_steps and not signum:
                    with evaluation_weights(optimizer):
                        save_validation(accelerator, method, cfg, step)
                if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_steps or signum:
                    save_checkpoint(accelerator, method, lr_scheduler, cfg, step, samples_seen)
                if signum:
                    raise Interrupted(
                        f"interrupted at step {step}, checkpoint saved; run the same command to resume", signum
                    )
                tick += time.perf_counter() - paused
                paused_total += time.perf_counter() - paused
    finally:
        bar.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    return step, time.perf_counter() - started - paused_total


def _optimizer_step(cfg: Config, accelerator, method, optimizer, data_iter, clip_groups):
    """One optimizer step over ``train.gradient_accumulation_steps`` micro-batches: (summed loss, summed method
    logs, gradient norm of the first clip group or None)."""
    t = cfg.train
    loss_sum, logs_sum = torch.zeros((), device=accelerator.device), {}
    grad_norm = None
    for _ in range(t.gradient_accumulation_steps):
        batch = _to_device(next(data_iter), accelerator.device)
        trainable = [getattr(method, n) for n in method.trainable_names]
        with accelerator.accumulate(*trainable):
            with input_casts_off_under_autocast(trainable, accelerator.mixed_precision):
                loss, logs = method.loss(batch)
                accelerator.backward(loss)
            if accelerator.sync_gradients and t.max_grad_norm:
                # accelerate clips the first group (and unscales fp16 gradients, once); the
                # others (e.g. a GAN's discriminator) keep norms of their own
                grad_norm = accelerator.clip_grad_norm_(clip_groups[0], t.max_grad_norm)
                for group in clip_groups[1:]:
                    torch.nn.utils.clip_grad_norm_(group, t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().float()
        for k, v in logs.items():
            logs_sum[k] = logs_sum.get(k, 0.0) + float(v)
    return loss_sum, logs_sum, grad_norm


def _step_record(loader, lr_scheduler, step: int, samples_seen: int, loss: float, samples_per_s: float) -> dict:
    """The start of one metrics.jsonl line: loss, LR, speed and the data position."""
    return {
        "step": step,
        "loss": loss,
        "lr": lr_scheduler.get_last_lr()[0],
        "samples_per_s": samples_per_s,
        "epoch": getattr(loader, "epoch", 0),
        "samples_seen": samples_seen,
    }


def _log_step(accelerator, metrics: MetricsLog, bar, loader, record: dict, logs_sum: dict, micro_per_step: int) -> None:
    """Complete ``record`` (data problems met so far, the method's logs per micro-batch), stop on a loss that is
    not finite, and write it to metrics.jsonl, the trackers and the progress bar."""
    for key in ("skipped", "replaced_captions"):  # data problems met so far (this rank)
        if getattr(loader, key, 0):
            record[f"data_{key}"] = getattr(loader, key)
    record.update({k: v / micro_per_step for k, v in logs_sum.items()})
    loss_mean, step = record["loss"], record["step"]
    if not math.isfinite(loss_mean):
        raise FloatingPointError(f"loss is {loss_mean} at step {step}; lower the learning rate or use bf16/fp32")
    metrics.write(record)
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
    bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}")


def _write_stats(accelerator, out: Path, last_step: int, steps: int, seconds: float, samples: int) -> None:
    """train_stats.json: what this invocation trained and how fast (training only), for the summary."""
    if accelerator.is_main_process:
        stats = {
            "last_step": last_step,
            "steps": steps,
            "samples": samples,
            "train_seconds": round(seconds, 3),
            "samples_per_s": samples / seconds if seconds > 0 else 0.0,
        }
        (out / "train_stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def _flat_config(cfg: Config) -> dict[str, Any]:
    """The config as flat scalars (trackers' hyperparameter tables take no nesting or lists)."""
    from ldmkit.config import config_to_dict

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        items: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                items.update(flat(v, f"{prefix}{k}."))
            else:
                items[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
        return items

    return flat(config_to_dict(cfg))


def _export(accelerator, method, cfg: Config, export_dir: Path) -> None:
    if accelerator.is_main_process:
        export_dir.mkdir(parents=True, exist_ok=True)
        method.export(export_dir)
        record = method.sampling_record()  # how the export is sampled: generate, evaluate, merge-lora read it
        if record is not None:
            record.save(export_dir)
        (export_dir / "ldmkit_config.yaml").write_text(dump_config(cfg))
        from ldmkit.methods.card import write_model_card

        write_model_card(method, cfg, export_dir, Path(cfg.output_dir) / "samples")
        ckpt.write_export_manifest(export_dir)  # last: sizes and checksums of all the above
        logger.info("exported to %s", export_dir)
    accelerator.wait_for_everyone()
