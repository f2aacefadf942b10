"""Shared fixtures. ``shared_data`` is ``../shared/data`` beside the checkout (or $NNLAB_SHARED_DATA);
tests that need it skip with a reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

# The suite runs as the CLI does (nnlab's command line sets this; importing nnlab does not): set
# before torch loads OpenMP, so that idle threads of a busy 2-core machine sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    path = Path(os.environ.get("NNLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
    return path if path.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent (set NNLAB_SHARED_DATA to run this test)")
    return path


USER_CACHE = os.environ.get("NNLAB_DATA")


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Point nnlab's data cache ($NNLAB_DATA) at a fresh temporary folder.
    Use with ``pytestmark = pytest.mark.usefixtures("isolated_cache")``."""
    monkeypatch.setenv("NNLAB_DATA", str(tmp_path / "cache"))


@pytest.fixture
def user_cache(monkeypatch):
    """The real data sets use the user's cache, so they are decoded once, not once per test run."""
    if USER_CACHE is None:
        monkeypatch.delenv("NNLAB_DATA", raising=False)
    else:
        monkeypatch.setenv("NNLAB_DATA", USER_CACHE)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: small ops are far faster than on two threads of a busy
    2-core machine, and results are bit-for-bit stable. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
