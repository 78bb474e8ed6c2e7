"""PaddleMIX / laion400m file lists as a map-style dataset.

Layout (PaddleMIX ``ppdiffusers/examples/.../text_image_pair_dataset.py``):
``train.filelist.list`` - one ``path [weight]`` a line, each path a ``*.filelist``;
``*.filelist`` - one part-file path a line; part files (plain text or ``.gz``) - one sample a line,
``caption \\t placeholder \\t base64(image bytes)``. Relative paths are resolved against the folder of
the file that names them, then against the working directory (as PaddleMIX opens them).

We index every line as (part file, byte offset) once at start-up, reading the part files but decoding
no image; a sample is read by seeking to its line. Plain part files seek directly; ``.gz`` files can only
seek by decompressing from the start (or forward from the last read), so random access into large
``.gz`` parts is slow: decompress them once (``gunzip``) for real training.

Weights: PaddleMIX picks a file list with probability proportional to its weight. Here, when weights
are given, list i gets the share ``weight_i / sum(weights)`` of an epoch: ``round(share * total)``
virtual items mapped evenly onto its lines (lines repeat when the share is larger than the list,
an evenly spaced subset is used when it is smaller). Without weights every line is one item.
Keys are ``<part file name>:<i>`` (i-th sample line of that part).
"""

from __future__ import annotations

import base64
import gzip
import logging
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from ldmkit.data.folder import ImageDataset
from ldmkit.data.transforms import RawSample, decode_image, split_captions
from ldmkit.errors import UserError

if TYPE_CHECKING:
    from ldmkit.config import DataConfig

logger = logging.getLogger(__name__)
_MAX_OPEN = 32  # open part-file handles per worker


def _resolve(name: str, base: Path) -> Path:
    p = Path(name).expanduser()
    if p.is_absolute():
        return p
    return base / p if (base / p).exists() else p


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _line_offsets(path: Path) -> np.ndarray:
    """Offsets of the non-empty lines (in the decompressed stream for .gz)."""
    offsets, pos = [], 0
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64)


class FileListDataset(ImageDataset):
    """Samples of a ``*.filelist.list`` (or a single ``*.filelist``); see the module docstring."""

    def __init__(self, path: str | Path, cfg: DataConfig):
        super().__init__(cfg, str(path))
        path = Path(path)
        if not path.is_file():
            raise UserError(f"data.path {path} is not a file")
        if path.name.endswith(".filelist.list"):
            lists: list[tuple[Path, float | None]] = []
            for ln in _read_lines(path):
                name, *rest = ln.split()
                try:
                    weight = float(rest[0]) if rest else None
                except ValueError:
                    raise UserError(f"{path}: bad weight in line '{ln}'") from None
                lists.append((_resolve(name, path.parent), weight))
        else:
            lists = [(path, None)]
        self.list_files = [path] + [p for p, _ in lists if p != path]

        self.parts: list[Path] = []
        part_ids, offsets, linenos, per_list = [], [], [], []
        for list_path, _ in lists:
            n = 0
            for name in _read_lines(list_path):
                part = _resolve(name, list_path.parent)
                try:
                    offs = _line_offsets(part)
                except (OSError, EOFError) as e:
                    raise UserError(f"cannot read part file {part} (listed in {list_path}): {e}") from None
                part_ids.append(np.full(len(offs), len(self.parts), dtype=np.int32))
                offsets.append(offs)
                linenos.append(np.arange(len(offs), dtype=np.int64))
                self.parts.append(part)
                n += len(offs)
            per_list.append(n)
        self.part_of = np.concatenate(part_ids) if part_ids else np.zeros(0, np.int32)
        self.offset = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        self.lineno = np.concatenate(linenos) if linenos else np.zeros(0, np.int64)  # sample i of its part

        self.items = np.arange(len(self.offset))  # item -> global line
        weights = [w for _, w in lists]
        if any(w is not None for w in weights):
            self.items = self._weighted_items(per_list, [1.0 if w is None else w for w in weights], path)
        if cfg.max_samples is not None:
            self.items = self.items[: cfg.max_samples]
        if len(self.items) == 0:
            raise UserError(f"no samples in {path}")
        self._handles: dict[int, IO[bytes]] = {}

    @staticmethod
    def _weighted_items(per_list: list[int], weights: list[float], path: Path) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise UserError(f"{path}: file-list weights must be >= 0 with a positive sum")
        total, start, items = sum(per_list), 0, []
        for n, share in zip(per_list, w / w.sum()):
            m = int(round(share * total)) if n else 0
            items.append(start + (np.arange(m) * n) // max(m, 1))
            start += n
        return np.concatenate(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # file handles are per process
        return state

    def _read_line(self, line: int) -> bytes:
        pid = int(self.part_of[line])
        f = self._handles.get(pid)
        if f is None:
            if len(self._handles) >= _MAX_OPEN:
                self._handles.pop(next(iter(self._handles))).close()
            part = self.parts[pid]
            f = gzip.open(part, "rb") if part.suffix == ".gz" else open(part, "rb")
            self._handles[pid] = f
        f.seek(int(self.offset[line]))
        return f.readline()

    def load(self, index: int) -> RawSample:
        line = int(self.items[index])
        data = self._read_line(line)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("gb18030")  # PaddleMIX's fallback for Chinese captions
        fields = text.rstrip("\r\n").split("\t")
        if len(fields) < 3:
            raise ValueError(f"expected 'caption<TAB>placeholder<TAB>base64', got {len(fields)} fields")
        image = decode_image(base64.b64decode(fields[2], validate=False))
        key = f"{self.parts[int(self.part_of[line])].name}:{int(self.lineno[line])}"
        return RawSample(image, split_captions(fields[0]), key)

    def files(self) -> list[str]:
        return [str(p) for p in self.list_files + self.parts]
