"""The sampler names of the commands, without torch or diffusers (``--help`` lists them and must stay fast)."""

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
    "unipc": "UniPCMultistepScheduler",
}
"""Sampler names the commands accept -> diffusers scheduler class ("dpm" is DPM-Solver++ 2M, diffusers'
default algorithm_type "dpmsolver++" and solver_order 2; "tcd" samples TCD and PCM models, with ``eta`` as
TCD's gamma)."""

TEACHER_SOLVERS = ("ddim", "dpm", "unipc")
"""The training-free solvers ``ldmkit evaluate --teacher-solvers`` compares a distilled model with."""
