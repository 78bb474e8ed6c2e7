"""``ldmkit train CONFIG.yaml [--section.key=value ...] [--dry-run]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldmkit.config import dump_config
from ldmkit.methods import load_config, method_help

DESCRIPTION = """Train with a YAML recipe. The method is named inside the recipe (method.name: finetune | lora |
lcm_lora | lcd | tcd_lora | tcd | pcm_lora | pcm | uvit | vae) and its knobs live under method. Override any key with --section.key=value
(e.g. --method.lora_rank=16 --train.max_steps=2000). Unknown keys and wrong types are rejected.
Re-running the same command resumes from the latest complete checkpoint in output_dir/checkpoints.
Multi-GPU / multi-node: accelerate launch [--num_processes N ...] -m ldmkit train CONFIG.yaml
Show one method's options: ldmkit train --help --method.name=lcm_lora (or CONFIG.yaml --help)."""


CONFIG_HELP = "YAML recipe: a file, or a shipped one by name (lcm_lora/sd15; the checkout's configs/ holds them)."


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        sys.stdout.write(dump_config(cfg))
        return 0
    from ldmkit.train.loop import train

    export = train(cfg)
    print(run_summary(cfg, export))
    return 0


def run_summary(cfg, export: Path) -> str:
    """What a finished run made and where: absolute paths, the command to try it, training time and speed
    (of training only: validation and saving excluded; train/loop.py writes them to train_stats.json)."""
    import json
    import shlex

    out = Path(cfg.output_dir).resolve()
    export = Path(export).resolve()
    stats_file = out / "train_stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    lines = []
    if stats.get("steps"):
        lines.append(
            f"done: {cfg.method.name}, {stats['steps']} steps (to step {stats['last_step']}) in "
            f"{_duration(stats['train_seconds'])} of training, {stats['samples_per_s']:.2f} samples/s"
        )
    else:
        lines.append(f"done: {cfg.method.name}, nothing left to train (step {stats.get('last_step', '?')})")
    rows = [("export", export)]
    if (export / "README.md").is_file():
        rows.append(("model card", export / "README.md"))
    samples = sorted((out / "samples").glob("*.png"))
    if samples:
        rows.append(("samples", samples[-1]))
    rows.append(("metrics", out / "metrics.jsonl"))
    if (out / "logs").is_dir():
        rows.append(("logs", f"{out / 'logs'}  (tensorboard --logdir {shlex.quote(str(out / 'logs'))})"))
    prompt = (cfg.train.validation_prompts or ["a photo of a cat"])[0]
    if (export / "pytorch_lora_weights.safetensors").is_file():
        base = " ".join(shlex.quote(a) for a in base_model_args(cfg.model))
        rows.append(("try it", f"ldmkit generate {base} --lora {shlex.quote(str(export))}"))
    elif (export / "model_index.json").is_file():
        rows.append(("try it", f"ldmkit generate --model {shlex.quote(str(export))}"))
    if rows[-1][0] == "try it":
        rows[-1] = (
            "try it",
            f"{rows[-1][1]} --prompt {shlex.quote(prompt)} --out {shlex.quote(str(out / 'generated'))}",
        )
    lines += [f"  {k + ':':<11} {v}" for k, v in rows]
    return "\n".join(lines)


def base_model_args(model_cfg) -> list[str]:
    """``--model`` (and what a single file needs) for ``ldmkit generate`` on the base a LoRA was trained on:
    a repo id as the user typed it (revision included: the cache resolves it again), a local folder or file
    as an absolute path (so the line works from any folder)."""
    from ldmkit.families.hub import split_repo_id

    text = str(model_cfg.pretrained)
    path = Path(text).expanduser()
    model = text if split_repo_id(text) and not path.exists() else str(path.resolve())
    args = ["--model", model]
    if getattr(model_cfg, "tokenizer", None):
        args += ["--tokenizer", str(Path(model_cfg.tokenizer).expanduser().resolve())]
    components = getattr(model_cfg, "components_from", None)
    if components:  # a single FLUX / SD3 transformer file: where its other parts come from
        local = Path(components).expanduser()
        args += ["--components-from", str(local.resolve()) if local.exists() else components]
    if getattr(model_cfg, "allow_pickle", False):
        args.append("--allow-pickle")
    return args


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def main(argv: list[str]) -> int:
    """Entry for ``ldmkit train``: argparse takes the recipe and flags, the rest are config overrides."""
    parser = argparse.ArgumentParser(
        prog="ldmkit train",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="Show this help (and the method's options).")
    parser.add_argument("config", nargs="?", help=CONFIG_HELP)
    parser.add_argument("--dry-run", action="store_true", help="Print the resolved config and exit.")
    args = _split(argv)
    overrides = args.overrides
    if args.help:
        from ldmkit.config import recipe_method_name, shipped_recipes
        from ldmkit.errors import UserError
        from ldmkit.methods import registered_methods

        parser.print_help()
        print(f"\nshipped recipes (by name from any folder): {', '.join(shipped_recipes())}")
        try:
            name = recipe_method_name(args.config, overrides)
        except (UserError, OSError):
            name = None
        values = None
        if name is not None and args.config:
            from ldmkit.config import config_to_dict

            try:  # show the recipe's values as the defaults
                values = config_to_dict(load_config(args.config, overrides))
            except UserError:
                values = None
        print(f"\n{method_help(name, values)}")
        if name is None:
            others = ", ".join(registered_methods())
            print(f"\nmethods ({others}): their options with ldmkit train --help --method.name=NAME or RECIPE --help")
        return 0
    return run(args)


def _split(argv: list[str]) -> argparse.Namespace:
    """The recipe, -h/--help, --dry-run and the ``--section.key[=]value`` overrides of ``argv``.

    By hand rather than argparse: argparse takes any argument containing a space for a positional, so
    ``--data.path=/my photos`` would become the recipe."""
    flags = {"-h", "--help", "--dry-run"}
    config, overrides = None, []
    rest = [a for a in argv if a not in flags]
    for i, arg in enumerate(rest):
        takes_value = i > 0 and rest[i - 1].startswith("--") and "=" not in rest[i - 1]
        if config is None and not arg.startswith("-") and not takes_value:
            config = arg
        else:
            overrides.append(arg)
    help_ = "-h" in argv or "--help" in argv
    return argparse.Namespace(config=config, dry_run="--dry-run" in argv, help=help_, overrides=overrides)
