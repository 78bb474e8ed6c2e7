"""Every recipe validates against the code; every command's --help works and explains its options."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from ldmkit.cli import COMMANDS, GROUPS
from ldmkit.config import load_config
from ldmkit.methods import METHODS

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "configs").glob("*/*.yaml"))


def test_recipes_exist_for_every_method_with_debug_twin():
    by_method = {p.parent.name for p in RECIPES}
    assert set(METHODS) <= by_method
    for method in by_method:
        assert (ROOT / "configs" / method / "debug.yaml").is_file(), f"{method} has no debug twin"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_validates(recipe):
    cfg = load_config(str(recipe))
    assert cfg.method.name == recipe.parent.name


def _help(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "ldmkit", *args, "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_top_level_help_lists_commands():
    out = _help()
    for name in [*COMMANDS, *GROUPS, "train"]:
        assert name in out


@pytest.mark.parametrize("command", [[c] for c in COMMANDS] + [[g, c] for g, cs in GROUPS.items() for c in cs],
                         ids=lambda c: " ".join(c))
def test_command_help_explains_every_option(command):
    out = _help(*command)
    module = COMMANDS[command[0]][0] if len(command) == 1 else GROUPS[command[0]][command[1]][0]
    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options
    for action in options:
        assert action.help and len(action.help) > 10, f"{' '.join(command)}: {action.option_strings} has no help"
        assert action.option_strings[0] in out


def test_train_help_shows_method_options():
    out = _help("train", "--method.name=lcm_lora")
    assert "--method.w_min" in out and "--train.max_steps" in out and "--data.cache" in out


def test_missing_model_folder_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ldmkit", "train", str(ROOT / "configs/lora/debug.yaml"),
                        f"--model.pretrained={tmp_path / 'nope'}", f"--output_dir={tmp_path / 'run'}",
                        f"--data.path={tmp_path}"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("ldmkit: error:") and "nope" in r.stderr and r.stderr.strip().count("\n") == 0
