"""Helpers for tests that read training runs or launch several processes (imported by test modules)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path


def logged(run: Path, key: str = "loss") -> list[float]:
    """One value per logged step from a run's metrics.jsonl."""
    return [json.loads(line)[key] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def launch_two() -> list[str]:
    """``accelerate launch`` of 2 CPU processes (gloo) on a free port: other test runs on the machine may
    hold accelerate's default 29500. Append ``-m module args`` or a script."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]
