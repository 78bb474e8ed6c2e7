"""The method interface: what a training method owns, and what the one training loop owns.

A method owns its models, its ``loss(batch)`` and what happens after an optimizer step (EMA); the loop
(``ldmkit.train.loop``) owns accumulation, clipping, logging, previews, checkpoints and resume.
See docs/DESIGN.md for the batch contract.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ldmkit.config import Config, MethodConfig
from ldmkit.errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ldmkit.inference import SamplingRecord

__all__ = [
    "Method",
    "MethodConfig",
    "StepCounter",
    "check_validation_size",
    "checkpoint_with_the_forwards_tensors",
    "export_denoiser_lora",
]
logger = logging.getLogger(__name__)


def checkpoint_with_the_forwards_tensors(module: torch.nn.Module, *args):
    """diffusers' gradient checkpointing function (non-reentrant ``torch.utils.checkpoint``, as its default),
    except that the recomputation in the backward runs ``module`` as its forward ran: with the same tensors and
    the same peft adapter switches.

    A method may call one network in several states within a step, each lasting for its call only: other
    weights through ``torch.func.functional_call`` (``dmd2_lora``'s fake score: the denoiser with the fake LoRA's
    tensors; DMD2's GAN generator side: detached weights), or the LoRA switched off (``pcm_lora``'s teacher with
    ``plain_teacher`` off, whose feature pass for the adversarial term carries the student's gradient). The
    checkpointed blocks recompute later, in the backward, and would read the module's state then: the generator's
    LoRA in place of the fake one (other gradients, silently), live weights in place of detached ones, adapters on
    where they were off (other saved tensors: ``CheckpointError``). The block's tensors (a swapped-in tensor is
    what ``named_parameters`` gives during the call) and its adapter layers' off switches (peft's
    ``BaseTunerLayer._disable_adapters``, what ``disable_adapters()`` sets) are read at the forward and put back
    for the recomputation."""
    import torch.utils.checkpoint

    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    switches = {m: m._disable_adapters for m in module.modules() if hasattr(m, "_disable_adapters")}

    def run(*inputs):
        now = {m: m._disable_adapters for m in switches}
        try:
            for m, off in switches.items():
                m._disable_adapters = off
            return torch.func.functional_call(module, tensors, inputs)
        finally:
            for m, off in now.items():
                m._disable_adapters = off

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def check_validation_size(mcfg: MethodConfig) -> None:
    """``method.validation_width`` / ``validation_height``: positive multiples of 8 (diffusers' SD
    pipelines refuse other sizes), or null."""
    for key in ("validation_width", "validation_height"):
        value = getattr(mcfg, key, None)
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"method.{key} must be a multiple of 8 (at least 8), got {value}")


def export_denoiser_lora(out_dir: Path, denoiser, family, adapter: str, scheduler) -> None:
    """A distilled LoRA as every client loads it: ``pytorch_lora_weights.safetensors`` (stock
    ``load_lora_weights``), the kohya / original-layout copy where the family's clients read one, and the
    scheduler that samples it in ``scheduler/`` (its config carries the run's settings)."""
    from ldmkit.lora import adapters

    out_dir = Path(out_dir)
    adapters.export_adapter(out_dir, {"unet": denoiser}, family.pipeline_class, adapter, kohya=family.exports_kohya)
    scheduler.save_pretrained(out_dir / "scheduler")


class StepCounter:
    """Optimizer steps done, checkpointed, so a term that switches on at a step (vae's discriminator, pcm's
    adversarial term) does so at the same step after a resume."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class Method:
    """Base class. Subclasses set ``Config`` and ``trainable_names`` and implement ``loss``."""

    Config: type[MethodConfig] = MethodConfig
    trainable_names: tuple[str, ...] = ()

    # ---- what the method says of itself: the model card, the quickstart and the sampling record read these
    # (a new method declares them here, in its own module; nothing outside it compares method names).
    label: ClassVar[str] = ""
    """Short name of what it makes, for reports and tables ("LCM-LoRA"); default: the method's name."""
    title: ClassVar[str] = ""
    """Title of its model card ("Latent Consistency Model"); default: the label."""
    tags: ClassVar[tuple[str, ...]] = ()
    """Hub tags of its model card (besides ldmkit, text-to-image, diffusers)."""
    quickstart_student: ClassVar[bool] = False
    """``ldmkit quickstart --method`` offers it: it distils the quickstart's teacher (configs/<name>/quickstart.yaml)."""

    @classmethod
    def check_model(cls, cfg: Config) -> None:
        """Cross-checks of ``cfg`` against the model and data it names, when the config is resolved (config
        files only, nothing loaded; ldmkit.methods.checks). Default: none."""

    def __init__(self, cfg: Config, accelerator: Accelerator):
        self.cfg = cfg
        self.mcfg = cfg.method
        self.accelerator = accelerator

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype for frozen models: the mixed-precision dtype (trainable weights stay fp32)."""
        mp = self.accelerator.mixed_precision
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)

    def unwrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The bare module behind accelerate's DDP/compile wrappers."""
        return self.accelerator.unwrap_model(module)

    def parameters(self) -> list[torch.nn.Parameter]:
        params = []
        for name in self.trainable_names:
            params += [p for p in getattr(self, name).parameters() if p.requires_grad]
        return params

    def clip_groups(self) -> list[list[torch.nn.Parameter]]:
        """Groups of ``parameters()`` whose gradients train.max_grad_norm clips each by its own norm (the
        first group's norm is the one logged): one group, unless modules trained together must not scale
        each other's steps (vae: the autoencoder and its discriminator)."""
        return [self.parameters()]

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one, ``parameters()`` at the train.* settings, unless a module
        trained alongside needs its own (pcm's discriminator). A group's "lr" replaces train.learning_rate (and
        is scaled as it by train.scale_lr), its "betas" train.adam_beta1/2 (for optimizers that take betas)."""
        return [{"params": self.parameters()}]

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        """train.gradient_checkpointing: every trainable network that can recomputes its blocks' activations in
        the backward (diffusers' and transformers' own switches)."""
        for name in self.trainable_names:
            module = getattr(self, name)
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
            elif hasattr(module, "gradient_checkpointing_enable"):
                module.gradient_checkpointing_enable()

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (EMA updates)."""

    def checkpoint_objects(self) -> dict[str, Any]:
        """Extra objects with state_dict/load_state_dict saved in every checkpoint (EMA)."""
        return {}

    def validate(self, step: int):
        """A PIL image grid for output_dir/samples, or None."""
        return None

    def validation_size(self) -> tuple[int, int]:
        """(width, height) of the validation images: ``method.validation_width`` / ``validation_height``
        where set; otherwise, with ``data.buckets``, the bucket most training images fall into (so the
        grid shows the shape the model trains on most), else ``data.resolution`` square."""
        if not hasattr(self, "_validation_size"):
            from ldmkit.data import most_common_bucket

            res = self.cfg.data.resolution
            default, source = (res, res), "data.resolution"
            if self.cfg.data.buckets:
                common = most_common_bucket(self.cfg.data, self.encoders())
                default, source = (common, "the most common bucket") if common else (default, source)
            width = getattr(self.mcfg, "validation_width", None)
            height = getattr(self.mcfg, "validation_height", None)
            if width or height:
                source = "method.validation_width/height"
            self._validation_size = (width or default[0], height or default[1])
            logger.info("validation images: %dx%d (width x height, from %s)", *self._validation_size, source)
        return self._validation_size

    @torch.no_grad()
    def few_step_grid(self, unet: torch.nn.Module, scheduler, guidance: float, eta: float | None = None, sigmas=None):
        """The validation grid of a distilled denoiser: a row per ``train.validation_prompts``, a column per
        ``method.validation_steps``, the family's pipeline around ``unet`` with ``scheduler`` (fixed seed). The
        VAE and text encoders the training did not need are loaded for this and dropped afterwards. ``sigmas``:
        steps -> the pipeline call's sigmas (flow PCM's grid points), or None."""
        from ldmkit.inference import generate_images, image_grid

        prompts = self.cfg.train.validation_prompts
        if not prompts:
            return None
        family, steps = self.family, self.mcfg.validation_steps
        (width, height), seed = self.validation_size(), self.cfg.train.validation_seed
        was_training = unet.training
        unet.eval()
        try:
            with family.transient(), self.accelerator.autocast():
                pipe = family.pipeline(unet=unet, scheduler=scheduler)
                pipe.set_progress_bar_config(disable=True)
                columns = [
                    generate_images(
                        pipe,
                        prompts,
                        n,
                        guidance,
                        seed,
                        height=height,
                        width=width,
                        eta=eta,
                        sigmas=None if sigmas is None else sigmas(n),
                    )
                    for n in steps
                ]
                del pipe
        finally:
            unet.train(was_training)
        images = [columns[j][i] for i in range(len(prompts)) for j in range(len(steps))]  # prompt-major rows
        labels = [f"{n} step{'s' * (n > 1)}" for n in steps]
        return image_grid(images, len(steps), row_labels=prompts, col_labels=labels)

    def export(self, out_dir: Path) -> None:
        raise NotImplementedError

    def sampling_record(self) -> SamplingRecord | None:
        """How the export is sampled (ldmkit.inference.SamplingRecord), written next to it by the loop and read
        by generate, evaluate, merge-lora, the model card and the quickstart; None: nothing to sample (vae)."""
        return None

    def card_facts(self) -> list[str]:
        """Method-specific lines of the model card's facts list (markdown bullets without the dash)."""
        return []

    def base_reference(self) -> str | None:
        """``model.pretrained`` as a later command can use it: an existing local path made absolute (so it
        works from any folder), a repo id as given."""
        ref = self.cfg.model.pretrained
        if not ref:
            return None
        return str(Path(ref).resolve()) if Path(ref).exists() else str(ref)

    def encoders(self):
        """Object with encode_images/encode_prompts/fingerprint that the data cache may use, or None."""
        return None
