"""What the quickstart knows about each distillation method (``--method``): its name in the report, whether its
export is a LoRA of the teacher or a whole pipeline, and how that export is loaded and sampled.

Every other module of the quickstart asks through the functions here, never through ``STUDENTS`` itself, so
these facts can move onto the method classes without touching the stages, the planner or the printing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldmkit.errors import UserError


@dataclass(frozen=True)
class Student:
    """How the quickstart trains, loads and samples one distillation method's export."""

    label: str
    """Its name in the report and the terminal."""
    lora: bool
    """A LoRA of the teacher (w baked in, sampled without CFG) or a whole pipeline (w through its embedding)."""
    sampler: str
    """The ``ldmkit.inference.SCHEDULERS`` name its export samples with."""


STUDENTS: dict[str, Student] = {
    "lcm_lora": Student("LCM-LoRA", lora=True, sampler="lcm"),
    "lcd": Student("LCM", lora=False, sampler="lcm"),
    "tcd_lora": Student("TCD-LoRA", lora=True, sampler="tcd"),
    "tcd": Student("TCD", lora=False, sampler="tcd"),
    "pcm_lora": Student("PCM-LoRA", lora=True, sampler="tcd"),
    "pcm": Student("PCM", lora=False, sampler="tcd"),
}
"""``--method`` -> how its student is handled; every one has a ``configs/<method>/quickstart.yaml``."""
METHODS = tuple(STUDENTS)


def resolve_method(method: str | None, lcd: bool) -> str:
    """The ``--method`` a run distils with (``--lcd`` is ``--method lcd``; default lcm_lora)."""
    if lcd and method not in (None, "lcd"):
        raise UserError(f"--lcd is --method lcd; it cannot go with --method {method}")
    method = method or ("lcd" if lcd else "lcm_lora")
    if method not in STUDENTS:
        raise UserError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    return method


def student_label(method: str) -> str:
    """The student's name in the report and the terminal ("LCM-LoRA", "TCD", ...)."""
    return STUDENTS[method].label


def student_is_lora(method: str) -> bool:
    """Whether the student is a LoRA of the teacher (else a whole pipeline)."""
    return STUDENTS[method].lora


def student_guidance(method: str, teacher_guidance: float) -> float:
    """The guidance scale the student samples with."""
    # A full student embeds w (the pipeline passes guidance_scale - 1, as it was trained); a LoRA has w baked
    # in (w fixed in its recipe) and runs without CFG.
    return 1.0 if STUDENTS[method].lora else teacher_guidance


def student_eta(student: Path, method: str) -> float | None:
    """``eta`` of the student's sampler: TCD's gamma (TCDScheduler's stochastic step, TCD paper Algorithm 4)
    as the run's ``method.gamma`` says (its model card too); PCM samples deterministically edge to edge (eta 0,
    methods/pcm.py); LCMScheduler takes none."""
    if method.startswith("pcm"):
        return 0.0
    if not method.startswith("tcd"):
        return None
    import yaml

    from ldmkit.methods.configs import TCDKnobs

    saved = Path(student) / "ldmkit_config.yaml"
    knobs = (yaml.safe_load(saved.read_text()) or {}).get("method", {}) if saved.is_file() else {}
    return float(knobs.get("gamma", TCDKnobs.gamma))


def student_sampling(student: Path, method: str, teacher_guidance: float) -> dict[str, Any]:
    """How the student was sampled (and how to sample it: the report's "what next"): ``report["sampling"]``."""
    kind = STUDENTS[method]
    return {
        "scheduler": kind.sampler,
        "eta": student_eta(student, method),
        "guidance": student_guidance(method, teacher_guidance),
        "lora": kind.lora,
    }


def load_student(student: Path, teacher: Path, method: str):
    """The student's export as a pipeline ready to sample (a LoRA: fused into the teacher)."""
    from ldmkit.inference import load_lora, load_pipeline, set_scheduler

    # A full export is a pipeline with its run's scheduler (LCMScheduler; TCDScheduler for TCD and PCM); a
    # LoRA export is loaded onto the teacher with its sampler set first, so that load_lora adopts the
    # export's scheduler settings (original_inference_steps = the distillation grid, LCM's boundary scaling),
    # as ldmkit generate does.
    kind = STUDENTS[method]
    pipe = load_pipeline(teacher if kind.lora else student)
    set_scheduler(pipe, kind.sampler)
    if kind.lora:
        load_lora(pipe, student)
        pipe.fuse_lora()  # sample at the model's speed, as a merged export would (ldmkit merge-lora)
    return pipe
