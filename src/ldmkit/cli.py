"""The ``ldmkit`` command line. Each command lives in its own module (docs/DESIGN.md, Commands);
this file only routes to them and turns UserError into one line on stderr."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ldmkit import __version__, threads
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
        "From nothing to a measured few-step model on a CPU (data, VAE, teacher, LCM/TCD/PCM, report).",
    ),
}
GROUPS: dict[str, dict[str, tuple[str, str]]] = {
    "data": {"synth": ("ldmkit.commands.data_synth", "Write a synthetic coloured-shapes text-to-image dataset.")},
    "prepare": {
        "features": ("ldmkit.commands.prepare_features", "Encode a dataset into the MS-COCO feature layout for U-ViT.")
    },
}


# How the OpenMP runtime of torch's CPU kernels waits and how many threads it runs, when the user has not said
# (README, "A CPU shared with other work"; measured by benchmarks/shared_cpu.py). torch's PyPI wheels load GNU
# libgomp (torch/lib/libgomp.so.1), whose idle threads spin GOMP_SPINCOUNT iterations (300000 when
# OMP_WAIT_POLICY is unset) before sleeping (libgomp manual, "GOMP_SPINCOUNT"). With one other busy process
# on the cores, a spinning thread takes the core the thread it waits for needs, and every parallel region
# waits for the slowest thread: a conv ran 3.7x slower (issue 26). A bounded spin keeps the quick hand-off of
# short waits and sleeps in long ones. Change this after measuring; {} turns it off.
OPENMP_DEFAULTS: dict[str, str] = {"GOMP_SPINCOUNT": "10000"}
# Variables that say how OpenMP should wait or how many threads: if the user set any of a group, ldmkit sets
# nothing of that group (GOMP_SPINCOUNT would override a user's OMP_WAIT_POLICY in libgomp).
OPENMP_GROUPS = (
    frozenset({"OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"}),
    frozenset({"OMP_NUM_THREADS", "MKL_NUM_THREADS"}),
)
OPENMP_OPT_OUT = "LDMKIT_OPENMP_DEFAULTS"  # =0: leave the OpenMP runtime at its own defaults


def set_openmp_defaults(environ=os.environ) -> dict[str, str]:
    """Put OPENMP_DEFAULTS into the environment where the user set nothing of their group; returns what was set.
    Only before torch is imported: libgomp reads these once, when torch loads it (after that a change
    would only mislead)."""
    if "torch" in sys.modules or environ.get(OPENMP_OPT_OUT, "1") == "0":
        return {}
    chosen = {}
    for key, value in OPENMP_DEFAULTS.items():
        group = next((g for g in OPENMP_GROUPS if key in g), frozenset({key}))
        if not any(k in environ for k in group):
            chosen[key] = value
    environ.update(chosen)
    return chosen


class DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless it has none, or the help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or "default" in text:
            return text
        if not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _add(sub, name: str, module: str, help_text: str, load: bool) -> None:
    """Add one command; its module is imported only when that command is the one being run."""
    p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsFormatter)
    if load:
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldmkit", description="Latent diffusion training and latent consistency distillation."
    )
    parser.add_argument("--version", action="version", version=f"ldmkit {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="Debug logging and every dependency warning (anywhere)."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="Warnings and errors only (anywhere).")
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


VERBOSITY_FLAGS = {"-v": 1, "--verbose": 1, "-q": -1, "--quiet": -1}

# Messages of the dependencies that say nothing about the user's run (see docs/DESIGN.md, Output); -v shows them.
HARMLESS_WARNINGS = (
    r".*torchvision.*",  # transformers: image processors without torchvision
    r".*were passed to LCMScheduler, but are not expected.*",
    r".*No LoRA keys associated to.*",
    r".*The config attributes .* were passed to .*, but are not expected.*",
    r".*`torch_dtype` is deprecated.*",
    r".*upcast_vae.*",
)
LIBRARY_LOGGERS = ("diffusers", "transformers", "accelerate", "peft", "huggingface_hub", "torch", "PIL", "matplotlib")


def verbosity(argv: list[str]) -> tuple[int, list[str]]:
    """-v / --verbose (debug, every dependency message) and -q / --quiet (warnings only), anywhere on the
    command line: (-1 | 0 | 1, argv without them)."""
    level = 0
    rest = []
    for arg in argv:
        if arg in VERBOSITY_FLAGS:
            level = VERBOSITY_FLAGS[arg]
        else:
            rest.append(arg)
    return level, rest


class TqdmHandler(logging.StreamHandler):
    """Log lines written above the progress bar (tqdm.write), so the bar stays on one line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_output(level: int) -> None:
    """Logging through tqdm; quiet dependencies unless -v (their known-harmless warnings and progress bars
    of weight loading are filtered; real errors still show)."""
    import os
    import warnings

    handler = TqdmHandler()
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(name)s: %(message)s" if level > 0 else "%(levelname)s: %(message)s")
    )
    root = logging.getLogger()
    # Replace an earlier call's handler (main() run twice in one process); keep others' (pytest's caplog).
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, TqdmHandler)] + [handler]
    root.setLevel(logging.DEBUG if level > 0 else logging.INFO if level == 0 else logging.WARNING)
    if level > 0:
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # The libraries set their own loggers' levels when imported: tell them through their variables.
    for var in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "DIFFUSERS_NO_ADVISORY_WARNINGS"):
        os.environ.setdefault(var, "1")
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    set_openmp_defaults()  # first: before any command imports torch
    threads.enable()  # torch's thread count follows the idle cores unless the user chose one
    level, argv = verbosity(list(sys.argv[1:] if argv is None else argv))
    setup_output(level)
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
    except KeyboardInterrupt as e:
        print(f"ldmkit: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
