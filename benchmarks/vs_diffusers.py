"""ldmkit against diffusers' own LCM scripts on the same job, side by side (issue 14).

    python benchmarks/vs_diffusers.py DIFFUSERS [--methods lcm_lora,lcd] [--batch 8] [--resolution 64] [--rank 16]
    python benchmarks/vs_diffusers.py DIFFUSERS --full-size          # SD1.5-size UNet (random weights): memory

DIFFUSERS is a diffusers checkout, a bare git directory of one (read at HEAD), or one of the peer scripts
(``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py`` for lcm_lora,
``train_lcm_distill_sd_wds.py`` for lcd). The peers need torchvision and braceexpand: run this script
with a Python that has them and ldmkit (both tools then use the same torch). The peers run from a
TEMPORARY copy with the one fix they need on webdataset 1.x (skip the empty end-of-shard sample, which
has no ``fname``: ``KeyError: 'fname'`` otherwise) and ``--dataloader_num_workers=1`` (0 divides by zero in
their dataset sizing); nothing of theirs is kept.

Both tools train the same locally built model (SD1.5 layout, small widths; ``--full-size``: SD1.5's real UNet
config with random weights) on the same WebDataset shards of synthetic shapes, at the same batch,
resolution, LoRA rank (alpha = rank), learning rate, guidance range, DDIM grid and loss, with one torch
thread each and one data-loader worker each, in one invocation, interleaved (peer, ldmkit, peer, ldmkit).

- samples/s (steady state), two ways: each configuration runs twice, for ``--steps`` A and B optimizer steps, as
  whole processes; (B - A) * batch / (wall(B) - wall(A)) cancels start-up, model loading, data-loader start,
  cache building and the final save, which both runs pay alike. And batch / the median time between two
  optimizer steps (a global optimizer post-hook in the child stamps every step of both tools; the first
  WARMUP_STEPS are left out): one stalled step moves a wall time, not a median, so this is the steadier figure.
- memory "as a GPU would hold it": the bytes of the parameters and buffers of every live module, the
  gradients and the optimizer state at the end of an optimizer step, plus everything the next step
  allocates (activations, gradients, temporaries) while it is alive, at its peak: a TorchDispatchMode sees
  every tensor an op creates and a weakref on its storage sees it freed. Not RSS, which on a CPU counts
  memory-mapped weight files once for several models that share them (the peer's two UNets), and counts
  the data-loader's host memory. One optimizer step is tracked (the 4th), in a separate run, since the
  tracking slows the step.

Three settings: ``fp32`` (both tools at ``--mixed_precision no``: weights, student and optimizer in float32),
``matched`` and ``best``. At ``no`` the peer still runs its teacher passes under ``torch.autocast(device)``
(bf16 on a CPU, fp16 on CUDA: autocast's default dtype), and the LoRA script its target pass too (read in
diffusers' scripts at 58eb52c: the LoRA script's ``autocast_ctx = torch.autocast(accelerator.device.type)``
around the teacher and the target; the full script's teacher the same, its target under
``torch.autocast(..., dtype=weight_dtype)``, which at ``no`` is float32, i.e. off), while ldmkit runs every
pass in float32: ``fp32`` is not like for like. ``matched`` runs ldmkit at ``no`` with the same passes under
the same autocast (PEER_AUTOCAST; ldmkit's teacher context and target wrapped in this script's child process,
nothing of ldmkit changed). ``best``: each tool at its best for the device: the peer with
``--mixed_precision=bf16 --cast_teacher_unet`` (PyTorch SDPA attention, its default; xformers has no CPU
kernels), ldmkit with ``--ldmkit-best``, by default its data cache and bf16 autocast. bf16 is chosen for
"best" when the CPU has bf16 matrix instructions (AMX / AVX512-BF16) or a CUDA device is present;
``--best-precision`` overrides it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import runpy
import shlex
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

METHODS = ("lcm_lora", "lcd")
PEER_SCRIPTS = {
    "lcm_lora": "examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py",
    "lcd": "examples/consistency_distillation/train_lcm_distill_sd_wds.py",
}
# ldmkit's best settings on this kind of machine, as --section.key=value overrides (see the README's table for
# what each contributed). "{bf16}" is replaced by the chosen precision.
LDMKIT_BEST = "data.cache=true,train.mixed_precision={bf16}"
SETTINGS = ("fp32", "matched", "best")
# The passes each peer runs under torch.autocast(device) with autocast's default dtype whatever its
# --mixed_precision (diffusers 58eb52c, examples/consistency_distillation): the LoRA script's one autocast_ctx
# wraps the teacher's two passes and the target pass; the full script's teacher passes the same, its target
# pass dtype=weight_dtype (float32 at "no": autocast off).
PEER_AUTOCAST = {"lcm_lora": ("teacher", "target"), "lcd": ("teacher",)}
PEER_AUTOCAST_LINE = "torch.autocast(accelerator.device.type)"
MEMORY_STEP = 4  # the optimizer step whose memory is tracked (after warm-up: optimizer state exists)
WARMUP_STEPS = 3  # optimizer steps left out of the step-interval figure


# ---- the peers -----------------------------------------------------------------------------------
PEER_FIX_FROM = '        fname, value = filesample["fname"], filesample["data"]\n'
PEER_FIX_TO = (
    '        if "fname" not in filesample:  # webdataset 1.x: the empty end-of-shard sample\n'
    "            continue\n" + PEER_FIX_FROM
)


def peer_source(where: str, method: str) -> str:
    """The peer script's text from a checkout, a bare git directory, or the script file itself."""
    path = Path(where)
    if path.is_file():
        if path.name != Path(PEER_SCRIPTS[method]).name:
            raise SystemExit(f"{path} is not the {method} peer ({Path(PEER_SCRIPTS[method]).name})")
        return path.read_text()
    if (path / PEER_SCRIPTS[method]).is_file():
        return (path / PEER_SCRIPTS[method]).read_text()
    r = subprocess.run(["git", "-C", str(path), "show", f"HEAD:{PEER_SCRIPTS[method]}"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"no {PEER_SCRIPTS[method]} in {path}: {r.stderr.strip()}")
    return r.stdout


def peer_copy(where: str, method: str, tmp: Path) -> Path:
    """A temporary copy of the peer with the webdataset 1.x fix applied (asserted to apply once)."""
    text = peer_source(where, method)
    if text.count(PEER_FIX_FROM) != 1:
        raise SystemExit(f"the {method} peer changed: its tar reader line was not found once; update PEER_FIX_FROM")
    if PEER_AUTOCAST_LINE not in text:
        print(
            f"warning: the {method} peer has no {PEER_AUTOCAST_LINE} any more: the notes on its autocast at fp32 "
            "and the 'matched' setting may be out of date (PEER_AUTOCAST)",
            file=sys.stderr,
        )
    out = tmp / Path(PEER_SCRIPTS[method]).name
    out.write_text(text.replace(PEER_FIX_FROM, PEER_FIX_TO))
    return out


# ---- model and data ------------------------------------------------------------------------------
def build_model(out: Path, full_size: bool) -> Path:
    """The small SD1.5-layout model of benchmarks/lcm_throughput.py, or (full_size) SD1.5's UNet config with
    random weights next to a small VAE and text encoder (the UNet is what the memory comparison is about)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from lcm_throughput import build_model as build_small

    build_small(out)
    if full_size:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(0)
        # diffusers' UNet2DConditionModel defaults are SD1.5's layout; SD1.5 sets these (its unet/config.json).
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        unet.save_pretrained(out / "unet")
        text = CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
        cfg = text.config.to_dict()
        cfg.update(hidden_size=768, intermediate_size=768 * 4, num_attention_heads=12)
        CLIPTextModel(
            CLIPTextConfig(**{k: v for k, v in cfg.items() if k in CLIPTextConfig().to_dict()})
        ).save_pretrained(out / "text_encoder")
    return out


def write_shards(out: Path, num: int, resolution: int) -> str:
    """WebDataset shards of synthetic shapes (``KEY.png``, ``KEY.txt``, ``KEY.json``); a brace pattern."""
    from ldmkit.data.synth import write_dataset

    shards = sorted(out.glob("*.tar")) if out.is_dir() else []
    if not shards:  # written once per work folder
        shards = write_dataset(out, num=num, fmt="wds", size=resolution, seed=0, shard_size=max(num // 4, 1))
    stems = sorted(p.stem for p in shards)
    prefix, first, last = stems[0].rsplit("-", 1)[0], stems[0].rsplit("-", 1)[1], stems[-1].rsplit("-", 1)[1]
    return str(out / f"{prefix}-{{{first}..{last}}}.tar")


# ---- the commands ---------------------------------------------------------------------------------
def peer_args(args, script: Path, method: str, model: Path, shards: str, steps: int, precision: str, out: Path):
    a = [
        "peer",
        str(script),
        f"--pretrained_teacher_model={model}",
        f"--output_dir={out}",
        f"--train_shards_path_or_url={shards}",
        f"--resolution={args.resolution}",
        f"--train_batch_size={args.batch}",
        f"--max_train_steps={steps}",
        f"--max_train_samples={args.num_images}",
        f"--learning_rate={args.lr}",
        "--dataloader_num_workers=1",
        "--w_min=5.0",
        "--w_max=15.0",
        "--num_ddim_timesteps=50",
        "--loss_type=l2",
        "--checkpointing_steps=1000000",
        "--validation_steps=1000000",
        "--seed=0",
        f"--mixed_precision={precision}",
    ]
    if method == "lcm_lora":
        a += [f"--lora_rank={args.rank}", f"--lora_alpha={args.rank}"]
    else:
        a += ["--unet_time_cond_proj_dim=256", "--ema_decay=0.95"]
    if precision != "no":
        a.append("--cast_teacher_unet")
    return a


def ldmkit_args(args, method: str, model: Path, shards: str, steps: int, overrides: list[str], out: Path):
    knobs = (
        [f"--method.lora_rank={args.rank}", f"--method.lora_alpha={args.rank}"]
        if method == "lcm_lora"
        else ["--method.unet_time_cond_proj_dim=256", "--method.ema_decay=0.95"]
    )
    return [
        "ldmkit",
        "train",
        f"--method.name={method}",
        "--method.w_min=5.0",
        "--method.w_max=15.0",
        "--method.num_ddim_timesteps=50",
        "--method.loss_type=l2",
        *knobs,
        f"--model.pretrained={model}",
        f"--data.path={shards}",
        f"--data.resolution={args.resolution}",
        "--data.num_workers=1",
        f"--data.cache_dir={out / 'cache'}",  # a fresh cache per run: both runs of a pair build it alike
        f"--train.batch_size={args.batch}",
        f"--train.max_steps={steps}",
        f"--train.learning_rate={args.lr}",
        "--train.checkpoint_every=0",
        "--train.seed=0",
        "--train.report_to=tensorboard",  # as the peer (its default)
        f"--output_dir={out}",
        *[f"--{o}" for o in overrides],
    ]


def run_child(
    args,
    cmd: list[str],
    memory_json: Path | None = None,
    step_times: Path | None = None,
    autocast: tuple[str, ...] = (),
) -> float:
    """Run one training in a fresh process; returns its wall time (s). ``step_times``: where the child writes the
    time stamps of its optimizer steps; ``autocast``: ldmkit's passes to run under the peer's autocast."""
    env = {
        "LDMKIT_BENCH_AUTOCAST": ",".join(autocast),
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LDMKIT_BENCH_STEP_TIMES": str(step_times or ""),
    }
    full = [sys.executable, __file__, "--child", str(memory_json or ""), "--", *cmd]
    log = Path(cmd[[i for i, c in enumerate(cmd) if c.startswith("--output_dir")][0]].split("=", 1)[1]).with_suffix(
        ".log"
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        # The command first, so a run can be repeated by hand (e.g. under a profiler).
        f.write(f"$ {shlex.join(full)}\n")
        f.flush()
        r = subprocess.run(full, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{' '.join(cmd[:2])} failed (exit {r.returncode}); log {log}:\n{tail}")
    return wall


# ---- memory as a GPU would hold it ------------------------------------------------------------------
class LiveTensorBytes:
    """Bytes of live tensor storages: a baseline census plus every storage an op creates, until it is freed."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker.track(t)
                return out

        self.mode = Mode()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def track(self, t: torch.Tensor) -> int:
        if t.device.type == "meta" or t.layout != torch.strided:
            return 0
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return 0
        n = st.nbytes()
        self.live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)
        return n

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def census(self) -> dict[str, int]:
        """What is resident at the end of an optimizer step: module weights, gradients, optimizer state."""
        gc.collect()
        parts = {"weights": 0, "grads": 0, "optimizer": 0}
        objs = gc.get_objects()
        for o in objs:
            if isinstance(o, torch.nn.Module):
                for t in [*o.parameters(recurse=False), *o.buffers(recurse=False)]:
                    parts["weights"] += self.track(t)
                    if t.grad is not None:
                        parts["grads"] += self.track(t.grad)
        for o in objs:
            if isinstance(o, torch.optim.Optimizer):
                for state in o.state.values():
                    for t in state.values():
                        if isinstance(t, torch.Tensor):
                            parts["optimizer"] += self.track(t)
        return parts


