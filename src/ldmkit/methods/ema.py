"""One exponential moving average of model weights, for every method that keeps one.

Two ways to hold the average (the "shadow"):
- a copy of the parameters (``EMA(model.parameters(), ...)``): finetune's and uvit's EMA, swapped into
  the model for validation and export with ``store`` / ``copy_to`` / ``restore`` (or ``swapped_into``);
- a module whose own parameters ARE the average (``EMA(target_module, ...)``): the LCD target network,
  which the loss calls directly.

Decay schedules (``decay_at``):
- ``"constant"``: ``decay`` from the first update, no warmup (the LCD target, as the LCM references:
  diffusers ``examples/consistency_distillation/train_lcm_distill_sd_wds.py`` ``update_ema``);
- ``"ramp"``: diffusers' ``EMAModel`` default, (1 + n) / (10 + n) capped at ``decay``;
- ``"warmup"``: ``EMAModel(use_ema_warmup=True, power=...)``, 1 - (1 + n)^-power capped at ``decay``
  (@crowsonkb's warmup; the U-ViT recipe).
For both diffusers schedules, n = update - 1 and the first update uses decay 0 (it copies the weights),
as ``EMAModel.get_decay`` in diffusers ``src/diffusers/training_utils.py``; the update arithmetic is
``EMAModel.step``'s too, so these weights are bit-identical to diffusers' (tests/test_ema.py).

Checkpoints hold the update count and the shadow tensors; loading copies the saved tensors INTO the
shadow, so it stays on the device and in the dtype of the model it was made from, whatever device the
checkpoint was read onto (checkpoints load on CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from torch import nn

from ldmkit.errors import UserError

Schedule = Literal["constant", "ramp", "warmup"]
SCHEDULES = ("constant", "ramp", "warmup")


class EMA:
    """Exponential moving average ``shadow <- decay * shadow + (1 - decay) * online`` after every step.

    ``tracked``: parameters to average (copied: the shadow is a separate set of tensors on the same device
    and dtype) or a module (not copied: its parameters are the shadow and are updated in place).
    """

    def __init__(
        self,
        tracked: Iterable[torch.Tensor] | nn.Module,
        *,
        decay: float,
        schedule: Schedule = "ramp",
        power: float = 2 / 3,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"EMA schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not 0.0 <= decay <= 1.0:
            raise UserError(f"EMA decay must be in [0, 1], got {decay}")
        self.module = tracked if isinstance(tracked, nn.Module) else None
        if self.module is not None:
            self.shadow_params = list(self.module.parameters())
        else:
            self.shadow_params = [p.detach().clone() for p in tracked]
        self.decay = decay
        self.schedule = schedule
        self.power = power
        self.optimization_step = 0  # updates so far (diffusers' name)
        self.temp_stored_params: list[torch.Tensor] | None = None

    def decay_at(self, step: int) -> float:
        """Decay used by the ``step``-th update (1-based)."""
        if self.schedule == "constant":
            return self.decay
        n = step - 1
        if n <= 0:
            return 0.0
        if self.schedule == "warmup":
            value = 1 - (1 + n) ** -self.power
        else:
            value = (1 + n) / (10 + n)
        return min(value, self.decay)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.Tensor]) -> None:
        """One update towards ``parameters`` (the online model, same order as the tracked ones)."""
        online = self._matching(parameters)
        self.optimization_step += 1
        weight = 1 - self.decay_at(self.optimization_step)
        if self.schedule == "constant":
            # lerp, as the LCD target was updated before this class (its checkpoints and exports stay
            # bit-equal); the same average as below, rounded differently (fused multiply-add).
            torch._foreach_lerp_(self.shadow_params, [p.detach() for p in online], weight)
            return
        # diffusers EMAModel.step (foreach=False), expression for expression: bit-identical weights.
        for shadow, param in zip(self.shadow_params, online):
            if param.requires_grad:
                shadow.sub_(weight * (shadow - param))
            else:
                shadow.copy_(param)

    def _matching(self, parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        params = list(parameters)
        if len(params) != len(self.shadow_params):
            raise ValueError(f"EMA tracks {len(self.shadow_params)} tensors, got {len(params)}")
        return params

    # ---- swapping the average into a model (validation, export) ------------------------------------

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a CPU copy of ``parameters`` for ``restore`` (CPU: no second model on the accelerator)."""
        self.temp_stored_params = [p.detach().cpu().clone() for p in parameters]

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.Tensor]) -> None:
        """Write the average into ``parameters`` (any device or dtype: ``copy_`` converts)."""
        for shadow, param in zip(self.shadow_params, self._matching(parameters)):
            param.copy_(shadow)

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the parameters saved by ``store``."""
        if self.temp_stored_params is None:
            raise RuntimeError("EMA.restore without a store()")
        for saved, param in zip(self.temp_stored_params, parameters):
            param.copy_(saved)
        self.temp_stored_params = None

    @contextlib.contextmanager
    def swapped_into(self, parameters: Iterable[torch.Tensor]) -> Iterator[None]:
        """The average in ``parameters`` for the duration of the block, the online weights afterwards."""
        params = list(parameters)
        self.store(params)
        self.copy_to(params)
        try:
            yield
        finally:
            self.restore(params)

    # ---- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The update count and the shadow tensors (references, as ``nn.Module.state_dict``). The keys
        are those of diffusers' ``EMAModel.state_dict``, so checkpoints written with it still load."""
        return {"optimization_step": self.optimization_step, "shadow_params": self.shadow_params}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy a saved average into the shadow, which keeps its device and dtype. The schedule (decay,
        power) is the configured one, not the checkpoint's."""
        saved = state.get("shadow_params")
        if saved is None and self.module is not None:
            # Checkpoints written before this class held the LCD target as a module state dict.
            self.module.load_state_dict(state)
            return
        if saved is None or len(saved) != len(self.shadow_params):
            have = "none" if saved is None else len(saved)
            raise UserError(f"checkpoint EMA holds {have} tensors, the model has {len(self.shadow_params)}")
        for i, (shadow, tensor) in enumerate(zip(self.shadow_params, saved)):
            if shadow.shape != tensor.shape:
                raise UserError(
                    f"checkpoint EMA tensor {i} has shape {tuple(tensor.shape)}, the model {tuple(shadow.shape)}"
                )
            shadow.copy_(tensor)
        self.optimization_step = int(state.get("optimization_step", 0))
