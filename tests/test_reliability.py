"""Re-runs, damaged checkpoints, interrupted runs: nothing wrong goes through silently, no work is lost.

All on the toy method (tests/helpers/toy_method.py), whose runs take a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash
import yaml
from safetensors.torch import load_file
from test_loop import toy_config, weights

from ldmkit.errors import Interrupted, UserError
from ldmkit.train import checkpoint as ckpt
from ldmkit.train.loop import train

from helpers.runs import logged


def same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shapes_folder) -> Path:
    """An uninterrupted 6-step run (checkpoints at 3 and 6) that the others are compared with."""
    tmp = tmp_path_factory.mktemp("reference")
    train(toy_config(tmp, shapes_folder, "run", "--method.use_ema=true"))
    return tmp / "run"


# ---- a re-run of an existing output_dir -------------------------------------------------------------
def test_changed_config_on_a_finished_run_names_the_keys(tmp_path, shapes_folder):
    train(toy_config(tmp_path, shapes_folder, "run", "--train.max_steps=3"))
    with pytest.raises(UserError, match=r"method.width: 16 -> 8.*allow_config_change"):
        train(toy_config(tmp_path, shapes_folder, "run", "--train.max_steps=3", "--method.width=8"))


def test_changed_learning_rate_on_resume_stops_unless_allowed(tmp_path, shapes_folder, monkeypatch):
    from helpers.toy_method import ToyMethod

    monkeypatch.setattr(ToyMethod, "crash_at_step", 5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(toy_config(tmp_path, shapes_folder, "run"))
    monkeypatch.setattr(ToyMethod, "crash_at_step", 0)
    with pytest.raises(UserError, match=r"train.learning_rate: 0.01 -> 0.1"):
        train(toy_config(tmp_path, shapes_folder, "run", "--train.learning_rate=0.1"))
    # nothing was trained or written by the refused run
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000003"]
    train(toy_config(tmp_path, shapes_folder, "run", "--train.learning_rate=0.1", "--train.allow_config_change=true"))
    assert len(logged(tmp_path / "run")) == 6


def test_changed_shape_is_refused_before_loading(tmp_path, shapes_folder, monkeypatch):
    """A new width would give a size-mismatch traceback on load: the config check comes first."""
    from helpers.toy_method import ToyMethod

    monkeypatch.setattr(ToyMethod, "crash_at_step", 5)
    with pytest.raises(RuntimeError):
        train(toy_config(tmp_path, shapes_folder, "run"))
    monkeypatch.setattr(ToyMethod, "crash_at_step", 0)
    with pytest.raises(UserError, match="method.width"):
        train(toy_config(tmp_path, shapes_folder, "run", "--method.width=4"))


def test_bookkeeping_keys_may_change(tmp_path, shapes_folder, reference):
    cfg = toy_config(tmp_path, shapes_folder, "run", "--method.use_ema=true", "--train.max_steps=3")
    train(cfg)
    # logging, checkpoint cadence and the number of workers do not change what is computed
    train(
        toy_config(
            tmp_path,
            shapes_folder,
            "run",
            "--method.use_ema=true",
            "--train.log_every=2",
            "--train.checkpoint_every=2",
        )
    )
    assert (tmp_path / "run" / "checkpoints" / "step-0000006").is_dir()


def test_raising_max_steps_continues_a_finished_run(tmp_path, shapes_folder, reference):
    train(toy_config(tmp_path, shapes_folder, "run", "--method.use_ema=true", "--train.max_steps=3"))
    assert yaml.safe_load((tmp_path / "run" / "export" / "ldmkit_config.yaml").read_text())["train"]["max_steps"] == 3
    train(toy_config(tmp_path, shapes_folder, "run", "--method.use_ema=true"))
    assert len(logged(tmp_path / "run")) == 6
    same_weights(tmp_path / "run", reference)
    with pytest.raises(UserError, match="below the step of the latest checkpoint"):
        train(toy_config(tmp_path, shapes_folder, "run", "--method.use_ema=true", "--train.max_steps=2"))


def test_resume_from_none_keeps_the_old_run_aside(tmp_path, shapes_folder):
    train(toy_config(tmp_path, shapes_folder, "run", "--train.max_steps=3"))
    train(
        toy_config(
            tmp_path, shapes_folder, "run", "--train.max_steps=3", "--method.width=8", "--train.resume_from=none"
        )
    )
    previous = list((tmp_path / "run" / "previous").iterdir())
    assert len(previous) == 1 and (previous[0] / "export" / "toy.safetensors").is_file()
    assert weights(tmp_path / "run")["0.weight"].shape[0] == 8


def test_resume_from_a_chosen_checkpoint(tmp_path, shapes_folder, reference):
    train(toy_config(tmp_path, shapes_folder, "a", "--method.use_ema=true"))
    chosen = tmp_path / "a" / "checkpoints" / "step-0000003"
    train(toy_config(tmp_path, shapes_folder, "b", "--method.use_ema=true", f"--train.resume_from={chosen}"))
    assert [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] == [
        4,
        5,
        6,
    ]
    same_weights(tmp_path / "b", reference)
    with pytest.raises(UserError, match="not an ldmkit checkpoint"):
        train(toy_config(tmp_path, shapes_folder, "c", f"--train.resume_from={tmp_path}"))


def test_a_second_run_on_the_same_output_dir_is_locked_out(tmp_path, shapes_folder):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with (out / ".ldmkit.lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345")
        held.flush()
        with pytest.raises(UserError, match=r"in use by another ldmkit run \(pid 12345\)"):
            train(toy_config(tmp_path, shapes_folder, "run"))
    train(toy_config(tmp_path, shapes_folder, "run", "--train.max_steps=1"))  # free again


# ---- damaged checkpoints -------------------------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "emptied":
        path.write_bytes(b"")
    elif how == "zeroed":  # same size: a block the disk lost
        path.write_bytes(bytes(path.stat().st_size))
    else:  # truncated
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "name,how",
    [
        ("trainable_0.safetensors", "deleted"),
        ("trainable_0.safetensors", "truncated"),
        ("optimizer.bin", "emptied"),
        ("optimizer.bin", "zeroed"),
        ("trainable_0.safetensors", "zeroed"),
        ("optimizer.bin", "truncated"),
        ("extra.safetensors", "truncated"),
        ("extra.json", "emptied"),
        ("trainer_state.json", "emptied"),
        ("trainer_state.json", "truncated"),
    ],
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, shapes_folder, reference, name, how, caplog):
    train(toy_config(tmp_path, shapes_folder, "run", "--method.use_ema=true", "--train.max_steps=4"))
    latest = tmp_path / "run" / "checkpoints" / "step-0000004"
    assert ckpt.damage(latest) is None
    _damage(latest / name, how)
    assert ckpt.damage(latest) is not None
    train(toy_config(tmp_path, shapes_folder, "run", "--method.use_ema=true"))
    assert f"skipping damaged checkpoint {latest}" in caplog.text
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    same_weights(tmp_path / "run", reference)


# Every kind of file a checkpoint of the toy run (with EMA) holds; the test below fails when a new kind
# appears, so that it is added here.
CHECKPOINT_FILES = [
    "trainable_0.safetensors",
    "optimizer.bin",
    "random_states_0.pkl",
    "extra.safetensors",
    "extra.json",
    "ldmkit_config.yaml",
    "trainer_state.json",
]


def _flip(path: Path) -> None:
    """One byte in the middle of the file inverted; the size stays."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, shapes_folder) -> Path:
    """A 4-step run (checkpoints at 3 and 4) that the byte-flip tests copy."""
    tmp = tmp_path_factory.mktemp("four")
    train(toy_config(tmp, shapes_folder, "run", "--method.use_ema=true", "--train.max_steps=4"))
    return tmp / "run"


