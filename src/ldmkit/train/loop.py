"""The one training loop. It knows nothing about diffusion: a method supplies models and ``loss``.

What the loop owns (docs/DESIGN.md, Method contract): accelerate set-up, data, AdamW, LR schedule, accumulation, clipping,
logging (progress bar, TensorBoard, metrics.jsonl), validation grids, checkpoints and resume, export.

Resume = run the same command again (after NVlabs/edm2): the latest complete checkpoint restores
weights, optimizer, LR schedule, RNG, method extras (EMA) and the data position. Because every random
draw of a step comes from per-sample seeds (rng.py) and the sampler can start at any batch
(data/sampler.py), a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from ldmkit.config import Config, dump_config
from ldmkit.errors import Interrupted, UserError
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


def _optimizer_class(name: str):
    """(class, the keyword arguments it takes from train.*) of each train.optimizer; optional packages
    give a one-line UserError when missing."""
    packages = {
        "adamw8bit": ("bitsandbytes", "bitsandbytes"),
        "prodigy": ("prodigyopt", "prodigyopt"),
        "lion": ("lion_pytorch", "lion-pytorch"),
        "adamw_schedulefree": ("schedulefree", "schedulefree"),
    }
    if name in packages:
        module, pip_name = packages[name]
        try:
            mod = __import__(module)
        except ImportError:
            raise UserError(f"train.optimizer={name} needs the {module} package: pip install {pip_name}") from None
    if name == "adamw":
        return torch.optim.AdamW, ("betas", "eps")
    if name == "adamw8bit":
        return mod.optim.AdamW8bit, ("betas", "eps")
    if name == "prodigy":
        return mod.Prodigy, ("betas", "eps")  # Mishchenko & Defazio 2023, arXiv:2306.06101
    if name == "lion":
        return mod.Lion, ("betas",)  # Chen et al. 2023, arXiv:2302.06675
    if name == "adamw_schedulefree":
        return mod.AdamWScheduleFree, ("betas", "eps")  # Defazio et al. 2024, arXiv:2405.15682
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor, ()
    raise UserError(f"unknown train.optimizer {name!r}")


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter], num_processes: int):
    t = cfg.train
    lr = t.learning_rate
    if t.scale_lr:
        lr *= t.batch_size * t.gradient_accumulation_steps * num_processes
    if not params:
        raise UserError(f"method {cfg.method.name!r} has no trainable parameters")
    name = "adamw8bit" if t.use_8bit_adam else t.optimizer
    cls, takes = _optimizer_class(name)
    knobs = {"betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_epsilon}
    kwargs: dict[str, Any] = dict(lr=lr, weight_decay=t.adam_weight_decay, **{k: knobs[k] for k in takes})
    if name == "adamw":
        # foreach: one fused kernel per step over all tensors; torch picks it only on CUDA by default, and the
        # per-tensor loop costs 3x as much on CPU for a LoRA's hundreds of small tensors (benchmarks/lora_cache.py).
        kwargs["foreach"] = True
    if name == "adafactor":
        # A fixed learning rate with the schedule of train.lr_scheduler (transformers' docs: relative_step=False,
        # scale_parameter=False, warmup_init=False when an external lr is given).
        kwargs.update(relative_step=False, scale_parameter=False, warmup_init=False)
    kwargs.update(t.optimizer_args)
    try:
        return cls(params, **kwargs)
    except TypeError as e:  # an optimizer_args key the optimizer does not take
        raise UserError(f"train.optimizer_args for {name}: {e}") from None


def weights_mode(optimizer, train: bool) -> None:
    """Schedule-free optimizers keep two sets of weights: the ones to step (train) and the averaged ones to
    evaluate and save (eval); others have no modes (schedulefree's README: call train()/eval())."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if "train_mode" in inner.param_groups[0]:
        inner.train() if train else inner.eval()


@contextlib.contextmanager
def evaluation_weights(optimizer):
    weights_mode(optimizer, train=False)
    try:
        yield
    finally:
        weights_mode(optimizer, train=True)


def make_lr_scheduler(cfg: Config, optimizer):
    """diffusers' get_scheduler, stepped once per optimizer step by the loop itself.

    It is deliberately not passed through ``accelerator.prepare``: a prepared scheduler steps once per
    process unless batches are split, which silently shortens warmup and decay on several GPUs
    (a known fault of diffusers' training examples with accelerate >= 1.0).
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.train.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )


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


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (what clusters send before killing a job) only set a flag: the loop
    finishes the step it is in, saves a checkpoint and raises ``Interrupted``. A KeyboardInterrupt raised
    at an arbitrary point could land between ``optimizer.step()`` and ``step += 1`` and save one step's
    weights under another step's name. A second Ctrl-C aborts at once (the last checkpoint stays)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        import signal

        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(
            "%s: finishing this step and saving a checkpoint (Ctrl-C again aborts without saving)",
            signal.Signals(signum).name,
        )

    def requested(self, accelerator) -> int | None:
        """The signal every process stops for (processes agree, so all of them save together)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        signum = int(accelerator.reduce(flag, reduction="max").item())
        return signum or None


class RunLock:
    """An exclusive lock on output_dir (fcntl.flock, released by the OS if the process dies), so a second
    run started on the same folder stops with one line instead of racing the first."""

    def __init__(self, out: Path, enabled: bool):
        self.path, self.enabled, self.file = out / ".ldmkit.lock", enabled, None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs are not locked there
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"output_dir {self.path.parent} is in use by another ldmkit run ({holder})") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()


