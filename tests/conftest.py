"""Shared test set-up: the repository root on sys.path, two CPU threads, and the fixtures folder."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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
