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


# ---- the thread governor (ldmkit/threads.py) --------------------------------------------------------------


class _Machine:
    """A fake /proc/stat and clock: ``run(seconds, busy_cores)`` advances both as if the rest of the machine
    (and this process, whose CPU time the governor subtracts) kept ``busy_cores`` cores busy."""

    def __init__(self, path: Path, hz: int):
        self.path, self.hz, self.now, self.busy, self.idle = path, hz, 100.0, 0.0, 0.0
        self.write()

    def write(self):
        b, i = int(self.busy * self.hz), int(self.idle * self.hz)
        self.path.write_text(f"cpu  {b} 0 0 {i} 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")

    def run(self, seconds: float, busy_cores: float, cores: int = 2):
        self.now += seconds
        self.busy += seconds * busy_cores
        self.idle += seconds * (cores - busy_cores)
        self.write()


def test_governor_follows_the_idle_cores_after_two_agreeing_looks(tmp_path, monkeypatch):
    """Beside one busy process (1 of 2 cores taken by others) torch gets 1 thread, back to 2 when it stops; one
    look that disagrees changes nothing; looks closer than a second apart are not taken."""
    import torch

    from ldmkit import threads

    monkeypatch.setattr(threads, "own_cpu_seconds", lambda hz: 0.0)  # this process: counted in busy_cores below
    machine = _Machine(tmp_path / "stat", hz=100)
    gov = threads.Governor(2, stat=machine.path, clock=lambda: machine.now)
    gov.cores = 2
    before = torch.get_num_threads()
    try:
        assert gov.tick() == 2  # the first look only remembers
        machine.run(1.5, busy_cores=1.0)
        assert gov.tick() == 2  # one look wants 1 thread: not yet
        machine.run(0.5, busy_cores=1.0)
        assert gov.tick() == 2  # under a second since the last look: not looked
        machine.run(1.0, busy_cores=1.0)
        assert gov.tick() == 1 and torch.get_num_threads() == 1  # two agreeing looks: set
        machine.run(1.0, busy_cores=0.0)
        assert gov.tick() == 1
        machine.run(1.0, busy_cores=1.0)  # the idle look is not confirmed by the next one
        assert gov.tick() == 1
        machine.run(1.0, busy_cores=0.1)
        machine_looks = [gov.tick()]
        machine.run(1.0, busy_cores=0.2)
        machine_looks.append(gov.tick())
        assert machine_looks == [1, 2] and torch.get_num_threads() == 2
        machine.run(1.0, busy_cores=2.0)  # both cores taken elsewhere: never below 1 thread
        gov.tick()
        machine.run(1.0, busy_cores=2.0)
        assert gov.tick() == 1
        assert [t for _, t in gov.changes] == [1, 2, 1]
    finally:
        torch.set_num_threads(before)


def test_governor_subtracts_this_process_and_never_exceeds_its_start(tmp_path, monkeypatch):
    """The machine's busy time includes this process's own threads (and its children): only the rest counts.
    A machine with more idle cores than torch started with does not raise the thread count past it."""
    from ldmkit import threads

    own = {"s": 0.0}
    monkeypatch.setattr(threads, "own_cpu_seconds", lambda hz: own["s"])
    machine = _Machine(tmp_path / "stat", hz=100)
    gov = threads.Governor(2, stat=machine.path, clock=lambda: machine.now)
    gov.cores = 4
    gov.others()
    machine.run(2.0, busy_cores=2.0, cores=4)
    own["s"] += 3.0  # this process used 1.5 cores of the 2 busy ones
    assert gov.others() == pytest.approx(0.5)
    assert gov.want(0.5) == 2  # 4 cores, 0.5 busy elsewhere: 3.5 idle, but torch started with 2


def test_governor_is_off_when_the_user_chose_threads_and_measures_real_children(tmp_path, monkeypatch):
    from ldmkit import threads

    monkeypatch.setattr(threads, "_governor", None)
    assert threads.enable({"OMP_NUM_THREADS": "2"}) is None and threads._governor is None
    assert threads.enable({"MKL_NUM_THREADS": "1"}) is None
    assert threads.enable({OPENMP_OPT_OUT: "0"}) is None
    gov = threads.enable({})
    assert gov is not None and threads._governor is gov and gov.max_threads is None  # torch's own, at first tick
    # own CPU includes a live child's: a busy child raises it by about its CPU time
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\nimport sys; sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        start = threads.own_cpu_seconds(os.sysconf("SC_CLK_TCK"))
        import time

        deadline = time.monotonic() + 20
        while threads.own_cpu_seconds(os.sysconf("SC_CLK_TCK")) - start < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert threads.own_cpu_seconds(os.sysconf("SC_CLK_TCK")) - start >= 0.5
    finally:
        child.communicate(b"")