def test_the_flip_tests_cover_every_file_of_a_checkpoint(four_steps):
    latest = four_steps / "checkpoints" / "step-0000004"
    assert sorted(p.name for p in latest.rglob("*") if p.is_file()) == sorted(CHECKPOINT_FILES)


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_byte_flipped_in_the_latest_checkpoint_falls_back_to_the_previous(
    tmp_path, shapes_folder, reference, name, caplog
):
    """Same size, other bytes: the checksum of the manifest (or of trainer_state.json itself) finds it; the run
    warns naming the file, resumes from step 3 and ends where the uninterrupted run ends."""
    train(toy_config(tmp_path, shapes_folder, "run", "--method.use_ema=true", "--train.max_steps=4"))
    latest = tmp_path / "run" / "checkpoints" / "step-0000004"
    _flip(latest / name)
    problem = ckpt.damage(latest)
    assert problem is not None and problem.startswith(name), problem
    caplog.set_level("INFO", logger="ldmkit.train")
    train(toy_config(tmp_path, shapes_folder, "run", "--method.use_ema=true"))
    assert f"skipping damaged checkpoint {latest}: {name}" in caplog.text
    assert f"resumed from {latest.parent / 'step-0000003'}" in caplog.text
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    same_weights(tmp_path / "run", reference)