def child(memory_json: str, cmd: list[str]) -> int:
    """Run the peer script or ``ldmkit train`` in this process; with memory_json, track one optimizer step."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if memory_json:
        tracker, steps, result = LiveTensorBytes(), [0], {}

        def hook(optimizer, *_):
            steps[0] += 1
            if steps[0] == MEMORY_STEP - 1:
                result["resident"] = tracker.census()
                tracker.peak = tracker.current
                tracker.mode.__enter__()
            elif steps[0] == MEMORY_STEP:
                tracker.mode.__exit__(None, None, None)
                result["peak_bytes"] = tracker.peak
                Path(memory_json).write_text(json.dumps(result))
                sys.stdout.flush()
                os._exit(0)  # nothing after this step is measured

        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(hook)
    else:  # the time of every optimizer step (what happens between two of them: data, loss, backward, update)
        import atexit

        from torch.optim.optimizer import register_optimizer_step_post_hook

        stamps: list[float] = []
        register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
        out = os.environ.get("LDMKIT_BENCH_STEP_TIMES")
        if out:
            atexit.register(lambda: Path(out).write_text(json.dumps(stamps)))
    kind, rest = cmd[0], cmd[1:]
    passes = tuple(p for p in os.environ.get("LDMKIT_BENCH_AUTOCAST", "").split(",") if p)
    if kind == "ldmkit" and passes:
        match_peer_autocast(passes)
    try:
        if kind == "peer":
            sys.argv = rest
            runpy.run_path(rest[0], run_name="__main__")
        else:
            from ldmkit.cli import main as ldmkit_main

            return ldmkit_main(rest) or 0
    except SystemExit as e:
        return int(e.code or 0)
    return 0


# ---- the peer's autocast, matched on ldmkit's side ------------------------------------------------------
class AutocastModule(torch.nn.Module):
    """``module`` called under ``torch.autocast(device_type)`` with autocast's default dtype, as the peer calls
    its target (``with autocast_ctx: unet(...)``)."""

    def __init__(self, module: torch.nn.Module, device_type: str):
        super().__init__()
        self.module, self.device_type = module, device_type

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type):
            return self.module(*args, **kwargs)


def match_peer_autocast(passes: tuple[str, ...]) -> None:
    """Run ldmkit's LCD-family teacher passes (``teacher``) and target pass (``target``) under
    ``torch.autocast(device)`` as the peer does at every --mixed_precision (PEER_AUTOCAST). Patched in the
    child process only: the method's Roles (methods/lcd.py) get an autocast teacher context and a wrapped
    target; the student, the loss and everything else stay as they are."""
    import contextlib
    import dataclasses

    from ldmkit.methods.lcd import _LCDBase

    unknown = set(passes) - {"teacher", "target"}
    if unknown:
        raise SystemExit(f"unknown autocast passes {sorted(unknown)}: teacher, target")
    original = _LCDBase.consistency_pair

    def consistency_pair(self, batch, roles):
        device_type = self.device.type
        if "teacher" in passes:
            inner = roles.teacher_context

            @contextlib.contextmanager
            def teacher_context():
                with inner(), torch.autocast(device_type):
                    yield

            roles = dataclasses.replace(roles, teacher_context=teacher_context)
        if "target" in passes:
            roles = dataclasses.replace(roles, target=AutocastModule(roles.target, device_type))
        return original(self, batch, roles)

    _LCDBase.consistency_pair = consistency_pair


def autocast_note(method: str, device_type: str) -> str:
    """What the peer runs under autocast at --mixed_precision=no, in words."""
    dtype = str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")
    passes = " and ".join(PEER_AUTOCAST[method])
    return f"the peer's {passes} passes run under torch.autocast({device_type}) = {dtype}"


# ---- the benchmark ---------------------------------------------------------------------------------
def label(setting: str) -> str:
    """The setting as the tables print it: fp32 with a star, pointing at the note on the peer's autocast."""
    return "fp32*" if setting == "fp32" else setting


