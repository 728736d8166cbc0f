"""Shared pytest fixtures: where the real data lives, and the built-in toy dataset."""
import os
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    return Path(os.environ.get("LUPNL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    "The real research data in ../shared/data. Missing: skipped locally, a failure under CI."
    p = _shared_data()
    if not p.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real data expected at {p} under CI but it is missing")
        pytest.skip(f"real data not found at {p} (set LUPNL_SHARED_DATA)")
    return p


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (still run by .ci/run)")
