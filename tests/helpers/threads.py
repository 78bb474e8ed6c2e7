"""The tests' thread count: ``LDMKIT_TEST_THREADS`` (default 1) threads for torch in the test process
(conftest.py, and the ``pinned_threads`` fixture of modules that import it) and ``OMP_NUM_THREADS`` of every
subprocess the tests start (``thread_env``).

One by default: tiny models on a shared 2-core machine run fastest on one thread (a tiny conv: 44 ms with
2 threads, 1 ms with 1; 2 OpenMP threads per process spin against other processes). More threads run the
same tests through the multi-threaded kernels, whose float sums may be ordered differently.
"""

from __future__ import annotations

import os

import pytest
import torch


def _threads() -> int:
    raw = os.environ.get("LDMKIT_TEST_THREADS", "1")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"LDMKIT_TEST_THREADS must be a positive integer, got {raw!r}")
    return int(raw)


THREADS = _threads()


def thread_env(**extra: str) -> dict[str, str]:
    """``os.environ`` for a subprocess: ``OMP_NUM_THREADS`` = THREADS, plus ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), **extra}


@pytest.fixture(autouse=True, scope="module")
def pinned_threads():
    """THREADS torch threads for the module's tests, whatever a previous module left set."""
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(n)
