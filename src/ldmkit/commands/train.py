"""``ldmkit train CONFIG.yaml [--section.key=value ...] [--dry-run]``."""

from __future__ import annotations

import argparse
import sys

from ldmkit.config import dump_config
from ldmkit.methods import load_config, method_help

DESCRIPTION = """Train with a YAML recipe. The method is named inside the recipe (method.name: finetune | lora |
lcm_lora | lcd | uvit | vae) and its knobs live under method. Override any key with --section.key=value
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
    print(f"export: {export}")
    return 0


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
            names = [recipe_method_name(args.config, overrides)]
        except (UserError, OSError):
            names = list(registered_methods())
        for name in names:
            print(f"\n===== options of method {name!r} (and the shared sections) =====")
            print(method_help(name))
            if len(names) > 1:
                break  # the shared sections are the same for all; list the other methods' own options briefly
        if len(names) > 1:
            for name in names[1:]:
                print(f"\n(method {name!r}: ldmkit train --help --method.name={name})")
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
