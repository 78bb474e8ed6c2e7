"""A run folder across invocations: the checkpoint to resume from (``train.resume_from``), whether the config
of a re-run may continue the run there (``check_rerun``), the lock that keeps a second run out, and the stop
signals that end a run cleanly between two steps."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from ldmkit.config import Config
from ldmkit.errors import UserError
from ldmkit.train import checkpoint as ckpt

logger = logging.getLogger(__name__)


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (what clusters send before killing a job) only set a flag: the loop
    finishes the step it is in, saves a checkpoint and raises ``Interrupted``. A KeyboardInterrupt raised
    at an arbitrary point could land between ``optimizer.step()`` and ``step += 1`` and save one step's
    weights under another step's name. A second Ctrl-C aborts at once (the last checkpoint stays): the handler
    raises KeyboardInterrupt wherever the main thread is, and the CLI exits 130.

    A process started with SIGINT ignored (``nohup``, a background job of a shell without job control: POSIX
    has them ignore SIGINT, and Python keeps an inherited SIG_IGN) keeps ignoring it, as asked; the run says
    so once, since a Ctrl-C in that terminal will not reach it, and that SIGTERM does."""

    _told_ignored = False

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                    if not StopSignals._told_ignored:  # once per process (the quickstart trains several times)
                        StopSignals._told_ignored = True
                        logger.warning(
                            "this process ignores Ctrl-C (SIGINT; started with nohup or in the background): stop "
                            "it with SIGTERM (kill %d), which finishes the step and saves a checkpoint",
                            os.getpid(),
                        )
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        import signal

        if self.signum is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a third one, mid-cleanup, stops too
            raise KeyboardInterrupt("aborted by a second Ctrl-C without saving; the last checkpoint stays")
        self.signum = signum
        logger.warning(
            "%s: finishing this step and saving a checkpoint (Ctrl-C again aborts without saving)",
            signal.Signals(signum).name,
        )

    def requested(self, accelerator) -> int | None:
        """The signal every process stops for (processes agree, so all of them save together)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        signum = int(accelerator.reduce(flag, reduction="max").item())
        return signum or None


class RunLock:
    """An exclusive lock on output_dir (fcntl.flock, released by the OS if the process dies), so a second
    run started on the same folder stops with one line instead of racing the first."""

    NAME = ".ldmkit.lock"

    def __init__(self, out: Path, enabled: bool):
        self.path, self.enabled, self.file = out / self.NAME, enabled, None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        refuse_foreign(self.path.parent)
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs are not locked there
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a+")
        except OSError as e:  # read-only, or a path through a file: before any work is done
            raise UserError(f"output_dir {self.path.parent}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"output_dir {self.path.parent} is in use by another ldmkit run ({holder})") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()


# What a run writes into output_dir; train/loop.py, set_aside.
RUN_FILES = ("config.yaml", "metrics.jsonl", "train_stats.json", "checkpoints", "export", "samples", "logs", "previous")


def refuse_foreign(out: Path) -> None:
    """output_dir may be new, or hold anything but what a run writes, or be a run's: the lock file every run
    leaves (``.ldmkit.lock``) is its record (docs/DESIGN.md, Re-running). A folder that holds e.g. an
    ``export/`` or ``config.yaml`` of something else would be written over: refused, naming it."""
    if not out.is_dir() or (out / RunLock.NAME).exists():
        return
    clash = [name for name in RUN_FILES if (out / name).exists()]
    if clash:
        raise UserError(
            f"output_dir {out} holds {clash[0]} but no ldmkit run (no {RunLock.NAME}): a run would write over it; "
            "choose another output_dir"
        )


def check_rerun(cfg: Config, out: Path, latest_step: int | None) -> None:
    """A re-run of an output_dir that holds a run: the same config resumes (or is finished), a raised
    train.max_steps continues to the new end, anything else that changes what is computed stops with the
    changed keys unless train.allow_config_change says to go on."""
    import yaml

    from ldmkit.config import config_changes, config_to_dict, is_bookkeeping

    saved = out / "config.yaml"
    if latest_step is None or not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"{saved} is unreadable: restore it, or start again with --train.resume_from=none") from None
    changes = [c for c in config_changes(old, config_to_dict(cfg)) if not is_bookkeeping(c[0])]
    max_steps = [c for c in changes if c[0] == "train.max_steps"]
    if max_steps and cfg.train.max_steps < latest_step:
        raise UserError(
            f"train.max_steps={cfg.train.max_steps} is below the step of the latest checkpoint in {out} "
            f"({latest_step}); raise it, or start again with --train.resume_from=none"
        )
    if max_steps and max_steps[0][2] > max_steps[0][1]:
        logger.info("train.max_steps raised from %s to %s: continuing to the new end", *max_steps[0][1:])
        changes.remove(max_steps[0])
    if not changes:
        return
    listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)
    if not cfg.train.allow_config_change:
        raise UserError(
            f"{out} holds a run with another config ({listed}); --train.allow_config_change=true continues it "
            "with the new values, --train.resume_from=none starts again (the old run is kept in previous/), "
            "or choose another output_dir"
        )
    logger.warning("continuing %s with a changed config: %s", out, listed)


def set_aside(out: Path) -> None:
    """train.resume_from=none: move what output_dir holds from an earlier run to output_dir/previous/."""
    names = ["checkpoints", "export", "samples", "logs", "metrics.jsonl", "config.yaml"]
    present = [out / n for n in names if (out / n).exists()]
    if not present:
        return
    dest = out / "previous" / time.strftime("run-%Y%m%d-%H%M%S")
    dest.mkdir(parents=True)
    for p in present:
        p.rename(dest / p.name)
    logger.info("train.resume_from=none: the earlier run in %s moved to %s", out, dest)


def resume_point(cfg: Config, out: Path) -> tuple[int, Path] | None:
    """The checkpoint to start from: ``train.resume_from`` (latest | none | a folder), verified."""
    where = cfg.train.resume_from
    if where == "none":
        return None
    if where == "latest":
        return ckpt.latest_valid_checkpoint(out / "checkpoints")
    path = Path(where)
    if not (path / ckpt.STATE_FILE).is_file():
        raise UserError(f"train.resume_from: {path} is not an ldmkit checkpoint (no {ckpt.STATE_FILE})")
    problem = ckpt.damage(path)
    if problem is not None:
        raise UserError(f"train.resume_from: checkpoint {path} is damaged: {problem}")
    return int(ckpt.read_state(path)["step"]), path


def run_progress(out: Path) -> tuple[int, int] | None:
    """(step reached, train.max_steps it was started with) of the run in output_dir ``out``: the newest complete
    checkpoint's step (max_steps once exported), or None when no run was started there (no readable config.yaml:
    a run started on it says what is wrong)."""
    import yaml

    saved = out / "config.yaml"
    if not saved.is_file():
        return None
    try:
        max_steps = int(yaml.safe_load(saved.read_text())["train"]["max_steps"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        return None
    if (out / "export" / "ldmkit_config.yaml").is_file():
        return max_steps, max_steps
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    return (latest[0] if latest else 0), max_steps
