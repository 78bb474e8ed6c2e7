"""8-bit / 4-bit weights for the frozen base (``model.quantize``), through torchao's weight-only quantisation.

A LoRA method trains a few million parameters on a frozen denoiser of up to 12B (FLUX.1-dev): the frozen weights
dominate memory (24 GB in bf16), so storing them in int8 (12 GB) or int4 (6 GB) is what lets an LCM-LoRA of
FLUX.1-dev fit one 24 GB GPU. torchao (PyTorch's own quantisation library, maintained, CPU and CUDA kernels)
quantises the ``nn.Linear`` weights in place (``quantize_``); peft wraps the quantised linears with its
``TorchaoLoraLinear`` (peft/tuners/lora/torchao.py), whose forward is the quantised base plus the fp32 LoRA, so
training needs nothing else. Weights are quantised per output channel (int8) or per group of input features
(int4, groups of 128, or 64 / 32 for narrower layers; a layer no group divides stays unquantised), dequantised on
the fly in the forward (weight-only: activations stay in the mixed-precision dtype).

torchao is an optional dependency (``pip install ldmkit[quant]``): importing it makes every later ``import
diffusers`` slower (diffusers and peft probe it), so it is imported only when a run asks for quantisation.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch

from ldmkit.errors import UserError

log = logging.getLogger(__name__)

MODES = ("int8", "int4")
INT4_GROUPS = (128, 64, 32)
"""Group sizes of int4 weights, the largest that divides a layer's input features (torchao's int4 default: 128)."""


@contextlib.contextmanager
def _quiet_import():
    """torchao logs, at import, every optional CUDA kernel library it cannot load (all of them on a CPU build) and
    torch's pytree a deprecation per enum it registers: noise for a user who asked for weight-only quantisation."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchao():
    try:
        with _quiet_import():
            import torchao.quantization as q
            from torchao.quantization.granularity import PerGroup
    except ImportError:
        raise UserError(
            "model.quantize needs torchao, which is not installed: pip install 'ldmkit[quant]' (or torchao)"
        ) from None
    return q, PerGroup


def _plain(module: torch.nn.Module) -> bool:
    """A linear whose weight is still a plain tensor (not quantised yet)."""
    return isinstance(module, torch.nn.Linear) and type(module.weight.data) is torch.Tensor


def quantize_weights(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Quantise the ``nn.Linear`` weights of frozen ``model`` in place to ``mode`` (int8 / int4), weight-only;
    biases, norms and convolutions keep their dtype. Returns ``model``."""
    if mode not in MODES:
        raise UserError(f"model.quantize must be one of {', '.join(MODES)} or null, got {mode!r}")
    q, PerGroup = _torchao()
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    if mode == "int8":
        q.quantize_(model, q.Int8WeightOnlyConfig(), filter_fn=lambda m, _: _plain(m))
    else:
        for group in INT4_GROUPS:
            config = q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))
            q.quantize_(model, config, filter_fn=lambda m, _, g=group: _plain(m) and m.in_features % g == 0)
    left = sum(1 for m in model.modules() if _plain(m))
    # peft warns per layer that merging a LoRA into torchao weights needs the quantisation recipe: ldmkit never
    # merges into the quantised base (exports are the LoRA alone), so the warning says nothing here.
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
    log.info(
        "quantised the frozen %s's linear weights to %s (torchao, weight-only): %.1f MB of parameters before%s",
        type(model).__name__,
        mode,
        before / 2**20,
        f"; {left} linears left unquantised (no group size divides their inputs)" if left else "",
    )
    return model
