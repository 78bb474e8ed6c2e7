"""Where a command may write: an output never replaces a file or folder that the command did not create,
unless ``--overwrite``; whole outputs are written to a temporary sibling and renamed into place, so an
interrupted command leaves the old output (or nothing) and never half of a new one.

"Created by the command" is recognised by a record the command writes into its output folder: the marker
``.ldmkit-output.json`` (``{"command": ...}``, written by ``staged`` and ``mark``), or a record the command
has always written (``generate.json``, ``meta.json`` of a feature folder, ...: ``own=``), so that re-running
``generate`` into its own previous output, resuming ``quickstart`` in its ``--out`` or re-running
``ldmkit train`` in its ``output_dir`` keeps working, while a folder of the user's is refused. A single file
carries no such record: an existing file is replaced only with ``--overwrite``.

Foundation (docs/DESIGN.md, Layers): imports nothing of ldmkit but ``errors``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from ldmkit.errors import UserError

logger = logging.getLogger(__name__)

MARKER = ".ldmkit-output.json"

Kind = Literal["file", "folder"]


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing output that this command did not write (default: refuse, naming it).",
    )


def written_by(folder: Path, command: str, own: Iterable[str] = ()) -> bool:
    """Whether ``folder`` holds the marker of ``command``, or one of the records ``own`` it always writes."""
    try:
        if json.loads((folder / MARKER).read_text()).get("command") == command:
            return True
    except (OSError, ValueError, AttributeError):
        pass
    return any((folder / name).exists() for name in own)


def mark(folder: Path, command: str) -> None:
    """Record in ``folder`` that ``command`` wrote it (a re-run may then write there again)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"command": command}) + "\n")


def _writable(path: Path, option: str) -> None:
    """The nearest existing folder above ``path`` takes a new entry: probed by creating one (os.access says
    yes to root on a read-only mount, and says nothing of a full or read-only filesystem)."""
    above = path.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{option} {path}: {above} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=above)
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write in {above} ({e.strerror})") from None
    os.rmdir(probe)


def check(
    path: str | Path,
    command: str,
    *,
    kind: Kind = "folder",
    overwrite: bool = False,
    option: str = "--out",
    own: Iterable[str] = (),
    flag: str | None = "--overwrite",
) -> Path:
    """``path`` as an output of ``command``, or UserError (one line naming the path and the flag):
    a file where a folder goes (or the reverse) is refused always; an existing file, and a non-empty folder
    that ``command`` did not write (``written_by``), only with ``overwrite``; the place must be writable."""
    path = Path(path)
    how = f"pass {flag} to replace it, or choose another path" if flag else "choose another path"
    if kind == "folder" and path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; give a folder")
    if kind == "file" and path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file path")
    if path.exists() and not overwrite:
        if kind == "file":
            raise UserError(f"{option} {path} already exists: {how}")
        if any(path.iterdir()) and not written_by(path, command, own):
            raise UserError(f"{option} {path} already exists and was not written by ldmkit {command}: {how}")
    _writable(path / "entry" if path.is_dir() else path, option)  # an existing folder: probed inside
    return path


