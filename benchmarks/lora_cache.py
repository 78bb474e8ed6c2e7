"""LoRA fine-tuning with and without ``data.cache``: throughput, peak memory, the UNet's share of a step.

    python benchmarks/lora_cache.py [--steps 30] [--repeats 2] [--out DIR]

Runs the real training loop (``ldmkit.train.loop.train`` with a config from ``load_config``) on a small
SD1.5-architecture model at 64 px, batch 8, once per variant and repeat, each in its own subprocess
(clean peak memory), alternating the variants so machine noise hits both alike. Prints ratios.

The model keeps SD1.5's layouts (UNet with cross-attention down/up blocks and a plain bottom block,
KL-f8 VAE with 4 levels and 2 resnets per level, CLIP text encoder) at small widths, chosen so that
VAE encode + text encode take about the share of a training step's FLOPs they take in real SD1.5 LoRA
training at 512 px (both counted here with torch's FlopCounterMode on meta tensors: about 40%).

What is measured, per variant (steps after ``--warmup``):
- samples/s: batch / mean wall time between successive batch fetches of the loop (data + loss +
  backward + optimizer + logging); the loop's own ``samples_per_s`` from metrics.jsonl is shown too.
  Cache building happens before the first step and is timed separately.
- time split per step: data fetch, UNet forward (forward pre/post hooks), backward (all of it is the
  UNet's: the VAE and text encoders are frozen), VAE encoder and text encoder forwards (hooks), the rest
  of ``method.loss`` and the rest of the loop.
- memory: RSS when the first step starts, and the peak during training (VmHWM of the process, reset
  through /proc/self/clear_refs at the first step), or torch.cuda memory_allocated / max_memory_allocated
  on a GPU; plus the whole process's peak (model loading included).
- which SD modules are alive during training (gc census at the first step): with the cache, no
  AutoencoderKL and no CLIP text model may exist (asserted); and every model-family load of the run (its log line
  "loaded SD unet|vae|text encoders from X", and how long since the previous one), to see what start-up costs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RES, BATCH = 64, 8
# Small SD1.5-like widths; see the module docstring for how they were chosen.
UNET_CHANNELS = (96, 192, 384)
VAE_CHANNELS = (32, 64, 128, 128)
TEXT_HIDDEN, TEXT_LAYERS = 64, 4
VARIANTS = ("no cache", "cache")


# ---- the model and the data -------------------------------------------------------------------------
def _components(arch: str, res: int) -> dict[str, Any]:
    """UNet, VAE and text encoder of ``arch``: "sd15" (real SD1.5 sizes, for FLOP counts) or "bench"."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldmkit.models.tiny import byte_vocab

    real = arch == "sd15"
    unet_ch = (320, 640, 1280, 1280) if real else UNET_CHANNELS
    n = len(unet_ch)
    text_hidden = 768 if real else TEXT_HIDDEN
    vocab = 49408 if real else len(byte_vocab())
    unet = UNet2DConditionModel(
        sample_size=res // 8,
        block_out_channels=unet_ch,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=text_hidden,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512) if real else VAE_CHANNELS,
        layers_per_block=2,
        latent_channels=4,
        sample_size=res,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=text_hidden,
            intermediate_size=4 * text_hidden,
            num_attention_heads=12 if real else 4,
            num_hidden_layers=12 if real else TEXT_LAYERS,
            max_position_embeddings=77,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
            hidden_act="quick_gelu",
            projection_dim=text_hidden,
        )
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def build_model(out: Path) -> Path:
    """The benchmark's SD1.5-architecture pipeline folder (random weights, byte-level tokenizer)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from ldmkit.models.tiny import byte_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parts = _components("bench", RES)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        **parts,
        tokenizer=byte_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def flop_shares(arch: str, res: int) -> dict[str, float]:
    """FLOPs per sample of VAE encode, text encode and UNet forward+backward with LoRA on the attention
    projections (the ``lora`` method's default targets), counted on meta tensors (nothing allocated)."""
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        parts = _components(arch, res)
    for m in parts.values():
        m.requires_grad_(False)
    unet, vae, te = parts["unet"], parts["vae"], parts["text_encoder"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    meta = dict(device="meta")
    x = torch.zeros(1, 3, res, res, **meta)
    ids = torch.zeros(1, 77, dtype=torch.long, **meta)
    latents = torch.zeros(1, 4, res // 8, res // 8, **meta)
    emb = torch.zeros(1, 77, te.config.hidden_size, **meta)
    t = torch.zeros(1, dtype=torch.long, **meta)

    def count(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    def unet_step():
        unet(latents, t, emb).sample.float().pow(2).mean().backward()

    f = {
        "vae_encode": count(lambda: vae.encode(x).latent_dist.parameters),
        "text_encode": count(lambda: te(ids)[0]),
        "unet_fwd_bwd": count(unet_step),
    }
    f["encoder_share"] = (f["vae_encode"] + f["text_encode"]) / sum(f.values())
    return f


# ---- one variant, in a subprocess -------------------------------------------------------------------
def _overrides(args, cached: bool, output_dir: Path, max_steps: int) -> list[str]:
    return [
        "--method.name=lora",
        "--method.lora_rank=4",
        f"--model.pretrained={args.model}",
        f"--data.path={args.data}",
        f"--data.resolution={RES}",
        "--data.random_flip=true",
        f"--data.num_workers={args.num_workers}",
        f"--data.cache={str(cached).lower()}",
        f"--data.cache_dir={args.cache_dir}",
        f"--data.encode_batch_size={BATCH}",
        f"--train.batch_size={BATCH}",
        f"--train.max_steps={max_steps}",
        "--train.learning_rate=1e-4",
        "--train.checkpoint_every=0",
        "--train.validate_every=0",
        "--train.report_to=none",
        f"--output_dir={output_dir}",
    ]


def _vm_hwm() -> int:
    """Peak resident set size of this process in bytes (Linux VmHWM), 0 when unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _sd_census() -> dict[str, int]:
    """Live VAE / CLIP / UNet modules of this process (what is really loaded, whoever holds it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kinds = {
        "vae": AutoencoderKL,
        "text_encoder": (CLIPTextModel, CLIPTextModelWithProjection),
        "unet": UNet2DConditionModel,
    }
    gc.collect()
    objs = gc.get_objects()
    return {name: sum(isinstance(o, cls) for o in objs) for name, cls in kinds.items()}


class _Timer:
    """Per-step sums of named intervals; forward pre/post hooks feed it from inside the models."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.active = False
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self._open: dict[str, float] = {}

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        if self.active:
            self.current[name] = self.current.get(name, 0.0) + seconds

    def hook(self, module: torch.nn.Module, name: str) -> None:
        def pre(*_):
            self._open[name] = self.now()

        def post(*_):
            self.add(name, self.now() - self._open.pop(name))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def run_variant(args) -> dict[str, Any]:
    """Train one variant with the real loop and measure it (runs inside the subprocess)."""
    import ldmkit.data
    import ldmkit.methods
    from ldmkit.methods import load_config
    from ldmkit.train import loop

    t_start = time.perf_counter()
    cached = args.child == "cache"
    out = Path(args.run_dir)
    cfg = load_config(None, _overrides(args, cached, out, args.steps))
    accelerator = loop.make_accelerator(cfg)
    timer = _Timer(accelerator.device)
    res: dict[str, Any] = {"variant": args.child}
    step_starts: list[float] = []

    backward = accelerator.backward

    def timed_backward(loss, **kwargs):
        t0 = timer.now()
        backward(loss, **kwargs)
        timer.add("backward", timer.now() - t0)

    accelerator.backward = timed_backward

    build_loader = ldmkit.data.build_loader

    def timed_build_loader(*a, **kw):
        t0 = time.perf_counter()
        loader = build_loader(*a, **kw)
        res["build_loader_s"] = time.perf_counter() - t0
        base = type(loader)

        class TimedLoader(base):
            def __next__(self):
                t0 = timer.now()
                if timer.active:  # a step ends where the next batch is fetched
                    step_starts.append(t0)
                    timer.steps.append(timer.current)
                    timer.current = {}
                    res["peak_train_bytes"] = _peak_train(accelerator.device)
                batch = base.__next__(self)
                timer.add("data", timer.now() - t0)
                return batch

        loader.__class__ = TimedLoader
        return loader

    ldmkit.data.build_loader = timed_build_loader

    # What the model family loads, and when: its log lines "loaded SD unet|vae|text encoders from X"
    # (ldmkit.families), timed from the previous line, flagged when they come during training.
    import logging

    res["sd_loads"] = []

    class LoadLog(logging.Handler):
        last = [time.perf_counter()]

        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("loaded "):
                now = time.perf_counter()
                part = msg.split(" from ")[0].split(" ", 2)[-1]
                res["sd_loads"].append({"parts": part, "seconds": now - self.last[0], "during_training": timer.active})
                self.last[0] = now

    families_log = logging.getLogger("ldmkit.families")
    families_log.setLevel(logging.INFO)
    families_log.addHandler(LoadLog())

    get_method = ldmkit.methods.get_method
    Lora = get_method("lora")

    class InstrumentedLora(Lora):
        def __init__(self, cfg, accelerator):
            super().__init__(cfg, accelerator)
            timer.hook(self.unet, "unet_fwd")
            fam = self.family  # lazy parts: uncached runs load the encoders here (step 1 would) to hook them
            if not cfg.data.cache:
                timer.hook(fam.vae.encoder, "vae_encode")
                for te in fam.text_encoders:
                    timer.hook(te, "text_encode")

        def loss(self, batch):
            if not timer.active:  # first step: everything before it (loading, cache) is set-up
                res["startup_s"] = time.perf_counter() - t_start
                res["census"] = _sd_census()
                fam = self.family
                res["method_loaded"] = {
                    "vae": fam.loaded("vae"),
                    "text_encoders": len(fam.text_encoders) if fam.loaded("text_encoders") else 0,
                }
                res["peak_setup_bytes"] = _vm_hwm()
                res["hwm_reset"] = _reset_hwm()
                if accelerator.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    res["mem_step1_bytes"] = torch.cuda.memory_allocated()
                else:
                    res["mem_step1_bytes"] = _rss()
                timer.active = True
                step_starts.append(timer.now())
                timer.add("data", 0.0)
            t0 = timer.now()
            out = super().loss(batch)
            timer.add("loss", timer.now() - t0)
            return out

    ldmkit.methods.get_method = lambda name: InstrumentedLora if name == "lora" else get_method(name)
    loop.train(cfg, accelerator)

    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    res.update(
        step_times=[b - a for a, b in zip(step_starts, step_starts[1:])],
        parts=timer.steps,  # parts[i] belongs to step_times[i]
        losses=[r["loss"] for r in records],
        loop_samples_per_s=[r["samples_per_s"] for r in records],
        peak_process_bytes=max(res.get("peak_setup_bytes", 0), _vm_hwm()),
    )
    return res


def _peak_train(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else _vm_hwm()


def build_cache(args) -> dict[str, Any]:
    """Build the cache the way the loop does (method.encoders() + build_loader) and time it."""
    from ldmkit.data import build_loader
    from ldmkit.methods import get_method, load_config
    from ldmkit.train import loop

    cfg = load_config(None, _overrides(args, True, Path(args.run_dir), 1))
    accelerator = loop.make_accelerator(cfg)
    method = get_method("lora")(cfg, accelerator)
    t0 = time.perf_counter()
    loader = build_loader(cfg.data, batch_size=BATCH, seed=0, encoders=method.encoders(), cache_root=args.cache_dir)
    return {"cache_build_s": time.perf_counter() - t0, "num_samples": loader.num_samples}


# ---- the parent: set up, run, report ----------------------------------------------------------------
def _child_run(args, phase: str, run_dir: Path) -> dict[str, Any]:
    result = run_dir / "result.json"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        phase,
        "--run-dir",
        str(run_dir),
        "--result",
        str(result),
        "--model",
        str(args.model),
        "--data",
        str(args.data),
        "--cache-dir",
        str(args.cache_dir),
        "--steps",
        str(args.steps),
        "--num-workers",
        str(args.num_workers),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-5000:])
        raise SystemExit(f"{phase} run failed (exit {r.returncode})")
    return json.loads(result.read_text())


def summarize(res: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Per-step means after the warm-up steps."""
    times = res["step_times"][warmup:]
    parts = res["parts"][warmup : warmup + len(times)]
    step = statistics.mean(times)
    mean = {
        k: statistics.mean(p.get(k, 0.0) for p in parts)
        for k in ("data", "loss", "unet_fwd", "backward", "vae_encode", "text_encode")
    }
    mean["loss_other"] = mean["loss"] - mean["unet_fwd"] - mean["vae_encode"] - mean["text_encode"]
    mean["loop_other"] = step - mean["data"] - mean["loss"] - mean["backward"]
    loop_sps = res["loop_samples_per_s"][warmup : warmup + len(times)]  # step_times[i] is step i + 1
    return {
        "samples_per_s": BATCH / step,
        "median_samples_per_s": BATCH / statistics.median(times),
        "loop_samples_per_s": statistics.mean(loop_sps) if loop_sps else float("nan"),
        "step_s": step,
        "parts": mean,
        "unet_share": (mean["unet_fwd"] + mean["backward"]) / step,
        "mem_step1_mb": res["mem_step1_bytes"] / 2**20,
        "peak_train_mb": res.get("peak_train_bytes", 0) / 2**20,
        "peak_process_mb": res["peak_process_bytes"] / 2**20,
        "startup_s": res["startup_s"],
    }


def report(args, flops: dict[str, dict[str, float]], build: dict[str, Any], runs: list[dict[str, Any]]) -> int:
    gpu = torch.cuda.is_available()
    print(
        f"\nLoRA (rank 4, attention projections) on a small SD1.5-architecture model: UNet {UNET_CHANNELS}, "
        f"VAE {VAE_CHANNELS} x 2 resnets, CLIP text {TEXT_HIDDEN} x {TEXT_LAYERS} layers; {RES} px, batch {BATCH}, "
        f"device {'cuda' if gpu else 'cpu'}, {args.threads} thread(s), data.num_workers {args.num_workers}, "
        f"{args.steps} steps per run ({args.warmup} warm-up), {args.repeats} run(s) per variant"
    )
    for name, f in flops.items():
        print(
            f"  FLOPs/sample {name}: VAE encode {f['vae_encode'] / 1e9:.2f} G, text encode {f['text_encode'] / 1e9:.3f} G, "
            f"UNet fwd+bwd {f['unet_fwd_bwd'] / 1e9:.2f} G -> VAE + text = {100 * f['encoder_share']:.1f}% of a step"
        )
    print(
        f"  cache build: {build['num_samples']} images (both flips stored) in {build['cache_build_s']:.1f} s, "
        f"VAE and text encoder loading included (not part of the throughput below)"
    )

    by_variant: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for r in runs:
        by_variant[r["variant"]].append(r)
    summaries = {v: [summarize(r, args.warmup) for r in rs] for v, rs in by_variant.items()}
    cols = [
        ("variant", 9),
        ("samples/s", 9),
        ("(loop)", 7),
        ("step ms", 8),
        ("data", 6),
        ("VAE", 6),
        ("text", 6),
        ("UNet fw", 8),
        ("backward", 9),
        ("loss+", 6),
        ("loop+", 6),
        ("UNet %", 7),
        ("mem@1", 7),
        ("peak", 7),
        ("process", 8),
        ("start s", 8),
    ]
    print(
        f"\n  {'':<{cols[0][1]}}{'':>{sum(w for _, w in cols[1:4])}}   ms per step{'':>{sum(w for _, w in cols[4:12]) - 11}}"
        f"  memory, MB ({'cuda allocated' if gpu else 'RSS'})"
    )
    print("  " + "".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w) in enumerate(cols)))
    for v in VARIANTS:
        for s in summaries[v]:
            p = s["parts"]
            values = [
                v,
                f"{s['samples_per_s']:.2f}",
                f"{s['loop_samples_per_s']:.2f}",
                f"{1e3 * s['step_s']:.1f}",
                *(
                    f"{1e3 * p[k]:.1f}"
                    for k in ("data", "vae_encode", "text_encode", "unet_fwd", "backward", "loss_other", "loop_other")
                ),
                f"{100 * s['unet_share']:.1f}",
                f"{s['mem_step1_mb']:.0f}",
                f"{s['peak_train_mb']:.0f}",
                f"{s['peak_process_mb']:.0f}",
                f"{s['startup_s']:.1f}",
            ]
            print(
                "  "
                + "".join(f"{x:<{w}}" if i == 0 else f"{x:>{w}}" for i, (x, (_, w)) in enumerate(zip(values, cols)))
            )
    print(
        "  (samples/s = batch / mean step time after the warm-up; (loop) = the loop's own metrics.jsonl samples_per_s;\n"
        "   loss+ = rest of method.loss (SampleRNG, add_noise, MSE); loop+ = clipping, AdamW, LR, logging;\n"
        "   UNet % = (UNet forward + backward) / step; mem@1 = when the first step starts, peak = during training,\n"
        "   process = whole run; start s = process start to first step, cache lookup included)"
    )

    if not gpu and not all(r.get("hwm_reset") for r in runs):
        print("  note: /proc/self/clear_refs was not writable: 'peak' includes model loading")

    def med(v, key):
        return statistics.median(s[key] for s in summaries[v])

    speedup = med("cache", "samples_per_s") / med("no cache", "samples_per_s")
    # What skipping the encoders saves at equal UNet speed, from the uncached runs' own time split: a
    # cross-check that does not depend on how busy the machine was during the other runs.
    expected = statistics.median(
        s["step_s"] / (s["step_s"] - s["parts"]["vae_encode"] - s["parts"]["text_encode"])
        for s in summaries["no cache"]
    )
    print(
        f"\n  cache / no cache: samples/s x{speedup:.2f} (median of runs; x{expected:.2f} expected from the uncached "
        f"runs' VAE + text time), peak memory during training x{med('cache', 'peak_train_mb') / med('no cache', 'peak_train_mb'):.2f}, "
        f"memory at step 1 x{med('cache', 'mem_step1_mb') / med('no cache', 'mem_step1_mb'):.2f}"
    )
    ref = by_variant["no cache"][0]["losses"]
    diff = max(abs(a - b) / abs(b) for r in by_variant["cache"] for a, b in zip(r["losses"], ref))
    print(
        f"  same samples, noise and timesteps: losses of cached vs uncached runs differ by <= {diff:.1e} relative (float16 cache)"
    )

    ok = True
    for v in VARIANTS:
        r = by_variant[v][-1]
        loads = ", ".join(
            f"{x['parts']} {x['seconds']:.1f} s" + (" (during training)" if x["during_training"] else "")
            for x in r["sd_loads"]
        )
        print(f"  {v}: family loads: {loads}; live modules at step 1: {r['census']}")
    for r in by_variant["cache"]:
        loaded, census = r["method_loaded"], r["census"]
        clean = (
            not loaded["vae"] and loaded["text_encoders"] == 0 and census["vae"] == 0 and census["text_encoder"] == 0
        )
        ok &= clean
    print(
        f"  cached training without VAE and text encoders (family.loaded('vae') and ('text_encoders') false, none alive): "
        f"{'OK' if ok else 'FAIL'}"
    )
    passed = speedup >= 1.2
    print(f"  requirement: cache >= 1.2x samples/s -> {'PASS' if passed else 'FAIL'} (x{speedup:.2f})")
    return 0 if ok and passed else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="Work folder (model, data, cache, runs); default: a temporary folder.")
    p.add_argument("--steps", type=int, default=30, help="Training steps per run.")
    p.add_argument("--warmup", type=int, default=5, help="Steps left out of the averages.")
    p.add_argument("--repeats", type=int, default=3, help="Runs per variant (alternating).")
    p.add_argument("--num-images", type=int, default=128, help="Synthetic training images.")
    p.add_argument("--num-workers", type=int, default=0, help="data.num_workers (0: loading counts in the step time).")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS).")
    p.add_argument("--child", choices=["build", *VARIANTS], help=argparse.SUPPRESS)
    for name in ("--run-dir", "--result", "--model", "--data", "--cache-dir"):
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        torch.set_num_threads(args.threads)
        result = build_cache(args) if args.child == "build" else run_variant(args)
        Path(args.result).write_text(json.dumps(result))
        return 0

    if args.out is None:
        with tempfile.TemporaryDirectory(prefix="ldmkit-bench-") as tmp:
            return benchmark(args, Path(tmp))
    return benchmark(args, Path(args.out))


def benchmark(args, work: Path) -> int:
    """Model, data, cache build, the runs, the report (in the parent process)."""
    from ldmkit.data.synth import write_dataset

    work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs_dir = work / f"runs-{stamp}"
    # A fresh cache per invocation, so the build phase really builds it.
    args.model, args.data, args.cache_dir = work / "model", work / "data", runs_dir / "cache"
    if not (args.model / "model_index.json").exists():
        build_model(args.model)
    if not args.data.exists():
        write_dataset(args.data, num=args.num_images, fmt="folder", size=RES, seed=0)
    flops = {"this model, 64 px": flop_shares("bench", RES), "SD1.5, 512 px": flop_shares("sd15", 512)}
    build_dir = runs_dir / "build"
    build_dir.mkdir(parents=True)
    build = _child_run(args, "build", build_dir)
    runs = []
    for i in range(args.repeats):
        for v in VARIANTS:
            d = runs_dir / f"{v.replace(' ', '_')}-{i}"
            d.mkdir(parents=True)
            print(f"run {v} #{i} ...", file=sys.stderr, flush=True)
            runs.append(_child_run(args, v, d))
    return report(args, flops, build, runs)


if __name__ == "__main__":
    sys.exit(main())
