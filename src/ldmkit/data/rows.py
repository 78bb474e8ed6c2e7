"""The one check of a data row's types, for every reader whose rows are records (metadata.jsonl, Hugging Face
``datasets`` rows, WebDataset ``.json`` members): the image field is a non-empty path string, the caption
field a string, a list of strings or null; ``where`` names the file and line (or row) in every message.

Readers that index their rows at start (metadata.jsonl) turn a ``RowError`` into a UserError that stops the
run at once; streaming readers (WebDataset, datasets rows read lazily) treat it as an unreadable sample:
``RowError`` is a ValueError, one of transforms.DECODE_ERRORS, so the sample is skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ldmkit.data.transforms import split_captions
from ldmkit.errors import UserError

JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}


class RowError(ValueError):
    """A row whose field has the wrong type; the message names where and which field."""


def kind(value: Any) -> str:
    """``value``'s JSON type in words (``null``, ``a number``, ...)."""
    return "null" if value is None else JSON_TYPES.get(type(value), type(value).__name__)


def captions(value: Any, where: str, column: str) -> list[str]:
    """The captions of a caption field: a string (one per non-empty line), a list of strings, or null (the
    empty caption)."""
    if value is None:
        return [""]
    if isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(c, str) for c in value)):
        return split_captions(value)
    raise RowError(f"{where}: field '{column}' must be a string or a list of strings, got {kind(value)}")


def image_path(value: Any, where: str, column: str) -> str:
    """The image field of a record: a non-empty path string."""
    if isinstance(value, str) and value.strip():
        return value
    raise RowError(f"{where}: field '{column}' must be the image's path (a non-empty string), got {kind(value)}")


def record(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RowError(f"{where}: a row must be a JSON object, got {kind(value)}")
    return value


def metadata_rows(path: Path, image_column: str, caption_column: str) -> Iterator[tuple[str, list[str]]]:
    """(image path, captions) of every non-empty line of a metadata.jsonl; UserError at the first bad line,
    naming it: not UTF-8, not JSON, not an object, a field missing (listing the fields it has) or mistyped."""
    with open(path, "rb") as f:  # bytes: the encoding is checked per line, so an error can name its line
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                # JSON Lines is UTF-8 (jsonlines.org); a byte-order mark on the first line is tolerated
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = record(json.loads(line), where)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg})") from None
            except RowError as e:
                raise UserError(str(e)) from None
            for col, key in ((image_column, "data.image_column"), (caption_column, "data.caption_column")):
                if col not in row:
                    fields = ", ".join(map(str, row)) or "none"
                    raise UserError(f"{where}: no '{col}' field (the line has: {fields}; set {key})")
            try:
                yield (
                    image_path(row[image_column], where, image_column),
                    captions(row[caption_column], where, caption_column),
                )
            except RowError as e:
                raise UserError(str(e)) from None
