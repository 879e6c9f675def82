from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "fixtures" / "real"


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """../shared/fixtures/real, or a skip with the reason when it is not beside the checkout."""
    if not REAL.is_dir():
        pytest.skip(f"real fixtures not found at {REAL} (../shared is absent)")
    return REAL


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def _seeded_hypothesis() -> None:
    """Property tests draw the same examples on every run (a failure is reproducible, never one run in seven);
    a failing example found once is kept as an explicit test beside its property."""
    try:
        from hypothesis import settings
    except ImportError:  # pragma: no cover - hypothesis is a dev dependency
        return
    settings.register_profile("loratool", derandomize=True, database=None, print_blob=True)
    settings.load_profile("loratool")


_seeded_hypothesis()


def _own_cache() -> None:
    """The suite keeps built family tables (loratool/arch/cache.py) in a folder of its own, shared by the
    commands it runs in subprocesses, never in the user's ~/.cache."""
    import os
    import tempfile

    os.environ.setdefault("LORATOOL_CACHE_DIR", tempfile.mkdtemp(prefix="loratool-test-cache-"))


_own_cache()
