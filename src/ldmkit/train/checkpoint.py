"""Checkpoints that are complete or invisible, a total limit, and pickle-free extra state.

A checkpoint is written to ``checkpoints/.tmp-step-NNNNNNN`` and renamed to ``step-NNNNNNN`` only once
every file is on disk (rename is atomic on one filesystem), so a crash mid-save never leaves a
checkpoint that a later run would resume from (REFERENCE sec. 6: users of the references lose runs to
half-written checkpoints that are then auto-loaded).

Method extras (EMA weights, an LCD target network) are stored as safetensors + JSON rather than through
accelerate's ``register_for_checkpointing``, which loads custom objects with ``weights_only=False``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step-(\d{7,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def temp_dir(root: Path, step: int) -> Path:
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, step: int, total_limit: int | None) -> Path:
    """Make ``tmp`` the checkpoint of ``step`` and prune the oldest beyond ``total_limit``."""
    final = tmp.parent / checkpoint_name(step)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if total_limit is not None and total_limit > 0:
        for _, old in list_checkpoints(tmp.parent)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Split a state dict into tensors (returned through ``tensors``) and a JSON skeleton."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "_"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}" if prefix else str(i), tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} without pickle")


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__dict__" in node:
            return {k: _unflatten(v, tensors) for k, v in node["__dict__"]}
        if "__list__" in node:
            return [_unflatten(v, tensors) for v in node["__list__"]]
    return node


def save_extra(path: Path, objects: dict[str, Any]) -> None:
    """Save ``{name: obj}`` (objects with ``state_dict``) as ``path/extra.safetensors`` + ``extra.json``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = {name: _flatten(obj.state_dict(), name, tensors) for name, obj in objects.items()}
    # safetensors refuses tensors that share memory; clone makes every entry its own storage.
    save_file({k: v.clone() for k, v in tensors.items()}, str(path / "extra.safetensors"))
    (path / "extra.json").write_text(json.dumps(skeleton))


def load_extra(path: Path, objects: dict[str, Any]) -> None:
    if not objects:
        return
    tensors = load_file(str(path / "extra.safetensors"))
    skeleton = json.loads((path / "extra.json").read_text())
    for name, obj in objects.items():
        obj.load_state_dict(_unflatten(skeleton[name], tensors))
