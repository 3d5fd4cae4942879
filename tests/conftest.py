"""Shared test set-up: the repository root on sys.path, the CPU threads, and the fixtures folder."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2` (make test): one worker per core, one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # and for the scripts that the tests start
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture
def fixtures_dir():
    return FIXTURES


@pytest.fixture
def one_thread():
    """One torch thread for a test: tiny models gain nothing from two, and on a shared 2-core machine two OpenMP
    threads per process can make a test many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
