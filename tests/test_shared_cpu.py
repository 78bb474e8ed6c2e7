"""The ``ldmkit`` entry point chooses the OpenMP wait policy before torch loads its OpenMP runtime, unless the
user chose (README, "A CPU shared with other work"; benchmarks/shared_cpu.py measures the choice)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldmkit.cli import OPENMP_DEFAULTS, OPENMP_GROUPS, OPENMP_OPT_OUT, set_openmp_defaults

SRC = str(Path(__file__).resolve().parents[1] / "src")
KEYS = sorted({k for g in OPENMP_GROUPS for k in g} | set(OPENMP_DEFAULTS))

# The child records the environment at the moment ``import torch`` first starts (a meta-path finder: torch's
# libgomp reads its variables once, when torch loads it), then runs a real command that imports torch.
CHILD = """
import json, os, sys
seen = {}
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.update({k: os.environ.get(k) for k in KEYS})
        return None
sys.meta_path.insert(0, Spy())
from ldmkit.cli import main
code = main(["data", "synth", "--out", sys.argv[1], "--num", "2"])
print(json.dumps({"code": code, "torch_loaded": "torch" in sys.modules, "at_torch_import": seen}))
"""


def _run(tmp_path: Path, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in KEYS and k != OPENMP_OPT_OUT}
    r = subprocess.run(
        [sys.executable, "-c", f"KEYS = {KEYS!r}\n" + CHILD, str(tmp_path / "data")],
        env={**base, "PYTHONPATH": SRC, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not OPENMP_DEFAULTS, reason="no OpenMP defaults chosen")
def test_entry_point_sets_defaults_before_torch_and_user_settings_win(tmp_path):
    # Nothing set by the user: every default is in the environment when torch starts loading.
    out = _run(tmp_path)
    assert out["code"] == 0 and out["torch_loaded"]
    for key, value in OPENMP_DEFAULTS.items():
        assert out["at_torch_import"][key] == value
    # The user's own setting of the same group wins (every variable of a group: test_set_openmp_defaults_rules).
    for key in OPENMP_DEFAULTS:
        group = next(g for g in OPENMP_GROUPS if key in g)
        user_key = min(group - {key})
        seen = _run(tmp_path, **{user_key: "7"})["at_torch_import"]
        assert seen[user_key] == "7"
        assert all(seen[k] is None for k in group if k != user_key), (user_key, seen)
    # The opt-out leaves the runtime at its own defaults.
    out = _run(tmp_path, **{OPENMP_OPT_OUT: "0"})
    assert all(out["at_torch_import"][k] is None for k in OPENMP_DEFAULTS)


def test_set_openmp_defaults_rules(monkeypatch):
    import ldmkit.cli as cli

    monkeypatch.setattr(cli, "OPENMP_DEFAULTS", {"GOMP_SPINCOUNT": "100", "OMP_NUM_THREADS": "1"})
    # torch is loaded in this process: too late, nothing is set.
    assert "torch" in sys.modules
    assert set_openmp_defaults({}) == {}
    monkeypatch.delitem(sys.modules, "torch")
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_openmp_defaults(env) == {"OMP_NUM_THREADS": "1"}  # the wait group is the user's
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    for user_key in ("MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        assert set_openmp_defaults({user_key: "2"}) == {"GOMP_SPINCOUNT": "100"}
    for user_key in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_WAIT_POLICY"):
        assert set_openmp_defaults({user_key: "0"}) == {"OMP_NUM_THREADS": "1"}
    assert set_openmp_defaults({OPENMP_OPT_OUT: "0"}) == {}
