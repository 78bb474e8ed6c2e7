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

FLOW_SCHEDULERS = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "lcm": ("FlowMatchLCMScheduler", {}),
}
"""The same sampler names on a rectified-flow model (a pipeline whose scheduler is a FlowMatch* one or runs on flow
sigmas): diffusers' flow-matching Euler and Heun, and its multistep solvers on the flow's shifted sigmas (x_t =
(1 - sigma) x_0 + sigma eps, velocity prediction; their ``flow_shift`` is the flow scheduler's ``shift``), as the
Wan / SANA pipelines configure DPM-Solver++ and UniPC. Names without a flow form (ddim, tcd) are refused there;
"heun" exists only here (the quickstart's flow teacher rows), not among the commands' SCHEDULERS."""

FLOW_TEACHER_SOLVERS = ("euler", "heun", "dpm", "unipc")
"""The training-free solvers a rectified-flow teacher is compared with (Euler first: its many-step run is the
reference set, as DDIM's is for a DDPM teacher)."""
