"""Optimizers and LR schedules of the training loop: ``train.optimizer`` (AdamW, 8-bit AdamW, Prodigy,
Adafactor, Lion, schedule-free AdamW, from their packages), and diffusers' LR schedules stepped by the loop."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ldmkit.config import Config
from ldmkit.errors import UserError


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


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter] | list[dict[str, Any]], num_processes: int):
    """The optimizer of train.optimizer over ``params``: parameters, or parameter groups (``Method.param_groups``)
    whose "lr" / "betas" replace train.learning_rate / adam_beta1/2 for their parameters."""
    t = cfg.train
    scale = t.batch_size * t.gradient_accumulation_steps * num_processes if t.scale_lr else 1
    lr = t.learning_rate * scale
    groups = list(params) if params and isinstance(params[0], dict) else [{"params": list(params)}]
    if not any(g["params"] for g in groups):
        raise UserError(f"method {cfg.method.name!r} has no trainable parameters")
    name = "adamw8bit" if t.use_8bit_adam else t.optimizer
    cls, takes = _optimizer_class(name)
    groups = [
        {k: v * scale if k == "lr" else v for k, v in g.items() if k in ("params", "lr") or k in takes} for g in groups
    ]
    knobs = {"betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_epsilon}
    kwargs: dict[str, Any] = dict(lr=lr, weight_decay=t.adam_weight_decay, **{k: knobs[k] for k in takes})
    if name == "adamw" and not {"foreach", "fused"} & set(t.optimizer_args):
        # torch's fused AdamW kernel (CPU and CUDA): one pass over each tensor instead of a chain of foreach ops
        # with temporaries. benchmarks/optimizer_step.py, 1 CPU thread, torch 2.14.1: 3.4x the speed of foreach on a
        # 17.7M-parameter UNet (full LCD: 54 -> 16 ms of a ~530 ms step), 4.7x on its rank-16 LoRA; the weights
        # agree with foreach's to rounding (4.5e-8). torch picks neither by default on a CPU (per-tensor loop).
        # Fallback: foreach, where the parameters are not all floating-point tensors on a device the kernel has.
        kwargs["fused"] = _fused_supported(groups)
        kwargs["foreach"] = not kwargs["fused"]
    if name == "adafactor":
        # A fixed learning rate with the schedule of train.lr_scheduler (transformers' docs: relative_step=False,
        # scale_parameter=False, warmup_init=False when an external lr is given).
        kwargs.update(relative_step=False, scale_parameter=False, warmup_init=False)
    kwargs.update(t.optimizer_args)
    try:
        return cls(groups, **kwargs)
    except TypeError as e:  # an optimizer_args key the optimizer does not take
        raise UserError(f"train.optimizer_args for {name}: {e}") from None


def _fused_supported(groups: list[dict[str, Any]]) -> bool:
    """Whether torch's fused AdamW takes these parameters: floating point, on CPU, CUDA or another device torch
    lists for it (torch.optim.optimizer._get_fused_kernels_supported_devices)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a private helper: if torch drops it, the two devices every torch >= 2.4 has the kernel on
        devices = {"cpu", "cuda"}
    params = [p for g in groups for p in g["params"]]
    return all(p.is_floating_point() and p.device.type in devices for p in params)


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