def test_a_checkpoint_without_its_state_file_is_named_when_skipped(tmp_path, shapes_folder, caplog):
    """A deleted trainer_state.json used to make the checkpoint invisible without a word."""
    train(toy_config(tmp_path, shapes_folder, "run", "--method.use_ema=true", "--train.max_steps=4"))
    latest = tmp_path / "run" / "checkpoints" / "step-0000004"
    (latest / ckpt.STATE_FILE).unlink()
    assert ckpt.latest_valid_checkpoint(tmp_path / "run" / "checkpoints")[0] == 3
    assert f"skipping damaged checkpoint {latest}: trainer_state.json is missing" in caplog.text


def test_torn_last_metrics_line_is_tolerated(tmp_path, shapes_folder, monkeypatch):
    from helpers.toy_method import ToyMethod

    monkeypatch.setattr(ToyMethod, "crash_at_step", 5)
    with pytest.raises(RuntimeError):
        train(toy_config(tmp_path, shapes_folder, "run"))
    monkeypatch.setattr(ToyMethod, "crash_at_step", 0)
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a power cut in the middle of a line
    train(toy_config(tmp_path, shapes_folder, "run"))
    assert [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


def test_checkpoint_lists_its_files_sizes_and_checksums(reference):
    folder = reference / "checkpoints" / "step-0000006"
    state = ckpt.read_state(folder)
    assert state["step"] == 6 and {"trainable_0.safetensors", "optimizer.bin", "extra.safetensors"} <= set(
        state["files"]
    )
    for name, record in state["files"].items():
        assert record["size"] == (folder / name).stat().st_size > 0
        assert record["xxh3_128"] == xxhash.xxh3_128((folder / name).read_bytes()).hexdigest()
    # every file but the state itself is listed
    assert set(state["files"]) == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {
        ckpt.STATE_FILE
    }


# ---- Ctrl-C and SIGTERM ----------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["data", "loss", "backward", "optimizer", "after_step", "checkpoint"])
def test_interrupt_anywhere_in_a_step_resumes_exactly(tmp_path, shapes_folder, reference, monkeypatch, point):
    """SIGINT delivered at each point of step 4 (or during the step-3 checkpoint): the run finishes the
    step, saves, stops with Interrupted; the re-run equals the uninterrupted one."""
    import ldmkit.train.loop as loop

    from helpers.toy_method import ToyMethod

    fired = []
    # What SIGINT was before the run (Python's default in a terminal, SIG_IGN under nohup or in a background
    # job): the loop must put back whichever it was.
    before = signal.getsignal(signal.SIGINT)

    def fire(now: bool) -> None:
        if now and not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    calls = {"n": 0}
    original_loss, original_after = ToyMethod.loss, ToyMethod.after_step
    original_step, original_save = torch.optim.AdamW.step, loop.save_checkpoint
    original_to_device = loop._to_device

    def loss(self, batch):
        calls["n"] += 1
        fire(point == "loss" and calls["n"] == 4)
        out, logs = original_loss(self, batch)
        if point == "backward" and calls["n"] == 4:
            out.register_hook(lambda g: fire(True))
        return out, logs

    def after_step(self, step):
        original_after(self, step)
        fire(point == "after_step" and step == 4)

    def opt_step(self, *a, **k):
        result = original_step(self, *a, **k)
        fire(point == "optimizer" and calls["n"] == 4)
        return result

    def save(accelerator, method, lr_scheduler, cfg, step, samples_seen):
        fire(point == "checkpoint" and step == 3)
        return original_save(accelerator, method, lr_scheduler, cfg, step, samples_seen)

    def to_device(batch, device):
        fire(point == "data" and calls["n"] == 3)
        return original_to_device(batch, device)

    monkeypatch.setattr(ToyMethod, "loss", loss)
    monkeypatch.setattr(ToyMethod, "after_step", after_step)
    monkeypatch.setattr(torch.optim.AdamW, "step", opt_step)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    monkeypatch.setattr(loop, "_to_device", to_device)
    with pytest.raises(Interrupted, match=r"interrupted at step (3|4), checkpoint saved") as info:
        train(toy_config(tmp_path, shapes_folder, "run", "--method.use_ema=true"))
    assert info.value.signum == signal.SIGINT and fired
    assert signal.getsignal(signal.SIGINT) == before  # handlers restored
    monkeypatch.undo()
    train(toy_config(tmp_path, shapes_folder, "run", "--method.use_ema=true"))
    same_weights(tmp_path / "run", reference)
    ea = load_file(str(reference / "checkpoints" / "step-0000006" / "extra.safetensors"))
    eb = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000006" / "extra.safetensors"))
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=1e-6)


