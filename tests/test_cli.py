"""Every recipe validates against the code; every command's --help works and explains its options."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from ldmkit.cli import COMMANDS, GROUPS
from ldmkit.config import shipped_recipes
from ldmkit.errors import UserError
from ldmkit.methods import BUILTIN_METHODS, load_config

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "configs").glob("*/*.yaml"))


def test_recipes_exist_for_every_method_with_debug_twin():
    by_method = {p.parent.name for p in RECIPES}
    assert set(BUILTIN_METHODS) <= by_method
    for method in by_method:
        assert (ROOT / "configs" / method / "debug.yaml").is_file(), f"{method} has no debug twin"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_validates(recipe, monkeypatch):
    # as a GPU user resolves it: the production recipes train in fp16, which needs CUDA
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    cfg = load_config(str(recipe))
    assert cfg.method.name == recipe.parent.name


def test_shipped_recipes_resolve_by_name_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: names resolve to the copies inside the package
    assert shipped_recipes() == [f"{p.parent.name}/{p.stem}" for p in RECIPES]
    assert load_config("lcm_lora/debug").method.name == "lcm_lora"
    assert load_config("configs/lora/debug.yaml").method.name == "lora"
    with pytest.raises(UserError, match="config file not found: lcm_lora/nope .*shipped recipes: .*lcm_lora/sd15"):
        load_config("lcm_lora/nope")


def test_wheel_carries_the_recipes(tmp_path):
    """A non-editable install (pip install ., a wheel) has every recipe: the quickstart and
    ``ldmkit train lcm_lora/sd15`` need no checkout. Built from a copy so the checkout gets no build/."""
    import shutil
    import zipfile

    src = tmp_path / "src_copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # Build with the installed setuptools when it can make wheels by itself (>= 70.1), else in pip's isolated env.
    try:
        import setuptools

        own = tuple(int(x) for x in setuptools.__version__.split(".")[:2]) >= (70, 1)
    except (ImportError, ValueError):
        own = False
    isolation = ["--no-build-isolation"] if own else []
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("ldmkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"ldmkit/recipes/{r}.yaml" for r in shipped_recipes()} <= names
    assert "ldmkit/recipes/lcm_lora/quickstart.yaml" in names


def _help(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "ldmkit", *args, "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_top_level_help_lists_commands():
    out = _help()
    for name in [*COMMANDS, *GROUPS, "train"]:
        assert name in out


@pytest.mark.parametrize(
    "command", [[c] for c in COMMANDS] + [[g, c] for g, cs in GROUPS.items() for c in cs], ids=lambda c: " ".join(c)
)
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
    assert "shipped recipes" in out and all(r in out for r in shipped_recipes())


def test_missing_model_folder_is_one_line_error(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ldmkit",
            "train",
            str(ROOT / "configs/lora/debug.yaml"),
            f"--model.pretrained={tmp_path / 'nope'}",
            f"--output_dir={tmp_path / 'run'}",
            f"--data.path={tmp_path}",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().startswith("ldmkit: error:") and "nope" in r.stderr and r.stderr.strip().count("\n") == 0


HELP_COMMANDS = (
    [["train"], ["train", "--method.name=lcm_lora"]]
    + [[c] for c in COMMANDS]
    + [[g, c] for g, cs in GROUPS.items() for c in cs]
)


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c))
def test_help_imports_no_torch_and_is_fast(command):
    """--help must not wait for torch (about 2 s): it imports none of it, and returns in well under a second
    (best of three, the machine may be busy)."""
    import time

    code = (
        "import sys; from ldmkit.cli import main\n"
        f"rc = main({[*command, '--help']!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc)"
    )
    times = []
    for _ in range(3):
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        assert r.returncode == 0, r.stderr
    assert min(times) < 1.0, times


def test_train_help_is_the_chosen_method_one_line_per_option():
    out = _help("train", "--method.name=lcm_lora")
    lines = out.splitlines()
    assert len(lines) < 120, len(lines)
    assert any(line.strip().startswith("--method.lora_rank=64 ") for line in lines)
    assert any(line.strip().startswith("--train.max_steps=1000 ") for line in lines)
    assert any(line.strip().startswith("--train.optimizer=adamw ") for line in lines)
    # only lcm_lora's options, no jsonargparse noise, no dataclass reprs as headers
    assert "--method.unet_time_cond_proj_dim" not in out and "--method.snr_gamma" not in out
    assert "--print_config" not in out and "--config CONFIG" not in out and "DataConfig(" not in out
    # every option on one line with its default: a continuation line never starts without "--"
    options = [line for line in lines if line.startswith("  --")]
    assert len(options) > 50


def test_command_help_shows_defaults():
    out = " ".join(_help("generate").split())
    assert "(default: 0)" in out and "(default: auto)" in out


def test_verbosity_flags_anywhere():
    from ldmkit.cli import verbosity

    assert verbosity(["generate", "--model", "m", "-v"]) == (1, ["generate", "--model", "m"])
    assert verbosity(["-q", "train", "x.yaml"]) == (-1, ["train", "x.yaml"])
    r = subprocess.run(
        [sys.executable, "-m", "ldmkit", "train", "lora/debug", "--dry-run", "-q"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "method:" in r.stdout


def test_tiny_model_archs_match_the_library():
    from ldmkit.commands.tiny_model import ARCHS
    from ldmkit.models.tiny import ARCHS as LIBRARY_ARCHS

    assert tuple(ARCHS) == tuple(LIBRARY_ARCHS)


def test_train_help_of_a_recipe_shows_its_values():
    out = _help("train", "lcm_lora/debug")
    assert "  --method.lora_rank=4  " in out and "  --train.max_steps=8  " in out
    assert "  --method.unet_time_cond_proj_dim" not in out