def supported_torch() -> tuple[str, bool] | None:
    """(ldmkit's torch requirement, whether this torch meets it), or None when ldmkit's metadata is not installed."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        reqs = [Requirement(r) for r in metadata.requires("ldmkit") or []]
    except metadata.PackageNotFoundError:
        return None
    torch_req = next((r for r in reqs if r.name == "torch" and not r.marker), None)
    if torch_req is None:
        return None
    version = torch.__version__.split("+")[0]
    return f"torch{torch_req.specifier}", torch_req.specifier.contains(version, prereleases=True)


def best_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no"
    return "bf16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "no"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("diffusers", nargs="?", help="diffusers checkout, its bare git directory, or a peer script.")
    p.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset of lcm_lora,lcd.")
    p.add_argument("--batch", type=int, default=8, help="Samples per optimizer step (both tools).")
    p.add_argument("--resolution", type=int, default=64, help="Image side in pixels.")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank) for lcm_lora.")
    p.add_argument("--lr", type=float, default=1e-4, help="Learning rate (both tools).")
    p.add_argument("--num-images", type=int, default=256, help="Synthetic training images in the shards.")
    p.add_argument("--steps", default="10,40", help="A,B: steady state = (B - A) steps over wall(B) - wall(A).")
    p.add_argument("--rounds", type=int, default=1, help="Interleaved rounds (the median is reported).")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process.")
    p.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help="Comma-separated subset of fp32 (both at --mixed_precision=no; the peer's teacher / target passes still "
        "autocast), matched (fp32 with ldmkit's same passes under the same autocast), best.",
    )
    p.add_argument(
        "--best-precision", default="auto", choices=("auto", "no", "bf16", "fp16"), help="Precision of 'best'."
    )
    p.add_argument("--ldmkit-best", default=LDMKIT_BEST, help="ldmkit's overrides for 'best' (section.key=value,...).")
    p.add_argument("--no-memory", action="store_true", help="Skip the memory runs.")
    p.add_argument("--no-throughput", action="store_true", help="Skip the samples/s runs.")
    p.add_argument(
        "--full-size", action="store_true", help="SD1.5-size UNet (random weights): memory only, batch 2, rank 64."
    )
    p.add_argument("--out", help="Work folder (kept); default: a temporary folder.")
    p.add_argument("--child", help=argparse.SUPPRESS)
    if argv is None:
        argv = sys.argv[1:]
    if "--child" in argv:  # internal: python vs_diffusers.py --child MEMORY_JSON -- peer|ldmkit ...
        i = argv.index("--")
        return child(argv[argv.index("--child") + 1], argv[i + 1 :])
    args = p.parse_args(argv)
    if not args.diffusers:
        p.error("give the diffusers checkout (or its bare git directory, or a peer script)")
    if args.full_size:
        args.batch, args.rank = (args.batch if "--batch" in argv else 2), (args.rank if "--rank" in argv else 64)
        args.no_throughput = args.no_throughput or "--steps" not in argv
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return benchmark(args, Path(args.out))
    with tempfile.TemporaryDirectory(prefix="ldmkit-vs-diffusers-") as tmp:
        return benchmark(args, Path(tmp))


def benchmark(args, work: Path) -> int:
    methods = args.methods.split(",")
    settings = args.settings.split(",")
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise SystemExit(f"unknown --settings {sorted(unknown)}: choose from {', '.join(SETTINGS)}")
    a, b = (int(s) for s in args.steps.split(","))
    prec = best_precision(args.best_precision)
    precision = {"fp32": "no", "matched": "no", "best": prec}
    ldmkit_over = {
        "fp32": [],
        "matched": [],
        "best": [o.replace("{bf16}", prec) for o in args.ldmkit_best.split(",") if o],
    }

    def autocast(tool: str, method: str, setting: str) -> tuple[str, ...]:
        return PEER_AUTOCAST[method] if (tool, setting) == ("ldmkit", "matched") else ()

    model = work / ("model-full" if args.full_size else "model")
    if not (model / "model_index.json").exists():
        print(f"building the model in {model} ...", file=sys.stderr, flush=True)
        build_model(model, args.full_size)
    shards = write_shards(work / f"shards-{args.resolution}-{args.num_images}", args.num_images, args.resolution)
    peers = {m: peer_copy(args.diffusers, m, work) for m in methods}
    from diffusers import UNet2DConditionModel

    unet_params = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(model, subfolder="unet").parameters())

    def cmd(tool, method, setting, steps, out):
        if tool == "peer":
            return peer_args(args, peers[method], method, model, shards, steps, precision[setting], out)
        return ldmkit_args(args, method, model, shards, steps, ldmkit_over[setting], out)

    runs = work / time.strftime("runs-%Y%m%d-%H%M%S")
    walls: dict[tuple, list[float]] = {}
    intervals: dict[tuple, list[float]] = {}
    if not args.no_throughput:
        for r in range(args.rounds):
            for method in methods:
                for setting in settings:
                    for steps in (a, b):
                        for tool in ("peer", "ldmkit"):
                            out = runs / f"{method}-{setting}-{tool}-{steps}-r{r}"
                            print(
                                f"round {r + 1}: {tool} {method} {setting} {steps} steps", file=sys.stderr, flush=True
                            )
                            stamps = out.with_name(out.name + "-steps.json")
                            wall = run_child(
                                args,
                                cmd(tool, method, setting, steps, out),
                                step_times=stamps,
                                autocast=autocast(tool, method, setting),
                            )
                            walls.setdefault((method, setting, tool, steps), []).append(wall)
                            # intervals between optimizer steps, after WARMUP_STEPS (first data, lazy init)
                            t = json.loads(stamps.read_text())[WARMUP_STEPS:]
                            intervals.setdefault((method, setting, tool), []).extend(y - x for x, y in zip(t, t[1:]))
    memory: dict[tuple, dict] = {}
    if not args.no_memory:
        for method in methods:
            for setting in settings:
                for tool in ("peer", "ldmkit"):
                    out = runs / f"{method}-{setting}-{tool}-memory"
                    print(f"memory: {tool} {method} {setting}", file=sys.stderr, flush=True)
                    js = runs / f"{method}-{setting}-{tool}-memory.json"
                    run_child(
                        args,
                        cmd(tool, method, setting, MEMORY_STEP + 2, out),
                        memory_json=js,
                        autocast=autocast(tool, method, setting),
                    )
                    memory[(method, setting, tool)] = json.loads(js.read_text())

    device = "cuda" if torch.cuda.is_available() else f"cpu, {args.threads} torch thread(s) per tool"
    print(
        f"\nldmkit vs diffusers' LCM scripts: UNet {unet_params / 1e6:.1f}M parameters, {args.resolution} px, "
        f"batch {args.batch}, LoRA rank {args.rank}, torch {torch.__version__}, {device}"
    )
    print(f"  best: peer --mixed_precision={prec} --cast_teacher_unet; ldmkit {', '.join(ldmkit_over['best']) or '-'}")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    for method in methods:
        note = autocast_note(method, device_type)
        if "fp32" in settings:
            print(f"  fp32* ({method}): both --mixed_precision=no, but {note}; ldmkit runs every pass in fp32")
        if "matched" in settings:
            print(
                f"  matched ({method}): fp32 with ldmkit's {' and '.join(PEER_AUTOCAST[method])} under the same autocast"
            )
    supported = supported_torch()
    if supported is not None and not supported[1]:
        print(
            f"  torch {torch.__version__} is outside ldmkit's supported range ({supported[0]}): ldmkit's figures here are "
            "not of a supported install"
        )
    if walls:
        print(
            f"\nsamples/s, steady state = ({b} - {a}) steps / (wall({b}) - wall({a})), median of {args.rounds} round(s)"
        )
        print(f"  {'method':9} {'setting':8} {'peer':>8} {'ldmkit':>8} {'ratio':>7}")
        for method in methods:
            for setting in settings:
                sps = {}
                for tool in ("peer", "ldmkit"):
                    # A pair whose longer run took no longer than the shorter one (a stall of the machine
                    # during the short run) says nothing: left out.
                    per = sorted(
                        (b - a) * args.batch / (wb - wa)
                        for wa, wb in zip(walls[(method, setting, tool, a)], walls[(method, setting, tool, b)])
                        if wb - wa > 1.0
                    )
                    sps[tool] = per[len(per) // 2] if per else float("nan")
                print(
                    f"  {method:9} {label(setting):8} {sps['peer']:8.2f} {sps['ldmkit']:8.2f} "
                    f"{sps['ldmkit'] / sps['peer']:6.2f}x"
                )
        print(
            f"\nsamples/s from the median time between optimizer steps (every run's steps after the first "
            f"{WARMUP_STEPS}: a stall of the machine moves single steps, not the median)"
        )
        print(f"  {'method':9} {'setting':8} {'peer':>8} {'ldmkit':>8} {'ratio':>7} {'steps':>6}")
        for method in methods:
            for setting in settings:
                sps, n = {}, {}
                for tool in ("peer", "ldmkit"):
                    x = sorted(intervals[(method, setting, tool)])
                    n[tool] = len(x)
                    sps[tool] = args.batch / x[len(x) // 2] if x else float("nan")
                print(
                    f"  {method:9} {label(setting):8} {sps['peer']:8.2f} {sps['ldmkit']:8.2f} "
                    f"{sps['ldmkit'] / sps['peer']:6.2f}x {min(n.values()):6d}"
                )
    if memory:
        gib = 2**30
        print(
            f"\nmemory as a GPU would hold it (GiB): resident at the end of step {MEMORY_STEP - 1} "
            f"(weights + grads + optimizer) and the peak during step {MEMORY_STEP}"
        )
        print(
            f"  {'method':9} {'setting':8} {'tool':7} {'weights':>8} {'grads':>7} {'optim':>7} {'peak':>7} {'ratio':>7}"
        )
        for method in methods:
            for setting in settings:
                peer_peak = memory[(method, setting, "peer")]["peak_bytes"]
                for tool in ("peer", "ldmkit"):
                    m = memory[(method, setting, tool)]
                    res = m["resident"]
                    print(
                        f"  {method:9} {label(setting):8} {tool:7} {res['weights'] / gib:8.3f} {res['grads'] / gib:7.3f} "
                        f"{res['optimizer'] / gib:7.3f} {m['peak_bytes'] / gib:7.3f} {m['peak_bytes'] / peer_peak:6.2f}x"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
