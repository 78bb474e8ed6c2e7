"""The GPU check (issue 26): samples/s and peak CUDA memory of LCM distillation on one GPU, in one table.

    benchmarks/gpu_check.sh [DIFFUSERS] [--dry-run]      # the one command (this file does the work)

Rows, each a fresh training of ``--steps`` optimizer steps, bf16, random weights, no network:
- SD1.5 size (SD1.5's UNet config with random weights, a small VAE and text encoder: benchmarks/vs_diffusers.py
  ``build_model(full_size=True)``), 512 px, the same WebDataset shards of synthetic shapes: diffusers'
  ``train_lcm_distill_lora_sd_wds.py`` (the peer; only with a DIFFUSERS checkout, its bare git directory or
  the script, temporary copy with vs_diffusers.py's webdataset fix) against ldmkit ``lcm_lora``, and ldmkit
  ``lcd``, with vs_diffusers.py's like-for-like settings (batch, rank, learning rate, w range, DDIM grid, loss);
  the peer with ``--mixed_precision=bf16 --cast_teacher_unet``, ldmkit with ``train.mixed_precision=bf16``;
- the quickstart's U-ViT (its recipes: uvit/quickstart.yaml trained one step = random weights at its size,
  then lcm_lora/quickstart.yaml and lcd/quickstart.yaml at their batch and resolution).
samples/s = batch / the median time between optimizer steps after ``--warmup`` (every step is stamped by a
global optimizer post-hook in the child process); peak memory = ``torch.cuda.max_memory_allocated`` over
the run (reset before it). Every training runs in its own child process (``--dry-run``: ldmkit's share one,
to stay fast).

``--dry-run``: the same chain on the CPU at toy size (ldmkit's tiny SD1.5 pipeline, 32 px, a few steps, fp32),
for the test and to check an install before renting a GPU; memory prints as "-" there (no CUDA).
"""

from __future__ import annotations

import argparse
import gc
import json
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "src" / "ldmkit" / "recipes"
sys.path.insert(0, str(HERE))

GPU = dict(resolution=512, batch=8, rank=64, steps=30, warmup=5, precision="bf16", uvit_batch=32, num_images=256)
DRY = dict(resolution=32, batch=2, rank=4, steps=4, warmup=1, precision="no", uvit_batch=4, num_images=16)


# ---- the child: trainings in this process, every optimizer step stamped --------------------------
def child(kind: str, plan_file: str) -> int:
    """Run the plan's trainings one after the other; write {name: {stamps, peak_bytes}} next to the plan."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    plan = json.loads(Path(plan_file).read_text())
    results = {}
    for run in plan:
        if "call" in run:  # a build step (here, where diffusers and transformers are imported anyway)
            BUILDERS[run["call"]](*run["args"])
            continue
        stamps.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if kind == "peer":
            sys.argv = run["argv"]
            try:
                runpy.run_path(run["argv"][0], run_name="__main__")
            except SystemExit as e:
                if e.code:
                    raise
        else:
            from ldmkit.cli import main as ldmkit_main

            if ldmkit_main(run["argv"]) != 0:
                raise SystemExit(f"ldmkit {' '.join(run['argv'][:2])} failed")
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        results[run["name"]] = {"stamps": list(stamps), "peak_bytes": peak}
    Path(plan_file).with_suffix(".results.json").write_text(json.dumps(results))
    return 0


def run_children(kind: str, plan: list[dict], work: Path, python: str, per_process: bool) -> dict:
    """The plan in child processes: one per training (each with the build steps before it) when
    ``per_process`` (the GPU: nothing of an earlier run is left in the CUDA allocator), else all in one."""
    groups, current = [], []
    for run in plan:
        current.append(run)
        if per_process and "argv" in run:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    results = {}
    for i, group in enumerate(groups):
        plan_file = work / f"plan-{kind}-{i}.json"
        plan_file.write_text(json.dumps(group))
        log = plan_file.with_suffix(".log")
        with log.open("w") as f:
            cmd = [python, __file__, "--child", kind, str(plan_file)]
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            raise SystemExit(f"the {kind} runs failed (exit {r.returncode}); log {log}:\n{tail}")
        results |= json.loads(plan_file.with_suffix(".results.json").read_text())
    return results


# ---- models, data and the commands ----------------------------------------------------------------
def sd_model(out: str, dry: bool) -> None:
    """The SD1.5-layout model: SD1.5's UNet with random weights (vs_diffusers.py), or tiny (dry run)."""
    if dry:
        from ldmkit.models.tiny import build_tiny_pipeline

        build_tiny_pipeline("sd15", out)
    else:
        from vs_diffusers import build_model

        build_model(Path(out), full_size=True)


