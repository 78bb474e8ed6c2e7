"""The quickstart's one caching mechanism: a stage's results are a JSON file written whole (``write_json``),
reused when the key they were measured with still holds (``cached``); a model enters a key by the hash of its
weights (``fingerprint``), so a retrained model is measured again and an unchanged one never is."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def fingerprint(folder: Path) -> str:
    """The identity of a model export: a hash of its weight files (names and bytes; a few MB here), so a
    cached evaluation is reused only for the very weights it measured."""
    digest = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*.safetensors")):
        digest.update(str(f.relative_to(folder)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def text_fingerprint(lines: list[str]) -> str:
    """A short hash of a list of strings (the evaluation prompts of a key)."""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def cached(file: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The results in ``file`` when they were measured with ``key`` (JSON-equal), else None."""
    if not file.is_file():
        return None
    try:
        saved = json.loads(file.read_text())
    except ValueError:
        return None
    return saved if saved.get("key") == json.loads(json.dumps(key)) else None


def read_json(file: Path) -> dict[str, Any] | None:
    """The results in ``file`` for a stage whose validity its caller decides (no key), else None."""
    return json.loads(file.read_text()) if file.is_file() else None


def write_json(file: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``file`` (indented JSON) in one step."""
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(file)  # a run stopped while writing leaves no half file that looks cached