def _check_rerun(cfg: Config, out: Path, latest_step: int | None) -> None:
    """A re-run of an output_dir that holds a run: the same config resumes (or is finished), a raised
    train.max_steps continues to the new end, anything else that changes what is computed stops with the
    changed keys unless train.allow_config_change says to go on."""
    import yaml

    from ldmkit.config import config_changes, config_to_dict, is_bookkeeping

    saved = out / "config.yaml"
    if latest_step is None or not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"{saved} is unreadable: restore it, or start again with --train.resume_from=none") from None
    changes = [c for c in config_changes(old, config_to_dict(cfg)) if not is_bookkeeping(c[0])]
    max_steps = [c for c in changes if c[0] == "train.max_steps"]
    if max_steps and cfg.train.max_steps < latest_step:
        raise UserError(
            f"train.max_steps={cfg.train.max_steps} is below the step of the latest checkpoint in {out} "
            f"({latest_step}); raise it, or start again with --train.resume_from=none"
        )
    if max_steps and max_steps[0][2] > max_steps[0][1]:
        logger.info("train.max_steps raised from %s to %s: continuing to the new end", *max_steps[0][1:])
        changes.remove(max_steps[0])
    if not changes:
        return
    listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)
    if not cfg.train.allow_config_change:
        raise UserError(
            f"{out} holds a run with another config ({listed}); --train.allow_config_change=true continues it "
            "with the new values, --train.resume_from=none starts again (the old run is kept in previous/), "
            "or choose another output_dir"
        )
    logger.warning("continuing %s with a changed config: %s", out, listed)


def _set_aside(out: Path) -> None:
    """train.resume_from=none: move what output_dir holds from an earlier run to output_dir/previous/."""
    names = ["checkpoints", "export", "samples", "logs", "metrics.jsonl", "config.yaml"]
    present = [out / n for n in names if (out / n).exists()]
    if not present:
        return
    dest = out / "previous" / time.strftime("run-%Y%m%d-%H%M%S")
    dest.mkdir(parents=True)
    for p in present:
        p.rename(dest / p.name)
    logger.info("train.resume_from=none: the earlier run in %s moved to %s", out, dest)


def _resume_point(cfg: Config, out: Path) -> tuple[int, Path] | None:
    """The checkpoint to start from: ``train.resume_from`` (latest | none | a folder), verified."""
    where = cfg.train.resume_from
    if where == "none":
        return None
    if where == "latest":
        return ckpt.latest_valid_checkpoint(out / "checkpoints")
    path = Path(where)
    if not (path / ckpt.STATE_FILE).is_file():
        raise UserError(f"train.resume_from: {path} is not an ldmkit checkpoint (no {ckpt.STATE_FILE})")
    problem = ckpt.damage(path)
    if problem is not None:
        raise UserError(f"train.resume_from: checkpoint {path} is damaged: {problem}")
    return int(ckpt.read_state(path)["step"]), path