def claim(
    path: str | Path,
    command: str,
    *,
    overwrite: bool = False,
    option: str = "--out",
    own: Iterable[str] = (),
    flag: str | None = "--overwrite",
) -> Path:
    """``check`` a folder that the command fills as it goes (and may resume), then mark it as the command's.
    With ``overwrite`` a foreign folder is written into, files of the same names replaced."""
    path = check(path, command, overwrite=overwrite, option=option, own=own, flag=flag)
    mark(path, command)
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync(path: Path) -> None:
    if path.is_dir() and os.name == "nt":
        return  # Windows cannot open folders for fsync
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Put ``tmp`` (a sibling of ``final``) in ``final``'s place. A file: one atomic ``os.replace``. A folder:
    the old one is renamed aside, the new one renamed in, the old one removed (POSIX has no portable atomic
    exchange of two folders; between the renames the old output is still whole, under ``.NAME.old-PID``)."""
    for p in [*sorted(tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True), tmp] if tmp.is_dir() else [tmp]:
        _fsync(p)  # the rename is only as durable as the data it points to
    if tmp.is_dir() and final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        _remove(old)
        final.rename(old)
        try:
            tmp.rename(final)
        except BaseException:
            old.rename(final)  # the old output back in its place
            raise
        _remove(old)
    else:
        os.replace(tmp, final)
        _update_manifest(final)
    _fsync(final.parent)


@contextlib.contextmanager
def staged(final: str | Path, command: str, *, kind: Kind = "folder") -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to write the whole output to; on success it replaces
    ``final`` (``publish``; a folder gets the marker of ``command``), on any error or Ctrl-C it is removed
    and ``final`` is untouched. Call ``check`` first: this replaces whatever is at ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # The suffix is kept: writers choose the format from it (.safetensors).
    tmp = final.parent / f".{final.stem}.tmp-{os.getpid()}{final.suffix if kind == 'file' else ''}"
    _remove(tmp)
    if kind == "folder":
        tmp.mkdir()
    try:
        yield tmp
        if kind == "folder":
            mark(tmp, command)
        publish(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


# ---- manifests: what a folder held when it was written ---------------------------------------------------
MANIFEST = "ldmkit_manifest.json"
CHUNK = 16 << 20


def checksum(path: Path) -> str:
    """xxHash XXH3-128 of the file (the xxhash package: several GB/s per core, so hashing a checkpoint costs
    far less than writing it; README, Reliability, gives the figure at SD1.5 size). Not a cryptographic
    hash: it finds damage (flipped bits, zero-filled blocks), not tampering."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_records(folder: Path, skip: Iterable[str] = ()) -> dict[str, dict[str, int | str]]:
    """``{relative name: {"size", "xxh3_128"}}`` of every file under ``folder`` but ``skip``."""
    skip = set(skip)
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "xxh3_128": checksum(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in skip
    }


def damage(folder: Path, files: dict) -> str | None:
    """The first file of ``files`` (``file_records``; older manifests hold the size alone) that is missing,
    of another size or another checksum under ``folder``, as a phrase naming it; None when all match."""
    for name, record in files.items():
        size, digest = (record, None) if isinstance(record, int) else (record.get("size"), record.get("xxh3_128"))
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if digest is not None and checksum(path) != digest:
            return f"{name} does not match its checksum (its bytes changed after it was written)"
    return None


def _update_manifest(file: Path) -> None:
    """A file ldmkit replaced inside a folder with a manifest (``convert-lora --out EXPORT --overwrite``): its
    record follows, so the folder is not taken for damaged."""
    manifest = file.parent / MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and file.name in data.get("files", {}):
        data["files"][file.name] = {"size": file.stat().st_size, "xxh3_128": checksum(file)}
        manifest.write_text(json.dumps(data, indent=1) + "\n")


def write_manifest(folder: Path, skip: Iterable[str] = ()) -> None:
    """Record every file of ``folder`` (an export) but ``skip`` with its size and checksum in ``MANIFEST``."""
    records = file_records(folder, skip=(MANIFEST, *skip))
    (folder / MANIFEST).write_text(json.dumps({"files": records}, indent=1) + "\n")


def verify(*inputs: tuple[str, str | Path | None]) -> None:
    """Each ``(option, path)`` whose folder (the path, or a file's folder) holds a manifest must match it:
    otherwise UserError naming the file. Folders without one (not written by ldmkit) are not checked."""
    for option, path in inputs:
        if path is None:
            continue
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        if not (folder / MANIFEST).is_file():
            continue
        try:
            files = json.loads((folder / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{option} {folder}: its {MANIFEST} is unreadable (the folder was damaged)") from None
        if Path(path).is_file():
            files = {k: v for k, v in files.items() if folder / k == Path(path)} or files
        problem = damage(folder, files)
        if problem is not None:
            raise UserError(f"{option} {folder} is damaged: {problem}; export it again or restore it")
