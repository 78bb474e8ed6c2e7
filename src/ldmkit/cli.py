"""The ``ldmkit`` command line. Each command lives in its own module (docs/DESIGN.md, Commands);
this file only routes to them and turns UserError into one line on stderr."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ldmkit import __version__
from ldmkit.errors import Interrupted, UserError

# command -> (module, one-line help). Two-word commands are nested ("data synth").
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": (
        "ldmkit.commands.generate",
        "Generate images with a pipeline folder (SD1.5, SDXL, U-ViT; LCM or LoRA).",
    ),
    "tiny-model": ("ldmkit.commands.tiny_model", "Build a tiny random SD1.5/SDXL-architecture pipeline offline."),
    "merge-lora": (
        "ldmkit.commands.merge_lora",
        "Fuse a LoRA (diffusers or kohya) into the UNet and save a full pipeline.",
    ),
    "convert-model": (
        "ldmkit.commands.convert_model",
        "Convert a model between a diffusers folder and one original-layout .safetensors file.",
    ),
    "convert-lora": ("ldmkit.commands.convert_lora", "Convert a LoRA file between diffusers and kohya formats."),
    "evaluate": ("ldmkit.commands.evaluate", "Generate at several step counts and report speed and quality."),
    "quickstart": (
        "ldmkit.quickstart",
        "From nothing to a measured few-step model on a CPU (data, VAE, teacher, LCM, report).",
    ),
}
GROUPS: dict[str, dict[str, tuple[str, str]]] = {
    "data": {"synth": ("ldmkit.commands.data_synth", "Write a synthetic coloured-shapes text-to-image dataset.")},
    "prepare": {
        "features": ("ldmkit.commands.prepare_features", "Encode a dataset into the MS-COCO feature layout for U-ViT.")
    },
}


def _add(sub, name: str, module: str, help_text: str, load: bool) -> None:
    """Add one command; its module is imported only when that command is the one being run."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    if load:
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldmkit", description="Latent diffusion training and latent consistency distillation."
    )
    parser.add_argument("--version", action="version", version=f"ldmkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help="Train or distill with a YAML recipe (ldmkit train --help).", add_help=False)
    first, second = (argv + ["", ""])[:2]
    for name, (module, help_text) in COMMANDS.items():
        _add(sub, name, module, help_text, load=first == name)
    for group, commands in GROUPS.items():
        g = sub.add_parser(group, help=f"{group} commands: {', '.join(commands)}")
        gsub = g.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
        for name, (module, help_text) in commands.items():
            _add(gsub, name, module, help_text, load=first == group and second == name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = argv[:1] in (["-v"], ["--verbose"])
    if verbose:
        argv = argv[1:]
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv[:1] == ["train"]:
            from ldmkit.commands.train import main as train_main

            return train_main(argv[1:])
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help()
            return 0 if not argv else 2
        return args._run(args) or 0
    except UserError as e:
        print(f"ldmkit: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"ldmkit: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("ldmkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
