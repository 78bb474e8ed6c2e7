"""What the quickstart knows about each distillation method (``--method``): nothing of its own. A method offers
itself to the quickstart with ``Method.quickstart_student`` (and a ``configs/<method>/quickstart.yaml``); its
label and whether it is a LoRA are attributes of its class; how its export is loaded and sampled is the export's
sampling record, read by ``ldmkit.inference.load_export`` as ``ldmkit generate`` reads it. The other modules of
the quickstart ask through the functions here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldmkit.errors import UserError

DEFAULT_METHOD = "lcm_lora"


def student_methods(objective: str = "eps") -> dict[str, type]:
    """``--method`` -> its Method class: every registered method that distils the quickstart's teacher; for a
    flow teacher (``objective`` flow) those whose class says ``supports_flow``."""
    from ldmkit.methods import get_method, registered_methods

    classes = {name: get_method(name) for name in registered_methods()}
    return {
        name: cls
        for name, cls in classes.items()
        if getattr(cls, "quickstart_student", False) and (objective != "flow" or getattr(cls, "supports_flow", False))
    }


def resolve_method(method: str | None, lcd: bool, objective: str = "eps") -> str:
    """The ``--method`` a run distils with (``--lcd`` is ``--method lcd``; default lcm_lora); with ``objective``
    flow one that distils a rectified-flow teacher."""
    asked = {m for m in (method, "lcd" if lcd else None) if m}  # --lcd is the older spelling of --method lcd
    if len(asked) > 1:
        raise UserError(f"--lcd is --method lcd; it cannot go with --method {method}")
    method = asked.pop() if asked else DEFAULT_METHOD
    methods = student_methods()
    if method not in methods:
        raise UserError(f"unknown --method {method!r}; choose one of: {', '.join(methods)}")
    flow = student_methods(objective)
    if method not in flow:
        raise UserError(
            f"--method {method} does not distil a rectified-flow teacher (--objective {objective}) yet; "
            f"choose one of: {', '.join(flow)}"
        )
    return method


def _cls(method: str) -> type:
    return student_methods()[method]


def student_label(method: str) -> str:
    """The student's name in the report and the terminal ("LCM-LoRA", "TCD", ...)."""
    cls = _cls(method)
    return cls.label or method


def student_is_lora(method: str) -> bool:
    """Whether the student is a LoRA of the teacher (else a whole pipeline): its config is a LoRA config
    (``LoraKnobs``). Read from the config class, which imports no torch (the planner runs for ``--help``)."""
    from ldmkit.methods import get_config_class
    from ldmkit.methods.configs import LoraKnobs

    return issubclass(get_config_class(method), LoraKnobs)


def _record(student: Path):
    from ldmkit.inference import read_sampling_record

    return read_sampling_record(student) if Path(student).exists() else None


def student_guidance(student: Path, method: str, teacher_guidance: float) -> float:
    """The guidance scale the student samples with: its record's (a LoRA: w baked in, no CFG pass), except that a
    student taking w through an embedding is sampled at the teacher's guidance, so both are judged at one w."""
    record = _record(student)
    if record is None:  # an export of an older ldmkit: a LoRA runs without CFG, a full student embeds w
        return 1.0 if student_is_lora(method) else teacher_guidance
    return teacher_guidance if record.guidance_embedded else record.guidance


def student_eta(student: Path, method: str) -> float | None:
    """``eta`` of the student's sampler, as its record says (TCD's gamma; PCM 0; LCM none). An older export without
    a record: the run's ``method.gamma`` if it had one (TCD), else the pipeline's default."""
    record = _record(student)
    if record is not None:
        return record.eta
    import yaml

    saved = Path(student) / "ldmkit_config.yaml"
    knobs = (yaml.safe_load(saved.read_text()) or {}).get("method", {}) if saved.is_file() else {}
    return float(knobs["gamma"]) if "gamma" in knobs else None


def student_sampling(student: Path, method: str, teacher_guidance: float) -> dict[str, Any]:
    """How the student was sampled (and how to sample it: the report's "what next"): ``report["sampling"]``.
    ``recorded``: the export carries its sampling record, so ``ldmkit generate`` needs no sampler flags."""
    from ldmkit.diffusion.samplers import SCHEDULERS

    record = _record(student)
    names = {cls: name for name, cls in SCHEDULERS.items()}
    scheduler = names.get(record.scheduler, record.scheduler) if record is not None else None
    return {
        "scheduler": scheduler or "lcm",
        "eta": student_eta(student, method),
        "guidance": student_guidance(student, method, teacher_guidance),
        "lora": student_is_lora(method),
        "recorded": record is not None,
        "record_guidance": None if record is None else record.guidance,
    }


def load_student(student: Path, teacher: Path, method: str):
    """The student's export as a pipeline ready to sample, as its record says (``inference.load_export``: a LoRA
    on the teacher with the export's scheduler, fused so it samples at the model's speed, as a merged export
    would; a whole pipeline as it is)."""
    from ldmkit.inference import load_export

    lora = student_is_lora(method)
    pipe, _ = load_export(student, base=teacher if lora else None)
    if lora:
        pipe.fuse_lora()
    return pipe