def uvit_base(base: str, data: str) -> None:
    """The quickstart's text encoder and tokenizer for the data's captions (quickstart stage "text")."""
    from ldmkit.models.text import write_text_components

    captions = [json.loads(line)["text"] for line in (Path(data) / "metadata.jsonl").read_text().splitlines()]
    write_text_components(base, captions, hidden_size=64, seed=0)


def copy_vae(export: str, base: str) -> None:
    """The trained VAE into the U-ViT's base folder (quickstart stage "vae")."""
    import shutil

    shutil.copytree(export, Path(base) / "vae", ignore=shutil.ignore_patterns("ldmkit_config.yaml"), dirs_exist_ok=True)


BUILDERS = {"sd_model": sd_model, "uvit_base": uvit_base, "copy_vae": copy_vae}


def uvit_steps(work: Path, cfg: dict) -> list[dict]:
    """The runs that build the quickstart's U-ViT at its size (text encoder, VAE, teacher: one step each, so
    random weights) and then distil it with the quickstart's LCM-LoRA and LCD recipes."""
    from ldmkit.data.synth import write_dataset

    base = work / "uvit-base"
    data = work / "uvit-data"
    write_dataset(data, num=cfg["num_images"], fmt="folder", size=32, seed=0)
    common = [f"--data.path={data}", "--data.resolution=32", "--train.max_steps=1", "--train.report_to=none"]
    common += [f"--train.batch_size={cfg['uvit_batch']}"]
    prec = [f"--train.mixed_precision={cfg['precision']}"]
    steps = [f"--train.max_steps={cfg['steps']}", f"--train.batch_size={cfg['uvit_batch']}", *prec]
    quiet = ["--train.validate_every=0", "--train.checkpoint_every=0", "--train.report_to=none"]
    return [
        {"name": "uvit-base", "call": "uvit_base", "args": [str(base), str(data)]},
        {
            "name": "uvit-vae",
            "argv": ["train", str(RECIPES / "vae" / "quickstart.yaml"), *common, f"--output_dir={work / 'uvit-vae'}"],
        },
        {"name": "uvit-copy-vae", "call": "copy_vae", "args": [str(work / "uvit-vae" / "export"), str(base)]},
        {
            "name": "uvit-teacher",
            "argv": [
                "train",
                str(RECIPES / "uvit" / "quickstart.yaml"),
                f"--model.pretrained={base}",
                *common,
                f"--output_dir={work / 'uvit-teacher'}",
            ],
        },
        *[
            {
                "name": f"uvit-ldmkit-{method}",
                "argv": [
                    "train",
                    str(RECIPES / method / "quickstart.yaml"),
                    f"--model.pretrained={work / 'uvit-teacher' / 'export'}",
                    f"--data.path={data}",
                    f"--data.cache_dir={work / 'uvit-cache'}",
                    f"--output_dir={work / f'uvit-{method}'}",
                    *steps,
                    *quiet,
                ],
            }
            for method in ("lcm_lora", "lcd")
        ],
    ]


def sd_runs(args, cfg: dict, work: Path) -> tuple[list[dict], list[dict]]:
    """(peer runs, ldmkit runs) at SD1.5 size: vs_diffusers.py's like-for-like commands."""
    from vs_diffusers import ldmkit_args, peer_args, peer_copy, write_shards

    model = work / "sd15"
    shards = write_shards(work / "shards", cfg["num_images"], cfg["resolution"])
    like = argparse.Namespace(
        resolution=cfg["resolution"], batch=cfg["batch"], num_images=cfg["num_images"], lr=1e-4, rank=cfg["rank"]
    )
    peer = []
    if args.diffusers:
        script = peer_copy(args.diffusers, "lcm_lora", work)
        argv = peer_args(like, script, "lcm_lora", model, shards, cfg["steps"], cfg["precision"], work / "peer")
        peer.append({"name": "sd15-peer-lcm_lora", "argv": argv[1:]})
    over = [f"train.mixed_precision={cfg['precision']}"]
    ours = [{"name": "sd15-model", "call": "sd_model", "args": [str(model), args.dry_run]}]
    ours += [
        {
            "name": f"sd15-ldmkit-{m}",
            "argv": ldmkit_args(like, m, model, shards, cfg["steps"], over, work / f"sd15-{m}")[1:],
        }
        for m in ("lcm_lora", "lcd")
    ]
    return peer, ours