def test_sigterm_saves_and_exits_with_one_line(tmp_path, shapes_folder):
    """The CLI under SIGTERM (what clusters send): one line, exit 143, a checkpoint to resume from."""
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "ldmkit",
        "train",
        "--method.name=toy",
        f"--data.path={shapes_folder}",
        "--data.resolution=16",
        "--data.num_workers=1",
        "--train.batch_size=4",
        "--train.max_steps=100000",
        "--train.checkpoint_every=0",
        "--train.report_to=none",
        f"--output_dir={out}",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    import time

    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    last = [line for line in stderr.splitlines() if line.startswith("ldmkit:")]
    assert len(last) == 1 and "checkpoint saved; run the same command to resume" in last[0]
    assert "Traceback" not in stderr
    step = ckpt.latest_valid_checkpoint(out / "checkpoints")[0]
    assert step >= 3 and step == json.loads(metrics.read_text().splitlines()[-1])["step"]


# A toy run whose every loss() sleeps 0.3 s: a signal then lands inside a step, not between two.
SLOW_TOY = (
    "import sys, time\n"
    "from helpers.toy_method import ToyMethod\n"
    "loss = ToyMethod.loss\n"
    "ToyMethod.loss = lambda self, batch: (time.sleep(0.3), loss(self, batch))[1]\n"
    "from ldmkit.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _slow_run(out: Path, shapes_folder: Path, **popen) -> subprocess.Popen:
    args = [sys.executable, "-c", SLOW_TOY, "train", "--method.name=toy", f"--data.path={shapes_folder}"]
    args += ["--data.resolution=16", "--data.num_workers=0", "--train.max_steps=100000"]
    args += ["--train.checkpoint_every=0", "--train.report_to=none", f"--output_dir={out}"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _wait_for_steps(proc: subprocess.Popen, out: Path, n: int) -> None:
    import time

    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


def test_a_second_ctrl_c_aborts_at_once_with_exit_130(tmp_path, shapes_folder):
    """The first SIGINT asks for a checkpoint at the end of the step; the second, inside that same step
    (0.3 s long), aborts there: exit 130, one line, no traceback, no checkpoint written."""
    import time

    out = tmp_path / "run"
    proc = _slow_run(out, shapes_folder)
    _wait_for_steps(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert time.time() - sent < 10
    last = [line for line in stderr.splitlines() if line.startswith("ldmkit:")]
    assert last == ["ldmkit: aborted by a second Ctrl-C without saving; the last checkpoint stays"], stderr
    assert "Traceback" not in stderr
    assert ckpt.latest_valid_checkpoint(out / "checkpoints") is None  # aborted: nothing saved


def test_a_run_that_ignores_ctrl_c_says_so_once_and_stops_on_sigterm(tmp_path, shapes_folder):
    """Started with SIGINT ignored (what nohup and a background job do): it says once that Ctrl-C will not
    reach it and SIGTERM does; a SIGINT changes nothing; SIGTERM saves and exits 143."""
    import time

    out = tmp_path / "run"
    proc = _slow_run(out, shapes_folder, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    _wait_for_steps(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # still training
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.count("ignores Ctrl-C") == 1 and f"with SIGTERM (kill {proc.pid})" in stderr, stderr
    assert "Traceback" not in stderr
    assert ckpt.latest_valid_checkpoint(out / "checkpoints") is not None


def test_the_export_carries_a_manifest_that_generate_checks(reference, tmp_path):
    """Every file of the export but the model card and its grid (users edit cards) is listed with its
    checksum; a changed weight file is refused by name, an edited card is not."""
    import shutil

    from ldmkit.outputs import MANIFEST, verify

    export = tmp_path / "export"
    shutil.copytree(reference / "export", export)
    files = json.loads((export / MANIFEST).read_text())["files"]
    assert {"toy.safetensors", "ldmkit_config.yaml"} <= set(files) and "README.md" not in files
    (export / "README.md").write_text("my own card\n")
    verify(("--model", export))
    _flip(export / "toy.safetensors")
    with pytest.raises(UserError, match=r"--model .*export is damaged: toy.safetensors does not match its checksum"):
        verify(("--model", export))
    with pytest.raises(UserError, match="toy.safetensors"):
        verify(("--lora", export / "toy.safetensors"))
