"""The sampler names of the commands, without torch or diffusers (``--help`` lists them and must stay fast)."""

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "lcm": "LCMScheduler",
}
"""Sampler names the commands accept -> diffusers scheduler class."""
