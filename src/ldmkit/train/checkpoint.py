"""Checkpoints that are complete or invisible, a total limit, and pickle-free extra state.

A checkpoint is written to ``checkpoints/.tmp-step-NNNNNNN``, every file and the folder are fsynced, and
only then is it renamed to ``step-NNNNNNN`` (rename is atomic on one filesystem), so neither a crash nor
a power loss mid-save leaves a checkpoint that a later run would resume from (users of diffusers'
training scripts lose runs to half-written checkpoints that are then auto-loaded). ``trainer_state.json``,
written last, lists every file with its size and an XXH3-128 checksum (ldmkit.outputs.checksum);
``latest_valid_checkpoint`` checks that list and skips a checkpoint damaged later (a file deleted,
truncated, emptied, or bytes changed at the same size), warning with the file's name and falling back to
the previous one. Exports get the same manifest (``write_export_manifest``), which ``generate``,
``evaluate`` and ``merge-lora`` check (ldmkit.outputs.verify).

Method extras (EMA weights, an LCD target network) are stored as safetensors + JSON rather than through
accelerate's ``register_for_checkpointing``, which loads custom objects with ``weights_only=False``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ldmkit import outputs

logger = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d{7,})$")
STATE_FILE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Write ``trainer_state.json`` (last: it marks the checkpoint complete) with the name, size and checksum
    of every other file in ``folder``, so damage done later can be told from a complete checkpoint."""
    body = {**state, "files": outputs.file_records(folder, skip=(STATE_FILE,))}
    (folder / STATE_FILE).write_text(json.dumps({**body, "checksum": _own_checksum(body)}))


def _own_checksum(body: dict[str, Any]) -> str:
    """trainer_state.json's checksum of its own content (all but this field), so that a changed step or
    file record is found too."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(json.dumps(body, sort_keys=True).encode())


def write_export_manifest(export_dir: Path) -> None:
    """The export's files with sizes and checksums (``ldmkit_manifest.json``), written after the export and
    its model card; ``generate`` / ``evaluate`` / ``merge-lora`` refuse an export that no longer matches it. The model card
    and its sample grid are left out: users edit cards before uploading them, and nothing loads them."""
    outputs.write_manifest(export_dir, skip=("README.md", "samples.png"))


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())


def damage(folder: Path) -> str | None:
    """Why the checkpoint ``folder`` cannot be resumed from, or None when every file it lists is present
    with its recorded size and checksum (checkpoints written before checksums: size, and JSON and
    safetensors headers that read)."""
    from safetensors import safe_open

    if not (folder / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    try:
        state = read_state(folder)
        files = state["files"]
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is unreadable"
    if "checksum" in state and state.pop("checksum") != _own_checksum(state):
        return f"{STATE_FILE} does not match its checksum (its bytes changed after it was written)"
    problem = outputs.damage(folder, files)
    if problem is not None:
        return problem
    for name, record in files.items():
        if not isinstance(record, int):
            continue  # its checksum matched: the bytes are those written
        path = folder / name
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt"):
                    pass
        except Exception as e:  # any parse error means the same: not this checkpoint
            return f"{name} is unreadable ({type(e).__name__})"
    return None


def latest_valid_checkpoint(root: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint that is not damaged; each damaged newer one (a step folder whose
    trainer_state.json was removed included) is skipped with a warning naming it and what is wrong."""
    steps = [(int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else []) if (m := STEP_RE.match(p.name))]
    for step, path in sorted(p for p in steps if p[1].is_dir())[::-1]:
        problem = damage(path)
        if problem is None:
            return step, path
        logger.warning("skipping damaged checkpoint %s: %s", path, problem)
    return None


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and the folders themselves to disk (a rename is only as durable
    as the data it points to: without this a power loss can leave zero-length files under a complete name)."""
    for p in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [folder]:
        _fsync(p)


def _fsync(path: Path) -> None:
    if path.is_dir() and os.name == "nt":
        return  # Windows cannot open folders for fsync
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_dir(root: Path, step: int) -> Path:
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, step: int, total_limit: int | None) -> Path:
    """Make ``tmp`` the checkpoint of ``step`` and prune the oldest beyond ``total_limit``."""
    final = tmp.parent / checkpoint_name(step)
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(tmp.parent)  # the rename itself
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
