"""Shared fixtures: tiny data and models are built locally; nothing is downloaded."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
# Subprocesses (ldmkit commands, accelerate launch) import this checkout's ldmkit and the test helpers,
# whichever ldmkit is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(TESTS), str(TESTS.parent / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["LDMKIT_METHODS"] = "toy=helpers.toy_method:ToyMethod"
# LDMKIT_TEST_THREADS (default 1): torch threads here and OMP_NUM_THREADS of every subprocess
# (helpers/threads.py says why one).
from helpers.threads import THREADS  # noqa: E402 (needs TESTS on sys.path)

torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)
# A suite started in the background (`cmd &` in a script, nohup) inherits SIGINT ignored, and every run a test
# starts would too (an ignored signal stays ignored across exec): the Ctrl-C tests would meet train/runs.py's
# "ignores Ctrl-C" case instead of a terminal's. With a handler here, children start with the default, as
# from a terminal; the ignored case has its own test (test_reliability, preexec_fn=SIG_IGN).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory) -> Path:
    """32 synthetic shape images with captions (image folder + metadata.jsonl)."""
    from ldmkit.data.synth import write_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, num=32, fmt="folder", size=32, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    from ldmkit.models.tiny import build_tiny_pipeline

    out = tmp_path_factory.mktemp("tiny-sd15")
    build_tiny_pipeline("sd15", out)
    return out


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from ldmkit.models.tiny import build_tiny_pipeline

    out = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_pipeline("sdxl", out)
    return out


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    from ldmkit.models.tiny import build_tiny_pipeline

    out = tmp_path_factory.mktemp("tiny-sd3")
    build_tiny_pipeline("sd3", out)
    return out


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    from ldmkit.models.tiny import build_tiny_pipeline

    out = tmp_path_factory.mktemp("tiny-flux")
    build_tiny_pipeline("flux", out)
    return out
