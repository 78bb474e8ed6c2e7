"""benchmarks/gpu_check.sh --dry-run: the GPU check's chain on the CPU at toy size (ldmkit's rows; the peer's row
says it needs a diffusers checkout), printing the table the GPU run prints."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
ROW = re.compile(r"^  (sd15|uvit) +(peer|ldmkit) +(lcm_lora|lcd) +(\S+) +(\S+) +(\S+)")


def test_gpu_check_dry_run(tmp_path):
    import sys

    r = subprocess.run(
        [str(SCRIPT), "--dry-run", "--steps", "3", "--out", str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = [m.groups() for line in r.stdout.splitlines() if (m := ROW.match(line))]
    assert [row[:3] for row in rows] == [
        ("sd15", "peer", "lcm_lora"),
        ("sd15", "ldmkit", "lcm_lora"),
        ("sd15", "ldmkit", "lcd"),
        ("uvit", "ldmkit", "lcm_lora"),
        ("uvit", "ldmkit", "lcd"),
    ]
    assert rows[0][3] == "-" and "no diffusers checkout" in r.stdout  # no peer without a checkout
    for row in rows[1:]:
        assert float(row[3]) > 0  # samples/s measured from the stamped optimizer steps
        assert row[4] == "-"  # no CUDA: no peak memory