ROWS = (
    ("sd15", "peer", "lcm_lora"),
    ("sd15", "ldmkit", "lcm_lora"),
    ("sd15", "ldmkit", "lcd"),
    ("uvit", "ldmkit", "lcm_lora"),
    ("uvit", "ldmkit", "lcd"),
)


def table(args, cfg: dict, results: dict) -> None:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run: no CUDA memory)"
    print(
        f"\nGPU check: {device}, torch {torch.__version__}, precision {cfg['precision']}, {cfg['steps']} steps per run "
        f"(samples/s from the median step after {cfg['warmup']}); SD1.5: {cfg['resolution']} px, batch {cfg['batch']}, "
        f"LoRA rank {cfg['rank']}; U-ViT: the quickstart's, 32 px, batch {cfg['uvit_batch']}"
    )
    if args.peer_python != sys.executable and args.diffusers:
        print(f"  the peer ran with {args.peer_python} (its own torch)")
    print(f"  {'model':6} {'tool':7} {'method':9} {'samples/s':>10} {'peak GiB':>9} {'vs peer':>8}")
    peer = results.get("sd15-peer-lcm_lora")
    for model, tool, method in ROWS:
        r = results.get(f"{model}-{tool}-{method}")
        if r is None:  # only the peer's row can be missing: without a diffusers checkout
            print(f"  {model:6} {tool:7} {method:9} {'-':>10} {'-':>9} {'-':>8}  (no diffusers checkout given)")
            continue
        batch = cfg["batch"] if model == "sd15" else cfg["uvit_batch"]
        sps = samples_per_second(r["stamps"], batch, cfg["warmup"])
        gib = f"{r['peak_bytes'] / 2**30:9.2f}" if r["peak_bytes"] is not None else f"{'-':>9}"
        ratio = "-"
        if peer is not None and model == "sd15" and tool == "ldmkit":
            ratio = f"{sps / samples_per_second(peer['stamps'], batch, cfg['warmup']):.2f}x"
        print(f"  {model:6} {tool:7} {method:9} {sps:10.2f} {gib} {ratio:>8}")


def samples_per_second(stamps: list[float], batch: int, warmup: int) -> float:
    t = stamps[warmup:]
    gaps = [b - a for a, b in zip(t, t[1:])]
    if not gaps:
        raise SystemExit(f"too few optimizer steps ({len(stamps)}) after {warmup} warm-up steps: raise --steps")
    return batch / statistics.median(gaps)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("diffusers", nargs="?", help="diffusers checkout, its bare git directory, or the peer script.")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy size, seconds: the same chain and table.")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps per run.")
    p.add_argument(
        "--peer-python", default=sys.executable, help="Python of the peer (torchvision, webdataset, braceexpand)."
    )
    p.add_argument("--out", default=None, help="Work folder (kept); default: a temporary folder.")
    args = p.parse_args(argv)
    cfg = dict(DRY if args.dry_run else GPU)
    cfg["steps"] = args.steps or cfg["steps"]
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or --dry-run for the CPU check")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return check(args, cfg, Path(args.out))
    with tempfile.TemporaryDirectory(prefix="ldmkit-gpu-check-") as tmp:
        return check(args, cfg, Path(tmp))


def check(args, cfg: dict, work: Path) -> int:
    start = time.perf_counter()
    peer, ours = sd_runs(args, cfg, work)
    ours += uvit_steps(work, cfg)
    results = run_children("ldmkit", ours, work, sys.executable, per_process=not args.dry_run)
    if peer:
        results |= run_children("peer", peer, work, args.peer_python, per_process=True)
    table(args, cfg, results)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