def train(cfg: Config, accelerator=None) -> Path:
    """Run (or resume) the training described by ``cfg``; returns the export folder."""
    out = Path(cfg.output_dir)
    main = accelerator.is_main_process if accelerator is not None else int(os.environ.get("RANK", "0")) == 0
    with RunLock(out, enabled=main):
        if cfg.train.resume_from == "none" and main:
            _set_aside(out)
        return _train(cfg, out, accelerator)


def _train(cfg: Config, out: Path, accelerator) -> Path:
    from accelerate.utils import set_seed

    from ldmkit.data import build_loader
    from ldmkit.methods import get_method

    t = cfg.train
    export_dir = out / "export"
    resume = _resume_point(cfg, out)
    _check_rerun(cfg, out, resume[0] if resume else None)
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
    apply_speed_levers(cfg, method)
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
    weights_mode(optimizer, train=True)

    step, samples_seen = 0, 0
    if resume is not None:
        step, path = resume
        accelerator.load_state(str(path))
        ckpt.load_extra(path, {"lr_scheduler": lr_scheduler, **method.checkpoint_objects()})
        samples_seen = ckpt.read_state(path)["samples_seen"]
        logger.info("resumed from %s", path)
        if accelerator.is_main_process:
            _truncate_metrics(out / "metrics.jsonl", step)

    if step >= t.max_steps:
        _write_stats(accelerator, out, step, 0, 0.0, 0)
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

    if accelerator.is_main_process and accelerator.trackers == [] and tracker_names(cfg):
        accelerator.init_trackers("ldmkit", config=_flat_config(cfg))
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
    clip_groups = method.clip_groups()
    tick = time.perf_counter()
    window_steps = 0
    first_step, started, paused_total = step, tick, 0.0  # training time of this run: validation and saving excluded
    try:
        with StopSignals() as stop:
            while step < t.max_steps:
                loss_sum, logs_sum = torch.zeros((), device=accelerator.device), {}
                grad_norm = None
                for _ in range(micro_per_step):
                    batch = _to_device(next(data_iter), accelerator.device)
                    with accelerator.accumulate(*[getattr(method, n) for n in method.trainable_names]):
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
                    for key in ("skipped", "replaced_captions"):  # data problems met so far (this rank)
                        if getattr(loader, key, 0):
                            record[f"data_{key}"] = getattr(loader, key)
                    record.update({k: v / micro_per_step for k, v in logs_sum.items()})
                    if not math.isfinite(loss_mean):
                        raise FloatingPointError(
                            f"loss is {loss_mean} at step {step}; lower the learning rate or use bf16/fp32"
                        )
                    metrics.write(record)
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                    bar.set_postfix(
                        loss=f"{loss_mean:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}"
                    )
                    tick, window_steps = time.perf_counter(), 0
                bar.update(1)

                signum = stop.requested(accelerator)
                paused = time.perf_counter()  # samples/s counts training only, not validation or saving
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

    if getattr(loader, "skipped", 0) or getattr(loader, "replaced_captions", 0):
        logger.warning(
            "data: %d unreadable samples were skipped (replaced by readable ones), %d captions were not UTF-8",
            loader.skipped,
            loader.replaced_captions,
        )
    seconds = time.perf_counter() - started - paused_total
    _write_stats(accelerator, out, step, step - first_step, seconds, (step - first_step) * global_batch)
    weights_mode(optimizer, train=False)  # schedule-free: validate and export the averaged weights
    save_validation(accelerator, method, cfg, step)
    _export(accelerator, method, cfg, export_dir)
    accelerator.end_training()
    return export_dir


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
        (export_dir / "ldmkit_config.yaml").write_text(dump_config(cfg))
        from ldmkit.methods.card import write_model_card

        write_model_card(method, cfg, export_dir, Path(cfg.output_dir) / "samples")
        logger.info("exported to %s", export_dir)
    accelerator.wait_for_everyone()
